"""The experiment's report (docs/experiment.md): the README's tables, the interference plot and H1-H5.

Reads only what `python -m doc2atom_jax.experiment` wrote under its root:
  final/<method>/results.json, metrics.jsonl   training: held-out table, learning checks, step times
  eval/main/eval/results.json                  every method but d2l_256, on the same questions
  eval/d2l_256/eval/results.json               d2l_256 (evaluated under the name d2l, renamed here)
  eval/capacity/eval/results.json              the capacity oracle (reported when present)
and writes <out>/results.md, <out>/hypotheses.json and <out>/interference.png, each atomically.
"""

import json
import math
import pathlib
from collections.abc import Mapping, Sequence

from doc2atom_jax import fileio
from doc2atom_jax.errors import UserError
from doc2atom_jax.eval import aggregate as agg
from doc2atom_jax.eval import hypotheses as hyp
from doc2atom_jax.eval import report as report_lib

ORDER = ("no_context", "in_context", "in_context_trunc", "rag_atoms", "doc2atom", "doc2atom_oracle", "d2l",
         "d2l_256", "d2l_atom")
TRAINED = ("doc2atom", "d2l", "d2l_256", "d2l_atom")
BYTE_FORMS = ("codes", "kv_cache", "keys+text")  # the form a method keeps, in this preference
SEEN, UNSEEN = "synthetic_seen", hyp.UNSEEN


def _load(path: pathlib.Path) -> dict:
  if not path.exists():
    raise UserError(f"{path} is missing: run `python -m doc2atom_jax.experiment eval` first")
  try:
    return json.loads(fileio.read_text(path))
  except json.JSONDecodeError as e:
    raise UserError(f"{path} is not valid JSON: {e}") from None


def _records(results: Mapping, rename: Mapping[str, str] | None = None, keep=None) -> list[agg.QuestionRecord]:
  out = []
  for obj in results["records"]:
    if keep is not None and obj["method"] not in keep:
      continue
    out.append(agg.QuestionRecord.from_json({**obj, "method": (rename or {}).get(obj["method"], obj["method"])}))
  return out


def load(root: pathlib.Path) -> dict:
  """The evaluations' records (d2l_256 merged in under its own name), costs, gates and the training runs."""
  main = _load(root / "eval" / "main" / "eval" / "results.json")
  records = _records(main)
  costs = {k: dict(v) for k, v in (main.get("costs") or {}).items()}
  second = root / "eval" / "d2l_256" / "eval" / "results.json"
  if second.exists():
    other = _load(second)
    records += _records(other, rename={"d2l": "d2l_256"}, keep={"d2l"})
    for key, per in (other.get("costs") or {}).items():
      if "d2l" in per:
        costs.setdefault(key, {})["d2l_256"] = per["d2l"]
  capacity = root / "eval" / "capacity" / "eval" / "results.json"
  return {"records": records, "costs": costs, "gates": main.get("gates") or [],
          "capacity": _records(_load(capacity)) if capacity.exists() else [],
          "training": {m: training_summary(root / "final" / m) for m in TRAINED},
          "meta": main.get("meta") or {}}


def training_summary(workdir: pathlib.Path) -> dict | None:
  """A final run's steps, training seconds (the sum of its logged step times: compile included, restarts not
  double-counted), held-out KL and NLL, and its learning checks; None when the run is not there."""
  results, metrics = workdir / "results.json", workdir / "metrics.jsonl"
  if not results.exists():
    return None
  steps: dict[int, float] = {}
  if metrics.exists():
    for line in fileio.read_text(metrics).splitlines():
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if "step_time_s" in row:
        steps[int(row["step"])] = float(row["step_time_s"])
  found = _load(results)
  trained = found["methods"].get("doc2atom") or {}  # the trainer's table names every trained method so
  return {"steps": max(steps, default=0), "train_seconds": sum(steps.values()), "heldout_kl": trained.get("kl"),
          "heldout_nll": trained.get("nll"), "learning_check": found.get("learning_check") or [],
          "methods": found["methods"]}


# Tables.


def _fmt(stat: Mapping | None, digits: int = 3, percent: bool = False) -> str:
  if not stat or not stat.get("n") or stat.get("mean") is None or not math.isfinite(stat["mean"]):
    return "—"
  if percent:
    return f"{stat['mean']:.0%} [{stat['lo']:.0%}, {stat['hi']:.0%}]"
  return f"{stat['mean']:.{digits}f} [{stat['lo']:.{digits}f}, {stat['hi']:.{digits}f}]"


def _bytes(costs: Mapping, method: str) -> str:
  forms = (costs.get("bytes_per_document") or {}).get(method)
  if not forms:
    return "0" if method == "no_context" else "—"
  form = next((f for f in BYTE_FORMS if f in forms), next(iter(forms)))
  return f"{forms[form] / 1e6:.2f} MB ({form})"


