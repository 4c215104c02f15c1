"""Router and abstention numbers on validation worlds, with reference rows that need no training (DESIGN §2.4, §14).

Routing decides most of the method's quality, so it is measured on its own, on the real path: synthetic
validation worlds (`templates` seen and unseen, a few fact counts) are split by the system's own atomizer,
compiled with `AtomSystem.compile_document` into the bank they would load as (`quick.in_memory_bank`), and
every question is asked through `AtomSystem.select`. Evidence labels are the atoms whose character spans
overlap the question's evidence facts (`runner.evidence_atoms`). Per (templates, facts, method):
  * precision_at_1: single-fact questions whose top-1 routed atom holds the evidence;
  * recall_at_4: single-fact questions with an evidence atom among the top 4;
  * two_hop_both_at_4: two-hop questions with an atom of each evidence fact (bridge and answer) among the top 4;
  * bridge_missed / answer_missed: two-hop questions with no atom of the bridge fact / of the answer fact (the
    last) among the top 4, which tells a second hop's failures (`atoms.second_hop`) apart;
  * refusal / false_refusal: the share of out-of-scope / answerable questions the system abstains on;
  * counts: questions, single, two_hop, out_of_scope, unlabelled (answerable questions no atom overlaps).
The "system" row is what a user gets: the configured routing (`atoms.route_score`, `atoms.abstain`) and an
abstention counts as a miss in every answerable metric. Its top 4 is read from `AtomSystem.scores` in the
order `select` uses (`fusion.fused_order` with `atoms.second_hop` for fused routing, a stable argsort of the dense
scores otherwise),
so recall@4 and both@4 mean the same whatever `atoms.k` is (`select` returns only k atoms).

Reference rows, from the same documents and questions, ignore abstention and use no trained parameter except
"dense", so a reader sees what each ingredient gives and how far training has moved the router:
  * "bm25": BM25 alone over the bank's lexicon (atom texts, pronoun atoms resolved: `fusion.Lexicon`);
  * "bm25+type": BM25 with the atoms of `lexical.expected_type` ranked first;
  * "frozen own-token cosine (centred)": the frozen model's standardized key-layer states, RMS-normalized and
    mean-pooled over the question's own tokens and over each atom's span (the router's and the key's inputs),
    each centred by its mean over the document's questions / atoms, then cosine: what the router could read
    before any training;
  * "frozen template-pooled cosine": the same, pooled over the whole chat prompt and not centred, as the v1
    router read questions (§14: the template's 20-22 tokens drown the question's);
  * "dense": the system's router scores alone (a stable argsort of `AtomSystem.scores`, no fusion).

Run (the untrained system, or a trained one with --config.params=<export>):
  python -m doc2atom_jax.eval.routing --config=configs/quickstart.py [--config.params=runs/quickstart/export] \
      [--documents=20] [--sizes=8,16,64] [--workdir=DIR]
Settings come from the flags, then a `routing` section of the config (documents, sizes, templates, split, start,
seed) where it has one, then `DEFAULTS`. Prints the table; with --workdir also writes <workdir>/routing.json and
<workdir>/routing.md.
"""

import collections
import dataclasses
import json
import math
from collections.abc import Mapping, Sequence

import numpy as np
import tqdm
from absl import flags

from doc2atom_jax import cli, fileio
from doc2atom_jax import system as system_lib
from doc2atom_jax.atoms import compiler as compiler_lib
from doc2atom_jax.atoms import encode, fusion, lexical
from doc2atom_jax.data import synthetic
from doc2atom_jax.errors import UserError
from doc2atom_jax.eval import aggregate as agg
from doc2atom_jax.eval import quick, runner

SYSTEM = "system"
REFERENCES = ("bm25", "bm25+type", "frozen own-token cosine (centred)", "frozen template-pooled cosine", "dense")
METHODS = (SYSTEM, *REFERENCES)
TOP = 4  # recall and two-hop are read at this depth whatever atoms.k is
RATES = ("precision_at_1", "recall_at_4", "two_hop_both_at_4", "bridge_missed", "answer_missed")
QUESTIONS_PER_DOCUMENT = 8
DEFAULTS = {"documents": 20, "sizes": (8, 16, 64), "templates": ("seen", "unseen"), "split": "validation",
            "start": 20_000, "seed": 0}

