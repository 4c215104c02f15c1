"""mode=compile on the tiny model: resumable after a failure or a kill, one atomization per document, and the
atoms an answer reports built by the one helper that export uses too."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np

from configs import tiny
from doc2atom_jax import modes
from doc2atom_jax.atoms import atomize, bank as bank_lib, pipeline
from doc2atom_jax.eval import quick
from tests.cli_helpers import assert_user_error

ROOT = pathlib.Path(__file__).resolve().parents[1]
ORLEN = {"doc_id": "orlen", "text": "The Orlen Observatory was founded in 1871 by the astronomer Maria Delvane. "
                                    "It stands above the town of Kestrava."}
TARNOW = {"doc_id": "tarnow", "text": "Mira Oskel founded the Tarnow Institute in Daskel. It has 412 employees."}


def write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def compile_cmd(docs, bank):
  return [sys.executable, "-m", "doc2atom_jax.main", "--config=configs/tiny.py", "--config.mode=compile",
          f"--config.compile.input={docs}", f"--config.compile.bank={bank}"]


def run(cmd):
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, XLA_FLAGS=""),
                        timeout=600)


def snapshot(folder):
  return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_conflict_writes_nothing_and_the_fixed_file_resumes(tmp_path):
  bank = tmp_path / "bank"
  first = run(compile_cmd(write_jsonl(tmp_path / "first.jsonl", [ORLEN]), bank))
  assert first.returncode == 0, first.stderr[-3000:]
  before = snapshot(bank)
  # A new document, then one whose id is in the bank with other text: refused before anything is written.
  changed = dict(ORLEN, text="The Orlen Observatory was founded in 1872.")
  docs = write_jsonl(tmp_path / "docs.jsonl", [TARNOW, changed])
  assert_user_error(run(compile_cmd(docs, bank)), "'orlen'", "already in the atom bank")
  assert snapshot(bank) == before
  # The file fixed: the stored document is skipped, the new one compiled.
  write_jsonl(docs, [TARNOW, ORLEN])
  rerun = run(compile_cmd(docs, bank))
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "skipped 1 already in the bank" in rerun.stdout and "compiled tarnow" in rerun.stdout
  assert bank_lib.load(bank).doc_ids == ["orlen", "tarnow"]
  assert "compile" in rerun.stderr and "2/2" not in rerun.stderr and "1/1" in rerun.stderr  # the progress bar


def test_a_killed_compile_reruns_to_every_document_once(tmp_path):
  # Documents of different lengths: each compiles a new shape, so the kill lands between documents.
  records = [{"doc_id": f"d{i}", "text": " ".join(f"Fact {j} of document {i} is that item {j} weighs {i + j} kg."
                                                 for j in range(i + 1))} for i in range(8)]
  docs, bank = write_jsonl(tmp_path / "docs.jsonl", records), tmp_path / "bank"
  cmd = compile_cmd(docs, bank)
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, XLA_FLAGS=""))
  manifest, stored, deadline = bank / "manifest.json", 0, time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if manifest.exists():
      stored = len(json.loads(manifest.read_text())["documents"])
      if stored:
        proc.send_signal(signal.SIGKILL)
        break
    time.sleep(0.01)
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL, "the compile ended before it could be killed"
  kept = bank_lib.load(bank).doc_ids  # whole documents only, in order
  assert kept == [r["doc_id"] for r in records[:len(kept)]] and 1 <= len(kept) < len(records)

  rerun = run(cmd)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"skipped {len(kept)} already in the bank" in rerun.stdout
  loaded = bank_lib.load(bank)
  assert loaded.doc_ids == [r["doc_id"] for r in records]
  assert all(loaded.texts[r["doc_id"]] == r["text"] for r in records)
  listed = json.loads(manifest.read_text())["documents"]
  assert sorted(p.name for p in (bank / "shards").iterdir()) == sorted(pathlib.Path(d["shard"]).name for d in listed)


def tiny_config(**compile_cfg):
  c = tiny.get_config()
  c.mode = "compile"
  c.compile.update(compile_cfg)
  return c


def test_compile_atomizes_each_document_once(tmp_path, monkeypatch):
  calls = []
  real = atomize.atomize
  monkeypatch.setattr(atomize, "atomize", lambda text, doc_id, *a, **kw: calls.append(doc_id) or real(
      text, doc_id, *a, **kw))
  docs = write_jsonl(tmp_path / "docs.jsonl", [ORLEN, TARNOW])
  path = modes.compile_documents(tiny_config(input=str(docs), bank=str(tmp_path / "bank")), None)
  assert sorted(calls) == ["orlen", "tarnow"]
  assert bank_lib.load(path).doc_ids == ["orlen", "tarnow"]


def test_answer_and_export_report_atoms_with_one_helper(tmp_path):
  c = tiny_config()
  from doc2atom_jax import system as system_lib

  system = system_lib.build_system(c)
  bank = quick.in_memory_bank([system.compile_document(ORLEN["text"], "orlen")])
  question = "Who founded the Orlen Observatory?"
  indices, weights, _ = system.select(bank, [question])
  expected = pipeline.atoms_used(bank, indices[0], weights[0])
  assert expected and [u["weight"] for u in expected] == [float(w) for w in weights[0] if w > 0]
  atom = next(u["atom"] for u in expected if u["atom"] != "null")
  assert atom["text"] == ORLEN["text"][slice(*atom["chars"])] and len(atom["tokens"]) == 2
  assert system.answer(bank, [question], max_new_tokens=2)[0]["atoms"] == expected
  assert not hasattr(modes, "_atoms_used")
  assert np.isfinite([u["weight"] for u in expected]).all()
