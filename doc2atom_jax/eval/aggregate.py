"""From per-question records to aggregate rows with bootstrap confidence intervals, and the instrument gates.

The evaluator writes one `QuestionRecord` per (method, question); everything here is plain numpy on those
records, so aggregation can be re-run on a saved `results.json` without a model (DESIGN §8).

- Answer metrics (nll, kl, f1, em, rouge_l) are means over *answerable* questions: on unanswerable ones the
  right behaviour is to decline, which `refusal` measures; `false_refusal` is the same test on answerable
  ones, so a method that always declines shows 1.0 in both.
- Confidence intervals are percentile bootstraps that resample *documents* by default: the questions of one
  document share its text and its compiled atoms, so resampling questions would understate the spread.
- Group keys include the answer category (closed-pool value, number, quantity, generated name, other) and the
  question kind: a mean over all answers hides that names never seen in training dominate unseen worlds (§14).
- Routing precision/recall@k are over answerable questions with evidence labels; a row reports the share of
  answerable questions that have labels (`label_coverage`) so a thinly labelled dataset is visible.
- `gates` says where no claim may be made: where the in-context teacher is not clearly better than the
  model without the document (the measurement cannot see the document there), and where too few questions
  carry evidence labels for routing numbers to mean anything. "Clearly better" is one rule (`rule_text`):
  in_context's mean beats no_context's by `min_gap` and its CI's near bound lies beyond no_context's mean
  (for nll: upper bound below it), over at least `min_documents` documents.
"""

import dataclasses
import functools
import json
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from doc2atom_jax.data import answers as answers_lib
from doc2atom_jax.errors import UserError
from doc2atom_jax.eval import metrics as metrics_lib
from doc2atom_jax.eval.metrics import precision_at_k, recall_at_k  # noqa: F401  (re-exported)

KINDS = ("single", "two_hop", "out_of_scope", "answerable", "unanswerable")
UNANSWERABLE_KINDS = frozenset({"out_of_scope", "unanswerable"})
WORLDS = ("seen", "unseen")
TEMPLATES = ("seen", "unseen")  # synthetic.TEMPLATES: training's statement/question wording, or held-out wording
CATEGORIES = answers_lib.CATEGORIES  # answer categories of answerable questions
METRICS = ("nll", "kl", "tf_em", "f1", "em", "rouge_l")  # over answerable questions
LOWER_IS_BETTER = frozenset({"nll", "kl"})
RATES = ("refusal", "false_refusal")  # over unanswerable / answerable questions
GROUP_KEYS = ("method", "dataset", "kind", "category", "world", "templates", "length", "facts")
BINNED_KEYS = ("length", "facts")  # binned by edges: length on `doc_tokens`, facts on `facts`
DEFAULT_BINS = {
    "length": (0, 256, 512, 1024, 2048, 4096, math.inf),
    "facts": (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, math.inf),
}
DEFAULT_ROUTING_K = (1, 4)
REFERENCE, BASELINE = "in_context", "no_context"  # the instrument gate: the teacher must beat no document


# Records.


def _int_tuple(value, name: str) -> tuple[int, ...] | None:
  if value is None:
    return None
  if isinstance(value, (str, bytes)) or not all(isinstance(v, (int, np.integer)) for v in value):
    raise UserError(f"{name} must be a list of atom indices or null (got {value!r})")
  return tuple(int(v) for v in value)


