"""The document-state cache: a step on cached span states is the step on the document pass; entries are reused,
keyed by model, and rebuilt when unreadable."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from doc2atom_jax.atoms import atomize
from doc2atom_jax.atoms import compiler as compiler_lib
from doc2atom_jax.atoms import encode
from doc2atom_jax.atoms import router as router_lib
from doc2atom_jax.data import records
from doc2atom_jax.models import base
from doc2atom_jax.train import batch as batch_lib
from doc2atom_jax.train import state_cache
from doc2atom_jax.train import step as step_lib

TEXTS = ("Velkor Amsten was born in 1943. He founded the Tarnow Institute. The institute has 412 employees.",
         "Mira Quell lives in Sorvane. She plays the cello.")


def documents(model):
  docs = [atomize.atomize(t, f"d{i}", model.tokenizer) for i, t in enumerate(TEXTS)]
  return [records.TrainDocument(docs[0], (records.TrainQuestion("q0", "When was Velkor Amsten born?", "1943", (0,)),
                                          records.TrainQuestion("q1", "What is the capital of Orvale?", "unknown",
                                                                None, out_of_scope=True))),
          records.TrainDocument(docs[1], (records.TrainQuestion("q2", "Where does Mira Quell live?", "Sorvane", (0,)),))]


@pytest.fixture(scope="module")
def model():
  return base.tiny_random("llama")


def test_step_on_cached_states_equals_the_step_on_the_document_pass(model, tmp_path):
  cache = state_cache.DocumentStateCache(tmp_path, model)
  plain = batch_lib.build(model, documents(model), k=8)
  cached = batch_lib.build(model, documents(model), k=8, states=cache)
  D, N, S = plain["atom_idx"].shape
  assert cached["doc_spans"].shape == (D, N, S, model.config.num_layers, model.config.hidden_size)
  assert not cached["doc_spans"][~plain["atom_span_mask"]].any()  # padding reads zeros, as gather_spans gives
  cfg = compiler_lib.config_for(model.config, code_dim=32, width=32, key_dim=16, num_blocks=1, num_heads=2)
  rngs = nnx.Rngs(0)
  graphdef, params = nnx.split((compiler_lib.AtomCompiler(cfg, rngs=rngs), router_lib.Router(cfg, rngs=rngs)))
  loss_cfg = step_lib.LossConfig(k=2, kd_tokens="all", atom_target="teacher")
  grad_fn = jax.jit(jax.value_and_grad(step_lib.loss_fn, has_aux=True), static_argnames=("graphdef", "model_cfg",
                                                                                         "loss_cfg"))
  outs = [grad_fn(params, graphdef, model.weights, jax.tree.map(jnp.asarray, b), model_cfg=model.config,
                  loss_cfg=loss_cfg) for b in (plain, cached)]
  (loss_p, metrics_p), grads_p = outs[0]
  (loss_c, metrics_c), grads_c = outs[1]
  assert float(loss_p) > 0
  np.testing.assert_allclose(float(loss_c), float(loss_p), rtol=1e-5)
  for name in ("kd", "ce", "route", "atom", "type"):
    np.testing.assert_allclose(float(metrics_c[name]), float(metrics_p[name]), rtol=1e-4, atol=1e-6)
  for gp, gc in zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads_c)):
    np.testing.assert_allclose(np.asarray(gc), np.asarray(gp), rtol=1e-3, atol=1e-5)
  # the compiler's gradient is not zero: the cached path really reaches it
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads_c))


def test_entries_are_reused_keyed_by_model_and_rebuilt_when_unreadable(model, tmp_path, monkeypatch):
  cache = state_cache.DocumentStateCache(tmp_path, model)
  ids = documents(model)[0].doc.token_ids
  first = cache.get_or_compute(model, ids)
  assert first.shape == (model.config.num_layers, len(ids), model.config.hidden_size)
  np.testing.assert_allclose(first, np.asarray(encode.document_states(model, ids)), rtol=1e-6)
  files = list(tmp_path.rglob("*.npy"))
  assert len(files) == 1

  def no_pass(*args, **kwargs):
    raise AssertionError("a cached document was encoded again")

  monkeypatch.setattr(encode, "document_states", no_pass)
  np.testing.assert_array_equal(cache.get_or_compute(model, ids), first)  # read back, no model pass
  monkeypatch.undo()

  other = base.tiny_random("llama", dtype="bfloat16")  # another model: another directory, never this model's states
  assert state_cache.DocumentStateCache(tmp_path, other).root != cache.root
  files[0].write_bytes(b"not an array")  # a damaged entry is recomputed and rewritten
  np.testing.assert_allclose(cache.get_or_compute(model, ids), first, rtol=1e-6)
  assert np.load(files[0]).shape == first.shape
