"""The pre-registered decisions of docs/experiment.md, v2 (H1-H7), as pure functions of question records.

v2's rule for "A better than B" is the paired one: every method answers the same questions, so the mean of
A - B over the answerable questions both scored, with a 95% bootstrap CI that resamples documents, is lower /
higher when the CI lies below / above 0 and tied otherwise (`paired_difference`, `paired_order`). v1 decided
on two CIs not overlapping (`order`); that reading is kept in each decision's numbers, under V1_RULE, for
comparison with v1, and decides nothing. Each decision also carries the instrument gate of the cells it rests
on: where in_context is not clearly better than no_context there (or a cell has too few documents), the
decision is still computed and shown, but marked "no claim".
"""

import math
from collections.abc import Collection, Mapping, Sequence

import numpy as np

from doc2atom_jax.data import answers
from doc2atom_jax.eval import aggregate as agg

UNSEEN = "synthetic_unseen"
HELD_OUT_WORDING = "synthetic_unseen_templates"  # UNSEEN's worlds written and asked in the held-out templates
SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE, NOT_MEASURED = "supported", "not supported", "inconclusive", "not measured"
BETTER, WORSE, TIED, MISSING = "better", "worse", "tied", "missing"
V1_RULE = "v1 rule (CI overlap)"  # the key of v1's reading in a decision's numbers
METRICS = ("nll", "tf_em")  # primary and co-primary
H1_SIZES = (32, 64)  # H1's paired comparison is at these facts per document
H4_THRESHOLDS = {"v2": (0.90, 0.05), "v1": (0.80, 0.10)}  # (refusal of out-of-scope >=, false refusal <=)
H6_SIZES = (32, 64)
H6_CATEGORIES = (answers.CLOSED_POOL, answers.NUMBER)
H6_MARGIN = 0.05  # non-inferiority: the CI's lower end must lie above -H6_MARGIN (5 points of tf_em)
H7_SIZES = (4, 8, 16, 32, 64)
H7_KIND = "single"  # aggregate.KINDS' single-fact questions
H7_THRESHOLD = 0.95
H7_MIN_LABEL_COVERAGE = 0.5


def _unseen(records) -> list[agg.QuestionRecord]:
  return [r for r in records if r.dataset == UNSEEN]


def better_side(metric: str) -> str:
  """"lower" for the losses (nll, kl), "higher" for the scores (tf_em, f1, ...)."""
  return "lower" if metric in agg.LOWER_IS_BETTER else "higher"


def _finite_stat(stat: Mapping | None) -> bool:
  return bool(stat) and bool(stat["n"]) and all(math.isfinite(stat[k]) for k in ("mean", "lo", "hi"))


def by_method(records, *, boot: Mapping | None = None, group_by: Sequence[str] = ()) -> dict:
  """aggregate() rows keyed by (method, *group values), or by method alone without `group_by`."""
  rows = agg.aggregate(records, group_by=("method", *group_by), **(boot or {}))
  return {(r["method"], *(r[k] for k in group_by)) if group_by else r["method"]: r for r in rows}


# v1's rule, reported beside v2's.


def order(a: Mapping | None, b: Mapping | None) -> str:
  """How stat `a` sits against stat `b`: "lower" / "higher" when the CIs do not overlap, else "overlap"."""
  if not _finite_stat(a) or not _finite_stat(b):
    return MISSING
  if a["hi"] < b["lo"]:
    return "lower"
  if a["lo"] > b["hi"]:
    return "higher"
  return "overlap"


def ci_decision(found: str, better: str = "lower") -> str:
  """v1's H2 / H3 rule: non-overlapping CIs on the better side support, on the worse side refute."""
  return _decision(_as_better(found, better))


def _as_better(side: str, better: str) -> str:
  """"lower" / "higher" (either rule) as better / worse for a metric where `better` is the good side."""
  if side in ("lower", "higher"):
    return BETTER if side == better else WORSE
  return TIED if side in ("overlap", TIED) else MISSING


def _decision(found: str) -> str:
  """H2 / H3's mapping: better supports, worse refutes, tied is inconclusive."""
  return {BETTER: SUPPORTED, WORSE: NOT_SUPPORTED, TIED: INCONCLUSIVE}.get(found, NOT_MEASURED)


# v2's paired rule.


def _keep(r: agg.QuestionRecord, dataset: str, kind: str | None, facts: int | None,
          categories: Collection[str] | None) -> bool:
  """An answerable question of `dataset` that passes the filters (None: any)."""
  return (r.dataset == dataset and r.answerable and (kind is None or r.kind == kind)
          and (facts is None or r.facts == facts) and (categories is None or r.category in categories))


