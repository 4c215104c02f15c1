"""QA readers: the bundled samples (read in place), JSONL errors, source names, grouping, remote failures
without a network, and the self-generated QA reader on constructed records."""

import dataclasses
import json
import logging
import sys
import types

import pytest

from doc2atom_jax.data import qa
from doc2atom_jax.data.qa import QAExample
from doc2atom_jax.errors import UserError


def _record(i=0, **overrides):
  """A made-up example in the project schema (not taken from any dataset)."""
  record = {"id": f"q{i}", "dataset": "toy", "doc_id": f"d{i}", "question": "When was Zorvan founded?",
            "context": f"Zorvan was founded in 19{i:02d}.", "answers": [f"19{i:02d}"]}
  record.update(overrides)
  return record


def _write_lines(path, lines):
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return path


def _example(i, doc_id, context="ctx"):
  return QAExample(id=f"q{i}", dataset="toy", doc_id=doc_id, context=context, question=f"question {i}?",
                   answers=("a",))


# --------------------------------------------------------------------------------------------------------
# Bundled samples (the real files in ../shared/data/qa, read where they are).

@pytest.mark.parametrize("name", qa.BUNDLED)
def test_every_bundled_dataset_loads(name):
  examples = qa.load_source(name)
  docs = qa.group_by_document(examples)
  print(f"\n{name}: {len(examples)} questions, {len({e.doc_id for e in examples})} doc_ids, "
        f"{len(docs)} documents, {sum(not e.answerable for e in examples)} unanswerable")
  assert examples
  assert len({e.id for e in examples}) == len(examples)
  for e in examples:
    assert isinstance(e, QAExample) and e.dataset == name
    assert e.question.strip() and e.context.strip() and e.doc_id
    assert isinstance(e.answers, tuple) and all(isinstance(a, str) and a.strip() for a in e.answers)
  if name != "squad_v2":  # only SQuAD v2 marks unanswerables with []; Qasper has an "Unanswerable" reference
    assert all(e.answers for e in examples)


def test_squad_v2_has_unanswerables_with_empty_answers():
  examples = qa.load_source("squad_v2")
  unanswerable = [e for e in examples if not e.answerable]
  assert unanswerable and len(unanswerable) < len(examples)
  assert all(e.answers == () for e in unanswerable)


def test_limit_takes_the_first_examples():
  everything = qa.load_source("squad")
  assert qa.load_source("squad", limit=5) == everything[:5]
  assert qa.load_source("squad", limit=0) == []
  assert len(qa.load_source("squad", limit=10**6)) == len(everything)


@pytest.mark.parametrize("limit", [-1, 1.5, "3", True])
def test_bad_limit(limit):
  with pytest.raises(UserError, match="limit"):
    qa.load_source("squad", limit=limit)


def test_missing_split_names_the_ones_there():
  with pytest.raises(UserError, match=r"'test'.*splits there: \['dev'\]"):
    qa.load_source("squad", split="test")


def test_qa_dir_env_override(tmp_path, monkeypatch):
  _write_lines(tmp_path / "drop.dev.jsonl", [json.dumps(_record(1, dataset="drop"))])
  monkeypatch.setenv(qa.QA_DIR_ENV, str(tmp_path))
  assert [e.id for e in qa.load_source("drop")] == ["q1"]
  monkeypatch.setenv(qa.QA_DIR_ENV, str(tmp_path / "nowhere"))
  with pytest.raises(UserError, match=qa.QA_DIR_ENV):
    qa.load_source("drop")


def test_data_dir_argument(tmp_path):
  _write_lines(tmp_path / "ropes.train.jsonl", [json.dumps(_record(2, dataset="ropes"))])
  assert [e.id for e in qa.load_source("ropes", split="train", data_dir=tmp_path)] == ["q2"]


def test_unknown_source_lists_valid_names():
  with pytest.raises(UserError, match="unknown QA source 'squad3'") as info:
    qa.load_source("squad3")
  for name in (*qa.BUNDLED, *qa.REMOTE, "local:"):
    assert name in str(info.value)


