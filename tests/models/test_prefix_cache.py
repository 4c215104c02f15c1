"""A shared prefix prefilled once and continued per question gives the full prompts' answers, without recompiling.

Reference: `generate.generate_tokens` on the full prompts (left-padded, prefilled whole). Greedy tokens must be
equal; the first answer step's logits equal the uncached full forward's to atol 1e-4 (float32; the paths only
differ in the order of float sums: other padding, other slot layout). Families: llama (plain), gemma2 (sliding
window of 6, attention and final softcapping: the window must follow positions across the prefix's padding
hole), qwen3 (q/k norms, untied head).
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from doc2atom_jax import shapes
from doc2atom_jax.data import prompts
from doc2atom_jax.eval import runner
from doc2atom_jax.models import base, decoder
from doc2atom_jax.models import generate as generate_lib

ATOL = 1e-4
PREFIX = [1] + list(range(10, 50))  # 41 tokens: bucket 64, 23 padding slots inside the generation cache
SUFFIXES = [[60, 61, 62], list(range(70, 81)), [90] * 6 + [91, 92]]  # different lengths: left-padded


def full_greedy(model, prompts_, steps, stop=(-5,)):
  length = shapes.multiple(max(map(len, prompts_)), 16)
  tokens, mask = generate_lib.left_pad(prompts_, length, 0)
  out, counts = generate_lib.generate_tokens(
      model.weights, model.config, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(stop, jnp.int32),
      jax.random.key(0), jnp.float32(0), jnp.float32(1), max_new_tokens=steps, greedy=True)
  return np.asarray(out), np.asarray(counts)


def prefix_greedy(model, prefix, suffixes, steps, stop=(-5,), prefix_length=None, bucket=64):
  cache = generate_lib.prefill_prefix(model.weights, model.config, *generate_lib.right_pad(prefix, bucket, 0))
  tokens, mask = generate_lib.left_pad(suffixes, shapes.multiple(max(map(len, suffixes)), 16), 0)
  out, counts = generate_lib.generate_from_prefix(
      model.weights, model.config, cache, tokens, mask, jnp.asarray(stop, jnp.int32), jax.random.key(0),
      jnp.float32(0), jnp.float32(1), np.int32(len(prefix) if prefix_length is None else prefix_length),
      max_new_tokens=steps, greedy=True)
  return np.asarray(out), np.asarray(counts)


# The 64-token prefix fills its bucket: no padding slot between prefix and suffix (a cache sized too small for
# the suffix would have its write clamped onto the prefix's last real tokens).
@pytest.mark.parametrize("family,prefix", [("llama", PREFIX), ("gemma2", PREFIX), ("qwen3", PREFIX),
                                           ("llama", [1] + list(range(100, 163)))])
def test_prefix_path_equals_full_prompts(family, prefix):
  model = base.tiny_random(family)
  full, full_counts = full_greedy(model, [prefix + s for s in SUFFIXES], steps=10)
  out, counts = prefix_greedy(model, prefix, SUFFIXES, steps=10)
  assert counts.tolist() == full_counts.tolist() == [10, 10, 10]
  assert out.tolist() == full.tolist()

  # First answer step: logits of the prefix path vs an uncached forward over each whole prompt.
  cache = generate_lib.prefill_prefix(model.weights, model.config, *generate_lib.right_pad(prefix, 64, 0))
  tokens, mask = generate_lib.left_pad(SUFFIXES, 16, 0)
  first, _ = jax.jit(generate_lib.continue_prefix, static_argnums=(1, 6))(
      model.weights, model.config, cache, tokens, mask, np.int32(len(prefix)), 10)
  for row, suffix in enumerate(SUFFIXES):
    reference = model.logits([prefix + suffix])[0, -1]
    np.testing.assert_allclose(np.asarray(first[row]), np.asarray(reference), atol=ATOL, rtol=0)


def test_a_shorter_prefix_length_moves_tokens_into_the_suffix():
  """prefix_length < cached prefix: the cache's tail is ignored, the suffix carries those tokens."""
  model = base.tiny_random("gemma2")
  keep = 30
  suffixes = [PREFIX[keep:] + s for s in SUFFIXES]
  full, _ = full_greedy(model, [PREFIX + s for s in SUFFIXES], steps=6)
  out, _ = prefix_greedy(model, PREFIX, suffixes, steps=6, prefix_length=keep)
  assert out.tolist() == full.tolist()


def test_stop_tokens_end_rows_as_in_the_full_path():
  model = base.tiny_random("llama")
  free, _ = full_greedy(model, [PREFIX + s for s in SUFFIXES], steps=8)
  stop = int(free[0, 2])
  full, full_counts = full_greedy(model, [PREFIX + s for s in SUFFIXES], steps=8, stop=(stop,))
  out, counts = prefix_greedy(model, PREFIX, SUFFIXES, steps=8, stop=(stop,))
  assert counts.tolist() == full_counts.tolist() and counts[0] <= 3
  assert out.tolist() == full.tolist()


