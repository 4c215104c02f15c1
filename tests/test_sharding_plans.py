"""Sharding plans (dp, fsdp, fsdp_tp) on 8 simulated devices: one tiny training step equals the single-device
step, the parameters lie as the plan says, routing top-k over a sharded bank equals the unsharded one, and
bad plans, rules and meshes are one clear UserError.

Tolerances: loss rtol 1e-5; updated parameters rtol 1e-5, atol 1e-6 (AdamW's first step moves every weight by
about the learning rate, 1e-3, so atol 1e-6 is 0.1% of a step); routing: indices and scores exactly equal.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import tiny
from doc2atom_jax import modes, parallel
from doc2atom_jax.atoms import atomize
from doc2atom_jax.atoms import compiler as compiler_lib
from doc2atom_jax.atoms import router as router_lib
from doc2atom_jax.errors import UserError
from doc2atom_jax.models import base
from doc2atom_jax.data import records
from doc2atom_jax.train import batch as batch_lib
from doc2atom_jax.train import step as step_lib
from doc2atom_jax.train import trainer
from tests.train.test_step import TEXT

# (plan, mesh): every plan on the 2x2x2 mesh, where they differ most, plus other shapes. (8, 1, 1) is the trainer
# tests' mesh (tests/train/test_trainer.py), where all three plans lay out the same.
CASES = [("dp", (2, 2, 2)), ("fsdp", (2, 4, 1)), ("fsdp", (2, 2, 2)), ("fsdp_tp", (2, 2, 2)), ("fsdp_tp", (1, 4, 2))]


@pytest.fixture(scope="module")
def setup():
  assert jax.device_count() == 8
  model = base.tiny_random("llama")
  cfg = compiler_lib.config_for(model.config, code_dim=32, width=32, key_dim=16, num_blocks=1, num_heads=2)
  rngs = nnx.Rngs(0)
  graphdef, params = nnx.split((compiler_lib.AtomCompiler(cfg, rngs=rngs), router_lib.Router(cfg, rngs=rngs)))
  doc = atomize.atomize(TEXT, "d0", model.tokenizer)
  qs = (records.TrainQuestion("q0", "When was Velkor Amsten born?", "1943", (0,)),
        records.TrainQuestion("q1", "Who founded the Tarnow Institute?", "Velkor Amsten", (1,)),
        records.TrainQuestion("q2", "How many employees does the institute have?", "412", (2,)),
        records.TrainQuestion("q3", "What is the capital of Orvale?", "unknown", None, out_of_scope=True))
  # 8 question rows (4 padded, masked): the example axis splits over all 8 devices under dp.
  batch = jax.tree.map(jnp.asarray, batch_lib.build(model, [records.TrainDocument(doc, qs)], k=8, num_questions=8))
  optimizer = step_lib.make_optimizer(1e-3, warmup_steps=1)
  static = dict(graphdef=graphdef, model_cfg=model.config, loss_cfg=step_lib.LossConfig(k=2), optimizer=optimizer)
  fn = lambda p, o, w, b: step_lib.train_step(p, o, w, b, **static)
  single = jax.jit(fn)(params, optimizer.init(params), model.weights, batch)
  return model, params, batch, optimizer, fn, single


def sharded_step(setup, plan, shape):
  model, params, batch, optimizer, fn, _ = setup
  rules = parallel.rules_for(plan)
  mesh = parallel.make_mesh(shape)
  p_sh = parallel.state_shardings(params, mesh, rules)
  w_sh = parallel.module_weight_shardings(model.decoder, mesh, rules)
  b_sh = parallel.batch_shardings(batch, mesh, trainer.QUESTION_FIELDS, rules)
  s_params = jax.device_put(params, p_sh)
  s_opt, o_sh = parallel.optimizer_state(optimizer, s_params, p_sh, mesh)
  s_weights = jax.device_put(model.weights, w_sh)
  step = jax.jit(fn, in_shardings=(p_sh, o_sh, w_sh, b_sh), out_shardings=(p_sh, o_sh, None))
  return step(s_params, s_opt, s_weights, jax.device_put(batch, b_sh)), s_weights, mesh


def spec(x):
  return tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))


@pytest.mark.parametrize("plan,shape", CASES, ids=[f"{p}-{'x'.join(map(str, s))}" for p, s in CASES])
def test_plan_step_equals_single_device_and_shards_as_planned(setup, plan, shape):
  _, _, batch, _, _, single = setup
  (new_params, _, metrics), weights, mesh = sharded_step(setup, plan, shape)
  assert bool(metrics["finite"])
  np.testing.assert_allclose(float(metrics["loss"]), float(single[2]["loss"]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(single[0])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)

  compiler = new_params[0]
  embed, gate = weights["embed"], weights["layers"]["gate"]  # [vocab, d], [L, d, f]
  in_proj, wq, head_a = compiler["in_proj"][...], compiler["blocks"]["wq"][...], compiler["head_a"][0][...]
  fsdp, tensor = mesh.shape["fsdp"], mesh.shape["tensor"]
  f, t = ("fsdp" if fsdp > 1 else None), ("tensor" if tensor > 1 else None)
  expected = {
      "dp": {"embed": (None, None), "gate": (None, None, None), "in_proj": (None, None), "wq": (None, None, None),
             "head_a": (None, None, None)},
      "fsdp": {"embed": (None, "fsdp"), "gate": (None, "fsdp", None), "in_proj": ("fsdp", None),
               "wq": (None, "fsdp", None), "head_a": (None, None, "fsdp")},
      "fsdp_tp": {"embed": ("tensor", "fsdp"), "gate": (None, "fsdp", "tensor"), "in_proj": ("fsdp", None),
                  "wq": (None, "fsdp", "tensor"), "head_a": (None, None, "tensor")},
  }[plan]
  arrays = {"embed": embed, "gate": gate, "in_proj": in_proj, "wq": wq, "head_a": head_a}
  for name, want in expected.items():
    # A mesh axis of size 1 may appear in the spec or not; what counts is the axes that really split.
    got = tuple(a if a in ("fsdp", "tensor") and mesh.shape[a] > 1 else None for a in spec(arrays[name]))
    assert got == tuple(a if a is None else {"fsdp": f, "tensor": t}[a] for a in want), (plan, name, spec(arrays[name]))
  splits = {"dp": 1, "fsdp": fsdp, "fsdp_tp": fsdp * tensor}[plan]
  assert parallel.bytes_per_device(gate) * splits == gate.size * gate.dtype.itemsize
  axes = {"dp": ("data", "fsdp", "tensor"), "fsdp": ("data", "fsdp"), "fsdp_tp": ("data", "fsdp")}[plan]
  b_sh = parallel.batch_shardings(batch, mesh, trainer.QUESTION_FIELDS, parallel.rules_for(plan))
  assert b_sh["s_tokens"].spec == P(axes) and b_sh["doc_tokens"].spec == P()


def test_default_plan_is_the_trainers_layout():
  """fsdp_tp is the rule table the trainer always used: the same specs for every parameter of the tiny system."""
  model = base.tiny_random("llama")
  cfg = compiler_lib.config_for(model.config, code_dim=32, width=32, key_dim=16, num_blocks=1, num_heads=2)
  rngs = nnx.Rngs(0)
  _, params = nnx.split((compiler_lib.AtomCompiler(cfg, rngs=rngs), router_lib.Router(cfg, rngs=rngs)))
  mesh = parallel.make_mesh((2, 2, 2))
  for old, new in [(parallel.state_shardings(params, mesh), parallel.state_shardings(params, mesh,
                                                                                    parallel.rules_for("fsdp_tp"))),
                   (parallel.module_weight_shardings(model.decoder, mesh),
                    parallel.module_weight_shardings(model.decoder, mesh, parallel.rules_for()))]:
    assert [s.spec for s in jax.tree.leaves(old)] == [s.spec for s in jax.tree.leaves(new)]
  assert trainer.TrainConfig().rules == parallel.DEFAULT_RULES
  assert parallel.batch_axes(parallel.DEFAULT_RULES) == parallel.batch_axes(parallel.rules_for()) == ("data", "fsdp")


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)])
def test_routing_top_k_over_a_sharded_bank_equals_unsharded(shape):
  """4096 random keys sharded along the atom axis: identical scores, indices (ties included: the keys hold
  exact duplicates in different shards, and lax.top_k documents lower index first among equals), weights and
  abstentions, with the plain top-k and with the blockwise one (one block per shard)."""
  d_k, n, batch, k = 16, 4096, 6, 8
  rng = np.random.default_rng(0)
  keys = rng.normal(size=(n, d_k)).astype(np.float32)
  keys[3000:3008] = keys[5:13]  # duplicates across shards: tied scores
  keys /= np.linalg.norm(keys, axis=-1, keepdims=True)
  queries = keys[[5, 7, 100, 2000, 4095, 9]] + 0.01 * rng.normal(size=(batch, d_k)).astype(np.float32)
  queries[0] = keys[5]  # an exact tie at the top: columns 5 and 3000
  mask = np.ones(n, bool)
  mask[-5:] = False  # padding rows of a bucketed bank
  null_key = rng.normal(size=(d_k,)).astype(np.float32)
  cfg = compiler_lib.CompilerConfig(num_layers=2, hidden_size=8, target_dims=((8, 8),), key_dim=d_k, width=8)
  graphdef, state = nnx.split(router_lib.Router(cfg, rngs=nnx.Rngs(0)))

  def route(keys, mask, queries, *, blocks):
    router = nnx.merge(graphdef, state)
    scores = router.scores(queries, keys, mask, null_key)
    return (scores, *router_lib.select(scores, k, "softmax", blocks=blocks))

  reference = jax.jit(lambda a, b, c: route(a, b, c, blocks=1))(keys, mask, queries)
  mesh = parallel.make_mesh(shape)
  rules = parallel.rules_for("fsdp_tp")
  sh = parallel.bank_shardings({"keys": keys, "mask": mask}, mesh, rules)
  assert sh["keys"].spec == P(("data", "fsdp"), None)
  replicated = NamedSharding(mesh, P())
  shards = parallel._mesh_size(mesh, ("data", "fsdp"))
  for blocks in (1, shards):
    out = jax.jit(lambda a, b, c: route(a, b, c, blocks=blocks),
                  in_shardings=(sh["keys"], sh["mask"], replicated))(
        jax.device_put(keys, sh["keys"]), jax.device_put(mask, sh["mask"]), queries)
    for got, want in zip(out, reference):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  idx = np.asarray(reference[1])
  assert idx[0, 0] == 5 and idx[0, 1] == 3000  # the tie: lower index first


def test_blockwise_top_k_equals_lax_top_k_with_ties():
  x = jnp.asarray(np.random.default_rng(1).integers(0, 16, (5, 4096)).astype(np.float32))  # ties everywhere
  want = jax.lax.top_k(x, 8)
  for blocks in (2, 8, 64, 3):  # 3 does not divide 4096: falls back to one block
    got = router_lib.top_k(x, 8, blocks)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


# ---------------------------------------------------------------------------------------------------------
# Bad input: one clear UserError each.
# ---------------------------------------------------------------------------------------------------------
def test_mesh_that_does_not_divide_the_devices():
  with pytest.raises(UserError, match="needs 12 devices; 8 are available"):
    parallel.make_mesh((3, 2, 2))
  with pytest.raises(UserError, match=r"fixed axes \(3 devices\) do not divide the 8 devices"):
    parallel.make_mesh((-1, 3, 1))


def test_unknown_plan():
  with pytest.raises(UserError, match="unknown sharding plan 'zero3'; valid: dp, fsdp, fsdp_tp"):
    parallel.rules_for("zero3")


def test_rule_naming_an_unknown_mesh_axis_or_logical_axis():
  with pytest.raises(UserError, match="unknown mesh axis 'model'"):
    parallel.rules_for("fsdp", (("mlp", "model"),))
  with pytest.raises(UserError, match="unknown logical axis 'mpl'"):
    parallel.rules_for("fsdp", (("mpl", "tensor"),))
  rules = dict(parallel.rules_for("fsdp", (("mlp", "tensor"), ("atoms", ["data", "fsdp", "tensor"]))))
  assert rules["mlp"] == "tensor" and rules["atoms"] == ("data", "fsdp", "tensor") and rules["embed"] == "fsdp"


def bad_train_config(**overrides):
  c = tiny.get_config()
  c.unlock()
  c.data.source = "generator"
  for key, value in overrides.items():
    section, name = key.split("__")
    c[section][name] = value
  return c


@pytest.mark.parametrize("overrides,needle", [
    (dict(sharding__plan="zero3"), "unknown sharding plan"),
    (dict(sharding__rules=(("mlp", "model"),)), "unknown mesh axis 'model'"),
    (dict(train__mesh=(3, 2, 2)), "needs 12 devices"),
])
def test_train_mode_rejects_bad_sharding_before_loading_the_model(tmp_path, monkeypatch, overrides, needle):
  monkeypatch.setattr(modes, "build_system", lambda *a, **k: pytest.fail("the model was loaded"))
  with pytest.raises(UserError, match=needle):
    modes.train(bad_train_config(**overrides), tmp_path)


def test_batch_that_does_not_divide_the_batch_axes_is_padded_and_said(tmp_path, monkeypatch, capsys):
  """4 questions a step over data=8: the question axis is padded to 8 masked rows (the step's loss is the same,
  batch_lib pads this way already), and the run says so; rules reach the trainer."""
  seen = {}

  def fake_train(system, documents_for_step, tcfg, loss_cfg, workdir, **kwargs):
    seen.update(tcfg=tcfg, num_questions=kwargs["num_questions"])
    return []

  monkeypatch.setattr(trainer, "train", fake_train)
  monkeypatch.setattr(modes, "_untrained_results", lambda *a, **k: {})
  config = bad_train_config(train__mesh=(8, 1, 1), sharding__plan="fsdp", eval__documents=0)
  modes.train(config, tmp_path)
  assert seen["num_questions"] == 8 and seen["tcfg"].rules == parallel.rules_for("fsdp")
  said = capsys.readouterr().out
  assert "4 questions a step do not split over the batch mesh axes data=8 x fsdp=1; padded to 8" in said
  assert parallel.padded_batch(16, {"data": 2, "fsdp": 2, "tensor": 2}, parallel.rules_for("dp"), say=None) == 16