def paired_stat(a: Mapping[tuple, float], b: Mapping[tuple, float], *, n_resamples: int = 1000, seed: int = 0
                ) -> dict:
  """Mean of a[key] - b[key] over the keys (doc_id, question) both hold, with a 95% bootstrap CI that resamples
  documents (key[0]): the same questions on both sides, so it is tighter than comparing the two CIs."""
  both = sorted(set(a) & set(b))
  docs: dict = {}
  clusters = [docs.setdefault(key[0], len(docs)) for key in both]
  mean, lo, hi = agg.bootstrap_ci([a[k] - b[k] for k in both], cluster=clusters, n_resamples=n_resamples, seed=seed)
  return {"mean": mean, "lo": lo, "hi": hi, "n": len(both), "n_docs": len(docs)}


def _scores(records, method: str, metric: str, **where) -> dict[tuple, float]:
  return {(r.doc_id, r.qid): float(v) for r in records
          if r.method == method and _keep(r, **where) and (v := getattr(r, metric)) is not None}


def _where(dataset, kind, facts, categories) -> dict:
  return {"dataset": dataset, "kind": kind, "facts": facts,
          "categories": None if categories is None else frozenset(categories)}


def paired_difference(records, a: str, b: str, metric: str, *, kind: str | None = None, facts: int | None = None,
                      categories: Collection[str] | None = None, dataset: str = UNSEEN, n_resamples: int = 1000,
                      seed: int = 0) -> dict:
  """{"mean", "lo", "hi", "n", "n_docs"} of (a - b) on `metric` over the answerable questions of `dataset` both
  methods scored, optionally only one question kind, one facts size and some answer categories."""
  where = _where(dataset, kind, facts, categories)
  return paired_stat(_scores(records, a, metric, **where), _scores(records, b, metric, **where),
                     n_resamples=n_resamples, seed=seed)


def mean_stat(records, method: str, metric: str, *, kind: str | None = None, facts: int | None = None,
              categories: Collection[str] | None = None, dataset: str = UNSEEN, n_resamples: int = 1000,
              seed: int = 0) -> dict:
  """One method's mean of `metric` on the questions `paired_difference` filters alike, CI clustered by document."""
  scores = _scores(records, method, metric, **_where(dataset, kind, facts, categories))
  return paired_stat(scores, dict.fromkeys(scores, 0.0), n_resamples=n_resamples, seed=seed)


def paired_side(diff: Mapping | None) -> str:
  """The paired rule without a direction: "lower" / "higher" when the CI lies below / above 0, else "tied"."""
  if not _finite_stat(diff):
    return MISSING
  if diff["hi"] < 0:
    return "lower"
  if diff["lo"] > 0:
    return "higher"
  return TIED


def paired_order(diff: Mapping | None, better: str = "lower") -> str:
  """The paired rule for A - B where `better` ("lower" / "higher") is A's good side: "better", "worse", "tied",
  or "missing" where no question was scored by both."""
  if better not in ("lower", "higher"):
    raise ValueError(f"better must be 'lower' or 'higher', got {better!r}")
  return _as_better(paired_side(diff), better)


# H1: interference.


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


def flatter(slope_: float, baseline_slope: float, better: str = "lower") -> bool:
  """Degrades less: a smaller slope for a loss, a larger one for a score (strictly; equal is not flatter)."""
  return slope_ < baseline_slope if better == "lower" else slope_ > baseline_slope


def h1_decision(slope_: float, baseline_slope: float, orders: Sequence[str], *, better: str = "lower") -> str:
  """H1's rule: a flatter slope *and* better by the paired rule (`orders`: paired_order's) at every H1 size;
  not supported when the slope is not flatter; inconclusive otherwise."""
  if not (math.isfinite(slope_) and math.isfinite(baseline_slope)) or MISSING in orders:
    return NOT_MEASURED
  if not flatter(slope_, baseline_slope, better):
    return NOT_SUPPORTED
  return SUPPORTED if all(o == BETTER for o in orders) else INCONCLUSIVE


# H6: atoms against reading, at length.


