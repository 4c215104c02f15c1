"""Fast paths of the decoder: blocked causal attention, a cache-free prefill, remat — each against the plain path.

Blocked attention (`attention_block` > 0) must give the dense path's logits on every family (sliding windows
and softcapping included), with left and right padding, with the layer loop and the scan; a prefill
(`new_cache_slots`) must leave the cache the old path (`init_cache` + a cached pass) leaves, so decoding from
it is unchanged; remat must not change values or gradients.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from doc2atom_jax.models import adapter as adapter_lib
from doc2atom_jax.models import attention, base, decoder
from doc2atom_jax.models import generate as generate_lib

ATOL = 2e-5


def _model(family, **overrides):
  return base.tiny_random(family, **overrides)


def _batch(length=40, vocab=200, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab, (3, length)).astype(np.int32)
  mask = np.ones((3, length), bool)
  mask[1, :7] = False  # left padding
  mask[2, -5:] = False  # right padding
  return jnp.asarray(tokens), jnp.asarray(mask)


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3"])
@pytest.mark.parametrize("scan", [False, True])
def test_blocked_attention_equals_dense(family, scan):
  model = _model(family, scan_layers=scan, attention_block=0)
  tokens, mask = _batch()
  dense = decoder.forward(model.weights, model.config, tokens, attention_mask=mask)
  for block in (8, 13, 40):  # a block that does not divide T; one block = the whole sequence
    cfg = dataclasses.replace(model.config, attention_block=block)
    blocked = jax.jit(decoder.forward, static_argnums=1)(model.weights, cfg, tokens, attention_mask=mask)
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(blocked.logits)[real], np.asarray(dense.logits)[real], atol=ATOL,
                               err_msg=f"block {block}")


def test_blocks_never_build_a_square_score_matrix():
  """At T = 64 and block 16, no intermediate of the attention has a 64 x 64 trailing shape."""
  q = k = v = jnp.ones((1, 64, 2, 8))
  positions = jnp.arange(64)[None]
  valid = jnp.ones((1, 64), bool)
  jaxpr = jax.make_jaxpr(lambda q, k, v: attention.attend_causal_blocks(
      q, k, v, positions, valid, None, False, scale=1.0, softcap=None, block=16))(q, k, v)
  shapes = [tuple(var.aval.shape) for eqn in jaxpr.eqns for var in eqn.outvars]
  assert not [s for s in shapes if s[-2:] == (64, 64)]
  assert any(s[-2:] == (16, 64) for s in shapes)  # the last block reads every key
  assert any(s[-2:] == (16, 16) for s in shapes)  # the first block only its own


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_prefill_cache_equals_cached_pass(family):
  model = _model(family, attention_block=8)
  cfg = model.config
  tokens, mask = _batch(length=24)
  slots = 24 + 6
  old = decoder.forward(model.weights, cfg, tokens, attention_mask=mask,
                        cache=decoder.init_cache(cfg, 3, slots))
  new = decoder.forward(model.weights, cfg, tokens, attention_mask=mask, new_cache_slots=slots)
  assert int(new.cache.length) == int(old.cache.length) == 24
  np.testing.assert_array_equal(np.asarray(new.cache.valid), np.asarray(old.cache.valid))
  np.testing.assert_array_equal(np.asarray(new.cache.positions), np.asarray(old.cache.positions))
  real = np.asarray(mask)
  for got, want in ((new.cache.k, old.cache.k), (new.cache.v, old.cache.v)):
    np.testing.assert_allclose(np.asarray(got)[:, :, :24][:, real], np.asarray(want)[:, :, :24][:, real], atol=ATOL)
    np.testing.assert_array_equal(np.asarray(got)[:, :, 24:], 0)
  np.testing.assert_allclose(np.asarray(new.logits)[real], np.asarray(old.logits)[real], atol=ATOL)
  with pytest.raises(ValueError, match="new_cache_slots"):
    decoder.forward(model.weights, cfg, tokens, new_cache_slots=10)


def test_generation_with_blocked_prefill_matches_dense():
  """Greedy tokens from a blocked prefill (block 8 over a 32-token prompt) equal the dense prefill's."""
  tokens, mask = _batch(length=32, seed=3)
  outs = []
  for block in (0, 8):
    model = _model("gemma2", attention_block=block)
    out, counts = generate_lib.generate_tokens(
        model.weights, model.config, tokens, mask, jnp.asarray([-5], jnp.int32), jax.random.key(0),
        jnp.float32(0), jnp.float32(1), max_new_tokens=6, greedy=True)
    outs.append((np.asarray(out), np.asarray(counts)))
  np.testing.assert_array_equal(outs[0][0], outs[1][0])
  np.testing.assert_array_equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_keeps_values_and_gradients(scan, policy):
  model = _model("llama", scan_layers=scan)
  cfg = model.config
  tokens, mask = _batch(length=16)
  rng = np.random.default_rng(1)
  rand = lambda x: jnp.asarray(rng.normal(0, 0.1, x.shape), jnp.float32)
  factors = adapter_lib.zeros(cfg, 3, 2, targets=("down", "q")).factors
  lora = adapter_lib.Adapter({t: adapter_lib.LoRA(rand(f.a), rand(f.b)) for t, f in factors.items()}, 1.0)

  def loss(adapter, cfg):
    out = decoder.forward(model.weights, cfg, tokens, attention_mask=mask, adapter=adapter)
    return jnp.sum(jnp.where(mask[..., None], jax.nn.log_softmax(out.logits), 0.0)[..., :5])

  want_v, want_g = jax.value_and_grad(loss)(lora, cfg)
  got_v, got_g = jax.jit(jax.value_and_grad(loss), static_argnums=1)(lora, dataclasses.replace(cfg, remat=policy))
  np.testing.assert_allclose(float(got_v), float(want_v), rtol=1e-5)
  for got, want in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="remat"):
    loss(lora, dataclasses.replace(cfg, remat="everything"))
