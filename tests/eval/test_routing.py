"""eval/routing.py on the tiny random model: every method's row, the real select path, a hand-made document, the
reference cosines, and the command line (table, files, bad input)."""

import dataclasses
import json
import math

import numpy as np
import pytest

from configs import tiny
from doc2atom_jax import system as system_lib
from doc2atom_jax.data import synthetic
from doc2atom_jax.errors import UserError
from doc2atom_jax.eval import quick, routing, runner
from tests.cli_helpers import assert_user_error, run_module

RATES = routing.RATES


@pytest.fixture(scope="module")
def system():
  return system_lib.build_system(tiny.get_config())


def test_measure_gives_every_method_with_rates_and_counts(system):
  rows = routing.measure(system, documents=2, sizes=(4,), templates=("seen",))
  print("\n" + routing.format_table(rows))
  assert [r["method"] for r in rows] == list(routing.METHODS)
  docs = [synthetic.document("validation", 20_000 + 4000 + i, facts_per_document=4, questions_per_document=8)
          for i in range(2)]
  kinds = [q.kind for d in docs for q in d.questions]
  for r in rows:
    assert (r["templates"], r["facts"], r["documents"]) == ("seen", 4, 2)
    assert r["questions"] == len(kinds) and r["unlabelled"] == 0
    assert (r["single"], r["two_hop"], r["out_of_scope"]) == tuple(kinds.count(k) for k in synthetic.KINDS)
    for name in RATES:
      assert 0.0 <= r[name] <= 1.0, (r["method"], name, r[name])
    refusals = (r["refusal"], r["false_refusal"])
    if r["method"] == routing.SYSTEM:
      assert all(0.0 <= x <= 1.0 for x in refusals) and r["routing"].startswith("fused")
    else:
      assert all(math.isnan(x) for x in refusals) and "routing" not in r
  table = routing.format_table(rows)
  assert table.count("\n| seen | 4 |") == len(routing.METHODS) and "—" in table


def test_system_order_is_what_select_routes(system):
  """The top 4 the system row reads begins with the k atoms `select` composes (the fused path)."""
  doc = runner.from_synthetic(synthetic.document("validation", 7, facts_per_document=4), "synthetic_seen", "seen")
  ranked = routing.rank_document(system, doc)
  split = system.split(doc.text, doc.doc_id)
  bank = quick.in_memory_bank([system.compile_document(doc.text, doc.doc_id, split)])
  indices, _, abstain = system.select(bank, [q.question for q in doc.questions])
  np.testing.assert_array_equal(abstain, ranked.abstain)
  k = indices.shape[1]
  for b, order in enumerate(ranked.orders[routing.SYSTEM]):
    if not abstain[b]:
      np.testing.assert_array_equal(indices[b], order[:k])
    assert all(len(o[b]) == len(split.atoms) for o in ranked.orders.values())


def _hand_made():
  text = ("Velkor Amsten was born in 1931. Velkor Amsten lived in Kestrava. Velkor Amsten is a glassblower. "
          "Velkor Amsten won the Orlen Prize.")
  spans = ((0, 31), (32, 64), (65, 96), (97, 131))
  asked = [("When was Velkor Amsten born?", "1931", 0), ("Where did Velkor Amsten live?", "Kestrava", 1),
           ("What is Velkor Amsten by profession?", "glassblower", 2), ("Which prize did Velkor Amsten win?",
                                                                        "the Orlen Prize", 3)]
  questions = tuple(runner.EvalQuestion(f"q{i}", q, (a,), "single", (f,)) for i, (q, a, f) in enumerate(asked))
  questions += (runner.EvalQuestion("q4", "Who founded the Brellmoor Institute?", ("unknown",), "out_of_scope"),)
  return runner.EvalDocument("hand", "hand-0", text, questions, 4, "seen", spans)


def test_bm25_with_types_routes_a_hand_made_document(system):
  """Four facts about one name: the answer type tells them apart (the atomizer keeps each sentence whole)."""
  whole = dataclasses.replace(system, method=dataclasses.replace(system.method, max_atom_tokens=256))
  doc = _hand_made()
  ranked = routing.rank_document(whole, doc)
  assert ranked.evidence[:4] == [[(0,)], [(1,)], [(2,)], [(3,)]] and ranked.evidence[4] is None
  row = routing.tally([ranked], "bm25+type")
  assert row["precision_at_1"] == 1.0 and row["recall_at_4"] == 1.0 and math.isnan(row["two_hop_both_at_4"])
  system_row = routing.tally([ranked], routing.SYSTEM)
  assert system_row["refusal"] == 1.0  # the institute is never named: the lexical refusal


def test_two_hop_misses_are_told_apart():
  """Bridge (first fact) and answer (last fact) are counted missed apart: an order reaching only the bridge."""
  orders = [np.asarray([0, 1, 2, 4, 3]), np.asarray([3, 1, 2, 4, 0]), np.asarray([2, 1, 4, 5, 6])]
  ranked = routing.Ranked(["two_hop"] * 3, [[(0,), (3,)]] * 3, {"bm25": orders}, np.zeros(3, bool))
  row = routing.tally([ranked], "bm25")
  assert row["two_hop_both_at_4"] == 0.0
  assert row["bridge_missed"] == pytest.approx(2 / 3) and row["answer_missed"] == pytest.approx(2 / 3)


def test_own_tokens_rank_differently_from_the_template(system):
  """The template-pooled reference is not the own-token one under another name: on some question of tiny
  worlds their top-1 atoms differ."""
  docs = [runner.from_synthetic(synthetic.document("validation", i, facts_per_document=4), "synthetic_seen", "seen")
          for i in range(2)]
  ranked = [routing.rank_document(system, d) for d in docs]
  own, template = "frozen own-token cosine (centred)", "frozen template-pooled cosine"
  assert any(o[0] != t[0] for r in ranked for o, t in zip(r.orders[own], r.orders[template]))


def test_bad_arguments_are_user_errors(system):
  for kwargs in ({"documents": 0}, {"documents": 1, "sizes": (1,)}, {"documents": 1, "templates": ("odd",)}):
    with pytest.raises(UserError):
      routing.measure(system, **kwargs)


def test_command_line_prints_the_table_and_writes_files(tmp_path):
  result = run_module("doc2atom_jax.eval.routing", "--config=configs/tiny.py", "--documents=1", "--sizes=4",
                      f"--workdir={tmp_path}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "| seen | 4 | bm25+type |" in result.stdout and "| unseen | 4 | dense |" in result.stdout
  report = json.loads((tmp_path / "routing.json").read_text())
  assert report["settings"]["documents"] == 1 and report["settings"]["sizes"] == [4]
  assert len(report["rows"]) == 2 * len(routing.METHODS)
  assert "| templates | facts | method |" in (tmp_path / "routing.md").read_text()


@pytest.mark.parametrize("flag, needle", [("--sizes=4,x", "sizes"), ("--documents=0", "documents"),
                                          ("--documents=many", "documents")])
def test_command_line_bad_values_are_one_error_line(flag, needle):
  assert_user_error(run_module("doc2atom_jax.eval.routing", "--config=configs/tiny.py", flag), needle)
