"""The evaluation report folder (DESIGN §8): results.json, report.md and PNG plots, from per-question records.

Everything is recomputed from the records, so a saved results.json can be re-reported without a model
(`load_records`). Every file is written atomically: a reader never sees a half-written report.

The `costs` dict (all parts optional; methods are the evaluator's method names):

    {"bytes_per_document": {method: {"codes": int, "factors": int}},   # storage to internalize one document;
                                                                       # other forms (e.g. "kv_cache") allowed
     "internalize_seconds": {method: float},                           # per document
     "answer_seconds": {method: float},                                # per question, fixed generated tokens
     "latency_by_length": {method: [[doc_tokens, seconds], ...]}}      # answer latency vs document length
"""

import datetime
import json
import math
import os
import pathlib
import platform
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from doc2atom_jax import fileio
from doc2atom_jax.errors import UserError
from doc2atom_jax.eval import aggregate as agg

# name -> (group_by, title). Group order is sort order: datasets together, methods side by side within a cell.
TABLES = {
    "by_dataset": (("dataset", "method"), "Main table: method × dataset"),
    "overall": (("method",), "Overall: all datasets pooled"),
    "by_length": (("dataset", "length", "method"), "By document length (tokens)"),
    "by_facts": (("dataset", "facts", "method"), "By facts per document"),
    "by_kind": (("dataset", "kind", "method"), "By question kind"),
    "by_category": (("dataset", "category", "method"), "By answer category"),
    "by_world": (("dataset", "world", "method"), "By world (seen / unseen during training)"),
    "by_templates": (("dataset", "world", "templates", "method"),
                     "By templates (synthetic worlds written in training's wording / in held-out wording)"),
}
# Tables whose rows are questions of one sort rather than bins of documents: every answer metric, as the main table.
ANSWER_TABLES = ("by_kind", "by_category", "by_templates")
NOTES = {
    "by_category": "Answerable questions by what the gold answer is: `closed_pool` (a value from a fixed list that "
                   "training uses too: professions, fields, kinds of artifact), `number` (years, counts), "
                   "`quantity` (a number with a unit), `name` (a generated name; in unseen worlds one never seen "
                   "in training), `other` (real QA answers that fit none). Real QA is classified by a text rule, "
                   "synthetic worlds by how the generator made the value; out-of-scope questions are under refusal.",
    "by_templates": "synthetic_unseen and synthetic_unseen_templates are the same unseen worlds with the same facts "
                    "and questions; only the wording differs (`synthetic.TEMPLATES`): a gap between their rows is "
                    "what training's sentence shapes are worth, apart from the world being new.",
}
COST_KEYS = ("bytes_per_document", "internalize_seconds", "answer_seconds", "latency_by_length")
LABELS = {"nll": "NLL/token", "kl": "KL/token", "tf_em": "teacher-forced EM", "f1": "F1", "em": "EM", "rouge_l": "ROUGE-L",
          "refusal": "refusal", "false_refusal": "false refusal"}
PLOTS = {
    "metrics": ("metrics_by_method.png", "Primary metric and F1 by method × dataset"),
    "interference": ("interference.png", "Interference: metrics vs facts per document"),
    "bytes": ("f1_vs_bytes.png", "F1 vs bytes per document"),
    "latency": ("latency_vs_length.png", "Answer latency vs document length"),
}


# Run metadata.


def _git(*args: str) -> str | None:
  try:
    done = subprocess.run(["git", *args], cwd=pathlib.Path(__file__).resolve().parent, capture_output=True,
                          text=True, timeout=10, check=True)
  except (OSError, subprocess.SubprocessError):
    return None
  return done.stdout.strip()


def _jax_devices() -> str:
  try:
    import jax  # pylint: disable=import-outside-toplevel  (only for the description)
    return str(jax.devices())
  except Exception as e:  # noqa: BLE001  (a broken backend must not lose the report)
    return f"unavailable ({type(e).__name__})"


