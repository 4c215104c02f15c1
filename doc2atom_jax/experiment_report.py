"""The experiment's report (docs/experiment.md, v2): the README's tables, the interference plot and H1-H7.

Reads only what `python -m doc2atom_jax.experiment` wrote under its root:
  final/<method>/results.json, metrics.jsonl, eval.jsonl   training: held-out table, learning checks, step times,
                                                            and how far the held-out NLL still moved at the end
  eval/main/eval/results.json        every method but d2l_256, unseen worlds and real QA (required)
  eval/d2l_256/eval/results.json     d2l_256 (evaluated under the name d2l, renamed here)
  eval/templates/eval/results.json   the held-out wording: synthetic_unseen and synthetic_unseen_templates, paired
  eval/seen/eval/results.json        seen worlds asked in the paraphrase training never used
  eval/capacity/eval/results.json    the capacity oracle
  eval/bank/bank_scale.json          one bank of every unseen world (eval/bank_scale.py)
Every file but the main evaluation is optional: its section says "not run" without it. Writes <out>/results.md,
<out>/hypotheses.json and <out>/interference.png (NLL and tf_em by facts per document), each atomically.
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
BASELINES = ("d2l", "d2l_256", "d2l_atom")  # trained without routing pre-training's extra wall-clock
BYTE_FORMS = ("codes", "kv_cache", "keys+text")  # the form a method keeps, in this preference
SEEN, UNSEEN, HELD_OUT = "synthetic_seen", hyp.UNSEEN, hyp.HELD_OUT_WORDING
LABELS = {"nll": "NLL", "tf_em": "tf_em"}
LAST_STEPS, STILL_LEARNING = 250, 0.05  # the protocol's equal-wall-clock check: nats / token over the last steps
OPTIONAL = {"templates": "eval/templates/eval/results.json", "seen": "eval/seen/eval/results.json",
            "capacity": "eval/capacity/eval/results.json", "bank": "eval/bank/bank_scale.json"}


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


def _bank(path: pathlib.Path) -> tuple[dict | None, str | None]:
  """(bank_scale.json's dict, None), or (None, why its section is empty): its schema is not fixed yet, so an
  unreadable file says so in its section instead of stopping the report."""
  if not path.exists():
    return None, f"not run (`{path.name}` is missing)"
  try:
    found = _load(path)
  except UserError as e:
    return None, f"unreadable: {e}"
  return (found, None) if isinstance(found, dict) else (None, f"unreadable: {path} is not a JSON object")


def load(root: pathlib.Path) -> dict:
  """The evaluations' records (d2l_256 merged in under its own name), costs, gates, the optional evaluations
  (None where not run) and the training runs."""
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
  optional = {name: _records(_load(root / rel)) if (root / rel).exists() else None
              for name, rel in OPTIONAL.items() if name != "bank"}
  bank, bank_note = _bank(root / OPTIONAL["bank"])
  return {"records": records, "costs": costs, "gates": main.get("gates") or [], **optional, "bank": bank,
          "bank_note": bank_note, "training": {m: training_summary(root / "final" / m) for m in TRAINED},
          "meta": main.get("meta") or {}}


def _jsonl(path: pathlib.Path) -> list[dict]:
  rows = []
  for line in fileio.read_text(path).splitlines() if path.exists() else ():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      continue  # a line cut by a stop mid-write
  return rows


def late_gain(curve: Mapping[int, float], window: int = LAST_STEPS) -> float | None:
  """How far the held-out NLL fell over the last `window` steps (positive: still learning): the value at the
  last evaluated step at least `window` before the end minus the last value; None without such a step."""
  if not curve:
    return None
  last = max(curve)
  before = [s for s in curve if s <= last - window]
  return curve[max(before)] - curve[last] if before else None


def training_summary(workdir: pathlib.Path) -> dict | None:
  """A final run's steps, training seconds (the sum of its logged step times: compile included, restarts not
  double-counted), held-out KL and NLL, the held-out NLL's gain over its last LAST_STEPS steps, and its
  learning checks; None when the run is not there."""
  results = workdir / "results.json"
  if not results.exists():
    return None
  steps = {int(r["step"]): float(r["step_time_s"]) for r in _jsonl(workdir / "metrics.jsonl") if "step_time_s" in r}
  curve = {int(r["step"]): float(r["nll"]) for r in _jsonl(workdir / "eval.jsonl")
           if r.get("nll") is not None and "step" in r}  # the last line of a step wins (a resumed run)
  found = _load(results)
  trained = found["methods"].get("doc2atom") or {}  # the trainer's table names every trained method so
  return {"steps": max(steps, default=0), "train_seconds": sum(steps.values()), "heldout_kl": trained.get("kl"),
          "heldout_nll": trained.get("nll"), "late_gain": late_gain(curve),
          "learning_check": found.get("learning_check") or [], "methods": found["methods"]}


# Tables.


def _fmt(stat: Mapping | None, digits: int = 3, percent: bool = False, sign: bool = False) -> str:
  if not stat or not stat.get("n") or stat.get("mean") is None or not math.isfinite(stat["mean"]):
    return "—"
  if percent:
    return f"{stat['mean']:.0%} [{stat['lo']:.0%}, {stat['hi']:.0%}]"
  f = f"+.{digits}f" if sign else f".{digits}f"
  return f"{stat['mean']:{f}} [{stat['lo']:{f}}, {stat['hi']:{f}}]"


def _num(x, digits: int = 3, sign: bool = False) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "—"
  return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


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


def _methods(present) -> list[str]:
  present = list(dict.fromkeys(present))
  return [m for m in ORDER if m in present] + [m for m in present if m not in ORDER]


def results_table(records: Sequence[agg.QuestionRecord], costs: Mapping, n_resamples: int = 1000) -> str:
  """One row per method: unseen-world NLL, tf_em, KL, F1, refusal, false refusal, router precision@1 and
  recall@4; real-QA NLL and tf_em; bytes per document; answer latency relative to in_context."""
  boot = {"n_resamples": n_resamples}
  unseen = hyp.by_method([r for r in records if r.dataset == UNSEEN], boot=boot)
  real = hyp.by_method([r for r in records if r.world is None], boot=boot)
  rows = []
  for m in _methods(unseen):
    u, q = unseen[m], real.get(m) or {}
    routing = u.get("routing") or {}
    rows.append([m, _fmt(u["nll"]), _fmt(u["tf_em"]), _fmt(u["kl"]), _fmt(u["f1"]), _fmt(u["refusal"], percent=True),
                 _fmt(u["false_refusal"], percent=True), _fmt(routing.get("precision@1")),
                 _fmt(routing.get("recall@4")), _fmt(q.get("nll")), _fmt(q.get("tf_em")), _bytes(costs, m),
                 _latency(costs, m)])
  header = ["method", "NLL unseen (primary)", "tf_em unseen (co-primary)", "KL unseen", "F1 unseen",
            "refusal (out of scope)", "false refusal", "router p@1", "router r@4", "NLL real QA", "tf_em real QA",
            "bytes / document", "answer latency / in_context"]
  return report_lib.md_table(header, rows)


def grouped_table(records: Sequence[agg.QuestionRecord], key: str, metric: str, n_resamples: int = 1000) -> str:
  """`metric` per method (rows) and value of `key` (columns: question kind or answer category), unseen worlds,
  answerable questions."""
  answerable = [r for r in records if r.dataset == UNSEEN and r.answerable]
  rows = hyp.by_method(answerable, boot={"n_resamples": n_resamples}, group_by=(key,))
  values = list(dict.fromkeys(v for _, v in rows))
  body = [[m, *(_fmt((rows.get((m, v)) or {}).get(metric)) for v in values)] for m in _methods(m for m, _ in rows)]
  counts = {v: sum(r.method == "doc2atom" and getattr(r, key) == v for r in answerable) for v in values}
  return report_lib.md_table(["method", *(f"{v} (n={n})" for v, n in counts.items())], body)


def facts_table(curves: Mapping[str, Mapping]) -> str:
  """The metric's mean [CI] per method at each facts size, and the slope per doubling with its CI."""
  sizes = sorted({f for c in curves.values() for f in c["facts"]})
  rows = [[m, *(_fmt(c["stats"].get(f)) for f in sizes),
           f"{_num(c['slope'], sign=True)} [{_num(c['slope_ci'][0], sign=True)}, {_num(c['slope_ci'][1], sign=True)}]"]
          for m, c in curves.items()]
  return report_lib.md_table(["method", *(f"{f} facts" for f in sizes), "slope / doubling"], rows)