@dataclasses.dataclass(frozen=True)
class QuestionRecord:
  """One method's result on one question: what it said, the continuous scores, and the routing.

  `nll`: teacher-forced gold-answer NLL per token; `kl`: top-K KL to the in-context teacher per token; `tf_em`:
  1.0 when every gold token is the model's argmax after the answer prefix (None where not measured). `routed`:
  atom indices the router chose, in rank order (None: no router). `evidence`: gold evidence atom indices (None:
  unlabelled). `abstained`: the method declined by itself (e.g. the router's null atom won), which counts as a
  refusal whatever `prediction` says. `category`: the answer category (CATEGORIES) of an answerable question
  (None: unanswerable, or a record written before categories). `templates`: a synthetic document's wording.
  """
  method: str
  dataset: str
  doc_id: str
  qid: str
  kind: str
  answerable: bool
  prediction: str
  references: tuple[str, ...]
  nll: float | None = None
  kl: float | None = None
  tf_em: float | None = None  # teacher-forced exact match: 1.0 when greedy decoding after the prefix says the gold
  doc_tokens: int = 0
  facts: int | None = None
  world: str | None = None
  routed: tuple[int, ...] | None = None
  evidence: tuple[int, ...] | None = None
  abstained: bool = False
  category: str | None = None
  templates: str | None = None

  def __post_init__(self):
    where = f"record {self.method}/{self.dataset}/{self.qid}"
    object.__setattr__(self, "answerable", bool(self.answerable))
    object.__setattr__(self, "abstained", bool(self.abstained))
    object.__setattr__(self, "category", self.category or None)
    if self.kind not in KINDS:
      raise UserError(f"{where}: kind {self.kind!r} is not one of {KINDS}")
    if self.world not in (None, *WORLDS):
      raise UserError(f"{where}: world {self.world!r} is not one of {WORLDS} or null")
    if self.templates not in (None, *TEMPLATES):
      raise UserError(f"{where}: templates {self.templates!r} is not one of {TEMPLATES} or null")
    if self.category not in (None, *CATEGORIES):
      raise UserError(f"{where}: category {self.category!r} is not one of {CATEGORIES} or null")
    if self.category and not self.answerable:
      raise UserError(f"{where}: an unanswerable question has no answer category (got {self.category!r})")
    if self.answerable == (self.kind in UNANSWERABLE_KINDS):
      raise UserError(f"{where}: answerable={self.answerable} contradicts kind {self.kind!r}")
    if isinstance(self.references, str):
      raise UserError(f"{where}: references must be a list of strings, not one string")
    object.__setattr__(self, "references", tuple(self.references))
    if self.answerable and not self.references:
      raise UserError(f"{where}: an answerable question needs at least one reference")
    object.__setattr__(self, "routed", _int_tuple(self.routed, f"{where}: routed"))
    object.__setattr__(self, "evidence", _int_tuple(self.evidence, f"{where}: evidence"))
    for name in ("nll", "kl", "tf_em"):
      if getattr(self, name) is not None:
        object.__setattr__(self, name, float(getattr(self, name)))

  # Derived scores. An abstention answers nothing: it scores as the empty prediction (a refusal). On an
  # unanswerable question every answer metric is 1 exactly when the method declined.

  @property
  def _scored(self) -> tuple[str, tuple[str, ...]]:
    return ("" if self.abstained else self.prediction), (self.references if self.answerable else ())

  @functools.cached_property
  def f1(self) -> float:
    return metrics_lib.f1_score(*self._scored)

  @functools.cached_property
  def em(self) -> float:
    return metrics_lib.exact_match(*self._scored)

  @functools.cached_property
  def rouge_l(self) -> float:
    return metrics_lib.rouge_l(*self._scored)

  @property
  def refusal(self) -> bool:
    return self.abstained or metrics_lib.is_refusal(self.prediction)

  @property
  def labelled(self) -> bool:
    return bool(self.evidence)

  def routing(self, k: int) -> tuple[float | None, float | None]:
    """(precision@k, recall@k); an abstention routes to no atom. None where unlabelled or unrouted."""
    routed = () if self.abstained and self.routed is not None else self.routed
    return precision_at_k(routed, self.evidence, k), recall_at_k(routed, self.evidence, k)

  def to_json(self) -> dict:
    """A JSON-ready dict of the fields, plus the derived scores under "scores" (ignored by from_json)."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # asdict's deep copy is slow
    for name in ("references", "routed", "evidence"):
      out[name] = None if out[name] is None else list(out[name])
    out["scores"] = {"f1": self.f1, "em": self.em, "rouge_l": self.rouge_l, "refusal": self.refusal}
    return out

  @classmethod
  def from_json(cls, obj: Mapping | str) -> "QuestionRecord":
    """The record from `to_json`'s dict (or its JSON text); unknown or missing fields are a UserError."""
    if isinstance(obj, str):
      obj = json.loads(obj)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(obj) - names - {"scores"}
    if unknown:
      raise UserError(f"record {obj.get('qid')!r}: unknown fields {sorted(unknown)}")
    try:
      return cls(**{k: v for k, v in obj.items() if k in names})
    except TypeError as e:
      raise UserError(f"record {obj.get('qid')!r}: {e}") from None


# Bootstrap.

_GATHER_BUDGET = 4_000_000  # elements per vectorized resampling chunk (bounds memory at ~32 MB of float64)