def run_meta() -> dict:
  """Where and from what the numbers came: git revision (and whether the tree was dirty), machine, time."""
  status = _git("status", "--porcelain", "--untracked-files=no")
  return {
      "git_revision": _git("rev-parse", "HEAD") or "unknown",
      "git_dirty": None if status is None else bool(status),
      "machine": {"platform": platform.platform(), "python": platform.python_version(),
                  "cpu_count": os.cpu_count(), "jax_devices": _jax_devices()},
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


# Aggregation of every table, and the gates.


def compute_tables(records: Sequence[agg.QuestionRecord], **kwargs) -> dict[str, list[dict]]:
  """Every table of TABLES (`kwargs` go to `aggregate`); a table no record falls into is empty."""
  return {name: agg.aggregate(records, group_by=group_by, **kwargs) for name, (group_by, _) in TABLES.items()}


def compute_gates(tables: Mapping[str, list[dict]], *, primary: str, min_gap: float, min_documents: int,
                  min_label_coverage: float) -> list[dict]:
  """Instrument flags for every per-dataset table (tagged with it); label coverage once, per dataset."""
  flags = []
  for name, rows in tables.items():
    if name != "overall" and rows:
      found = agg.instrument_flags(rows, primary=primary, min_gap=min_gap, min_documents=min_documents)
      flags += [{**f, "table": name} for f in found]
  return flags + agg.label_flags(tables["by_dataset"], min_label_coverage=min_label_coverage)


def _check_costs(costs) -> None:
  if costs is None:
    return
  if not isinstance(costs, Mapping):
    raise UserError(f"costs must be a dict with keys from {COST_KEYS} (got {type(costs).__name__})")
  unknown = set(costs) - set(COST_KEYS)
  if unknown:
    raise UserError(f"unknown cost key(s) {sorted(unknown)}; expected some of {COST_KEYS}")


# Formatting.


def _finite(x) -> bool:
  return x is not None and isinstance(x, (int, float, np.floating)) and math.isfinite(x)


def fmt_stat(stat: Mapping | None, *, with_n: bool = False) -> str:
  """"0.412 [0.380, 0.445]" (with " (n=40)"), or "—" where there were no values."""
  if not stat or not stat["n"] or not _finite(stat["mean"]):
    return "—"
  text = f"{stat['mean']:.3f} [{stat['lo']:.3f}, {stat['hi']:.3f}]"
  return f"{text} (n={stat['n']})" if with_n else text


def _fmt_bytes(n) -> str:
  if not _finite(n):
    return "—"
  size, unit = float(n), "B"
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if size < 1024 or unit == "TiB":
      break
    size /= 1024
  return f"{int(n):,} ({size:.1f} {unit})" if unit != "B" else f"{int(n):,}"


def _fmt_seconds(s) -> str:
  return f"{s * 1000:.1f} ms" if _finite(s) else "—"


def md_table(header: Sequence[str], body: Iterable[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in body]
  return "\n".join(lines)


def _routing_cell(row: Mapping, key: str, hidden: set) -> str:
  if row.get("dataset", "all") in hidden:
    return "not reported"
  return fmt_stat(row["routing"].get(key))


def _answer_columns(primary: str, answers: Sequence[str] = ("tf_em", "f1", "em", "rouge_l"),
                    rates: Sequence[str] = agg.RATES) -> list[tuple[str, Callable]]:
  """Primary, the other continuous metric, the answer metrics, the refusal rates."""
  continuous = [primary] + [m for m in ("nll", "kl") if m != primary]
  cols = [(LABELS[m], lambda r, m=m: fmt_stat(r.get(m))) for m in continuous]
  cols += [(LABELS[m], lambda r, m=m: fmt_stat(r.get(m))) for m in answers if m != primary]
  return cols + [(LABELS[m], lambda r, m=m: fmt_stat(r[m], with_n=True)) for m in rates]


def _metric_columns(primary: str, hidden: set, k: int) -> list[tuple[str, Callable]]:
  """The main table's columns after the group keys: the answer columns, then routing precision@k."""
  return [*_answer_columns(primary), (f"routing p@{k}", lambda r: _routing_cell(r, f"precision@{k}", hidden))]


def _bin_columns(primary: str) -> list[tuple[str, Callable]]:
  cols = [(LABELS[primary], lambda r: fmt_stat(r.get(primary)))]
  if primary != "f1":
    cols.append(("F1", lambda r: fmt_stat(r.get("f1"))))
  return cols + [(LABELS[m], lambda r, m=m: fmt_stat(r[m], with_n=True)) for m in agg.RATES]


def _cell_key(row_or_cell: Mapping) -> str:
  """A row's (dataset, bin) cell, the way instrument flags name it, as a hashable key."""
  return json.dumps({k: row_or_cell[k] for k in agg.group_keys(row_or_cell) if k != "method"}, sort_keys=True)


def _render_rows(rows: Sequence[Mapping], group_by: Sequence[str], cols) -> str:
  header = [*group_by, "n", "docs", *(title for title, _ in cols)]
  return md_table(header, ([str(r[k]) for k in group_by] + [str(r["n"]), str(r["n_docs"])] + [fn(r) for _, fn in cols]
                            for r in rows))


def _render_flag(flag: Mapping) -> str:
  if flag["gate"] == "label_coverage":
    return f"- **label coverage**, dataset `{flag['dataset']}`: {flag['reason']}"
  where = ", ".join(f"{k}={v}" for k, v in flag["cell"].items()) or "everywhere"
  table = f" (table {flag['table']})" if "table" in flag else ""
  values = "; ".join(f"{m} {fmt_stat(flag[m])}" for m in (agg.REFERENCE, agg.BASELINE) if flag.get(m))
  return f"- **instrument**, {where}{table}: {flag['reason']}" + (f" — {values}" if values else "")


def _render_costs(costs: Mapping | None) -> str:
  if not costs:
    return "No costs given: the cost table and the two cost plots are skipped."
  by_bytes = costs.get("bytes_per_document") or {}
  forms = list(dict.fromkeys(["codes", "factors"] + [f for per in by_bytes.values() for f in per]))
  methods = list(dict.fromkeys(m for key in ("bytes_per_document", "internalize_seconds", "answer_seconds")
                               for m in costs.get(key) or {}))
  header = ["method", *(f"bytes/doc ({f})" for f in forms), "internalize / doc", "answer / question"]
  body = [[m, *(_fmt_bytes((by_bytes.get(m) or {}).get(f)) for f in forms),
           _fmt_seconds((costs.get("internalize_seconds") or {}).get(m)),
           _fmt_seconds((costs.get("answer_seconds") or {}).get(m))] for m in methods]
  return md_table(header, body) if body else "Costs given, but no per-method numbers in them."


def render_markdown(tables: Mapping[str, list[dict]], flags: Sequence[Mapping], plots: Sequence[Mapping], *,
                    costs: Mapping | None, meta: Mapping, primary: str, routing_k: Sequence[int],
                    n_records: int, min_gap: float, min_documents: int, min_label_coverage: float) -> str:
  """report.md: run, gates (first, so nobody reads a number the gates void), tables, costs, plots."""
  hidden = {f["dataset"] for f in flags if f["gate"] == "label_coverage"}
  machine = meta.get("machine") or {}
  dirty = " (dirty tree)" if meta.get("git_dirty") else ""
  out = ["# Evaluation report", "",
         f"- git revision: `{meta.get('git_revision', 'unknown')}`{dirty}",
         f"- machine: {machine.get('platform', '?')}, {machine.get('cpu_count', '?')} CPUs, "
         f"jax devices {machine.get('jax_devices', '?')}",
         f"- {n_records} question records; primary metric {LABELS[primary]}; 95% bootstrap CIs over documents "
         "(answer metrics and false refusal over answerable questions, refusal over unanswerable ones)",
         "- full config, every row and every record: `results.json`", "",
         "## Gates", "",
         f"No claim is made in a flagged cell. Instrument: {agg.REFERENCE} must be clearly better than "
         f"{agg.BASELINE} ({agg.rule_text(primary, min_gap)}, over at least {min_documents} documents). Labels: "
         f"routing is reported only where evidence labels cover at least {min_label_coverage:.0%} of answerable "
         "questions.", ""]
  out += [_render_flag(f) for f in flags] if flags else ["None fired."]
  out.append("")
  main_cols = _metric_columns(primary, hidden, routing_k[0])
  for name, (group_by, title) in TABLES.items():
    rows = tables[name]
    out += [f"## {title}", ""] + ([NOTES[name], ""] if name in NOTES else [])
    if not rows:
      out += ["No records carry this field.", ""]
      continue
    if name in ("by_dataset", "overall"):
      cols = main_cols
    elif name in ANSWER_TABLES:  # categories are of answerable questions only: no refusal column
      cols = _answer_columns(primary, ("tf_em", "f1", "em"), agg.RATES[1:] if name == "by_category" else agg.RATES)
    else:
      cols = _bin_columns(primary)
    voided = {_cell_key(f["cell"]) for f in flags if f.get("table") == name}
    if voided:
      cols = [*cols, ("gate", lambda r, voided=voided: "no claim" if _cell_key(r) in voided else "")]
    out += [_render_rows(rows, group_by, cols), ""]
  out += ["## Routing", "", _render_routing(tables["by_dataset"], routing_k, hidden), "",
          "## Costs", "", _render_costs(costs), "", "## Plots", ""]
  for plot in plots:
    skipped = f"- {plot['title']}: skipped — {plot['note']}"
    out.append(f"![{plot['title']}]({plot['file']})" if plot["file"] else skipped)
  return "\n".join(out) + "\n"


def _render_routing(rows: Sequence[Mapping], routing_k: Sequence[int], hidden: set) -> str:
  routed = [r for r in rows if any(r["routing"][f"precision@{k}"]["n"] for k in routing_k)]
  if not routed:
    return "No method routed over labelled questions."
  cols = [("label coverage", lambda r: f"{r['routing']['label_coverage']:.0%}" if _finite(
      r["routing"]["label_coverage"]) else "—")]
  for k in routing_k:
    cols += [(f"p@{k}", lambda r, k=k: _routing_cell(r, f"precision@{k}", hidden)),
             (f"r@{k}", lambda r, k=k: _routing_cell(r, f"recall@{k}", hidden))]
  return _render_rows(routed, ("dataset", "method"), cols)


# Plots.


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel  (lazy: importing this module stays cheap)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _save(fig, path: pathlib.Path) -> None:
  plt = _pyplot()
  with fileio.atomic_open(path, "wb") as f:
    fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
  plt.close(fig)


def _errs(stats: Sequence[Mapping]) -> np.ndarray:
  """Error-bar lengths; clipped at 0, as a percentile interval need not contain the mean (nor does rounding)."""
  return np.maximum(0.0, [[s["mean"] - s["lo"] for s in stats], [s["hi"] - s["mean"] for s in stats]])


def _has(stat: Mapping | None) -> bool:
  return bool(stat) and stat["n"] > 0 and _finite(stat["mean"])


def _plot_metrics(path, rows, primary: str) -> str | None:
  metrics = [primary] + (["f1"] if primary != "f1" else [])
  datasets = list(dict.fromkeys(r["dataset"] for r in rows))
  methods = list(dict.fromkeys(r["method"] for r in rows))
  if not any(_has(r.get(m)) for r in rows for m in metrics):
    return f"no {' or '.join(metrics)} values"
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(metrics), figsize=(max(6, 1.5 * len(datasets) * len(metrics) + 3), 4),
                           squeeze=False)
  width = 0.8 / max(1, len(methods))
  for ax, metric in zip(axes[0], metrics):
    for j, method in enumerate(methods):
      cells = [(i, r[metric]) for i, d in enumerate(datasets) for r in rows
               if r["dataset"] == d and r["method"] == method and _has(r.get(metric))]
      if cells:
        xs = [i - 0.4 + width * (j + 0.5) for i, _ in cells]
        ax.bar(xs, [s["mean"] for _, s in cells], width, yerr=_errs([s for _, s in cells]), capsize=2, label=method)
    ax.set_xticks(range(len(datasets)), datasets, rotation=20)
    better = "lower" if metric in agg.LOWER_IS_BETTER else "higher"
    ax.set_title(f"{LABELS[metric]} ({better} is better), 95% CI")
  _legend(axes[0][-1])
  _save(fig, path)
  return None


def _legend(ax) -> None:
  ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)