def _latency(costs: Mapping, method: str) -> str:
  answer = costs.get("answer_seconds") or {}
  if method not in answer or not answer.get("in_context"):
    return "—"
  return f"{answer[method] / answer['in_context']:.2f}"


def results_table(records: Sequence[agg.QuestionRecord], costs: Mapping, n_resamples: int = 1000) -> str:
  """One row per method: unseen-world NLL / KL / F1, refusal, false refusal, routing precision@4; seen-world
  and real-QA NLL; bytes per document; answer latency relative to in_context."""
  boot = {"n_resamples": n_resamples}
  unseen = hyp.by_method([r for r in records if r.dataset == UNSEEN], boot=boot)
  seen = hyp.by_method([r for r in records if r.dataset == SEEN], boot=boot)
  real = hyp.by_method([r for r in records if r.world is None], boot=boot)
  methods = [m for m in ORDER if m in unseen] + [m for m in unseen if m not in ORDER]
  rows = []
  for m in methods:
    u = unseen[m]
    p4 = u["routing"].get("precision@4") if "routing" in u else None
    rows.append([m, _fmt(u["nll"]), _fmt(u["kl"]), _fmt(u["f1"]), _fmt(u["refusal"], percent=True),
                 _fmt(u["false_refusal"], percent=True), _fmt(p4, 2), _fmt((seen.get(m) or {}).get("nll")),
                 _fmt((real.get(m) or {}).get("nll")), _bytes(costs, m), _latency(costs, m)])
  header = ["method", "NLL unseen (primary)", "KL unseen", "F1 unseen", "refusal (out of scope)", "false refusal",
            "router p@4", "NLL seen, new paraphrase", "NLL real QA", "bytes / document", "answer latency / in_context"]
  return report_lib.md_table(header, rows)


def facts_table(curves: Mapping[str, Mapping]) -> str:
  """Mean NLL [CI] per method at each facts size, and the slope per doubling with its CI."""
  sizes = sorted({f for c in curves.values() for f in c["facts"]})
  rows = [[m, *(_fmt(c["stats"].get(f)) for f in sizes),
           f"{c['slope']:+.3f} [{c['slope_ci'][0]:+.3f}, {c['slope_ci'][1]:+.3f}]"] for m, c in curves.items()]
  return report_lib.md_table(["method", *(f"{f} facts" for f in sizes), "slope / doubling"], rows)


def qa_table(records: Sequence[agg.QuestionRecord], n_resamples: int = 1000) -> str:
  """NLL per bundled real QA dataset and method (no facts, no world: the real samples)."""
  rows = hyp.by_method([r for r in records if r.world is None], boot={"n_resamples": n_resamples},
                       group_by=("dataset",))
  datasets = list(dict.fromkeys(d for _, d in rows))
  methods = [m for m in ORDER if any(k[0] == m for k in rows)]
  body = [[d, *(_fmt((rows.get((m, d)) or {}).get("nll"), 2) for m in methods)] for d in datasets]
  return report_lib.md_table(["dataset", *methods], body)


def training_table(training: Mapping[str, Mapping | None]) -> str:
  rows = []
  for m, t in training.items():
    if t is None:
      rows.append([m, "not run", "", "", "", ""])
      continue
    checks = ", ".join(f"{c['control']}{'' if c.get('metric', 'kl') == 'kl' else ' (' + c['metric'] + ')'}: "
                       f"{'pass' if c['passed'] else 'FAIL'} ({c.get('control_value', c.get('control_kl')):.3f})"
                       for c in t["learning_check"])
    kl = "—" if t["heldout_kl"] is None else f"{t['heldout_kl']:.3f}"
    nll = "—" if t["heldout_nll"] is None else f"{t['heldout_nll']:.3f}"
    rows.append([m, str(t["steps"]), f"{t['train_seconds'] / 60:.1f}", kl, nll, checks or "—"])
  return report_lib.md_table(["method", "steps", "training minutes", "held-out KL", "held-out NLL",
                 "learning checks (control KL)"], rows)


def capacity_table(records: Sequence[agg.QuestionRecord], n_resamples: int = 1000) -> str:
  rows = hyp.by_method([r for r in records if r.dataset == UNSEEN], boot={"n_resamples": n_resamples},
                       group_by=("facts",))
  sizes = list(dict.fromkeys(f for _, f in rows))
  methods = list(dict.fromkeys(m for m, _ in rows))
  body = [[m, *(_fmt((rows.get((m, f)) or {}).get("nll")) for f in sizes)] for m in methods]
  return report_lib.md_table(["method", *(f"facts {f}" for f in sizes)], body)


