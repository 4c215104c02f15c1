"""The trainer: checkpoints, SIGTERM mid-run and resume on the same trajectory, damaged checkpoints."""

import json
import os
import signal

import jax.numpy as jnp
import numpy as np
import pytest

from doc2atom_jax.atoms import atomize, pipeline
from doc2atom_jax.atoms import compiler as compiler_lib
from doc2atom_jax.errors import UserError
from doc2atom_jax.models import base
from doc2atom_jax.data import records
from doc2atom_jax.train import step as step_lib
from doc2atom_jax.train import trainer

FACTS = [("Velkor Amsten was born in 1943.", "When was Velkor Amsten born?", "1943"),
         ("Mira Oskel founded the Tarnow Institute.", "Who founded the Tarnow Institute?", "Mira Oskel"),
         ("The Orlen Lens weighs 12 kilograms.", "How much does the Orlen Lens weigh?", "12 kilograms"),
         ("Daskel is a coastal city in Vorland.", "Where is Daskel?", "Vorland")]
TCFG = trainer.TrainConfig(steps=6, learning_rate=3e-3, warmup_steps=1, checkpoint_every=2)
LOSS = step_lib.LossConfig(k=2)


def make_system():
  model = base.tiny_random("llama")
  cfg = compiler_lib.config_for(model.config, code_dim=32, width=32, key_dim=16, num_blocks=1, num_heads=2)
  return pipeline.AtomSystem.create(model, cfg, pipeline.MethodConfig(k=2))


def documents_for_step(model, step, on_step=None):
  """A pure function of the step: which facts form the document, in which order."""
  if on_step:
    on_step(step)
  order = np.random.default_rng(step).permutation(len(FACTS))[:3]
  facts = [FACTS[i] for i in order]
  text = " ".join(f[0] for f in facts)
  doc = atomize.atomize_given(text, f"doc{step}", model.tokenizer, [f[0] for f in facts])
  qs = tuple(records.TrainQuestion(f"q{i}", f[1], f[2], (i,)) for i, f in enumerate(facts))
  return [records.TrainDocument(doc, qs)]


def run(workdir, on_step=None, tcfg=TCFG, meta=None, eval_fn=None):
  system = make_system()
  return trainer.train(system, lambda s: documents_for_step(system.model, s, on_step), tcfg, LOSS, workdir,
                       run_meta=meta or {"config": "tiny"}, eval_fn=eval_fn)


def test_sigterm_then_resume_follows_the_uninterrupted_trajectory(tmp_path):
  full = run(tmp_path / "full")
  assert [r["step"] for r in full] == [1, 2, 3, 4, 5, 6]

  def term_at_3(step):
    if step == 2:  # during the third step: it completes, is saved, and the run stops
      os.kill(os.getpid(), signal.SIGTERM)

  interrupted = run(tmp_path / "resumed", on_step=term_at_3)
  assert [r["step"] for r in interrupted] == [1, 2, 3]
  resumed = run(tmp_path / "resumed")
  assert [r["step"] for r in resumed] == [4, 5, 6]
  for a, b in zip(full[3:], resumed):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
  logged = [json.loads(l)["step"] for l in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
  assert list((tmp_path / "resumed" / "tensorboard").glob("events.out.tfevents.*"))
  assert logged == [1, 2, 3, 4, 5, 6]

  # A truncated newest checkpoint: the previous one is used.
  ckpt = tmp_path / "resumed" / "checkpoints"
  newest = max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
  for f in (ckpt / str(newest) / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 100:
      f.write_bytes(f.read_bytes()[:50])
  again = run(tmp_path / "resumed", tcfg=TCFG.__class__(**{**TCFG.__dict__, "steps": 7}))
  assert again[0]["step"] < newest + 1

  with pytest.raises(UserError, match="different configuration"):
    run(tmp_path / "full", meta={"config": "another"}, tcfg=TCFG.__class__(**{**TCFG.__dict__, "steps": 8}))


def test_resume_onto_a_different_mesh(tmp_path):
  """A checkpoint written on one device layout resumes on another (8 simulated devices, 2x2x2)."""
  first = run(tmp_path, tcfg=TCFG.__class__(**{**TCFG.__dict__, "steps": 2, "mesh": (8, 1, 1)}))
  assert [r["step"] for r in first] == [1, 2]
  resumed = run(tmp_path, tcfg=TCFG.__class__(**{**TCFG.__dict__, "steps": 3, "mesh": (2, 2, 2)}),
                meta={"config": "tiny"})
  assert [r["step"] for r in resumed] == [3] and np.isfinite(resumed[0]["loss"])


def test_periodic_evaluation_sees_the_current_parameters_and_resumes_cleanly(tmp_path):
  seen = []

  def eval_fn(compiler, router):
    seen.append(float(jnp.sum(compiler.head_b[0][...])) + float(jnp.sum(router.w1[...])))
    return {"probe": seen[-1]}

  tcfg = TCFG.__class__(**{**TCFG.__dict__, "steps": 4, "eval_every": 2})
  run(tmp_path, tcfg=tcfg, eval_fn=eval_fn)
  records = [json.loads(l) for l in (tmp_path / "eval.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [2, 4] and [r["probe"] for r in records] == seen
  assert seen[0] != seen[1]  # parameters moved between the two evaluations
  # Resuming from step 4 into a longer run appends, never duplicates.
  run(tmp_path, tcfg=TCFG.__class__(**{**tcfg.__dict__, "steps": 6}), eval_fn=eval_fn)
  assert [json.loads(l)["step"] for l in (tmp_path / "eval.jsonl").read_text().splitlines()] == [2, 4, 6]


def test_fast_path_settings_do_not_block_a_resume():
  """A checkpoint's run description matches a config that differs only in how passes are computed (or that
  predates those settings); any other difference still blocks the resume."""
  saved = {"model": {"name": "m", "scan_layers": False}, "loss": {"kd": 1.0}, "train": {"learning_rate": 1e-3}}
  now = {"model": {"name": "m", "scan_layers": True, "attention_block": 512, "remat": "full"},
         "loss": {"kd": 1.0, "vocab_chunk": 4096}, "train": {"learning_rate": 1e-3}}
  assert trainer.comparable_meta(saved) == trainer.comparable_meta(now)
  other = {**now, "train": {"learning_rate": 3e-4}}
  assert trainer.comparable_meta(saved) != trainer.comparable_meta(other)
  assert trainer.comparable_meta(None) is None