def wording_table(records: Sequence[agg.QuestionRecord], n_resamples: int = 1000) -> str:
  """Per method: NLL and tf_em in training's wording and in the held-out one, and the paired gap (held-out -
  training's, the same worlds and questions)."""
  boot = {"n_resamples": n_resamples}
  sides = {d: hyp.by_method([r for r in records if r.dataset == d], boot=boot) for d in (UNSEEN, HELD_OUT)}
  body = []
  for m in _methods(r.method for r in records if r.dataset in sides):
    row, gaps = [m], {x: hyp.wording_gap(records, m, x, **boot) for x in hyp.METRICS}
    for metric, gap in gaps.items():
      row += [_fmt((sides[UNSEEN].get(m) or {}).get(metric)), _fmt((sides[HELD_OUT].get(m) or {}).get(metric)),
              _fmt(gap, sign=True)]
    body.append([*row, str(gaps["nll"]["n"])])
  header = ["method", *(f"{LABELS[x]} {w}" for x in hyp.METRICS
                        for w in ("training wording", "held-out wording", "gap (paired)")), "questions paired"]
  return report_lib.md_table(header, body)


def seen_table(seen: Sequence[agg.QuestionRecord], unseen: Sequence[agg.QuestionRecord], n_resamples: int = 1000
               ) -> str:
  """Per method: seen worlds (new paraphrase) beside the unseen worlds, NLL, tf_em and F1."""
  boot = {"n_resamples": n_resamples}
  rows = {name: hyp.by_method([r for r in found if r.dataset == d], boot=boot)
          for name, found, d in (("seen", seen, SEEN), ("unseen", unseen, UNSEEN))}
  body = [[m, *(_fmt((rows[w].get(m) or {}).get(metric)) for metric in ("nll", "tf_em", "f1") for w in rows)]
          for m in _methods(rows["seen"])]
  return report_lib.md_table(["method", *(f"{LABELS.get(x, 'F1')} {w}" for x in ("nll", "tf_em", "f1")
                                          for w in rows)], body)


