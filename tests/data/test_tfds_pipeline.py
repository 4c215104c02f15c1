"""TFDS builders (array_record, no TensorFlow) and the grain pipeline whose order is a pure function of (seed, step)."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import tensorflow_datasets as tfds

from doc2atom_jax.data import pipeline, qa, synthetic
from doc2atom_jax.data import tfds_builders as tb
from doc2atom_jax.errors import UserError
from doc2atom_jax.models.tiny import byte_tokenizer
from doc2atom_jax.train import data as train_data

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG = tb.synthetic_config(train=8, validation=3, test=0, facts_per_document=(2, 4), questions_per_document=3,
                             seed=5, paraphrase=(0, 1))
NAME = f"synthetic_fact_worlds/{CONFIG.name}"


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
  tfds.disable_progress_bar()
  data_dir = tmp_path_factory.mktemp("tfds_synthetic")
  tb.prepare_synthetic(data_dir, CONFIG)
  return data_dir


@pytest.fixture(scope="module")
def train_source(synthetic_dir):
  return pipeline.document_source(NAME, "train", data_dir=synthetic_dir)


@pytest.fixture(scope="module")
def tokenizer():
  return byte_tokenizer()


def core(questions) -> list[tuple]:
  """The fields every builder writes: what a question asks and its gold labels."""
  return [(q["id"], q["question"], q["answers"], q["kind"], q["evidence"]) for q in questions]


def doc_ids(records) -> list[str]:
  return [r["doc_id"] for r in records]


# --------------------------------------------------------------------------------------------------------
# Builders.


def test_synthetic_records_equal_the_generator(synthetic_dir):
  sources = tfds.data_source(NAME, data_dir=str(synthetic_dir), download=False)
  assert sorted(sources) == ["train", "validation"]  # a split with 0 documents is not written
  for split, n in (("train", 8), ("validation", 3)):
    source = pipeline.DocumentSource(sources[split])
    assert len(source) == n
    for i in range(n):
      record, doc = source[i], synthetic.document(split, i, **tb.document_kwargs(CONFIG))
      assert (record["index"], record["doc_id"], record["dataset"]) == (i, doc.doc_id, "synthetic")
      assert record["text"] == doc.text
      assert record["fact_spans"] == [tuple(s) for s in doc.fact_spans]
      assert record["fact_types"] == [f.type for f in doc.facts]
      assert core(record["questions"]) == [(q.qid, q.question, [q.answer], q.kind, list(q.evidence))
                                           for q in doc.questions]
      assert all(q["paraphrase"] in (0, 1) for q in record["questions"])
      assert [q["answer_prefix"] for q in record["questions"]] == [q.answer_prefix for q in doc.questions]


def test_builder_data_source_and_process_split(synthetic_dir, train_source):
  builder = tb.SyntheticFactWorlds(config=CONFIG, data_dir=str(synthetic_dir), file_format=tb.FILE_FORMAT)
  by_builder = pipeline.document_source(builder, "train")
  assert [by_builder[i] for i in range(8)] == [train_source[i] for i in range(8)]
  # tfds.split_for_jax_process: per-process evaluation shards, read without TensorFlow too.
  shard = pipeline.document_source(NAME, tfds.split_for_jax_process("train", process_index=1, process_count=2),
                                   data_dir=synthetic_dir)
  assert [shard[i]["index"] for i in range(len(shard))] == [4, 5, 6, 7]


def test_reading_an_unprepared_dataset_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match="prepare it first"):
    pipeline.document_source(NAME, "train", data_dir=tmp_path)


def test_no_tensorflow_when_building_and_reading(tmp_path):
  script = textwrap.dedent(f"""
      import os, sys
      import tensorflow_datasets as tfds
      from doc2atom_jax.data import pipeline, synthetic, tfds_builders as tb
      tfds.disable_progress_bar()
      data, manual = {str(tmp_path / "data")!r}, {str(tmp_path / "manual")!r}
      config = tb.synthetic_config(train=2, validation=1, test=1, facts_per_document=(2, 3),
                                   questions_per_document=2)
      tb.prepare_synthetic(data, config)
      source = pipeline.document_source("synthetic_fact_worlds/" + config.name, "train", data_dir=data)
      os.makedirs(manual)
      synthetic.write_jsonl(manual + "/toy.jsonl", [synthetic.document("test", 0, facts_per_document=2)])
      qa_source = pipeline.document_source(tb.prepare_local_qa(data, manual), "toy")
      records = [source[i] for i in range(len(source))] + [qa_source[0]]
      assert records[0]["text"] and records[-1]["fact_spans"]
      print("tensorflow imported:", "tensorflow" in sys.modules)
      """)
  # A `tensorflow` that fails on import: building and reading must never even try (etils only probes for it).
  poison = tmp_path / "poison" / "tensorflow"
  poison.mkdir(parents=True)
  (poison / "__init__.py").write_text('raise ImportError("something imported tensorflow")\n')
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(poison.parent)])}
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "tensorflow imported: False" in result.stdout


# --------------------------------------------------------------------------------------------------------
# The order: a pure function of (seed, global step).


def test_order_is_a_pure_function_of_seed_and_step(train_source):
  step_docs = pipeline.training_documents(train_source, seed=11, documents_per_step=3)
  again = pipeline.training_documents(train_source, seed=11, documents_per_step=3)
  assert [doc_ids(step_docs(s)) for s in range(6)] == [doc_ids(again(s)) for s in (5, 4, 3, 2, 1, 0)][::-1]
  assert doc_ids(step_docs(4)) == doc_ids(step_docs(4))
  other_seed = pipeline.training_documents(train_source, seed=12, documents_per_step=3)
  assert [doc_ids(step_docs(s)) for s in range(3)] != [doc_ids(other_seed(s)) for s in range(3)]


def test_each_epoch_is_a_permutation_reshuffled_per_epoch(train_source):
  indices = [i for s in range(4) for i in pipeline.document_indices(s, num_documents=8, seed=11,
                                                                    documents_per_step=4)]
  epoch0, epoch1 = indices[:8], indices[8:]
  assert sorted(epoch0) == sorted(epoch1) == list(range(8))
  assert epoch0 != epoch1
  step_docs = pipeline.training_documents(train_source, seed=11, documents_per_step=4)
  assert [r["index"] for s in range(4) for r in step_docs(s)] == indices


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_partition_the_single_process_batch(train_source, process_count):
  global_batch = pipeline.training_documents(train_source, seed=3, documents_per_step=4)
  per_process = 4 // process_count
  shards = [pipeline.training_documents(train_source, seed=3, documents_per_step=per_process,
                                        process_index=p, process_count=process_count) for p in range(process_count)]
  for step in range(5):  # 8 documents, 4 a step: crosses two epoch boundaries
    assert doc_ids(global_batch(step)) == [d for shard in shards for d in doc_ids(shard(step))]


def test_bad_layouts_are_user_errors(train_source):
  with pytest.raises(UserError, match="process_index"):
    pipeline.training_documents(train_source, seed=0, documents_per_step=1, process_index=2, process_count=2)
  with pytest.raises(UserError, match="documents_per_step"):
    pipeline.training_documents(train_source, seed=0, documents_per_step=0)
  with pytest.raises(UserError, match="seed"):
    pipeline.training_documents(train_source, seed=-1, documents_per_step=1)
  with pytest.raises(UserError, match="step"):
    pipeline.training_documents(train_source, seed=0, documents_per_step=1)(-1)


# --------------------------------------------------------------------------------------------------------
# The grain pipeline: same order, checkpointable iterator.


@pytest.mark.parametrize("process_index", [0, 1])
def test_grain_dataset_order_equals_the_pure_function(train_source, process_index):
  layout = dict(seed=7, documents_per_step=3, process_index=process_index, process_count=2)
  step_docs = pipeline.training_documents(train_source, **layout)
  dataset = pipeline.train_dataset(train_source, **layout)
  assert [doc_ids(dataset[s]) for s in range(5)] == [doc_ids(step_docs(s)) for s in range(5)]
  iterator = pipeline.train_iterator(dataset)
  assert [doc_ids(next(iterator)) for _ in range(5)] == [doc_ids(step_docs(s)) for s in range(5)]


def test_resuming_at_a_step_equals_continuing(train_source):
  layout = dict(seed=7, documents_per_step=3)
  dataset = pipeline.train_dataset(train_source, **layout)
  continued = pipeline.train_iterator(dataset)
  first = [doc_ids(next(continued)) for _ in range(6)]
  resumed = pipeline.train_iterator(dataset, start_step=3)
  assert [doc_ids(next(resumed)) for _ in range(3)] == first[3:]
  fresh = pipeline.training_documents(train_source, **layout)  # no state at all
  assert [doc_ids(fresh(s)) for s in range(3, 6)] == first[3:]


def test_grain_iterator_state_round_trip(train_source):
  dataset = pipeline.train_dataset(train_source, seed=2, documents_per_step=2)
  iterator = pipeline.train_iterator(dataset)
  for _ in range(3):
    next(iterator)
  state = iterator.get_state()
  expected = [doc_ids(next(iterator)) for _ in range(3)]
  restored = pipeline.train_iterator(dataset)
  restored.set_state(json.loads(json.dumps(state)))  # survives a JSON checkpoint
  assert [doc_ids(next(restored)) for _ in range(3)] == expected
  step_docs = pipeline.training_documents(train_source, seed=2, documents_per_step=2)
  assert expected == [doc_ids(step_docs(s)) for s in (3, 4, 5)]


# --------------------------------------------------------------------------------------------------------
# Records -> TrainDocument.


def test_synthetic_records_convert_like_the_synthetic_source(train_source, tokenizer):
  step_docs = pipeline.training_documents(train_source, seed=4, documents_per_step=2)
  records = step_docs(1)
  converted = pipeline.records_to_train_documents(records, tokenizer)
  source = train_data.SyntheticSource(seed=5, facts_per_document=(2, 4), questions_per_document=3,
                                      paraphrases=(0, 1))
  assert converted == [train_data.to_train_document(source.document(r["index"]), tokenizer) for r in records]
  assert all(q.answer_prefix for d in converted for q in d.questions)  # every synthetic question has one
  dataset = pipeline.train_dataset(train_source, seed=4, documents_per_step=2, tokenizer=tokenizer)
  assert dataset[1] == converted


def test_records_without_answer_prefix_still_convert(train_source, tokenizer):
  """Records prepared before answer prefixes existed (builder version 1.0.0) have none."""
  record = train_source[0]
  old = {**record, "questions": [{k: v for k, v in q.items() if k != "answer_prefix"} for q in record["questions"]]}
  new_doc, = pipeline.records_to_train_documents([record], tokenizer)
  old_doc, = pipeline.records_to_train_documents([old], tokenizer)
  assert [q.answer_prefix for q in old_doc.questions] == [""] * len(record["questions"])
  assert [dataclasses.replace(q, answer_prefix="") for q in new_doc.questions] == list(old_doc.questions)


def test_synthetic_config_for_held_out_templates():
  config = tb.synthetic_config(train=0, validation=2, test=0, templates="unseen")
  assert config.name.endswith("_unseen") and "unseen" not in CONFIG.name
  assert tb.document_kwargs(config)["templates"] == "unseen" and tb.document_kwargs(CONFIG)["templates"] == "seen"
  doc = synthetic.document("validation", 1, **tb.document_kwargs(config))
  assert doc.doc_id.endswith("-unseen")
  assert tb.synthetic_example(doc, 1)["doc_id"] == doc.doc_id
  with pytest.raises(UserError, match="templates"):
    tb.synthetic_config(templates="held_out")


# --------------------------------------------------------------------------------------------------------
# Local QA JSONL.


def write_lines(path: pathlib.Path, records) -> None:
  path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_local_jsonl_of_synthetic_documents_keeps_atoms_and_evidence(tmp_path, synthetic_dir, train_source, tokenizer):
  manual = tmp_path / "manual"
  manual.mkdir()
  docs = [synthetic.document("train", i, **tb.document_kwargs(CONFIG)) for i in range(3)]
  synthetic.write_jsonl(manual / "synth.train.jsonl", docs)
  builder = tb.prepare_local_qa(tmp_path / "data", manual)
  assert sorted(builder.info.splits) == ["synth_train"]  # default config: one split per file
  source = pipeline.document_source("local_qa_jsonl/all_files", "synth_train", data_dir=tmp_path / "data")
  assert len(source) == 3
  for i in range(3):
    record, expected = source[i], train_source[i]
    assert [record[k] for k in ("index", "doc_id", "text", "fact_spans", "fact_types")] == \
           [expected[k] for k in ("index", "doc_id", "text", "fact_spans", "fact_types")]
    assert core(record["questions"]) == core(expected["questions"])
    assert [q["answer_prefix"] for q in record["questions"]] == [q["answer_prefix"] for q in expected["questions"]]
  assert pipeline.records_to_train_documents([source[0]], tokenizer) == \
         pipeline.records_to_train_documents([train_source[0]], tokenizer)


def test_local_jsonl_groups_documents_and_atomizes_unlabelled_text(tmp_path, tokenizer):
  manual = tmp_path / "manual"
  manual.mkdir()
  a = "Marta Lind founded the Orrin Guild in 1872. The guild later moved to Vessa."
  b = "The Kell Bridge spans the Aure river. It opened in 1910."
  base = {"dataset": "mine", "doc_id": "page"}
  write_lines(manual / "mine.jsonl", [
      {**base, "id": "q1", "context": a, "question": "Who founded the Orrin Guild?", "answers": ["Marta Lind"],
       "answer_prefix": "The Orrin Guild was founded by"},
      {**base, "id": "q2", "context": b, "question": "When did the Kell Bridge open?", "answers": ["1910"]},
      {**base, "id": "q3", "context": a, "question": "Where did the guild move?", "answers": ["Vessa"],
       "evidence": [7]},  # no atom_spans: stored evidence points into an unknown atomization
      {**base, "id": "q4", "context": b, "question": "Who painted it?", "answers": []}])
  builder = tb.prepare_local_qa(tmp_path / "data", manual, files={"train": "mine.jsonl"})
  source = pipeline.document_source(builder, "train")
  groups = qa.group_by_document(qa.read_jsonl(manual / "mine.jsonl"))
  assert [r["doc_id"] for r in (source[0], source[1])] == list(groups) == ["page#ctx0", "page#ctx1"]
  assert [len(source[i]["questions"]) for i in range(2)] == [2, 2]
  assert source[0]["fact_spans"] == [] and source[0]["fact_types"] == []
  first, second = pipeline.records_to_train_documents([source[0], source[1]], tokenizer)
  assert len(first.doc.atoms) == 2 and first.doc.text == a
  assert [q.evidence for q in first.questions] == [(0,), (1,)]  # recomputed: the one atom with the answer
  assert [q.answer_prefix for q in first.questions] == ["The Orrin Guild was founded by", ""]
  assert [(q.answer, q.out_of_scope, q.evidence) for q in second.questions] == [
      ("1910", False, (1,)), (synthetic.UNKNOWN, True, None)]


def test_local_jsonl_missing_file_is_a_user_error(tmp_path):
  (tmp_path / "manual").mkdir()
  with pytest.raises(UserError, match="not found"):
    tb.prepare_local_qa(tmp_path / "data", tmp_path / "manual", files={"train": "nope.jsonl"})


def test_local_jsonl_reads_the_shared_squad_sample(tmp_path, tokenizer):
  try:
    folder = qa.qa_dir()
  except UserError:
    pytest.skip("no shared/data/qa folder")
  path = folder / "squad.dev.jsonl"
  if not path.is_file():
    pytest.skip(f"{path} not found")
  manual = tmp_path / "manual"  # only a link: the sample is never copied into the repository or data_dir
  manual.mkdir()
  (manual / "squad.dev.jsonl").symlink_to(path)
  builder = tb.prepare_local_qa(tmp_path / "data", manual, files={"validation": "squad.dev.jsonl"})
  source = pipeline.document_source(f"local_qa_jsonl/{builder.builder_config.name}", "validation",
                                    data_dir=tmp_path / "data")
  groups = qa.group_by_document(qa.read_jsonl(path))
  assert len(source) == len(groups) > 1
  for record, (doc_id, examples) in zip((source[i] for i in range(len(source))), groups.items()):
    assert (record["doc_id"], record["text"], record["dataset"]) == (doc_id, examples[0].context, "squad")
    assert [(q["id"], q["question"], q["answers"]) for q in record["questions"]] == \
           [(ex.id, ex.question, list(ex.answers)) for ex in examples]
  train_doc, = pipeline.records_to_train_documents([source[0]], tokenizer)
  assert train_doc.doc.text == source[0]["text"] and len(train_doc.doc.atoms) > 1
  assert all(q.evidence is None or 0 <= q.evidence[0] < len(train_doc.doc.atoms) for q in train_doc.questions)
