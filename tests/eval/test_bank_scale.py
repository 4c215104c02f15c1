"""eval/bank_scale.py on the tiny random model: one document's bank is its own bank, global rows map to their
documents, shared names are found, abstentions are misses, and the command line (table, files, bad input)."""

import dataclasses
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from doc2atom_jax import system as system_lib
from doc2atom_jax.atoms import pipeline
from doc2atom_jax.eval import bank_scale, quick, routing, runner
from doc2atom_jax.train import losses
from tests.cli_helpers import assert_user_error, run_module


@pytest.fixture(scope="module")
def system():
  return system_lib.build_system(tiny.get_config())


@pytest.fixture(scope="module")
def documents():
  return bank_scale.worlds("seen", documents=2, sizes=(4,))


def _same(a: dict, b: dict) -> bool:
  return a.keys() == b.keys() and all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in
                                      ((a[k], b[k]) for k in a))


def test_a_bank_of_one_document_is_its_own_bank(system, documents):
  """One document: the bank row is the per-document row, and both are routing.py's system row."""
  result = bank_scale.measure(system, documents[:1])
  assert (result["documents"], result["atoms"]) == (1, len(system.split(documents[0].text, "x").atoms))
  assert _same(result["per_document"], result["bank"])
  reference = routing.tally([routing.rank_document(system, documents[0])], routing.SYSTEM)
  for name, value in reference.items():
    assert value == result["bank"][name] or (math.isnan(value) and math.isnan(result["bank"][name])), name
  assert result["bank"]["wrong_document_at_1"] == 0.0
  assert result["bank"]["answerable"] == sum(q.answerable for q in documents[0].questions)
  assert result["shared_entity"]["questions"] == 0


class _Rigged(pipeline.AtomSystem):
  """The router's scores with one atom (`target`: doc_id, index) far ahead of every other, wherever it is."""
  target = None

  def scores(self, bank, questions, question_states=None):
    scores = np.array(super().scores(bank, questions, question_states))
    for row, atom in enumerate(bank.atoms):
      if (atom.doc_id, atom.index) == self.target:
        scores[:, row] += 1e3
    return jnp.asarray(scores)


def test_global_rows_map_to_their_documents(system, documents, monkeypatch):
  """Atom 0 of the second document ranks first for every question: in the bank, the first document's answerable
  questions take another document's atom (wrong document, never precision), and rag_atoms reads its text."""
  method = dataclasses.replace(system.method, route_score="dense", abstain="evidence", abstain_margin=-math.inf)
  rigged = _Rigged(system.model, system.compiler, system.router, method)
  first, second = documents
  rigged.target = (second.doc_id, 0)
  turns = []
  logits = quick.prompt_answer_logits
  monkeypatch.setattr(quick, "prompt_answer_logits",
                      lambda model, user_turns, *a, **k: turns.append(list(user_turns)) or logits(model, user_turns,
                                                                                                   *a, **k))
  result = bank_scale.measure(rigged, documents)
  bank, own = result["bank"], result["per_document"]
  assert bank["false_refusal"] == 0.0 and own["false_refusal"] == 0.0  # every answerable question is routed
  answerable = [sum(q.answerable for q in d.questions) for d in documents]
  assert bank["wrong_document_at_1"] == pytest.approx(answerable[0] / sum(answerable))
  assert own["wrong_document_at_1"] == 0.0
  atoms = system.split(second.text, second.doc_id).atoms
  holds = lambda doc, q: 0 in (runner.evidence_atoms(doc, q, atoms) or ())
  single = [(d, q) for d in documents for q in d.questions if q.kind == "single"]
  hits = sum(d is second and holds(d, q) for d, q in single)
  assert bank["precision_at_1"] == pytest.approx(hits / len(single))
  target = atoms[0].text
  rag = [t for batch in turns for t in batch if "Question:" in t]
  asked_first = {q.question for q in first.questions}
  assert any(target in t and any(q in t for q in asked_first) for t in rag), "doc 1's questions read doc 2's atom"


