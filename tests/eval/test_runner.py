"""The evaluator on a tiny random model: every method on synthetic worlds and a few questions from every bundled
QA file, the report folder, each kind of bad input, and mode=eval end to end through the command line."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from configs import tiny
from doc2atom_jax import checkpoint
from doc2atom_jax import system as system_lib
from doc2atom_jax.atoms import bank as bank_lib
from doc2atom_jax.data import qa, synthetic
from doc2atom_jax.errors import UserError
from doc2atom_jax.eval import aggregate as agg
from doc2atom_jax.eval import quick, report, runner

ROOT = pathlib.Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def config(variant=None, **eval_overrides):
  """configs/tiny.py (tiny random llama, small trunk), mode eval, small caps and batches of 2 (few shapes to
  compile); synthetic training data order from the generator (no TFDS preparation)."""
  c = tiny.get_config(variant)
  c.unlock()
  c.mode = "eval"
  c.data.source = "generator"
  c.eval.update(dict(max_questions=2, synthetic_documents=1, facts_per_document=(3, 6), max_doc_tokens=1024,
                     batch_size=2, max_new_tokens=3, latency_lengths=(64, 256), cost_repeats=1, cost_new_tokens=3))
  c.eval.update(eval_overrides)
  return c


def export(path, c, *, steps=2, model=None):
  """An export as mode=train writes it (untrained parameters): params + export.json with the run's config."""
  system = system_lib.build_system(c, model=model)
  run = {k: v for k, v in c.to_dict().items() if k not in ("mode", "params", "eval")}
  checkpoint.export_params((system.compiler, system.router), path, {"run": run, "step": steps,
                                                                     "model": system.model.name})
  return system


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
  """One run of every method (d2l and d2l_atom from their own exports) on every default dataset."""
  tmp = tmp_path_factory.mktemp("eval")
  main = export(tmp / "main", config())
  export(tmp / "d2l", config("d2l"), model=main.model)
  export(tmp / "d2l_atom", config("d2l_atom"), model=main.model)
  c = config(exports=(f"d2l={tmp / 'd2l'}", f"d2l_atom={tmp / 'd2l_atom'}"), capacity_steps=4,
             capacity_learning_rate=5e-2)
  c.params = str(tmp / "main")
  folder = runner.run(c, tmp)
  return folder, report.load_records(folder), json.loads((folder / "results.json").read_text())


def test_every_method_on_every_dataset_writes_the_report(evaluated):
  folder, records, results = evaluated
  assert folder.name == "eval"
  assert (folder / "report.md").read_text().startswith("# Evaluation report")
  for png in ("metrics_by_method.png", "interference.png", "f1_vs_bytes.png", "latency_vs_length.png"):
    assert (folder / png).read_bytes()[:8] == PNG_MAGIC, png
  assert {r.method for r in records} == set(runner.METHODS)
  coverage = results["meta"]["coverage"]
  assert set(coverage) == set(runner.default_datasets())
  scored = {r.dataset for r in records}
  assert scored >= {"synthetic_unseen", "synthetic_seen", "squad", "squad_v2", "drop", "ropes"}
  for name in qa.BUNDLED:  # every file is read; documents over max_doc_tokens are skipped and counted
    questions = sum(r.method == "no_context" and r.dataset == name for r in records)
    assert coverage[name]["questions"] == questions == (2 if name in scored else 0), name
    assert name in scored or coverage[name]["skipped_long"] > 0, name
  assert {"musique", "qasper"} <= set(qa.BUNDLED) - scored  # 1,024 bytes hold none of their documents
  text = (folder / "report.md").read_text()
  assert "## Coverage" in text and "| musique | 0 | 0 | 80 |" in text
  # Seen worlds are the training run's documents (generator order: indices 0, 1), asked in paraphrase 2.
  seen = {r.doc_id for r in records if r.dataset == "synthetic_seen"}
  assert seen == {"synthetic-train-0-0", "synthetic-train-0-1"}
  assert {r.world for r in records if r.dataset.startswith("synthetic")} == {"seen", "unseen"}
  assert {r.facts for r in records if r.dataset == "synthetic_unseen"} == {3, 6}


