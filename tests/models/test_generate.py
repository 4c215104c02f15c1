"""KV-cache generation equals full recomputation; batching, sampling and stop tokens behave."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from doc2atom_jax import shapes
from doc2atom_jax.errors import UserError
from doc2atom_jax.models import base, decoder
from doc2atom_jax.models import generate as generate_lib


def recompute_greedy(model, prompt: list[int], steps: int, adapter=None) -> list[int]:
  """Greedy decoding by a full forward over the whole sequence at every step (no cache).

  The sequence is right-padded to one fixed length so every step reuses one compiled forward; causal
  attention makes the padding invisible to the real tokens.
  """
  length = len(prompt) + steps
  seq = list(prompt)
  fwd = jax.jit(lambda w, t, m, a: decoder.forward(w, model.config, t, attention_mask=m, adapter=a).logits)
  for _ in range(steps):
    tokens = np.zeros((1, length), np.int32)
    tokens[0, :len(seq)] = seq
    mask = np.arange(length)[None] < len(seq)
    logits = fwd(model.weights, jnp.asarray(tokens), jnp.asarray(mask), adapter)
    seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
  return seq[len(prompt):]


def cached_greedy(model, prompts: list[list[int]], steps: int, adapter=None, stop=(-5,)):
  length = shapes.multiple(max(map(len, prompts)), 16)
  tokens, mask = generate_lib.left_pad(prompts, length, 0)
  out, counts = generate_lib.generate_tokens(
      model.weights, model.config, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(stop, jnp.int32),
      jax.random.key(0), jnp.float32(0), jnp.float32(1), adapter, max_new_tokens=steps, greedy=True)
  return np.asarray(out), np.asarray(counts)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_kv_cache_greedy_equals_full_recompute_on_a_padded_batch(family):
  model = base.tiny_random(family)
  prompts = [list(range(3, 14)), list(range(40, 45)), [7] * 18]  # different lengths: left padding
  out, counts = cached_greedy(model, prompts, steps=10)
  assert counts.tolist() == [10, 10, 10]
  for row, prompt in zip(out, prompts):
    assert row.tolist() == recompute_greedy(model, prompt, 10)


def test_kv_cache_with_an_adapter_equals_full_recompute():
  from tests.models.test_adapter import random_adapter

  model = base.tiny_random("qwen3")
  adapter = random_adapter(model.config, 1, 2, ("down", "v"), scale=1.0)
  prompt = list(range(20, 33))
  out, _ = cached_greedy(model, [prompt], steps=8, adapter=adapter)
  assert out[0].tolist() == recompute_greedy(model, prompt, 8, adapter)
  assert out[0].tolist() != cached_greedy(model, [prompt], steps=8)[0][0].tolist()


def test_stop_tokens_end_a_row_and_the_batch():
  model = base.tiny_random("llama")
  prompts = [list(range(3, 14)), list(range(40, 45))]
  free, _ = cached_greedy(model, prompts, steps=8)
  stop = int(free[0, 2])  # a token row 0 emits becomes a stop token
  out, counts = cached_greedy(model, prompts, steps=8, stop=(stop,))
  for row in range(2):
    expected = list(free[row]).index(stop) + 1 if stop in free[row] else 8
    assert counts[row] == expected
    assert out[row, :expected].tolist() == free[row, :expected].tolist() and (out[row, expected:] == -1).all()
  assert counts[0] <= 3


def test_sampling_is_seeded_and_top_p_zero_is_greedy():
  model = base.tiny_random("llama")
  greedy = model.generate(["tell me"], max_new_tokens=6)
  nucleus0 = model.generate(["tell me"], max_new_tokens=6, temperature=1.0, top_p=1e-6, seed=3)
  assert nucleus0 == greedy
  a = model.generate(["tell me"] * 4, max_new_tokens=6, temperature=1.5, seed=1)
  b = model.generate(["tell me"] * 4, max_new_tokens=6, temperature=1.5, seed=1)
  assert a == b and len(set(a)) > 1  # same seed, same text; rows draw different samples


def test_batched_prompts_equal_one_at_a_time():
  model = base.tiny_random("gemma2")
  prompts = ["a short one", "a considerably longer prompt than the first one, with more bytes"]
  together = model.generate(prompts, max_new_tokens=6)
  assert together == [model.generate([p], max_new_tokens=6)[0] for p in prompts]


def test_prompt_longer_than_the_context():
  model = base.tiny_random("llama")  # context 2048, one token per byte
  long_text = "x" * 2100
  with pytest.raises(UserError, match="context"):
    model.generate([long_text], max_new_tokens=4)
  assert len(model.generate([long_text], max_new_tokens=4, truncation="left")) == 1
  with pytest.raises(UserError, match="exceeds the model's context"):
    model.logits([5] * 2100)


def test_empty_prompt_is_refused():
  model = base.tiny_random("llama")
  with pytest.raises(UserError, match="empty prompt"):
    model.generate([""])
  with pytest.raises(UserError, match="empty input"):
    model.logits([])