def _hand_made():
  """Two documents that name Velkor Amsten, a third that does not."""
  def doc(name, text, facts, asked):
    spans, at = [], 0
    for fact in facts:
      at = text.index(fact, at)
      spans.append((at, at + len(fact)))
    questions = tuple(runner.EvalQuestion(f"{name}-{i}", q, (a,), kind, () if f is None else (f,))
                      for i, (q, a, kind, f) in enumerate(asked))
    return runner.EvalDocument("hand", name, text, questions, len(facts), "seen", tuple(spans))

  a = doc("a", "Velkor Amsten was born in 1931. Velkor Amsten lived in Kestrava.",
          ["Velkor Amsten was born in 1931.", "Velkor Amsten lived in Kestrava."],
          [("When was Velkor Amsten born?", "1931", "single", 0), ("Where did Velkor Amsten live?", "Kestrava",
                                                                    "single", 1),
           ("Who founded the Brellmoor Institute?", "unknown", "out_of_scope", None)])
  b = doc("b", "Velkor Amsten founded the Tarnow Institute. The Tarnow Institute is in Daskel.",
          ["Velkor Amsten founded the Tarnow Institute.", "The Tarnow Institute is in Daskel."],
          [("Who founded the Tarnow Institute?", "Velkor Amsten", "single", 0),
           ("Where is the Tarnow Institute?", "Daskel", "single", 1),
           ("What did Velkor Amsten found?", "the Tarnow Institute", "single", 0)])
  c = doc("c", "The Orlen Observatory was built in 1871. The Orlen Observatory stands in Marrow.",
          ["The Orlen Observatory was built in 1871.", "The Orlen Observatory stands in Marrow."],
          [("When was the Orlen Observatory built?", "1871", "single", 0),
           ("Where did Velkor Amsten die?", "unknown", "out_of_scope", None)])
  return [a, b, c]


def test_shared_entities_are_the_names_another_document_has(system):
  docs = _hand_made()
  assert bank_scale.shared_entity(docs) == [[True, True, False], [False, False, True], [False, False]]
  assert bank_scale.shared_entity(docs[:1] + docs[2:]) == [[False] * 3, [False] * 2]
  result = bank_scale.measure(system, docs)
  shared = result["shared_entity"]
  assert shared["questions"] == 3
  for setting in bank_scale.SETTINGS:
    assert (shared[setting]["questions"], shared[setting]["single"], shared[setting]["answerable"]) == (3, 3, 3)
    assert math.isnan(shared[setting]["refusal"])  # the subset is answerable questions only
  assert result[bank_scale.SETTINGS[1]]["questions"] == 8


def test_an_abstention_is_a_miss(system, documents, monkeypatch):
  """With every answer counted right, tf_em is the share of answerable questions the system answers."""
  monkeypatch.setattr(losses, "greedy_match", lambda logits, targets, mask: jnp.ones(logits.shape[0], bool))
  answering = bank_scale.measure(system, documents[:1])["bank"]
  assert answering["tf_em_doc2atom"] == pytest.approx(1 - answering["false_refusal"])
  assert answering["tf_em_rag_atoms"] == answering["tf_em_doc2atom"] and answering["tf_em_doc2atom"] > 0
  method = dataclasses.replace(system.method, abstain="evidence", abstain_margin=math.inf)
  refusing = bank_scale.measure(dataclasses.replace(system, method=method), documents[:1])["bank"]
  assert refusing["false_refusal"] == 1.0 and refusing["refusal"] == 1.0
  assert refusing["tf_em_doc2atom"] == 0.0 and refusing["tf_em_rag_atoms"] == 0.0


def test_command_line_prints_the_table_and_writes_files(tmp_path):
  result = run_module("doc2atom_jax.eval.bank_scale", "--config=configs/tiny.py", "--documents=2", "--sizes=4",
                      "--templates=seen", f"--workdir={tmp_path}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "| seen | per_document | 2 / " in result.stdout and "| seen | bank, shared entity | 2 / " in result.stdout
  report = json.loads((tmp_path / "bank_scale.json").read_text())
  assert report["settings"]["documents"] == 2 and report["settings"]["templates"] == ["seen"]
  assert [r["setting"] for r in report["rows"]] == ["per_document", "bank", "per_document, shared entity",
                                                    "bank, shared entity"]
  assert "| templates | setting |" in (tmp_path / "bank_scale.md").read_text()


@pytest.mark.parametrize("flag, needle", [("--documents=1", "documents must be an integer in [2, 1000]"),
                                          ("--sizes=4,x", "sizes"), ("--templates=seen,odd", "templates must be")])
def test_command_line_bad_values_are_one_error_line(flag, needle):
  assert_user_error(run_module("doc2atom_jax.eval.bank_scale", "--config=configs/tiny.py", flag), needle)


def test_the_test_split_is_mode_evals_unseen_worlds():
  options = {**bank_scale.DEFAULTS, "documents": 2, "sizes": (4, 8), "split": "test"}
  mine = bank_scale.documents_of(options, "seen", seed=0, questions=8)
  theirs = runner.unseen_synthetic(2, (4, 8), seed=0, questions=8)
  assert [(d.doc_id, d.text, d.questions) for d in mine] == [(d.doc_id, d.text, d.questions) for d in theirs]
  validation = bank_scale.documents_of({**options, "split": "validation"}, "seen", seed=0, questions=8)
  assert {d.doc_id for d in validation}.isdisjoint(d.doc_id for d in mine)
