"""The experiment's report (experiment_report.py) from a fake root: the main evaluation alone (every optional
section says it was not run), and every file the v2 evaluation writes. Records from tests/eval/test_hypotheses.py
(known slopes and paired offsets). No model."""

import json

import numpy as np
import pytest

from doc2atom_jax import experiment, experiment_report
from doc2atom_jax.errors import UserError
from doc2atom_jax.eval import aggregate as agg
from doc2atom_jax.eval import hypotheses as hyp
from tests.eval.test_hypotheses import make_records, nll_model, tf_em_model

MAIN = ("no_context", "in_context", "in_context_trunc", "doc2atom", "doc2atom_oracle", "rag_atoms", "d2l", "d2l_atom")


def write_results(path, records, costs=None):
  path.mkdir(parents=True, exist_ok=True)
  (path / "results.json").write_text(json.dumps({"records": [r.to_json() for r in records], "costs": costs or {},
                                                 "gates": [], "meta": {"git_revision": "abc123"}}))


def section(text: str, title: str) -> str:
  """The text of the section whose heading starts with `title`, up to the next heading."""
  return text.split(f"### {title}")[1].split("\n### ")[0]


def table_rows(text: str) -> dict[str, list[str]]:
  return {cells[0]: cells for line in text.splitlines() if line.startswith("| ")
          for cells in [[c.strip() for c in line.strip("|").split("|")]]}


def fake_main(root, n_docs: int = 5):
  trunc = lambda m, f, d, q: nll_model("rag_atoms" if m == "in_context_trunc" else m, f, d, q)
  trunc_em = lambda m, f, d, q: tf_em_model("rag_atoms" if m == "in_context_trunc" else m, f, d, q)
  records = make_records(methods=MAIN, docs=n_docs, nll=trunc, tf_em=trunc_em)
  real = [agg.QuestionRecord(method=m, dataset="squad", doc_id="s0", qid="s0q", kind="single", answerable=True,
                             prediction="x", references=("x",), nll=1.25, tf_em=1.0)
          for m in ("in_context", "doc2atom")]
  costs = {"answer_seconds": {"in_context": 2.0, "doc2atom": 0.5, "d2l": 0.4},
           "bytes_per_document": {"doc2atom": {"codes": 2_000_000, "factors": 9_000_000},
                                  "in_context": {"kv_cache": 40_000_000}},
           "latency_by_length": {"in_context": [[128, 0.5], [1024, 2.0]]}}
  write_results(root / "eval" / "main" / "eval", records + real, costs)


def test_report_of_the_main_evaluation_alone(tmp_path):
  root = tmp_path / "exp"
  fake_main(root)
  experiment.run_stages("report", root)
  out = root / "report"
  text = (out / "results.md").read_text()
  rows = table_rows(text.split("### ")[0])
  assert rows["doc2atom"][1].startswith("2.1")  # NLL: 2.0 + 0.05 per doubling, 2 doublings on average
  assert rows["doc2atom"][2].startswith("0.5")  # tf_em beside it
  assert "1.250 [1.250, 1.250]" in rows["doc2atom"] and "1.000 [1.000, 1.000]" in rows["doc2atom"]  # real QA
  assert "100% [100%, 100%]" in rows["doc2atom"] and "2.00 MB (codes)" in rows["doc2atom"]
  assert rows["doc2atom"][-1] == "0.25" and "d2l_256" not in rows
  for title, runs in (("Held-out wording", "eval/templates"), ("Seen worlds", "eval/seen"),
                      ("Capacity oracle", "eval/capacity")):
    assert f"Not run (`{runs}/eval/results.json` is missing)" in section(text, title), title
  assert "not run (`bank_scale.json` is missing)" in section(text, "Bank scale")
  hypotheses = section(text, "Hypotheses")
  for name in ("H1 NLL vs d2l", "H1 tf_em vs d2l", "H2", "H3a", "H3b", "H4", "H5", "H6", "H7"):
    assert f"- **{name}** (" in hypotheses, name
  assert "H1 NLL vs d2l_256" not in hypotheses  # its evaluation was not run
  assert "bank scale: not run" in hypotheses and "v1's rule (CI overlap)" in hypotheses
  kinds = table_rows(section(text, "NLL by question kind"))
  assert list(kinds["method"][1:]) == ["single (n=50)", "two_hop (n=25)"]
  categories = table_rows(section(text, "tf_em by answer category"))
  assert categories["method"][1:] == ["closed_pool (n=25)", "number (n=25)", "name (n=25)"]
  assert "| d2l | not run |" in text and (out / "interference.png").stat().st_size > 1000
  saved = json.loads((out / "hypotheses.json").read_text())
  assert saved["decisions"]["H1 tf_em vs d2l"]["decision"] == hyp.SUPPORTED
  assert saved["curves"]["tf_em"]["d2l"]["slope"] == pytest.approx(-0.1, abs=0.01)
  assert saved["bank"] == {} and saved["wording_gap"] == {}


