"""The CPU experiment of docs/experiment.md, stage by stage, resumable:
`python -m doc2atom_jax.experiment STAGE [--root=DIR] [--dry-run] [--out=DIR]` (main's command line: cli.py).

Stages (each runs `python -m doc2atom_jax.main` subprocesses one after another, never two at once: the
machine has two cores):
  params  the compiler + router parameter count of every method (the equal-budget check, ±10%)
  sweep   every swept method x learning rate, `SWEEP_STEPS` steps on the first curriculum stage (d2l_256 takes
          d2l's rate)
  final   every method at its selected learning rate, the config's full budget (1,000 steps, curriculum)
  eval    the final exports: mode=eval of all methods on unseen worlds and real QA, d2l_256 as `d2l`, the
          held-out wording, seen worlds, the capacity oracle; the one-bank evaluation (eval/bank_scale.py)
  report  the README's results, the interference plot and H1-H7's decisions (experiment_report.py), to --out
  all     the five in order
A run whose workdir already holds its finished result is skipped, and an interrupted one resumes from its
last checkpoint (the trainer's own resume), so `all` can be restarted after a stop with the same command.
`--dry-run` prints the commands and the selections it can already make, and runs nothing.
"""

import json
import pathlib
import subprocess
import sys
import time

from absl import flags

from doc2atom_jax import cli
from doc2atom_jax.data import qa
from doc2atom_jax.errors import UserError

_ROOT = flags.DEFINE_string("root", "runs/experiment_v2", "the experiment's output folder (v1's: runs/experiment)")
_DRY_RUN = flags.DEFINE_bool("dry-run", False, "print the commands, run nothing")
_OUT = flags.DEFINE_string("out", None, "the report's folder (default <root>/report)")

CONFIG = "configs/smollm2_synthetic.py"
METHODS = ("doc2atom", "d2l", "d2l_256", "d2l_atom")
# Three short runs per method. d2l's adapters (rank 8) carry Doc-to-LoRA's fixed scale 2 * 8**1.5 = 45.3, 22.6x
# doc2atom's rank-1 atoms' 2.0, so one Adam step moves their output ~22x as far: their grid is a decade lower
# (Doc-to-LoRA's own recipe: 4e-5). docs/experiment.md, deviation 2.
LEARNING_RATES = {"doc2atom": (3e-4, 1e-3, 3e-3), "d2l": (3e-5, 1e-4, 3e-4), "d2l_256": (3e-5, 1e-4, 3e-4),
                  "d2l_atom": (3e-4, 1e-3, 3e-3)}
# d2l_256 takes d2l's rate: on the sweep's 4-8-fact documents (at most ~100 tokens) both compile one unit per
# document, the same computation (v1 measured identical held-out KLs to the last digit).
RATE_OF = {"d2l_256": "d2l"}
SWEPT = tuple(m for m in METHODS if m not in RATE_OF)
SWEEP_STEPS = 50
SWEEP_FACTS = "(4, 8)"  # the first curriculum stage
SELECT_BY = "nll"  # the held-out gold NLL, the primary metric (v1 selected by KL to the teacher)
TIE = 0.01  # nats: held-out values closer than this count as equal; the smaller learning rate wins
STAGES = ("params", "sweep", "final", "eval", "report")
USAGE = f"python -m doc2atom_jax.experiment {{{','.join((*STAGES, 'all'))}}} [--root=DIR] [--dry-run] [--out=DIR]"


def sweep_dir(root: pathlib.Path, method: str, lr: float) -> pathlib.Path:
  return root / "sweep" / method / f"lr{lr:g}"


def final_dir(root: pathlib.Path, method: str) -> pathlib.Path:
  return root / "final" / method


def heldout_value(workdir: pathlib.Path, step: int, metric: str = SELECT_BY) -> float | None:
  """The trainer's held-out `metric` at `step` (`eval.jsonl`), or None when that evaluation is not there yet."""
  path = workdir / "eval.jsonl"
  if not path.exists():
    return None
  found = None
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue  # a line cut by a stop mid-write
    if row.get("step") == step and row.get(metric) is not None:
      found = float(row[metric])
  return found


