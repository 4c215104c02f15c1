"""Answer prefixes of the synthetic worlds (DESIGN §2.7) and the held-out statement/question templates."""

import collections
import hashlib
import json
import re

import pytest

from doc2atom_jax.atoms.atomize import check_tiling, classify, split_sentences
from doc2atom_jax.data import qa, synthetic
from doc2atom_jax.data.synthetic import NUM_PARAPHRASES, SCHEMA, document, generate
from doc2atom_jax.errors import UserError
from doc2atom_jax.models.tiny import byte_tokenizer

ATTRIBUTES = [a for attrs in SCHEMA.values() for a in attrs]
_FIELD = re.compile(r"\{\w+\}")


@pytest.fixture(scope="module", params=synthetic.TEMPLATES)
def docs(request):
  return generate("train", 200, facts_per_document=(4, 24), seed=1, two_hop_fraction=0.3, out_of_scope_fraction=0.3,
                  templates=request.param)


def _core(doc) -> list:
  """Everything a document held before prefixes and templates existed."""
  return [doc.doc_id, doc.text, [list(span) for span in doc.fact_spans],
          [[f.index, f.text, f.type, f.subject, f.attribute, f.value] for f in doc.facts],
          [[q.qid, q.question, q.answer, q.kind, list(q.evidence), list(q.evidence_types), q.paraphrase, q.subject,
            q.attribute] for q in doc.questions]]


# Digests of 40 documents per case, taken before answer prefixes and held-out templates were added.
_BEFORE = [
    ("train", dict(seed=0), "21d6ccace497d7665aca2c4bacc44f8ad5d66b70d48943831e407065b2a1019d"),
    ("validation", dict(seed=3, facts_per_document=(4, 24), two_hop_fraction=0.5),
     "a84d0026e83ac7dfe644571841f5b8872ac118f2579a7fc11007c9b98f13b2d9"),
    ("test", dict(seed=1, facts_per_document=16, questions_per_document=12, paraphrase=(0, 2),
                  out_of_scope_fraction=0.3), "8d04ab016cb2b9d260318f268cff5a0902e2128c5df2c216134d4d8ca4481417"),
]


@pytest.mark.parametrize("split,kwargs,digest", _BEFORE)
def test_seen_documents_are_unchanged(split, kwargs, digest):
  docs = generate(split, 40, **kwargs)
  assert hashlib.sha256(json.dumps([_core(d) for d in docs]).encode()).hexdigest() == digest


def test_a_document_reads_as_before():
  doc = document("train", 0, seed=3, facts_per_document=4)
  assert doc.text == ("Magrolk is situated on the Neark River. Faran Nerzanin is employed by the Senti Guild. Faran "
                      "Nerzanin is the mayor of Magrolk. He is 1.6 metres tall.")
  assert [(q.question, q.answer) for q in doc.questions][:3] == [
      ("How tall is the mayor of Magrolk?", "1.6 metres"), ("Who employs Faran Nerzanin?", "Senti Guild"),
      ("Who serves as mayor of Magrolk?", "Faran Nerzanin")]
  assert [q.answer_prefix for q in doc.questions][:3] == [
      "The mayor of Magrolk has a height of", "Faran Nerzanin is employed by the", "Magrolk is led by its mayor,"]
  assert [f.template for f in doc.facts][-1] == "{s} is {v} tall."


def test_schema_forms():
  for a in ATTRIBUTES:
    for forms in (a.statements, a.unseen_statements):
      assert any(synthetic._usable(t) for t in forms), (a.name, forms)  # a prefix in every form set
      for t in forms:
        assert t.count("{s}") == 1 and len(re.findall(r"\{a?_?v\}", t)) == 1 and t.endswith("."), t
    assert len(a.unseen_questions) == NUM_PARAPHRASES and all("{x}" in q for q in a.unseen_questions)
    assert bool(a.unseen_via) == bool(a.via) and all("{s}" in v for v in a.unseen_via)
    assert not set(a.unseen_statements) & set(a.statements) and not set(a.unseen_questions) & set(a.questions)
  assert synthetic._usable("{s} was born in {v}.") and synthetic._usable("Work on {s} was completed in {v}.")
  for t in ("{s} is {v} tall.", "{v} founded {s}.", "{s} was born in {v} and grew up there.", "In {v}, {s} was born."):
    assert not synthetic._usable(t), t


def test_prefixes_are_trimmed_sentence_starts(docs):
  for doc in docs:
    for q in doc.questions:
      p = q.answer_prefix
      assert p and p == p.strip() and p[0].isupper() and "{" not in p and not p.endswith("."), (q.qid, p)


