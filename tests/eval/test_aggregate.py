"""Aggregation of question records: bootstrap CIs (coverage, clustering), hand-computed means, bins, gates."""

import json
import math
import time

import numpy as np
import pytest

from doc2atom_jax.errors import UserError
from doc2atom_jax.eval import aggregate as agg
from doc2atom_jax.eval.aggregate import QuestionRecord, bootstrap_ci


def rec(qid="q0", *, method="m", dataset="d", doc_id="doc0", kind="single", prediction="x", references=("x",),
        **kw) -> QuestionRecord:
  return QuestionRecord(method=method, dataset=dataset, doc_id=doc_id, qid=qid, kind=kind,
                        answerable=kind not in agg.UNANSWERABLE_KINDS, prediction=prediction,
                        references=references, **kw)


def only(rows, **where):
  found = [r for r in rows if all(r[k] == v for k, v in where.items())]
  assert len(found) == 1, (where, found)
  return found[0]


# Bootstrap.


def test_bootstrap_edge_cases():
  assert all(math.isnan(x) for x in bootstrap_ci([]))
  assert bootstrap_ci([2.5]) == (2.5, 2.5, 2.5)
  assert bootstrap_ci([1.0] * 7, cluster=[0, 0, 1, 1, 2, 2, 2]) == (1.0, 1.0, 1.0)


def test_bootstrap_is_deterministic_for_a_seed_and_brackets_the_mean():
  x = np.random.default_rng(1).normal(size=40)
  a, b, c = bootstrap_ci(x, seed=3), bootstrap_ci(x, seed=3), bootstrap_ci(x, seed=4)
  assert a == b and a != c
  mean, lo, hi = a
  assert mean == pytest.approx(x.mean()) and lo < mean < hi


@pytest.mark.parametrize("draw, true_mean", [
    (lambda rng: rng.binomial(1, 0.3, size=50).astype(float), 0.3),
    (lambda rng: rng.normal(1.0, 2.0, size=50), 1.0),
])
def test_bootstrap_ci_covers_the_true_mean_at_about_the_nominal_rate(draw, true_mean):
  rng = np.random.default_rng(0)
  hits = []
  for trial in range(200):
    _, lo, hi = bootstrap_ci(draw(rng), seed=trial)
    hits.append(lo <= true_mean <= hi)
  assert 0.88 <= np.mean(hits) <= 0.99


def test_bootstrap_is_vectorized():
  x = np.random.default_rng(0).normal(size=10_000)
  start = time.perf_counter()
  mean, lo, hi = bootstrap_ci(x, n_resamples=1000)
  assert time.perf_counter() - start < 5.0
  # The standard error of the mean of 10k unit normals is 0.01: the 95% interval is about +-0.0196.
  assert hi - lo == pytest.approx(2 * 1.96 * x.std() / 100, rel=0.15)


def test_cluster_bootstrap_is_wider_for_clustered_data():
  rng = np.random.default_rng(0)
  clusters = np.repeat(np.arange(20), 25)  # 20 documents, 25 questions each, sharing a document effect
  x = rng.normal(size=20)[clusters] + 0.1 * rng.normal(size=clusters.size)
  mean, lo, hi = bootstrap_ci(x)
  c_mean, c_lo, c_hi = bootstrap_ci(x, cluster=clusters)
  assert c_mean == pytest.approx(mean)  # the pooled mean, whatever the resampling unit
  assert (c_hi - c_lo) > 3 * (hi - lo)


def test_cluster_ids_must_match_values():
  with pytest.raises(UserError, match="cluster"):
    bootstrap_ci([1.0, 2.0], cluster=[0])


# Records.


def test_record_round_trips_through_json_and_derives_scores():
  r = rec(prediction="the big cat sat", references=["a cat sat down"], nll=1.5, routed=[3, 1], evidence=[1],
          facts=6, world="unseen", doc_tokens=120)
  obj = json.loads(json.dumps(r.to_json()))
  assert obj["scores"]["f1"] == pytest.approx(2 / 3)
  assert QuestionRecord.from_json(obj) == r
  assert QuestionRecord.from_json(json.dumps(r.to_json())) == r
  assert r.references == ("a cat sat down",) and r.routed == (3, 1)