def test_records_carry_category_kind_and_templates(evaluated):
  folder, records, results = evaluated
  for r in records:
    assert (r.category is not None) == r.answerable, r
    assert (r.templates is not None) == r.dataset.startswith("synthetic"), r
  templates = {(r.dataset, r.world, r.templates) for r in records if r.templates}
  assert templates == {("synthetic_unseen", "unseen", "seen"), ("synthetic_unseen_templates", "unseen", "unseen"),
                       ("synthetic_seen", "seen", "seen")}
  assert {r.category for r in records if r.dataset.startswith("synthetic") and r.answerable} <= {
      "closed_pool", "number", "quantity", "name"}
  assert {r.category for r in records if r.dataset == "squad" and r.answerable} <= {"number", "quantity", "other"}
  # The held-out wording is scored on the same questions as synthetic_unseen, and shown apart from it.
  answers = lambda name: sorted((r.method, r.references) for r in records if r.dataset == name)
  assert answers("synthetic_unseen_templates") == answers("synthetic_unseen")
  md = (folder / "report.md").read_text()
  for title in ("## By answer category", "## By question kind", "## By templates"):
    assert title in md
  rows = results["tables"]["by_templates"]
  assert {(r["dataset"], r["templates"]) for r in rows} == {(d, t) for d, _, t in templates}
  assert {r["category"] for r in results["tables"]["by_category"]} >= {"name", "other"}


def test_held_out_templates_change_the_wording_not_the_facts():
  seen, unseen = (runner.unseen_synthetic(2, (4, 8), seed=0, questions=8, templates=t) for t in synthetic.TEMPLATES)
  assert {d.dataset for d in seen} == {"synthetic_unseen"} and {d.dataset for d in unseen} == {
      "synthetic_unseen_templates"}
  for a, b in zip(seen, unseen):
    assert (a.templates, b.templates, a.world, b.world, a.facts) == ("seen", "unseen", "unseen", "unseen", b.facts)
    assert b.doc_id == a.doc_id + "-unseen" and a.text != b.text
    assert [(q.references, q.kind, q.fact_evidence, q.category) for q in a.questions] == [
        (q.references, q.kind, q.fact_evidence, q.category) for q in b.questions]
    assert all(qa_.question != qb.question for qa_, qb in zip(a.questions, b.questions))
  for i in range(4):  # the worlds themselves: the same facts, other sentences
    a, b = (synthetic.document("test", i, seed=0, facts_per_document=4, templates=t) for t in synthetic.TEMPLATES)
    assert [(f.subject, f.attribute, f.value) for f in a.facts] == [(f.subject, f.attribute, f.value) for f in b.facts]
    assert all(f.text != g.text for f, g in zip(a.facts, b.facts))


def test_scores_and_routing_fields(evaluated):
  _, records, _ = evaluated
  for r in records:
    assert (r.nll is not None) == r.answerable and (r.kl is not None) == r.answerable
    if r.answerable:
      assert np.isfinite(r.nll) and r.nll > 0 and r.kl >= 0
    assert isinstance(r.prediction, str)
    assert (r.routed is not None) == (r.method in ("rag_atoms", "doc2atom", "doc2atom_oracle", *runner.CAPACITY))
  assert all(r.kl == 0.0 for r in records if r.method == "in_context" and r.answerable)
  # An untrained compiler changes nothing (B starts at 0): doc2atom scores as the model without a document.
  by_key = {(r.method, r.dataset, r.qid): r for r in records}
  for r in records:
    if r.method == "doc2atom" and r.answerable:
      np.testing.assert_allclose(r.nll, by_key["no_context", r.dataset, r.qid].nll, rtol=1e-4)
  # Every method's record of a question carries the same evidence labels.
  labels = {}
  for r in records:
    assert labels.setdefault((r.dataset, r.qid), r.evidence) == r.evidence