def bank_table(bank: Mapping) -> str | None:
  """Whatever numeric metrics bank_scale.json holds, one row per setting; None when it holds none."""
  rows = hyp.bank_rows(bank)
  if not rows:
    return None
  columns = list(dict.fromkeys(k for metrics in rows.values() for k in metrics))
  cell = lambda x: "—" if x is None or not math.isfinite(x) else (f"{x:g}" if float(x).is_integer() else f"{x:.3f}")
  return report_lib.md_table(["setting", *columns], [[label, *(cell(m.get(c)) for c in columns)]
                                                     for label, m in rows.items()])


def qa_table(records: Sequence[agg.QuestionRecord], n_resamples: int = 1000) -> str:
  """NLL / tf_em per bundled real QA dataset and method (no facts, no world: the real samples)."""
  rows = hyp.by_method([r for r in records if r.world is None], boot={"n_resamples": n_resamples},
                       group_by=("dataset",))
  datasets = list(dict.fromkeys(d for _, d in rows))
  methods = _methods(m for m, _ in rows)
  body = [[d, *(f"{_fmt((rows.get((m, d)) or {}).get('nll'), 2)} / {_fmt((rows.get((m, d)) or {}).get('tf_em'), 2)}"
                for m in methods)] for d in datasets]
  return report_lib.md_table(["dataset (NLL / tf_em)", *methods], body)


def training_table(training: Mapping[str, Mapping | None]) -> str:
  rows = []
  for m, t in training.items():
    if t is None:
      rows.append([m, "not run", "", "", "", "", ""])
      continue
    checks = ", ".join(f"{c['control']}{'' if c.get('metric', 'kl') == 'kl' else ' (' + c['metric'] + ')'}: "
                       f"{'pass' if c['passed'] else 'FAIL'} ({c.get('control_value', c.get('control_kl')):.3f})"
                       for c in t["learning_check"])
    rows.append([m, str(t["steps"]), f"{t['train_seconds'] / 60:.1f}", _num(t["heldout_kl"]), _num(t["heldout_nll"]),
                 _num(t.get("late_gain"), sign=True), checks or "—"])
  return report_lib.md_table(["method", "steps", "training minutes", "held-out KL", "held-out NLL",
                              f"held-out NLL gain, last {LAST_STEPS} steps", "learning checks (control KL)"], rows)


