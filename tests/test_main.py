"""The command line: the generate mode end to end, and one clear error line for each kind of bad input."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests.cli_helpers import assert_user_error

ROOT = pathlib.Path(__file__).resolve().parents[1]


def cli(*overrides, workdir=None):
  """The quickstart config; mode generate unless an override names another."""
  mode = [] if any(o.startswith("--config.mode=") for o in overrides) else ["--config.mode=generate"]
  cmd = [sys.executable, "-m", "doc2atom_jax.main", "--config=configs/quickstart.py",
         "--config.generate.max_new_tokens=4", *mode, *overrides]
  if workdir:
    cmd.append(f"--workdir={workdir}")
  env = dict(os.environ, XLA_FLAGS="")  # one device is enough here
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


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


# ---------------------------------------------------------------------------------------------------------
# compile and ask.
# ---------------------------------------------------------------------------------------------------------
DOCS = [{"doc_id": "orlen", "text": "The Orlen Observatory was founded in 1871 by the astronomer Maria Delvane. "
                                    "It stands above the town of Kestrava."},
        {"doc_id": "tarnow", "text": "Mira Oskel founded the Tarnow Institute in Daskel. It has 412 employees."}]
TINY = ("--config.model.name=tiny-random-llama", "--config.compiler.code_dim=32", "--config.compiler.copy_dim=8",
        "--config.compiler.width=32", "--config.compiler.key_dim=16", "--config.compiler.num_blocks=1")


def write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def snapshot(folder):
  return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_compile_then_ask_and_the_bank_guards(tmp_path):
  docs = write_jsonl(tmp_path / "docs.jsonl", DOCS)
  result = cli("--config.mode=compile", f"--config.compile.input={docs}", *TINY, workdir=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  bank = tmp_path / "banks" / "docs"
  assert (bank / "manifest.json").exists() and "2 documents" in result.stdout

  result = cli("--config.mode=ask", f"--config.ask.bank={bank}", "--config.ask.question=Who founded Tarnow?",
               "--config.ask.max_new_tokens=3", *TINY)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Q: Who founded Tarnow?" in result.stdout and result.stdout.count("\n  0.") == 4  # k = 4 atoms listed

  before = snapshot(bank)
  # Compiling the same documents again skips them (resumable); other text under a stored id is refused.
  again = cli("--config.mode=compile", f"--config.compile.input={docs}", *TINY, workdir=tmp_path)
  assert again.returncode == 0 and "skipped 2 already in the bank" in again.stdout, again.stderr[-3000:]
  assert snapshot(bank) == before
  write_jsonl(docs, [DOCS[0], dict(DOCS[1], text="Mira Oskel founded it.")])
  assert_user_error(cli("--config.mode=compile", f"--config.compile.input={docs}", *TINY, workdir=tmp_path),
                    "'tarnow'", "other text")
  # Another compiler (seed) cannot read this bank.
  assert_user_error(cli("--config.mode=ask", f"--config.ask.bank={bank}", "--config.ask.question=Who?",
                        "--config.seed=1", *TINY), "another model/compiler")
  assert snapshot(bank) == before
  # A damaged shard is detected.
  shard = next((bank / "shards").iterdir())
  data = bytearray(shard.read_bytes())
  data[len(data) // 2] ^= 0xFF
  shard.write_bytes(bytes(data))
  assert_user_error(cli("--config.mode=ask", f"--config.ask.bank={bank}", "--config.ask.question=Who?", *TINY),
                    shard.name)


@pytest.mark.parametrize("lines,needle", [
    (['{"doc_id": "a", "text": "Fine."}', '{"doc_id": "b", "text": '], "docs.jsonl:2: not valid JSON"),
    (['{"doc_id": "a", "text": "   "}'], "empty"),
    (['{"doc_id": "a", "body": "x"}'], '"text"'),
])
def test_bad_document_files_write_no_bank(tmp_path, lines, needle):
  docs = tmp_path / "docs.jsonl"
  docs.write_text("\n".join(lines) + "\n")
  assert_user_error(cli("--config.mode=compile", f"--config.compile.input={docs}", *TINY, workdir=tmp_path), needle)
  assert not (tmp_path / "banks").exists()


def test_compile_and_ask_on_the_bundled_model(tmp_path):
  """As a newcomer runs it from the README: SmolLM2, the quickstart config, an untrained compiler."""
  docs = write_jsonl(tmp_path / "docs.jsonl", DOCS)
  result = cli("--config.mode=compile", f"--config.compile.input={docs}", workdir=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  result = cli("--config.mode=ask", f"--config.ask.bank={tmp_path}/banks/docs",
               "--config.ask.question=Who founded the Orlen Observatory?", "--config.ask.max_new_tokens=8")
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.startswith("Q: Who founded the Orlen Observatory?\nA: ")
  assert "orlen[" in result.stdout or "null atom" in result.stdout


# ---------------------------------------------------------------------------------------------------------
# train.
# ---------------------------------------------------------------------------------------------------------
def test_train_mode_survives_a_real_sigterm_and_resumes(tmp_path):
  total_steps = 60  # tiny steps take ~0.1 s once compiled: enough of them that the signal lands mid-run
  import signal
  import time

  cmd = [sys.executable, "-m", "doc2atom_jax.main", "--config=configs/tiny.py", f"--workdir={tmp_path}",
         f"--config.train.steps={total_steps}", "--config.train.checkpoint_every=100"]
  env = dict(os.environ, XLA_FLAGS="")
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  log = tmp_path / "metrics.jsonl"
  deadline = time.time() + 500
  while time.time() < deadline and proc.poll() is None:
    if log.exists() and len(log.read_text().splitlines()) >= 2:
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.5)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert "SIGTERM: saved step" in out
  saved = int(out.split("SIGTERM: saved step ")[1].split(";")[0])
  assert 2 <= saved < total_steps and (tmp_path / "checkpoints" / str(saved)).is_dir()

  resumed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from step {saved}" in resumed.stdout
  steps = [json.loads(l)["step"] for l in log.read_text().splitlines()]
  assert steps == list(range(1, total_steps + 1))
  # Another configuration in the same workdir is refused.
  assert_user_error(cli("--config.mode=train", *TINY, "--config.loss.kd=0.5", workdir=tmp_path),
                    "different configuration")

  # The finished run exported its parameters; compile and ask use them.
  export = tmp_path / "export"
  assert (export / "params").is_dir() and "exported the trained compiler" in resumed.stdout
  docs = write_jsonl(tmp_path / "docs.jsonl", DOCS)
  tiny_cfg = [sys.executable, "-m", "doc2atom_jax.main", "--config=configs/tiny.py", f"--config.params={export}"]
  compiled = subprocess.run(tiny_cfg + ["--config.mode=compile", f"--config.compile.input={docs}",
                                        f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, env=env)
  assert compiled.returncode == 0 and "loaded trained compiler" in compiled.stdout, compiled.stderr[-3000:]
  asked = subprocess.run(tiny_cfg + ["--config.mode=ask", f"--config.ask.bank={tmp_path}/banks/docs",
                                     "--config.ask.question=Who founded Tarnow?", "--config.ask.max_new_tokens=3"],
                         cwd=ROOT, capture_output=True, text=True, env=env)
  assert asked.returncode == 0 and "Q: Who founded Tarnow?" in asked.stdout, asked.stderr[-3000:]
  untrained = subprocess.run(tiny_cfg[:-1] + ["--config.mode=ask", f"--config.ask.bank={tmp_path}/banks/docs",
                                              "--config.ask.question=Who?"], cwd=ROOT, capture_output=True,
                             text=True, env=env)
  assert_user_error(untrained, "another model/compiler")


def test_unknown_config_variant_is_one_error_line():
  cmd = [sys.executable, "-m", "doc2atom_jax.main", "--config=configs/quickstart.py:lora"]
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, XLA_FLAGS=""),
                          timeout=300)
  assert_user_error(result, "unknown config variant 'lora'", "d2l_atom")


@pytest.mark.parametrize("module, extra", [("doc2atom_jax.main", ["--config=configs/tiny.py"]),
                                           ("doc2atom_jax.bench", ["--config=configs/bench.py:tiny"]),
                                           ("doc2atom_jax.experiment", ["report", "--dry-run"])])
def test_a_stray_argument_is_one_error_line_on_every_entry_point(module, extra):
  """One flag parser (cli.py) for the three entry points: a stray positional argument is one line, exit 2
  (it was 14 lines of usage and exit 1)."""
  result = subprocess.run([sys.executable, "-m", module, *extra, "stray"], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, XLA_FLAGS=""), timeout=300)
  assert_user_error(result, "unexpected argument(s): stray")
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_experiment_without_a_stage_and_a_bad_flag(tmp_path):
  result = subprocess.run([sys.executable, "-m", "doc2atom_jax.experiment", f"--root={tmp_path}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  assert_user_error(result, "name a stage", "all")
  result = subprocess.run([sys.executable, "-m", "doc2atom_jax.experiment", "all", "--dryrun"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  assert_user_error(result, "bad flags", "dryrun")


def test_bench_is_a_mode_of_main_too(tmp_path):
  """`python -m doc2atom_jax.main --config=configs/bench.py` runs the benchmark (mode=bench); a config without a
  bench section is one error line."""
  result = subprocess.run([sys.executable, "-m", "doc2atom_jax.main", "--config=configs/tiny.py",
                           "--config.mode=bench", f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, XLA_FLAGS=""), timeout=300)
  assert_user_error(result, "no `bench` section")
