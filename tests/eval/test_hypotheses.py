"""v2's H1-H7 decisions (eval/hypotheses.py) on records built with known answers: a method whose NLL grows and
whose tf_em falls by a set amount per doubling of facts, exact paired offsets, refusals and routings set per
question. No model. The report built on them: tests/test_experiment_report.py."""

import math

import numpy as np
import pytest

from doc2atom_jax.eval import aggregate as agg
from doc2atom_jax.eval import hypotheses as hyp

SIZES = (4, 8, 16, 32, 64)
KINDS = ("single", "single", "two_hop", "out_of_scope")
CATEGORY = {0: "closed_pool", 1: "number", 2: "name"}  # by question index; out-of-scope has none
ALL = ("no_context", "in_context", "doc2atom", "doc2atom_oracle", "rag_atoms", "d2l", "d2l_256", "d2l_atom")


def jitter(doc: int, q: int) -> float:
  """The same small per-question offset for every method: it cancels in a paired difference."""
  return 0.01 * ((doc * 7 + q * 3) % 5)


def nll_model(method: str, facts: int, doc: int, q: int) -> float:
  """Per method: a base level, a growth per doubling of facts, and the question's jitter."""
  base, growth = {"no_context": (6.0, 0.0), "in_context": (1.0, 0.0), "doc2atom": (2.0, 0.05),
                  "doc2atom_oracle": (1.5, 0.05), "rag_atoms": (2.5, 0.05), "d2l": (2.0, 0.5),
                  "d2l_256": (2.0, 0.3), "d2l_atom": (3.0, 0.05)}[method]
  return base + growth * math.log2(facts / 4) + jitter(doc, q)


def tf_em_model(method: str, facts: int, doc: int, q: int) -> float:
  """Per method: a base level and a fall per doubling of facts (tf_em: higher is better)."""
  base, fall = {"no_context": (0.0, 0.0), "in_context": (0.8, 0.0), "doc2atom": (0.6, 0.02),
                "doc2atom_oracle": (0.7, 0.02), "rag_atoms": (0.5, 0.02), "d2l": (0.6, 0.1), "d2l_256": (0.6, 0.06),
                "d2l_atom": (0.4, 0.02)}[method]
  return base - fall * math.log2(facts / 4) + jitter(doc, q)


def make_records(methods=ALL, docs: int = 5, sizes=SIZES, dataset=hyp.UNSEEN, nll=nll_model, tf_em=tf_em_model,
                 doc_prefix: str | None = None, doc_suffix: str = "") -> list:
  out = []
  for method in methods:
    for facts in sizes:
      for d in range(docs):
        for q, kind in enumerate(KINDS):
          answerable = kind != "out_of_scope"
          refuses = (not answerable and method == "doc2atom") or (answerable and method == "doc2atom" and q == 0
                                                                   and d == 0 and facts == 4)
          out.append(agg.QuestionRecord(
              method=method, dataset=dataset, doc_id=f"{doc_prefix or dataset}-{facts}-{d}{doc_suffix}", qid=f"q{q}",
              kind=kind, answerable=answerable, prediction="unknown" if refuses else "Paris",
              references=("Paris",) if answerable else (), nll=nll(method, facts, d, q) if answerable else None,
              tf_em=tf_em(method, facts, d, q) if answerable else None, kl=0.5 if answerable else None,
              doc_tokens=20 * facts, facts=facts, world="seen" if dataset == "synthetic_seen" else "unseen",
              routed=(0, 1, 2, 3) if method in ("doc2atom", "rag_atoms", "doc2atom_oracle") else None,
              evidence=(0,) if answerable else None, category=CATEGORY.get(q) if answerable else None))
  return out


def replace(records, **fields):
  """The records with `fields` set where `fields["where"](record)` holds (e.g. an exact paired offset)."""
  where = fields.pop("where")
  return [agg.QuestionRecord.from_json({**r.to_json(), **{k: f(r) for k, f in fields.items()}}) if where(r) else r
          for r in records]


# The paired rule.


def stat(mean, lo, hi, n=10):
  return {"mean": mean, "lo": lo, "hi": hi, "n": n}


