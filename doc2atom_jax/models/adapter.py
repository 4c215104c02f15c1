"""The per-example low-rank adapter that the frozen decoder accepts in its forward pass.

An adapter holds, for each targeted projection, factors `a: [batch, layers, rank, d_in]` and
`b: [batch, layers, rank, d_out]` and one scale; the projection of example n at layer l becomes
`y = x W + scale * (x a[n, l]ᵀ) b[n, l]`: the merged weight is `W + scale * aᵀ b` in our [d_in, d_out]
layout, `W + scale * bᵀ a` in PyTorch's [out, in] layout. Two einsums per projection and no per-example
copy of W, so examples in one batch may carry different adapters (BGMV-style). `scale` is a scalar or one
value per example [batch].

The grouped form (`groups` given) serves many examples that share one adapter (Doc-to-LoRA: one adapter per
document, the same for each of its questions) without copying factors per example: the factors then lead
with the number of groups G instead of batch (`a: [G, layers, rank, d_in]`), `groups [batch]` says which
group each example uses, and `project` computes the low-rank term with `jax.lax.ragged_dot` over the rows
ordered by group. Both forms give the same numbers (`ungroup` turns one into the other).
"""

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from doc2atom_jax.errors import UserError
from doc2atom_jax.models.config import ADAPTER_TARGETS, DecoderConfig


class LoRA(NamedTuple):
  a: jax.Array  # [batch, layers, rank, d_in]
  b: jax.Array  # [batch, layers, rank, d_out]


class Adapter(NamedTuple):
  factors: Mapping[str, LoRA]  # target name ("q", "k", "v", "o", "gate", "up", "down") -> factors
  scale: jax.Array | float = 1.0  # a scalar or [batch], per example (also in the grouped form)
  # None: factors per example [batch, ...] (the gather form). Else [batch] int: the group (0 <= id < G) of
  # each example, in any order, and the factors lead with G (the grouped form); a group may have no example.
  groups: jax.Array | None = None


class GroupedLoRA(NamedTuple):
  """One target's factors in the grouped form, as `layer_major` hands them to `project` (per layer)."""
  a: jax.Array  # [G, rank, d_in] per layer
  b: jax.Array  # [G, rank, d_out]
  order: jax.Array | None  # [batch] examples sorted by group (stable); None: already sorted
  inverse: jax.Array | None  # [batch] position of each example in `order`
  sizes: jax.Array  # [G] int32 examples per group


def zeros(cfg: DecoderConfig, batch: int, rank: int, targets=("down",), scale: float = 1.0) -> Adapter:
  """An adapter that changes nothing (B = 0, as a fresh LoRA)."""
  factors = {}
  for t in targets:
    d_in, d_out = cfg.target_dims(t)
    factors[t] = LoRA(jnp.zeros((batch, cfg.num_layers, rank, d_in)), jnp.zeros((batch, cfg.num_layers, rank, d_out)))
  return Adapter(factors, scale)


def validate(adapter: Adapter, cfg: DecoderConfig, batch: int) -> None:
  """Raises a UserError for a target or shape that does not fit this model (checked at trace time)."""
  lead, lead_name = batch, "batch"
  if adapter.groups is not None:
    groups_shape = tuple(jnp.shape(adapter.groups))
    if groups_shape != (batch,):
      raise UserError(f"adapter groups: got shape {groups_shape}, expected [batch]={(batch,)} (one group id per "
                      "example)")
    if not jnp.issubdtype(jnp.result_type(adapter.groups), jnp.integer):
      raise UserError(f"adapter groups must be integers, got {jnp.result_type(adapter.groups)}")
    leads = {lora.a.shape[0] for lora in adapter.factors.values() if lora.a.ndim}
    lead, lead_name = (leads.pop() if len(leads) == 1 else None), "groups"
  for target, lora in adapter.factors.items():
    if target not in ADAPTER_TARGETS:
      raise UserError(f"unknown adapter target {target!r}; valid targets: {', '.join(ADAPTER_TARGETS)}")
    d_in, d_out = cfg.target_dims(target)
    rank = lora.a.shape[2] if lora.a.ndim == 4 else None
    want_a, want_b = (lead, cfg.num_layers, rank, d_in), (lead, cfg.num_layers, rank, d_out)
    if tuple(lora.a.shape) != want_a or tuple(lora.b.shape) != want_b:
      raise UserError(f"adapter {target!r}: got a{tuple(lora.a.shape)} b{tuple(lora.b.shape)}, expected "
                      f"a[{lead_name}, layers, rank, d_in]={want_a} and b[{lead_name}, layers, rank, d_out]={want_b}"
                      + (" (the same number of groups for every target)" if lead is None else ""))


