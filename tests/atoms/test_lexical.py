"""Lexical signals: words, BM25 (ranking, exact values, state round trip), names, absent names, RRF, answer types."""

import json
import math

import numpy as np
import pytest

from doc2atom_jax.atoms import lexical
from doc2atom_jax.atoms.atomize import ATOM_TYPES
from doc2atom_jax.atoms.lexical import BM25, absent_names, expected_type, names, reciprocal_rank_fusion, words
from doc2atom_jax.data import synthetic
from doc2atom_jax.errors import UserError

ATOMS = ["Velkor Amsten was born in 1943.", "Mira Oskel was born in 1951.", "Mira Oskel founded the Tarnow Institute.",
         "The Tarnow Institute has 12,400 employees.", "The Tarnow Institute is located in Daskel."]


def test_words_keep_numbers_whole_and_drop_function_words_and_possessives():
  assert words("What is the population of the Tarnow Institute?") == ["population", "tarnow", "institute"]
  assert words("Amsten's lab has 12,400 staff and 3.5 km of halls, since 1943.") == [
      "amsten", "lab", "12,400", "staff", "3.5", "km", "halls", "1943"]
  assert words("In which year was Velkor Amsten born?") == ["year", "velkor", "amsten", "born"]


def test_bm25_ranks_the_atom_with_the_rare_name_first():
  scores = BM25(ATOMS).scores("When was Velkor Amsten born?")
  assert scores.dtype == np.float32 and scores.shape == (5,)
  assert int(np.argmax(scores)) == 0
  assert scores[0] > 2 * scores[1] > 0  # atom 1 shares only "born"; atom 0 also the two rare name words
  assert scores[2] == scores[3] == scores[4] == 0
  tarnow = BM25(ATOMS).scores("How many employees does the Tarnow Institute have?")
  assert int(np.argmax(tarnow)) == 3 and tarnow[2] > 0 and tarnow[4] > 0 and tarnow[0] == tarnow[1] == 0


def test_bm25_matches_the_formula_by_hand():
  bm25 = BM25(["alpha beta", "alpha gamma gamma delta"], k1=1.5, b=0.5)
  # "gamma": df 1 of N=2 -> idf log(1 + 1.5/1.5) = log 2; atom 1: tf 2, length 4, mean length 3.
  norm = 1.5 * (1 - 0.5 + 0.5 * 4 / 3)
  gamma = math.log(2) * 2 * 2.5 / (2 + norm)
  # "alpha": df 2 -> idf log(1 + 0.5/2.5); atom 0: tf 1, length 2.
  alpha0 = math.log(1.2) * 2.5 / (1 + 1.5 * (1 - 0.5 + 0.5 * 2 / 3))
  alpha1 = math.log(1.2) * 2.5 / (1 + norm)
  np.testing.assert_allclose(bm25.scores("gamma alpha alpha"), [alpha0, alpha1 + gamma], rtol=1e-6)
  assert BM25([]).scores("anything").shape == (0,)


def test_bm25_idf_is_over_every_atom_given():
  bank = BM25(ATOMS + ["Daskel lies in Vorland.", "Daskel has a population of 84,000."])
  alone = BM25(ATOMS)
  assert bank.df["daskel"] == 3 and alone.df["daskel"] == 1
  assert bank.idf("daskel") < alone.idf("daskel")


def test_bm25_state_round_trips_through_json_with_identical_scores():
  bm25 = BM25(ATOMS, k1=0.9, b=0.4)
  again = BM25.from_state(json.loads(json.dumps(bm25.state())))
  for q in ("When was Velkor Amsten born?", "Where is the Tarnow Institute?", "12,400 Daskel", "nothing here"):
    np.testing.assert_array_equal(again.scores(q), bm25.scores(q))
  assert (again.k1, again.b, len(again)) == (0.9, 0.4, 5)


def test_a_damaged_bm25_state_is_a_user_error():
  state = BM25(ATOMS).state()
  with pytest.raises(UserError, match="not a BM25 state"):
    BM25.from_state({k: v for k, v in state.items() if k != "counts"})
  with pytest.raises(UserError, match="disagree"):
    BM25.from_state({**state, "lengths": state["lengths"][:-1] + [99]})


def test_names_are_the_capitalised_words_and_numbers_of_a_question():
  assert names("In which year was Velkor Amsten born?") == ["Velkor", "Amsten"]
  assert names("What is the population of the Tarnow Institute?") == ["Tarnow", "Institute"]
  assert names("What is Amsten's height in 1943 with 12,400 or 2 staff?") == ["Amsten", "1943", "12,400"]
  assert names("Velkor Amsten was born when?") == ["Velkor", "Amsten"]  # a two-word opener is a name
  assert names("Compared to Daskel, is Orlen larger?") == ["Daskel", "Orlen"]  # "Compared" is not
  assert names("Who founded it?") == []


def test_new_names_are_what_an_atom_names_beyond_the_question():
  question = "Where was the founder of the Tarnow Institute born?"
  assert lexical.new_names("The Tarnow Institute was founded by Maria Delvane in 1901.", question) == [
      "Maria", "Delvane", "1901"]
  assert lexical.new_names("The TARNOW institute's founder was Maria Delvane.", question) == ["Maria", "Delvane"]
  assert lexical.new_names("It was founded by the Tarnow Institute.", question) == []