def test_oracle_uses_exactly_the_evidence_atoms_of_labelled_questions(evaluated):
  _, records, _ = evaluated
  oracle = [r for r in records if r.method == "doc2atom_oracle"]
  assert oracle and all(r.answerable and r.evidence and r.routed == r.evidence and not r.abstained for r in oracle)
  labelled = {(r.dataset, r.qid) for r in records if r.method == "doc2atom" and r.answerable and r.evidence}
  assert {(r.dataset, r.qid) for r in oracle} == labelled
  assert {r.dataset for r in oracle} >= {"synthetic_unseen", "synthetic_seen", "squad"}


def test_oracle_composes_the_evidence_atoms_at_uniform_weight(monkeypatch):
  c = config()
  system = system_lib.build_system(c)
  doc = runner.unseen_synthetic(1, (6,), seed=0, questions=8)[0]
  run = runner.DocumentRun(doc, {"doc2atom": system}, code_dtype="bfloat16", trunc_tokens=64)
  seen = {}
  monkeypatch.setattr(system, "adapter", lambda bank, indices, weights: seen.update(i=indices, w=weights))
  rows = tuple(range(len(doc.questions)))
  inputs = runner.BUILDERS["doc2atom_oracle"](run, rows)
  for r, i in enumerate(rows):
    evidence = run.evidence[i]
    assert inputs.keep[r] == bool(evidence)
    used = [int(j) for j, w in zip(seen["i"][r], seen["w"][r]) if w > 0]
    assert used == list(evidence or ())
    if evidence:
      np.testing.assert_allclose(seen["w"][r][:len(evidence)], 1 / len(evidence))
  assert any(len(e or ()) >= 2 for e in run.evidence)  # a two-hop question: both facts' atoms


def test_capacity_oracle_fits_the_questions_it_serves(evaluated):
  _, records, _ = evaluated
  by = lambda method: {(r.dataset, r.qid): r for r in records if r.method == method}
  atom, doc, plain = by("capacity_atom"), by("capacity_doc"), by("no_context")
  labelled = {k for k, r in by("doc2atom").items() if r.answerable and r.evidence}
  assert set(atom) == labelled  # per atom with oracle routing: labelled answerable questions only
  assert all(r.routed == r.evidence and not r.abstained for r in atom.values())
  assert set(doc) == {k for k, r in plain.items() if r.answerable}  # per document: every answerable question
  assert {r.dataset for r in atom.values()} >= {"synthetic_unseen", "synthetic_seen", "squad"}
  for fitted in (atom, doc):  # a few Adam steps against the teacher lower the KL of the questions fitted on
    assert np.mean([r.kl for r in fitted.values()]) < 0.9 * np.mean([plain[k].kl for k in fitted])


def test_capacity_methods_need_steps():
  with pytest.raises(UserError, match="capacity_steps"):
    runner.resolve_methods(("capacity_doc",), {}, 0)
  assert "capacity_atom" not in runner.resolve_methods((), {}, 0)
  assert {"capacity_atom", "capacity_doc"} <= set(runner.resolve_methods((), {}, 5))


def test_costs_cover_every_method(evaluated):
  _, _, results = evaluated
  costs = results["costs"]
  assert set(costs["bytes_per_document"]) == set(runner.METHODS) - {"no_context"} - set(runner.CAPACITY)
  assert set(costs["bytes_per_document"]["doc2atom"]) == {"codes", "factors"}
  assert costs["bytes_per_document"]["doc2atom"]["factors"] > costs["bytes_per_document"]["doc2atom"]["codes"]
  assert set(costs["bytes_per_document"]["in_context"]) == {"kv_cache"}
  timed = set(runner.METHODS) - {"doc2atom_oracle"} - set(runner.CAPACITY)
  assert set(costs["answer_seconds"]) == timed
  assert set(costs["internalize_seconds"]) == timed - {"no_context"}
  assert [t for t, _ in costs["latency_by_length"]["in_context"]] == [64, 256]
  assert all(s > 0 for pts in costs["latency_by_length"].values() for _, s in pts)


