"""Synthetic fact worlds: determinism, random access, disjoint splits, atoms, gold labels, typer agreement."""

import collections
import json
import os
import re
import subprocess
import sys

import pytest

from doc2atom_jax.atoms.atomize import check_tiling, classify, split_sentences
from doc2atom_jax.data import qa, synthetic
from doc2atom_jax.data.synthetic import SPLITS, UNKNOWN, document, generate, name_split
from doc2atom_jax.errors import UserError
from doc2atom_jax.models.tiny import byte_tokenizer

FIXED_NAME_WORDS = synthetic._FIXED_WORDS  # "Institute", "River": words of names not drawn per split


@pytest.fixture(scope="module")
def train_docs():
  return generate("train", 150, facts_per_document=(4, 24), seed=1)


def names_of(doc) -> set[str]:
  """Entity names of a document: subjects, name-valued values, out-of-scope subjects."""
  names = {f.subject for f in doc.facts} | {q.subject for q in doc.questions}
  names |= {f.value for f in doc.facts if f.value[:1].isupper()}
  return names


def name_words(name: str) -> list[str]:
  return [w for w in name.split() if w not in FIXED_NAME_WORDS]


def test_four_fact_document_reads_naturally():
  doc = document("train", 0, seed=3, facts_per_document=4)
  print(f"\n--- example ({doc.doc_id}) ---\n{doc.text}")
  for f in doc.facts:
    print(f"  [{f.index}] {f.type:<10} {f.subject} / {f.attribute} = {f.value}")
  for q in doc.questions:
    print(f"  {q.kind:<12} p{q.paraphrase} {q.question} -> {q.answer} {list(q.evidence)}")
  assert len(doc.facts) == 4 and len(doc.questions) == 8
  assert len({f.subject for f in doc.facts}) >= 2
  for f in doc.facts:
    assert f.text[0].isupper() and f.text.endswith(".") and "{" not in f.text and "  " not in f.text
  for q in doc.questions:
    assert q.question[0].isupper() and q.question.endswith("?") and "{" not in q.question
  assert len({q.question for q in doc.questions}) == len(doc.questions)


def test_same_seed_same_documents_and_other_seeds_differ():
  kwargs = dict(facts_per_document=(4, 16), questions_per_document=6)
  assert document("train", 7, seed=4, **kwargs) == document("train", 7, seed=4, **kwargs)
  texts = {document("train", 7, seed=s, **kwargs).text for s in range(4)}
  assert len(texts) == 4
  assert document("train", 7, seed=4, **kwargs).text != document("train", 8, seed=4, **kwargs).text


def test_random_access_equals_sequential_generation():
  kwargs = dict(seed=2, facts_per_document=(4, 16), two_hop_fraction=0.5)
  alone = {i: document("validation", i, **kwargs) for i in (5, 3, 0, 1, 4, 2)}  # each built alone
  assert generate("validation", 6, **kwargs) == [alone[i] for i in range(6)]


def test_independent_of_python_hash_seed():
  """Set iteration order varies with PYTHONHASHSEED; documents must not."""
  code = ("import hashlib; from doc2atom_jax.data import synthetic as s; "
          "d = s.generate('test', 5, facts_per_document=(4, 32)); "
          "print(hashlib.sha256(repr(d).encode()).hexdigest())")
  digests = set()
  for hash_seed in ("1", "2"):
    env = dict(os.environ, PYTHONHASHSEED=hash_seed)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    digests.add(out.stdout.strip())
  assert len(digests) == 1


def test_splits_never_share_a_name():
  by_split = {}
  for split in SPLITS:
    docs = generate(split, 200, facts_per_document=(4, 16), seed=0)
    names = set().union(*(names_of(d) for d in docs))
    words = {w for n in names for w in name_words(n)}
    assert all(name_split(w) == split for w in words)
    by_split[split] = (names, words)
  for a, b in [(0, 1), (0, 2), (1, 2)]:
    (names_a, words_a), (names_b, words_b) = by_split[SPLITS[a]], by_split[SPLITS[b]]
    assert not names_a & names_b
    assert not words_a & words_b
  print(f"\nnames per split: {[len(n) for n, _ in by_split.values()]}")


def test_names_are_unique_within_a_document(train_docs):
  for doc in train_docs:
    owner = {}
    for name in names_of(doc):
      for w in name_words(name):
        assert owner.setdefault(w, name) == name, (doc.doc_id, w, name, owner[w])


