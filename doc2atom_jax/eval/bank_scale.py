"""Routing and answers over one bank of many documents, against each document's own bank (DESIGN §2.4, §8).

A user with a corpus compiles every document into ONE atom bank and asks without saying which document a question
is about. Every other evaluation routes over the question's own document, which hides the errors that only a
shared bank makes: an atom of another document ranked first, names that several documents share, abstention that
reads the whole corpus (a name "absent from the document" is now absent from every document). Here the same
questions are asked twice, through `AtomSystem.select` as a user asks them:
  * "per_document": over their own document's bank (what routing.py and the evaluator measure);
  * "bank": over one bank of all the documents (`quick.in_memory_bank`, in order), the router not told which.
Per setting (routing.tally's definitions, indices in the bank's global rows, evidence of the question's own
document only):
  * precision_at_1, recall_at_4, two_hop_both_at_4 (bridge_missed / answer_missed): read from the system's top 4 in
    the order `select` uses (as routing.py reads it), so they do not depend on `atoms.k`;
  * wrong_document_at_1: answerable questions whose top-1 atom belongs to another document (0 per document);
  * refusal / false_refusal: out-of-scope / answerable questions the system abstains on;
  * tf_em_doc2atom: teacher-forced exact match of the gold answer with the routed atoms composed
    (`AtomSystem.adapter`), and tf_em_rag_atoms: with the same atoms' text in the prompt and the base model
    (the evaluator's `rag_atoms` builder); over answerable questions, an abstention counted as a miss;
  * counts: questions, single, two_hop, out_of_scope, unlabelled, answerable.
"shared_entity": the answerable questions whose names (`lexical.names`, numbers aside) all occur in another
document of the bank too (`lexical.absent_names` finds none missing there): the lexical signals cannot tell that
document from the question's own, the hard case. Both settings are reported on that subset.

Run (the untrained system, or a trained one with --config.params=<export>):
  python -m doc2atom_jax.eval.bank_scale --config=configs/quickstart.py [--config.params=runs/quickstart/export] \
      [--documents=20] [--sizes=8,16,64] [--templates=seen,unseen] [--workdir=DIR]
--documents worlds per facts size (the validation worlds routing.py uses); one bank per templates holds every
size's worlds. Settings come from the flags, then a `bank_scale` section of the config where it has one, then
`DEFAULTS`. Prints the table; with --workdir also writes <workdir>/bank_scale.json and <workdir>/bank_scale.md.
"""

import collections
import math
import time
import types
from collections.abc import Sequence

import numpy as np
import tqdm
from absl import flags

from doc2atom_jax import cli, shapes
from doc2atom_jax.atoms import lexical
from doc2atom_jax.data import synthetic
from doc2atom_jax.errors import UserError
from doc2atom_jax.eval import aggregate as agg
from doc2atom_jax.eval import quick, routing, runner
from doc2atom_jax.train import losses

SETTINGS = ("per_document", "bank")
ANSWERED = ("doc2atom", "rag_atoms")  # the evaluator's methods scored teacher-forced on the routed atoms
RATES = (*routing.RATES, "wrong_document_at_1", "refusal", "false_refusal", "tf_em_doc2atom", "tf_em_rag_atoms")
COUNTS = ("questions", "single", "two_hop", "out_of_scope", "unlabelled", "answerable")
ROUTE_CHUNK = 64  # questions routed at once over a bank (question states are [B, T, d])
BATCH = 8  # questions scored teacher-forced at once, padded to a power of two (as the evaluator's batches)
DEFAULTS = {"documents": routing.DEFAULTS["documents"], "sizes": routing.DEFAULTS["sizes"],
            "templates": ("seen", "unseen"), "split": "validation", "start": 20_000, "seed": 0}

# --documents and --sizes are routing.py's flags (imported above): the same worlds, the same meaning.
_SPLIT = flags.DEFINE_enum("split", None, ("validation", "test"), "validation: routing.py's worlds (default); test: "
                          "mode=eval's unseen worlds, the same documents and questions as its synthetic_unseen")
_TEMPLATES = flags.DEFINE_list("templates", None, f"template sets, comma-separated: some of "
                               f"{', '.join(synthetic.TEMPLATES)} (default seen,unseen)")