def ungroup(adapter: Adapter) -> Adapter:
  """The gather form of an adapter: each example's group factors copied per example (tests, PEFT export)."""
  if adapter.groups is None:
    return adapter
  groups = jnp.asarray(adapter.groups)
  factors = {t: LoRA(jnp.take(l.a, groups, axis=0), jnp.take(l.b, groups, axis=0)) for t, l in adapter.factors.items()}
  return Adapter(factors, adapter.scale)


def layer_major(adapter: Adapter | None):
  """Moves the layer axis first ({target: (a [L, B, r, i], b [L, B, r, o])}) for scanning over layers.

  In the grouped form each target becomes a `GroupedLoRA` (a [L, G, r, i], b [L, G, r, o]) that also carries
  the order of the examples by group, computed once here and repeated per layer (a few ints) so that the
  scan and the layer loop slice it like the factors."""
  if adapter is None:
    return None
  swap = lambda x: jnp.swapaxes(x, 0, 1)
  if adapter.groups is None:
    return {t: LoRA(swap(l.a), swap(l.b)) for t, l in adapter.factors.items()}
  order, inverse, sizes = _group_order(adapter.groups, next(iter(adapter.factors.values())).a.shape[0])
  out = {}
  for t, l in adapter.factors.items():
    per_layer = lambda x: None if x is None else jnp.broadcast_to(x, (l.a.shape[1], *x.shape))  # pylint: disable=cell-var-from-loop
    out[t] = GroupedLoRA(swap(l.a), swap(l.b), per_layer(order), per_layer(inverse), per_layer(sizes))
  return out


def _group_order(groups, num_groups: int):
  """(order, inverse, sizes) of examples by group; order = inverse = None when `groups` is concrete and sorted."""
  sizes = jnp.bincount(jnp.asarray(groups, jnp.int32), length=num_groups).astype(jnp.int32)
  try:
    concrete = np.asarray(groups)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    concrete = None  # traced (under jit): the order is not known statically, so always permute
  if concrete is not None and bool(np.all(concrete[1:] >= concrete[:-1])):
    return None, None, sizes
  groups = jnp.asarray(groups, jnp.int32)
  order = jnp.argsort(groups, stable=True).astype(jnp.int32)
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=jnp.int32))
  return order, inverse, sizes


def project(x, kernel, bias, target: str, layer_factors, scale):
  """x [B, T, d_in] @ kernel [d_in, d_out] (+ bias) + the adapter's low-rank term for `target`, if any."""
  y = x @ kernel.astype(x.dtype)
  if bias is not None:
    y = y + bias.astype(x.dtype)
  if layer_factors is not None and target in layer_factors:
    factors = layer_factors[target]
    if isinstance(factors, GroupedLoRA):
      delta = _grouped_low_rank(x, factors)
    else:
      a, b = factors  # this layer's slices: [B, r, d_in], [B, r, d_out]
      low = jnp.einsum("bti,bri->btr", x, a.astype(x.dtype))
      delta = jnp.einsum("btr,bro->bto", low, b.astype(x.dtype))
    scale = jnp.asarray(scale, x.dtype)
    scale = scale[:, None, None] if scale.ndim == 1 else scale
    y = y + scale * delta
  return y


def _grouped_low_rank(x, factors: GroupedLoRA):
  """(x aᵀ) b with each example's group factors: two ragged_dots over the B·T rows ordered by group."""
  batch, length, d_in = x.shape
  if factors.order is not None:
    x = jnp.take(x, factors.order, axis=0)
  rows = factors.sizes * length  # rows of one example stay together: example order is row order
  a_t = jnp.swapaxes(factors.a.astype(x.dtype), 1, 2)  # [G, d_in, r]
  low = jax.lax.ragged_dot(x.reshape(batch * length, d_in), a_t, rows)  # [B·T, r]
  out = jax.lax.ragged_dot(low, factors.b.astype(x.dtype), rows).reshape(batch, length, -1)  # [B, T, d_out]
  if factors.inverse is not None:
    out = jnp.take(out, factors.inverse, axis=0)
  return out