def test_another_document_in_the_same_bucket_does_not_recompile():
  model = base.tiny_random("llama")
  first = [1] + list(range(100, 140))  # 41 and 57 tokens: both in the 64 bucket
  second = [1] + list(range(150, 206))
  questions_a = [[60, 61, 62], [70] * 9]
  questions_b = [[80] * 12, [81, 82]]  # other suffix lengths, same 16 bucket
  prefix_greedy(model, first, questions_a, steps=5)
  sizes = generate_lib.prefill_prefix._cache_size(), generate_lib.generate_from_prefix._cache_size()
  out, _ = prefix_greedy(model, second, questions_b, steps=5)
  assert (generate_lib.prefill_prefix._cache_size(), generate_lib.generate_from_prefix._cache_size()) == sizes
  assert out.tolist() == full_greedy(model, [second + q for q in questions_b], steps=5)[0].tolist()


# ---------------------------------------------------------------------------------------------------------
# The evaluator's in-context methods.
# ---------------------------------------------------------------------------------------------------------
def document_run(model, text, questions, trunc_tokens=40):
  """A DocumentRun with a stub system (no atoms): enough for the in-context methods."""
  system = types.SimpleNamespace(model=model, split=lambda text, doc_id: types.SimpleNamespace(atoms=[]))
  qs = tuple(runner.EvalQuestion(f"q{i}", q, ("blue",), "answerable") for i, q in enumerate(questions))
  doc = runner.EvalDocument("test", "d0", text, qs)
  return runner.DocumentRun(doc, {"doc2atom": system}, code_dtype="float32", trunc_tokens=trunc_tokens)


TEXT = ("The lighthouse on Keel Island was painted blue in 1911. Its keeper, Ada Morrow, kept bees and a log of "
        "every ship that passed.")
QUESTIONS = ("What color was the lighthouse?", "Who kept it?", "What did the keeper keep besides a log of ships?")


def test_document_prefix_is_what_every_prompt_starts_with():
  model = base.tiny_random("llama")
  ids = runner.document_prefix_ids(model, TEXT)
  for q in QUESTIONS:
    full = model.encode(model.chat_prompt(prompts.in_context_prompt(TEXT, q)))
    assert full[:len(ids)] == ids and len(full) > len(ids)
  assert model.tokenizer.decode(ids).endswith("\n\nQuestion: ")  # byte tokenizer: the label, then the question


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_evaluator_predictions_equal_with_and_without_the_prefix_cache(family, monkeypatch):
  # Predictions as token ids: a random model's bytes often decode to the same replacement characters.
  model = base.tiny_random(family)
  monkeypatch.setattr(model, "decode_generated", lambda out, counts, sentence=False: [
      str(row[:n].tolist()) for row, n in zip(np.asarray(out), np.asarray(counts))])
  methods = ("in_context", "in_context_trunc")
  run = document_run(model, TEXT, QUESTIONS)
  fast = runner.evaluate_document(run, methods, batch_size=2, max_new_tokens=6)
  assert len(run._prefixes) == 2  # pylint: disable=protected-access  (in_context and its truncated text)
  slow = runner.evaluate_document(document_run(model, TEXT, QUESTIONS), methods, batch_size=2, max_new_tokens=6,
                                  reuse_prefix=False)
  assert len(fast) == len(slow) == 2 * len(QUESTIONS)
  assert [(r.method, r.qid, r.prediction) for r in fast] == [(r.method, r.qid, r.prediction) for r in slow]
  assert len({r.prediction for r in fast}) > 1


def test_generate_with_prefix_equals_generate_tokens_when_a_prompt_leaves_the_prefix_early():
  """A prompt that diverges inside the cached prefix (a tokenizer merge at the boundary) still runs its own
  tokens: the batch uses the shared part of the cache."""
  model = base.tiny_random("qwen3")
  ids = runner.document_prefix_ids(model, TEXT)
  cache = model.prefix_cache(ids)
  seqs = [ids + [70, 71, 72], ids[:-3] + [80, 81, 82, 83], ids + [5]]
  out, counts = model.generate_ids(seqs, max_new_tokens=5, stop=False, prefix=cache)
  ref, ref_counts = model.generate_ids(seqs, max_new_tokens=5, stop=False, bucket=shapes.length_bucket)
  assert np.asarray(out).tolist() == np.asarray(ref).tolist()
  assert np.asarray(counts).tolist() == np.asarray(ref_counts).tolist() == [5, 5, 5]


def test_in_context_answer_timing_paths_agree():
  """The latency functions: the prefix path (default) and the whole-prompt path generate the same tokens."""
  model = base.tiny_random("llama")
  run = document_run(model, TEXT, QUESTIONS)
  for method in runner.IN_CONTEXT:
    fast = runner._answer_fn(run, method, 4)()  # pylint: disable=protected-access
    slow = runner._answer_fn(run, method, 4, reuse_prefix=False)()  # pylint: disable=protected-access
    assert np.asarray(fast[0]).tolist() == np.asarray(slow[0]).tolist()
    assert runner._internalize_fn(run, method, run.trunc_tokens)() is not None  # pylint: disable=protected-access


def test_prefix_cache_matches_a_plain_decoder_cache():
  """The prefix cache holds the same keys as the decoder's own cache over the same tokens (no logits run)."""
  model = base.tiny_random("llama")
  cache = generate_lib.prefill_prefix(model.weights, model.config, *generate_lib.right_pad(PREFIX, 64, 0))
  plain = decoder.forward(model.weights, model.config, jnp.asarray([PREFIX]),
                          cache=decoder.init_cache(model.config, 1, len(PREFIX))).cache
  np.testing.assert_allclose(np.asarray(cache.k[:, :, :len(PREFIX)]), np.asarray(plain.k), atol=1e-5)
  assert np.asarray(cache.valid).sum() == len(PREFIX)
