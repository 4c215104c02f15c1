"""Autoregressive generation with a KV cache: one jitted prefill, then a jitted `while_loop` of decode steps.

Prompts of different lengths are left-padded to a common bucketed length so a batch shares one cache index
per step; shapes depend only on (batch, bucket, max_new_tokens), never on the exact prompt lengths, so a
new question does not recompile. Sampling: greedy (temperature 0), or temperature with nucleus (top-p).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from doc2atom_jax.models import decoder as decoder_lib

PROMPT_BUCKET = 64


def bucket(n: int, size: int = PROMPT_BUCKET) -> int:
  return max(size, -(-n // size) * size)


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


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "greedy"))
def generate_tokens(weights, cfg, tokens, mask, stop_ids, rng, temperature, top_p, adapter=None, *,
                    max_new_tokens: int, greedy: bool):
  """Left-padded prompts [B, T] -> (new tokens [B, max_new_tokens], number generated per row [B]).

  A row stops after emitting a token in `stop_ids` (that token is included in the count; later slots hold
  the pad value -1). The loop exits early once every row has stopped.
  """
  batch, length = tokens.shape
  cache = decoder_lib.init_cache(cfg, batch, length + max_new_tokens)
  out = decoder_lib.forward(weights, cfg, tokens, attention_mask=mask, adapter=adapter, cache=cache)
  rng, key = jax.random.split(rng)
  first = sample_next(out.logits[:, -1], key, temperature, top_p, greedy)
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

  _, _, generated, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), out.cache, generated, done, rng))
  counts = jnp.sum(generated >= 0, axis=-1)
  return generated, counts
