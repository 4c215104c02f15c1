"""The one answer format (DESIGN §2.7): an answer prefix prefilled in the assistant turn, `" " + answer` scored
without end-of-turn, generation cut at the sentence's end — for every method, and in the teacher cache's key."""

import dataclasses
import hashlib
import json

import numpy as np
import pytest

from configs import tiny
from doc2atom_jax import system as system_lib
from doc2atom_jax.data import prompts, records
from doc2atom_jax.models import base
from doc2atom_jax.train import batch as batch_lib
from doc2atom_jax.train import teacher as teacher_lib
from doc2atom_jax.eval import runner

PREFIX = "Zq Orlen was founded in"


@pytest.fixture(scope="module")
def model():
  return base.tiny_random("llama")


def test_target_is_space_answer_after_a_prefix_and_never_the_end_of_turn(model):
  prompts_, targets = model.prompt_answer_ids(["When?", "When?"], ["1643", "1643"], [PREFIX, ""])
  decode = model.tokenizer.decode
  assert decode(prompts_[0]).endswith(PREFIX + " ")  # the byte tokenizer's lone space moved into the prompt
  assert decode(targets[0]) == "1643" and decode(targets[1]) == "1643"
  assert decode(prompts_[1]).endswith(model.chat_prompt("When?"))
  assert all(model.end_of_turn_id not in t for t in targets)
  with pytest.raises(Exception, match="tokenizes to nothing"):
    model.prompt_answer_ids(["When?"], ["  "], [PREFIX])


def test_first_sentence_cuts_at_the_end_of_the_sentence_or_line():
  assert base.first_sentence(" 1643. It was a") == "1643"
  assert base.first_sentence("3.5 m tall.\nNext") == "3.5 m tall"
  assert base.first_sentence("Velkor Amsten") == "Velkor Amsten"
  assert base.first_sentence("the Orle River\nand") == "the Orle River"


def test_generation_after_a_prefix_returns_one_line(model):
  out = model.generate(["Say something long."] * 2, max_new_tokens=12, answer_prefixes=[PREFIX, ""])
  assert "\n" not in out[0] and out[0] == out[0].strip()


def test_teacher_cache_keys_change_with_the_answer_format(model, tmp_path):
  cache = teacher_lib.TeacherCache.for_model(model)
  v1_template = model.chat_prompt(prompts.in_context_prompt("{document}", "{question}"))
  v1_folder = hashlib.sha256(json.dumps([f"{model.name}/{model.config.dtype}", v1_template]).encode()).hexdigest()[:16]
  assert cache.prefix != v1_folder  # entries of the old format live in another folder: never read
  keys = {teacher_lib.example_key("d", "q", "When?", p, "1643") for p in ("", PREFIX)}
  assert len(keys) == 2


def _recording(monkeypatch, model):
  """Records every (user turn, answer prefix) that reaches the tokenizer through `chat_ids`."""
  seen = []
  original = type(model).chat_ids

  def chat_ids(self, user_turns, prefixes=None):
    seen.extend(zip(user_turns, prefixes or [""] * len(user_turns)))
    return original(self, user_turns, prefixes)

  monkeypatch.setattr(type(model), "chat_ids", chat_ids)
  return seen


def test_the_prefix_reaches_every_method_of_the_evaluator(monkeypatch):
  c = tiny.get_config()
  system = system_lib.build_system(c)
  doc = runner.unseen_synthetic(1, (4,), seed=0, questions=4)[0]
  questions = tuple(dataclasses.replace(q, answer_prefix=f"{PREFIX} {i}") for i, q in enumerate(doc.questions))
  doc = dataclasses.replace(doc, questions=questions)
  seen = _recording(monkeypatch, system.model)
  run = runner.DocumentRun(doc, {"doc2atom": system}, code_dtype="bfloat16", trunc_tokens=64)
  methods = ["no_context", "in_context", "in_context_trunc", "rag_atoms", "doc2atom", "doc2atom_oracle"]
  recs = runner.evaluate_document(run, methods, batch_size=4, max_new_tokens=2)
  assert {r.method for r in recs} >= set(methods) - {"doc2atom_oracle"}
  assert all(r.tf_em in (0.0, 1.0) for r in recs if r.answerable and r.nll is not None)
  expected = {q.question: q.answer_prefix for q in questions}
  checked = 0
  for turn, prefix in seen:
    asked = [q for q in expected if q in turn]
    if asked and "Answer with a few words" in turn:
      assert prefix == expected[asked[0]], (turn, prefix)
      checked += 1
  assert checked >= len(methods) * len(questions)  # scoring and generation of every method


def test_the_prefix_reaches_teacher_and_student_in_training(monkeypatch, model):
  from doc2atom_jax.atoms import atomize
  seen = _recording(monkeypatch, model)
  doc = atomize.atomize("Zq Orlen was founded in 1643. It has 412 rooms.", "d0", model.tokenizer)
  qs = (records.TrainQuestion("q0", "When was Zq Orlen founded?", "1643", (0,), answer_prefix=PREFIX),
        records.TrainQuestion("q1", "How many rooms does Zq Orlen have?", "412", (1,)))
  b = batch_lib.build(model, [records.TrainDocument(doc, qs)], k=4)
  turns = [(t, p) for t, p in seen if "Answer with a few words" in t]
  asked = lambda q: [p for t, p in turns if q.question in t]
  assert asked(qs[0]) == [PREFIX] * 3  # student, document teacher, evidence teacher
  assert asked(qs[1]) == [""] * 3
  # The router's input carries no prefix; it pools the question's own tokens only.
  q_text = model.tokenizer.decode(np.asarray(b["q_tokens"][0])[np.asarray(b["q_own"][0])])
  assert q_text.strip() == "When was Zq Orlen founded?"
