"""H1-H5's decisions (eval/hypotheses.py) and the experiment's report (experiment_report.py), on records built
with known answers: a method whose NLL grows by a set amount per doubling of facts, exact paired offsets,
refusals set per question. No model."""

import json
import math

import numpy as np
import pytest

from doc2atom_jax import experiment
from doc2atom_jax.errors import UserError
from doc2atom_jax.eval import aggregate as agg
from doc2atom_jax.eval import hypotheses as hyp

SIZES = (4, 8, 16, 32, 64)
KINDS = ("single", "single", "two_hop", "out_of_scope")


def nll_model(method: str, facts: int, doc: int, q: int) -> float:
  """Per method: a base level, a growth per doubling of facts, and a small document/question jitter."""
  base, growth = {"no_context": (6.0, 0.0), "in_context": (1.0, 0.0), "doc2atom": (2.0, 0.05),
                  "doc2atom_oracle": (1.5, 0.05), "rag_atoms": (2.5, 0.05), "d2l": (2.0, 0.5),
                  "d2l_256": (2.0, 0.3), "d2l_atom": (3.0, 0.05)}[method]
  return base + growth * math.log2(facts / 4) + 0.01 * ((doc * 7 + q * 3) % 5)


def make_records(methods=None, docs: int = 5, sizes=SIZES, dataset=hyp.UNSEEN, nll=nll_model) -> list:
  methods = methods or ("no_context", "in_context", "doc2atom", "doc2atom_oracle", "rag_atoms", "d2l", "d2l_256",
                        "d2l_atom")
  out = []
  for method in methods:
    for facts in sizes:
      for d in range(docs):
        for q, kind in enumerate(KINDS):
          answerable = kind != "out_of_scope"
          refuses = (not answerable and method == "doc2atom") or (answerable and method == "doc2atom" and q == 0
                                                                   and d == 0 and facts == 4)
          out.append(agg.QuestionRecord(
              method=method, dataset=dataset, doc_id=f"{dataset}-{facts}-{d}", qid=f"q{q}", kind=kind,
              answerable=answerable, prediction="unknown" if refuses else "Paris",
              references=("Paris",) if answerable else (), nll=nll(method, facts, d, q) if answerable else None,
              kl=0.5 if answerable else None, doc_tokens=20 * facts, facts=facts,
              world="unseen" if dataset == hyp.UNSEEN else "seen",
              routed=(0, 1, 2, 3) if method in ("doc2atom", "rag_atoms") else None,
              evidence=(0,) if answerable else None))
  return out


def test_slope_is_the_change_per_doubling():
  assert hyp.slope([4, 8, 16, 32, 64], [1.0, 1.5, 2.0, 2.5, 3.0]) == pytest.approx(0.5)
  assert math.isnan(hyp.slope([8], [1.0]))


@pytest.mark.parametrize("a, b, want", [
    ({"mean": 1, "lo": 0.9, "hi": 1.1, "n": 5}, {"mean": 2, "lo": 1.8, "hi": 2.2, "n": 5}, "lower"),
    ({"mean": 2, "lo": 1.8, "hi": 2.2, "n": 5}, {"mean": 1, "lo": 0.9, "hi": 1.1, "n": 5}, "higher"),
    ({"mean": 1, "lo": 0.9, "hi": 1.9, "n": 5}, {"mean": 2, "lo": 1.8, "hi": 2.2, "n": 5}, "overlap"),
    ({"mean": 1, "lo": 0.9, "hi": 1.1, "n": 0}, {"mean": 2, "lo": 1.8, "hi": 2.2, "n": 5}, "missing"),
])
def test_order_is_ci_non_overlap(a, b, want):
  assert hyp.order(a, b) == want