_DOCUMENTS = flags.DEFINE_integer("documents", None, f"worlds per (templates, facts) (default {DEFAULTS['documents']})")
_SIZES = flags.DEFINE_list("sizes", None, "facts per world, comma-separated (default 8,16,64)")


# ---------------------------------------------------------------------------------------------------------
# One document: every method's atom order per question.
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Ranked:
  """One document's questions as the methods rank its atoms."""
  kinds: list[str]
  evidence: list[list[tuple[int, ...]] | None]  # per question, per evidence fact: its atoms (None: no label)
  orders: dict[str, list[np.ndarray]]  # method -> per question, every atom index, best first
  abstain: np.ndarray  # [B] the system's abstentions


def rank_document(system, doc: runner.EvalDocument) -> Ranked:
  """Compiles `doc`, asks its questions through `system.select`, and ranks its atoms by every method."""
  split = system.split(doc.text, doc.doc_id)
  bank = quick.in_memory_bank([system.compile_document(doc.text, doc.doc_id, split)],
                              shared_tail=system.cfg.copy_dim)
  questions = [q.question for q in doc.questions]
  _, _, abstain = system.select(bank, questions)
  states, own = system.question_states(questions)
  scores = np.asarray(system.scores(bank, questions, (states, own)))
  lexicon = system.lexicon(bank)
  n = len(split.atoms)
  dense_order = lambda s: _valid(np.argsort(-s[:-1], kind="stable"), n)
  bm25 = [lexicon.bm25.scores(q) for q in questions]
  own_cos, template_cos = _frozen_cosines(system, split, questions, states, own)
  orders = {
      SYSTEM: [system_order(system, s, q, lexicon) for s, q in zip(scores, questions)],
      "bm25": [np.argsort(-s, kind="stable") for s in bm25],
      "bm25+type": [_typed_order(s, q, lexicon.types) for s, q in zip(bm25, questions)],
      "frozen own-token cosine (centred)": [np.argsort(-c, kind="stable") for c in own_cos],
      "frozen template-pooled cosine": [np.argsort(-c, kind="stable") for c in template_cos],
      "dense": [dense_order(s) for s in scores],
  }
  labels = [evidence_labels(doc, q, split.atoms) for q in doc.questions]
  return Ranked([q.kind for q in doc.questions], labels, orders, np.asarray(abstain, bool))


def system_order(system, scores: np.ndarray, question: str, lexicon) -> np.ndarray:
  """Every atom of a bank, best first, in the order `AtomSystem.select` ranks them: fused (with the configured
  second hop) or the dense scores' stable argsort; `scores` ends with the null atom's, which is left out."""
  if system.method.route_score == "fused":
    return fusion.fused_order(scores[:-1], question, lexicon, system.method.second_hop)
  return _valid(np.argsort(-scores[:-1], kind="stable"), len(lexicon.texts))


def _valid(order: np.ndarray, n: int) -> np.ndarray:
  return order[order < n]


def _typed_order(bm25: np.ndarray, question: str, types: Sequence[str]) -> np.ndarray:
  """Atoms of the question's expected answer type first, each group by BM25 (stable: ties to the lower index)."""
  wanted = lexical.expected_type(question)
  typed = np.asarray([t == wanted for t in types]) if wanted is not None else np.zeros(len(types), bool)
  return np.lexsort((-bm25, ~typed))


def evidence_labels(doc: runner.EvalDocument, question: runner.EvalQuestion, atoms) -> list[tuple[int, ...]] | None:
  """Per evidence fact, the atoms its span overlaps (`runner.evidence_atoms` one fact at a time, so a two-hop
  question needs one atom of each fact); None for unanswerable or unlabelled questions."""
  if not question.answerable:
    return None
  per_fact = [runner.evidence_atoms(doc, dataclasses.replace(question, fact_evidence=(f,)), atoms)
              for f in question.fact_evidence]
  return per_fact if per_fact and all(per_fact) else None


