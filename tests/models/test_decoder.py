"""Decoder properties beyond reference parity: sharding names, compute dtype, scan over layers with a cache."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from doc2atom_jax.models import base, decoder


def test_every_parameter_has_logical_axis_names():
  model = base.tiny_random("gemma3")
  state = nnx.state(model.decoder, nnx.Param)
  specs = nnx.get_partition_spec(state)
  leaves = jax.tree.leaves(nnx.to_pure_dict(state))
  names = jax.tree.leaves(nnx.to_pure_dict(specs), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert len(leaves) == len(names) > 10
  for value, spec in zip(leaves, names):
    assert len(spec) == value.ndim and all(isinstance(n, str) for n in spec), spec
  assert tuple(nnx.to_pure_dict(specs)["layers"]["down"]) == ("layers", "mlp", "embed")


def test_bfloat16_compute_is_close_to_float32():
  model = base.tiny_random("llama")
  tokens = jnp.arange(3, 35, dtype=jnp.int32)[None]
  f32 = decoder.forward(model.weights, model.config, tokens).logits
  bf16 = decoder.forward(model.weights, model.config.replace(dtype="bfloat16"), tokens).logits
  assert bf16.dtype == jnp.float32  # logits always come out in float32
  assert float(jnp.abs(f32 - bf16).max()) < 0.05 * float(jnp.abs(f32).max())
  assert float(jnp.abs(f32 - bf16).max()) > 0  # it really ran in bfloat16


def test_scan_and_loop_agree_with_a_kv_cache():
  loop = base.tiny_random("gemma2")
  scan_cfg = loop.config.replace(scan_layers=True)
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 300, (2, 9)), jnp.int32)
  outs = []
  for cfg in (loop.config, scan_cfg):
    cache = decoder.init_cache(cfg, 2, 16)
    first = decoder.forward(loop.weights, cfg, tokens, cache=cache)
    step = decoder.forward(loop.weights, cfg, tokens[:, :1], cache=first.cache)
    outs.append((first.logits, step.logits, step.cache.k))
  for a, b in zip(*outs):
    np.testing.assert_allclose(a, b, atol=1e-5)
