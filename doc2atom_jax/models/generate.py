"""Autoregressive generation with a KV cache: one jitted prefill, then a jitted `while_loop` of decode steps.

Prompts of different lengths are left-padded to a common bucketed length so a batch shares one cache index
per step; shapes depend only on (batch, bucket, max_new_tokens), never on the exact prompt lengths, so a
new question does not recompile. Sampling: greedy (temperature 0), or temperature with nucleus (top-p).

Shared prefix (`prefill_prefix`, `generate_from_prefix`): questions over one document share its tokens (the
chat header and the document), so the in-context baseline prefills that prefix once (batch 1) and each
question only its own suffix (the question and the assistant header), instead of the whole prompt per
question. Layout of the generation cache, per row: [prefix slots | suffix slots | answer slots]. The prefix
is right-padded in its bucket (real tokens at positions 0..P-1, pad slots invalid), each suffix left-padded
in its bucket, so every row's last suffix column is a real token (the first answer step reads it) and the
decode steps share one cache index. Masked holes in the middle (the prefix's pad slots, the suffix's left
padding) are harmless: attention and RoPE follow token positions (count of real tokens before), never slot
indices (`attention.visibility`, `decoder.forward`), so each row sees exactly the positions and keys of its
full prompt, sliding windows included. Shapes depend on (prefix bucket, batch, suffix bucket,
max_new_tokens) only: another document in the same prefix bucket, or other questions, do not recompile.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from doc2atom_jax import shapes
from doc2atom_jax.models import decoder as decoder_lib

PROMPT_BUCKET = 64  # prompts are padded to a multiple of this unless the caller gives its own bucket
SUFFIX_BUCKET = 32  # floor of a suffix's length bucket after a prefix: question + instruction + header, ~20-60


@dataclasses.dataclass(frozen=True)
class PrefixCache:
  """Prompt tokens many prompts start with (a document's chat header and text) and their KV cache, batch 1
  (`BaseModel.prefix_cache`)."""
  ids: tuple[int, ...]
  cache: decoder_lib.KVCache


def common_prefix(a, b) -> int:
  """The number of leading tokens `a` and `b` share."""
  n = 0
  for x, y in zip(a, b):
    if x != y:
      break
    n += 1
  return n


def left_pad(sequences: list[list[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  tokens = np.full((len(sequences), length), pad_id, np.int32)
  mask = np.zeros((len(sequences), length), bool)
  for i, seq in enumerate(sequences):
    if seq:
      tokens[i, length - len(seq):] = seq
      mask[i, length - len(seq):] = True
  return tokens, mask


def sample_next(logits, rng, temperature, top_p, greedy: bool):
  """Next token ids [B] from last-position logits [B, V]."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / jnp.maximum(temperature, 1e-6)
  order = jnp.argsort(-logits, axis=-1)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
  sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)  # the top token always survives
  choice = jax.random.categorical(rng, sorted_logits, axis=-1)
  return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def right_pad(sequence: list[int], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """One sequence as a [1, length] row, real tokens first (a shared prefix's layout)."""
  tokens = np.full((1, length), pad_id, np.int32)
  tokens[0, :len(sequence)] = sequence
  return tokens, np.arange(length)[None] < len(sequence)


def _decode(weights, cfg, first_logits, cache, stop_ids, rng, temperature, top_p, adapter, max_new_tokens: int,
            greedy: bool):
  """From the prompt's last-position logits [B, V] and its cache: (new tokens [B, n], counts [B])."""
  batch = first_logits.shape[0]
  rng, key = jax.random.split(rng)
  first = sample_next(first_logits, key, temperature, top_p, greedy)
  generated = jnp.full((batch, max_new_tokens), -1, jnp.int32).at[:, 0].set(first)
  done = jnp.isin(first, stop_ids)

  def cond(state):
    step, _, _, done, _ = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(state):
    step, cache, generated, done, rng = state
    last = jnp.maximum(generated[:, step - 1], 0)  # finished rows hold -1; their output is discarded
    out = decoder_lib.forward(weights, cfg, last[:, None], adapter=adapter, cache=cache)
    rng, key = jax.random.split(rng)
    nxt = jnp.where(done, -1, sample_next(out.logits[:, -1], key, temperature, top_p, greedy))
    generated = generated.at[:, step].set(nxt)
    return step + 1, out.cache, generated, done | jnp.isin(nxt, stop_ids), rng

  _, _, generated, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, generated, done, rng))
  counts = jnp.sum(generated >= 0, axis=-1)
  return generated, counts


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "greedy"))
def generate_tokens(weights, cfg, tokens, mask, stop_ids, rng, temperature, top_p, adapter=None, *,
                    max_new_tokens: int, greedy: bool):
  """Left-padded prompts [B, T] -> (new tokens [B, max_new_tokens], number generated per row [B]).

  A row stops after emitting a token in `stop_ids` (that token is included in the count; later slots hold
  the pad value -1). The loop exits early once every row has stopped. The prompt is one cache-free pass
  (blocked causal attention when long) that fills the cache; only its last position is projected to the
  vocabulary (the prompt's other logits would cost ~2·T·d·V FLOPs and a [B, T, V] array for nothing).
  """
  out = decoder_lib.forward(weights, cfg, tokens, attention_mask=mask, adapter=adapter,
                            new_cache_slots=tokens.shape[1] + max_new_tokens, compute_logits=False)
  first_logits = decoder_lib.logits_from_hidden(weights, cfg, out.hidden[:, -1])  # the last position only
  return _decode(weights, cfg, first_logits, out.cache, stop_ids, rng, temperature, top_p, adapter,
                 max_new_tokens, greedy)


