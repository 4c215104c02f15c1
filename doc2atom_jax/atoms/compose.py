"""Composition: selected atoms' codes -> one per-example adapter for the decoder's hook. All gathers and
adapter einsums of the atom pipeline live here, so the sharding of this step changes in one place.

    codes [B, k, L, n_t, r, c] --head--> A [B, k, L, r, d_in], B [B, k, L, r, d_out]   (per target)
    weights w [B, k] fold into A;  ranks concatenate: a [B, L, k·r (+ r_default), d_in]

so `ΔW_l x = α Σ_i w_i B_iᵀ (A_i x)` (+ the always-on default adapter, weight 1). Examples in a batch may
use different atoms (a per-example gather, BGMV-style). Banks are padded to size buckets, so
`adapter_from_bank` traces once per (batch, k, bucket) and never again for new indices or documents.

Where many examples share one composition (Doc-to-LoRA: every atom of the document at weight 1, the same for
each of its questions), compose once per group instead: codes [G, k, ...], weights [G, k] and `groups` [B]
(each example's group) give a grouped adapter (factors [G, ...], applied with `jax.lax.ragged_dot`), with
no copy per example.
"""

import functools

import jax
import jax.numpy as jnp

from doc2atom_jax.models.adapter import Adapter, LoRA

NULL_INDEX = -1  # an index that selects the null atom instead of a bank row


def gather_codes(bank_codes, indices, null_codes, doc_index=None):
  """Codes of the selected atoms [B, k, L, n_t, r, c].

  bank_codes: [N, L, n_t, r, c] (one bank for every example) or [D, N, ...] with `doc_index` [B] picking
  each example's document; indices [B, k] (NULL_INDEX selects `null_codes` [L, n_t, r, c]).
  """
  safe = jnp.maximum(indices, 0)
  if doc_index is None:
    codes = jnp.take(bank_codes, safe, axis=0)
  else:
    codes = bank_codes[doc_index[:, None], safe]
  is_null = (indices == NULL_INDEX)[:, :, None, None, None, None]
  return jnp.where(is_null, null_codes.astype(codes.dtype), codes).astype(jnp.float32)


def materialize(head, codes):
  """codes [..., L, n_t, r, c] -> per target (A [..., L, r, d_in], B [..., L, r, d_out]), scalers applied."""
  factors = []
  for t, (head_a, head_b) in enumerate(zip(head["a"], head["b"])):
    c = codes[..., t, :, :]  # [..., L, r, c]
    a = jnp.einsum("...lrc,lci->...lri", c, head_a) * head["scale_a"][:, t][:, :, None]
    b = jnp.einsum("...lrc,lco->...lro", c, head_b) * head["scale_b"][:, t][:, :, None]
    factors.append((a, b))
  return factors


def compose_factors(factors, weights, default_factors=None):
  """Per target (A [B, k, L, r, i], B [B, k, L, r, o]) and weights [B, k] -> LoRA(a [B, L, k·r(+r0), i], b)."""
  out = []
  for t, (a, b) in enumerate(factors):
    batch, k, layers, rank = a.shape[:4]
    a = a * weights[:, :, None, None, None].astype(a.dtype)
    a = jnp.moveaxis(a, 1, 2).reshape(batch, layers, k * rank, a.shape[-1])
    b = jnp.moveaxis(b, 1, 2).reshape(batch, layers, k * rank, b.shape[-1])
    if default_factors is not None:
      da, db = default_factors[t]  # [L, r0, i], [L, r0, o]
      a = jnp.concatenate([a, jnp.broadcast_to(da, (batch, *da.shape))], axis=2)
      b = jnp.concatenate([b, jnp.broadcast_to(db, (batch, *db.shape))], axis=2)
    out.append(LoRA(a, b))
  return out


def compose(head, codes, weights, default_codes, alpha: float, targets: tuple[str, ...], groups=None) -> Adapter:
  """Selected codes [B, k, L, n_t, r, c] with weights [B, k] (+ default codes [L, n_t, r0, c]) -> Adapter.

  With `groups` [B'] (int, each example's group), the leading axis of codes and weights is the group, not
  the example: one composition per group (e.g. per document), shared by its examples (the grouped form)."""
  default = materialize(head, default_codes) if default_codes is not None else None
  loras = compose_factors(materialize(head, codes), weights, default)
  return Adapter(dict(zip(targets, loras)), alpha, groups)


@functools.partial(jax.jit, static_argnames=("alpha", "targets"))
def adapter_from_bank(head, bank_codes, indices, weights, null_codes, default_codes, doc_index=None, *,
                      alpha: float, targets: tuple[str, ...], groups=None) -> Adapter:
  """Gather + materialize + fold + concatenate, jitted: the adapter of each example's selected atoms (or, with
  `groups`, of each group's: indices, weights and doc_index then lead with the group)."""
  codes = gather_codes(bank_codes, indices, null_codes, doc_index)
  return compose(head, codes, weights, default_codes, alpha, targets, groups)
