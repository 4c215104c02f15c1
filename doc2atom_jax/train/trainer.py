"""The trainer: one loop that reads top to bottom — mesh, model, data, state, step, restore, loop.

Only the compiler and router train; the frozen base weights are a sharded, non-donated argument of the
jitted step. The data order is a pure function of (seed, global step) — `documents_for_step(step)` —
so a resumed run sees exactly the batches an uninterrupted run would. SIGTERM finishes the current step,
saves a checkpoint, waits for it and returns normally (exit status 0).
"""

import dataclasses
import json
import pathlib
import signal
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import tqdm
from flax import nnx

from doc2atom_jax import fileio, parallel, paths
from doc2atom_jax.data import prompts
from doc2atom_jax.errors import UserError
from doc2atom_jax.train import batch as batch_lib
from doc2atom_jax.train import step as step_lib
from doc2atom_jax.train import teacher as teacher_lib

QUESTION_FIELDS = frozenset(k for k in step_lib.BATCH_FIELDS if not (k.startswith("doc_") or k.startswith("atom_"))
                            ) | {"doc_of_q"}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 100
  learning_rate: float = 1e-3
  warmup_steps: int = 20
  weight_decay: float = 0.01
  clip_norm: float = 1.0
  accumulate: int = 1
  checkpoint_every: int = 50
  keep_checkpoints: int = 3
  max_nonfinite: int = 5  # consecutive skipped steps before aborting
  mesh: tuple[int, int, int] = (-1, 1, 1)  # data, fsdp, tensor
  allow_config_change: bool = False  # resume a workdir whose checkpoint came from another config
  eval_every: int = 0  # steps between held-out evaluations (`eval_fn`); 0 = none during training