@pytest.mark.parametrize("diff, better, want", [
    (stat(-0.5, -0.6, -0.4), "lower", hyp.BETTER),
    (stat(-0.5, -0.6, -0.4), "higher", hyp.WORSE),
    (stat(0.5, 0.4, 0.6), "lower", hyp.WORSE),
    (stat(0.5, 0.4, 0.6), "higher", hyp.BETTER),
    (stat(-0.1, -0.3, 0.1), "lower", hyp.TIED),
    (stat(-0.1, -0.3, 0.0), "lower", hyp.TIED),  # "lies below 0" is strict
    (stat(0.0, 0.0, 0.0, n=0), "lower", hyp.MISSING),
    (stat(math.nan, math.nan, math.nan), "higher", hyp.MISSING),
])
def test_paired_order(diff, better, want):
  assert hyp.paired_order(diff, better) == want


def test_paired_order_needs_a_direction():
  with pytest.raises(ValueError, match="better"):
    hyp.paired_order(stat(1, 0, 2), "smaller")


def test_paired_difference_three_outcomes_and_filters():
  records = make_records(methods=("doc2atom", "d2l_atom"), nll=lambda m, f, d, q: 2.0 + jitter(d, q))
  # doc2atom 0.3 lower on every closed-pool answer; on numbers +-0.2 by document (mean -0.04, CI across 0);
  # 0.4 higher on two-hop (name) answers.
  offset = {"closed_pool": lambda r: -0.3, "number": lambda r: 0.2 if int(r.doc_id[-1]) % 2 else -0.2,
            "name": lambda r: 0.4}
  records = replace(records, nll=lambda r: r.nll + offset[r.category](r),
                    where=lambda r: r.method == "doc2atom" and r.answerable)
  diff = lambda **kw: hyp.paired_difference(records, "doc2atom", "d2l_atom", "nll", n_resamples=300, **kw)
  lower = diff(categories={"closed_pool"})
  assert lower["mean"] == pytest.approx(-0.3) and lower["n"] == 5 * 5 and lower["n_docs"] == 25
  assert hyp.paired_order(lower, "lower") == hyp.BETTER
  assert hyp.paired_order(diff(kind="two_hop"), "lower") == hyp.WORSE
  tied = diff(categories={"number"})
  assert tied["mean"] == pytest.approx(0.2 * (10 - 15) / 25) and hyp.paired_order(tied) == hyp.TIED
  at_32 = diff(facts=32, categories={"closed_pool", "name"})
  assert at_32["n"] == 5 * 2 and at_32["mean"] == pytest.approx(0.05)
  assert diff(facts=128)["n"] == 0 and hyp.paired_order(diff(facts=128)) == hyp.MISSING


def test_v1_rule_is_ci_overlap():
  a, b = stat(1, 0.9, 1.1), stat(2, 1.8, 2.2)
  assert hyp.order(a, b) == "lower" and hyp.order(b, a) == "higher"
  assert hyp.order(stat(1, 0.9, 1.9), b) == "overlap" and hyp.order(stat(1, 0.9, 1.1, n=0), b) == hyp.MISSING
  assert hyp.ci_decision("lower") == hyp.SUPPORTED and hyp.ci_decision("lower", "higher") == hyp.NOT_SUPPORTED
  assert hyp.ci_decision("overlap") == hyp.INCONCLUSIVE and hyp.ci_decision(hyp.MISSING) == hyp.NOT_MEASURED


# H1.


def test_slope_is_the_change_per_doubling():
  assert hyp.slope([4, 8, 16, 32, 64], [1.0, 1.5, 2.0, 2.5, 3.0]) == pytest.approx(0.5)
  assert math.isnan(hyp.slope([8], [1.0]))


def test_h1_rule():
  assert hyp.h1_decision(0.1, 0.5, [hyp.BETTER, hyp.BETTER]) == hyp.SUPPORTED
  assert hyp.h1_decision(0.1, 0.5, [hyp.BETTER, hyp.TIED]) == hyp.INCONCLUSIVE
  assert hyp.h1_decision(0.5, 0.5, [hyp.BETTER, hyp.BETTER]) == hyp.NOT_SUPPORTED  # a flatter slope is required
  assert hyp.h1_decision(0.1, 0.5, [hyp.BETTER, hyp.MISSING]) == hyp.NOT_MEASURED
  # tf_em: flatter is a larger (less negative) slope.
  assert hyp.h1_decision(-0.02, -0.1, [hyp.BETTER, hyp.BETTER], better="higher") == hyp.SUPPORTED
  assert hyp.h1_decision(-0.1, -0.02, [hyp.BETTER, hyp.BETTER], better="higher") == hyp.NOT_SUPPORTED


