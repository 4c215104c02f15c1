"""The pre-registered decisions of docs/experiment.md (H1-H5), as pure functions of question records.

Every comparison is on the unseen synthetic worlds, with 95% bootstrap CIs that resample documents
(aggregate.py); "lower" / "higher" means the two CIs do not overlap. Each decision also carries the
instrument gate of the cells it rests on: where in_context is not clearly better than no_context there (or a
cell has too few documents), the decision is still computed and shown, but marked "no claim". A paired
difference (same questions, clustered by document) is reported next to each comparison as extra evidence;
the decisions use only the rules written before the runs.
"""

import math
from collections.abc import Mapping, Sequence

import numpy as np

from doc2atom_jax.eval import aggregate as agg

UNSEEN = "synthetic_unseen"
SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE, NOT_MEASURED = "supported", "not supported", "inconclusive", "not measured"
H1_SIZES = (32, 64)  # H1's CI comparison is at these facts per document


def _unseen(records) -> list[agg.QuestionRecord]:
  return [r for r in records if r.dataset == UNSEEN]


def by_method(records, *, boot: Mapping | None = None, group_by: Sequence[str] = ()) -> dict:
  """aggregate() rows keyed by (method, *group values), or by method alone without `group_by`."""
  rows = agg.aggregate(records, group_by=("method", *group_by), **(boot or {}))
  return {(r["method"], *(r[k] for k in group_by)) if group_by else r["method"]: r for r in rows}


def order(a: Mapping | None, b: Mapping | None) -> str:
  """How stat `a` sits against stat `b`: "lower" / "higher" when the CIs do not overlap, else "overlap"."""
  if not a or not b or not a["n"] or not b["n"] or not all(map(math.isfinite, (a["lo"], a["hi"], b["lo"], b["hi"]))):
    return "missing"
  if a["hi"] < b["lo"]:
    return "lower"
  if a["lo"] > b["hi"]:
    return "higher"
  return "overlap"


def ci_decision(found: str) -> str:
  """H2 / H3's rule: lower (non-overlapping CIs) supports, higher refutes, overlap is inconclusive."""
  return {"lower": SUPPORTED, "higher": NOT_SUPPORTED, "overlap": INCONCLUSIVE}.get(found, NOT_MEASURED)


def h1_decision(slope: float, baseline_slope: float, orders: Sequence[str]) -> str:
  """H1's rule: a flatter slope *and* a lower mean with non-overlapping CIs at every size of H1_SIZES."""
  if not (math.isfinite(slope) and math.isfinite(baseline_slope)) or "missing" in orders:
    return NOT_MEASURED
  if slope >= baseline_slope:
    return NOT_SUPPORTED
  return SUPPORTED if all(o == "lower" for o in orders) else INCONCLUSIVE


def slope(facts: Sequence[float], values: Sequence[float]) -> float:
  """Least-squares slope of `values` against log2(facts): the change per doubling of facts per document."""
  x, y = np.log2(np.asarray(facts, np.float64)), np.asarray(values, np.float64)
  if x.size < 2 or np.ptp(x) == 0 or not np.all(np.isfinite(y)):
    return math.nan
  return float(np.polyfit(x, y, 1)[0])


