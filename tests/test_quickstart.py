"""The main job as a newcomer runs it (README command 1), bounded: the bundled SmolLM2, a handful of steps,
train -> held-out evaluation with the learning check -> params-only Orbax export, then the export in use."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quickstart_main_job_end_to_end_on_the_bundled_model(tmp_path):
  cmd = [sys.executable, "-m", "doc2atom_jax.main", "--config=configs/quickstart.py", f"--workdir={tmp_path}",
         "--config.train.steps=3", "--config.train.checkpoint_every=3", "--config.data.train_documents=40",
         "--config.eval.documents=2", "--config.eval.max_new_tokens=4"]
  env = dict(os.environ, XLA_FLAGS="")
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=1200)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "| doc2atom |" in out and "learning check:" in out and "| atoms of another document |" in out, out

  steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2, 3]
  report = json.loads((tmp_path / "results.json").read_text())
  assert set(report["methods"]) == {"no_context", "in_context", "doc2atom", "doc2atom_oracle", "default_only",
                                      "wrong_document"}
  assert report["methods"]["in_context"]["nll"] < report["methods"]["no_context"]["nll"]  # the teacher knows more
  controls = ["untrained compiler", "default adapter only", "atoms of another document"]
  assert [(r["metric"], r["control"]) for r in report["learning_check"]] == [
      (m, c) for m in ("kl", "tf_em") for c in controls]
  assert all(isinstance(r["passed"], bool) for r in report["learning_check"])

  export = tmp_path / "export"
  assert (export / "params").is_dir() and json.loads((export / "export.json").read_text())["step"] == 3
  question = "Who founded the Orlen Observatory?"
  docs = tmp_path / "docs.jsonl"
  from configs.quickstart import DOCUMENT
  docs.write_text(json.dumps({"doc_id": "orlen", "text": DOCUMENT}) + "\n")
  common = [sys.executable, "-m", "doc2atom_jax.main", "--config=configs/quickstart.py", f"--config.params={export}"]
  compiled = subprocess.run([*common, "--config.mode=compile", f"--config.compile.input={docs}",
                             f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
  assert compiled.returncode == 0, compiled.stderr[-3000:]
  asked = subprocess.run([*common, "--config.mode=ask", f"--config.ask.bank={tmp_path}/banks/docs",
                          f"--config.ask.question={question}", "--config.ask.max_new_tokens=6"],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
  assert asked.returncode == 0, asked.stderr[-3000:]
  assert f"Q: {question}\nA: " in asked.stdout and "loaded trained compiler" in asked.stdout