def select_learning_rate(values: dict[float, float | None]) -> float | None:
  """The learning rate with the lowest held-out value (ties within TIE: the smallest); None until all are in."""
  if not values or any(v is None for v in values.values()):
    return None
  best = min(values.values())
  return min(lr for lr, v in values.items() if v <= best + TIE)


def main_command(python: str, config_arg: str, workdir: pathlib.Path, *flags: str) -> list[str]:
  return [python, "-m", "doc2atom_jax.main", f"--config={config_arg}", f"--workdir={workdir}", *flags]


def finished(workdir: pathlib.Path) -> bool:
  """A training run is finished when it wrote its results and its export (the last things it writes)."""
  return (workdir / "results.json").exists() and export_of(workdir).is_dir()


def export_of(workdir: pathlib.Path) -> pathlib.Path:
  """A training run's export folder (the layout's names are checkpoint.py's)."""
  from doc2atom_jax import checkpoint  # pylint: disable=import-outside-toplevel  (jax + Orbax: only when asked)

  return checkpoint.export_dir(workdir)


def config_arg(method: str) -> str:
  return CONFIG if method == "doc2atom" else f"{CONFIG}:{method}"


def sweep_commands(root: pathlib.Path, python: str) -> list[tuple[pathlib.Path, list[str]]]:
  return [(sweep_dir(root, m, lr),
           main_command(python, config_arg(m), sweep_dir(root, m, lr), f"--config.train.steps={SWEEP_STEPS}",
                        f"--config.train.learning_rate={lr:g}", "--config.data.curriculum=()",
                        f"--config.data.facts_per_document={SWEEP_FACTS}"))
          for m in SWEPT for lr in LEARNING_RATES[m]]


def selections(root: pathlib.Path) -> dict[str, float | None]:
  swept = {m: select_learning_rate({lr: heldout_value(sweep_dir(root, m, lr), SWEEP_STEPS)
                                    for lr in LEARNING_RATES[m]}) for m in SWEPT}
  return {m: swept[RATE_OF.get(m, m)] for m in METHODS}


def final_commands(root: pathlib.Path, python: str, chosen: dict[str, float | None]):
  return [(final_dir(root, m), main_command(python, config_arg(m), final_dir(root, m),
                                            f"--config.train.learning_rate={chosen[m]:g}"))
          for m in METHODS if chosen[m] is not None]


def eval_commands(root: pathlib.Path, python: str) -> list[tuple[pathlib.Path, list[str]]]:
  """docs/experiment.md's v2 evaluation: every command scores the final exports on its own documents."""
  export = lambda m: export_of(final_dir(root, m))
  exports = f"--config.eval.exports=('d2l={export('d2l')}', 'd2l_atom={export('d2l_atom')}')"
  base = lambda out, *flags: (root / "eval" / out, main_command(
      python, CONFIG, root / "eval" / out, "--config.mode=eval", f"--config.params={export('doc2atom')}", *flags))
  datasets = lambda *names: f"--config.eval.datasets={tuple(names)!r}"
  unseen_and_qa = datasets("synthetic_unseen", *qa.BUNDLED)
  return [
      base("main", exports, unseen_and_qa),  # 50 unseen worlds a size (the config), real QA
      base("d2l_256", "--config.eval.methods=('no_context', 'd2l')", unseen_and_qa,
           f"--config.eval.exports=('d2l={export('d2l_256')}',)"),
      # The held-out wording: 10 unseen worlds a size in both wordings (the same worlds, paired).
      base("templates", exports, datasets("synthetic_unseen", "synthetic_unseen_templates"),
           "--config.eval.synthetic_documents=10"),
      base("seen", exports, datasets("synthetic_seen"), "--config.eval.synthetic_documents=5"),  # 25 documents
      base("capacity", "--config.eval.methods=('no_context', 'in_context', 'doc2atom', 'doc2atom_oracle', "
                       "'capacity_atom', 'capacity_doc')", "--config.eval.capacity_steps=30",
           "--config.eval.facts_per_document=(8, 32)", "--config.eval.synthetic_documents=4",
           datasets("synthetic_unseen")),
      (root / "eval" / "bank", [python, "-m", "doc2atom_jax.eval.bank_scale", f"--config={CONFIG}",
                                f"--config.params={export('doc2atom')}", "--documents=50", "--sizes=4,8,16,32,64",
                                "--templates=seen", "--split=test", f"--workdir={root / 'eval' / 'bank'}"]),
  ]


