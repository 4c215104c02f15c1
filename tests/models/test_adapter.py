"""The adapter hook: per-example adapters equal merged weights; zero is exact; gradients reach only A, B."""

import jax
import jax.extend.core as jax_extend_core
import jax.numpy as jnp
import numpy as np
import pytest

from doc2atom_jax.errors import UserError
from doc2atom_jax.models import adapter as adapter_lib
from doc2atom_jax.models import base, decoder

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def tiny_random_weights(family, **overrides):
  model = base.tiny_random(family, **overrides)
  return model.config, model.weights


def random_adapter(cfg, batch, rank, targets, scale, seed=0):
  rng = np.random.default_rng(seed)
  factors = {}
  for t in targets:
    d_in, d_out = cfg.target_dims(t)
    factors[t] = adapter_lib.LoRA(jnp.asarray(rng.normal(0, 0.3, (batch, cfg.num_layers, rank, d_in)), jnp.float32),
                                  jnp.asarray(rng.normal(0, 0.3, (batch, cfg.num_layers, rank, d_out)), jnp.float32))
  return adapter_lib.Adapter(factors, scale)


def merged(weights, adapter, n):
  """Weights of example n with every adapter target merged: W + scale * aᵀ b per layer."""
  layers = dict(weights["layers"])
  scale = np.asarray(adapter.scale)
  scale = scale[n] if scale.ndim else scale
  for t, lora in adapter.factors.items():
    delta = jnp.einsum("lri,lro->lio", lora.a[n], lora.b[n])
    layers[t] = layers[t] + scale * delta
  return {**weights, "layers": layers}


@pytest.mark.parametrize("family,targets,scan", [
    ("llama", ("down",), False),
    ("qwen2", TARGETS, True),
    ("gemma3", TARGETS, False),
])
def test_per_example_adapter_equals_merged_weights(family, targets, scan):
  cfg, weights = tiny_random_weights(family, scan_layers=scan)
  tokens = jnp.asarray(np.random.default_rng(1).integers(3, cfg.vocab_size, (3, 12)), jnp.int32)
  adapter = random_adapter(cfg, 3, 2, targets, scale=jnp.asarray([0.5, 1.0, 2.0]))
  batched = decoder.forward(weights, cfg, tokens, adapter=adapter).logits
  base = decoder.forward(weights, cfg, tokens).logits
  for n in range(3):
    alone = decoder.forward(merged(weights, adapter, n), cfg, tokens[n:n + 1]).logits[0]
    np.testing.assert_allclose(batched[n], alone, atol=2e-4, rtol=1e-4)
    assert np.abs(np.asarray(batched[n] - base[n])).max() > 1e-2  # the adapter really changes the output


def test_zero_adapter_is_exactly_the_base():
  cfg, weights = tiny_random_weights("gemma2")
  tokens = jnp.arange(3, 19, dtype=jnp.int32).reshape(2, 8)
  base = decoder.forward(weights, cfg, tokens).logits
  zero = decoder.forward(weights, cfg, tokens, adapter=adapter_lib.zeros(cfg, 2, 4, targets=TARGETS)).logits
  np.testing.assert_array_equal(np.asarray(base), np.asarray(zero))


def test_gradients_reach_a_and_b_never_the_base():
  cfg, weights = tiny_random_weights("llama")
  tokens = jnp.arange(3, 19, dtype=jnp.int32).reshape(2, 8)
  adapter = random_adapter(cfg, 2, 2, ("down", "q"), scale=1.0)

  def loss(adapter, weights):
    return jnp.mean(decoder.forward(weights, cfg, tokens, adapter=adapter).logits ** 2)

  grads = jax.grad(loss)(adapter, weights)
  for t in ("down", "q"):
    assert np.abs(np.asarray(grads.factors[t].a)).min(axis=(2, 3)).max() > 0
    assert np.all(np.abs(np.asarray(grads.factors[t].b)).sum(axis=(2, 3)) > 0)  # every example, every layer
  # With B = 0 (a fresh LoRA), A gets no gradient yet and B does: the usual LoRA start.
  fresh = adapter._replace(factors={t: l._replace(b=jnp.zeros_like(l.b)) for t, l in adapter.factors.items()})
  g0 = jax.grad(loss)(fresh, weights)
  assert float(jnp.abs(g0.factors["down"].a).max()) == 0.0 and float(jnp.abs(g0.factors["down"].b).max()) > 0


def test_base_weights_are_never_copied_per_example():
  """No intermediate of the adapted forward has a per-example weight shape [B, d_in, d_out]."""
  cfg, weights = tiny_random_weights("llama")
  batch = 2
  tokens = jnp.zeros((batch, 8), jnp.int32)
  adapter = random_adapter(cfg, batch, 2, TARGETS, scale=1.0)
  jaxpr = jax.make_jaxpr(lambda a: decoder.forward(weights, cfg, tokens, adapter=a).logits)(adapter)
  forbidden = {(batch, *cfg.target_dims(t)) for t in TARGETS}

  def shapes(jaxpr):
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        yield tuple(getattr(var.aval, "shape", ()))
      for sub in jax_extend_core.jaxprs_in_params(eqn.params):
        yield from shapes(sub)

  seen = set(shapes(jaxpr.jaxpr))
  assert not seen & forbidden, seen & forbidden


def test_adapter_shape_errors_are_clear():
  cfg, weights = tiny_random_weights("llama")
  tokens = jnp.zeros((2, 4), jnp.int32)
  bad = random_adapter(cfg, 3, 2, ("down",), 1.0)  # batch 3 vs 2
  with pytest.raises(UserError, match="a\\[batch, layers, rank, d_in\\]"):
    decoder.forward(weights, cfg, tokens, adapter=bad)
  with pytest.raises(UserError, match="unknown adapter target"):
    decoder.forward(weights, cfg, tokens, adapter=adapter_lib.Adapter({"lm_head": bad.factors["down"]}, 1.0))