def _doc_sums(records, metric: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
  """facts -> (per-document sums, per-document counts) of `metric` over answerable questions."""
  per: dict[int, dict[str, list[float]]] = {}
  for r in records:
    value = getattr(r, metric)
    if r.answerable and value is not None and r.facts is not None:
      per.setdefault(int(r.facts), {}).setdefault(r.doc_id, []).append(float(value))
  return {f: (np.array([sum(v) for v in docs.values()]), np.array([len(v) for v in docs.values()], np.float64))
          for f, docs in sorted(per.items())}


def interference(records, methods: Sequence[str], *, metric: str = "nll", n_resamples: int = 1000, seed: int = 0
                 ) -> dict[str, dict]:
  """Per method, on the unseen worlds: facts sizes, the metric's stat at each, the slope against log2(facts)
  and its 95% bootstrap interval (documents resampled within each size)."""
  out = {}
  rows = by_method(_unseen(records), group_by=("facts",), boot={"n_resamples": n_resamples, "seed": seed,
                                                                "bins": {"facts": bin_edges(records)}})
  for method in methods:
    mine = [r for r in _unseen(records) if r.method == method]
    sums = _doc_sums(mine, metric)
    if not sums:
      continue
    facts = list(sums)
    means = [s.sum() / c.sum() for s, c in sums.values()]
    rng = np.random.default_rng(seed)
    draws = np.stack([agg.resampled_means(s, c, n_resamples, rng) for s, c in sums.values()], 1)  # [n_resamples, sizes]
    x = np.log2(np.asarray(facts, np.float64))
    slopes = np.polyfit(x, draws.T, 1)[0] if len(facts) > 1 else np.full(n_resamples, np.nan)
    stats = {f: next((row[metric] for (m, _), row in rows.items() if m == method and row["facts_mean"] == f), None)
             for f in facts}
    out[method] = {"facts": facts, "means": means, "stats": stats, "slope": slope(facts, means),
                   "slope_ci": tuple(float(q) for q in np.quantile(slopes, [0.025, 0.975]))}
  return out


def bin_edges(records) -> tuple[float, ...]:
  """Facts bin edges that give every facts size its own bin."""
  sizes = sorted({int(r.facts) for r in records if r.facts is not None})
  return (1, *(s + 0.5 for s in sizes)) if sizes else (1, 2.0)


def paired_difference(records, a: str, b: str, metric: str, *, kind: str | None = None, n_resamples: int = 1000,
                      seed: int = 0) -> dict:
  """Mean of (a - b) over the answerable unseen questions both methods scored, with a 95% CI clustered by
  document: the same questions on both sides, so it is tighter than comparing the two CIs."""
  scores: dict[str, dict[tuple, float]] = {a: {}, b: {}}
  for r in _unseen(records):
    value = getattr(r, metric)
    if r.method in scores and r.answerable and value is not None and (kind is None or r.kind == kind):
      scores[r.method][(r.doc_id, r.qid)] = float(value)
  both = sorted(set(scores[a]) & set(scores[b]))
  diffs = [scores[a][key] - scores[b][key] for key in both]
  docs = {}
  clusters = [docs.setdefault(doc, len(docs)) for doc, _ in both]
  mean, lo, hi = agg.bootstrap_ci(diffs, cluster=clusters, n_resamples=n_resamples, seed=seed)
  return {"mean": mean, "lo": lo, "hi": hi, "n": len(diffs)}


def instrument(records, group_by: Sequence[str], *, primary: str = "nll", min_gap: float = 0.05,
               min_documents: int = 5, n_resamples: int = 1000, seed: int = 0, keep=None) -> list[str]:
  """The instrument gate's reasons for the unseen cells of `group_by` (kept where `keep(row)`), [] if it passes."""
  ref = [r for r in _unseen(records) if r.method in (agg.REFERENCE, agg.BASELINE)]
  rows = agg.aggregate(ref, group_by=("method", *group_by), n_resamples=n_resamples, seed=seed,
                       bins={"facts": bin_edges(records)})
  rows = [r for r in rows if keep is None or keep(r)]
  flags = agg.instrument_flags(rows, primary=primary, min_gap=min_gap, min_documents=min_documents)
  return [f"{_cell_text(f['cell'])}: {f['reason']}" for f in flags]


def _cell_text(cell: Mapping) -> str:
  return ", ".join(f"{k} {v}" for k, v in cell.items()) or "all"


def decide(records, *, baselines: Sequence[str] = ("d2l", "d2l_256"), n_resamples: int = 1000, seed: int = 0,
           min_documents: int = 5, curves: Mapping[str, dict] | None = None) -> dict[str, dict]:
  """H1 (per baseline), H2, H3a, H3b, H4 and H5: each {"claim", "decision", "numbers", "gate" (reasons the
  instrument gate voids it; empty when it passes)}. `curves`: `interference`'s result, where already computed."""
  records = list(records)
  unseen = _unseen(records)
  boot = {"n_resamples": n_resamples, "seed": seed}
  gate = lambda *group_by, keep=None: instrument(records, group_by, min_documents=min_documents, keep=keep, **boot)
  pooled = by_method(unseen, boot=boot)
  stat = lambda method, metric="nll", rows=pooled: (rows.get(method) or {}).get(metric)
  methods = {r.method for r in unseen}
  out = {}

  curves = curves if curves is not None else interference(records, ["doc2atom", *baselines], **boot)
  at_sizes = lambda method: [curves.get(method, {}).get("stats", {}).get(f) for f in H1_SIZES]
  for base in baselines:
    if base not in methods or "doc2atom" not in curves:
      continue
    orders = [order(a, b) for a, b in zip(at_sizes("doc2atom"), at_sizes(base))]
    mine, theirs = curves["doc2atom"], curves[base]
    out[f"H1 vs {base}"] = {
        "claim": f"doc2atom's NLL degrades less than {base}'s from 4 to 64 facts per document",
        "decision": h1_decision(mine["slope"], theirs["slope"], orders),
        "numbers": {"slope": mine["slope"], "slope_ci": mine["slope_ci"], f"{base} slope": theirs["slope"],
                    f"{base} slope_ci": theirs["slope_ci"],
                    **{f"at {f}": {"doc2atom": a, base: b, "order": o}
                       for f, a, b, o in zip(H1_SIZES, at_sizes("doc2atom"), at_sizes(base), orders)}},
        "gate": gate("facts")}

  two_hop = by_method([r for r in unseen if r.kind == "two_hop"], boot=boot)
  comparisons = {
      "H2": ("doc2atom", "d2l", two_hop, "two_hop", "on two-hop questions doc2atom's NLL <= d2l's"),
      "H3a": ("doc2atom", "d2l_atom", pooled, None, "doc2atom's NLL <= d2l_atom's (the router matters)"),
      "H3b": ("doc2atom_oracle", "doc2atom", pooled, None, "doc2atom_oracle's NLL <= doc2atom's (routing headroom)"),
  }
  for name, (a, b, rows, kind, claim) in comparisons.items():
    if a not in methods or b not in methods:
      continue
    found = order(stat(a, rows=rows), stat(b, rows=rows))
    out[name] = {"claim": claim, "decision": ci_decision(found),
                 "numbers": {a: stat(a, rows=rows), b: stat(b, rows=rows), "order": found,
                             "paired difference": paired_difference(records, a, b, "nll", kind=kind, **boot)},
                 "gate": gate("kind", keep=lambda r: r["kind"] == "two_hop") if kind else gate()}

  if "doc2atom" in methods:
    refusal, false_refusal = stat("doc2atom", "refusal"), stat("doc2atom", "false_refusal")
    measured = bool(refusal and refusal["n"] and false_refusal and false_refusal["n"])
    met = measured and refusal["mean"] >= 0.8 and false_refusal["mean"] <= 0.1
    out["H4"] = {"claim": "doc2atom refuses >= 80% of out-of-scope questions and <= 10% of answerable ones",
                 "decision": (SUPPORTED if met else NOT_SUPPORTED) if measured else NOT_MEASURED,
                 "numbers": {"refusal": refusal, "false_refusal": false_refusal}, "gate": gate()}

  if "doc2atom" in methods and "rag_atoms" in methods:
    found = order(stat("doc2atom"), stat("rag_atoms"))
    winner = {"lower": "doc2atom", "higher": "rag_atoms"}.get(found, "neither (CIs overlap)")
    out["H5"] = {"claim": "compiling the routed atoms into weights (doc2atom) vs their text in the prompt (rag_atoms)",
                 "decision": f"lower NLL: {winner}",
                 "numbers": {"doc2atom": stat("doc2atom"), "rag_atoms": stat("rag_atoms"), "order": found,
                             "paired difference": paired_difference(records, "doc2atom", "rag_atoms", "nll", **boot),
                             "f1": {"doc2atom": stat("doc2atom", "f1"), "rag_atoms": stat("rag_atoms", "f1"),
                                    "order": order(stat("doc2atom", "f1"), stat("rag_atoms", "f1")),
                                    "paired difference": paired_difference(records, "doc2atom", "rag_atoms", "f1",
                                                                           **boot)}},
                 "gate": gate()}
  return out
