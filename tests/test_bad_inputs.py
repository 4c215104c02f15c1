"""Unusable paths and senseless numbers: one `error:` line and exit status 2, found before any model loads."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from configs import tiny
from doc2atom_jax import fileio, modes
from doc2atom_jax import system as system_lib
from doc2atom_jax.errors import UserError
from tests.cli_helpers import assert_user_error

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [{"doc_id": "orlen", "text": "The Orlen Observatory was founded in 1871 by Maria Delvane."}]


def cli(*args, workdir=None):
  cmd = [sys.executable, "-m", "doc2atom_jax.main", "--config=configs/tiny.py", *args]
  if workdir is not None:
    cmd.append(f"--workdir={workdir}")
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, XLA_FLAGS=""),
                        timeout=600)


def write_docs(path):
  path.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
  return path


@pytest.fixture
def no_model(monkeypatch):
  """Loading a model fails the test: every check here must come first."""
  def refuse(*args, **kwargs):
    raise AssertionError("the model was loaded before the inputs were checked")

  for module in (modes, system_lib):
    monkeypatch.setattr(module, "build_system", refuse)
    monkeypatch.setattr(module, "load_model", refuse)


def config(mode, **sections):
  c = tiny.get_config()
  c.mode = mode
  for section, values in sections.items():
    c[section].update(values)
  return c


# ---------------------------------------------------------------------------------------------------------
# Through the command line.
# ---------------------------------------------------------------------------------------------------------
def test_a_workdir_that_is_a_file(tmp_path):
  file = tmp_path / "runs"
  file.write_text("not a folder")
  docs = write_docs(tmp_path / "docs.jsonl")
  assert_user_error(cli("--config.mode=compile", f"--config.compile.input={docs}", workdir=file),
                    str(file), "not a folder")
  assert_user_error(cli("--config.train.steps=1", workdir=file), str(file), "not a folder")


def test_negative_counts():
  assert_user_error(cli("--config.mode=plan", "--config.plan.devices=-1"), "plan.devices", "-1")
  assert_user_error(cli("--config.mode=generate", "--config.generate.max_new_tokens=-5"),
                    "generate.max_new_tokens", "-5")


def test_ask_without_a_bank(tmp_path):
  assert_user_error(cli("--config.mode=ask", f"--config.ask.bank={tmp_path / 'absent'}",
                        "--config.ask.question=Who?"), "no atom bank")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_workdir(tmp_path):
  workdir = tmp_path / "ro"
  workdir.mkdir()
  workdir.chmod(0o555)
  docs = write_docs(tmp_path / "docs.jsonl")
  assert_user_error(cli("--config.mode=compile", f"--config.compile.input={docs}", workdir=workdir),
                    "not writable")
  assert_user_error(cli("--config.train.steps=1", workdir=workdir), "not writable")


# ---------------------------------------------------------------------------------------------------------
# Modes called directly: the check comes before the model (`no_model`).
# ---------------------------------------------------------------------------------------------------------
def test_writable_dir(tmp_path, monkeypatch):
  assert fileio.writable_dir(tmp_path / "new" / "deeper", "the bank") == tmp_path / "new" / "deeper"
  assert not (tmp_path / "new").exists()  # checked, not made
  (tmp_path / "file").write_text("x")
  with pytest.raises(UserError, match="the bank .*file is a file, not a folder"):
    fileio.writable_dir(tmp_path / "file", "the bank")
  with pytest.raises(UserError, match="file is a file, not a folder"):
    fileio.writable_dir(tmp_path / "file" / "sub", "the bank")
  monkeypatch.setattr(os, "access", lambda *a, **kw: False)
  with pytest.raises(UserError, match="not writable"):
    fileio.writable_dir(tmp_path / "new", "the bank")


@pytest.mark.parametrize("mode,sections,needle", [
    ("train", {}, "not a folder"),
    ("compile", {"compile": {"input": "DOCS"}}, "not a folder"),
    ("generate", {}, "not a folder"),
    ("plan", {}, "not a folder"),
    ("export", {"export": {"source": "EXPORT"}}, "not a folder"),
])
def test_workdir_is_a_file_before_the_model(tmp_path, no_model, mode, sections, needle):
  workdir = tmp_path / "workdir"
  workdir.write_text("x")
  docs = write_docs(tmp_path / "docs.jsonl")
  export = tmp_path / "export"
  export.mkdir()
  (export / "params").mkdir()
  for values in sections.values():
    for k, v in values.items():
      values[k] = {"DOCS": str(docs), "EXPORT": str(export)}.get(v, v)
  with pytest.raises(UserError, match=needle):
    modes.MODES[mode](config(mode, **sections), workdir)


def test_unwritable_bank_and_outputs_before_the_model(tmp_path, no_model):
  file = tmp_path / "file"
  file.write_text("x")
  docs = write_docs(tmp_path / "docs.jsonl")
  with pytest.raises(UserError, match="atom bank"):
    modes.compile_documents(config("compile", compile={"input": str(docs), "bank": str(file / "bank")}), None)
  (tmp_path / "stuff").mkdir()
  (tmp_path / "stuff" / "notes.txt").write_text("mine")
  with pytest.raises(UserError, match="not an empty directory"):
    modes.compile_documents(config("compile", compile={"input": str(docs), "bank": str(tmp_path / "stuff")}), None)
  with pytest.raises(UserError, match="no manifest"):
    modes.ask(config("ask", ask={"bank": str(tmp_path / "stuff"), "question": "Who?"}), None)
  export = tmp_path / "export"
  (export / "params").mkdir(parents=True)
  with pytest.raises(UserError, match="export"):
    modes.export(config("export", export={"source": str(export), "output": str(file / "out")}), None)
  with pytest.raises(UserError, match="no atom bank"):
    modes.export(config("export", export={"source": str(export), "output": str(tmp_path / "out"), "question": "Who?",
                                          "bank": str(tmp_path / "absent"), "peft_output": str(tmp_path / "p")}),
                 None)
  with pytest.raises(UserError, match="PEFT"):
    modes.export(config("export", export={"source": str(export), "output": str(tmp_path / "out"), "question": "Who?",
                                          "document": "Some text.", "peft_output": str(file / "peft")}), None)
  with pytest.raises(UserError, match="evaluation"):
    modes.evaluate(config("eval", eval={"output": str(file / "eval")}), None)


@pytest.mark.parametrize("mode,section,field,value", [
    ("generate", "generate", "max_new_tokens", 0),
    ("generate", "generate", "temperature", -1.0),
    ("generate", "generate", "top_p", 0.0),
    ("generate", "generate", "top_p", 1.5),
    ("generate", "generate", "truncation", "right"),
    ("ask", "ask", "max_new_tokens", -1),
    ("compile", "atoms", "code_dtype", "float16"),
    ("compile", "atoms", "key_dtype", "int8"),
    ("plan", "plan", "devices", -1),
    ("plan", "plan", "device_memory_gb", 0.0),
    ("plan", "plan", "bank_atoms", -5),
    ("plan", "plan", "doc_tokens", 0),
    ("plan", "plan", "answer_tokens", -2),
    ("plan", "data", "documents_per_step", 0),
    ("plan", "atoms", "code_dtype", "float16"),
])
def test_senseless_values(tmp_path, no_model, mode, section, field, value):
  c = config(mode, **{section: {field: value}})
  c.compile.input = str(write_docs(tmp_path / "docs.jsonl"))
  c.compile.bank = str(tmp_path / "bank")
  c.ask.bank, c.ask.question = str(tmp_path / "bank"), "Who?"
  with pytest.raises(UserError, match=field if section != "atoms" else "dtype"):
    modes.MODES[mode](c, None)
