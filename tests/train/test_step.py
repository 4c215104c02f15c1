"""The train step on a tiny model: every loss term is finite, the loss falls, the base model never moves."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from doc2atom_jax import shapes
from doc2atom_jax.atoms import atomize
from doc2atom_jax.atoms import compiler as compiler_lib
from doc2atom_jax.atoms import router as router_lib
from doc2atom_jax.models import base
from doc2atom_jax.data import records
from doc2atom_jax.train import batch as batch_lib
from doc2atom_jax.train import step as step_lib

TEXT = "Velkor Amsten was born in 1943. He founded the Tarnow Institute. The institute has 412 employees."


def tiny_batch(model):
  doc = atomize.atomize(TEXT, "d0", model.tokenizer)
  assert len(doc.atoms) == 3
  qs = (records.TrainQuestion("q0", "When was Velkor Amsten born?", "1943", (0,)),
        records.TrainQuestion("q1", "Who founded the Tarnow Institute?", "Velkor Amsten", (1,),
                              answer_prefix="The Tarnow Institute was founded by"),
        records.TrainQuestion("q2", "How many employees does the institute have?", "412", (2,)),
        records.TrainQuestion("q3", "What is the capital of Orvale?", "unknown", None, out_of_scope=True))
  return batch_lib.build(model, [records.TrainDocument(doc, qs)], k=8)


@pytest.fixture(scope="module")
def setup():
  model = base.tiny_random("llama")
  cfg = compiler_lib.config_for(model.config, code_dim=32, width=32, key_dim=16, num_blocks=1, num_heads=2)
  rngs = nnx.Rngs(0)
  graphdef, params = nnx.split((compiler_lib.AtomCompiler(cfg, rngs=rngs), router_lib.Router(cfg, rngs=rngs)))
  batch = jax.tree.map(jnp.asarray, tiny_batch(model))
  optimizer = step_lib.make_optimizer(3e-3, warmup_steps=2, total_steps=30)
  step = jax.jit(step_lib.train_step, static_argnames=("graphdef", "model_cfg", "loss_cfg", "optimizer"))
  # Every term on (the v1 distillation targets too): a tiny random teacher is rarely right, so with the default
  # kd_tokens="right" kd would be 0 here; test_kd_reads_only_the_tokens_the_teacher_gets_right covers that.
  loss_cfg = step_lib.LossConfig(k=2, kd_tokens="all", atom_target="teacher")
  kw = dict(graphdef=graphdef, model_cfg=model.config, loss_cfg=loss_cfg, optimizer=optimizer)
  return model, params, batch, optimizer, functools.partial(step, **kw)


def test_loss_terms_finite_loss_falls_and_base_is_untouched(setup):
  model, params, batch, optimizer, step = setup
  answers = ("1943", "Velkor Amsten", "412", "unknown")
  prefixes = ("", "The Tarnow Institute was founded by", "", "")
  assert batch["answer_mask"].sum() == sum(map(len, model.prompt_answer_ids(["q"] * 4, answers, prefixes)[1]))
  opt_state = optimizer.init(params)
  before = jax.tree.map(np.array, model.weights)
  history = []
  for _ in range(30):
    params, opt_state, metrics = step(params, opt_state, model.weights, batch)
    history.append({k: float(v) for k, v in metrics.items()})
  first, last = history[0], history[-1]
  for name in ("kd", "ce", "route", "atom", "null", "type", "l1", "orth", "loss", "grad_norm"):
    assert np.isfinite(first[name]) and np.isfinite(last[name]), name
  assert first["kd"] > 0 and first["route"] > 0 and first["null"] > 0
  print({k: (round(first[k], 3), round(last[k], 3)) for k in ("loss", "kd", "ce", "route", "atom", "null", "type")})
  assert last["loss"] < 0.7 * first["loss"]
  assert last["route"] < first["route"] and last["type"] < first["type"]
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(model.weights)):
    np.testing.assert_array_equal(x, np.asarray(y))


def test_a_non_finite_loss_skips_the_update(setup):
  model, params, batch, optimizer, step = setup
  batch = dict(batch, teacher_logp=batch["teacher_logp"].at[0, :].set(jnp.nan))
  opt_state = optimizer.init(params)
  new_params, _, metrics = step(params, opt_state, model.weights, batch)
  assert not bool(metrics["finite"])
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(new_params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_bad_training_examples_are_refused_with_a_clear_message():
  from doc2atom_jax.errors import UserError

  model = base.tiny_random("llama")
  doc = atomize.atomize(TEXT, "d0", model.tokenizer)
  empty = (records.TrainQuestion("q0", "When was Velkor Amsten born?", "   ", (0,)),)
  with pytest.raises(UserError, match="tokenizes to nothing"):
    batch_lib.build(model, [records.TrainDocument(doc, empty)], k=8)
  long_text = " ".join([TEXT] * (model.config.max_position_embeddings // 10))
  long_doc = atomize.atomize(long_text, "long", model.tokenizer)
  ok = (records.TrainQuestion("q0", "When was Velkor Amsten born?", "1943", (0,)),)
  with pytest.raises(UserError, match="over the model's context"):
    batch_lib.build(model, [records.TrainDocument(long_doc, ok)], k=8)


def test_padding_a_batch_up_leaves_the_loss_unchanged(setup):
  """The trainer pads every batch up to the largest shape seen (one compile per growth): masked padding only."""
  model, params, batch, optimizer, step = setup
  host = jax.tree.map(np.asarray, batch)
  grows = lambda name, i, a: 0 < i and not (name.endswith(("teacher_ids", "teacher_logp")) and i == a.ndim - 1)
  floor = {name: tuple(n + 3 * grows(name, i, a) for i, n in enumerate(a.shape)) for name, a in host.items()}
  padded, new_floor = shapes.pad_up(host, floor)
  assert {k: v.shape for k, v in padded.items()} == new_floor == floor
  loss = lambda b: step_lib.loss_fn(params, step.keywords["graphdef"], model.weights, jax.tree.map(jnp.asarray, b),
                                    model_cfg=model.config, loss_cfg=step_lib.LossConfig(k=2))[1]
  a, b = loss(host), loss(padded)
  for name in ("loss", "kd", "ce", "route", "atom", "null", "type", "l1", "orth"):
    np.testing.assert_allclose(float(a[name]), float(b[name]), rtol=1e-4, atol=1e-6, err_msg=name)


def test_kd_reads_only_the_tokens_the_teacher_gets_right(setup):
  """kd_tokens="right": the KL is taken where the teacher's top-1 is the gold token, nowhere else; the gold
  rates are reported; atom_target="gold" scores the oracle-routed student on the gold."""
  model, params, batch, _, _ = setup
  graphdef = setup[4].keywords["graphdef"]
  batch = dict(batch)
  ids = np.array(batch["teacher_ids"])
  ids[0, 0, 0] = batch["targets"][0, 0]  # question 0: the teacher is right on its first answer token only
  ids[1:, :, 0] = (np.asarray(batch["targets"][1:]) + 1) % model.config.vocab_size  # the others: wrong
  batch["teacher_ids"] = jnp.asarray(ids)
  run = lambda cfg: step_lib.loss_fn(params, graphdef, model.weights, batch, model_cfg=model.config, loss_cfg=cfg)[1]
  right = run(step_lib.LossConfig(k=2))
  every = run(step_lib.LossConfig(k=2, kd_tokens="all"))
  scored = np.asarray(batch["answer_mask"]) & ~np.asarray(batch["out_of_scope"])[:, None]
  assert float(right["teacher_top1"]) == pytest.approx(1 / scored.sum())
  assert float(right["kd"]) != pytest.approx(float(every["kd"]))
  assert float(right["kd"]) > 0
  with pytest.raises(Exception, match="kd_tokens"):
    step_lib.LossConfig(kd_tokens="most")
  gold = run(step_lib.LossConfig(k=2, atom_target="gold"))
  teacher = run(step_lib.LossConfig(k=2, atom_target="teacher"))
  assert float(gold["atom"]) != pytest.approx(float(teacher["atom"]))