# ---------------------------------------------------------------------------------------------------------
# One setting's routing and answers.
# ---------------------------------------------------------------------------------------------------------
def _route(system, bank, questions: Sequence[str]):
  """(indices [B, k], weights [B, k], abstain [B], top [B] of up to `routing.TOP` atoms) over `bank`'s rows."""
  indices, weights, abstain, top = [], [], [], []
  lexicon = system.lexicon(bank)
  for start in range(0, len(questions), ROUTE_CHUNK):
    chunk = list(questions[start:start + ROUTE_CHUNK])
    i, w, a = system.select(bank, chunk)
    indices.append(np.asarray(i))
    weights.append(np.asarray(w))
    abstain.append(np.asarray(a, bool))
    scores = np.asarray(system.scores(bank, chunk))
    top += [routing.system_order(system, s, q, lexicon)[:routing.TOP] for s, q in zip(scores, chunk)]
  return np.concatenate(indices), np.concatenate(weights), np.concatenate(abstain), top


class _Routed:
  """What the evaluator's method builders (`runner.BUILDERS`) read of a `runner.DocumentRun`: the questions,
  the main system and its bank, and routing already done; so rag_atoms' prompt and doc2atom's composition are
  the evaluator's own."""

  def __init__(self, system, bank, questions, routes):
    self.doc = types.SimpleNamespace(questions=tuple(questions))
    self.systems = {"doc2atom": system}
    self._bank, self._routes = bank, routes

  def bank(self, name: str):
    del name
    return self._bank

  def route(self, rows):
    return tuple(np.asarray(x)[list(rows)] for x in self._routes)


def _teacher_forced(system, bank, questions: Sequence[runner.EvalQuestion], indices, weights, abstain) -> dict:
  """method -> [B] teacher-forced exact match on the routed atoms (NaN for unanswerable questions, 0 where the
  system abstained: a refusal answers nothing)."""
  out = {m: np.where([q.answerable for q in questions], 0.0, np.nan) for m in ANSWERED}
  scored = [b for b, q in enumerate(questions) if q.answerable and not abstain[b]]
  for start in range(0, len(scored), BATCH):
    real = scored[start:start + BATCH]
    rows = real + [real[-1]] * (shapes.pow2(len(real)) - len(real))  # few batch shapes, few compilations
    asked = [questions[b] for b in rows]
    run = _Routed(system, bank, asked, (indices[rows], weights[rows], abstain[rows]))
    answers, prefixes = [q.references[0] for q in asked], [q.answer_prefix for q in asked]
    for method in ANSWERED:
      inputs = runner.BUILDERS[method](run, tuple(range(len(rows))))
      logits, batch = quick.prompt_answer_logits(system.model, inputs.user_turns, answers, inputs.adapter, prefixes)
      hit = np.asarray(losses.greedy_match(logits, batch["targets"], batch["answer_mask"]), np.float64)
      out[method][real] = hit[:len(real)]
  return out


class _Setting:
  """Per question (documents in order, then their questions): the routing and the answers of one setting."""

  def __init__(self):
    self.top, self.abstain = [], []
    self.tf_em = {m: [] for m in ANSWERED}

  def add(self, system, bank, questions, offset: int = 0) -> None:
    """Routes `questions` over `bank` and scores them; `offset`: the bank's row 0 in the whole bank's rows."""
    indices, weights, abstain, top = _route(system, bank, [q.question for q in questions])
    self.top += [t + offset for t in top]
    self.abstain += abstain.tolist()
    for method, values in _teacher_forced(system, bank, questions, indices, weights, abstain).items():
      self.tf_em[method] += values.tolist()


# ---------------------------------------------------------------------------------------------------------
# Shared entities and rows.
# ---------------------------------------------------------------------------------------------------------
def shared_entity(documents: Sequence[runner.EvalDocument]) -> list[list[bool]]:
  """Per document, per question: answerable, naming something (`lexical.names`, numbers aside), and every name it
  has occurs in another document too (`lexical.absent_names` finds none missing there)."""
  # absent_names over an empty text: every name of the question that is not a number.
  named = [[bool(q.answerable and lexical.absent_names(q.question, "")) for q in d.questions] for d in documents]
  shared = [[False] * len(d.questions) for d in documents]
  for j, other in enumerate(documents):  # one text at a time: absent_names caches its words
    for d, (doc, flags_) in enumerate(zip(documents, shared)):
      for i, q in enumerate(doc.questions):
        if d != j and named[d][i] and not flags_[i] and not lexical.absent_names(q.question, other.text):
          flags_[i] = True
  return shared