def h6_decision(diffs: Sequence[Mapping | None], margin: float = H6_MARGIN) -> str:
  """H6's rule on doc2atom - in_context tf_em at each H6 size: not supported when a CI lies below 0;
  supported when every point is >= 0 and every CI's lower end above -margin; inconclusive otherwise."""
  if not diffs or not all(_finite_stat(d) for d in diffs):
    return NOT_MEASURED
  if any(d["hi"] < 0 for d in diffs):
    return NOT_SUPPORTED
  if all(d["mean"] >= 0 and d["lo"] > -margin for d in diffs):
    return SUPPORTED
  return INCONCLUSIVE


# H7: router precision@1.


def router_precision(records, *, method: str = "doc2atom", sizes: Sequence[int] = H7_SIZES, n_resamples: int = 1000,
                     seed: int = 0) -> dict[int, dict]:
  """Per facts size, on unseen single-fact questions: precision@1 (a hit: not abstained and the top atom is
  evidence) and recall@4, each with a CI clustered by document; questions without evidence labels (or without a
  routing) are left out and counted as "unscored". A size with no question is absent."""
  out = {}
  for size in sizes:
    mine = [r for r in _unseen(records) if r.method == method and r.kind == H7_KIND and r.facts == size]
    if not mine:
      continue
    labelled = [r for r in mine if r.routing(1)[0] is not None]
    docs: dict = {}
    clusters = [docs.setdefault(r.doc_id, len(docs)) for r in labelled]
    stat = lambda values: dict(zip(("mean", "lo", "hi"), agg.bootstrap_ci(
        values, cluster=clusters, n_resamples=n_resamples, seed=seed)), n=len(values))
    out[size] = {"precision@1": stat([r.routing(1)[0] for r in labelled]),
                 "recall@4": stat([r.routing(4)[1] for r in labelled]),
                 "questions": len(mine), "unscored": len(mine) - len(labelled), "documents": len(docs)}
  return out


def h7_decision(per_size: Mapping[int, Mapping], sizes: Sequence[int] = H7_SIZES, threshold: float = H7_THRESHOLD
                ) -> str:
  """Supported when precision@1's point estimate is >= threshold at every size; not measured when a size has no
  labelled question; not supported otherwise."""
  points = [((per_size.get(s) or {}).get("precision@1") or {}).get("mean") for s in sizes]
  if any(p is None or not math.isfinite(p) for p in points):
    return NOT_MEASURED
  return SUPPORTED if all(p >= threshold for p in points) else NOT_SUPPORTED


def _h7_gate(per_size: Mapping[int, Mapping], min_documents: int) -> list[str]:
  """Routing needs evidence labels and enough documents, not the NLL instrument."""
  out = []
  for size, row in per_size.items():
    if row["documents"] < min_documents:
      out.append(f"facts {size}: only {row['documents']} labelled document(s) (< {min_documents}): too few for a CI")
    if row["questions"] and (row["questions"] - row["unscored"]) / row["questions"] < H7_MIN_LABEL_COVERAGE:
      out.append(f"facts {size}: evidence labels on {row['questions'] - row['unscored']} of {row['questions']} "
                 f"single-fact questions (< {H7_MIN_LABEL_COVERAGE:.0%})")
  return out


_BANK_SKIP = frozenset({"settings", "seconds"})  # bank_scale.json's run settings, not metrics


def bank_rows(bank: Mapping | None) -> dict[str, dict[str, float]]:
  """bank_scale.json's numeric metrics per setting, read defensively (its schema is young): rows under "rows"
  (labelled by their "templates" and "setting"), and settings as nested dicts ("per_document", "bank",
  "shared_entity / bank"). A null metric (NaN when written) is kept as NaN; booleans and text are skipped."""
  out: dict[str, dict[str, float]] = {}
  if not isinstance(bank, Mapping):
    return out

  def numbers(d: Mapping) -> dict[str, float]:
    found = {str(k): (math.nan if v is None else float(v)) for k, v in d.items()
             if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))}
    return found if any(math.isfinite(v) for v in found.values()) else {}

  for i, row in enumerate(bank.get("rows") if isinstance(bank.get("rows"), list) else []):
    if isinstance(row, Mapping) and (found := numbers(row)):
      label = " / ".join(str(row[k]) for k in ("templates", "setting") if row.get(k) is not None) or f"row {i}"
      out[label] = found

  def walk(d: Mapping, prefix: str) -> None:
    for key, value in d.items():
      if isinstance(value, Mapping) and not (not prefix and key in _BANK_SKIP):
        label = f"{prefix} / {key}" if prefix else str(key)
        if found := numbers(value):
          out[label] = found
        walk(value, label)

  walk(bank, "")
  return out