def test_always_refusing_method_scores_full_refusal_and_full_false_refusal(monkeypatch, tmp_path):
  monkeypatch.setenv("DOC2ATOM_CACHE", str(tmp_path / "cache"))  # the teacher comes from the disk cache here
  refuse = lambda run, rows: runner.Inputs(["-"] * len(rows), answers=["I don't know."] * len(rows))
  monkeypatch.setitem(runner.BUILDERS, "always_refuse", refuse)
  system = system_lib.build_system(config())
  docs = runner.unseen_synthetic(1, (4,), seed=0, questions=8) + runner.from_qa(qa.load_source("squad_v2")[:12],
                                                                                  "squad_v2")[:1]
  records = []
  for doc in docs:
    run = runner.DocumentRun(doc, {"doc2atom": system}, code_dtype="bfloat16", trunc_tokens=64)
    records += runner.evaluate_document(run, ["always_refuse"], batch_size=8, max_new_tokens=3)
  assert {r.answerable for r in records} == {True, False}
  assert any((tmp_path / "cache" / "teacher").rglob("*.npz"))
  [row] = agg.aggregate(records, group_by=("method",))
  assert row["refusal"]["mean"] == 1.0 and row["false_refusal"]["mean"] == 1.0
  assert all(r.kl is not None for r in records if r.answerable)
  report.write_report(tmp_path / "eval", records, config={}, costs=None, meta={})
  line = next(l for l in (tmp_path / "eval" / "report.md").read_text().splitlines() if l.startswith("| always_refuse"))
  assert line.count("1.000 [1.000, 1.000] (n=") == 2  # refusal and false refusal, side by side


def test_generation_that_hits_the_token_limit_is_scored():
  system = system_lib.build_system(config())
  model = system.model
  out, counts = model.generate_ids(model.chat_ids(["Say something long."] * 2), max_new_tokens=5, stop=False)
  assert np.asarray(counts).tolist() == [5, 5] and np.asarray(out).shape == (2, 5)
  doc = runner.unseen_synthetic(1, (3,), seed=0, questions=4)[0]
  run = runner.DocumentRun(doc, {"doc2atom": system}, code_dtype="bfloat16", trunc_tokens=64)
  records = runner.evaluate_document(run, ["no_context"], batch_size=8, max_new_tokens=2)
  assert len(records) == 4 and all(0.0 <= r.f1 <= 1.0 for r in records)


# ---------------------------------------------------------------------------------------------------------
# Bad input: one clear UserError each.
# ---------------------------------------------------------------------------------------------------------
def test_unknown_method_is_a_user_error():
  with pytest.raises(UserError, match="unknown eval method.*'oracle'.*doc2atom_oracle"):
    runner.resolve_methods(("doc2atom", "oracle"), {})
  with pytest.raises(UserError, match="unknown eval method"):
    runner.run(config(methods=("nope",)), pathlib.Path("/nonexistent"))


def test_d2l_without_its_export_is_a_user_error():
  with pytest.raises(UserError, match="d2l is trained separately.*d2l=runs/d2l/export"):
    runner.resolve_methods(("doc2atom", "d2l"), {})
  with pytest.raises(UserError, match="must be method=path"):
    runner.parse_exports(("d2l",))
  with pytest.raises(UserError, match="not a separately trained method"):
    runner.parse_exports(("doc2atom=runs/x",))
  assert runner.resolve_methods((), {"d2l": "x"}) == (*runner.METHODS[:6], "d2l")


def test_export_of_another_base_model_is_a_user_error(tmp_path):
  # tiny llama and tiny mistral have the same compiler shapes: without the check the export would load.
  mistral = config()
  mistral.model.name = "tiny-random-mistral"
  export(tmp_path / "mistral", mistral)
  c = config()
  c.params = str(tmp_path / "mistral")
  with pytest.raises(UserError, match="trained on base model 'tiny-random-mistral', not 'tiny-random-llama'"):
    system_lib.build_system(c)
  d2l = config("d2l")
  export(tmp_path / "d2l", d2l)
  c.params = str(tmp_path / "d2l")
  with pytest.raises(UserError, match="trained for method 'd2l', not 'doc2atom'"):
    system_lib.build_system(c)
  mistral_d2l = config("d2l_atom")
  mistral_d2l.model.name = "tiny-random-mistral"
  export(tmp_path / "mistral_d2l_atom", mistral_d2l)
  with pytest.raises(UserError, match="trained on base model 'tiny-random-mistral'"):
    system_lib.trained_system(config(), "d2l_atom", str(tmp_path / "mistral_d2l_atom"), system_lib.load_model(config()))