def test_interference_recovers_each_methods_growth():
  curves = hyp.interference(make_records(), ["doc2atom", "d2l"], n_resamples=200)
  assert curves["doc2atom"]["facts"] == list(SIZES)
  assert curves["doc2atom"]["slope"] == pytest.approx(0.05, abs=0.01)
  assert curves["d2l"]["slope"] == pytest.approx(0.5, abs=0.01)
  lo, hi = curves["d2l"]["slope_ci"]
  assert lo <= curves["d2l"]["slope"] <= hi and hi - lo < 0.05
  assert curves["doc2atom"]["stats"][64]["n"] == 5 * 3  # answerable questions of the 64-fact worlds
  tf_em = hyp.interference(make_records(), ["d2l"], metric="tf_em", n_resamples=200)
  assert tf_em["d2l"]["slope"] == pytest.approx(-0.1, abs=0.01)


H1_TF_EM = ("no_context", "in_context", "doc2atom", "d2l")


def test_h1_on_tf_em_supported():
  decisions = hyp.decide(make_records(methods=H1_TF_EM), baselines=("d2l",), n_resamples=200)
  d = decisions["H1 tf_em vs d2l"]
  assert d["decision"] == hyp.SUPPORTED and d["numbers"]["flatter"]
  assert d["numbers"]["at 64"]["paired difference"]["mean"] == pytest.approx(0.08 * 4)
  assert d["numbers"]["at 64"]["paired"] == hyp.BETTER
  assert decisions["H1 NLL vs d2l"]["decision"] == hyp.SUPPORTED


def test_h1_on_tf_em_not_supported_when_steeper():
  swap = {"doc2atom": "d2l", "d2l": "doc2atom"}
  steeper = lambda m, f, d, q: tf_em_model(swap.get(m, m), f, d, q)
  decisions = hyp.decide(make_records(methods=H1_TF_EM, tf_em=steeper), baselines=("d2l",), n_resamples=200)
  assert decisions["H1 tf_em vs d2l"]["decision"] == hyp.NOT_SUPPORTED
  assert decisions["H1 NLL vs d2l"]["decision"] == hyp.SUPPORTED  # NLL unchanged: the two are decided apart


def test_h1_on_tf_em_inconclusive_when_flatter_but_not_better():
  # doc2atom flat at d2l's 64-fact level (0.2); d2l from 0.6 down 0.1 a doubling: 0.3 at 32 facts (doc2atom
  # worse), the same at 64 (tied).
  flat_low = lambda m, f, d, q: tf_em_model("d2l" if m == "doc2atom" else m, 64 if m == "doc2atom" else f, d, q)
  decisions = hyp.decide(make_records(methods=H1_TF_EM, tf_em=flat_low), baselines=("d2l",), n_resamples=200)
  n = decisions["H1 tf_em vs d2l"]["numbers"]
  assert n["flatter"] and n["at 32"]["paired"] == hyp.WORSE and n["at 64"]["paired"] == hyp.TIED
  assert decisions["H1 tf_em vs d2l"]["decision"] == hyp.INCONCLUSIVE
  assert n[hyp.V1_RULE]["at 32"] == "lower"  # v1's reading beside it: doc2atom's tf_em CI below d2l's