def test_abstention_is_a_refusal_and_routes_nowhere():
  r = rec(prediction="Paris", references=["Paris"], routed=[0], evidence=[0], abstained=True)
  assert r.refusal and r.f1 == 0.0 and r.em == 0.0
  assert r.routing(1) == (0.0, 0.0)
  assert rec(prediction="Paris", references=["Paris"], routed=[0], evidence=[0]).routing(1) == (1.0, 1.0)


def test_unanswerable_scores_the_refusal():
  assert rec(kind="out_of_scope", prediction="I don't know.", references=["unknown"]).f1 == 1.0
  assert rec(kind="unanswerable", prediction="Paris", references=[]).em == 0.0


@pytest.mark.parametrize("kw, match", [
    ({"kind": "multi_hop"}, "kind"),
    ({"world": "other"}, "world"),
    ({"references": "Paris"}, "list of strings"),
    ({"references": []}, "at least one reference"),
    ({"evidence": ["a"]}, "atom indices"),
    ({"category": "date"}, "category"),
    ({"templates": "held_out"}, "templates"),
    ({"kind": "out_of_scope", "references": ["unknown"], "category": "name"}, "no answer category"),
])
def test_bad_records_are_user_errors(kw, match):
  with pytest.raises(UserError, match=match):
    rec(**kw)


def test_answerable_must_agree_with_kind():
  with pytest.raises(UserError, match="contradicts"):
    QuestionRecord(method="m", dataset="d", doc_id="a", qid="q", kind="out_of_scope", answerable=True,
                   prediction="", references=["x"])


def test_from_json_rejects_unknown_fields():
  obj = rec().to_json() | {"color": "red"}
  with pytest.raises(UserError, match="color"):
    QuestionRecord.from_json(obj)


# Aggregation.


def _hand_built():
  """Method "a" on four questions of two documents; "b" refuses everything. Scores worked out by hand."""
  a = [
      rec("q0", method="a", prediction="Paris", references=["Paris"], nll=1.0, kl=0.5, routed=[2, 0, 1],
          evidence=[0]),  # f1 1, em 1; p@1 0, r@1 0, p@4 1/4, r@4 1
      rec("q1", method="a", kind="two_hop", prediction="big cat", references=["cat"], nll=2.0, kl=0.5,
          routed=[3, 4], evidence=[3, 4]),  # f1 2/3, em 0; p@1 1, r@1 1/2, p@4 2/4, r@4 1
      rec("q2", method="a", doc_id="doc1", kind="out_of_scope", prediction="unknown", references=["unknown"],
          routed=[1]),  # refusal (right)
      rec("q3", method="a", doc_id="doc1", prediction="I don't know", references=["Rome"], nll=3.0, kl=2.0,
          routed=[0]),  # false refusal; unlabelled
  ]
  b = [dataclass_replace(r, method="b", prediction="unknown", routed=None) for r in a]
  return a + b


def dataclass_replace(r, **kw):
  import dataclasses  # pylint: disable=import-outside-toplevel
  return dataclasses.replace(r, **kw)


def test_aggregate_means_and_rates_by_hand():
  rows = agg.aggregate(_hand_built())
  assert [(r["method"], r["dataset"]) for r in rows] == [("a", "d"), ("b", "d")]
  a = only(rows, method="a")
  assert (a["n"], a["n_answerable"], a["n_unanswerable"]) == (4, 3, 1)
  assert a["nll"]["mean"] == pytest.approx(2.0) and a["nll"]["n"] == 3
  assert a["kl"]["mean"] == pytest.approx(1.0)
  assert a["f1"]["mean"] == pytest.approx((1 + 2 / 3 + 0) / 3)
  assert a["em"]["mean"] == pytest.approx(1 / 3)
  assert a["refusal"]["mean"] == 1.0 and a["refusal"]["n"] == 1
  assert a["false_refusal"]["mean"] == pytest.approx(1 / 3) and a["false_refusal"]["n"] == 3
  for name in ("nll", "f1", "false_refusal"):
    assert a[name]["lo"] <= a[name]["mean"] <= a[name]["hi"]