# --------------------------------------------------------------------------------------------------------
# JSONL in the project schema.

def test_local_source_reads_jsonl_with_optional_fields(tmp_path):
  path = _write_lines(tmp_path / "toy.jsonl", [
      json.dumps(_record(0, evidence=[2, 0], kind="two_hop", answer_prefix="Zorvan was founded in")),
      "",
      json.dumps(_record(1, answers=[], evidence=None, kind="oos", answer_prefix=None)),
      json.dumps(_record(2)),
      json.dumps(_record(3, answers=["unknown"], evidence=[], kind="out_of_scope", atom_spans=[[0, 5]])),
  ])
  examples = qa.load_source(f"local:{path}")
  assert [e.id for e in examples] == ["q0", "q1", "q2", "q3"]
  assert examples[3].evidence == () and not examples[3].answerable  # extra fields are ignored
  assert examples[0].evidence == (2, 0) and examples[0].kind == "two_hop"
  assert examples[1].answers == () and not examples[1].answerable and examples[1].kind == "oos"
  assert examples[2].evidence is None and examples[2].kind is None
  assert examples[0].answers == ("1900",)
  assert [e.answer_prefix for e in examples] == ["Zorvan was founded in", "", "", ""]  # absent or null: none
  with pytest.raises(UserError, match="one split"):
    qa.load_source(f"local:{path}", split="dev")


@pytest.mark.parametrize("bad_line, field", [
    ('{"id": "q9", "dataset": ', None),  # not JSON
    ("[1, 2]", None),  # not an object
    (json.dumps({k: v for k, v in _record(9).items() if k != "question"}), "question"),
    (json.dumps(_record(9, context="   ")), "context"),
    (json.dumps(_record(9, id=7)), "id"),
    (json.dumps(_record(9, answers="1909")), "answers"),
    (json.dumps(_record(9, answers=["1909", 1909])), "answers"),
    (json.dumps({k: v for k, v in _record(9).items() if k != "answers"}), "answers"),
    (json.dumps(_record(9, evidence=[1, "2"])), "evidence"),
    (json.dumps(_record(9, evidence=[True])), "evidence"),
    (json.dumps(_record(9, kind=3)), "kind"),
    (json.dumps(_record(9, answer_prefix=["Zorvan was founded in"])), "answer_prefix"),
])
def test_malformed_line_names_file_line_and_field(tmp_path, bad_line, field):
  path = _write_lines(tmp_path / "bad.jsonl", [json.dumps(_record(0)), "", bad_line, json.dumps(_record(1))])
  with pytest.raises(UserError) as info:
    qa.read_jsonl(path)
  message = str(info.value)
  print(f"\n{message}")
  assert str(path) in message and "line 3" in message
  if field:
    assert f"field {field!r}" in message


def test_skip_mode_counts_and_logs(tmp_path, caplog):
  path = _write_lines(tmp_path / "mixed.jsonl", [
      json.dumps(_record(0)), "not json", json.dumps(_record(1, answers=None)), json.dumps(_record(2)),
      json.dumps(_record(3, question="")),
  ])
  examples, stats = qa.read_jsonl_stats(path, on_error="skip")
  assert [e.id for e in examples] == ["q0", "q2"]
  assert (stats.read, stats.skipped) == (2, 3)
  assert "line 2" in stats.errors[0] and "field 'answers'" in stats.errors[1] and "line 5" in stats.errors[2]
  with caplog.at_level(logging.WARNING, logger=qa.__name__):
    assert [e.id for e in qa.read_jsonl(path, on_error="skip")] == ["q0", "q2"]
  assert "skipped 3 malformed line(s)" in caplog.text


def test_bad_on_error_value(tmp_path):
  path = _write_lines(tmp_path / "ok.jsonl", [json.dumps(_record(0))])
  with pytest.raises(UserError, match="on_error"):
    qa.read_jsonl(path, on_error="ignore")


