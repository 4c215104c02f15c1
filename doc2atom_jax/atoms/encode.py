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

from doc2atom_jax import shapes
from doc2atom_jax.data import prompts
from doc2atom_jax.models import decoder as decoder_lib

LENGTH_BUCKET = 128
SPAN_BUCKET = 16


def layer_states(weights, cfg, tokens, mask, layers):
  """Frozen states at the input of the given layers: [len(layers), B, T, d], no gradient to anything."""
  out = decoder_lib.forward(jax.lax.stop_gradient(weights), cfg, tokens, attention_mask=mask,
                            return_hidden_states=True, compute_logits=False)
  return jax.lax.stop_gradient(out.hidden_states[jnp.asarray(layers)])


layer_states_jit = jax.jit(layer_states, static_argnames=("cfg", "layers"))


def question_ids(model, questions) -> tuple[list[list[int]], list[list[bool]]]:
  """Each question alone in the chat template (`prompts.question_prompt`, no answer prefix): its token ids,
  and which of them are the question's own (the router pools those only: in a 31-token prompt, 20-22 tokens
  are the template's, the same for every question, and pooling them drowns the question — DESIGN §2.4).

  Found from the tokenizer's character offsets in the rendered prompt, so any chat template and any token
  boundary (a "?" merged with the next line break) is handled: a token that overlaps the question counts."""
  seqs, own = [], []
  for q in questions:
    text = model.chat_prompt(prompts.question_prompt(q))
    start = text.index(prompts.question_prompt(q))
    end = start + len(q.strip())
    enc = model.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    seqs.append(list(enc["input_ids"]))
    own.append([a < end and b > start for a, b in enc["offset_mapping"]])
    if not any(own[-1]):
      raise ValueError(f"no token of the question {q!r} found in its prompt")
  return seqs, own


def padded_document(ids, context: int) -> tuple[np.ndarray, np.ndarray]:
  """A document's tokens as one [1, T] row right-padded to a multiple of LENGTH_BUCKET (at most `context`),
  and its mask: the shape `document_states` runs (and the benchmark times a plain forward on)."""
  length = min(shapes.multiple(len(ids), LENGTH_BUCKET), context)
  tokens = np.zeros((1, length), np.int32)
  tokens[0, :len(ids)] = ids
  return tokens, np.arange(length)[None] < len(ids)


def document_states(model, token_ids, max_chunk_tokens: int | None = None, layers=None) -> jax.Array:
  """States at the input of every layer (or of `layers`, a tuple) for a document's tokens: [L, T, d] (float32)."""
  cfg = model.config
  chunk = min(max_chunk_tokens or cfg.max_position_embeddings, cfg.max_position_embeddings)
  token_ids = np.asarray(token_ids, np.int32)
  pieces = []
  for start in range(0, len(token_ids), chunk):
    tokens, mask = padded_document(token_ids[start:start + chunk], cfg.max_position_embeddings)
    states = layer_states_jit(model.weights, cfg, jnp.asarray(tokens), jnp.asarray(mask),
                              layers=tuple(range(cfg.num_layers)) if layers is None else tuple(layers))
    pieces.append(states[:, 0, :min(chunk, len(token_ids) - start)])
  return jnp.concatenate(pieces, axis=1)


CALIBRATION_TEXT = (
    "The harbour town grew slowly through the nineteenth century. Fishing boats left before dawn and returned "
    "with herring, cod and the occasional crate of oranges traded at sea. In 1887 a schoolteacher named Alma "
    "Reyes opened a small library above the bakery; by 1902 it held four thousand books and a collection of "
    "maps. The railway arrived in 1911, and with it engineers, a telegraph office and a brass band that still "
    "plays on Sundays. Today the town is known for its lighthouse, painted red and white, which stands 38 "
    "metres tall on the northern cliff. Who built it is disputed: some say the navy, others a local guild."
)


def calibration_statistics(model, eps: float = 1e-2) -> tuple[np.ndarray, np.ndarray]:
  """Per layer and feature, the mean and inverse spread of the model's states on a fixed paragraph: [L, d] each.

  A small model's hidden states share a few massive features (SmolLM2: ~30x the median) and a common
  direction (the mean states of two atoms of a document sit at cosine ~0.85), so unstandardized, every atom
  and every question look alike to the compiler and router (trained codes came out at cosine 0.99). The
  statistics depend only on the base model, so the compiler and router use the same ones for documents and
  questions. The first token (the attention sink, with the most extreme activations) is left out.
  """
  states = np.asarray(document_states(model, model.encode(CALIBRATION_TEXT)), np.float32)[:, 1:]
  return states.mean(axis=1), 1.0 / np.sqrt(states.var(axis=1) + eps)


def embedding_basis(embed, dim: int, max_rows: int = 32768, seed: int = 0) -> np.ndarray:
  """The top-`dim` right singular vectors of the row-normalized token embedding matrix [V, d] -> [d, dim].

  The copy path keeps a token's embedding in this basis (SmolLM2-135M: 128 of 576 directions hold 67% of the
  energy of unit-norm embeddings, 256 hold 80%). Large vocabularies use a fixed random subset of rows.
  """
  embed = np.asarray(embed, np.float32)
  if embed.shape[0] > max_rows:
    embed = embed[np.sort(np.random.default_rng(seed).choice(embed.shape[0], max_rows, replace=False))]
  embed = embed / np.maximum(np.linalg.norm(embed, axis=1, keepdims=True), 1e-6)
  _, vectors = np.linalg.eigh(embed.T.astype(np.float64) @ embed)  # ascending eigenvalues
  return vectors[:, ::-1][:, :dim].astype(np.float32)


def span_indices(atoms, span_bucket: int = SPAN_BUCKET) -> tuple[np.ndarray, np.ndarray]:
  """Token positions of each atom, padded: (indices [N, S], mask [N, S]), S a multiple of span_bucket."""
  longest = max(a.token_end - a.token_start for a in atoms)
  width = shapes.multiple(longest, span_bucket)
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