def plot_interference(path, rows, primary: str) -> str | None:
  rows = [r for r in rows if _finite(r["facts_mean"])]
  if not rows:
    return "no record has facts per document (synthetic data only)"
  metrics = [primary] + (["f1"] if primary != "f1" else [])
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
  for ax, metric in zip(axes[0], metrics):
    for method in dict.fromkeys(r["method"] for r in rows):
      pts = [r for r in rows if r["method"] == method and _has(r.get(metric))]
      if pts:
        ax.errorbar([r["facts_mean"] for r in pts], [r[metric]["mean"] for r in pts],
                    yerr=_errs([r[metric] for r in pts]), marker="o", capsize=2, label=method)
    xs = [r["facts_mean"] for r in rows]
    if max(xs) > 4 * min(xs):
      ax.set_xscale("log", base=2)
    ax.set_xlabel("facts per document (bin mean)")
    ax.set_title(LABELS[metric])
  _legend(axes[0][-1])
  _save(fig, path)
  return None


def _plot_bytes(path, rows, costs) -> str | None:
  by_bytes = (costs or {}).get("bytes_per_document")
  if not by_bytes:
    return "no costs given" if not costs else "costs have no bytes_per_document"
  f1 = {r["method"]: r["f1"] for r in rows if _has(r.get("f1"))}
  methods = [m for m in by_bytes if m in f1]
  if not methods:
    return "no method has both bytes per document and F1"
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  markers = {"codes": "o", "factors": "s"}
  for form in dict.fromkeys(f for m in methods for f in by_bytes[m]):
    pts = [(by_bytes[m][form], f1[m], m) for m in methods if _finite(by_bytes[m].get(form)) and by_bytes[m][form] > 0]
    if pts:
      ax.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts], yerr=_errs([p[1] for p in pts]),
                  fmt=markers.get(form, "^"), capsize=2, label=form)
      for x, s, m in pts:
        ax.annotate(m, (x, s["mean"]), fontsize="x-small", xytext=(3, 3), textcoords="offset points")
  ax.set_xscale("log")
  ax.set_xlabel("bytes per document")
  ax.set_ylabel("F1 (all datasets pooled)")
  ax.legend(fontsize="small", title="storage form")
  _save(fig, path)
  return None


