"""Masks and grouped-query attention over a key/value sequence (the whole prompt or a KV cache).

Masks are built from token positions, not array indices, so left-padded batches, right-padded batches and
KV caches share one rule: a query sees valid keys at positions <= its own, and on sliding-window layers
only those less than `window` positions back (Hugging Face's convention).
"""

import jax
import jax.numpy as jnp
import numpy as np

_MASKED = -1e30  # finite: a row with no visible key (a padding query) gives garbage, never NaN


def visibility(q_positions, k_positions, k_valid, window: int | None):
  """Boolean [B, T, S]: may query t see key s?"""
  diff = q_positions[:, :, None] - k_positions[:, None, :]
  visible = (diff >= 0) & k_valid[:, None, :]
  if window is not None:
    visible &= diff < window
  return visible


def attend(q, k, v, visible, *, scale: float, softcap: float | None = None):
  """q [B, T, H, hd]; k, v [B, S, KV, hd]; visible [B, T, S] -> [B, T, H, hd].

  Scores and softmax in float32 whatever the compute dtype; KV heads are shared by H // KV query heads
  through a reshape, never by copying K and V.
  """
  batch, length, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
  if softcap is not None:
    scores = jnp.tanh(scores / softcap) * softcap
  scores = jnp.where(visible[:, None, None, :, :], scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(batch, length, heads, head_dim)


def attend_causal_blocks(q, k, v, positions, valid, window: int | None, sliding, *, scale: float,
                         softcap: float | None, block: int):
  """Self-attention of a whole sequence (no cache: q, k, v [B, T, ...] share the positions [B, T]) in query
  blocks of `block` rows, each against the keys up to its own end only: the upper triangle of key blocks is
  never computed (~half the FLOPs at long T) and no [T, T] score or mask array exists, only [block, ≤T].

  Exact, not an approximation: a key after the query block's last row is never visible, because positions
  along the array never decrease (they count real tokens), and a key at an equal position is padding.
  Each block's softmax runs over a prefix of the keys; the masked keys it omits have zero probability.
  `sliding` (a Python or traced bool, the layer's kind under a scan over layers) applies `window`.
  """
  length = q.shape[1]
  outs = []
  for start in range(0, length, block):
    end = min(start + block, length)
    rows, keys, keys_valid = positions[:, start:end], positions[:, :end], valid[:, :end]
    visible = visibility(rows, keys, keys_valid, None)
    if window is not None:
      in_window = visibility(rows, keys, keys_valid, window)
      if isinstance(sliding, (bool, np.bool_)):
        visible = in_window if sliding else visible
      else:
        visible = jnp.where(sliding, in_window, visible)
    outs.append(attend(q[:, start:end], k[:, :end], v[:, :end], visible, scale=scale, softcap=softcap))
  return jnp.concatenate(outs, axis=1)
