"""The per-example low-rank adapter that the frozen decoder accepts in its forward pass.

An adapter holds, for each targeted projection, factors `a: [batch, layers, rank, d_in]` and
`b: [batch, layers, rank, d_out]` and one scale; the projection of example n at layer l becomes
`y = x W + scale * (x a[n, l]ᵀ) b[n, l]`: the merged weight is `W + scale * aᵀ b` in our [d_in, d_out]
layout, `W + scale * bᵀ a` in PyTorch's [out, in] layout. Two einsums per projection and no per-example
copy of W, so examples in one batch may carry different adapters (BGMV-style). `scale` is a scalar or one
value per example [batch].
"""

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp

from doc2atom_jax.errors import UserError
from doc2atom_jax.models.config import ADAPTER_TARGETS, DecoderConfig


class LoRA(NamedTuple):
  a: jax.Array  # [batch, layers, rank, d_in]
  b: jax.Array  # [batch, layers, rank, d_out]


class Adapter(NamedTuple):
  factors: Mapping[str, LoRA]  # target name ("q", "k", "v", "o", "gate", "up", "down") -> factors
  scale: jax.Array | float = 1.0


def zeros(cfg: DecoderConfig, batch: int, rank: int, targets=("down",), scale: float = 1.0) -> Adapter:
  """An adapter that changes nothing (B = 0, as a fresh LoRA)."""
  factors = {}
  for t in targets:
    d_in, d_out = cfg.target_dims(t)
    factors[t] = LoRA(jnp.zeros((batch, cfg.num_layers, rank, d_in)), jnp.zeros((batch, cfg.num_layers, rank, d_out)))
  return Adapter(factors, scale)


def validate(adapter: Adapter, cfg: DecoderConfig, batch: int) -> None:
  """Raises a UserError for a target or shape that does not fit this model (checked at trace time)."""
  for target, lora in adapter.factors.items():
    if target not in ADAPTER_TARGETS:
      raise UserError(f"unknown adapter target {target!r}; valid targets: {', '.join(ADAPTER_TARGETS)}")
    d_in, d_out = cfg.target_dims(target)
    rank = lora.a.shape[2] if lora.a.ndim == 4 else None
    want_a, want_b = (batch, cfg.num_layers, rank, d_in), (batch, cfg.num_layers, rank, d_out)
    if tuple(lora.a.shape) != want_a or tuple(lora.b.shape) != want_b:
      raise UserError(f"adapter {target!r}: got a{tuple(lora.a.shape)} b{tuple(lora.b.shape)}, expected "
                      f"a[batch, layers, rank, d_in]={want_a} and b[batch, layers, rank, d_out]={want_b}")


def layer_major(adapter: Adapter | None):
  """Moves the layer axis first ({target: (a [L, B, r, i], b [L, B, r, o])}) for scanning over layers."""
  if adapter is None:
    return None
  return {t: LoRA(jnp.swapaxes(l.a, 0, 1), jnp.swapaxes(l.b, 0, 1)) for t, l in adapter.factors.items()}


def project(x, kernel, bias, target: str, layer_factors, scale):
  """x [B, T, d_in] @ kernel [d_in, d_out] (+ bias) + the adapter's low-rank term for `target`, if any."""
  y = x @ kernel.astype(x.dtype)
  if bias is not None:
    y = y + bias.astype(x.dtype)
  if layer_factors is not None and target in layer_factors:
    a, b = layer_factors[target]  # this layer's slices: [B, r, d_in], [B, r, d_out]
    low = jnp.einsum("bti,bri->btr", x, a.astype(x.dtype))
    scale = jnp.asarray(scale, x.dtype)
    scale = scale[:, None, None] if scale.ndim == 1 else scale
    y = y + scale * jnp.einsum("btr,bro->bto", low, b.astype(x.dtype))
  return y