def _plot_latency(path, costs) -> str | None:
  by_length = (costs or {}).get("latency_by_length")
  if not by_length:
    return "no costs given" if not costs else "costs have no latency_by_length"
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for method, pts in by_length.items():
    pts = sorted((float(t), float(s)) for t, s in pts)
    ax.plot([t for t, _ in pts], [s * 1000 for _, s in pts], marker="o", label=method)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("document tokens")
  ax.set_ylabel("answer latency (ms / question)")
  ax.legend(fontsize="small")
  _save(fig, path)
  return None


def write_plots(folder: pathlib.Path, tables: Mapping, interference_rows: Sequence[Mapping], costs, primary: str
                ) -> list[dict]:
  """Each plot of PLOTS, as {"name", "title", "file" (None if skipped), "note" (why skipped)}."""
  makers = {
      "metrics": lambda p: _plot_metrics(p, tables["by_dataset"], primary),
      "interference": lambda p: plot_interference(p, interference_rows, primary),
      "bytes": lambda p: _plot_bytes(p, tables["overall"], costs),
      "latency": lambda p: _plot_latency(p, costs),
  }
  out = []
  for name, (filename, title) in PLOTS.items():
    note = makers[name](folder / filename)
    out.append({"name": name, "title": title, "file": None if note else filename, "note": note})
  return out