@pytest.mark.parametrize("n_facts", [4, 32, 128])
def test_facts_tile_the_text_as_atoms(n_facts):
  tok = byte_tokenizer()
  for index in range(2):
    doc = document("test", index, facts_per_document=n_facts, questions_per_document=16)
    assert len(doc.facts) == n_facts and len(doc.fact_spans) == n_facts
    assert [f.index for f in doc.facts] == list(range(n_facts))
    assert len({f.subject for f in doc.facts}) >= max(2, n_facts // 5)  # more entities as worlds grow
    assert len({(f.subject, f.attribute) for f in doc.facts}) == n_facts
    atomized = doc.atomized(tok)
    check_tiling(atomized, tok(doc.text, return_offsets_mapping=True)["offset_mapping"])
    assert [a.text for a in atomized.atoms] == [f.text for f in doc.facts]
    assert [a.type for a in atomized.atoms] == [f.type for f in doc.facts]
    assert split_sentences(doc.text) == list(doc.fact_spans)  # the rule-based splitter agrees
    assert len(doc.questions) == 16 if n_facts >= 16 else 8 <= len(doc.questions) <= 16  # few facts: repeats

def test_single_fact_answers_are_in_their_evidence(train_docs):
  n = 0
  for doc in train_docs:
    for q in doc.questions:
      if q.kind == "single":
        (i,) = q.evidence
        fact = doc.facts[i]
        assert q.answer == fact.value and q.answer in fact.text
        assert (q.subject, q.attribute) == (fact.subject, fact.attribute)
        assert q.evidence_types == (fact.type,)
        n += 1
  assert n > 500


def test_two_hop_chains_are_valid(train_docs):
  n = 0
  for doc in train_docs:
    for q in doc.questions:
      if q.kind == "two_hop":
        first, second = (doc.facts[i] for i in q.evidence)
        assert first.value == second.subject  # the bridge entity
        assert second.value != first.subject
        assert q.answer == second.value and q.answer in second.text
        assert q.evidence_types == (first.type, second.type)
        assert q.subject == first.subject and q.attribute == f"{first.attribute}>{second.attribute}"
        assert first.subject in q.question and second.subject not in q.question  # the bridge is not given
        n += 1
  assert n > 150
  example = next(q for d in train_docs for q in d.questions if q.kind == "two_hop")
  print(f"\ntwo-hop example: {example.question} -> {example.answer}")


def test_out_of_scope_is_truly_absent(train_docs):
  about_named = about_new = 0
  for doc in train_docs:
    stated = {(f.subject, f.attribute) for f in doc.facts}
    for q in doc.questions:
      if q.kind == "out_of_scope":
        assert q.answer == UNKNOWN and q.evidence == () and q.evidence_types == ()
        assert (q.subject, q.attribute) not in stated
        if q.subject in doc.text:
          about_named += 1
          assert q.attribute not in {"spouse", "mentor", "employer", "founder", "director", "birthplace",
                                     "headquarters", "mayor", "designer", "maker"}  # could be inferred
        else:
          about_new += 1
          assert not set(name_words(q.subject)) & set(re.findall(r"[A-Z][a-z]+", doc.text))
  assert about_named > 20 and about_new > 20


def test_question_kind_fractions():
  docs = generate("train", 300, facts_per_document=(8, 16), seed=5)
  kinds = collections.Counter(q.kind for d in docs for q in d.questions)
  total = sum(kinds.values())
  fractions = {k: kinds[k] / total for k in synthetic.KINDS}
  print(f"\nquestion kinds over {len(docs)} documents: " + ", ".join(f"{k} {v:.3f}" for k, v in fractions.items()))
  assert total == 8 * len(docs)
  assert 0.2 <= fractions["two_hop"] <= 0.3
  assert 0.1 <= fractions["out_of_scope"] <= 0.15
  none = generate("train", 20, facts_per_document=(8, 16), two_hop_fraction=0, out_of_scope_fraction=0)
  assert {q.kind for d in none for q in d.questions} == {"single"}


def test_paraphrase_changes_only_the_phrasing():
  kwargs = dict(seed=9, facts_per_document=(6, 12))
  for index in range(10):
    p0, p2 = (document("train", index, paraphrase=p, **kwargs) for p in (0, 2))
    free = document("train", index, **kwargs)
    assert p0.text == p2.text == free.text and p0.facts == free.facts
    label = lambda q: (q.qid, q.kind, q.answer, q.evidence, q.subject, q.attribute)  # noqa: E731
    assert [label(q) for q in p0.questions] == [label(q) for q in p2.questions]
    assert {q.paraphrase for q in p0.questions} == {0} and {q.paraphrase for q in p2.questions} == {2}
    assert all(a.question != b.question for a, b in zip(p0.questions, p2.questions))
    seen = document("train", index, paraphrase=(0, 1), **kwargs)
    assert {q.paraphrase for q in seen.questions} <= {0, 1}


def test_generator_types_agree_with_the_typer(train_docs):
  facts = [f for d in train_docs for f in d.facts]
  misses = collections.Counter((f.attribute, f.type, classify(f.text)) for f in facts if classify(f.text) != f.type)
  agreement = 1 - sum(misses.values()) / len(facts)
  print(f"\ngenerator type vs atomize.classify: {agreement:.1%} agree over {len(facts)} facts; misses: "
        + ", ".join(f"{a} {t}->{c} x{n}" for (a, t, c), n in misses.most_common(6)))
  assert agreement >= 0.9
  assert {f.type for f in facts} == set(synthetic.atomize.ATOM_TYPES)


def test_pronouns_point_to_the_previous_sentence(train_docs):
  pronoun_facts = 0
  for doc in train_docs:
    for f in doc.facts:
      if f.subject not in f.text and f.text.split()[0] in ("He", "She", "It", "The"):
        prev = doc.facts[f.index - 1]
        assert f.index > 0 and f.subject in (prev.subject, prev.value), (f.text, prev.text)
        pronoun_facts += 1
  assert pronoun_facts > 50


def test_pronoun_only_when_unambiguous():
  she, her = synthetic._Entity("Mira Oskel", "person", gender="female"), synthetic._Entity(
      "Lena Vask", "person", gender="female")
  he = synthetic._Entity("Velkor Amsten", "person", gender="male")
  inst = synthetic._Entity("Tarnow Institute", "org", "the", noun="institute")
  city = synthetic._Entity("Daskel", "city", noun="city")
  m = synthetic._Mentions()
  assert m.pronoun(she) is None  # never named
  m.sentence([she, he])
  assert (m.pronoun(she), m.pronoun(he)) == ("She", "He")
  m.sentence([she, her])  # "Mira Oskel is married to Lena Vask."
  assert m.pronoun(she) is None and m.pronoun(her) == "She"
  m.sentence([inst, city])  # "The Tarnow Institute is based in Daskel."
  assert (m.pronoun(inst), m.pronoun(city)) == ("The institute", "It")
  assert m.pronoun(her) is None  # not in the previous sentence


def test_world_is_consistent(train_docs):
  checked = 0
  for doc in train_docs:
    value = {(f.subject, f.attribute): f.value for f in doc.facts}
    for (org, attr), founder in value.items():
      if attr == "founder" and (org, "founded_year") in value and (founder, "birth_year") in value:
        assert int(value[(org, "founded_year")]) >= int(value[(founder, "birth_year")]) + 25
        checked += 1
  assert checked > 0


def test_qa_records_and_jsonl(tmp_path):
  docs = generate("test", 3, facts_per_document=(4, 8))
  path = tmp_path / "synthetic.jsonl"
  assert synthetic.write_jsonl(path, docs) == sum(len(d.questions) for d in docs)
  records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
  assert records == [r for d in docs for r in d.qa_records()]
  doc = docs[0]
  for record, q in zip(doc.qa_records(), doc.questions):
    assert {"id", "dataset", "doc_id", "context", "question", "answers", "kind", "evidence",
            "evidence_types"} <= set(record)
    assert record["dataset"] == "synthetic" and record["doc_id"] == doc.doc_id and record["context"] == doc.text
    assert record["id"] == q.qid and record["question"] == q.question and record["answers"] == [q.answer]
    assert record["evidence"] == list(q.evidence) and record["evidence_types"] == list(q.evidence_types)
    assert [doc.text[a:b] for a, b in record["atom_spans"]] == [f.text for f in doc.facts]
  assert len({r["id"] for r in records}) == len(records)
  examples = qa.read_jsonl(path)  # the project's QA reader takes the records as they are
  questions = [q for d in docs for q in d.questions]
  assert [(e.id, e.evidence, e.kind) for e in examples] == [(q.qid, q.evidence, q.kind) for q in questions]
  assert all(e.answerable == (q.kind != "out_of_scope") for e, q in zip(examples, questions))


@pytest.mark.parametrize("kwargs", [
    dict(split="dev"), dict(facts_per_document=1), dict(facts_per_document=(8, 4)),
    dict(facts_per_document="many"), dict(two_hop_fraction=0.8, out_of_scope_fraction=0.5),
    dict(two_hop_fraction="half"), dict(paraphrase=3), dict(paraphrase=()), dict(index=-1),
    dict(questions_per_document=-2)])
def test_bad_arguments_are_user_errors(kwargs):
  args = dict(split="train", index=0) | kwargs
  with pytest.raises(UserError):
    document(args.pop("split"), args.pop("index"), **args)