class _Preemption:
  """SIGTERM sets a flag; the loop saves after the current step and returns."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def _state_to_tree(params, opt_state, step):
  return {"params": nnx.to_pure_dict(params), "opt_state": opt_state, "step": jnp.asarray(step, jnp.int32)}


def _restore(manager, abstract, run_meta, allow_change):
  """Latest readable checkpoint (falling back to older ones when the newest is damaged), or None."""
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                meta=ocp.args.JsonRestore()))
    except Exception as e:  # a truncated or corrupt checkpoint: say so, drop it, try the previous one
      print(f"checkpoint {step} unreadable ({type(e).__name__}: {str(e)[:200]}); deleting it, trying an older one")
      manager.delete(step)
      continue
    if restored.meta.get("run") != run_meta and not allow_change:
      raise UserError(f"{manager.directory} holds a checkpoint of a different configuration; use another "
                      "--workdir, or set train.allow_config_change=True to resume from it anyway")
    return restored.state
  return None


def train(system, documents_for_step, tcfg: TrainConfig, loss_cfg: step_lib.LossConfig, workdir, *,
          run_meta: dict, log_every: int = 1, eval_fn=None, num_questions: int | None = None) -> list[dict]:
  """Trains `system.compiler` and `system.router` in place; returns the logged metrics of this process.

  eval_fn(compiler, router) -> {name: number}, run every `tcfg.eval_every` steps on copies of the current
  modules (the live parameters are donated to the next step); logged to eval.jsonl and TensorBoard `eval/`.
  """
  workdir = pathlib.Path(workdir)
  model = system.model

  # ---- Mesh ----------------------------------------------------------------------------------------------
  mesh = parallel.make_mesh(tcfg.mesh)

  # ---- State -------------------------------------------------------------------------------------------
  graphdef, params = nnx.split((system.compiler, system.router))
  optimizer = step_lib.make_optimizer(tcfg.learning_rate, tcfg.warmup_steps, tcfg.steps, tcfg.weight_decay,
                                      tcfg.clip_norm, tcfg.accumulate)
  p_sh = parallel.state_shardings(params, mesh)
  params = jax.device_put(params, p_sh)
  opt_state, o_sh = parallel.on_mesh(jax.jit(optimizer.init)(params), mesh)
  w_sh = parallel.module_weight_shardings(model.decoder, mesh)
  base_weights = jax.device_put(model.weights, w_sh)

  # ---- Step ----------------------------------------------------------------------------------------------
  def step_fn(params, opt_state, weights, batch):
    return step_lib.train_step(params, opt_state, weights, batch, graphdef=graphdef, model_cfg=model.config,
                               loss_cfg=loss_cfg, optimizer=optimizer)

  compiled, floor = {}, {}

  def run_step(params, opt_state, batch):
    nonlocal floor
    batch, floor = batch_lib.pad_up(batch, floor)
    b_sh = parallel.batch_shardings(batch, mesh, QUESTION_FIELDS)
    key = tuple((k, v.shape) for k, v in sorted(batch.items()))
    if key not in compiled:
      compiled[key] = jax.jit(step_fn, in_shardings=(p_sh, o_sh, w_sh, b_sh), out_shardings=(p_sh, o_sh, None),
                              donate_argnums=(0, 1))
    return compiled[key](params, opt_state, base_weights, jax.device_put(batch, b_sh))

  # ---- Restore -------------------------------------------------------------------------------------------
  log_path = workdir / "metrics.jsonl"
  manager = ocp.CheckpointManager(
      (workdir / "checkpoints").absolute(), item_names=("state", "meta"),
      options=ocp.CheckpointManagerOptions(max_to_keep=tcfg.keep_checkpoints, enable_async_checkpointing=True))
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_to_tree(params, opt_state, 0))
  restored = _restore(manager, abstract, run_meta, tcfg.allow_config_change)
  start = 0
  if restored is not None:
    nnx.replace_by_pure_dict(params, restored["params"])
    params = jax.device_put(params, p_sh)
    opt_state = jax.device_put(restored["opt_state"], o_sh)
    start = int(restored["step"])
    print(f"resumed from step {start}")
    for path in (log_path, workdir / "eval.jsonl"):  # steps after the checkpoint run again: drop their records
      if path.exists():
        kept = [l for l in path.read_text().splitlines() if l and json.loads(l)["step"] <= start]
        fileio.atomic_write_text(path, "".join(l + "\n" for l in kept))

  def save(step):
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_state_to_tree(params, opt_state, step)),
        meta=ocp.args.JsonSave({"run": run_meta, "step": step})), force=True)

  # ---- Loop ----------------------------------------------------------------------------------------------
  # Keyed by what the teacher's numbers depend on: model, compute dtype, and the rendered prompt template.
  template = model.chat_prompt(prompts.in_context_prompt("{document}", "{question}"))
  cache = teacher_lib.TeacherCache(paths.cache_root() / "teacher", f"{model.name}/{model.config.dtype}", template)
  preemption = _Preemption()
  from tensorboardX import SummaryWriter  # local: only the trainer writes events

  events = SummaryWriter(str(workdir / "tensorboard"))
  history, nonfinite = [], 0
  bar = tqdm.tqdm(range(start, tcfg.steps), initial=start, total=tcfg.steps, desc="train", dynamic_ncols=True)
  try:
    for step in bar:
      t0 = time.perf_counter()
      batch = batch_lib.build(model, documents_for_step(step), cache=cache, num_questions=num_questions)
      params, opt_state, metrics = run_step(params, opt_state, batch)
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      nonfinite = 0 if metrics["finite"] else nonfinite + 1
      if nonfinite > tcfg.max_nonfinite:
        raise UserError(f"{nonfinite} consecutive steps with a non-finite loss (last at step {step}); "
                        "lower the learning rate or check the data")
      record = {"step": step + 1, **metrics, "step_time_s": time.perf_counter() - t0,
                "tokens_per_s": float(batch["s_mask"].sum() + batch["doc_mask"].sum()) / (time.perf_counter() - t0)}
      history.append(record)
      if (step + 1) % log_every == 0:
        with open(log_path, "a", encoding="utf-8") as f:
          f.write(json.dumps(record) + "\n")
        for key, value in record.items():
          if key != "step":
            events.add_scalar(f"train/{key}", value, step + 1)
      bar.set_postfix(loss=f"{metrics['loss']:.3f}", kd=f"{metrics['kd']:.3f}", top1=f"{metrics['route_top1']:.2f}")
      done = step + 1
      stopping = preemption.requested  # read once: a signal arriving later is honoured after the next step
      if stopping or done % tcfg.checkpoint_every == 0 or done == tcfg.steps:
        save(done)
      if stopping:
        print(f"SIGTERM: saved step {done}; exiting")
        break
      if eval_fn is not None and tcfg.eval_every and done % tcfg.eval_every == 0:
        compiler, router = nnx.merge(graphdef, jax.tree.map(jnp.copy, params))
        result = {"step": done, **{k: float(v) for k, v in eval_fn(compiler, router).items()}}
        with open(workdir / "eval.jsonl", "a", encoding="utf-8") as f:
          f.write(json.dumps(result) + "\n")
        for key, value in result.items():
          if key != "step":
            events.add_scalar(f"eval/{key}", value, done)
        bar.write("eval at step " + "  ".join(f"{k} {v:.3f}" if k != "step" else str(v) for k, v in result.items()))
  finally:
    events.close()
    manager.wait_until_finished()
    manager.close()
    preemption.restore()
    bar.close()
  nnx.update((system.compiler, system.router), params)
  return history