# The report.


def jsonable(obj):
  """Strict-JSON data: nan/inf become null, numpy scalars and tuples plain Python, other objects str."""
  if isinstance(obj, Mapping):
    return {str(k): jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple, np.ndarray)):
    return [jsonable(v) for v in obj]
  if isinstance(obj, (bool, np.bool_)):
    return bool(obj)
  if isinstance(obj, (int, np.integer)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    return float(obj) if math.isfinite(obj) else None
  if obj is None or isinstance(obj, str):
    return obj
  return str(obj)


def write_report(folder, records: Iterable[agg.QuestionRecord], *, config: Mapping, costs: Mapping | None,
                 meta: Mapping, primary: str = "nll", bins: Mapping | None = None,
                 routing_k: Sequence[int] = agg.DEFAULT_ROUTING_K, min_gap: float = 0.05, min_documents: int = 5,
                 min_label_coverage: float = 0.5, n_resamples: int = 1000, seed: int = 0) -> None:
  """Writes `folder`/results.json, report.md and the PNG plots (each atomically), from the records.

  `meta` is merged over `run_meta()` (git revision, machine). `costs` follows the schema in this module's
  docstring; without it the cost table and cost plots are skipped, and report.md says so.
  """
  records = list(records)
  if not records:
    raise UserError("no question records to report on")
  agg.check_metric(primary)
  _check_costs(costs)
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  kwargs = {"bins": bins, "routing_k": routing_k, "n_resamples": n_resamples, "seed": seed}
  tables = compute_tables(records, **kwargs)
  flags = compute_gates(tables, primary=primary, min_gap=min_gap, min_documents=min_documents,
                        min_label_coverage=min_label_coverage)
  interference = agg.aggregate(records, group_by=("method", "facts"), **kwargs)
  plots = write_plots(folder, tables, interference, costs, primary)
  meta = {**run_meta(), **meta}
  results = {"meta": meta, "config": config, "primary": primary, "tables": tables, "gates": flags,
             "costs": costs, "plots": plots, "records": [r.to_json() for r in records]}
  fileio.atomic_write_text(folder / "results.json", json.dumps(jsonable(results), indent=1, allow_nan=False))
  fileio.atomic_write_text(folder / "report.md", render_markdown(
      tables, flags, plots, costs=costs, meta=meta, primary=primary, routing_k=tuple(routing_k),
      n_records=len(records), min_gap=min_gap, min_documents=min_documents, min_label_coverage=min_label_coverage))


def load_records(path) -> list[agg.QuestionRecord]:
  """The question records of a results.json (or of the report folder holding one)."""
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / "results.json"
  try:
    obj = json.loads(fileio.read_text(path))
  except json.JSONDecodeError as e:
    raise UserError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(obj, Mapping) or "records" not in obj:
    raise UserError(f"{path} has no 'records': not a results.json written by write_report")
  return [agg.QuestionRecord.from_json(r) for r in obj["records"]]
