"""What a run logs across an interruption: metrics.jsonl and eval.jsonl hold each step once after a kill and a
rerun, and mode=train's closing summary of an interrupted and resumed run is the uninterrupted run's."""

import json
import os
import signal

import jax.numpy as jnp
import pytest

from configs import tiny
from doc2atom_jax import modes
from doc2atom_jax.train import data as data_lib
from tests.train import test_trainer as tt


class Killed(Exception):
  """Stands for a kill: the process stops mid-run, past the steps it has logged."""


def steps_in(path) -> list[int]:
  return [json.loads(l)["step"] for l in path.read_text().splitlines()]


def probe(compiler, router):
  del compiler
  return {"probe": float(jnp.sum(router.w1[...]))}


@pytest.mark.parametrize("checkpoint_every,torn", [(10, False), (2, True)],
                         ids=["before-the-first-checkpoint", "after-checkpoint-2-mid-write"])
def test_a_rerun_after_a_kill_logs_each_step_once(tmp_path, checkpoint_every, torn):
  tcfg = tt.TCFG.__class__(**{**tt.TCFG.__dict__, "steps": 4, "checkpoint_every": checkpoint_every,
                              "eval_every": 1})

  def kill_at_4(step):
    if step == 3:  # steps 1-3 are done and logged
      raise Killed

  with pytest.raises(Killed):
    tt.run(tmp_path, on_step=kill_at_4, tcfg=tcfg, eval_fn=probe)
  assert steps_in(tmp_path / "metrics.jsonl") == steps_in(tmp_path / "eval.jsonl") == [1, 2, 3]
  if torn:
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
      f.write('{"step": 4, "loss": 1.')  # a record cut short by the kill

  history = tt.run(tmp_path, tcfg=tcfg, eval_fn=probe)
  assert [r["step"] for r in history] == ([1, 2, 3, 4] if checkpoint_every == 10 else [3, 4])
  assert steps_in(tmp_path / "metrics.jsonl") == steps_in(tmp_path / "eval.jsonl") == [1, 2, 3, 4]


def train_config():
  """configs/tiny.py, 8 steps on generator data, a checkpoint every 2 steps, no held-out evaluation."""
  c = tiny.get_config()
  c.unlock()
  c.data.source = "generator"
  c.train.update(dict(steps=8, warmup_steps=1, checkpoint_every=2, eval_every=0))
  c.eval.documents = 0
  return c


def summary(printed: str) -> str:
  lines = [l for l in printed.splitlines() if l.startswith("loss ") and " -> " in l]
  assert len(lines) == 1, printed
  return lines[0]


def test_the_summary_of_a_resumed_run_is_the_uninterrupted_runs(tmp_path, capsys, monkeypatch):
  modes.train(train_config(), tmp_path / "full")
  uninterrupted = summary(capsys.readouterr().out)

  source_from_config = data_lib.source_from_config

  def sigterm_in_step_3(*args, **kwargs):
    documents_for_step = source_from_config(*args, **kwargs)

    def documents(step, *rest, **named):
      if step == 2:  # the third step completes, is saved, and the run stops
        os.kill(os.getpid(), signal.SIGTERM)
      return documents_for_step(step, *rest, **named)

    return documents

  with monkeypatch.context() as patch:
    patch.setattr(data_lib, "source_from_config", sigterm_in_step_3)
    history = modes.train(train_config(), tmp_path / "resumed")
  assert [r["step"] for r in history] == [1, 2, 3]
  capsys.readouterr()
  history = modes.train(train_config(), tmp_path / "resumed")
  assert [r["step"] for r in history] == [4, 5, 6, 7, 8]
  assert summary(capsys.readouterr().out) == uninterrupted
  assert steps_in(tmp_path / "resumed" / "metrics.jsonl") == list(range(1, 9))
