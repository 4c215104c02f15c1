"""Self-generation: stable shards, the output schema read back by qa.read_jsonl, empty answers kept apart,
resumption after SIGTERM, long documents, a real bundled sample, and the CLI mode with its input errors."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest

from doc2atom_jax.data import qa, selfgen
from doc2atom_jax.data.qa import QAExample
from doc2atom_jax.errors import UserError
from doc2atom_jax.models import base
from tests.test_main import assert_user_error

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny():
  return base.load("tiny-random-llama")


_SCRIPT = {"EMPTY": "", "PUNCT": " The. ", "REFUSE": "I don't know."}


class Scripted:
  """The tiny model's tokenizer and context, with answers made up from the prompt (fast, deterministic).

  A question ending in a _SCRIPT key gets that answer; `on_call(n)` runs before the n-th generate call.
  """

  def __init__(self, model, on_call=None):
    self.model, self.on_call, self.calls = model, on_call, 0

  def __getattr__(self, name):
    return getattr(self.model, name)

  def generate(self, prompts, *, max_new_tokens, temperature, answer_prefixes):
    assert temperature == 0.0 and max_new_tokens > 0 and len(answer_prefixes) == len(prompts)
    self.calls += 1
    if self.on_call:
      self.on_call(self.calls)
    questions = [p.split("Question: ")[1].split("\n")[0] for p in prompts]
    return [_SCRIPT.get(q.split()[-1], f" answer to {q} ") for q in questions]


def _examples(num_docs=5, per_doc=2, script=None):
  """Made-up documents; `script` maps (document, question) to a _SCRIPT key that sets the answer."""
  out = []
  for d in range(num_docs):
    for j in range(per_doc):
      q = f"What is fact {j} of doc {d}? {(script or {}).get((d, j), '')}".strip()
      out.append(QAExample(id=f"d{d}q{j}", dataset="toy", doc_id=f"doc{d}", context=f"Doc {d} has {per_doc} facts.",
                           question=q, answers=(f"{j}",), kind="single"))
  return out


def _all_shards(n, **kw):
  return selfgen.Settings(num_shards=n, shards=tuple(range(n)), **kw)


# --------------------------------------------------------------------------------------------------------
# Shards.

def test_shard_assignment_is_stable_and_covers_every_document_once():
  doc_ids = [f"doc-{i}" for i in range(300)]
  for n in (1, 3, 8):
    shards = selfgen.assign(doc_ids, n)
    assert sorted(d for s in shards for d in s) == sorted(doc_ids)
    assert all(s == [d for d in doc_ids if selfgen.shard_of(d, n) == i] for i, s in enumerate(shards))
  assert min(map(len, selfgen.assign(doc_ids, 8))) > 20  # roughly even
  # Pinned: the assignment must never change, or resumed and multi-process runs would disagree.
  assert [selfgen.shard_of(f"doc-{i}", 8) for i in range(8)] == [2, 1, 0, 5, 1, 7, 7, 7]
  # Process round robin: every shard run by exactly one process, whatever the counts.
  for num_shards, processes in ((8, 3), (2, 4), (5, 5)):
    runs = [s for p in range(processes) for s in selfgen.process_shards(num_shards, p, processes)]
    assert sorted(runs) == list(range(num_shards))


def test_shard_of_ignores_python_hash_randomization():
  code = "from doc2atom_jax.data import selfgen; print([selfgen.shard_of(f'doc-{i}', 8) for i in range(8)])"
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                       env=dict(os.environ, PYTHONHASHSEED="123"))
  assert out.stdout.strip() == "[2, 1, 0, 5, 1, 7, 7, 7]"


# --------------------------------------------------------------------------------------------------------
# Output.

def test_output_schema_reads_back_with_the_tiny_model(tmp_path, tiny):
  examples = _examples(num_docs=3, per_doc=2)
  counts = selfgen.run(examples, tiny, _all_shards(2, max_new_tokens=3, documents_per_part=1), tmp_path,
                       progress=False)
  assert (counts.documents, counts.questions, counts.shards_merged) == (3, 6, 2)
  assert counts.tokens > 0 and not counts.interrupted
  assert not list((tmp_path / selfgen.PARTS).iterdir())  # merged and removed
  kept = [json.loads(l) for s in range(2) for l in selfgen.shard_file(tmp_path, s, 2).read_text().splitlines()]
  empty = [json.loads(l) for s in range(2) if selfgen.empty_file(tmp_path, s, 2).exists()
           for l in selfgen.empty_file(tmp_path, s, 2).read_text().splitlines()]
  assert len(kept) + len(empty) == 6 and len(empty) == counts.empty
  for r in kept:
    assert r["self_generated"] is True and r["model"] == "tiny-random-llama" and r["kind"] == "single"
    assert len(r["answers"]) == 1 and r["answers"][0] == r["answers"][0].strip() and "empty" not in r
    source = next(ex for ex in examples if ex.id == r["id"])
    assert r["source_answers"] == list(source.answers) and r["context"] == source.context
  read = [ex for s in range(2) for ex in qa.read_jsonl(selfgen.shard_file(tmp_path, s, 2))]
  assert sorted(ex.id for ex in read) == sorted(r["id"] for r in kept)
  assert sum(not ex.answerable for ex in read) == counts.refusals
  assert all(r["empty"] and r["answers"] == [] and selfgen.is_empty(r["generated"]) for r in empty)
  manifest = json.loads((tmp_path / selfgen.MANIFEST).read_text())
  assert manifest["model"] == "tiny-random-llama" and manifest["num_shards"] == 2


def test_same_document_same_shard_and_batched(tmp_path, tiny):
  model = Scripted(tiny)
  examples = _examples(num_docs=6, per_doc=3)
  selfgen.run(examples, model, _all_shards(3, batch_size=2), tmp_path, progress=False)
  assert model.calls == 6 * 2  # 3 questions per document in batches of at most 2
  for s in range(3):
    records = qa.read_jsonl(selfgen.shard_file(tmp_path, s, 3))
    assert {selfgen.shard_of(ex.doc_id, 3) for ex in records} <= {s}
    assert all(ex.answers == (f"answer to {ex.question}",) for ex in records)
  assert sum(len(qa.read_jsonl(selfgen.shard_file(tmp_path, s, 3))) for s in range(3)) == 18


def test_empty_answers_are_kept_apart_and_refusals_counted(tmp_path, tiny):
  examples = _examples(num_docs=2, per_doc=3, script={(0, 1): "EMPTY", (1, 0): "PUNCT", (1, 2): "REFUSE"})
  counts = selfgen.run(examples, Scripted(tiny), _all_shards(1), tmp_path, progress=False)
  assert (counts.empty, counts.refusals, counts.questions) == (2, 1, 6)
  kept = {ex.id: ex for ex in qa.read_jsonl(selfgen.shard_file(tmp_path, 0, 1))}
  assert set(kept) == {"d0q0", "d0q2", "d1q1", "d1q2"}
  assert not kept["d1q2"].answerable and kept["d1q2"].answers == ("I don't know.",)  # declined: kept
  empty = [json.loads(l) for l in selfgen.empty_file(tmp_path, 0, 1).read_text().splitlines()]
  assert {r["id"]: r["generated"] for r in empty} == {"d0q1": "", "d1q0": "The."}
  assert all(r["empty"] is True and r["answers"] == [] and r["source_answers"] for r in empty)


# --------------------------------------------------------------------------------------------------------
# Reliability.

def test_sigterm_finishes_the_part_and_a_rerun_resumes(tmp_path, tiny):
  examples = _examples(num_docs=5, per_doc=1)
  settings = _all_shards(1, documents_per_part=2)
  reference = tmp_path / "reference"
  selfgen.run(examples, Scripted(tiny), settings, reference, progress=False)

  out = tmp_path / "out"
  stopped = Scripted(tiny, on_call=lambda n: n == 1 and os.kill(os.getpid(), signal.SIGTERM))
  previous = signal.getsignal(signal.SIGTERM)
  counts = selfgen.run(examples, stopped, settings, out, progress=False)
  assert signal.getsignal(signal.SIGTERM) is previous  # the handler is restored
  assert counts.interrupted and counts.parts_written == 1 and stopped.calls == 2  # the part's 2 documents
  assert selfgen.part_file(out, 0, 1, 0).exists() and not selfgen.shard_file(out, 0, 1).exists()

  resumed = Scripted(tiny)
  counts = selfgen.run(examples, resumed, settings, out, progress=False)
  assert resumed.calls == 3 and counts.parts_reused == 1 and counts.parts_written == 2
  assert counts.documents == 3 and not counts.interrupted
  assert selfgen.shard_file(out, 0, 1).read_bytes() == selfgen.shard_file(reference, 0, 1).read_bytes()

  again = Scripted(tiny)
  counts = selfgen.run(examples, again, settings, out, progress=False)
  assert again.calls == 0 and counts.shards_merged == 0 and counts.documents == 0


def test_reused_part_is_not_rewritten(tmp_path, tiny):
  examples = _examples(num_docs=4, per_doc=1)
  settings = _all_shards(1, documents_per_part=2)
  selfgen.run(examples, Scripted(tiny, on_call=lambda n: n == 1 and os.kill(os.getpid(), signal.SIGTERM)),
              settings, tmp_path, progress=False)
  part0 = selfgen.part_file(tmp_path, 0, 1, 0)
  part0.write_text(part0.read_text().replace("answer to", "KEPT"))  # a marker only a reuse would keep
  selfgen.run(examples, Scripted(tiny), settings, tmp_path, progress=False)
  text = selfgen.shard_file(tmp_path, 0, 1).read_text()
  assert text.count("KEPT") == 2 and text.count("answer to") == 2


def test_another_configuration_is_refused(tmp_path, tiny):
  examples = _examples(num_docs=2)
  selfgen.run(examples, Scripted(tiny), _all_shards(2), tmp_path, progress=False)
  with pytest.raises(UserError, match="max_new_tokens"):
    selfgen.run(examples, Scripted(tiny), _all_shards(2, max_new_tokens=5), tmp_path, progress=False)
  with pytest.raises(UserError, match="input"):
    selfgen.run(examples[:-1], Scripted(tiny), _all_shards(2), tmp_path, progress=False)


def test_long_documents_error_or_are_skipped(tmp_path, tiny):
  long = QAExample(id="long-q", dataset="toy", doc_id="long", context="word " * 500, question="Which word?",
                   answers=("word",))
  examples = [*_examples(num_docs=2), long]
  with pytest.raises(UserError, match="'long'.*on_long=skip"):
    selfgen.run(examples, Scripted(tiny), _all_shards(1), tmp_path / "error", progress=False)
  counts = selfgen.run(examples, Scripted(tiny), _all_shards(1, on_long="skip"), tmp_path / "skip", progress=False)
  assert (counts.skipped_documents, counts.skipped_questions, counts.documents) == (1, 1, 2)
  assert "long-q" not in selfgen.shard_file(tmp_path / "skip", 0, 1).read_text()


@pytest.mark.parametrize("kw,needle", [({"num_shards": 2, "shards": (2,)}, "not in"),
                                       ({"num_shards": 1, "shards": (0,), "on_long": "drop"}, "on_long"),
                                       ({"num_shards": 1, "shards": (0,), "documents_per_part": 0}, "documents_per_part")])
def test_bad_settings(kw, needle):
  with pytest.raises(UserError, match=needle):
    selfgen.Settings(**kw)


# --------------------------------------------------------------------------------------------------------
# A real sample, read where it lies.

def test_bundled_squad_sample(tmp_path, tiny):
  try:
    examples = qa.load_source("squad", limit=6)
  except UserError as e:
    pytest.skip(f"no bundled QA sample: {e}")
  counts = selfgen.run(examples, tiny, _all_shards(2, max_new_tokens=4, on_long="skip"), tmp_path, progress=False)
  assert counts.documents + counts.skipped_documents == len(qa.group_by_document(examples))
  assert counts.questions + counts.skipped_questions == 6
  kept = [ex for s in range(2) for ex in qa.read_jsonl(selfgen.shard_file(tmp_path, s, 2))]
  assert len(kept) == counts.questions - counts.empty
  assert {ex.id for ex in kept} <= {ex.id for ex in examples} and all(ex.dataset == "squad" for ex in kept)


# --------------------------------------------------------------------------------------------------------
# The CLI.

def cli(*overrides, workdir=None):
  cmd = [sys.executable, "-m", "doc2atom_jax.main", "--config=configs/quickstart.py", "--config.mode=selfgen",
         "--config.model.name=tiny-random-llama", *overrides]
  if workdir:
    cmd.append(f"--workdir={workdir}")
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, XLA_FLAGS=""),
                        timeout=600, check=False)


def _write_jsonl(path, examples):
  rows = ({k: v for k, v in dataclasses.asdict(ex).items() if v is not None} for ex in examples)
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  return path


def test_cli_mode_end_to_end(tmp_path):
  data = _write_jsonl(tmp_path / "qa.jsonl", _examples(num_docs=3, per_doc=2))
  args = (f"--config.selfgen.input={data}", "--config.selfgen.num_shards=2", "--config.selfgen.max_new_tokens=3",
          "--config.selfgen.documents_per_part=1")
  result = cli(*args, workdir=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  out = tmp_path / "selfgen"
  assert "selfgen: 3 documents, 6 questions" in result.stdout and "2 shards merged" in result.stdout
  records = [ex for s in range(2) for ex in qa.read_jsonl(selfgen.shard_file(out, s, 2))]
  empties = sum(len(selfgen.empty_file(out, s, 2).read_text().splitlines()) for s in range(2)
                if selfgen.empty_file(out, s, 2).exists())
  assert len(records) + empties == 6
  again = cli(*args, workdir=tmp_path)  # everything done: nothing generated
  assert again.returncode == 0 and "selfgen: 0 documents" in again.stdout, again.stderr[-3000:]


@pytest.mark.parametrize("make,needle", [
    (lambda p: p / "absent.jsonl", "file not found"),
    (lambda p: (p / "bad.jsonl").write_text('{"id": "a", "dataset": "t", "doc_id": "d", "context": "c"}\n{"id": \n')
     and p / "bad.jsonl", "line 1"),
    (lambda p: None, "selfgen.input"),
])
def test_cli_bad_input_is_one_line(tmp_path, make, needle):
  path = make(tmp_path)
  args = [f"--config.selfgen.input={path}"] if path else []
  result = cli(*args, workdir=tmp_path)
  assert_user_error(result, needle)
  assert not (tmp_path / "selfgen").exists()