def test_report_with_every_file(tmp_path):
  root = tmp_path / "exp"
  fake_main(root)
  # The second evaluation names its export d2l; its no_context rows are the main run's again.
  second = make_records(methods=("no_context", "d2l"), nll=lambda m, f, d, q: nll_model(
      "d2l_256" if m == "d2l" else m, f, d, q))
  write_results(root / "eval" / "d2l_256" / "eval", second, {"answer_seconds": {"in_context": 2.0, "d2l": 0.6}})
  # Held-out wording: the same worlds, NLL 0.25 higher, tf_em 0.1 lower, for every method.
  methods = ("no_context", "in_context", "doc2atom", "d2l")
  templates = make_records(methods=methods, docs=2, doc_prefix="w") + make_records(
      methods=methods, docs=2, dataset=hyp.HELD_OUT_WORDING, doc_prefix="w", doc_suffix="-unseen",
      nll=lambda *a: nll_model(*a) + 0.25, tf_em=lambda *a: tf_em_model(*a) - 0.1)
  write_results(root / "eval" / "templates" / "eval", templates)
  write_results(root / "eval" / "seen" / "eval", make_records(methods=methods, docs=1, dataset="synthetic_seen",
                                                               nll=lambda *a: nll_model(*a) - 0.5))
  capacity = make_records(methods=("in_context", "doc2atom", "capacity_atom"), docs=2, sizes=(8, 32),
                          nll=lambda m, *a: nll_model("doc2atom_oracle" if m == "capacity_atom" else m, *a),
                          tf_em=lambda m, *a: tf_em_model("doc2atom_oracle" if m == "capacity_atom" else m, *a))
  write_results(root / "eval" / "capacity" / "eval", capacity)
  (root / "eval" / "bank").mkdir(parents=True)
  (root / "eval" / "bank" / "bank_scale.json").write_text(json.dumps({
      "model": "m", "settings": {"documents": 50}, "seconds": {"seen": 10.0}, "rows": [
          {"templates": "seen", "setting": "per_document", "documents": 250, "atoms": 9000, "precision_at_1": 0.97,
           "recall_at_4": 0.99, "tf_em_doc2atom": 0.31},
          {"templates": "seen", "setting": "bank", "documents": 250, "atoms": 9000, "precision_at_1": 0.812,
           "recall_at_4": None, "tf_em_doc2atom": 0.25}]}))
  final = root / "final"
  for method, nlls in (("doc2atom", (3.0, 2.9, 2.5)), ("d2l", (3.0, 2.8, 2.7))):  # the last 250 steps: 0.4, 0.1
    (final / method).mkdir(parents=True)
    (final / method / "results.json").write_text(json.dumps({
        "methods": {"doc2atom": {"kl": 1.5, "nll": nlls[-1]}}, "learning_check": [
            {"control": "default adapter only", "control_kl": 1.7, "doc2atom_kl": 1.5, "margin": 0.05,
             "passed": True}]}))
    (final / method / "metrics.jsonl").write_text(
        "\n".join(json.dumps({"step": s, "step_time_s": 2.0}) for s in (1, 2, 3, 2)))
    (final / method / "eval.jsonl").write_text("\n".join(json.dumps({"step": s, "nll": v})
                                                        for s, v in zip((250, 500, 750), nlls)) + "\n{\"step\"")
  out = tmp_path / "out"
  experiment.run_stages("report", root, out=out)
  text = (out / "results.md").read_text()
  rows = table_rows(text.split("### ")[0])
  assert "d2l_256" in rows and rows["d2l_256"][-1] == "0.30"  # renamed, latency 0.6 / 2.0
  assert "**H1 NLL vs d2l_256** " in text and "Gate: passes" in text
  wording = table_rows(section(text, "Held-out wording"))
  assert wording["doc2atom"][3] == "+0.250 [+0.250, +0.250]" and wording["doc2atom"][6] == "-0.100 [-0.100, -0.100]"
  assert wording["doc2atom"][-1] == str(5 * 2 * 3)  # questions paired
  seen = table_rows(section(text, "Seen worlds"))
  assert seen["method"][1:3] == ["NLL seen", "NLL unseen"] and float(seen["doc2atom"][1].split()[0]) < float(
      seen["doc2atom"][2].split()[0])
  bank = table_rows(section(text, "Bank scale"))
  assert bank["seen / bank"][bank["setting"].index("precision_at_1")] == "0.812"
  assert bank["seen / bank"][bank["setting"].index("recall_at_4")] == "—"
  assert bank["seen / per_document"][bank["setting"].index("atoms")] == "9000"
  assert "bank scale: seen / per_document precision_at_1 0.970" in section(text, "Hypotheses")
  training = table_rows(section(text, "Training"))
  assert training["doc2atom"][1:3] == ["3", "0.1"] and training["doc2atom"][5] == "+0.400"
  assert "d2l's held-out NLL still fell 0.100 nats/token over its last 250 steps" in section(text, "Training")
  assert "doc2atom's held-out NLL" not in text  # the caveat is about baselines only
  capacity = section(text, "Capacity oracle")
  assert "capacity_atom" in capacity and "tf_em facts 32" in capacity
  saved = json.loads((out / "hypotheses.json").read_text())
  assert saved["wording_gap"]["d2l"]["nll"]["mean"] == pytest.approx(0.25)
  assert saved["bank"]["seen / bank"]["recall_at_4"] is None
  assert np.isfinite(saved["curves"]["nll"]["doc2atom"]["slope_ci"]).all()
  assert not list(out.glob(".*.tmp"))  # atomic writes left no temporary file


def test_an_unreadable_bank_file_is_reported_not_fatal(tmp_path):
  root = tmp_path / "exp"
  fake_main(root)
  (root / "eval" / "bank").mkdir(parents=True)
  (root / "eval" / "bank" / "bank_scale.json").write_text("[1, 2]")
  text = experiment_report.write(root, tmp_path / "out", n_resamples=50).read_text()
  assert "unreadable:" in section(text, "Bank scale") and "is not a JSON object" in section(text, "Bank scale")


def test_late_gain():  # from the last step at least 250 before the end
  assert experiment_report.late_gain({250: 3.0, 500: 2.9, 750: 2.5}) == pytest.approx(0.4)
  assert experiment_report.late_gain({50: 3.0, 100: 2.9}) is None and experiment_report.late_gain({}) is None


def test_report_before_the_evaluation_says_what_to_run(tmp_path):
  with pytest.raises(UserError, match="results.json is missing: run `python -m doc2atom_jax.experiment eval`"):
    experiment.run_stages("report", tmp_path)