def still_learning(training: Mapping[str, Mapping | None]) -> list[str]:
  """The protocol's equal-wall-clock caveat: a baseline whose held-out NLL still fell by more than STILL_LEARNING
  nats over its last LAST_STEPS steps could have changed a decision against it with doc2atom's wall-clock."""
  out = []
  for m in BASELINES:
    gain = (training.get(m) or {}).get("late_gain")
    if gain is not None and gain > STILL_LEARNING:
      out.append(f"{m}'s held-out NLL still fell {gain:.3f} nats/token over its last {LAST_STEPS} steps (> "
                 f"{STILL_LEARNING}): equal wall-clock (routing pre-training's time) could have changed a decision "
                 f"against it.")
  return out


def capacity_table(records: Sequence[agg.QuestionRecord], metric: str = "nll", n_resamples: int = 1000) -> str:
  """`metric` per method and facts size of the capacity oracle's worlds."""
  rows = hyp.by_method([r for r in records if r.dataset == UNSEEN], group_by=("facts",),
                       boot={"n_resamples": n_resamples, "bins": {"facts": hyp.bin_edges(records)}})
  sizes = {f: round(row["facts_mean"]) for (_, f), row in rows.items()}
  body = [[m, *(_fmt((rows.get((m, f)) or {}).get(metric)) for f in sizes)] for m in _methods(m for m, _ in rows)]
  return report_lib.md_table(["method", *(f"{LABELS[metric]} facts {n}" for n in sizes.values())], body)


# The plot.