def evaluated(workdir: pathlib.Path) -> bool:
  """An evaluation is done when it wrote its results (mode=eval's, or the bank's)."""
  return (workdir / "eval" / "results.json").exists() or (workdir / "bank_scale.json").exists()


def parameter_counts() -> dict[str, int]:
  """Trainable parameters (compiler + router) of every method's system, from its config (no training)."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from doc2atom_jax import system as system_lib  # pylint: disable=import-outside-toplevel

  counts, model = {}, None
  for m in METHODS:
    config = system_lib.config_from_file(config_arg(m))
    system = system_lib.build_system(config, model=model)
    model = system.model
    state = nnx.state((system.compiler, system.router), nnx.Param)
    counts[m] = int(sum(x.size for x in jax.tree.leaves(state)))
  return counts


def run(commands, *, dry_run: bool, log, done=finished) -> None:
  """The commands one after another (each shows its own progress bar), skipping finished ones; each start is
  logged as [i/n] with the stage's elapsed time and an estimate of what is left (mean time per run so far)."""
  todo = [(w, c) for w, c in commands if not done(w)]
  for workdir, _ in commands:
    if done(workdir):
      log(f"done already: {workdir}")
  stage_start, finished_runs = time.perf_counter(), 0
  for i, (workdir, command) in enumerate(todo, 1):
    elapsed = time.perf_counter() - stage_start
    eta = f", about {elapsed / finished_runs * (len(todo) - i + 1) / 60:.0f} min left" if finished_runs else ""
    log(f"[{i}/{len(todo)}{f', {elapsed / 60:.0f} min in{eta}' if not dry_run else ''}] " + " ".join(command))
    if dry_run:
      continue
    start = time.perf_counter()
    status = subprocess.call(command)
    if status:
      raise SystemExit(f"experiment: {workdir} failed with exit status {status}; rerun the same command to resume")
    finished_runs += 1
    log(f"finished {workdir} in {time.perf_counter() - start:.0f} s")


def run_stages(stage: str, root: pathlib.Path, *, dry_run: bool = False, out: pathlib.Path | None = None) -> None:
  """One stage (or `all`, the five in order) under `root`; `out` is the report's folder (default
  <root>/report)."""
  if stage not in (*STAGES, "all"):
    raise UserError(f"unknown stage {stage!r}: {USAGE}")
  root, python = pathlib.Path(root), sys.executable
  log = lambda msg: print(msg, flush=True)
  stages = STAGES if stage == "all" else (stage,)
  if "params" in stages and not dry_run:
    counts = parameter_counts()
    ref = counts["doc2atom"]
    for m, n in counts.items():
      log(f"params {m}: {n:,} ({n / ref - 1:+.1%} vs doc2atom){'' if abs(n / ref - 1) <= 0.1 else '  OUTSIDE +-10%'}")
  if "sweep" in stages:
    run(sweep_commands(root, python), dry_run=dry_run, log=log,
        done=lambda w: heldout_value(w, SWEEP_STEPS) is not None)
  if "final" in stages:
    chosen = selections(root)
    for m, lr in chosen.items():
      log(f"learning rate {m}: {'not selected yet (sweep unfinished)' if lr is None else f'{lr:g}'}")
    run(final_commands(root, python, chosen), dry_run=dry_run, log=log)
  if "eval" in stages:
    missing = [m for m in METHODS if not finished(final_dir(root, m))]
    if missing and not dry_run:
      raise UserError(f"the final runs of {', '.join(missing)} are not finished; run `final` first")
    run(eval_commands(root, python), dry_run=dry_run, log=log, done=evaluated)
  if "report" in stages and not dry_run:
    from doc2atom_jax import experiment_report  # pylint: disable=import-outside-toplevel

    log(f"report: {experiment_report.write(root, pathlib.Path(out) if out else root / 'report')}")


def main(args) -> None:
  """`python -m doc2atom_jax.experiment STAGE [--root=DIR] [--dry-run] [--out=DIR]`."""
  if not args:
    raise UserError(f"name a stage: {USAGE}")
  run_stages(args[0], pathlib.Path(_ROOT.value), dry_run=_DRY_RUN.value, out=_OUT.value)


if __name__ == "__main__":
  cli.run(main, positional=("STAGE",), usage=USAGE)
