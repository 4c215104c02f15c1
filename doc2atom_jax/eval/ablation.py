"""Ablations: the main job's training under named variants, each scored on the same validation worlds.

A variant is a set of config overrides (`VARIANTS`); each trains exactly as mode=train would (same data order,
seed and steps, through `modes.fit`; with --state_cache the documents' frozen states are computed once for
all of them, `train/state_cache.py`) in <workdir>/<variant>, so a stopped run resumes from its checkpoints, and
a finished variant's scores are kept in <workdir>/<variant>/ablation.json and never recomputed. Scoring is the
quick evaluator without generation (`quick.evaluate`: teacher-forced NLL, KL and exact match, routing top-1,
the oracle-routed row and the controls) on `worlds` validation worlds written with our templates and as many
written with the held-out ones (`synthetic.document(templates="unseen")`), the same worlds for every variant.

Run (the table goes to stdout and <workdir>/ablation.md):
  python -m doc2atom_jax.eval.ablation --config=configs/quickstart.py --workdir=runs/ablation \
      --variants=v2,rank2,shared_head [--worlds=12]
"""

import copy
import json
import time

from absl import flags

from doc2atom_jax import cli, fileio
from doc2atom_jax.errors import UserError
from doc2atom_jax.eval import quick

# The v1 -> v2 chain, each link adding one group of changes to the one before (docs/method.md §6). v1's query
# pooling over the chat template and its answer format are not options any more (the format is scored in §1).
_V1_LOSS = {"loss.ce": 0.1, "loss.kd_tokens": "all", "loss.atom_target": "teacher"}
_V1_ROUTER = {"compiler.route_skip": False, "route_pretrain.steps": 0, "atoms.route_score": "dense",
              "atoms.second_hop": "off", "atoms.abstain": "null"}
_V1_COMPILER = {"compiler.code_dim": 256, "compiler.copy_dim": 128}
_COSINE = {"train.schedule": "cosine"}
# name -> (what changes, config overrides). Rows of the v1 -> v2 table first, then the compiler's ablations.
VARIANTS = {
    "v1": ("v1's recipe in v2's answer format: v1 loss, MLP router without pre-training, dense routing, null-atom "
           "abstention, copy path of 128 directions, cosine rate",
           {**_V1_LOSS, **_V1_ROUTER, **_V1_COMPILER, **_COSINE}),
    "v1+loss": ("+ v2's loss (gold CE 1, KD where the teacher is right, L_atom on gold)",
                {**_V1_ROUTER, **_V1_COMPILER, **_COSINE}),
    "v1+loss+router": ("+ v2's routing (linear path, routing pre-training, fused scores, second hop, evidence "
                       "abstention)", {**_V1_COMPILER, **_COSINE}),
    "v1+loss+router+copy": ("+ the full copy path (576 of code_dim 640)", dict(_COSINE)),
    "v2": ("method v2's defaults (+ a constant rate after warmup)", {}),
    "no_route_pretrain": ("no routing pre-training (the router's linear path kept)", {"route_pretrain.steps": 0}),
    "mlp_router": ("keys and queries from their MLPs alone, no routing pre-training (v2 before routing "
                   "pre-training)", {"compiler.route_skip": False, "route_pretrain.steps": 0}),
    "v1_loss": ("v1's loss recipe: gold CE 0.1, KD on every answer token, L_atom to the evidence teacher",
                {"loss.ce": 0.1, "loss.kd_tokens": "all", "loss.atom_target": "teacher"}),
    "ce_only": ("no distillation: gold CE and L_atom only", {"loss.kd": 0.0}),
    "rank2": ("micro rank 2 per atom", {"compiler.rank": 2}),
    "copy_full": ("the copy path keeps the whole embedding (copy_dim = d = 576 of code_dim 640; default 128 of 256)",
                  {"compiler.code_dim": 640, "compiler.copy_dim": 576}),
    "shared_head": ("one head shared by every layer (per-layer scalers kept)", {"compiler.shared_head": True}),
    "lr3e-3": ("learning rate 3e-3", {"train.learning_rate": 3e-3}),
    "constant_lr": ("constant learning rate after warmup (the default since this ablation)", {"train.schedule": "constant"}),
    "cosine_lr": ("cosine decay to 10% after warmup (the default before constant_lr)", {"train.schedule": "cosine"}),
    "docs2": ("2 documents a step (twice the data and the time)", {"data.documents_per_step": 2}),
}
COLUMNS = (("doc2atom", "tf_em"), ("doc2atom", "nll"), ("doc2atom", "route_top1"), (quick.ORACLE, "tf_em"),
           (quick.ORACLE, "nll"), ("default_only", "tf_em"), ("wrong_document", "tf_em"))
TEMPLATES = ("seen", "unseen")
RESULTS = "ablation.json"