def test_single_prefix_is_the_start_of_its_fact_sentence(docs):
  """Where the fact's own template is usable and names its subject, prefix + " " + answer is its sentence."""
  n = 0
  for doc in docs:
    for q in doc.questions:
      fact = doc.facts[q.evidence[0]] if q.kind == "single" else None
      if fact is not None and synthetic._usable(fact.template) and fact.subject in fact.text:
        assert f"{q.answer_prefix} {q.answer}." == fact.text, (fact.text, q.answer_prefix, q.answer)
        assert fact.subject in q.answer_prefix
        n += 1
  assert n > 300


def test_two_hop_prefix_describes_the_bridge_by_the_via_phrase(docs):
  via = {a.name: a for a in ATTRIBUTES if a.via}
  templates = "unseen" if docs[0].doc_id.endswith("-unseen") else "seen"
  n = 0
  for doc in docs:
    for q in doc.questions:
      if q.kind != "two_hop":
        continue
      first, last = (doc.facts[i] for i in q.evidence)
      phrases = via[first.attribute].forms(templates)[2]
      lead = phrases[q.paraphrase % len(phrases)].split("{s}")[0]
      assert lead.lower() in q.answer_prefix.lower() and first.subject in q.answer_prefix  # "The founder of ..."
      assert last.subject not in q.answer_prefix  # the bridge stays unnamed
      if synthetic._usable(last.template) and last.subject in last.text:
        assert f"{q.answer_prefix} {q.answer}.".endswith(last.text.split(last.subject, 1)[1])
        n += 1
  assert n > 50


_NOUNS = "|".join(sorted({noun for _, _, noun in synthetic._ORG_FORMS} | {"city"}))


def _form(q) -> tuple[str, str]:
  """(template, the value's article) a prefix was made of: its subject and the subject's own words abstracted."""
  form = re.sub(r"\b(?:[Tt]he )?" + re.escape(q.subject), "{s}", q.answer_prefix)  # with its article, if any
  form = re.sub(rf"\b(?:an?) (?:{_NOUNS})\b", "{a_noun}", form)
  form = re.sub(r"\b(?:wife|husband)\b", "{spouse}", form)
  stem, article = re.fullmatch(r"(.*?)(?: (the|an?))?", form).groups()
  return stem, article or ""


@pytest.mark.parametrize("templates", synthetic.TEMPLATES)
def test_out_of_scope_prefixes_take_the_answerable_forms(templates):
  """Every (template, value article) an out-of-scope prefix uses, some answerable one of its attribute uses too."""
  answerable, oos = collections.defaultdict(set), collections.defaultdict(set)
  n = 0
  for doc in generate("train", 600, facts_per_document=(8, 24), questions_per_document=24, seed=1,
                      out_of_scope_fraction=0.2, templates=templates):
    for q in doc.questions:
      if q.kind == "single":
        answerable[q.attribute].add(_form(q))
      elif q.kind == "out_of_scope":
        oos[q.attribute].add(_form(q))
        n += 1
  assert n > 300 and sum(map(len, oos.values())) > 30
  for attribute, forms in oos.items():
    for i, part in enumerate(("template", "article")):
      have = {form[i] for form in answerable[attribute]}
      assert {form[i] for form in forms} <= have, (attribute, part, {form[i] for form in forms} - have)


# --------------------------------------------------------------------------------------------------------
# The template split.


def _distinctive(template: str, seen: set[str]) -> list[str]:
  """The fixed chunks of a held-out template that no seen template of its family contains."""
  chunks = (c.strip(" ,.?") for c in _FIELD.split(template))
  return [c for c in chunks if len(c) >= 4 and not any(c in t for t in seen)]


def _held_out_chunks() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
  """(statement -> distinctive chunks, question or via phrase -> distinctive chunks); every one has some."""
  seen_statements = {t.replace("{s}", s) for a in ATTRIBUTES for t in a.statements for s in ("{s}", "It", "He", "She")}
  seen_questions = {t for a in ATTRIBUTES for t in (*a.questions, *a.via)}
  statements = {t: _distinctive(t, seen_statements) for a in ATTRIBUTES for t in a.unseen_statements}
  questions = {t: _distinctive(t, seen_questions) for a in ATTRIBUTES for t in (*a.unseen_questions, *a.unseen_via)}
  for template, chunks in (statements | questions).items():
    assert chunks, f"held-out template {template!r} has no words of its own"
  return statements, questions


