"""Answer categories (DESIGN §8, §14): the synthetic generator's labels per attribute, the text rule for real QA."""

import pytest

from doc2atom_jax.data import answers, synthetic
from doc2atom_jax.data.answers import answer_category

# What every attribute's value is, by how the generator makes it.
EXPECTED = {
    "birth_year": "number", "founded_year": "number", "completed_year": "number", "employees": "number",
    "population": "number",
    "height": "quantity", "elevation": "quantity", "length": "quantity", "weight": "quantity",
    "profession": "closed_pool", "field": "closed_pool", "category": "closed_pool",
    "birthplace": "name", "employer": "name", "spouse": "name", "mentor": "name", "award": "name", "language": "name",
    "founder": "name", "headquarters": "name", "director": "name", "event": "name", "country": "name",
    "river": "name", "mayor": "name", "designer": "name", "maker": "name",
}


@pytest.fixture(scope="module", params=synthetic.TEMPLATES)
def questions(request):
  docs = synthetic.generate("validation", 120, seed=5, facts_per_document=(4, 16), two_hop_fraction=0.3,
                            out_of_scope_fraction=0.2, templates=request.param)
  return [q for d in docs for q in d.questions]


def test_every_attribute_has_a_category():
  assert set(EXPECTED) == {a.name for attrs in synthetic.SCHEMA.values() for a in attrs}


def test_generator_labels_follow_the_attribute(questions):
  seen = set()
  for q in questions:
    if q.kind == "out_of_scope":
      assert q.answer_category == "", q
      continue
    attribute = q.attribute.split(">")[-1]  # a two-hop answer is its last fact's value
    assert q.answer_category == EXPECTED[attribute], q
    seen.add((q.kind, q.answer_category))
  assert {c for _, c in seen} == set(answers.CATEGORIES) - {"other"}
  assert ("two_hop", "name") in seen and ("two_hop", "number") in seen


def test_closed_pool_values_come_from_the_fixed_lists(questions):
  pools = set(synthetic._PROFESSIONS) | set(synthetic._FIELDS) | {
      c for categories, _, _ in synthetic._ARTIFACTS.values() for c in categories}
  assert all(q.answer in pools for q in questions if q.answer_category == "closed_pool")


def test_text_rule_agrees_with_the_generator_on_numbers_and_quantities(questions):
  for q in questions:
    if q.answer_category in ("number", "quantity"):
      assert answer_category(q.answer) == q.answer_category, q.answer


def test_a_known_document_is_labelled():
  doc = synthetic.document("train", 0, seed=3, facts_per_document=4)
  assert [(q.answer, q.answer_category) for q in doc.questions][:3] == [
      ("1.6 metres", "quantity"), ("Senti Guild", "name"), ("Faran Nerzanin", "name")]


@pytest.mark.parametrize("text, category", [
    ("1643", "number"), ("12,000", "number"), ("-3.5", "number"), ("5 million", "number"),
    ("61 centimetres", "quantity"), ("1,200 metres", "quantity"), ("3.4 kg", "quantity"), ("50%", "quantity"),
    ("25 percent", "quantity"), ("$5 million", "quantity"), ("3 years", "quantity"), ("1.6 metres.", "quantity"),
    ("Denver Broncos", "other"), ("May 5, 1990", "other"), ("the 1990s", "other"), ("5 per game", "other"),
    ("1990 Olympic Games", "other"), ("architect", "other"),
])
def test_text_rule_on_real_answers(text, category):
  assert answer_category([text]) == category
  assert answer_category(text) == category  # one string is one reference


def test_unanswerable_has_no_category_and_the_generator_label_wins():
  assert answer_category([]) == "" and answer_category(["unknown"]) == "" and answer_category("") == ""
  assert answer_category(["Velkor Amsten"], known="name") == "name"  # the text rule would say other
  assert answer_category(["unknown"], known="name") == ""
  with pytest.raises(ValueError, match="unknown answer category"):
    answer_category(["x"], known="date")


def test_old_questions_construct_without_a_category():
  q = synthetic.Question("q", "Who?", "X", "single", (0,), ("relation",), 0)
  assert q.answer_category == ""