_VARIANTS = flags.DEFINE_list("variants", ["v2"], f"variants to run, in order: {', '.join(VARIANTS)}")
_WORLDS = flags.DEFINE_integer("worlds", 12, "validation worlds per template set (our templates, held-out ones)")
_STATE_CACHE = flags.DEFINE_bool("state_cache", False, "every variant trains on the same documents: compute their "
                                  "frozen states once (train.state_cache; about 6 MB a main-job document on disk; "
                                  "on 2 CPU cores and worlds of 4-8 facts it saved no time, docs/method.md §6)")


def variant_config(config, name: str):
  """The config with variant `name`'s overrides applied (a copy; unknown names and fields are a UserError)."""
  if name not in VARIANTS:
    raise UserError(f"unknown ablation variant {name!r}; valid: {', '.join(VARIANTS)}")
  out = copy.deepcopy(config)
  for field, value in VARIANTS[name][1].items():
    section, key = field.split(".")
    if section not in out or key not in out[section]:
      raise UserError(f"variant {name}: the config has no field {field}")
    out[section][key] = value
  return out


def config_fingerprint(cfg) -> str:
  """The trained config as saved results are matched against (the state cache changes no number: left out), so
  a result is never reused for another global override (e.g. --config.train.schedule) of the same variant."""
  out = json.loads(cfg.to_json_best_effort())
  out.get("train", {}).pop("state_cache", None)
  return json.dumps(out, sort_keys=True)


def run_variant(config, name: str, workdir, documents: dict) -> dict:
  """Trains variant `name` (resuming) and scores it on `documents` ({templates: worlds}); cached on disk."""
  from doc2atom_jax import modes  # pylint: disable=import-outside-toplevel  (jax and the model load late)

  path = workdir / name / RESULTS
  counts = {t: len(d) for t, d in documents.items()}
  cfg = variant_config(config, name)
  fingerprint = config_fingerprint(cfg)
  if path.exists():
    saved = json.loads(path.read_text(encoding="utf-8"))
    if saved.get("documents") == counts and saved.get("config") == fingerprint:
      return saved
  start = time.perf_counter()
  system, history, _, _ = modes.fit(cfg, workdir / name)
  if history and history[-1]["step"] != cfg.train.steps:
    raise UserError(f"variant {name} stopped at step {history[-1]['step']} (preempted): run again to resume")
  from doc2atom_jax.train import trainer  # pylint: disable=import-outside-toplevel

  train_s = sum(h.get("step_time_s", 0.0) for h in trainer.run_trajectory(workdir / name, history))
  scores = {t: quick.evaluate(system, d, generate=False, progress=f"{name} ({t} templates)")
            for t, d in documents.items()}
  out = {"variant": name, "what": VARIANTS[name][0], "overrides": VARIANTS[name][1], "steps": cfg.train.steps,
         "train_seconds": train_s, "wall_seconds": time.perf_counter() - start, "documents": counts,
         "config": fingerprint, "results": scores}
  fileio.atomic_write_text(path, json.dumps(out, indent=1) + "\n")
  return out


def format_table(rows: list[dict]) -> str:
  """One markdown table per template set: a row per variant."""
  names = {"doc2atom": "", quick.ORACLE: "oracle ", "default_only": "default-only ", "wrong_document": "wrong-doc "}
  head = ["variant", "train s"] + [f"{names[m]}{k}" for m, k in COLUMNS]
  out = []
  for t in TEMPLATES:
    lines = [f"{t} templates:", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
      cells = [r["variant"], f"{r['train_seconds']:.0f}"]
      for m, k in COLUMNS:
        value = r["results"].get(t, {}).get(m, {}).get(k)
        cells.append("" if value is None else f"{value:.3f}")
      lines.append("| " + " | ".join(cells) + " |")
    out.append("\n".join(lines))
  return "\n\n".join(out)


def main(args=()) -> None:
  """`python -m doc2atom_jax.eval.ablation --config=<file>.py --workdir=DIR [--variants=a,b] [--worlds=N]`."""
  del args
  from doc2atom_jax.train import data as data_lib  # pylint: disable=import-outside-toplevel

  config = cli.config()
  workdir = cli.workdir()
  if workdir is None:
    raise UserError("set --workdir: every variant trains and keeps its checkpoints there")
  workdir = fileio.writable_dir(workdir, "--workdir")
  for name in _VARIANTS.value:
    variant_config(config, name)  # every name and field checked before hours of training
  if _WORLDS.value < 2:
    raise UserError("--worlds must be at least 2 (the wrong-document control needs another world)")
  config.train.state_cache = _STATE_CACHE.value
  cli.prepare(config)
  documents = {t: data_lib.heldout_documents(config, _WORLDS.value, templates=t) for t in TEMPLATES}
  rows = [run_variant(config, name, workdir, documents) for name in _VARIANTS.value]
  table = format_table(rows)
  print(table)
  notes = "\n".join(f"- {r['variant']}: {r['what']}" for r in rows)
  fileio.atomic_write_text(workdir / "ablation.md", f"# Ablations ({config.train.steps} steps each)\n\n{table}\n\n"
                           f"{notes}\n")
  print(f"wrote {workdir / 'ablation.md'}")


if __name__ == "__main__":
  cli.run(main)