def _pattern(template: str) -> re.Pattern:
  """A template as a regular expression: any text for each field."""
  return re.compile(".+".join(re.escape(chunk) for chunk in _FIELD.split(template)))


def _contains(text: str, chunk: str) -> bool:
  return re.search(rf"(?<!\w){re.escape(chunk)}(?!\w)", text) is not None


def test_train_split_never_sees_a_held_out_template():
  statements, questions = _held_out_chunks()
  patterns = [_pattern(t) for t in statements]
  docs = generate("train", 300, facts_per_document=(4, 24), seed=2, two_hop_fraction=0.4, out_of_scope_fraction=0.2)
  for doc in docs:
    for chunk in {c for cs in statements.values() for c in cs}:
      assert not _contains(doc.text, chunk), (doc.doc_id, chunk)
    for q in doc.questions:
      for chunk in {c for cs in questions.values() for c in cs}:
        assert not _contains(q.question, chunk), (q.question, chunk)
    for f in doc.facts:
      assert not any(p.fullmatch(f.text) for p in patterns), f.text


def test_unseen_documents_use_only_held_out_forms():
  statements, questions = _held_out_chunks()
  kwargs = dict(facts_per_document=(4, 24), seed=2, two_hop_fraction=0.4, out_of_scope_fraction=0.2)
  docs = generate("validation", 300, templates="unseen", **kwargs)
  asked = [_pattern(q) for a in ATTRIBUTES for q in a.unseen_questions]
  used_statements, used_chunks = set(), set()
  for doc in docs:
    assert doc.doc_id.endswith("-unseen")
    for f in doc.facts:
      attr = next(a for a in ATTRIBUTES if a.name == f.attribute and f.template in a.unseen_statements)
      assert f.type == attr.type
      used_statements.add(f.template)
    for q in doc.questions:
      assert any(p.fullmatch(q.question) for p in asked), q.question
      used_chunks |= {c for cs in questions.values() for c in cs if _contains(q.question, c)}
  assert used_statements == set(statements)  # every held-out statement occurs
  assert used_chunks == {c for cs in questions.values() for c in cs}  # and every held-out question and via phrase
  seen = generate("validation", 300, **kwargs)
  facts = lambda doc: [(f.subject, f.attribute, f.value) for f in doc.facts]  # noqa: E731
  targets = lambda doc: [(q.kind, q.answer, q.evidence, q.paraphrase) for q in doc.questions]  # noqa: E731
  for a, b in zip(seen, docs):  # the same world, facts and targets, in other words
    assert facts(a) == facts(b) and targets(a) == targets(b) and a.text != b.text


def test_unseen_documents_are_well_formed():
  tok = byte_tokenizer()
  docs = generate("test", 150, facts_per_document=(4, 32), seed=4, templates="unseen")
  for doc in docs[:20]:
    check_tiling(doc.atomized(tok), tok(doc.text, return_offsets_mapping=True)["offset_mapping"])
  for doc in docs:
    assert split_sentences(doc.text) == list(doc.fact_spans)
    for f in doc.facts:
      assert f.text[0].isupper() and f.text.endswith(".") and "{" not in f.text and "  " not in f.text
    for q in doc.questions:
      assert q.question[0].isupper() and q.question[-1] in "?." and "{" not in q.question
    assert len({q.question for q in doc.questions}) == len(doc.questions)
  facts = [f for d in docs for f in d.facts]
  agreement = sum(classify(f.text) == f.type for f in facts) / len(facts)
  print(f"\nheld-out templates: generator type vs atomize.classify agree on {agreement:.1%} of {len(facts)} facts")
  assert agreement >= 0.85


@pytest.mark.parametrize("templates", ["all", "Unseen", None, 1, ["seen"]])
def test_bad_templates_are_user_errors(templates):
  with pytest.raises(UserError, match="templates"):
    document("train", 0, templates=templates)


def test_records_carry_the_prefix(tmp_path):
  docs = [document("test", 0, facts_per_document=6), document("test", 0, facts_per_document=6, templates="unseen")]
  path = tmp_path / "synthetic.jsonl"
  synthetic.write_jsonl(path, docs)
  questions = [q for d in docs for q in d.questions]
  assert [r["answer_prefix"] for d in docs for r in d.qa_records()] == [q.answer_prefix for q in questions]
  examples = qa.read_jsonl(path)
  assert [e.answer_prefix for e in examples] == [q.answer_prefix for q in questions]
  assert len({e.doc_id for e in examples}) == 2
