"""The trainer: one loop that reads top to bottom — mesh, model, data, state, step, restore, loop.

Only the compiler and router train; the frozen base weights are a sharded, non-donated argument of the
jitted step. The data order is a pure function of (seed, global step) — `documents_for_step(step)` —
so a resumed run sees exactly the batches an uninterrupted run would. SIGTERM finishes the current step,
saves a checkpoint, waits for it and returns normally (exit status 0). Each checkpoint gets its checksums once
it has committed (checkpoint.py); a resume skips (and deletes) a checkpoint that is unreadable or differs from
them, and drops the logged records past the step it resumes from, which run again.

On P processes (`distributed`) each process builds its share of a step's documents; the shares are padded to
shapes every process agrees on and assembled into one global batch, so the step, the checkpoints and the numbers
are those of one process holding all the devices. Only process 0 writes logs, events and the progress bar;
checkpoint saves are collective (Orbax writes from the primary host), and a checkpoint resumes on any number of
processes.
"""

import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tqdm
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from doc2atom_jax import checkpoint, distributed, fileio, parallel, preemption
from doc2atom_jax.errors import UserError
from doc2atom_jax.train import batch as batch_lib
from doc2atom_jax.train import state_cache as state_cache_lib
from doc2atom_jax.train import step as step_lib
from doc2atom_jax.train import teacher as teacher_lib

QUESTION_FIELDS = frozenset(k for k in step_lib.BATCH_FIELDS if not (k.startswith("doc_") or k.startswith("atom_"))
                            ) | {"doc_of_q"}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 100
  learning_rate: float = 1e-3
  warmup_steps: int = 20
  schedule: str = "cosine"  # after warmup: cosine decay to 10% of learning_rate, or constant
  weight_decay: float = 0.01
  clip_norm: float = 1.0
  accumulate: int = 1
  checkpoint_every: int = 50
  keep_checkpoints: int = 3
  max_nonfinite: int = 5  # consecutive skipped steps before aborting
  mesh: tuple[int, int, int] = (-1, 1, 1)  # data, fsdp, tensor
  rules: tuple = parallel.DEFAULT_RULES  # logical axis -> mesh axes (parallel.rules_for(config.sharding...))
  allow_config_change: bool = False  # resume a workdir whose checkpoint came from another config
  eval_every: int = 0  # steps between held-out evaluations (`eval_fn`); 0 = none during training
  state_cache: bool = False  # documents' frozen states from the document-state cache (train/state_cache.py)


METRICS_FILE, EVAL_FILE = "metrics.jsonl", "eval.jsonl"  # in the workdir, one JSON record a line with its "step"


def _read_records(path: pathlib.Path) -> list[tuple[str, dict]]:
  """(line, record) of each record of a metrics file; a line cut short by a kill mid-write is skipped."""
  if not path.exists():
    return []
  records = []
  for line in path.read_text(encoding="utf-8").splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(record, dict) and isinstance(record.get("step"), int):
      records.append((line, record))
  return records


def _truncate_records(path: pathlib.Path, step: int) -> None:
  """Drops the records past `step` (atomically): those steps run again and log again."""
  if path.exists():
    fileio.atomic_write_text(path, "".join(line + "\n" for line, r in _read_records(path) if r["step"] <= step))


def run_trajectory(workdir, history: list[dict]) -> list[dict]:
  """The whole run's step records: `history` (this process's, as `train` returns it) after the records that
  earlier, interrupted processes of the run logged to metrics.jsonl before it (up to the checkpoint it resumed
  from: `train` dropped the later ones; every step, with log_every=1 as mode=train logs). A process without the
  file (only process 0 writes it) has its own."""
  first = history[0]["step"] if history else float("inf")
  return [r for _, r in _read_records(pathlib.Path(workdir) / METRICS_FILE) if r["step"] < first] + list(history)


def summary_line(trajectory: list[dict]) -> str | None:
  """Means of the first and the last quarter of the steps (batches differ step to step), or None under 4 steps."""
  if len(trajectory) < 4:
    return None
  q = len(trajectory) // 4
  mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)
  return "  ".join(f"{key} {mean(trajectory[:q], key):.3f} -> {mean(trajectory[-q:], key):.3f}"
                   for key in ("loss", "kd", "route", "route_top1"))


class _NoEvents:
  """The event writer of processes other than 0."""

  def add_scalar(self, *args, **kwargs):
    del args, kwargs

  def close(self):
    pass


def _state_to_tree(params, opt_state, step, mesh):
  # The step replicated over the mesh: Orbax saves no process-local array in a multi-process run.
  step = jax.device_put(np.asarray(step, np.int32), NamedSharding(mesh, PartitionSpec()))
  return {"params": nnx.to_pure_dict(params), "opt_state": opt_state, "step": step}


# Settings that change how a step is computed, not its numbers (fast paths; storage at answer time): a run
# resumes with them changed, and checkpoints written before a setting existed still match.
HOW_NOT_WHAT = {"model": ("scan_layers", "attention_block", "remat"), "loss": ("vocab_chunk",),
                "atoms": ("route_approx", "compose_form", "code_dtype", "key_dtype", "route_score", "abstain",
                          "abstain_false_refusal")}


