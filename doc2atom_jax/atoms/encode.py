"""Encoding: one frozen-model pass over a document -> per-layer states, then each atom's span of them.

Layer l's adapter is generated from the states at the *input* of layer l, so the compiler reads
`hidden_states[:L]`. Each atom sees its left context (pronouns resolve). Documents longer than
`max_chunk_tokens` are encoded in consecutive chunks, each with its own positions from 0 (Doc-to-LoRA's
treatment of long documents); atoms still cover every token once. Token lengths are padded to buckets so
a new document rarely compiles a new shape.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from doc2atom_jax.models import decoder as decoder_lib

LENGTH_BUCKET = 128
SPAN_BUCKET = 16


def _round_up(n: int, multiple: int) -> int:
  return max(multiple, -(-n // multiple) * multiple)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _layer_inputs(weights, cfg, tokens, mask):
  out = decoder_lib.forward(weights, cfg, tokens, attention_mask=mask, return_hidden_states=True,
                            compute_logits=False)
  return out.hidden_states[:cfg.num_layers]


def document_states(model, token_ids, max_chunk_tokens: int | None = None) -> jax.Array:
  """States at the input of every layer for a document's tokens: [L, T, d] (float32)."""
  cfg = model.config
  chunk = min(max_chunk_tokens or cfg.max_position_embeddings, cfg.max_position_embeddings)
  token_ids = np.asarray(token_ids, np.int32)
  pieces = []
  for start in range(0, len(token_ids), chunk):
    ids = token_ids[start:start + chunk]
    length = min(_round_up(len(ids), LENGTH_BUCKET), cfg.max_position_embeddings)
    tokens = np.zeros((1, length), np.int32)
    tokens[0, :len(ids)] = ids
    mask = np.arange(length)[None] < len(ids)
    states = _layer_inputs(model.weights, cfg, jnp.asarray(tokens), jnp.asarray(mask))
    pieces.append(states[:, 0, :len(ids)])
  return jnp.concatenate(pieces, axis=1)


def span_indices(atoms, span_bucket: int = SPAN_BUCKET) -> tuple[np.ndarray, np.ndarray]:
  """Token positions of each atom, padded: (indices [N, S], mask [N, S]), S a multiple of span_bucket."""
  longest = max(a.token_end - a.token_start for a in atoms)
  width = _round_up(longest, span_bucket)
  idx = np.zeros((len(atoms), width), np.int32)
  mask = np.zeros((len(atoms), width), bool)
  for i, a in enumerate(atoms):
    n = a.token_end - a.token_start
    idx[i, :n] = np.arange(a.token_start, a.token_end)
    mask[i, :n] = True
  return idx, mask


def gather_spans(states, idx, mask):
  """states [L, T, d], idx/mask [N, S] -> span states [L, N, S, d] (zeros where masked)."""
  spans = jnp.take(states, jnp.asarray(idx), axis=1)
  return jnp.where(jnp.asarray(mask)[None, :, :, None], spans, 0.0)