def test_non_utf8_and_missing_files(tmp_path):
  path = tmp_path / "latin1.jsonl"
  line = json.dumps(_record(0, context="Caf\u00e9 Zorvan."), ensure_ascii=False)
  path.write_bytes(line.encode("latin-1") + b"\n")
  with pytest.raises(UserError, match="not valid UTF-8"):
    qa.read_jsonl(path)
  with pytest.raises(UserError, match="not found"):
    qa.load_source(f"local:{tmp_path / 'absent.jsonl'}")


# --------------------------------------------------------------------------------------------------------
# Grouping by document.

def test_group_by_document_keeps_first_seen_order():
  examples = [_example(0, "b"), _example(1, "a"), _example(2, "b"), _example(3, "c"), _example(4, "a")]
  groups = qa.group_by_document(examples)
  assert list(groups) == ["b", "a", "c"]
  assert {k: [e.id for e in v] for k, v in groups.items()} == {
      "b": ["q0", "q2"], "a": ["q1", "q4"], "c": ["q3"]}
  assert groups["b"][0] is examples[0]  # unchanged examples are the same objects


def test_group_by_document_splits_a_doc_id_with_several_contexts():
  examples = [_example(0, "art", "para one"), _example(1, "art", "para two"), _example(2, "art", "para one"),
              _example(3, "solo", "x")]
  groups = qa.group_by_document(examples)
  assert {k: [e.id for e in v] for k, v in groups.items()} == {
      "art#ctx0": ["q0", "q2"], "art#ctx1": ["q1"], "solo": ["q3"]}
  for doc_id, group in groups.items():
    assert {e.doc_id for e in group} == {doc_id} and len({e.context for e in group}) == 1
  prefixed = qa.group_by_document([dataclasses.replace(examples[1], answer_prefix="Para two says"), examples[0]])
  assert prefixed["art#ctx0"][0].answer_prefix == "Para two says"  # renamed examples keep their prefix


def test_group_by_document_on_real_samples_gives_one_context_per_document():
  for name in ("squad_v2", "hotpotqa", "ropes"):
    examples = qa.load_source(name)
    groups = qa.group_by_document(examples)
    assert sum(len(g) for g in groups.values()) == len(examples)
    assert [e.id for g in groups.values() for e in g] == [e.id for e in examples]  # samples come grouped
    assert all(len({e.context for e in g}) == 1 for g in groups.values())
  squad_v2 = qa.load_source("squad_v2")  # one doc_id (the article) for all its paragraphs
  assert len(qa.group_by_document(squad_v2)) == len({e.context for e in squad_v2}) > 1


# --------------------------------------------------------------------------------------------------------
# Remote sources, never touching the network: the package import or the fetch is made to fail, or the
# fetch returns records constructed in the documented layout.

def _fake_module(monkeypatch, name, **attributes):
  monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**attributes))


def _offline(*args, **kwargs):
  raise ConnectionError("network is unreachable")


@pytest.mark.parametrize("name", list(qa.REMOTE))
def test_remote_source_without_package(monkeypatch, name):
  package = "tensorflow_datasets" if name.startswith("tfds:") else "datasets"
  monkeypatch.setitem(sys.modules, package, None)  # makes `import <package>` raise ImportError
  needed = "tensorflow-datasets" if package == "tensorflow_datasets" else "`datasets`"
  with pytest.raises(UserError, match=needed):
    qa.load_source(name)


@pytest.mark.parametrize("name", list(qa.REMOTE))
def test_remote_source_without_network(monkeypatch, name):
  _fake_module(monkeypatch, "tensorflow_datasets", data_source=_offline)
  _fake_module(monkeypatch, "datasets", load_dataset=_offline)
  with pytest.raises(UserError, match="internet access") as info:
    qa.load_source(name)
  assert "network is unreachable" in str(info.value)


