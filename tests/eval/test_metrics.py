"""Answer metrics: SQuAD normalization, EM, token F1, ROUGE-L and refusals, against hand-computed values."""

import pytest

from doc2atom_jax.eval.metrics import (exact_match, f1_score, is_refusal, is_unanswerable, normalize_answer,
                                       rouge_l)


@pytest.mark.parametrize("text, expected", [
    ("The Cat", "cat"),
    ("  a   cat,  sat!  ", "cat sat"),
    ("An apple's core.", "apples core"),
    ("theatre", "theatre"),  # articles go only as whole words
    ("Paris, France", "paris france"),
    ("", ""),
])
def test_normalize_answer(text, expected):
  assert normalize_answer(text) == expected


def test_exact_match_ignores_case_punctuation_and_articles():
  assert exact_match("the cat", ["a cat"]) == 1.0
  assert exact_match("The Cat!", ["cat"]) == 1.0
  assert exact_match("cats", ["cat"]) == 0.0


def test_exact_match_takes_the_best_reference():
  assert exact_match("Denver Broncos", ["Broncos", "Denver Broncos"]) == 1.0
  assert exact_match("Broncos", ["Denver Broncos", "Carolina Panthers"]) == 0.0


@pytest.mark.parametrize("prediction, references, expected", [
    # [big, cat, sat] vs [cat, sat, down]: 2 shared; P = R = 2/3.
    ("the big cat sat", ["a cat sat down"], 2 / 3),
    # [paris, france] vs [paris]: P = 1/2, R = 1 -> F1 = 2 * 1/2 / (3/2) = 2/3.
    ("Paris, France", ["Paris"], 2 / 3),
    # [1990] vs [in, 1990]: P = 1, R = 1/2 -> 2/3.
    ("1990", ["in 1990"], 2 / 3),
    # Repeated tokens count once per occurrence: [x, x, y] vs [x, y, y] share one x and one y; P = R = 2/3.
    ("x x y", ["x y y"], 2 / 3),
    # [denver, broncos, won] vs [broncos]: P = 1/3, R = 1 -> 2 * 1/3 / (4/3) = 1/2; best over references.
    ("Denver Broncos won", ["Broncos", "Carolina Panthers"], 0.5),
    ("blue", ["red"], 0.0),
    ("the cat", ["a cat"], 1.0),
])
def test_f1_hand_computed(prediction, references, expected):
  assert f1_score(prediction, references) == pytest.approx(expected)


def test_f1_when_one_side_normalizes_to_nothing():
  # As in the official script: both empty after normalization is a match, one empty is not.
  assert f1_score("the", ["a"]) == 1.0
  assert f1_score("the", ["cat"]) == 0.0
  assert f1_score("cat", ["the"]) == 0.0


@pytest.mark.parametrize("prediction, references, expected", [
    # [police, kill, gunman] vs [police, killed, gunman]: LCS 2 (police .. gunman); P = R = 2/3.
    ("police kill the gunman", ["police killed the gunman"], 2 / 3),
    # Order matters, unlike F1: [gunman, police, killed] vs [police, killed, gunman]: LCS 2 (police killed).
    ("the gunman police killed", ["police killed the gunman"], 2 / 3),
    # [w, x, y, z] vs [x, q, z]: LCS 2 (x z); P = 1/2, R = 2/3 -> 2 * (1/3) / (7/6) = 4/7.
    ("w x y z", ["x q z"], 4 / 7),
    ("w x y z", ["x q z", "w x y z"], 1.0),
    ("alpha", ["beta"], 0.0),
])
def test_rouge_l_hand_computed(prediction, references, expected):
  assert rouge_l(prediction, references) == pytest.approx(expected)


def test_rouge_l_and_f1_differ_on_order():
  assert f1_score("y x", ["x y"]) == 1.0
  assert rouge_l("y x", ["x y"]) == pytest.approx(0.5)  # LCS 1 of 2 tokens each side


@pytest.mark.parametrize("text", [
    "", "   ", ".", "Unknown", "unknown.", "I don't know", "I do not know.", "i dont know",
    "It cannot be determined from the text.", "Not mentioned", "The passage does not mention it.",
    "No answer", "Unanswerable", "N/A", "There is not enough information to answer.",
])
def test_refusals(text):
  assert is_refusal(text)


@pytest.mark.parametrize("text", [
    "Paris", "Unknown Soldier", "the unknown variable x", "none", "no", "1990", "Known unknowns",
])
def test_answers_are_not_refusals(text):
  assert not is_refusal(text)


@pytest.mark.parametrize("metric", [exact_match, f1_score, rouge_l])
def test_unanswerable_scores_refusals_only(metric):
  # SQuAD v2 unanswerables: no references; declining (empty or a refusal phrase) is the right answer.
  assert metric("", []) == 1.0
  assert metric("I don't know.", []) == 1.0
  assert metric("unknown", []) == 1.0
  assert metric("Melbourne", []) == 0.0


@pytest.mark.parametrize("metric", [exact_match, f1_score, rouge_l])
def test_a_refusal_reference_accepts_any_refusal(metric):
  # The synthetic corpus answers out-of-scope questions with "unknown".
  assert metric("I don't know.", ["unknown"]) == 1.0
  assert metric("", ["Unknown"]) == 1.0
  assert metric("Melbourne", ["unknown"]) == 0.0


def test_is_unanswerable():
  assert is_unanswerable([]) and is_unanswerable(["unknown"]) and is_unanswerable(["unknown", "No answer"])
  assert not is_unanswerable(["Melbourne"]) and not is_unanswerable(["unknown", "Melbourne"])


def test_refusal_on_an_answerable_question_scores_zero():
  assert exact_match("I don't know", ["Melbourne"]) == 0.0
  assert f1_score("", ["Melbourne"]) == 0.0
  assert rouge_l("unknown", ["Melbourne"]) == 0.0


@pytest.mark.parametrize("metric", [exact_match, f1_score, rouge_l])
def test_a_bare_string_is_not_a_reference_list(metric):
  with pytest.raises(TypeError):
    metric("cat", "cat")


def test_routing_precision_and_recall_at_k():
  from doc2atom_jax.eval.metrics import precision_at_k, recall_at_k  # pylint: disable=import-outside-toplevel
  routed = [5, 2, 7, 2]
  assert (precision_at_k(routed, [2], 1), recall_at_k(routed, [2], 1)) == (0.0, 0.0)
  assert (precision_at_k(routed, [2], 2), recall_at_k(routed, [2], 2)) == (0.5, 1.0)
  assert (precision_at_k(routed, [2, 9], 4), recall_at_k(routed, [2, 9], 4)) == (0.25, 0.5)  # 2 counts once
  assert precision_at_k([], [1], 3) == 0.0  # routing nothing (an abstention) is a miss, not missing
  assert precision_at_k(routed, None, 1) is None and recall_at_k(routed, [], 1) is None  # unlabelled
  assert recall_at_k(None, [1], 1) is None  # no router
  with pytest.raises(ValueError):
    precision_at_k(routed, [1], 0)
