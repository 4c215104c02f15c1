"""Log-probs over a large vocabulary without a [rows, V] logits array: the vocabulary in chunks.

`decoder.logits_from_hidden` projects final hidden states [..., d] onto the whole vocabulary; for a 256k
vocabulary (Gemma) that array, and its gradient, dominate a training step's memory. What the losses need is
less: the log-normalizer logsumexp_v(logit_v) per row, and the logits at a few ids (the teacher's top-K, the
gold target). Here the normalizer is a scan over vocabulary chunks (running logaddexp; the body under
`jax.checkpoint`, so the backward pass recomputes each chunk's logits instead of keeping them), and the logits
at the ids come from the head's columns for those ids alone. The teacher's top-K is a per-chunk top-K and a
merge. Same numbers as the full-logits path (to float rounding), same top-K ids, ties included.

The output head is `lm_head` [d, V] or, tied, the embedding [V, d]: both are read in place (slices along
the vocabulary axis), never transposed or padded. The last chunk is the last `chunk` columns of the
vocabulary; the columns it shares with the previous chunk are masked to -inf.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp


def head_of(weights):
  """(matrix, vocab_axis): the untied `lm_head` [d, V] (axis 1) or the tied embedding [V, d] (axis 0)."""
  return (weights["lm_head"], 1) if "lm_head" in weights else (weights["embed"], 0)


def _logits(hidden, matrix, vocab_axis: int, softcap):
  """hidden [..., d] x a head slice -> float32 logits [..., c], softcapped as `decoder.logits_from_hidden`."""
  spec = "...d,dv->...v" if vocab_axis == 1 else "...d,vd->...v"
  logits = jnp.einsum(spec, hidden, matrix.astype(hidden.dtype), preferred_element_type=jnp.float32)
  if softcap is not None:
    logits = jnp.tanh(logits / softcap) * softcap
  return logits


def _chunks(vocab: int, chunk: int):
  """(chunk size, number of chunks): a chunk of at least 1 and at most the vocabulary."""
  chunk = max(1, min(int(chunk), vocab))
  return chunk, -(-vocab // chunk)


def _chunk_logits(hidden, matrix, vocab_axis, softcap, chunk, i):
  """Logits [..., chunk] of chunk i and the vocabulary ids of its columns [chunk]; columns before the chunk's
  nominal start (the last chunk is shifted back to end at V) are -inf."""
  vocab = matrix.shape[vocab_axis]
  start = i * chunk
  first = jnp.minimum(start, vocab - chunk)
  part = jax.lax.dynamic_slice_in_dim(matrix, first, chunk, axis=vocab_axis)
  ids = first + jnp.arange(chunk, dtype=jnp.int32)
  logits = _logits(hidden, part, vocab_axis, softcap)
  return jnp.where(ids >= start, logits, -jnp.inf), ids


def log_normalizer(hidden, matrix, *, chunk: int, vocab_axis: int = 1, softcap=None):
  """logsumexp over the vocabulary of the logits of hidden [..., d] -> [...] float32, `chunk` columns at a time
  (a `lax.scan`; each step under `jax.checkpoint`, so neither pass keeps more than [..., chunk] logits)."""
  chunk, num = _chunks(matrix.shape[vocab_axis], chunk)

  @functools.partial(jax.checkpoint, prevent_cse=False)  # inside a scan CSE cannot undo the remat
  def body(lse, i):
    logits, _ = _chunk_logits(hidden, matrix, vocab_axis, softcap, chunk, i)
    return jnp.logaddexp(lse, jax.nn.logsumexp(logits, axis=-1)), None

  init = jnp.full(hidden.shape[:-1], -jnp.inf, jnp.float32)
  lse, _ = jax.lax.scan(body, init, jnp.arange(num, dtype=jnp.int32))
  return lse


def logits_at(hidden, matrix, ids, *, vocab_axis: int = 1, softcap=None):
  """Logits of hidden [..., d] at ids [..., K] -> [..., K] float32, from the head's columns for those ids."""
  cols = jnp.take(matrix, ids, axis=vocab_axis)  # [d, ..., K] (lm_head) or [..., K, d] (embedding)
  if vocab_axis == 1:
    cols = jnp.moveaxis(cols, 0, -1)
  logits = jnp.einsum("...d,...kd->...k", hidden, cols.astype(hidden.dtype), preferred_element_type=jnp.float32)
  if softcap is not None:
    logits = jnp.tanh(logits / softcap) * softcap
  return logits


@dataclasses.dataclass(frozen=True)
class ChunkedLogits:
  """Stands for the log-softmax of logits [..., V] inside a traced function: hidden states, the head, and the
  log-normalizer (computed once, shared by every read). `losses.topk_kl` / `answer_ce` accept it in place
  of logits."""
  hidden: jax.Array  # [..., d]
  matrix: jax.Array
  vocab_axis: int
  softcap: float | None
  lse: jax.Array  # [...]

  def logprobs_at(self, ids):
    """Log-probs [..., K] at ids [..., K]."""
    return logits_at(self.hidden, self.matrix, ids, vocab_axis=self.vocab_axis, softcap=self.softcap) - \
        self.lse[..., None]


def chunked(weights, cfg, hidden, chunk: int) -> ChunkedLogits:
  """The vocabulary read-out of final hidden states [..., d] (as `decoder.logits_from_hidden`), by chunks."""
  matrix, axis = head_of(weights)
  lse = log_normalizer(hidden, matrix, chunk=chunk, vocab_axis=axis, softcap=cfg.final_softcap)
  return ChunkedLogits(hidden, matrix, axis, cfg.final_softcap, lse)


def topk_logprobs(hidden, matrix, k: int, *, chunk: int, vocab_axis: int = 1, softcap=None):
  """`jax.lax.top_k(jax.nn.log_softmax(logits), k)` of hidden [..., d] by chunks -> (values, ids) [..., k].

  Two passes over the vocabulary: the log-normalizer, then each chunk's top-k of its log-probs, merged by one
  `lax.top_k` over the candidates. The ids are those of `lax.top_k` over the whole axis, ties included: within
  a chunk lax.top_k puts the lower id first among equals, and the candidates stay in chunk (id) order, so
  the lower id still wins the merge. Needs chunk >= k (raised to k otherwise).
  """
  vocab = matrix.shape[vocab_axis]
  if k > vocab:
    raise ValueError(f"top-{k} of a vocabulary of {vocab}")
  chunk, num = _chunks(vocab, max(chunk, k))
  lse = log_normalizer(hidden, matrix, chunk=chunk, vocab_axis=vocab_axis, softcap=softcap)

  def body(_, i):
    logits, ids = _chunk_logits(hidden, matrix, vocab_axis, softcap, chunk, i)
    values, picked = jax.lax.top_k(logits - lse[..., None], k)
    return None, (values, ids[picked])

  _, (values, ids) = jax.lax.scan(body, None, jnp.arange(num, dtype=jnp.int32))  # [num, ..., k]
  values = jnp.moveaxis(values, 0, -2).reshape(*hidden.shape[:-1], num * k)
  ids = jnp.moveaxis(ids, 0, -2).reshape(*hidden.shape[:-1], num * k)
  best, picked = jax.lax.top_k(values, k)
  return best, jnp.take_along_axis(ids, picked, axis=-1)