def _frozen_cosines(system, split, questions, states, own) -> tuple[np.ndarray, np.ndarray]:
  """(own-token centred, template-pooled uncentred) cosines [B, N] between the frozen model's pooled key-layer
  states of the questions and of the document's atoms: no trained parameter enters."""
  layer = system.cfg.layer_for_keys
  doc_states = encode.document_states(system.model, split.token_ids, system.method.max_chunk_tokens or None)
  doc_states = system.compiler.standardize(doc_states[layer][None], (layer,))[0]  # [T, d]
  idx, mask = encode.span_indices(split.atoms)
  atoms = np.asarray(compiler_lib.pooled(doc_states[idx], mask))  # what the keys and the router read
  seqs, _ = encode.question_ids(system.model, questions)
  prompt = np.arange(states.shape[1])[None] < np.asarray([len(s) for s in seqs])[:, None]
  own_pooled = np.asarray(compiler_lib.pooled(states, own))
  prompt_pooled = np.asarray(compiler_lib.pooled(states, prompt))
  centred = _cosine(own_pooled - own_pooled.mean(0), atoms - atoms.mean(0))
  return centred, _cosine(prompt_pooled, atoms)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-9)
  return unit(a.astype(np.float64)) @ unit(b.astype(np.float64)).T


# ---------------------------------------------------------------------------------------------------------
# Tallies.
# ---------------------------------------------------------------------------------------------------------
def tally(ranked: Sequence[Ranked], method: str) -> dict:
  """The row of one method over documents: rates (NaN where no question of the kind) and counts."""
  t = collections.defaultdict(list)
  counts = collections.Counter()
  for r in ranked:
    for b, (kind, evidence) in enumerate(zip(r.kinds, r.evidence)):
      counts["questions"] += 1
      counts[kind] += 1
      abstained = method == SYSTEM and bool(r.abstain[b])
      if kind in agg.UNANSWERABLE_KINDS:
        t["refusal"].append(abstained)
        continue
      t["false_refusal"].append(abstained)
      if evidence is None:
        counts["unlabelled"] += 1
        continue
      top = [] if abstained else r.orders[method][b][:TOP].tolist()
      if kind == "two_hop":
        found = [bool(set(atoms) & set(top)) for atoms in evidence]
        t["two_hop_both_at_4"].append(all(found))
        t["bridge_missed"].append(not found[0])
        t["answer_missed"].append(not found[-1])
      else:
        wanted = {a for atoms in evidence for a in atoms}
        t["precision_at_1"].append(bool(top) and top[0] in wanted)
        t["recall_at_4"].append(bool(wanted & set(top)))
  row = {name: _mean(t[name]) for name in RATES}
  for name in ("refusal", "false_refusal"):
    row[name] = _mean(t[name]) if method == SYSTEM else float("nan")
  row.update({name: counts[name] for name in ("questions", "single", "two_hop", "out_of_scope", "unlabelled")})
  return row


def _mean(values) -> float:
  return float(np.mean(values)) if values else float("nan")


def check(documents, sizes, templates) -> None:
  """`measure`'s arguments, checked before anything slow: a UserError naming the bad one."""
  if isinstance(documents, bool) or not isinstance(documents, (int, np.integer)) or not 1 <= documents <= 1000:
    raise UserError(f"documents must be an integer in [1, 1000] (world indices step by 1000 a size; got {documents!r})")
  if not sizes or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 2 for s in sizes):
    raise UserError(f"sizes must be whole numbers of facts, each at least 2, e.g. 8,16,64 (got {sizes!r})")
  if not templates or any(t not in synthetic.TEMPLATES for t in templates):
    raise UserError(f"templates must be some of {', '.join(synthetic.TEMPLATES)} (got {templates!r})")


def measure(system, *, documents: int, sizes: Sequence[int] = (8, 16, 64),
            templates: Sequence[str] = ("seen", "unseen"), split: str = "validation", start: int = 20_000,
            seed: int = 0, progress: str | None = None) -> list[dict]:
  """One row per (templates, facts, method) over `documents` synthetic worlds each: world i of size s is
  `synthetic.document(split, start + 1000 * s + i, ...)`, so sizes never share a world index. `progress`: a
  progress bar's label (None: no bar)."""
  if system.method.method != "doc2atom":
    raise UserError(f"routing is measured for method doc2atom (this system is {system.method.method}: no router)")
  check(documents, sizes, templates)
  worlds = [(t, int(s), i) for t in templates for s in sizes for i in range(documents)]
  docs = [synthetic.document(split, start + 1000 * s + i, seed=seed, facts_per_document=s,
                             questions_per_document=QUESTIONS_PER_DOCUMENT, templates=t) for t, s, i in worlds]
  ranked = collections.defaultdict(list)
  for (t, s, _), doc in zip(worlds, tqdm.tqdm(docs, desc=progress, unit="doc", dynamic_ncols=True,
                                              disable=progress is None)):
    ranked[t, s].append(rank_document(system, runner.from_synthetic(doc, f"synthetic_{t}", t)))
  m = system.method
  hop = f", second hop {m.second_hop}" if m.route_score == "fused" else ""
  routing = f"{m.route_score}{hop}, abstain={m.abstain}" + ("" if math.isinf(m.abstain_margin) else
                                                       f" (margin {m.abstain_margin:.3g})")
  return [{"templates": t, "facts": s, "method": method, "documents": len(group),
           **({"routing": routing} if method == SYSTEM else {}), **tally(group, method)}
          for (t, s), group in ranked.items() for method in METHODS]


