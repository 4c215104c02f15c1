"""The command line: the generate mode end to end, and one clear error line for each kind of bad input."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def cli(*overrides, workdir=None):
  cmd = [sys.executable, "-m", "doc2atom_jax.main", "--config=configs/quickstart.py",
         "--config.generate.max_new_tokens=4", *overrides]
  if workdir:
    cmd.append(f"--workdir={workdir}")
  env = dict(os.environ, XLA_FLAGS="")  # one device is enough here
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


def assert_user_error(result, *needles):
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  assert "Traceback" not in result.stderr, result.stderr
  lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1, result.stderr
  for needle in needles:
    assert needle in lines[0], lines[0]


def test_generate_mode_writes_answers(tmp_path):
  result = cli("--config.model.name=tiny-random-llama", workdir=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(l) for l in (tmp_path / "generate.jsonl").read_text().splitlines()]
  assert [r["question"] for r in records][:2] == ["Who founded the Orlen Observatory?",
                                                  "In which year was the Orlen Observatory founded?"]
  assert all(r["model"] == "tiny-random-llama" for r in records)
  assert result.stdout.count("A: ") == len(records) == 3


def test_config_typo_is_one_clear_error():
  assert_user_error(cli("--config.model.nmae=tiny-random-llama"), "nmae", "name")


def test_unknown_model_lists_valid_names():
  assert_user_error(cli("--config.model.name=llama-9000"), "llama-9000", "smollm2-135m-instruct")


def test_missing_hf_folder(tmp_path):
  assert_user_error(cli(f"--config.model.name=hf:{tmp_path}/absent"), "does not exist")


@pytest.mark.parametrize("content,needle", [(b"caf\xe9 au lait", "not valid UTF-8"), (None, "file not found")])
def test_bad_document_files(tmp_path, content, needle):
  path = tmp_path / "doc.txt"
  if content is not None:
    path.write_bytes(content)
  assert_user_error(cli("--config.model.name=tiny-random-llama", f"--config.generate.document_file={path}"),
                    needle)


def test_empty_question_and_too_long_prompt(tmp_path):
  assert_user_error(cli("--config.model.name=tiny-random-llama", "--config.generate.question= "), "empty question")
  long_doc = tmp_path / "long.txt"
  long_doc.write_text("word " * 500)  # 2,500 byte-level tokens > the tiny model's 2,048 context
  args = ("--config.model.name=tiny-random-llama", f"--config.generate.document_file={long_doc}")
  assert_user_error(cli(*args), "context")
  assert cli(*args, "--config.generate.truncation=left").returncode == 0