def test_routing_precision_and_recall_by_hand():
  a = only(agg.aggregate(_hand_built()), method="a")["routing"]
  assert a["n_labelled"] == 2 and a["label_coverage"] == pytest.approx(2 / 3)
  assert a["precision@1"]["mean"] == pytest.approx(0.5) and a["precision@1"]["n"] == 2
  assert a["recall@1"]["mean"] == pytest.approx(0.25)
  assert a["precision@4"]["mean"] == pytest.approx((1 / 4 + 2 / 4) / 2)
  assert a["recall@4"]["mean"] == pytest.approx(1.0)
  b = only(agg.aggregate(_hand_built(), routing_k=[2]), method="b")["routing"]  # no router: nothing to score
  assert b["precision@2"]["n"] == 0 and math.isnan(b["precision@2"]["mean"]) and "precision@1" not in b


def test_always_refusing_shows_refusal_and_false_refusal_of_one():
  b = only(agg.aggregate(_hand_built()), method="b")
  assert b["refusal"]["mean"] == 1.0 and b["false_refusal"]["mean"] == 1.0
  assert b["refusal"]["lo"] == 1.0 and b["false_refusal"]["hi"] == 1.0
  assert b["f1"]["mean"] == 0.0


def test_length_and_facts_bins():
  records = [rec("q0", doc_id="a", doc_tokens=5000, facts=40), rec("q1", doc_id="b", doc_tokens=300, facts=5),
             rec("q2", doc_id="c", doc_tokens=100, facts=None), rec("q3", doc_id="d", doc_tokens=256, facts=4)]
  rows = agg.aggregate(records, group_by=("length",))
  assert [(r["length"], r["n"]) for r in rows] == [("[0, 256)", 1), ("[256, 512)", 2), ("[4096, inf)", 1)]
  assert rows[1]["doc_tokens_mean"] == pytest.approx(278)
  rows = agg.aggregate(records, group_by=("facts",))  # the record without facts is in no facts bin
  assert [(r["facts"], r["n"]) for r in rows] == [("[4, 8)", 2), ("[32, 64)", 1)]
  rows = agg.aggregate(records, group_by=("facts",), bins={"facts": (0, 10, 100)})
  assert [(r["facts"], r["n"], r["facts_mean"]) for r in rows] == [("[0, 10)", 2, 4.5), ("[10, 100)", 1, 40.0)]


def test_kind_and_world_groups_in_natural_order():
  records = [rec("q0", kind="out_of_scope", world="unseen", references=["unknown"]), rec("q1", kind="two_hop"),
             rec("q2", kind="single", world="seen"), rec("q3", world="unseen")]
  assert [r["kind"] for r in agg.aggregate(records, group_by="kind")] == ["single", "two_hop", "out_of_scope"]
  rows = agg.aggregate(records, group_by=("world",))
  assert [(r["world"], r["n"]) for r in rows] == [("seen", 1), ("unseen", 2)]


def test_records_written_before_categories_still_load():
  obj = rec().to_json()
  del obj["category"], obj["templates"]
  assert QuestionRecord.from_json(obj) == rec()
  assert rec(category="").category is None  # "" (an unanswerable question's) is no category


def _categorized():
  """Method "a" on two documents: two names, a number, a quantity and an out-of-scope question; means by hand."""
  return [
      rec("q0", method="a", prediction="Velkor Amsten", references=["Velkor Amsten"], nll=1.0, kl=0.2, tf_em=1.0,
          category="name"),  # f1 1, em 1
      rec("q1", method="a", kind="two_hop", prediction="Tarnow", references=["Tarnow Institute"], nll=3.0, kl=0.6,
          tf_em=0.0, category="name"),  # f1 2/3, em 0
      rec("q2", method="a", doc_id="doc1", prediction="1643", references=["1643"], nll=0.5, kl=0.1, tf_em=1.0,
          category="number"),
      rec("q3", method="a", doc_id="doc1", kind="two_hop", prediction="2 metres", references=["61 centimetres"],
          nll=4.0, kl=1.0, tf_em=0.0, category="quantity"),  # f1 0
      rec("q4", method="a", doc_id="doc1", kind="out_of_scope", prediction="unknown", references=["unknown"]),
  ]