def test_decide_on_known_records():
  decisions = hyp.decide(make_records(), n_resamples=200)
  for name in ("H1 NLL vs d2l", "H1 tf_em vs d2l", "H1 NLL vs d2l_256", "H1 tf_em vs d2l_256", "H2", "H3a", "H3b"):
    assert decisions[name]["decision"] == hyp.SUPPORTED, name
  assert decisions["H1 NLL vs d2l"]["numbers"][hyp.V1_RULE]["decision"] == hyp.SUPPORTED
  diff = decisions["H3b"]["numbers"]["nll"]["paired difference"]
  assert diff["mean"] == pytest.approx(-0.5) and diff["lo"] == pytest.approx(-0.5) and diff["n"] == 5 * 5 * 3
  assert decisions["H3b"]["numbers"]["tf_em"]["paired"] == hyp.BETTER  # the oracle's tf_em is 0.1 higher
  assert decisions["H3a"]["numbers"]["tf_em"]["paired difference"]["mean"] == pytest.approx(0.2)
  # doc2atom refuses every out-of-scope question and 1 of 75 answerable ones.
  assert decisions["H4"]["numbers"]["refusal"]["mean"] == 1.0
  assert decisions["H4"]["numbers"]["false_refusal"]["mean"] == pytest.approx(1 / 75)
  assert decisions["H4"]["decision"] == hyp.SUPPORTED
  assert decisions["H5"]["decision"] == "NLL: doc2atom better; tf_em: doc2atom better"
  assert decisions["H5"]["numbers"]["nll"]["paired difference"]["mean"] == pytest.approx(-0.5)
  assert decisions["H6"]["decision"] == hyp.NOT_SUPPORTED  # in_context's tf_em is 0.26 / 0.28 higher
  assert decisions["H7"]["decision"] == hyp.SUPPORTED  # every top atom is the evidence
  assert all(d["gate"] == [] for d in decisions.values())  # in_context beats no_context by 5 nats, 5 docs a cell


def test_flatter_baseline_and_a_gated_cell():
  swap = {"doc2atom": "d2l", "d2l": "doc2atom"}
  flat = lambda m, f, d, q: nll_model(swap.get(m, m), f, d, q)
  decisions = hyp.decide(make_records(nll=flat, docs=4), n_resamples=200)
  assert decisions["H1 NLL vs d2l"]["decision"] == hyp.NOT_SUPPORTED
  assert decisions["H2"]["decision"] == hyp.NOT_SUPPORTED
  # 4 worlds a size: every facts cell has too few documents for the instrument gate, so no claim on H1.
  assert any("too few" in g for g in decisions["H1 NLL vs d2l"]["gate"])
  assert any("too few" in g for g in decisions["H7"]["gate"])
  assert decisions["H3a"]["gate"] == []  # pooled, 20 documents


def test_h2_tied_is_inconclusive():
  # d2l's two-hop NLL equal to doc2atom's on average, +-0.3 by document: the paired CI spans 0.
  level = lambda m, f, d, q: nll_model(m, f, d, q) if m != "d2l" or q != 2 else (
      nll_model("doc2atom", f, d, q) + (0.3 if d % 2 else -0.3) * (1 if f in (4, 16, 64) else -1))
  decisions = hyp.decide(make_records(methods=H1_TF_EM, nll=level), baselines=(), n_resamples=300)
  assert decisions["H2"]["numbers"]["nll"]["paired"] == hyp.TIED
  assert decisions["H2"]["decision"] == hyp.INCONCLUSIVE


# H4.


@pytest.mark.parametrize("refused_q1_docs, v2, v1", [
    ((), hyp.SUPPORTED, hyp.SUPPORTED),  # 1 of 75 answerable refused (1.3%)
    ((0,), hyp.NOT_SUPPORTED, hyp.SUPPORTED),  # 6 of 75 (8%): above v2's 5%, within v1's 10%
    ((0, 1, 2, 3, 4), hyp.NOT_SUPPORTED, hyp.NOT_SUPPORTED),  # 26 of 75
])
def test_h4_thresholds(refused_q1_docs, v2, v1):
  records = replace(make_records(methods=("no_context", "in_context", "doc2atom")), prediction=lambda r: "unknown",
                    where=lambda r: r.method == "doc2atom" and r.qid == "q1" and int(r.doc_id[-1]) in refused_q1_docs)
  decisions = hyp.decide(records, n_resamples=200)
  assert decisions["H4"]["decision"] == v2
  assert decisions["H4"]["numbers"]["v1 thresholds (80% / 10%)"] == v1
  assert "H1 NLL vs d2l" not in decisions and "H2" not in decisions  # d2l was not evaluated: nothing decided


# H6.