def test_decision_rules_as_registered():
  assert hyp.ci_decision("lower") == hyp.SUPPORTED
  assert hyp.ci_decision("higher") == hyp.NOT_SUPPORTED
  assert hyp.ci_decision("overlap") == hyp.INCONCLUSIVE
  assert hyp.h1_decision(0.1, 0.5, ["lower", "lower"]) == hyp.SUPPORTED
  assert hyp.h1_decision(0.1, 0.5, ["lower", "overlap"]) == hyp.INCONCLUSIVE
  assert hyp.h1_decision(0.5, 0.5, ["lower", "lower"]) == hyp.NOT_SUPPORTED  # a flatter slope is required
  assert hyp.h1_decision(0.1, 0.5, ["lower", "missing"]) == hyp.NOT_MEASURED


def test_interference_recovers_each_methods_growth():
  curves = hyp.interference(make_records(), ["doc2atom", "d2l"], n_resamples=200)
  assert curves["doc2atom"]["facts"] == list(SIZES)
  assert curves["doc2atom"]["slope"] == pytest.approx(0.05, abs=0.01)
  assert curves["d2l"]["slope"] == pytest.approx(0.5, abs=0.01)
  lo, hi = curves["d2l"]["slope_ci"]
  assert lo <= curves["d2l"]["slope"] <= hi and hi - lo < 0.05
  assert curves["doc2atom"]["stats"][64]["n"] == 5 * 3  # answerable questions of the 64-fact worlds


def test_decide_on_known_records():
  decisions = hyp.decide(make_records(), n_resamples=200)
  assert decisions["H1 vs d2l"]["decision"] == hyp.SUPPORTED
  assert decisions["H1 vs d2l_256"]["decision"] == hyp.SUPPORTED
  assert decisions["H2"]["decision"] == hyp.SUPPORTED  # doc2atom and d2l start level, d2l grows faster
  assert decisions["H3a"]["decision"] == hyp.SUPPORTED  # d2l_atom is 1 nat worse everywhere
  assert decisions["H3b"]["decision"] == hyp.SUPPORTED  # the oracle is 0.5 nat better
  diff = decisions["H3b"]["numbers"]["paired difference"]
  assert diff["mean"] == pytest.approx(-0.5) and diff["lo"] == pytest.approx(-0.5) and diff["n"] == 5 * 5 * 3
  # doc2atom refuses every out-of-scope question and 1 of 75 answerable ones.
  assert decisions["H4"]["numbers"]["refusal"]["mean"] == 1.0
  assert decisions["H4"]["numbers"]["false_refusal"]["mean"] == pytest.approx(1 / 75)
  assert decisions["H4"]["decision"] == hyp.SUPPORTED
  assert decisions["H5"]["decision"] == "lower NLL: doc2atom"
  assert decisions["H5"]["numbers"]["paired difference"]["mean"] == pytest.approx(-0.5)
  assert all(d["gate"] == [] for d in decisions.values())  # in_context beats no_context by 5 nats, 5 docs a cell


def test_flatter_baseline_and_a_gated_cell():
  flat = lambda m, f, d, q: nll_model("doc2atom" if m == "d2l" else ("d2l" if m == "doc2atom" else m), f, d, q)
  decisions = hyp.decide(make_records(nll=flat, docs=4), n_resamples=200)
  assert decisions["H1 vs d2l"]["decision"] == hyp.NOT_SUPPORTED
  assert decisions["H2"]["decision"] == hyp.NOT_SUPPORTED
  # 4 worlds a size: every facts cell has too few documents for the instrument gate, so no claim on H1.
  assert any("too few" in g for g in decisions["H1 vs d2l"]["gate"])
  assert decisions["H3a"]["gate"] == []  # pooled, 20 documents


def test_h4_fails_on_false_refusals():
  records = make_records(methods=("no_context", "in_context", "doc2atom"))
  records = [agg.QuestionRecord.from_json({**r.to_json(), "prediction": "unknown"})
             if r.method == "doc2atom" and r.answerable and r.qid == "q1" else r for r in records]
  decisions = hyp.decide(records, n_resamples=200)
  assert decisions["H4"]["numbers"]["false_refusal"]["mean"] > 0.1
  assert decisions["H4"]["decision"] == hyp.NOT_SUPPORTED
  assert "H1 vs d2l" not in decisions and "H2" not in decisions  # d2l was not evaluated: nothing decided