@functools.partial(jax.jit, static_argnames="cfg")
def prefill_prefix(weights, cfg, tokens, mask) -> decoder_lib.KVCache:
  """A shared prefix [1, P_bucket] (`right_pad`) -> its KV cache (batch 1, P_bucket slots, pad slots invalid).

  No logits: a prefix is always continued by a suffix, whose last token gives the first answer step.
  """
  return decoder_lib.forward(weights, cfg, tokens, attention_mask=mask, new_cache_slots=tokens.shape[1],
                             compute_logits=False).cache


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "greedy"))
def generate_from_prefix(weights, cfg, prefix: decoder_lib.KVCache, tokens, mask, stop_ids, rng, temperature,
                         top_p, prefix_length, *, max_new_tokens: int, greedy: bool):
  """Continues one prefix cache (batch 1, from `prefill_prefix`) with B left-padded suffixes [B, S]; returns
  `generate_tokens`'s (new tokens [B, max_new_tokens], counts [B]) for the prompts prefix + suffix.

  `prefix_length` (an int32 scalar, traced: no recompile) keeps only the prefix's first tokens (positions
  below it): causal attention makes their keys and values independent of the rest, so a batch whose
  prompts share fewer tokens than the cached prefix (a question that tokenizes into the boundary) moves the
  difference into its suffixes. Every suffix needs at least one real token. No adapter: the prefix cache is
  shared across rows, and an adapter acts on every token of its row (the prefix included).
  """
  first_logits, cache = continue_prefix(weights, cfg, prefix, tokens, mask, prefix_length, max_new_tokens)
  return _decode(weights, cfg, first_logits, cache, stop_ids, rng, temperature, top_p, None, max_new_tokens,
                 greedy)


def broadcast_prefix(prefix: decoder_lib.KVCache, batch: int, extra: int, prefix_length) -> decoder_lib.KVCache:
  """One prefix cache (batch 1) as the cache of `batch` rows, `extra` free slots after the prefix's: slots at
  positions >= `prefix_length` (an int32 scalar, traced) are marked invalid (see `generate_from_prefix`)."""
  layers, _, slots, kv_heads, head_dim = prefix.k.shape
  kv = lambda x: jnp.pad(jnp.broadcast_to(x, (layers, batch, slots, kv_heads, head_dim)),
                         ((0, 0), (0, 0), (0, extra), (0, 0), (0, 0)))
  rows = lambda x: jnp.pad(jnp.broadcast_to(x, (batch, slots)), ((0, 0), (0, extra)))
  valid = prefix.valid & (prefix.positions < prefix_length)
  return decoder_lib.KVCache(kv(prefix.k), kv(prefix.v), rows(prefix.positions), rows(valid), prefix.length)


def run_suffixes(weights, cfg, prefix: decoder_lib.KVCache, tokens, mask, prefix_length,
                 answer_slots: int = 0) -> decoder_lib.DecoderOutput:
  """The prefix cache broadcast over B rows, the left-padded suffixes [B, S] run through it: the decoder's
  output with the final hidden states of every suffix column [B, S, d] (no logits) and the cache (prefix
  slots, the S suffix slots, then `answer_slots` free slots). Suffix tokens take the positions after the
  prefix's first `prefix_length` tokens (`decoder.forward` counts from the cache's valid positions).

  The cache is sized here from S: a write past its end would be clamped by `dynamic_update_slice` onto the
  prefix's slots, silently.
  """
  cache = broadcast_prefix(prefix, tokens.shape[0], tokens.shape[1] + answer_slots, prefix_length)
  return decoder_lib.forward(weights, cfg, tokens, attention_mask=mask, cache=cache, compute_logits=False)


def continue_prefix(weights, cfg, prefix: decoder_lib.KVCache, tokens, mask, prefix_length, answer_slots: int):
  """`run_suffixes` read at the last column: (last-position logits [B, V] float32, the cache: prefix slots,
  the S suffix slots, then `answer_slots` free slots)."""
  out = run_suffixes(weights, cfg, prefix, tokens, mask, prefix_length, answer_slots)
  return decoder_lib.logits_from_hidden(weights, cfg, out.hidden[:, -1]), out.cache


def continue_prefix_ids(weights, cfg, prefix: PrefixCache, seqs, pad_id: int, stop_ids, rng, temperature, top_p,
                        *, max_new_tokens: int, greedy: bool):
  """`generate_tokens` for token prompts that start with `prefix.ids`, whose KV cache is reused: each row
  prefills only its suffix, left-padded to a length bucket. Rows that share fewer leading tokens with the
  prefix (or with nothing after it) use a shorter part of the cache; the token sequences run are exactly
  `seqs`."""
  shared = min(min(common_prefix(prefix.ids, s), len(s) - 1) for s in seqs)  # a suffix keeps >= 1 token
  suffixes = [list(s[shared:]) for s in seqs]
  tokens, mask = left_pad(suffixes, shapes.length_bucket(max(map(len, suffixes)), SUFFIX_BUCKET), pad_id)
  return generate_from_prefix(weights, cfg, prefix.cache, tokens, mask, stop_ids, rng, temperature, top_p,
                              np.int32(shared), max_new_tokens=max_new_tokens, greedy=greedy)