def test_tfds_sources_map_the_documented_features(monkeypatch):
  records = {
      "squad/v2.0": [{"id": b"s1", "title": b"Zorvan", "context": b"Zorvan lies on the Vell.",
                      "question": b"Where does Zorvan lie?", "is_impossible": False,
                      "answers": {"text": [b"on the Vell", b"the Vell", b"the Vell"],
                                  "answer_start": [12, 15, 15]}},
                     {"id": b"s2", "title": b"Zorvan", "context": b"Zorvan lies on the Vell.",
                      "question": b"Who built Zorvan?", "is_impossible": True,
                      "answers": {"text": [], "answer_start": []}}],
      "drop": [{"query_id": b"d1", "passage": b"Zorvan scored 3, then 4.", "question": b"How many in total?",
                "answer": b"7", "validated_answers": [b"7", b"seven"]}],
  }
  calls = []

  def data_source(name, split, data_dir):
    calls.append((name, split, data_dir))
    return records[name]

  _fake_module(monkeypatch, "tensorflow_datasets", data_source=data_source)
  squad = qa.load_source("tfds:squad/v2.0")
  assert [(e.id, e.dataset, e.answers) for e in squad] == [
      ("s1", "squad_v2", ("on the Vell", "the Vell")), ("s2", "squad_v2", ())]
  assert squad[0].doc_id == squad[1].doc_id and squad[0].doc_id.startswith("Zorvan#")
  drop = qa.load_source("tfds:drop", limit=1)
  assert drop[0].answers == ("7", "seven") and drop[0].doc_id.startswith("drop_p_")
  assert calls == [("squad/v2.0", "validation", None), ("drop", "dev", None)]


def test_hf_sources_map_the_documented_fields(monkeypatch):
  records = {
      "allenai/ropes": [{"id": "r1", "background": "Heat melts ice.", "situation": "Ann heats ice; Bo does not.",
                         "question": "Whose ice melts?", "answers": {"text": ["Ann"]}}],
      "allenai/qasper": [{
          "id": "p1", "title": "Zorvan Nets", "abstract": "We build Zorvan nets.",
          "full_text": {"section_name": ["Intro", None], "paragraphs": [["Nets are good."], ["More."]]},
          "qas": {"question": ["What is built?", "Is it fast?", "Who funded it?"],
                  "question_id": ["a", "b", "c"],
                  "answers": [
                      {"answer": [{"unanswerable": False, "extractive_spans": ["Zorvan", "nets"], "yes_no": None,
                                   "free_form_answer": ""}], "annotation_id": ["x"], "worker_id": ["w"]},
                      {"answer": [{"unanswerable": False, "extractive_spans": [], "yes_no": True,
                                   "free_form_answer": ""},
                                  {"unanswerable": False, "extractive_spans": [], "yes_no": None,
                                   "free_form_answer": "quite fast"}], "annotation_id": ["y", "z"],
                       "worker_id": ["w", "v"]},
                      {"answer": [{"unanswerable": True, "extractive_spans": [], "yes_no": None,
                                   "free_form_answer": ""}], "annotation_id": ["u"], "worker_id": ["w"]}]}}],
      "THUDM/LongBench": [{"_id": "l1", "input": "Who wrote it?", "context": "Written by Ann.",
                           "answers": ["Ann"], "dataset": "multifieldqa_en"}],
  }
  calls = []

  def load_dataset(path, config, split, cache_dir):
    calls.append((path, config, split))
    return records[path]

  _fake_module(monkeypatch, "datasets", load_dataset=load_dataset)
  ropes = qa.load_source("hf:ropes")
  assert ropes[0].context == "Background: Heat melts ice.\n\nSituation: Ann heats ice; Bo does not."
  assert ropes[0].answers == ("Ann",)
  qasper = qa.load_source("hf:qasper")
  assert [(e.id, e.answers) for e in qasper] == [
      ("a", ("Zorvan, nets",)), ("b", ("Yes", "quite fast")), ("c", ())]
  assert qasper[0].context.startswith("Zorvan Nets\n\nWe build Zorvan nets.\n\nIntro\nNets are good.")
  assert {e.doc_id for e in qasper} == {"qasper_p1"}
  longbench = qa.load_source("longbench:multifieldqa_en")
  assert (longbench[0].question, longbench[0].answers, longbench[0].dataset) == (
      "Who wrote it?", ("Ann",), "longbench_multifieldqa_en")
  assert calls == [("allenai/ropes", None, "validation"), ("allenai/qasper", "qasper", "validation"),
                   ("THUDM/LongBench", "multifieldqa_en", "test")]