# The experiment's report.


def write_results(path, records, costs=None):
  path.mkdir(parents=True, exist_ok=True)
  (path / "results.json").write_text(json.dumps({"records": [r.to_json() for r in records], "costs": costs or {},
                                                 "gates": [], "meta": {"git_revision": "abc123"}}))


def test_report_merges_d2l_256_and_writes_every_part(tmp_path):
  root = tmp_path / "exp"
  records = make_records(methods=("no_context", "in_context", "doc2atom", "doc2atom_oracle", "rag_atoms", "d2l",
                                  "d2l_atom"))
  real = [agg.QuestionRecord(method=m, dataset="squad", doc_id="s0", qid="s0q", kind="single", answerable=True,
                             prediction="x", references=("x",), nll=1.25) for m in ("in_context", "doc2atom")]
  costs = {"answer_seconds": {"in_context": 2.0, "doc2atom": 0.5, "d2l": 0.4},
           "bytes_per_document": {"doc2atom": {"codes": 2_000_000, "factors": 9_000_000},
                                  "in_context": {"kv_cache": 40_000_000}},
           "latency_by_length": {"in_context": [[128, 0.5], [1024, 2.0]]}}
  write_results(root / "eval" / "main" / "eval", records + real, costs)
  # The second evaluation names its export d2l; its no_context / in_context rows are the main run's again.
  second = make_records(methods=("in_context", "d2l"), nll=lambda m, f, d, q: nll_model(
      "d2l_256" if m == "d2l" else m, f, d, q))
  write_results(root / "eval" / "d2l_256" / "eval", second, {"answer_seconds": {"in_context": 2.0, "d2l": 0.6}})
  final = root / "final" / "doc2atom"
  final.mkdir(parents=True)
  (final / "results.json").write_text(json.dumps({"methods": {"doc2atom": {"kl": 1.5, "nll": 2.5}}, "learning_check": [
      {"control": "default adapter only", "control_kl": 1.7, "doc2atom_kl": 1.5, "margin": 0.05, "passed": True}]}))
  (final / "metrics.jsonl").write_text("\n".join(json.dumps({"step": s, "step_time_s": 2.0}) for s in (1, 2, 3, 2)))
  experiment.run_stages("report", root)
  out = root / "report"
  text = (out / "results.md").read_text()
  main_table = text.split("### Interference")[0]
  rows = {line.split("|")[1].strip(): line for line in main_table.splitlines() if line.startswith("| ")}
  assert "d2l_256" in rows and "0.30" in rows["d2l_256"]  # renamed, latency 0.6 / 2.0
  assert "| 0.25 |" in rows["doc2atom"] and "2.00 MB (codes)" in rows["doc2atom"]
  assert "1.250 [1.250, 1.250]" in rows["doc2atom"]  # the real-QA column
  assert "100% [100%, 100%]" in rows["doc2atom"]  # refusal of out-of-scope questions
  assert "**H1 vs d2l_256** " in text and "**supported**" in text and "Gate: passes" in text
  assert "| doc2atom | 3 | 0.1 | 1.500 | 2.500 | default adapter only: pass (1.700) |" in text  # step 2 counted once
  assert "| d2l | not run |" in text
  assert "Answer latency at 1024 document tokens" in text
  assert (out / "interference.png").stat().st_size > 1000
  saved = json.loads((out / "hypotheses.json").read_text())
  assert saved["decisions"]["H1 vs d2l_256"]["decision"] == hyp.SUPPORTED
  assert saved["curves"]["d2l_256"]["slope"] == pytest.approx(0.3, abs=0.01)
  assert np.isfinite(saved["curves"]["doc2atom"]["slope_ci"]).all()


def test_report_before_the_evaluation_says_what_to_run(tmp_path):
  with pytest.raises(UserError, match="results.json is missing: run `python -m doc2atom_jax.experiment eval`"):
    experiment.run_stages("report", tmp_path)
