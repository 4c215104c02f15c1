"""Training data sources of train/data.py: the synthetic curriculum and real QA, both pure functions of the step."""

import json

import pytest
import tensorflow_datasets as tfds

from configs import quickstart
from doc2atom_jax.data import qa
from doc2atom_jax.errors import UserError
from doc2atom_jax.models.tiny import byte_tokenizer
from doc2atom_jax.train import data as data_lib

CURRICULUM = ((0, (2, 3)), (3, (6, 7)))


@pytest.fixture(scope="module")
def tokenizer():
  tfds.disable_progress_bar()
  return byte_tokenizer()


def make_config(data_dir="", **data):
  c = quickstart.get_config()
  c.data.data_dir = str(data_dir)
  c.data.documents_per_step = 2
  c.data.questions_per_document = 3
  for key, value in data.items():
    setattr(c.data, key, value)
  return c


def summary(documents) -> list[tuple]:
  """What identifies a step's documents: ids, atom counts and the questions asked."""
  return [(d.doc.doc_id, len(d.doc.atoms), tuple(q.qid for q in d.questions)) for d in documents]


# --------------------------------------------------------------------------------------------------------
# Curriculum.


def test_curriculum_stages_are_validated():
  assert data_lib.curriculum_stages(CURRICULUM) == CURRICULUM
  assert data_lib.curriculum_stages(()) == ()
  for bad, message in [(((1, (2, 3)),), "start at step 0"), (((0, (2, 3)), (0, (4, 5))), "increasing"),
                       (((0, (2, 3)), (5, (4, 5)), (4, (6, 7))), "increasing"), (((0, (1, 3)),), "2 <= min"),
                       (((0, (5, 4)),), "2 <= min"), (((0, 4),), "start_step, \\(min_facts"), ((3,), "stage 0"),
                       (((0, (2.5, 4)),), "integers"), (((True, (2, 4)),), "integers")]:
    with pytest.raises(UserError, match=message):
      data_lib.curriculum_stages(bad)


def test_stage_of_a_step():
  stages = ((0, (2, 3)), (3, (4, 5)), (7, (6, 8)))
  assert [data_lib.stage_index(stages, s) for s in (0, 2, 3, 6, 7, 10**6)] == [0, 0, 1, 1, 2, 2]
  with pytest.raises(UserError, match="non-negative"):
    data_lib.stage_index(stages, -1)


@pytest.mark.parametrize("source", ["generator", "tfds"])
def test_curriculum_batches_have_their_stage_facts(tmp_path, tokenizer, source):
  config = make_config(tmp_path, source=source, curriculum=CURRICULUM, train_documents=6)
  documents_for_step = data_lib.source_from_config(config)
  for step, (lo, hi) in [(0, (2, 3)), (2, (2, 3)), (3, (6, 7)), (5, (6, 7))]:
    documents = documents_for_step(step, tokenizer)
    assert len(documents) == 2
    assert all(lo <= len(d.doc.atoms) <= hi for d in documents), step
  # Stage 2 starts its own order: its first step reads what a plain source of its range reads at step 0.
  plain = data_lib.source_from_config(make_config(tmp_path, source=source, facts_per_document=(6, 7),
                                                  train_documents=6))
  assert summary(documents_for_step(3, tokenizer)) == summary(plain(0, tokenizer))
  # Deterministic: a fresh source, asked in another order, gives the same batches.
  again = data_lib.source_from_config(config)
  steps = range(7)
  assert [summary(again(s, tokenizer)) for s in reversed(steps)][::-1] == \
         [summary(documents_for_step(s, tokenizer)) for s in steps]
  if source == "tfds":  # one prepared corpus per stage, named after its facts range
    names = sorted(p.name for p in (tmp_path / "synthetic_fact_worlds").iterdir() if not p.name.startswith("."))
    assert len(names) == 2 and "facts2-3" in names[0] and "facts6-7" in names[1]


def test_curriculum_with_real_qa_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match="curriculum"):
    data_lib.source_from_config(make_config(tmp_path, source="qa", qa_files=("squad",), curriculum=CURRICULUM))


def test_unknown_source_and_on_error_are_user_errors(tmp_path):
  with pytest.raises(UserError, match="data.source"):
    data_lib.source_from_config(make_config(tmp_path, source="parquet"))
  with pytest.raises(UserError, match="on_error"):
    data_lib.source_from_config(make_config(tmp_path, source="generator", on_error="ignore"))


# --------------------------------------------------------------------------------------------------------
# Real QA.


@pytest.fixture(scope="module")
def shared_qa():
  try:
    folder = qa.qa_dir()
  except UserError:
    pytest.skip("no shared/data/qa folder")
  if not (folder / "squad.dev.jsonl").is_file() or not (folder / "ropes.dev.jsonl").is_file():
    pytest.skip(f"no squad/ropes samples in {folder}")
  return folder


