"""Encoding: one frozen-model pass over a document -> per-layer states, then each atom's span of them.

Layer l's adapter is generated from the states at the *input* of layer l, so the compiler reads
`hidden_states[:L]`. Each atom sees its left context (pronouns resolve). Documents longer than
`max_chunk_tokens` are encoded in consecutive chunks, each with its own positions from 0 (Doc-to-LoRA's
treatment of long documents); atoms still cover every token once. Token lengths are padded to buckets so
a new document rarely compiles a new shape.
"""

import jax
import jax.numpy as jnp
import numpy as np

from doc2atom_jax.models import decoder as decoder_lib

LENGTH_BUCKET = 128
SPAN_BUCKET = 16


def _round_up(n: int, multiple: int) -> int:
  return max(multiple, -(-n // multiple) * multiple)


def layer_states(weights, cfg, tokens, mask, layers):
  """Frozen states at the input of the given layers: [len(layers), B, T, d], no gradient to anything."""
  out = decoder_lib.forward(jax.lax.stop_gradient(weights), cfg, tokens, attention_mask=mask,
                            return_hidden_states=True, compute_logits=False)
  return jax.lax.stop_gradient(out.hidden_states[jnp.asarray(layers)])


layer_states_jit = jax.jit(layer_states, static_argnames=("cfg", "layers"))


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
    states = layer_states_jit(model.weights, cfg, jnp.asarray(tokens), jnp.asarray(mask),
                              layers=tuple(range(cfg.num_layers)))
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