def plot_interference(path: pathlib.Path, rows: Sequence[Mapping], metrics: Sequence[str] = hyp.METRICS
                      ) -> str | None:
  """One panel per metric: its mean [CI] per method against facts per document (log2); None when drawn, else
  why not."""
  rows = [r for r in rows if r.get("facts_mean") is not None and math.isfinite(r["facts_mean"])]
  if not rows:
    return "no record has facts per document"
  # pylint: disable=protected-access  (report.py's plotting helpers: Agg backend, error bars, atomic save)
  plt = report_lib._pyplot()
  fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
  for ax, metric in zip(axes[0], metrics):
    for method in _methods(r["method"] for r in rows):
      pts = [r for r in rows if r["method"] == method and report_lib._has(r.get(metric))]
      if pts:
        ax.errorbar([r["facts_mean"] for r in pts], [r[metric]["mean"] for r in pts],
                    yerr=report_lib._errs([r[metric] for r in pts]), marker="o", capsize=2, label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("facts per document")
    ax.set_title(f"{report_lib.LABELS.get(metric, metric)} ({'lower' if metric in agg.LOWER_IS_BETTER else 'higher'}"
                 " is better)")
  axes[0][-1].legend(fontsize="small", loc="center left", bbox_to_anchor=(1, 0.5))
  report_lib._save(fig, path)
  return None


# Hypotheses.


def _diff(d: Mapping) -> str:
  return f"paired difference {_fmt(d, sign=True)} over {d['n']} questions"


def _h1_text(n: Mapping, base: str) -> str:
  at = "; ".join(f"{f} facts: doc2atom {_fmt(n[f'at {f}']['doc2atom'])} vs {_fmt(n[f'at {f}'][base])}, "
                 f"{_diff(n[f'at {f}']['paired difference'])} ({n[f'at {f}']['paired']})" for f in hyp.H1_SIZES)
  v1 = n[hyp.V1_RULE]
  return (f"slope per doubling doc2atom {_num(n['slope'], sign=True)} [{_num(n['slope_ci'][0], sign=True)}, "
          f"{_num(n['slope_ci'][1], sign=True)}] vs {base} {_num(n[f'{base} slope'], sign=True)} "
          f"[{_num(n[f'{base} slope_ci'][0], sign=True)}, {_num(n[f'{base} slope_ci'][1], sign=True)}] "
          f"({'flatter' if n['flatter'] else 'not flatter'}); {at}. v1's rule (CI overlap): "
          + ", ".join(f"{f} facts {v1[f'at {f}']}" for f in hyp.H1_SIZES) + f" → {v1['decision']}")


def _pair_text(n: Mapping, a: str, b: str) -> str:
  parts = [f"{LABELS[m]}: {a} {_fmt(n[m][a])} vs {b} {_fmt(n[m][b])}, {_diff(n[m]['paired difference'])} "
           f"({n[m]['paired']})" for m in hyp.METRICS]
  v1 = ", ".join(f"{LABELS[m]} {n[m][hyp.V1_RULE]['order']} → {n[m][hyp.V1_RULE]['decision']}"
                 if isinstance(n[m][hyp.V1_RULE], Mapping) else f"{LABELS[m]} {n[m][hyp.V1_RULE]}"
                 for m in hyp.METRICS)
  return "; ".join(parts) + f". v1's rule (CI overlap): {v1}"


def _h6_text(n: Mapping) -> str:
  at = "; ".join(f"{f} facts: doc2atom {_fmt(n[f'at {f}']['doc2atom'])} vs in_context "
                 f"{_fmt(n[f'at {f}']['in_context'])}, {_diff(n[f'at {f}']['paired difference'])}"
                 for f in hyp.H6_SIZES)
  v1 = ", ".join(f"{f} facts {n[f'at {f}'][hyp.V1_RULE]}" for f in hyp.H6_SIZES)
  return (f"tf_em on {' and '.join(n['categories'])} answers: {at}; non-inferiority margin {n['margin']:.2f}. "
          f"v1's rule (CI overlap): {v1}")


def _h7_text(n: Mapping) -> str:
  at = "; ".join(f"{s} facts: p@1 {_fmt(n[f'at {s}']['precision@1'])}, r@4 {_fmt(n[f'at {s}']['recall@4'])} "
                 f"({n[f'at {s}']['questions'] - n[f'at {s}']['unscored']} questions, {n[f'at {s}']['documents']} "
                 "documents)" for s in hyp.H7_SIZES if f"at {s}" in n)
  text = f"per document: {at or 'no single-fact question routed'}"
  if n["missing sizes"]:
    text += f"; no question at {', '.join(map(str, n['missing sizes']))} facts"
  if n.get("bank scale") is None:
    text += "; bank scale: not run"
  else:
    text += "; bank scale: " + ("; ".join(
        f"{label} " + ", ".join(f"{k} {_num(v)}" for k, v in m.items()) for label, m in n["bank scale"].items())
                               or "no routing numbers in bank_scale.json")
  return text


def hypothesis_lines(decisions: Mapping[str, Mapping]) -> list[str]:
  """One bullet per hypothesis: the decision, the numbers it rests on, and the gate where it fires."""
  out = []
  for name, d in decisions.items():
    n = d["numbers"]
    if name.startswith("H1"):
      text = _h1_text(n, d["baseline"])
    elif name in ("H2", "H3a", "H3b", "H5"):
      text = _pair_text(n, *d["pair"])
    elif name == "H4":
      text = (f"refusal {_fmt(n['refusal'], percent=True)}, false refusal {_fmt(n['false_refusal'], percent=True)};"
              f" v1's thresholds (80% / 10%): {n['v1 thresholds (80% / 10%)']}")
    elif name == "H6":
      text = _h6_text(n)
    elif name == "H7":
      text = _h7_text(n)
    else:
      text = json.dumps(report_lib.jsonable(n))
    gate = f" **Gate: no claim** ({'; '.join(d['gate'])})." if d["gate"] else " Gate: passes."
    out.append(f"- **{name}** ({d['claim']}): **{d['decision']}**. {text}.{gate}")
  return out


def _not_run(name: str) -> list[str]:
  return [f"Not run (`{OPTIONAL[name]}` is missing).", ""]


def write(root, out, *, n_resamples: int = 1000) -> pathlib.Path:
  """results.md, hypotheses.json and interference.png under `out`, from the runs under `root`."""
  root, out = pathlib.Path(root), pathlib.Path(out)
  found = load(root)
  records, costs = found["records"], found["costs"]
  boot = {"n_resamples": n_resamples}
  methods = _methods(r.method for r in records)
  curves = {m: hyp.interference(records, methods, metric=m, **boot) for m in hyp.METRICS}
  decisions = hyp.decide(records, curves=curves, bank=found["bank"], **boot)
  out.mkdir(parents=True, exist_ok=True)
  plot_rows = agg.aggregate([r for r in records if r.dataset == UNSEEN], group_by=("method", "facts"),
                            n_resamples=n_resamples, metrics=hyp.METRICS, bins={"facts": hyp.bin_edges(records)})
  note = plot_interference(out / "interference.png", plot_rows)
  gates = [f"- {g.get('table', '')} {json.dumps(g.get('cell', g.get('dataset')))}: {g['reason']}"
           for g in found["gates"]]
  answer_at = max((t for pts in (costs.get("latency_by_length") or {}).values() for t, _ in pts), default=None)
  unseen = [r for r in records if r.dataset == UNSEEN]
  text = [
      "## Results", "",
      f"All numbers: `python -m doc2atom_jax.experiment report` over `{root}` (git "
      f"`{found['meta'].get('git_revision', '?')}`); 95% bootstrap CIs over documents. Unseen: "
      f"{len({r.doc_id for r in unseen})} synthetic worlds never trained on; answer metrics (NLL primary, "
      "teacher-forced exact match co-primary) over answerable questions, refusal over out-of-scope ones. Answer "
      f"latency at {answer_at} document tokens.", "",
      results_table(records, costs, n_resamples), ""]
  for key, title in (("kind", "question kind"), ("category", "answer category")):
    for metric in hyp.METRICS:
      text += [f"### {LABELS[metric]} by {title} (unseen worlds; n: doc2atom's questions)", "",
               grouped_table(records, key, metric, n_resamples), ""]
  for metric in hyp.METRICS:
    text += [f"### Interference: {LABELS[metric]} by facts per document (unseen worlds)", "",
             facts_table(curves[metric]), ""]
  text += ["![interference](interference.png)" if note is None else f"(interference plot skipped: {note})", "",
           "### Hypotheses (v2 decision rules in docs/experiment.md: the paired rule; v1's CI-overlap reading "
           "beside)", "", *hypothesis_lines(decisions), ""]
  text += ["### Held-out wording (the same worlds and questions in the templates training never saw)", ""]
  text += [wording_table(found["templates"], n_resamples), ""] if found["templates"] else _not_run("templates")
  text += ["### Seen worlds (training documents, the paraphrase training never used)", ""]
  text += [seen_table(found["seen"], records, n_resamples), ""] if found["seen"] else _not_run("seen")
  text += ["### Bank scale (every unseen world in one bank, the router not told which document)", ""]
  table = bank_table(found["bank"]) if found["bank"] is not None else None
  text += [table or (found["bank_note"] or "bank_scale.json holds no numeric metrics."), ""]
  text += ["### Training (equal budget)", "", training_table(found["training"]), "",
           *(still_learning(found["training"]) or [f"No baseline's held-out NLL fell more than {STILL_LEARNING} "
                                                   f"nats/token over its last {LAST_STEPS} steps (where measured)."]),
           "", "### Real QA samples (per dataset)", "", qa_table(records, n_resamples), ""]
  text += ["### Capacity oracle (free LoRAs fitted per atom / per document)", ""]
  text += ([capacity_table(found["capacity"], m, n_resamples) + "\n" for m in hyp.METRICS] if found["capacity"]
           else _not_run("capacity"))
  text += ["### Instrument gates of the main evaluation", "", *(gates or ["None fired."]), ""]
  wording = {m: {x: hyp.wording_gap(found["templates"], m, x, **boot) for x in hyp.METRICS}
             for m in _methods(r.method for r in found["templates"] or ())}
  fileio.atomic_write_text(out / "results.md", "\n".join(text))
  fileio.atomic_write_text(out / "hypotheses.json", json.dumps(report_lib.jsonable(
      {"decisions": decisions, "curves": curves, "wording_gap": wording, "bank": hyp.bank_rows(found["bank"])}),
      indent=1, allow_nan=False))
  return out / "results.md"