@pytest.mark.parametrize("at_32, at_64, want", [
    (stat(0.0, -0.03, 0.03), stat(0.02, -0.01, 0.05), hyp.SUPPORTED),
    (stat(-0.03, -0.04, -0.02), stat(0.0, -0.03, 0.03), hyp.NOT_SUPPORTED),  # within the margin, but below 0
    (stat(-0.03, -0.06, 0.01), stat(0.0, -0.03, 0.03), hyp.INCONCLUSIVE),  # point below 0, CI spans it
    (stat(0.01, -0.07, 0.09), stat(0.0, -0.03, 0.03), hyp.INCONCLUSIVE),  # CI's lower end beyond the margin
    (stat(0.0, -0.05, 0.05), stat(0.0, -0.03, 0.03), hyp.INCONCLUSIVE),  # "above -0.05" is strict
    (stat(0.1, 0.05, 0.15), stat(-0.2, -0.3, -0.1), hyp.NOT_SUPPORTED),  # one size lost decides
    (stat(0.0, -0.03, 0.03), stat(math.nan, math.nan, math.nan, n=0), hyp.NOT_MEASURED),
])
def test_h6_rule(at_32, at_64, want):
  assert hyp.h6_decision([at_32, at_64]) == want


def h6_records(offset):
  """doc2atom / in_context at 32 and 64 facts; doc2atom's tf_em is in_context's + offset(facts, doc) on
  closed-pool and number answers and 0.5 below it on names (which H6 leaves out)."""
  records = make_records(methods=("no_context", "in_context", "doc2atom"), sizes=(32, 64),
                         tf_em=lambda m, f, d, q: 0.5 + jitter(d, q))
  shift = lambda r: offset(r.facts, int(r.doc_id[-1])) if r.category in hyp.H6_CATEGORIES else -0.5
  return replace(records, tf_em=lambda r: r.tf_em + shift(r), where=lambda r: r.method == "doc2atom" and r.answerable)


def test_h6_on_records():
  decide = lambda offset: hyp.decide(h6_records(offset), n_resamples=300)["H6"]
  tight = decide(lambda f, d: -0.03)  # 3 points worse everywhere: inside the margin, but the CI lies below 0
  assert tight["numbers"]["at 32"]["paired difference"]["mean"] == pytest.approx(-0.03)
  assert tight["numbers"]["at 32"]["paired difference"]["n"] == 5 * 2  # names left out
  assert tight["decision"] == hyp.NOT_SUPPORTED
  assert decide(lambda f, d: 0.0)["decision"] == hyp.SUPPORTED  # level with in_context
  spread = decide(lambda f, d: (-0.2, 0.1, 0.0, -0.1, 0.05)[d])  # mean -0.03, CI across 0
  assert spread["numbers"]["at 64"]["paired difference"]["mean"] == pytest.approx(-0.03)
  assert spread["decision"] == hyp.INCONCLUSIVE
  assert spread["numbers"]["at 32"]["doc2atom"]["mean"] == pytest.approx(
      spread["numbers"]["at 32"]["in_context"]["mean"] - 0.03)
  assert decide(lambda f, d: 0.2 if f == 32 else -0.2)["decision"] == hyp.NOT_SUPPORTED


# H7.


def h7_records(misses: dict[int, int], sizes=SIZES, docs: int = 25):
  """doc2atom on `docs` worlds a size, 2 single-fact questions each (50 a size): `misses[size]` of them route
  another atom first (the first one abstains), the rest put the evidence first."""
  out = []
  for f in sizes:
    for d in range(docs):
      for q in range(2):
        i = 2 * d + q
        miss = i < misses.get(f, 0)
        out.append(agg.QuestionRecord(
            method="doc2atom", dataset=hyp.UNSEEN, doc_id=f"u-{f}-{d}", qid=f"q{q}", kind="single", answerable=True,
            prediction="x", references=("x",), nll=1.0, facts=f, world="unseen", routed=(5, 1, 2, 3) if miss else
            (1, 0, 2, 3), evidence=(1,), abstained=miss and i == 0, category="name"))
  return out