def test_dataset_with_no_answerable_question_is_a_user_error(tmp_path):
  path = tmp_path / "none.jsonl"
  rows = [{"id": f"q{i}", "dataset": "x", "doc_id": "d", "context": "Some text.", "question": "Why?", "answers": []}
          for i in range(3)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  with pytest.raises(UserError, match="has no answerable question"):
    runner.qa_documents(f"local:{path}")


def test_empty_bank_is_a_user_error():
  with pytest.raises(UserError, match="empty bank"):
    quick.in_memory_bank([])
  empty = bank_lib.BankDocument("d", "text", (), np.zeros((0, 4, 1, 1, 32), np.float32), np.zeros((0, 16), np.float32))
  with pytest.raises(UserError, match="empty bank"):
    quick.in_memory_bank([empty])


def test_every_document_too_long_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match="no document to evaluate"):
    runner.run(config(datasets=("squad",), max_doc_tokens=8), tmp_path)


# ---------------------------------------------------------------------------------------------------------
# The command line: a 2-step tiny training run, then mode=eval on its export.
# ---------------------------------------------------------------------------------------------------------
def test_eval_mode_end_to_end_on_a_trained_export(tmp_path):
  env = dict(os.environ, XLA_FLAGS="")  # one device is enough here
  main = [sys.executable, "-m", "doc2atom_jax.main", "--config=configs/tiny.py"]
  train = subprocess.run([*main, f"--workdir={tmp_path}", "--config.train.steps=2", "--config.eval.documents=0",
                          "--config.data.source=generator", "--config.train.eval_every=0"],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
  assert train.returncode == 0, train.stderr[-3000:]
  evaluate = [*main, "--config.mode=eval", f"--config.params={tmp_path / 'export'}", f"--workdir={tmp_path}",
              "--config.eval.datasets=('synthetic_unseen', 'synthetic_seen')", "--config.eval.max_new_tokens=3",
              "--config.eval.facts_per_document=(3, 5)", "--config.eval.synthetic_documents=1",
              "--config.eval.latency_lengths=(64,)", "--config.eval.cost_repeats=1"]
  result = subprocess.run(evaluate, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "loaded trained compiler" in result.stdout and "eval synthetic_seen:" in result.stdout
  folder = tmp_path / "eval"
  assert {p.name for p in folder.iterdir()} >= {"report.md", "results.json", "metrics_by_method.png",
                                                  "interference.png", "f1_vs_bytes.png", "latency_vs_length.png"}
  records = report.load_records(folder)
  assert {r.dataset for r in records} == {"synthetic_unseen", "synthetic_seen"}
  assert {r.doc_id for r in records if r.dataset == "synthetic_seen"} == {"synthetic-train-0-0", "synthetic-train-0-1"}
  bad = subprocess.run([*main, "--config.mode=eval", "--config.eval.methods=('doc2atom', 'magic')"], cwd=ROOT,
                       capture_output=True, text=True, env=env, timeout=300)
  assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
  assert [l for l in bad.stderr.splitlines() if l.startswith("error:")] == [
      f"error: unknown eval method(s) 'magic'; valid: {', '.join(runner.METHODS)}"]


def test_seen_worlds_sample_the_whole_run():
  steps = runner.spread_steps(450, 5)
  assert steps[:5] == [0, 90, 180, 270, 360] and sorted(steps) == list(range(450))  # every step once, spread first
  assert runner.spread_steps(3, 5) == [0, 1, 2] and runner.spread_steps(4, 0) == [0, 1, 2, 3]