def comparable_meta(run_meta: dict | None) -> dict | None:
  """The run description without the `HOW_NOT_WHAT` settings: what must match for a checkpoint to resume."""
  if not isinstance(run_meta, dict):
    return run_meta
  out = dict(run_meta)
  for section, fields in HOW_NOT_WHAT.items():
    if isinstance(out.get(section), dict):
      out[section] = {k: v for k, v in out[section].items() if k not in fields}
  return out


def _restore(manager, directory, abstract, run_meta, allow_change, layout):
  """Latest readable checkpoint (falling back to older ones when the newest is damaged), or None."""
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      checkpoint.verify_step(directory, step)  # Orbax reads altered bytes without a word
      with checkpoint.quiet_failed_reads():
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                  meta=ocp.args.JsonRestore()))
    except Exception as e:  # a truncated, corrupt or altered checkpoint: say so, drop it, try the previous one
      print(f"checkpoint {step} unreadable ({checkpoint.one_line(e)}); deleting it, trying an older one")
      manager.delete(step)
      continue
    if comparable_meta(restored.meta.get("run")) != comparable_meta(run_meta) and not allow_change:
      raise UserError(f"{manager.directory} holds a checkpoint of a different configuration; use another "
                      "--workdir, or set train.allow_config_change=True to resume from it anyway")
    if restored.meta.get("layout", layout) != layout:  # supported: the data order is a function of seed and step
      print(f"checkpoint {step} was written on {restored.meta['layout']}; resuming on {layout}")
    return restored.state
  return None