def bootstrap_ci(values, *, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0,
                 cluster=None) -> tuple[float, float, float]:
  """(mean, lo, hi): the mean and its percentile-bootstrap interval; (nan, nan, nan) for no values.

  With `cluster` (one id per value), whole clusters are resampled and the statistic is the pooled mean of
  the values drawn, so correlation within a cluster (the questions of one document) widens the interval as
  it should. Deterministic for a seed.
  """
  values = np.asarray(values, np.float64).ravel()
  if not 0 < confidence < 1:
    raise UserError(f"confidence must be in (0, 1), got {confidence}")
  if n_resamples < 1:
    raise UserError(f"n_resamples must be >= 1, got {n_resamples}")
  if values.size == 0:
    return math.nan, math.nan, math.nan
  mean = float(values.mean())
  if cluster is None:
    sums, counts = values, np.ones_like(values)
  else:
    cluster = np.asarray(cluster).ravel()
    if cluster.shape != values.shape:
      raise UserError(f"cluster has {cluster.size} ids for {values.size} values")
    _, inverse = np.unique(cluster, return_inverse=True)
    sums, counts = np.bincount(inverse, weights=values), np.bincount(inverse).astype(np.float64)
  means = resampled_means(sums, counts, n_resamples, np.random.default_rng(seed))
  alpha = (1 - confidence) / 2
  lo, hi = np.quantile(means, [alpha, 1 - alpha])
  return mean, float(lo), float(hi)