def _row(kinds, evidence, doc_of, owner, setting: _Setting, keep) -> dict:
  """Rates and counts over the questions `keep` selects (routing.tally's, plus wrong document and tf_em)."""
  rows = np.flatnonzero(keep)
  ranked = routing.Ranked([kinds[b] for b in rows], [evidence[b] for b in rows],
                          {routing.SYSTEM: [setting.top[b] for b in rows]},
                          np.asarray([setting.abstain[b] for b in rows], bool))
  row = routing.tally([ranked], routing.SYSTEM)
  answerable = [b for b in rows if kinds[b] not in agg.UNANSWERABLE_KINDS]
  wrong = [not setting.abstain[b] and len(setting.top[b]) > 0 and owner[setting.top[b][0]] != doc_of[b]
           for b in answerable]
  row["wrong_document_at_1"] = _mean(wrong)
  for method in ANSWERED:
    row[f"tf_em_{method}"] = _mean([setting.tf_em[method][b] for b in answerable])
  row["answerable"] = len(answerable)
  return {name: row[name] for name in (*RATES, *COUNTS)}


def _mean(values) -> float:
  return float(np.mean(values)) if len(values) else float("nan")


def measure(system, documents: Sequence[runner.EvalDocument], *, code_dtype: str = "bfloat16",
            key_dtype: str = "float32", progress: str | None = None) -> dict:
  """The same questions over each document's own bank and over one bank of all `documents` (see the module
  docstring): {"documents", "atoms", "per_document": row, "bank": row, "shared_entity": {"questions",
  "per_document": row, "bank": row}}, each row `RATES` (NaN where no question of the kind) and `COUNTS`.
  Each document is compiled once; both banks hold the same codes, stored as `code_dtype` / `key_dtype`."""
  if system.method.method != "doc2atom":
    raise UserError(f"bank routing is measured for method doc2atom (this system is {system.method.method}: no router)")
  documents = list(documents)
  if not documents:
    raise UserError("no documents: a bank needs at least one")
  repeated = sorted(i for i, n in collections.Counter(d.doc_id for d in documents).items() if n > 1)
  if repeated:
    raise UserError(f"document ids must be unique in one bank (repeated: {', '.join(repeated)})")
  bar = lambda items, what: tqdm.tqdm(items, desc=f"{progress} {what}" if progress else None, unit="doc",
                                      dynamic_ncols=True, disable=progress is None)
  splits = [system.split(d.text, d.doc_id) for d in documents]
  compiled = [system.compile_document(d.text, d.doc_id, s) for d, s in zip(documents, bar(splits, "compile"))]
  bank_of = lambda docs: quick.in_memory_bank(docs, code_dtype, key_dtype, shared_tail=system.cfg.copy_dim)
  whole = bank_of(compiled)
  offsets = whole.doc_offsets
  owner = np.repeat(np.arange(len(documents)), np.diff(offsets))  # bank row -> its document
  kinds, evidence, doc_of = [], [], []
  for j, (doc, split) in enumerate(zip(documents, splits)):
    for q in doc.questions:
      local = routing.evidence_labels(doc, q, split.atoms)
      evidence.append(None if local is None else [tuple(int(a + offsets[j]) for a in atoms) for atoms in local])
      kinds.append(q.kind)
      doc_of.append(j)
  settings = {name: _Setting() for name in SETTINGS}
  for j, (doc, one) in enumerate(zip(documents, bar(compiled, "per document"))):
    settings["per_document"].add(system, bank_of([one]), doc.questions, int(offsets[j]))
  questions = [q for d in documents for q in d.questions]
  settings["bank"].add(system, whole, questions)
  everything = np.ones(len(questions), bool)
  shared = np.asarray([s for per_doc in shared_entity(documents) for s in per_doc], bool)
  result = {"documents": len(documents), "atoms": len(whole)}
  result.update({name: _row(kinds, evidence, doc_of, owner, s, everything) for name, s in settings.items()})
  result["shared_entity"] = {"questions": int(shared.sum()),
                             **{name: _row(kinds, evidence, doc_of, owner, s, shared) for name, s in settings.items()}}
  return result


# ---------------------------------------------------------------------------------------------------------
# Worlds, rows and the table.
# ---------------------------------------------------------------------------------------------------------
def check(documents, sizes, templates) -> None:
  """The command line's settings, checked before anything slow: a UserError naming the bad one."""
  if isinstance(documents, bool) or not isinstance(documents, (int, np.integer)) or not 2 <= documents <= 1000:
    raise UserError(f"documents must be an integer in [2, 1000]: worlds per facts size, and one bank needs several "
                    f"to route among (got {documents!r})")
  routing.check(documents, sizes, templates)