def train(system, documents_for_step, tcfg: TrainConfig, loss_cfg: step_lib.LossConfig, workdir, *,
          run_meta: dict, log_every: int = 1, eval_fn=None, num_questions: int | None = None) -> list[dict]:
  """Trains `system.compiler` and `system.router` in place; returns the logged metrics of this process.

  num_questions pads the question rows of a step's global batch (each of P processes builds 1/P of them).
  eval_fn(compiler, router) -> {name: number}, run every `tcfg.eval_every` steps on copies of the current
  modules (the live parameters are donated to the next step); logged to eval.jsonl and TensorBoard `eval/`.
  """
  workdir = pathlib.Path(workdir)
  model = system.model
  local_questions = None if num_questions is None else distributed.share(num_questions, "question rows a step")

  # ---- Mesh ----------------------------------------------------------------------------------------------
  mesh = parallel.make_mesh(tcfg.mesh)

  # ---- State -------------------------------------------------------------------------------------------
  graphdef, params = nnx.split((system.compiler, system.router))
  optimizer = step_lib.make_optimizer(tcfg.learning_rate, tcfg.warmup_steps, tcfg.steps, tcfg.weight_decay,
                                      tcfg.clip_norm, tcfg.accumulate, tcfg.schedule)
  p_sh = parallel.state_shardings(params, mesh, tcfg.rules)
  params = jax.device_put(params, p_sh)
  opt_state, o_sh = parallel.optimizer_state(optimizer, params, p_sh, mesh)
  w_sh = parallel.module_weight_shardings(model.decoder, mesh, tcfg.rules)
  base_weights = jax.device_put(model.weights, w_sh)

  # ---- Step ----------------------------------------------------------------------------------------------
  def step_fn(params, opt_state, weights, batch):
    return step_lib.train_step(params, opt_state, weights, batch, graphdef=graphdef, model_cfg=model.config,
                               loss_cfg=loss_cfg, optimizer=optimizer)

  compiled, floor = {}, {}

  def run_step(params, opt_state, batch):
    nonlocal floor
    batch, floor = distributed.agree_on_shapes(batch, floor)  # a collective step needs equal shapes everywhere
    # doc_of_q counts this process's documents; in the global batch they follow the lower processes' documents.
    batch["doc_of_q"] = batch["doc_of_q"] + jax.process_index() * batch["doc_tokens"].shape[0]
    batch, b_sh = distributed.global_batch(
        batch, lambda shapes: parallel.batch_shardings(shapes, mesh, QUESTION_FIELDS, tcfg.rules))
    key = tuple((k, v.shape) for k, v in sorted(batch.items()))
    if key not in compiled:
      compiled[key] = jax.jit(step_fn, in_shardings=(p_sh, o_sh, w_sh, b_sh), out_shardings=(p_sh, o_sh, None),
                              donate_argnums=(0, 1))
      if jax.process_count() > 1:  # compile, then start together: gloo wants all processes at a first run in 30 s
        compiled[key] = compiled[key].lower(params, opt_state, base_weights, batch).compile()
        distributed.barrier("step compiled")
    return compiled[key](params, opt_state, base_weights, batch)

  # ---- Restore -------------------------------------------------------------------------------------------
  log_path, eval_path = workdir / METRICS_FILE, workdir / EVAL_FILE
  directory = checkpoint.checkpoints_dir(workdir).absolute()
  distributed.barrier("checkpoint manager")  # Orbax's first barriers are collectives (see distributed.barrier)
  manager = ocp.CheckpointManager(
      directory, item_names=checkpoint.ITEMS,
      options=ocp.CheckpointManagerOptions(max_to_keep=tcfg.keep_checkpoints, enable_async_checkpointing=True))
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_to_tree(params, opt_state, 0, mesh))
  main = distributed.is_main_process()
  layout = {"processes": jax.process_count(), "devices": jax.device_count(), "mesh": dict(mesh.shape)}
  restored = _restore(manager, directory, abstract, run_meta, tcfg.allow_config_change, layout)
  start = 0
  if restored is not None:
    nnx.replace_by_pure_dict(params, restored["params"])
    params = jax.device_put(params, p_sh)
    opt_state = jax.device_put(restored["opt_state"], o_sh)
    start = int(restored["step"])
    print(f"resumed from step {start}")
  if main:  # steps after the checkpoint (every step, without one) run again: drop their records
    for path in (log_path, eval_path):
      _truncate_records(path, start)

  unverified = []  # the step saved in the background, its checksums not yet written

  def write_checksums(wait: bool = True):
    """The checksums of the step saved in the background, once it has committed (process 0's files, like the
    logs); without `wait`, only if it has committed already."""
    if not unverified or (not wait and manager.is_saving_in_progress()):
      return
    manager.wait_until_finished()
    if main and (directory / str(unverified[0])).is_dir():
      checkpoint.write_checksums(directory / str(unverified[0]))
    unverified.clear()

  def save(step):
    write_checksums()  # the previous save's (Orbax would wait for it here anyway)
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_state_to_tree(params, opt_state, step, mesh)),
        meta=ocp.args.JsonSave({"run": run_meta, "step": step, "layout": layout})), force=True)
    unverified.append(step)

  # ---- Loop ----------------------------------------------------------------------------------------------
  cache = teacher_lib.TeacherCache.for_model(model)  # keyed by model, dtype, rendered template, answer format
  states = state_cache_lib.DocumentStateCache.for_model(model) if tcfg.state_cache else None
  sigterm = preemption.SigtermFlag()
  from tensorboardX import SummaryWriter  # local: only the trainer writes events

  events = SummaryWriter(str(workdir / "tensorboard")) if main else _NoEvents()
  history, nonfinite = [], 0
  bar = tqdm.tqdm(range(start, tcfg.steps), initial=start, total=tcfg.steps, desc="train", dynamic_ncols=True,
                  disable=not main)
  try:
    for step in bar:
      t0 = time.perf_counter()
      batch = batch_lib.build(model, documents_for_step(step), cache=cache, num_questions=local_questions,
                              evidence_teacher=loss_cfg.atom > 0 and loss_cfg.atom_target == "teacher", states=states)
      params, opt_state, metrics = run_step(params, opt_state, batch)
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      nonfinite = 0 if metrics["finite"] else nonfinite + 1
      if nonfinite > tcfg.max_nonfinite:
        raise UserError(f"{nonfinite} consecutive steps with a non-finite loss (last at step {step}); "
                        "lower the learning rate or check the data")
      record = {"step": step + 1, **metrics, "step_time_s": time.perf_counter() - t0,
                "tokens_per_s": distributed.process_sum(batch["s_mask"].sum() + batch["doc_mask"].sum())
                                / (time.perf_counter() - t0)}
      history.append(record)
      if main and (step + 1) % log_every == 0:
        with open(log_path, "a", encoding="utf-8") as f:
          f.write(json.dumps(record) + "\n")
        for key, value in record.items():
          if key != "step":
            events.add_scalar(f"train/{key}", value, step + 1)
      bar.set_postfix(loss=f"{metrics['loss']:.3f}", kd=f"{metrics['kd']:.3f}", top1=f"{metrics['route_top1']:.2f}")
      write_checksums(wait=False)  # within a step of the commit: a kill in between leaves one unverified
      done = step + 1
      # read once, agreed by all processes: a signal arriving later is honoured after the next step
      stopping = distributed.any_process(sigterm.requested)
      if stopping or done % tcfg.checkpoint_every == 0 or done == tcfg.steps:
        save(done)
      if stopping:
        print(f"SIGTERM: saved step {done}; exiting")
        break
      if eval_fn is not None and tcfg.eval_every and done % tcfg.eval_every == 0:
        compiler, router = nnx.merge(graphdef, jax.tree.map(jnp.copy, distributed.host_local(params)))
        result = {"step": done, **{k: float(v) for k, v in eval_fn(compiler, router).items()}}
        if not main:  # every process evaluated (the same numbers); process 0 writes them
          continue
        with open(eval_path, "a", encoding="utf-8") as f:
          f.write(json.dumps(result) + "\n")
        for key, value in result.items():
          if key != "step":
            events.add_scalar(f"eval/{key}", value, done)
        bar.write("eval at step " + "  ".join(f"{k} {v:.3f}" if k != "step" else str(v) for k, v in result.items()))
  finally:
    events.close()
    write_checksums()
    manager.close()
    sigterm.restore()
    bar.close()
  nnx.update((system.compiler, system.router), distributed.host_local(params))  # process-local on P processes
  return history