def resampled_means(sums, counts, n_resamples: int, rng) -> np.ndarray:
  """Pooled means of `n_resamples` draws of len(sums) units with replacement, in memory-bounded chunks."""
  n = sums.size
  chunk = max(1, _GATHER_BUDGET // n)
  out = []
  for start in range(0, n_resamples, chunk):
    idx = rng.integers(0, n, size=(min(chunk, n_resamples - start), n))
    out.append(sums[idx].sum(1) / counts[idx].sum(1))
  return np.concatenate(out)


# Grouping and binning.


def _check_edges(key: str, edges) -> tuple[float, ...]:
  edges = tuple(float(e) for e in edges)
  if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
    raise UserError(f"bins[{key!r}] must be at least two strictly increasing edges (got {edges})")
  return edges


def _edge_text(e: float) -> str:
  return "inf" if math.isinf(e) else f"{e:g}"


def _bin_of(key: str, value, edges) -> tuple[int, str] | None:
  """(bin index, "[lo, hi)") of `value`; None for a missing value (e.g. facts outside the synthetic data)."""
  if value is None:
    return None
  i = int(np.searchsorted(edges, value, side="right")) - 1
  if not 0 <= i < len(edges) - 1:
    raise UserError(f"{key} value {value} lies outside the bins {edges}; widen them (e.g. end with inf)")
  return i, f"[{_edge_text(edges[i])}, {_edge_text(edges[i + 1])})"


def _check_group_by(group_by) -> tuple[str, ...]:
  if isinstance(group_by, str):
    group_by = (group_by,)
  bad = [k for k in group_by if k not in GROUP_KEYS]
  if bad:
    raise UserError(f"unknown group-by key(s) {bad}; choose from {GROUP_KEYS}")
  return tuple(group_by)


def check_metric(name: str, allowed: Sequence[str] = METRICS) -> str:
  if name not in allowed:
    raise UserError(f"unknown metric {name!r}; choose from {tuple(allowed)}")
  return name


def _group_value(record: QuestionRecord, key: str, bins: Mapping) -> tuple[object, object] | None:
  """(sort key, shown value) of the record for one group-by key; None drops the record from the table."""
  if key in BINNED_KEYS:
    return _bin_of(key, record.doc_tokens if key == "length" else record.facts, bins[key])
  value = getattr(record, key)
  if value is None:
    return None
  if key == "kind":
    return KINDS.index(value), value
  if key == "world":
    return WORLDS.index(value), value
  if key == "templates":
    return TEMPLATES.index(value), value
  if key == "category":
    return CATEGORIES.index(value), value
  return None, value  # method, dataset: sorted by first appearance, filled in by the caller


def _groups(records, group_by, bins) -> list[tuple[dict, list[QuestionRecord]]]:
  first_seen = {key: {} for key in group_by}
  groups: dict[tuple, list] = {}
  order: dict[tuple, tuple] = {}
  for r in records:
    found = [_group_value(r, key, bins) for key in group_by]
    if any(f is None for f in found):
      continue
    values = tuple(shown for _, shown in found)
    sort = tuple(rank if rank is not None else first_seen[key].setdefault(shown, len(first_seen[key]))
                 for key, (rank, shown) in zip(group_by, found))
    groups.setdefault(values, []).append(r)
    order.setdefault(values, sort)
  return [(dict(zip(group_by, values)), groups[values]) for values in sorted(groups, key=order.__getitem__)]


# Aggregation.


def _stat(values, clusters, boot: Mapping) -> dict:
  mean, lo, hi = bootstrap_ci(values, cluster=clusters if boot["cluster"] else None, **boot["ci"])
  return {"mean": mean, "lo": lo, "hi": hi, "n": len(values)}


def _stat_of(records, score, boot) -> dict:
  """Bootstrap stat of `score(record)` over the records where it is not None."""
  pairs = [(s, (r.dataset, r.doc_id)) for r in records if (s := score(r)) is not None]
  ids: dict[tuple, int] = {}  # deterministic ids (str hashes vary between processes)
  clusters = [ids.setdefault(c, len(ids)) for _, c in pairs]
  return _stat([float(s) for s, _ in pairs], clusters, boot)


def _mean_or_none(values) -> float | None:
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None


def _row(group: dict, records: list[QuestionRecord], metrics, routing_k, boot) -> dict:
  answerable = [r for r in records if r.answerable]
  unanswerable = [r for r in records if not r.answerable]
  row = {**group, "n": len(records), "n_answerable": len(answerable), "n_unanswerable": len(unanswerable),
         "n_docs": len({(r.dataset, r.doc_id) for r in records}),
         "doc_tokens_mean": _mean_or_none(r.doc_tokens for r in records),
         "facts_mean": _mean_or_none(r.facts for r in records)}
  for name in metrics:
    row[name] = _stat_of(answerable, lambda r, name=name: getattr(r, name), boot)
  row["refusal"] = _stat_of(unanswerable, lambda r: float(r.refusal), boot)
  row["false_refusal"] = _stat_of(answerable, lambda r: float(r.refusal), boot)
  labelled = sum(r.labelled for r in answerable)
  routing = {"k": list(routing_k), "n_labelled": labelled,
             "label_coverage": labelled / len(answerable) if answerable else math.nan}
  for k in routing_k:
    routing[f"precision@{k}"] = _stat_of(answerable, lambda r, k=k: r.routing(k)[0], boot)
    routing[f"recall@{k}"] = _stat_of(answerable, lambda r, k=k: r.routing(k)[1], boot)
  row["routing"] = routing
  return row


def aggregate(records: Iterable[QuestionRecord], *, group_by: Sequence[str] = ("method", "dataset"),
              bins: Mapping[str, Sequence[float]] | None = None, metrics: Sequence[str] = METRICS,
              routing_k: Sequence[int] = DEFAULT_ROUTING_K, n_resamples: int = 1000, confidence: float = 0.95,
              seed: int = 0, cluster_by_document: bool = True) -> list[dict]:
  """One row per group of `group_by` keys (from GROUP_KEYS), in first-seen / natural bin order.

  A row holds the group values; n, n_answerable, n_unanswerable, n_docs; doc_tokens_mean, facts_mean; for each
  metric {"mean", "lo", "hi", "n"} over answerable questions; "refusal" (over unanswerables) and
  "false_refusal" (over answerables) alike; and "routing": {"k", "n_labelled", "label_coverage",
  "precision@k", "recall@k" for each k}. `bins` overrides DEFAULT_BINS edges ("length" bins doc_tokens,
  "facts" bins facts per document; bins are [lo, hi)). Records without a value for a group key (facts, world
  or templates outside the synthetic data, category of an unanswerable question) are left out of that table.
  """
  group_by = _check_group_by(group_by)
  metrics = tuple(check_metric(m) for m in metrics)
  routing_k = tuple(int(k) for k in routing_k)
  if any(k < 1 for k in routing_k):
    raise UserError(f"routing_k must be positive (got {routing_k})")
  bins = {**DEFAULT_BINS, **(bins or {})}
  unknown = set(bins) - set(BINNED_KEYS)
  if unknown:
    raise UserError(f"unknown bin key(s) {sorted(unknown)}; choose from {BINNED_KEYS}")
  bins = {key: _check_edges(key, edges) for key, edges in bins.items()}
  boot = {"cluster": cluster_by_document, "ci": {"n_resamples": n_resamples, "confidence": confidence, "seed": seed}}
  return [_row(group, rs, metrics, routing_k, boot) for group, rs in _groups(list(records), group_by, bins)]


def group_keys(row: Mapping) -> tuple[str, ...]:
  """The group-by keys a row was made with, in GROUP_KEYS order."""
  return tuple(k for k in GROUP_KEYS if k in row)


# Gates.


def _cell(row: Mapping) -> dict:
  return {k: row[k] for k in group_keys(row) if k != "method"}


def _clearly_better(ref: Mapping, base: Mapping, metric: str, min_gap: float) -> bool:
  """The one rule: ref's mean beats base's by min_gap *and* ref's whole CI lies on the better side of base's
  mean, i.e. base's point estimate is implausible for ref (not the stricter non-overlap of two CIs)."""
  if metric in LOWER_IS_BETTER:
    return base["mean"] - ref["mean"] >= min_gap and ref["hi"] < base["mean"]
  return ref["mean"] - base["mean"] >= min_gap and ref["lo"] > base["mean"]


def rule_text(primary: str, min_gap: float, reference: str = REFERENCE, baseline: str = BASELINE) -> str:
  """The instrument rule in words, for flags and the report."""
  side, bound = ("below", "upper") if primary in LOWER_IS_BETTER else ("above", "lower")
  return (f"it needs a mean {primary} at least {min_gap:g} {side} {baseline}'s and its 95% CI's {bound} bound "
          f"{side} {baseline}'s mean")


def instrument_flags(rows: Sequence[Mapping], *, primary: str = "nll", min_gap: float = 0.05,
                     min_documents: int = 5, reference: str = REFERENCE, baseline: str = BASELINE) -> list[dict]:
  """Cells (dataset and bin) where `reference` is not clearly better than `baseline` on `primary`.

  Where the model reading the document does not beat the model without it, the measurement cannot see the
  document, so no method's number there supports a claim. A cell with fewer than `min_documents` documents
  flags too: a bootstrap over one or two documents has a width of about zero and would pass any rule. Cells
  where neither has a value (e.g. nll over out-of-scope questions) are skipped; one flag says so when no
  cell could be checked at all. `min_gap` is in the metric's units (nats per token for nll, F1 / 100 for f1).
  """
  check_metric(primary)
  cells: dict[str, dict] = {}
  for row in rows:
    key = json.dumps(_cell(row), sort_keys=True, default=str)
    cells.setdefault(key, {"cell": _cell(row)})[row.get("method")] = row
  flags, checked = [], 0
  for found in cells.values():
    ref, base = (found.get(m, {}).get(primary) for m in (reference, baseline))
    have = [s is not None and s["n"] > 0 for s in (ref, base)]
    if not any(have):
      continue
    checked += 1
    flag = {"gate": "instrument", "cell": found["cell"], "metric": primary, reference: ref, baseline: base}
    if not all(have):
      missing = reference if not have[0] else baseline
      flags.append({**flag, "reason": f"no {primary} for {missing}: the instrument cannot be checked here"})
    elif (docs := min(found[m]["n_docs"] for m in (reference, baseline))) < min_documents:
      flags.append({**flag, "reason": f"only {docs} document(s) (< {min_documents}): too few for a CI, no claim here"})
    elif not _clearly_better(ref, base, primary, min_gap):
      flags.append({**flag, "reason": f"{reference} is not clearly better than {baseline} on {primary}: "
                                      f"{rule_text(primary, min_gap, reference, baseline)}; no claim here"})
  if not checked:
    flags.append({"gate": "instrument", "cell": {}, "metric": primary,
                  "reason": f"{reference} and {baseline} have no {primary} values: the instrument is unchecked"})
  return flags


def label_flags(rows: Sequence[Mapping], *, min_label_coverage: float = 0.5) -> list[dict]:
  """Datasets where fewer than `min_label_coverage` of answerable questions carry evidence labels.

  Coverage is pooled over a dataset's rows (all methods, all bins), so any table of rows gives the same
  answer. Routing metrics for a flagged dataset are not reported.
  """
  pooled: dict[object, list[int]] = {}
  for row in rows:
    totals = pooled.setdefault(row.get("dataset", "all"), [0, 0])
    totals[0] += row["routing"]["n_labelled"]
    totals[1] += row["n_answerable"]
  flags = []
  for dataset, (labelled, answerable) in pooled.items():
    coverage = labelled / answerable if answerable else math.nan
    if not coverage >= min_label_coverage:  # nan (no answerable questions) flags too
      flags.append({"gate": "label_coverage", "dataset": dataset, "label_coverage": coverage,
                    "min_label_coverage": min_label_coverage,
                    "reason": f"evidence labels cover {coverage:.0%} of answerable questions (< "
                              f"{min_label_coverage:.0%}): routing metrics not reported"})
  return flags


def gates(rows: Sequence[Mapping], *, primary: str = "nll", min_gap: float = 0.05, min_documents: int = 5,
          min_label_coverage: float = 0.5) -> list[dict]:
  """Both gates on one table of rows: instrument flags per (dataset, bin) cell, label-coverage per dataset."""
  return (instrument_flags(rows, primary=primary, min_gap=min_gap, min_documents=min_documents)
          + label_flags(rows, min_label_coverage=min_label_coverage))