def test_h7_precision_and_recall():
  per_size = hyp.router_precision(h7_records({16: 3}), n_resamples=300)
  assert sorted(per_size) == list(SIZES)
  assert per_size[16]["precision@1"]["mean"] == pytest.approx(0.94) and per_size[16]["questions"] == 50
  assert per_size[16]["recall@4"]["mean"] == pytest.approx(49 / 50)  # the abstention routes no atom at all
  lo, hi = per_size[16]["precision@1"]["lo"], per_size[16]["precision@1"]["hi"]
  assert lo < 0.94 < hi and per_size[4]["precision@1"]["mean"] == 1.0 and per_size[4]["documents"] == 25


@pytest.mark.parametrize("misses, sizes, want", [
    ({}, SIZES, hyp.SUPPORTED),
    ({64: 2}, SIZES, hyp.SUPPORTED),  # 0.96
    ({16: 3}, SIZES, hyp.NOT_SUPPORTED),  # 0.94 at one size
    ({}, (4, 8, 16, 32), hyp.NOT_MEASURED),  # no 64-fact worlds
])
def test_h7_rule(misses, sizes, want):
  assert hyp.h7_decision(hyp.router_precision(h7_records(misses, sizes), n_resamples=100)) == want


def test_h7_in_decide_with_bank_scale_beside():
  bank = {"settings": {"documents": 50, "sizes": [4, 8]}, "rows": [
      {"templates": "seen", "setting": "per_document", "documents": 250, "precision_at_1": 0.97, "recall_at_4": 0.99,
       "wrong_document_at_1": 0.0, "tf_em_doc2atom": 0.3},
      {"templates": "seen", "setting": "bank", "documents": 250, "precision_at_1": 0.81, "recall_at_4": None}]}
  decisions = hyp.decide(h7_records({16: 3}, sizes=(4, 8, 16, 32)), baselines=(), n_resamples=100, bank=bank)
  h7 = decisions["H7"]
  assert h7["decision"] == hyp.NOT_MEASURED and h7["numbers"]["missing sizes"] == [64]
  beside = h7["numbers"]["bank scale"]
  assert beside["seen / bank"]["precision_at_1"] == 0.81 and math.isnan(beside["seen / bank"]["recall_at_4"])
  assert beside["seen / per_document"] == {"precision_at_1": 0.97, "recall_at_4": 0.99, "wrong_document_at_1": 0.0}
  assert hyp.decide(h7_records({}), baselines=(), n_resamples=100)["H7"]["numbers"]["bank scale"] is None


def test_bank_rows_reads_either_schema():
  nested = {"documents": 250, "per_document": {"precision_at_1": 0.9, "questions": 2000},
            "bank": {"precision_at_1": 0.7, "note": "text", "flag": True},
            "shared_entity": {"questions": 12, "bank": {"precision_at_1": None, "recall_at_4": 0.5}},
            "settings": {"documents": 50}}
  assert hyp.bank_rows(nested) == {"per_document": {"precision_at_1": 0.9, "questions": 2000.0},
                                   "bank": {"precision_at_1": 0.7}, "shared_entity": {"questions": 12.0},
                                   "shared_entity / bank": {"precision_at_1": pytest.approx(np.nan, nan_ok=True),
                                                            "recall_at_4": 0.5}}
  assert hyp.bank_rows(None) == {} and hyp.bank_rows([1, 2]) == {} and hyp.bank_rows({"rows": "x"}) == {}


# The held-out wording.


def test_wording_gap_pairs_the_same_worlds_questions():
  trained = make_records(methods=("doc2atom",), docs=3, doc_prefix="w")
  held_out = make_records(methods=("doc2atom",), docs=3, dataset=hyp.HELD_OUT_WORDING, doc_prefix="w",
                          doc_suffix="-unseen", nll=lambda m, f, d, q: nll_model(m, f, d, q) + 0.3 * (d + 1))
  gap = hyp.wording_gap(trained + held_out, "doc2atom", "nll", n_resamples=200)
  assert gap["n"] == 5 * 3 * 3 and gap["n_docs"] == 15
  assert gap["mean"] == pytest.approx(0.6) and gap["lo"] < 0.6 < gap["hi"]
  assert hyp.wording_gap(trained + held_out, "doc2atom", "tf_em", n_resamples=200)["mean"] == pytest.approx(0.0)