def test_absent_names_reads_whole_words_of_the_document():
  doc = "Velkor Amsten's mentor founded the Tarnow Institute in Amstenford. Its staff of 12400 speak Asian tongues."
  assert absent_names("When was Velkor Amsten born?", doc) == []  # possessive "Amsten's" counts
  assert absent_names("Where does velkor AMSTEN live?", doc) == []  # lowercase words are never names
  assert absent_names("Who founded the TARNOW Institute?", doc) == []  # case-insensitive
  assert absent_names("Where was Mira Oskel born?", doc) == ["Mira", "Oskel"]
  assert absent_names("Who founded Amstenf?", doc) == ["Amstenf"]  # a prefix of a word is not the word
  assert absent_names("How old is Velkorsk Amsten?", doc) == ["Velkorsk"]
  assert absent_names("Who studied in Asia?", doc) == []  # "Asian" counts for "Asia"
  assert absent_names("Which firm has 12,400 staff and 880 guests?", doc) == []
  assert absent_names("Which firm has 12,400 staff and 880 guests?", doc, numbers=True) == ["880"]


def test_absent_names_flags_exactly_the_questions_about_an_unnamed_entity():
  flagged_oos = n_oos = 0
  for i in range(20):
    doc = synthetic.document("validation", i, facts_per_document=(4, 16))
    for q in doc.questions:
      absent = absent_names(q.question, doc.text)
      if q.kind != "out_of_scope":
        assert absent == [], q.question
      else:
        n_oos += 1
        flagged_oos += bool(absent)
        assert bool(absent) == (q.subject not in doc.text), q.question
  assert 0 < flagged_oos < n_oos


def test_reciprocal_rank_fusion_orders_and_masks():
  a = np.array([3.0, 2.0, 1.0, 0.0])
  b = np.array([0.0, 5.0, 4.0, 1.0])
  fused = reciprocal_rank_fusion(a, b, k=1)
  np.testing.assert_allclose(fused, [1 / 2 + 1 / 5, 1 / 3 + 1 / 2, 1 / 4 + 1 / 3, 1 / 5 + 1 / 4])
  assert list(np.argsort(-fused)) == [1, 0, 2, 3]
  masked = reciprocal_rank_fusion(a, b, k=1, mask=[True, False, True, True])
  assert masked[1] == -np.inf
  np.testing.assert_allclose(masked[[0, 2, 3]], [1 / 2 + 1 / 4, 1 / 3 + 1 / 2, 1 / 4 + 1 / 3])  # ranks among kept


def test_reciprocal_rank_fusion_ties_share_a_rank_and_nan_ranks_last():
  fused = reciprocal_rank_fusion(np.array([0.0, 2.0, 0.0, np.nan, 0.0]), k=0)
  np.testing.assert_allclose(fused, [1 / 2, 1, 1 / 2, 1 / 5, 1 / 2])
  with pytest.raises(ValueError):
    reciprocal_rank_fusion(np.zeros(3), np.zeros(4))
  with pytest.raises(ValueError):
    reciprocal_rank_fusion()


@pytest.mark.parametrize("question, expected", [
    ("What year did the Berlin Wall fall?", "temporal"),
    ("On what date was the treaty of Orlen signed?", "temporal"),
    ("In what century was the castle built?", "temporal"),
    ("How long ago did the dam collapse?", "temporal"),
    ("How old was Marie Curie when she died?", "quantity"),
    ("How far is Daskel from the coast?", "quantity"),
    ("What was the average annual rainfall in Daskel?", "quantity"),
    ("What is Amsten's weight?", "quantity"),
    ("Which university did Mira Oskel attend?", "relation"),
    ("What is the capital of Vorland?", "relation"),
    ("Velkor Amsten works for which company?", "relation"),
    ("What is the name of Amsten's wife?", "relation"),
    ("Who did Ada Lovelace collaborate with?", "relation"),
    ("Who was Ada Lovelace?", "definition"),
    ("What is Velkor Amsten known for?", "definition"),
    ("What is the occupation of Mira Oskel?", "definition"),
    ("What sort of instrument is a theorbo?", "definition"),
    ("What did Mira Oskel win in 1988?", "event"),
    ("What happened at the Halden Congress?", "event"),
    ("What language is spoken in Vorland?", "other"),
    ("What is the weather like in Daskel?", None),
    ("Is Daskel larger than Orlen?", None),
])
def test_expected_type_on_natural_questions(question, expected):
  assert expected_type(question) == expected
  assert expected is None or expected in ATOM_TYPES


def test_measure_on_small_synthetic_worlds():
  m = lexical.measure(n_documents=20, facts=(4, 8))
  assert m["single_questions"] > 50 and m["two_hop_questions"] > 10 and m["out_of_scope_questions"] > 10
  assert m["bm25_r4"] >= 0.85
  assert 0.3 <= m["bm25_p1"] <= m["type_oracle_p1"] <= 1.0
  assert m["answerable_flagged"] == 0.0
  assert m["oos_flagged"] >= 0.3
  assert m["expected_type_coverage"] >= 0.9 and m["expected_type_accuracy"] >= 0.9
  assert m["two_hop_bridge_r4"] >= m["two_hop_both_top4"]