def _bank_beside(bank: Mapping | None) -> dict[str, dict[str, float]]:
  """The routing numbers of each bank_scale setting, for H7's line."""
  return {label: {k: v for k, v in m.items() if "precision" in k or "recall" in k or "wrong_document" in k}
          for label, m in bank_rows(bank).items()
          if any("precision" in k or "recall" in k for k in m)}


# The held-out wording.


def _wording_key(r: agg.QuestionRecord) -> tuple[str, str]:
  """The same world's question in either wording: ids without the held-out templates' "-<templates>" suffix."""
  doc = r.doc_id
  for t in agg.TEMPLATES:
    if t != "seen" and doc.endswith(f"-{t}"):
      doc = doc[:-len(t) - 1]
  return doc, r.qid.rsplit("/", 1)[-1]


def wording_gap(records, method: str, metric: str, *, n_resamples: int = 1000, seed: int = 0) -> dict:
  """Paired held-out wording - training's wording on `metric`, over the answerable questions one method scored in
  both (HELD_OUT_WORDING vs UNSEEN on the same worlds), clustered by world."""
  side = lambda dataset: {_wording_key(r): float(v) for r in records if r.method == method and r.dataset == dataset
                          and r.answerable and (v := getattr(r, metric)) is not None}
  return paired_stat(side(HELD_OUT_WORDING), side(UNSEEN), n_resamples=n_resamples, seed=seed)


# The gate and the decisions.


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


def _label(metric: str) -> str:
  return "NLL" if metric == "nll" else metric