def test_per_category_and_per_kind_means_by_hand():
  rows = agg.aggregate(_categorized(), group_by=("method", "category"))
  assert [(r["category"], r["n"]) for r in rows] == [("number", 1), ("quantity", 1), ("name", 2)]  # CATEGORIES order
  name = only(rows, category="name")
  assert name["nll"]["mean"] == pytest.approx(2.0) and name["kl"]["mean"] == pytest.approx(0.4)
  assert name["tf_em"]["mean"] == pytest.approx(0.5) and name["em"]["mean"] == pytest.approx(0.5)
  assert name["f1"]["mean"] == pytest.approx((1 + 2 / 3) / 2) and name["n_docs"] == 1
  quantity = only(rows, category="quantity")
  assert (quantity["nll"]["mean"], quantity["f1"]["mean"], quantity["tf_em"]["mean"]) == (4.0, 0.0, 0.0)
  assert only(rows, category="number")["em"]["mean"] == 1.0
  for stat in ("nll", "kl", "tf_em", "f1", "em"):
    assert name[stat]["lo"] <= name[stat]["mean"] <= name[stat]["hi"]
  kinds = agg.aggregate(_categorized(), group_by=("kind",))
  assert [(r["kind"], r["n"]) for r in kinds] == [("single", 2), ("two_hop", 2), ("out_of_scope", 1)]
  two_hop = only(kinds, kind="two_hop")
  assert two_hop["nll"]["mean"] == pytest.approx(3.5) and two_hop["f1"]["mean"] == pytest.approx(1 / 3)
  assert only(kinds, kind="out_of_scope")["refusal"]["mean"] == 1.0


def test_templates_groups_in_natural_order():
  records = [rec("q0", world="unseen", templates="unseen"), rec("q1", world="unseen", templates="seen"),
             rec("q2", world="seen", templates="seen"), rec("q3")]
  rows = agg.aggregate(records, group_by=("world", "templates"))
  assert [(r["world"], r["templates"]) for r in rows] == [("seen", "seen"), ("unseen", "seen"), ("unseen", "unseen")]


def test_value_outside_the_bins_is_a_user_error():
  with pytest.raises(UserError, match="outside the bins"):
    agg.aggregate([rec(doc_tokens=9000)], group_by=("length",), bins={"length": (0, 4096)})


@pytest.mark.parametrize("kw, match", [
    ({"group_by": ("method", "model")}, "group-by key"),
    ({"metrics": ("nll", "bleu")}, "unknown metric"),
    ({"bins": {"tokens": (0, 1)}}, "bin key"),
    ({"bins": {"length": (0, 0)}}, "increasing"),
    ({"routing_k": (0,)}, "routing_k"),
])
def test_bad_aggregate_arguments_are_user_errors(kw, match):
  with pytest.raises(UserError, match=match):
    agg.aggregate([rec()], **kw)


def test_metrics_subset():
  row = agg.aggregate([rec(nll=1.0)], metrics=("nll",))[0]
  assert "nll" in row and "f1" not in row and "refusal" in row


# Gates.


def _two_bins(near_gap: float, far_gap: float, n_docs: int = 10):
  """in_context and no_context in a short bin (gap `near_gap`) and a long bin (gap `far_gap`), noisy nll."""
  rng = np.random.default_rng(0)
  records = []
  for tokens, gap in ((100, near_gap), (1000, far_gap)):
    for d in range(n_docs):
      for q in range(4):
        base = 3.0 + rng.normal(scale=0.3)
        for method, nll in (("no_context", base), ("in_context", base - gap + rng.normal(scale=0.05))):
          records.append(rec(f"{tokens}-{d}-{q}", method=method, doc_id=f"{tokens}-{d}", doc_tokens=tokens,
                             nll=nll, evidence=[0]))
  return records