def test_remote_record_with_other_fields_points_at_the_mapper(monkeypatch):
  _fake_module(monkeypatch, "datasets", load_dataset=lambda *a, **k: [{"question": "Q?"}])
  with pytest.raises(UserError, match="record 0 does not have the expected fields.*untested offline"):
    qa.load_source("hf:ropes")


# --------------------------------------------------------------------------------------------------------
# Doc-to-LoRA self-generated QA, on records built here in the assumed layouts.

def test_self_gen_text_records():
  records = [
      {"context": "Zorvan was founded in 1907 by Ilsa Marr.", "prompts_level_1": ["When?", "By whom?"],
       "responses_level_1": ["1907", "Ilsa Marr"]},
      {"id": "doc7", "context": "Vell is a river.", "questions": ["What is Vell?"], "responses": [""]},
  ]
  examples = qa.read_self_gen(records)
  assert [(e.question, e.answers) for e in examples] == [
      ("When?", ("1907",)), ("By whom?", ("Ilsa Marr",)), ("What is Vell?", ())]
  assert examples[0].doc_id == examples[1].doc_id and examples[0].doc_id.startswith("self_gen_")
  assert examples[2].id == "doc7#q0" and examples[2].dataset == qa.SELF_GEN_DATASET
  assert len(qa.read_self_gen(records, limit=1)) == 1


def test_self_gen_files(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  records = [{"context": "Zorvan was founded in 1907.", "prompts": ["When?"], "responses": ["1907"]}]
  jsonl = _write_lines(tmp_path / "sg.jsonl", [json.dumps(r) for r in records])
  parquet = tmp_path / "sg.parquet"
  table = pa.Table.from_pylist([{**records[0], "logprobs_vals": [[-0.1, -2.0]]}])
  pq.write_table(table, parquet)
  for path in (jsonl, parquet):
    assert [(e.question, e.answers) for e in qa.read_self_gen(path)] == [("When?", ("1907",))]


def test_self_gen_tokenized_records_need_the_tokenizer():
  from doc2atom_jax.models.tiny import byte_tokenizer

  tok = byte_tokenizer()

  def chat(text, system=False):
    messages = [{"role": "system", "content": ""}] if system else []
    rendered = tok.apply_chat_template(messages + [{"role": "user", "content": text}], tokenize=False,
                                       add_generation_prompt=True)
    return tok(rendered, add_special_tokens=False)["input_ids"]

  prompt = chat("When was Zorvan founded?")
  response = tok("1907<|im_end|>", add_special_tokens=False)["input_ids"]
  record = {"ctx_ids": chat("Zorvan was founded in 1907.", system=True), "input_ids": [prompt + response],
            "response_start_end": [[len(prompt), len(prompt) + len(response)]], "logprobs_vals": [[[-0.1]]]}
  examples = qa.read_self_gen([record], tokenizer=tok)
  assert [(e.context, e.question, e.answers) for e in examples] == [
      ("Zorvan was founded in 1907.", "When was Zorvan founded?", ("1907",))]
  with pytest.raises(UserError, match="tokenizer"):
    qa.read_self_gen([record])


@pytest.mark.parametrize("record, match", [
    ({"prompts": ["Q?"], "responses": ["A"]}, "no context field"),
    ({"context": "C.", "prompts": ["Q1?", "Q2?"], "responses": ["A"]}, "2 questions but 1 responses"),
    ({"context": "  ", "prompts": ["Q?"], "responses": ["A"]}, "context is empty"),
    ({"context": "C.", "prompts": ["Q?"], "responses": [None]}, "must be strings"),
    ("not a record", "expected an object"),
])
def test_self_gen_bad_records(record, match):
  with pytest.raises(UserError, match=match) as info:
    qa.read_self_gen([{"context": "Fine.", "prompts": ["Q?"], "responses": ["A"]}, record])
  assert "record 1" in str(info.value)
