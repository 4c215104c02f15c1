"""The router: question -> query vector -> scores over the atoms in scope -> top-k atoms and their weights.

The question alone goes through the frozen base model; its token states at the compiler's key layer are
RMS-normalized, mean-pooled and mapped by a small MLP to a unit query `q [d_k]`. Scores are
`s_i = q·k_i / τ` (τ learned, started at 0.1) over the atoms in scope plus the **null atom**, which always
sits in the last column: if it ranks first the system abstains.

Training relaxation — straight-through top-k: the forward pass uses exactly the inference weights (the
normalized top-k, zero elsewhere), the backward pass the gradient of a softmax over *all* in-scope atoms.
Chosen over Gumbel top-k because it adds no sampling noise to a signal that is already weak early in
training, and because train and inference then compose the very same adapter. Its cost grows with the
number of atoms in scope (every atom is composed, most with weight 0), not with k.
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from doc2atom_jax.atoms.compiler import CompilerConfig, _l2, _param, pooled, route_projection
from doc2atom_jax.atoms.compose import NULL_INDEX

NORMALIZATIONS = ("softmax", "sigmoid", "softmax_k")
RECALL_TARGET = 0.95  # approximate routing (`top_k`): the expected share of the true top k found


class Router(nnx.Module):
  def __init__(self, cfg: CompilerConfig, *, rngs: nnx.Rngs, temperature: float = 0.1):
    self.cfg = cfg
    d = cfg.hidden_size
    self.w1 = _param(rngs.params(), (d, cfg.width), ("embed", "width"))
    if cfg.route_skip:  # the linear path of `compiler.CompilerConfig.route_skip`; the MLP starts at 0
      self.w2 = _param(None, (cfg.width, cfg.key_dim), ("width", "key"), value=jnp.zeros((cfg.width, cfg.key_dim)))
      self.q_center = _param(None, (d,), ("embed",), value=jnp.zeros(d))
      self.q_skip = _param(None, (d, cfg.key_dim), ("embed", "key"), value=route_projection(d, cfg.key_dim))
    else:
      self.w2 = _param(rngs.params(), (cfg.width, cfg.key_dim), ("width", "key"))
    self.log_inv_temperature = _param(None, (), (), value=jnp.asarray(math.log(1.0 / temperature), jnp.float32))

  def query(self, question_states, question_mask):
    """Key-layer states of the question [B, T, d] (+ mask [B, T]) -> unit queries [B, d_k]."""
    return self.query_from_pooled(pooled(question_states, question_mask))

  def query_from_pooled(self, pooled_states):
    """`compiler.pooled` question states [B, d] -> unit queries [B, d_k]."""
    query = jax.nn.gelu(pooled_states @ self.w1[...]) @ self.w2[...]
    if self.cfg.route_skip:
      query = query + (pooled_states - self.q_center[...]) @ self.q_skip[...]
    return _l2(query)

  def scores(self, queries, keys, key_mask, null_key):
    """queries [B, d_k]; keys [N, d_k] or per example [B, N, d_k]; key_mask like keys without d_k.

    Returns [B, N + 1] scores; masked (padding) atoms get -inf; the null atom is the last column.
    """
    inv_t = jnp.exp(self.log_inv_temperature[...])
    if keys.ndim == 2:
      s, mask = queries @ keys.T, jnp.broadcast_to(key_mask, (queries.shape[0], keys.shape[0]))
    else:
      s, mask = jnp.einsum("bd,bnd->bn", queries, keys), key_mask
    s = jnp.where(mask, s * inv_t, -jnp.inf)
    null = (queries @ null_key)[:, None] * inv_t
    return jnp.concatenate([s, null], axis=-1)


def normalize(top_scores, normalization: str):
  """Weights of the top-k scores [..., k] (-inf = empty slot, weight 0) by the configured normalization."""
  finite = jnp.isfinite(top_scores)
  if normalization == "sigmoid":
    w = jax.nn.sigmoid(jnp.where(finite, top_scores, -1e30))
  elif normalization in ("softmax", "softmax_k"):
    w = jax.nn.softmax(jnp.where(finite, top_scores, -1e30), axis=-1)
    if normalization == "softmax_k":
      w = w * top_scores.shape[-1]
  else:
    raise ValueError(f"unknown weight normalization {normalization!r}; valid: {', '.join(NORMALIZATIONS)}")
  return jnp.where(finite, w, 0.0)


def column_to_index(columns, num_atoms: int):
  """Score columns -> bank indices, the null column (last) becoming NULL_INDEX."""
  return jnp.where(columns == num_atoms, NULL_INDEX, columns)


def top_k(scores, k: int, blocks: int = 1, approximate: bool = False, recall_target: float = RECALL_TARGET):
  """`jax.lax.top_k` over the last axis, computed as the top k of each of `blocks` equal blocks, then the top k
  of those candidates. Same values and indices as `jax.lax.top_k`, ties included: lax.top_k puts the lower
  index first among equals, and the candidates stay in block order, so the lower index still wins.

  Why: over a bank whose atom axis is sharded, each block is one device's rows: every device ranks its own
  atoms and only k candidates per block meet, instead of all N scores. Falls back to one block when the
  axis does not split into `blocks` blocks of at least k columns.

  approximate: each block (or the whole axis) by `jax.lax.approx_max_k` at `recall_target` (told the whole
  axis's size, so the target holds for the merged result); the merge of the block candidates stays exact.
  Values come back sorted descending, each with its true column. Only TPUs approximate: on CPU and GPU jax
  lowers approx_max_k to an exact sort-based top-k (checked on CPU: the same values and indices as
  `lax.top_k`, ties included), so there the option changes nothing.
  """
  n = scores.shape[-1]
  if approximate:
    rank = functools.partial(jax.lax.approx_max_k, recall_target=recall_target, reduction_input_size_override=n)
  else:
    rank = jax.lax.top_k
  if blocks <= 1 or n % blocks or n // blocks < k:
    return rank(scores, k)
  size = n // blocks
  lead = scores.shape[:-1]
  values, columns = rank(scores.reshape(*lead, blocks, size), k)  # [..., blocks, k]
  columns = (columns + (jnp.arange(blocks) * size)[:, None]).reshape(*lead, blocks * k)
  best, picked = jax.lax.top_k(values.reshape(*lead, blocks * k), k)
  return best, jnp.take_along_axis(columns, picked, axis=-1)


def select(scores, k: int, normalization: str = "softmax", blocks: int = 1, approximate: bool = False,
           recall_target: float = RECALL_TARGET):
  """Top-k over [B, N + 1] scores -> (indices [B, k] with NULL_INDEX for the null atom, weights [B, k],
  abstain [B]). When k exceeds the valid atoms, the extra slots get weight 0 (and index 0, harmless).

  blocks > 1 ranks the N atom columns in that many blocks (`top_k`; one per shard of a sharded bank), then
  merges the null column, last, as `jax.lax.top_k` over all N + 1 columns would: the result is identical.
  approximate ranks the atom columns by `jax.lax.approx_max_k` (see `top_k`; exact except on TPU); the null
  column is merged the same exact way, so abstention never depends on the approximation.
  """
  k = min(k, scores.shape[-1])
  if blocks > 1 or approximate:
    atoms, null = scores[..., :-1], scores[..., -1:]
    cand, cand_cols = top_k(atoms, min(k, atoms.shape[-1]), blocks, approximate, recall_target)
    merged = jnp.concatenate([cand, null], axis=-1)
    merged_cols = jnp.concatenate([cand_cols, jnp.full(null.shape, atoms.shape[-1], cand_cols.dtype)], axis=-1)
    top, picked = jax.lax.top_k(merged, k)
    columns = jnp.take_along_axis(merged_cols, picked, axis=-1)
  else:
    top, columns = jax.lax.top_k(scores, k)
  weights = normalize(top, normalization)
  num_atoms = scores.shape[-1] - 1
  indices = jnp.where(jnp.isfinite(top), column_to_index(columns, num_atoms), 0)
  abstain = columns[:, 0] == num_atoms
  return indices, weights, abstain


def relaxed_weights(scores, k: int, normalization: str = "softmax"):
  """Straight-through top-k weights over all columns [B, N + 1]: forward = `select`'s weights scattered to
  their columns (0 elsewhere); backward = d softmax(scores) over the in-scope atoms and the null atom."""
  k = min(k, scores.shape[-1])
  top, columns = jax.lax.top_k(scores, k)
  hard = jnp.zeros_like(scores).at[jnp.arange(scores.shape[0])[:, None], columns].set(normalize(top, normalization))
  soft = jax.nn.softmax(jnp.where(jnp.isfinite(scores), scores, -1e30), axis=-1)
  return jax.lax.stop_gradient(hard) + soft - jax.lax.stop_gradient(soft)