def worlds(templates: str, *, documents: int, sizes: Sequence[int], split: str = "validation", start: int = 20_000,
           seed: int = 0) -> list[runner.EvalDocument]:
  """`documents` worlds per size, the ones routing.py measures (world i of size s is index start + 1000 s + i)."""
  return [runner.from_synthetic(synthetic.document(split, start + 1000 * s + i, seed=seed, facts_per_document=s,
                                                   questions_per_document=routing.QUESTIONS_PER_DOCUMENT,
                                                   templates=templates), f"synthetic_{templates}", templates)
          for s in sizes for i in range(documents)]


def documents_of(options: dict, templates: str, *, seed: int, questions: int) -> list[runner.EvalDocument]:
  """The worlds `settings` names: split "test" = mode=eval's unseen worlds (`runner.unseen_synthetic`, the same
  documents and questions its synthetic_unseen scores, with the config's seed and questions per document); else
  routing.py's validation worlds (`worlds`)."""
  if options["split"] == "test":
    return runner.unseen_synthetic(options["documents"], options["sizes"], seed=seed, questions=questions,
                                   templates=templates)
  return worlds(templates, **{k: v for k, v in options.items() if k != "templates"})


def rows_of(templates: str, result: dict) -> list[dict]:
  """`measure`'s result as table rows: one per setting, then one per setting on the shared-entity subset."""
  base = {"templates": templates, "documents": result["documents"], "atoms": result["atoms"]}
  return ([{**base, "setting": s, **result[s]} for s in SETTINGS] +
          [{**base, "setting": f"{s}, shared entity", **result["shared_entity"][s]} for s in SETTINGS])


def format_table(rows: Sequence[dict]) -> str:
  """A markdown table of `rows_of`'s rows; "—" where a rate has no question."""
  cell = lambda x: "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"
  lines = ["| templates | setting | documents / atoms | p@1 | r@4 | two-hop both@4 | wrong doc @1 | refusal | "
           "false refusal | tf_em doc2atom | tf_em rag_atoms | questions |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['templates']} | {r['setting']} | {r['documents']} / {r['atoms']} | "
                 f"{cell(r['precision_at_1'])} | {cell(r['recall_at_4'])} | {cell(r['two_hop_both_at_4'])} | "
                 f"{cell(r['wrong_document_at_1'])} | {cell(r['refusal'])} | {cell(r['false_refusal'])} | "
                 f"{cell(r['tf_em_doc2atom'])} | {cell(r['tf_em_rag_atoms'])} | "
                 f"{r['questions']} ({r['single']}/{r['two_hop']}/{r['out_of_scope']}) |")
  lines.append("\nquestions: all (single / two-hop / out-of-scope). per_document: each question over its own "
               "document's bank; bank: over one bank of every document. shared entity: answerable questions whose "
               "names all occur in another document too. An abstention is a miss in every answerable column.")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------------------
def settings(config) -> dict:
  """DEFAULTS, then the config's `bank_scale` section where it has one, then the flags (routing.settings)."""
  out = routing.settings(config, "bank_scale", DEFAULTS, {"templates": _TEMPLATES.value, "split": _SPLIT.value})
  check(out["documents"], out["sizes"], out["templates"])  # one bank needs two documents or more
  return out


def main(args=()) -> None:
  """`python -m doc2atom_jax.eval.bank_scale --config=<file>.py [--documents=N] [--sizes=a,b] [--templates=t]
  [--split=validation|test] [--workdir=DIR]`."""
  del args
  config, options, workdir, system = routing.start(settings)
  dtypes = {"code_dtype": config.atoms.code_dtype, "key_dtype": config.atoms.get("key_dtype", "float32")}
  rows, seconds = [], {}
  for t in options["templates"]:
    begin = time.perf_counter()
    docs = documents_of(options, t, seed=config.seed, questions=config.data.questions_per_document)
    rows += rows_of(t, measure(system, docs, progress=f"bank {t}", **dtypes))
    seconds[t] = round(time.perf_counter() - begin, 1)
  table = format_table(rows)
  print(table)
  if workdir is not None:
    routing.write_outputs(workdir, "bank_scale", "One bank of many documents vs each document's own", table,
                          {"model": config.model.name, "params": config.params or None, "settings": options,
                           **dtypes, "seconds": seconds, "rows": rows})


if __name__ == "__main__":
  cli.run(main)