def test_instrument_gate_fires_where_in_context_is_not_clearly_better():
  rows = agg.aggregate(_two_bins(near_gap=0.0, far_gap=1.5), group_by=("method", "dataset", "length"))
  flags = agg.gates(rows)
  assert [f["cell"] for f in flags] == [{"dataset": "d", "length": "[0, 256)"}]
  assert flags[0]["gate"] == "instrument" and "no claim" in flags[0]["reason"]
  # With F1 as the primary metric the two methods tie everywhere (both answer "x" right): both bins flag.
  assert len(agg.gates(rows, primary="f1")) == 2
  # A gap the CI clears but below min_gap still flags.
  assert len(agg.instrument_flags(rows, min_gap=2.0)) == 2


def _cell_rows(metric, ref, base):
  """Hand-made rows of one cell: `ref` and `base` are (mean, lo, hi) for in_context and no_context."""
  def row(method, mean, lo, hi):
    return {"method": method, "dataset": "d", "n_docs": 10, metric: {"mean": mean, "lo": lo, "hi": hi, "n": 40}}
  return [row("in_context", *ref), row("no_context", *base)]


@pytest.mark.parametrize("metric, ref, base, flagged", [
    ("nll", (2.0, 1.8, 2.2), (3.0, 2.8, 3.2), False),
    ("nll", (2.0, 1.0, 3.1), (3.0, 2.8, 3.2), True),  # a big gap, but the CI reaches no_context's mean
    ("nll", (2.97, 2.96, 2.98), (3.0, 2.99, 3.01), True),  # the CI clears it, the gap is under min_gap
    ("nll", (3.5, 3.4, 3.6), (3.0, 2.8, 3.2), True),  # worse
    ("f1", (0.6, 0.5, 0.7), (0.3, 0.2, 0.4), False),
    ("f1", (0.6, 0.25, 0.9), (0.3, 0.2, 0.4), True),
])
def test_instrument_rule(metric, ref, base, flagged):
  assert bool(agg.instrument_flags(_cell_rows(metric, ref, base), primary=metric)) == flagged


def test_instrument_gate_needs_enough_documents():
  rows = agg.aggregate(_two_bins(near_gap=1.5, far_gap=1.5, n_docs=3), group_by=("method", "length"))
  assert agg.instrument_flags(rows, min_documents=3) == []
  flags = agg.instrument_flags(rows, min_documents=4)
  assert len(flags) == 2 and all("only 3 document(s)" in f["reason"] for f in flags)


def test_instrument_gate_says_when_it_cannot_check():
  rows = agg.aggregate([rec(method="doc2atom", nll=1.0)])
  (flag,) = agg.instrument_flags(rows)
  assert rows[0]["n_docs"] == 1
  assert flag["cell"] == {} and "unchecked" in flag["reason"]
  rows = agg.aggregate([rec(method="in_context", nll=1.0), rec(method="no_context")])  # no nll for no_context
  (flag,) = agg.instrument_flags(rows)
  assert "cannot be checked" in flag["reason"]


def test_label_coverage_gate():
  records = [rec(f"q{i}", dataset="qa", evidence=[0] if i == 0 else None) for i in range(4)]
  records += [rec(f"s{i}", dataset="syn", evidence=[i]) for i in range(4)]
  records += [rec("s4", dataset="syn", kind="out_of_scope", references=["unknown"])]  # not counted
  flags = agg.label_flags(agg.aggregate(records))
  assert [(f["dataset"], f["label_coverage"]) for f in flags] == [("qa", 0.25)]
  assert agg.label_flags(agg.aggregate(records), min_label_coverage=0.2) == []
  with pytest.raises(UserError, match="unknown metric"):
    agg.gates(agg.aggregate(records), primary="accuracy")