# Hypotheses.


def _num(x, digits=3) -> str:
  return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def hypothesis_lines(decisions: Mapping[str, Mapping]) -> list[str]:
  """One bullet per hypothesis: the decision, the numbers it rests on, and the gate where it fires."""
  out = []
  for name, d in decisions.items():
    n = d["numbers"]
    if name.startswith("H1"):
      base = name.split()[-1]
      at = "; ".join(f"{f} facts: doc2atom {_fmt(n[f'at {f}']['doc2atom'])} vs {_fmt(n[f'at {f}'][base])} "
                     f"({n[f'at {f}']['order']})" for f in hyp.H1_SIZES)
      text = (f"slope per doubling doc2atom {_num(n['slope'])} [{_num(n['slope_ci'][0])}, {_num(n['slope_ci'][1])}]"
              f" vs {base} {_num(n[f'{base} slope'])} [{_num(n[f'{base} slope_ci'][0])}, "
              f"{_num(n[f'{base} slope_ci'][1])}]; {at}")
    elif name == "H4":
      text = f"refusal {_fmt(n['refusal'], percent=True)}, false refusal {_fmt(n['false_refusal'], percent=True)}"
    else:
      a, b = [k for k in n if k not in ("order", "paired difference", "f1")]
      text = (f"{a} {_fmt(n[a])} vs {b} {_fmt(n[b])} ({n['order']}); paired difference "
              f"{_fmt(n['paired difference'])} over {n['paired difference']['n']} questions")
      if "f1" in n:
        f1 = n["f1"]
        text += (f"; F1 {_fmt(f1[a])} vs {_fmt(f1[b])}, paired difference {_fmt(f1['paired difference'])}")
    gate = f" **Gate: no claim** ({'; '.join(d['gate'])})." if d["gate"] else " Gate: passes."
    out.append(f"- **{name}** ({d['claim']}): **{d['decision']}**. {text}.{gate}")
  return out


def write(root, out, *, n_resamples: int = 1000) -> pathlib.Path:
  """results.md, hypotheses.json and interference.png under `out`, from the runs under `root`."""
  root, out = pathlib.Path(root), pathlib.Path(out)
  found = load(root)
  records, costs = found["records"], found["costs"]
  methods = [m for m in ORDER if any(r.method == m for r in records)]
  curves = hyp.interference(records, methods, n_resamples=n_resamples)
  decisions = hyp.decide(records, n_resamples=n_resamples, curves=curves)
  out.mkdir(parents=True, exist_ok=True)
  plot_rows = agg.aggregate([r for r in records if r.dataset == UNSEEN], group_by=("method", "facts"),
                            n_resamples=n_resamples, metrics=("nll", "f1"),
                            bins={"facts": hyp.bin_edges(records)})
  note = report_lib.plot_interference(out / "interference.png", plot_rows, "nll")
  gates = [f"- {g.get('table', '')} {json.dumps(g.get('cell', g.get('dataset')))}: {g['reason']}"
           for g in found["gates"]]
  answer_at = max((t for pts in (costs.get("latency_by_length") or {}).values() for t, _ in pts), default=None)
  text = [
      "## Results", "",
      f"All numbers: `python -m doc2atom_jax.experiment report` over `{root}` (git "
      f"`{found['meta'].get('git_revision', '?')}`); 95% bootstrap CIs over documents. Unseen: "
      f"{len({r.doc_id for r in records if r.dataset == UNSEEN})} synthetic worlds never trained on; "
      "answer metrics over answerable questions, refusal over out-of-scope ones. Answer latency at "
      f"{answer_at} document tokens.", "",
      results_table(records, costs, n_resamples), "",
      "### Interference: NLL by facts per document (unseen worlds)", "", facts_table(curves), "",
      "![interference](interference.png)" if note is None else f"(interference plot skipped: {note})", "",
      "### Hypotheses (decision rules in docs/experiment.md)", "", *hypothesis_lines(decisions), "",
      "### Training (equal budget)", "", training_table(found["training"]), "",
      "### Real QA samples (NLL per dataset)", "", qa_table(records, n_resamples), ""]
  if found["capacity"]:
    text += ["### Capacity oracle (free LoRAs fitted per atom / per document; 2 worlds a size: gated)", "",
             capacity_table(found["capacity"], n_resamples), ""]
  text += ["### Instrument gates of the main evaluation", "", *(gates or ["None fired."]), ""]
  fileio.atomic_write_text(out / "results.md", "\n".join(text))
  fileio.atomic_write_text(out / "hypotheses.json", json.dumps(
      report_lib.jsonable({"decisions": decisions, "curves": curves}), indent=1, allow_nan=False))
  return out / "results.md"
