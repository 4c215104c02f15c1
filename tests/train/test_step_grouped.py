"""d2l training with the grouped adapter (one per document, ragged_dot) equals the gather form (one copy per
question): loss, every metric and every gradient; composition per group equals composition per example."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import quickstart
from doc2atom_jax import shapes
from doc2atom_jax.atoms import atomize
from doc2atom_jax.atoms import compiler as compiler_lib
from doc2atom_jax.atoms import compose
from doc2atom_jax.atoms import router as router_lib
from doc2atom_jax.errors import UserError
from doc2atom_jax.models import adapter as adapter_lib
from doc2atom_jax.models import base
from doc2atom_jax.data import records
from doc2atom_jax.train import batch as batch_lib
from doc2atom_jax.train import step as step_lib
from tests.train.test_step import TEXT

OTHER = "Mira Oskel won the Halden Prize in 1988. She lives in Daskel."
THIRD = "Daskel is a coastal city in Vorland."
ORDER = (4, 0, 5, 3, 1, 2)  # question rows shuffled: doc_of_q unsorted, padding row inside; doc 1 has none


@pytest.fixture(scope="module")
def setup():
  model = base.tiny_random("llama")
  cfg = compiler_lib.config_for(model.config, targets=("down", "q"), rank=2, code_dim=32, width=32, key_dim=16,
                                num_blocks=1, num_heads=2)
  rngs = nnx.Rngs(0)
  graphdef, params = nnx.split((compiler_lib.AtomCompiler(cfg, rngs=rngs), router_lib.Router(cfg, rngs=rngs)))
  keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
  params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape), params)  # B scalers != 0
  q = records.TrainQuestion
  docs = [records.TrainDocument(atomize.atomize(TEXT, "d0", model.tokenizer), (
              q("q0", "When was Velkor Amsten born?", "1943"), q("q1", "Who founded it?", "Velkor Amsten"),
              q("q2", "How many employees?", "412"))),
          records.TrainDocument(atomize.atomize(THIRD, "d1", model.tokenizer), ()),
          records.TrainDocument(atomize.atomize(OTHER, "d2", model.tokenizer), (
              q("q3", "Who won the Halden Prize?", "Mira Oskel"), q("q4", "When?", "1988")))]
  batch = batch_lib.build(model, docs, k=8, num_questions=6)  # one padding row (q_valid False)
  rows = lambda name: name == "doc_of_q" or not name.startswith(("doc_", "atom_"))
  batch = {k: jnp.asarray(v[list(ORDER)] if rows(k) else v) for k, v in batch.items()}
  assert list(batch["doc_of_q"]) == [2, 0, 0, 2, 0, 0] and not bool(batch["q_valid"][2])
  return model, cfg, graphdef, params, batch


def test_d2l_loss_and_gradients_grouped_equal_gather(setup):
  model, _, graphdef, params, batch = setup
  d2l = step_lib.LossConfig(route=0.0, atom=0.0, null=0.0, k=2, routed=False, kd_tokens="all")  # a random teacher
  grad = jax.jit(jax.value_and_grad(step_lib.loss_fn, has_aux=True), static_argnames=("graphdef", "model_cfg",
                                                                                        "loss_cfg"))
  results = {}
  for form in ("gather", "grouped"):
    loss_cfg = dataclasses.replace(d2l, compose_form=form)
    assert loss_cfg.grouped == (form == "grouped")
    results[form] = grad(params, graphdef, model.weights, batch, model_cfg=model.config, loss_cfg=loss_cfg)
    jaxpr = str(jax.make_jaxpr(lambda p: step_lib.loss_fn(p, graphdef, model.weights, batch,  # noqa: B023
                                                          model_cfg=model.config, loss_cfg=loss_cfg))(params))
    assert ("ragged_dot" in jaxpr) == (form == "grouped")
  (loss_g, metrics_g), grads_g = results["grouped"]
  (loss_r, metrics_r), grads_r = results["gather"]
  assert float(metrics_r["kd"]) > 0
  np.testing.assert_allclose(float(loss_g), float(loss_r), rtol=1e-5)
  for name in metrics_r:
    np.testing.assert_allclose(float(metrics_g[name]), float(metrics_r[name]), rtol=1e-5, atol=1e-7, err_msg=name)
  leaves_g, leaves_r = jax.tree.leaves(grads_g), jax.tree.leaves(grads_r)
  assert len(leaves_g) == len(leaves_r) and any(float(jnp.abs(g).max()) > 0 for g in leaves_r)
  # Float32 summation order alone moves these gradients by a few 1e-6 (relative norm): reversing the rank
  # axis of the gather form's factors moves them by 5e-6, ragged_dot vs the einsums by 3.5e-6.
  diff = np.sqrt(sum(float(jnp.sum((g - r) ** 2)) for g, r in zip(leaves_g, leaves_r)))
  assert diff < 2e-5 * np.sqrt(sum(float(jnp.sum(r ** 2)) for r in leaves_r))
  for g, r in zip(leaves_g, leaves_r):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * float(jnp.abs(r).max()))


def test_composing_per_group_equals_composing_per_example(setup):
  model, cfg, graphdef, params, _ = setup
  compiler, _ = nnx.merge(graphdef, params)
  rng = np.random.default_rng(0)
  codes = jnp.asarray(rng.normal(size=(3, 5, cfg.num_layers, len(cfg.targets), cfg.rank, cfg.code_dim)), jnp.float32)
  weights = jnp.asarray(rng.uniform(size=(3, 5)), jnp.float32)
  groups = jnp.asarray([2, 0, 0, 2, 0], jnp.int32)
  head, default = compiler.head(), compiler.default_codes[...]
  grouped = compose.compose(head, codes, weights, default, cfg.alpha, cfg.targets, groups=groups)
  per_example = compose.compose(head, codes[groups], weights[groups], default, cfg.alpha, cfg.targets)
  assert grouped.factors["down"].a.shape[0] == 3 and per_example.factors["down"].a.shape[0] == 5
  for g, e in zip(jax.tree.leaves(adapter_lib.ungroup(grouped)), jax.tree.leaves(per_example)):
    np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-7)
  # from a bank: indices and weights per group, each group's document by doc_index
  bank = codes  # [D=3, N=5, ...]
  indices = jnp.asarray([[0, 1, compose.NULL_INDEX], [4, 3, 2]])
  from_bank = compose.adapter_from_bank(head, bank, indices, weights[:2, :3], compiler.null()[0], default,
                                        jnp.asarray([2, 0]), alpha=cfg.alpha, targets=cfg.targets,
                                        groups=jnp.asarray([1, 0, 1], jnp.int32))
  assert from_bank.factors["q"].a.shape[0] == 2 and from_bank.groups.shape == (3,)


def test_loss_config_reads_compose_form():
  d2l = quickstart.get_config("d2l")
  assert d2l.atoms.compose_form == "auto"
  assert step_lib.loss_config(d2l).grouped == (jax.default_backend() != "cpu")  # auto: ragged_dot off CPU
  assert dataclasses.replace(step_lib.loss_config(d2l), compose_form="grouped").grouped
  assert not step_lib.loss_config(quickstart.get_config()).grouped  # doc2atom: routed, always gathers
  older = d2l.copy_and_resolve_references()
  older.unlock()
  del older.atoms["compose_form"]  # a config from before the field: auto
  assert step_lib.loss_config(older).compose_form == "auto"
  assert not dataclasses.replace(step_lib.loss_config(d2l), compose_form="gather").grouped
  with pytest.raises(UserError, match="unknown compose_form"):
    step_lib.LossConfig(compose_form="ragged")


@pytest.mark.parametrize("n, want", [(1, 1), (2, 2), (3, 4), (5, 8), (8, 8), (9, 16), (17, 24)])
def test_atom_axis_pads_to_a_power_of_two_then_multiples(n, want):
  assert shapes.atom_bucket(n, 8) == want


def test_one_unit_per_document_is_not_padded_to_eight():
  """d2l compiles a document as one unit: its batch's atom axis is 1 wide, not the old bucket of 8."""
  model = base.tiny_random("llama")
  doc = atomize.atomize(TEXT, "d0", model.tokenizer)
  whole = dataclasses.replace(doc, atoms=doc.atoms[:1])
  batch = batch_lib.build(model, [records.TrainDocument(whole, (records.TrainQuestion("q0", "Who?", "Velkor"),))], k=4)
  assert batch["atom_idx"].shape[1] == 1 and batch["atom_mask"].all()