def decide(records, *, baselines: Sequence[str] = ("d2l", "d2l_256"), n_resamples: int = 1000, seed: int = 0,
           min_documents: int = 5, curves: Mapping[str, Mapping[str, dict]] | None = None,
           bank: Mapping | None = None) -> dict[str, dict]:
  """H1 (NLL and tf_em, per baseline), H2, H3a, H3b, H4, H5, H6 and H7, each {"claim", "decision", "numbers",
  "gate" (reasons the gate voids it; empty when it passes)}; a hypothesis whose methods were not evaluated is
  left out. `curves`: {metric: `interference`'s result} where already computed; `bank`: bank_scale.json's dict,
  whose routing numbers go beside H7's."""
  records = list(records)
  unseen = _unseen(records)
  boot = {"n_resamples": n_resamples, "seed": seed}
  gate = lambda *group_by, keep=None, on=records: instrument(on, group_by, min_documents=min_documents, keep=keep,
                                                             **boot)
  pooled = by_method(unseen, boot=boot)
  stat = lambda method, metric="nll", rows=pooled: (rows.get(method) or {}).get(metric)
  methods = {r.method for r in unseen}
  curves = dict(curves or {})
  for metric in METRICS:
    if metric not in curves:
      curves[metric] = interference(records, ["doc2atom", *baselines], metric=metric, **boot)
  out = {}

  for base in baselines:
    if base not in methods or "doc2atom" not in methods:
      continue
    for metric in METRICS:
      better = better_side(metric)
      mine, theirs = curves[metric].get("doc2atom", {}), curves[metric].get(base, {})
      at, v1 = {}, {}
      for f in H1_SIZES:
        diff = paired_difference(records, "doc2atom", base, metric, facts=f, **boot)
        a, b = (c.get("stats", {}).get(f) for c in (mine, theirs))
        at[f"at {f}"] = {"doc2atom": a, base: b, "paired difference": diff, "paired": paired_order(diff, better)}
        v1[f"at {f}"] = order(a, b)
      slopes = [c.get("slope", math.nan) for c in (mine, theirs)]
      v1["decision"] = h1_decision(*slopes, [_as_better(o, better) for o in v1.values()], better=better)
      out[f"H1 {_label(metric)} vs {base}"] = {
          "claim": f"doc2atom's {_label(metric)} degrades less than {base}'s from 4 to 64 facts per document "
                   f"(a {'smaller' if better == 'lower' else 'larger'} slope per doubling, and {better} by the "
                   f"paired rule at {' and '.join(map(str, H1_SIZES))} facts)",
          "metric": metric, "baseline": base,
          "decision": h1_decision(*slopes, [v["paired"] for v in at.values()], better=better),
          "numbers": {"slope": slopes[0], "slope_ci": mine.get("slope_ci", (math.nan, math.nan)),
                      f"{base} slope": slopes[1], f"{base} slope_ci": theirs.get("slope_ci", (math.nan, math.nan)),
                      "flatter": bool(all(map(math.isfinite, slopes)) and flatter(*slopes, better)), **at,
                      V1_RULE: v1},
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
    numbers = {}
    for metric in METRICS:
      diff = paired_difference(records, a, b, metric, kind=kind, **boot)
      found = order(stat(a, metric, rows), stat(b, metric, rows))
      numbers[metric] = {a: stat(a, metric, rows), b: stat(b, metric, rows), "paired difference": diff,
                         "paired": paired_order(diff, better_side(metric)),
                         V1_RULE: {"order": found, "decision": ci_decision(found, better_side(metric))}}
    out[name] = {"claim": claim, "pair": [a, b], "decision": _decision(numbers["nll"]["paired"]), "numbers": numbers,
                 "gate": gate("kind", keep=lambda r: r["kind"] == "two_hop") if kind else gate()}

  if "doc2atom" in methods:
    refusal, false_refusal = stat("doc2atom", "refusal"), stat("doc2atom", "false_refusal")
    measured = _finite_stat(refusal) and _finite_stat(false_refusal)
    met = lambda version: measured and (refusal["mean"] >= H4_THRESHOLDS[version][0]
                                        and false_refusal["mean"] <= H4_THRESHOLDS[version][1])
    out["H4"] = {"claim": "doc2atom refuses >= 90% of out-of-scope questions and <= 5% of answerable ones",
                 "decision": (SUPPORTED if met("v2") else NOT_SUPPORTED) if measured else NOT_MEASURED,
                 "numbers": {"refusal": refusal, "false_refusal": false_refusal,
                             "v1 thresholds (80% / 10%)": (SUPPORTED if met("v1") else NOT_SUPPORTED) if measured
                             else NOT_MEASURED},
                 "gate": gate()}

  if "doc2atom" in methods and "rag_atoms" in methods:
    numbers, said = {}, []
    for metric in METRICS:
      diff = paired_difference(records, "doc2atom", "rag_atoms", metric, **boot)
      found = paired_order(diff, better_side(metric))
      numbers[metric] = {"doc2atom": stat("doc2atom", metric), "rag_atoms": stat("rag_atoms", metric),
                         "paired difference": diff, "paired": found,
                         V1_RULE: order(stat("doc2atom", metric), stat("rag_atoms", metric))}
      said.append(f"{_label(metric)}: " + {BETTER: "doc2atom better", WORSE: "rag_atoms better"}.get(found, found))
    out["H5"] = {"claim": "compiling the routed atoms into weights (doc2atom) vs their text in the prompt "
                          "(rag_atoms); no direction predicted", "pair": ["doc2atom", "rag_atoms"],
                 "decision": "; ".join(said), "numbers": numbers, "gate": gate()}

  if "doc2atom" in methods and "in_context" in methods:
    numbers = {}
    for f in H6_SIZES:
      on = {"facts": f, "categories": H6_CATEGORIES, **boot}
      diff = paired_difference(records, "doc2atom", "in_context", "tf_em", **on)
      mine, theirs = mean_stat(records, "doc2atom", "tf_em", **on), mean_stat(records, "in_context", "tf_em", **on)
      numbers[f"at {f}"] = {"doc2atom": mine, "in_context": theirs, "paired difference": diff,
                            V1_RULE: order(mine, theirs)}
    numbers.update(margin=H6_MARGIN, categories=list(H6_CATEGORIES))
    in_categories = [r for r in records if r.category in H6_CATEGORIES]
    out["H6"] = {"claim": f"on closed-pool values and numbers doc2atom's tf_em >= in_context's at "
                          f"{' and '.join(map(str, H6_SIZES))} facts (non-inferiority margin {H6_MARGIN:.2f})",
                 "decision": h6_decision([numbers[f"at {f}"]["paired difference"] for f in H6_SIZES]),
                 "numbers": numbers,
                 "gate": gate("facts", on=in_categories, keep=lambda r: r["facts_mean"] in H6_SIZES)}

  if "doc2atom" in methods:
    per_size = router_precision(records, sizes=H7_SIZES, **boot)
    out["H7"] = {"claim": f"doc2atom's router precision@1 >= {H7_THRESHOLD:.2f} on unseen single-fact questions at "
                          f"every size of {', '.join(map(str, H7_SIZES))} facts",
                 "decision": h7_decision(per_size),
                 "numbers": {**{f"at {s}": row for s, row in per_size.items()},
                             "missing sizes": [s for s in H7_SIZES if s not in per_size], "threshold": H7_THRESHOLD,
                             "bank scale": _bank_beside(bank) if bank is not None else None},
                 "gate": _h7_gate(per_size, min_documents)}
  return out