def format_table(rows: Sequence[dict]) -> str:
  """A markdown table of `measure`'s rows; "—" where a rate has no question (or does not apply)."""
  cell = lambda x: "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"
  lines = ["| templates | facts | method | p@1 | r@4 | two-hop both@4 | bridge / answer missed | refusal | "
           "false refusal | questions |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    method = f"{r['method']} ({r['routing']})" if r.get("routing") else r["method"]
    lines.append(f"| {r['templates']} | {r['facts']} | {method} | {cell(r['precision_at_1'])} | "
                 f"{cell(r['recall_at_4'])} | {cell(r['two_hop_both_at_4'])} | "
                 f"{cell(r['bridge_missed'])} / {cell(r['answer_missed'])} | {cell(r['refusal'])} | "
                 f"{cell(r['false_refusal'])} | {r['questions']} ({r['single']}/{r['two_hop']}/{r['out_of_scope']}) |")
  lines.append("\nquestions: all (single / two-hop / out-of-scope). Reference rows ignore abstention; the system "
               "row counts an abstention as a miss.")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------------------
def settings(config, section: str = "routing", defaults: Mapping | None = None, extra: Mapping | None = None) -> dict:
  """`defaults` (DEFAULTS), then the config's `section` where it has one, then --documents / --sizes and the
  `extra` flag values that are set (name -> value or None); sizes parsed, templates a tuple, all checked."""
  out = dict(DEFAULTS if defaults is None else defaults)
  found = config.get(section) if hasattr(config, "get") else None
  if found is not None:
    out.update({k: v for k, v in found.items() if k in out})
  given = {"documents": _DOCUMENTS.value, "sizes": _SIZES.value, **(extra or {})}
  out.update({k: v for k, v in given.items() if v is not None})
  try:
    out["sizes"] = tuple(int(s) for s in out["sizes"])
  except (TypeError, ValueError):
    raise UserError(f"sizes must be whole numbers of facts, e.g. --sizes=8,16,64 (got {out['sizes']!r})") from None
  out["templates"] = (out["templates"],) if isinstance(out["templates"], str) else tuple(out["templates"])
  check(out["documents"], out["sizes"], out["templates"])
  return out


def start(settings_of=settings):
  """A measuring command's start: (config, its settings, the checked --workdir or None, the built system)."""
  config = cli.config()
  options = settings_of(config)
  workdir = cli.workdir()
  if workdir is not None:
    workdir = fileio.writable_dir(workdir, "--workdir")
  cli.prepare(config)
  return config, options, workdir, system_lib.build_system(config)


def write_outputs(workdir, stem: str, title: str, table: str, report: dict) -> None:
  """<workdir>/<stem>.json (`report`, its rows' NaNs as null) and <stem>.md (`title` over `table`), atomically."""
  rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in report["rows"]]
  fileio.atomic_write_text(workdir / f"{stem}.json", json.dumps({**report, "rows": rows}, indent=1) + "\n")
  fileio.atomic_write_text(workdir / f"{stem}.md", f"# {title}\n\n{table}\n")
  print(f"wrote {workdir / f'{stem}.json'} and {workdir / f'{stem}.md'}")


def main(args=()) -> None:
  """`python -m doc2atom_jax.eval.routing --config=<file>.py [--documents=N] [--sizes=a,b] [--workdir=DIR]`."""
  del args
  config, options, workdir, system = start()
  rows = measure(system, progress="routing", **options)
  table = format_table(rows)
  print(table)
  if workdir is not None:
    write_outputs(workdir, "routing", "Routing on validation worlds", table,
                  {"model": config.model.name, "params": config.params or None, "settings": options, "rows": rows})


if __name__ == "__main__":
  cli.run(main)