def test_qa_source_trains_on_the_shared_samples(tmp_path, tokenizer, shared_qa):
  # One bundled name and one path, both read in place from the shared folder (never copied into the repo).
  files = ("squad@dev", str(shared_qa / "ropes.dev.jsonl"))
  config = make_config(tmp_path, source="qa", qa_files=files)
  documents_for_step = data_lib.source_from_config(config)
  groups = {**qa.group_by_document(qa.read_jsonl(shared_qa / "squad.dev.jsonl")),
            **qa.group_by_document(qa.read_jsonl(shared_qa / "ropes.dev.jsonl"))}
  seen, labelled, datasets = set(), 0, set()
  for step in range(12):
    documents = documents_for_step(step, tokenizer)
    assert len(documents) == 2
    for d in documents:
      examples = groups[d.doc.doc_id]
      assert d.doc.text == examples[0].context and len(d.doc.atoms) >= 1
      asked = [q.qid for q in d.questions]
      ids = [ex.id for ex in examples]
      assert 1 <= len(asked) <= 3 and len(asked) == min(3, len(ids))
      assert asked == [i for i in ids if i in asked]  # a sample, in document order
      for q in d.questions:
        assert q.evidence is None or (len(q.evidence) == 1 and 0 <= q.evidence[0] < len(d.doc.atoms))
        labelled += q.evidence is not None
      seen.add(d.doc.doc_id)
      datasets.add(examples[0].dataset)
  assert len(seen) == 24 and labelled > 0 and datasets == {"squad", "ropes"}
  # The order (and the question sample) is a pure function of (seed, step): a fresh source, other order.
  again = data_lib.source_from_config(config)
  assert [summary(again(s, tokenizer)) for s in (5, 0, 11)] == \
         [summary(documents_for_step(s, tokenizer)) for s in (5, 0, 11)]
  reseeded = make_config(tmp_path, source="qa", qa_files=files)
  reseeded.seed = 1
  other = data_lib.source_from_config(reseeded)
  assert [summary(other(s, tokenizer)) for s in range(3)] != [summary(documents_for_step(s, tokenizer))
                                                               for s in range(3)]


def write_lines(path, lines) -> None:
  path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines),
                  encoding="utf-8")


GOOD = {"id": "q1", "dataset": "mine", "doc_id": "d1", "context": "Marta Lind founded the Orrin Guild in 1872. "
        "The guild later moved to Vessa.", "question": "Who founded the Orrin Guild?", "answers": ["Marta Lind"]}


@pytest.fixture
def bad_jsonl(tmp_path):
  path = tmp_path / "bad.jsonl"
  no_question = {k: v for k, v in GOOD.items() if k != "question"} | {"id": "q2"}
  write_lines(path, [GOOD, no_question, "{not json", {**GOOD, "id": "q3", "question": "Where did it move?",
                                                      "answers": ["Vessa"]}])
  return path


def test_malformed_qa_line_raises_with_file_line_and_field(tmp_path, bad_jsonl):
  with pytest.raises(UserError, match=r"bad\.jsonl, line 2: field 'question' missing"):
    data_lib.source_from_config(make_config(tmp_path / "data", source="qa", qa_files=(str(bad_jsonl),)))


def test_skip_leaves_out_malformed_lines_and_counts_them(tmp_path, tokenizer, bad_jsonl, capsys):
  self_gen = tmp_path / "self_gen.jsonl"  # Doc-to-LoRA's text layout: a context, questions, the model's responses
  write_lines(self_gen, [{"id": "sg0", "context": "The Kell Bridge spans the Aure river. It opened in 1910.",
                          "questions": ["When did the Kell Bridge open?"], "responses": ["In 1910."]}])
  config = make_config(tmp_path / "data", source="qa", qa_files=(str(bad_jsonl),), self_gen=(str(self_gen),),
                       on_error="skip", documents_per_step=1)
  documents_for_step = data_lib.source_from_config(config)
  out = [line for line in capsys.readouterr().out.splitlines() if "skipped" in line]  # TFDS prints too
  assert len(out) == 1 and f"{bad_jsonl}: 2 (kept 2)" in out[0] and "line 2" in out[0]
  documents = [d for s in range(2) for d in documents_for_step(s, tokenizer)]
  assert sorted(d.doc.doc_id for d in documents) == ["d1", "sg0"]
  by_id = {d.doc.doc_id: d for d in documents}
  assert [(q.qid, q.answer) for q in by_id["d1"].questions] == [("q1", "Marta Lind"), ("q3", "Vessa")]
  assert [q.evidence for q in by_id["d1"].questions] == [(0,), (1,)]  # the one atom holding the answer
  assert [(q.answer, q.evidence) for q in by_id["sg0"].questions] == [("In 1910.", (1,))]  # "in 1910" matches


def test_qa_source_needs_examples(tmp_path):
  with pytest.raises(UserError, match="qa_files"):
    data_lib.source_from_config(make_config(tmp_path, source="qa"))
  with pytest.raises(UserError, match="no file matches"):
    data_lib.source_from_config(make_config(tmp_path, source="qa", qa_files=(str(tmp_path / "none-*.jsonl"),)))


def test_question_sample_is_a_pure_function_of_seed_and_step():
  record = {"doc_id": "d", "questions": [{"id": f"q{i}"} for i in range(10)]}
  pick = lambda **kw: [q["id"] for q in data_lib.sample_questions(record, 4, **kw)["questions"]]
  first = pick(seed=0, step=3, slot=1)
  assert len(first) == 4 and first == pick(seed=0, step=3, slot=1)
  assert first == sorted(first, key=lambda i: int(i[1:]))
  assert {tuple(pick(seed=0, step=s, slot=1)) for s in range(6)} != {tuple(first)}
  assert data_lib.sample_questions(record, 10, seed=0, step=0, slot=0) is record


def test_qa_files_glob_reads_only_matching_files(tmp_path, tokenizer):
  # mode=selfgen's layout: trainable shard-*.jsonl files beside empty-*.jsonl ones that must not be read.
  for name, doc_id in [("shard-00000-of-00002.jsonl", "a"), ("shard-00001-of-00002.jsonl", "b"),
                       ("empty-00000-of-00002.jsonl", "c")]:
    write_lines(tmp_path / name, [{**GOOD, "id": f"{doc_id}1", "doc_id": doc_id}])
  config = make_config(tmp_path / "data", source="qa", qa_files=(f"local:{tmp_path}/shard-*.jsonl",),
                       documents_per_step=1)
  documents_for_step = data_lib.source_from_config(config)
  assert sorted(d.doc.doc_id for s in range(2) for d in documents_for_step(s, tokenizer)) == ["a", "b"]
