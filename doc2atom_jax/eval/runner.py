"""The evaluator (mode=eval; DESIGN §3, §8): every method on the same questions with one short-answer prompt,
one `QuestionRecord` per (method, question), and the report folder.

Methods (all use `data/prompts.py` and the same greedy token budget; in_context is the teacher):
- `no_context`: the question alone.
- `in_context`: the document, then the question. Its KL is 0 by definition: it is the teacher.
- `in_context_trunc`: the document cut to its first `trunc_tokens` tokens.
- `rag_atoms`: the text of the router's top-k atoms (rank order) in place of the document. It abstains where
  doc2atom does (the null atom ranks first), so the two differ only in text vs compiled weights.
- `doc2atom`: the question alone, the routed atoms' composed adapter; abstains when the null atom ranks first.
- `doc2atom_oracle`: the evidence atoms at uniform weight (1 for one atom, as training's oracle: weights sum to
  1), on labelled answerable questions only: the routing upper bound.
- `d2l`, `d2l_atom`: every chunk / atom of the document at weight 1, from their own export (no router).
- `capacity_atom`, `capacity_doc` (the capacity oracle, with `eval.capacity_steps` > 0): free LoRAs fitted by
  Adam against the teacher on each batch's answerable questions, no compiler involved — per atom at rank
  `capacity_rank` with oracle routing (labelled questions only), or one rank-`capacity_doc_rank` adapter per
  document (d2l's form) — then scored and generated like the rest. Low KL here and high KL for doc2atom_oracle
  means the compiler has not learned to write what an adapter of that size can hold (`capacity.py`).

Per question: a greedy answer with a fixed token budget (one that runs out is scored as it stands), and on
answerable questions the teacher-forced NLL of the first reference and the top-K KL to the in-context teacher
on its tokens. The teacher's top-K comes from in_context's own scoring pass when in_context runs (the same
prompt and packing as `teacher.topk_on_answers`), else from the on-disk teacher cache. Routing is over the
document's own atoms. Evidence labels: synthetic facts map to the atoms their spans overlap; real QA gets the
one atom holding the answer (`data/evidence.py`) or no label; every method's record carries the same labels,
the question's answer category (`answers.answer_category`: the generator's for synthetic worlds, a text rule for
real QA) and, for synthetic worlds, the templates the document is written in.

Shapes: a document's questions go in batches padded to a power of two (at most `batch_size`), prompts to
`shapes.length_bucket`s (four per octave), d2l adapters to power-of-two atom counts, so the jitted forward and
generator compile for a few dozen shapes in a whole run; the base model runs its layers as a scan here
(`eval.scan_layers`), which compiles ~6x faster than the unrolled loop. Documents over `max_doc_tokens` are
skipped and counted, never cut.

in_context and in_context_trunc answer from the document's prefix KV cache: the tokens every one of its prompts
starts with (chat header, document, "Question:") are prefilled once per document (`DocumentRun.document_cache`,
`BaseModel.prefix_cache`) and each batch of questions prefills only its suffixes (`generate_ids(prefix=)`), the
same token sequences as the full prompts, so the same answers up to float rounding, at a fraction of the
prefill work (one document prefill instead of one per question). Their latency is measured the same way: the
cache build is in_context's internalization, the answer continues it.
"""

import dataclasses
import functools
import pathlib
import re
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from doc2atom_jax import fileio, shapes
from doc2atom_jax import system as system_lib
from doc2atom_jax.data import answers as answers_lib
from doc2atom_jax.data import evidence as evidence_lib
from doc2atom_jax.data import prompts, qa, synthetic
from doc2atom_jax.errors import UserError
from doc2atom_jax.eval import aggregate as agg
from doc2atom_jax.eval import capacity as capacity_lib
from doc2atom_jax.eval import costs as costs_lib
from doc2atom_jax.eval import quick
from doc2atom_jax.train import losses
from doc2atom_jax.train import teacher as teacher_lib

METHODS = ("no_context", "in_context", "in_context_trunc", "rag_atoms", "doc2atom", "doc2atom_oracle", "d2l",
           "d2l_atom", "capacity_atom", "capacity_doc")
TRAINED_ELSEWHERE = ("d2l", "d2l_atom")  # from their own export (`eval.exports`)
CAPACITY = ("capacity_atom", "capacity_doc")  # fitted per batch of questions: no bank, no timed answer
ATOM_METHODS = ("rag_atoms", "doc2atom", "doc2atom_oracle")  # need the main system's compiled document
# Synthetic datasets: name -> (world, templates). synthetic_unseen_templates holds synthetic_unseen's worlds (the
# same facts and questions) written and asked in the held-out templates, so wording and worlds are told apart.
SYNTHETIC = {"synthetic_unseen": ("unseen", "seen"), "synthetic_unseen_templates": ("unseen", "unseen"),
             "synthetic_seen": ("seen", "seen")}
QUESTION_RESERVE = 256  # tokens kept for the template, the question and the scored answer beside a document


def default_datasets() -> tuple[str, ...]:
  return (*SYNTHETIC, *qa.BUNDLED)


# ---------------------------------------------------------------------------------------------------------
# Documents and questions.
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EvalQuestion:
  qid: str
  question: str
  references: tuple[str, ...]
  kind: str  # one of aggregate.KINDS
  fact_evidence: tuple[int, ...] = ()  # synthetic: evidence fact indices (bridge first)
  answer_prefix: str = ""  # prefilled in the assistant turn for every method
  category: str = ""  # answers.CATEGORIES; "" for unanswerable questions

  @property
  def answerable(self) -> bool:
    return self.kind not in agg.UNANSWERABLE_KINDS


@dataclasses.dataclass(frozen=True)
class EvalDocument:
  dataset: str
  doc_id: str
  text: str
  questions: tuple[EvalQuestion, ...]
  facts: int | None = None  # synthetic: facts in the document
  world: str | None = None  # synthetic: "seen" / "unseen"
  fact_spans: tuple[tuple[int, int], ...] | None = None  # synthetic: character span of each fact
  templates: str | None = None  # synthetic: the statement/question templates it is written in (synthetic.TEMPLATES)


def from_synthetic(doc: synthetic.SyntheticDocument, dataset: str, world: str) -> EvalDocument:
  """The generator's answer category where it recorded one (older documents: the text rule); the templates from
  the id, which `synthetic.document` suffixes with the held-out templates' name."""
  templates = next((t for t in synthetic.TEMPLATES if t != "seen" and doc.doc_id.endswith(f"-{t}")), "seen")
  questions = tuple(EvalQuestion(q.qid, q.question, (q.answer,), q.kind, tuple(q.evidence), q.answer_prefix,
                                 answers_lib.answer_category((q.answer,), q.answer_category)
                                 if q.kind not in agg.UNANSWERABLE_KINDS else "")
                    for q in doc.questions)
  return EvalDocument(dataset, doc.doc_id, doc.text, questions, len(doc.facts), world, tuple(doc.fact_spans),
                      templates)


def _qa_kind(example: qa.QAExample) -> str:
  """The source's kind where it is one of ours and agrees with the answers, else answerable / unanswerable."""
  if example.kind in agg.KINDS and (example.kind in agg.UNANSWERABLE_KINDS) != example.answerable:
    return example.kind
  return "answerable" if example.answerable else "unanswerable"


def from_qa(examples: Sequence[qa.QAExample], dataset: str) -> list[EvalDocument]:
  """QA examples -> one document per context, questions in file order."""
  return [EvalDocument(dataset, doc_id, group[0].context,
                       tuple(EvalQuestion(ex.id, ex.question, ex.answers, _qa_kind(ex), answer_prefix=ex.answer_prefix,
                                          category=answers_lib.answer_category(ex.answers) if ex.answerable else "")
                             for ex in group))
          for doc_id, group in qa.group_by_document(examples).items()]


def qa_documents(entry: str) -> list[EvalDocument]:
  """A QA dataset by name (`qa.load_source`: bundled, local:<path>, remote) with an optional @split."""
  name, _, split = entry.partition("@")
  examples = qa.load_source(name, split=split or None)
  if not any(ex.answerable for ex in examples):
    raise UserError(f"dataset {entry!r} has no answerable question ({len(examples)} examples): nothing to score")
  return from_qa(examples, entry)


def unseen_synthetic(count: int, sizes: Sequence[int], *, seed: int, questions: int, templates: str = "seen"
                     ) -> list[EvalDocument]:
  """`count` test-split worlds (never trained on, never used for model selection) per facts size; each size
  takes its own indices, so every document is its own world with its own id. templates="unseen": the same
  worlds, facts and questions written in the held-out templates (dataset synthetic_unseen_templates)."""
  dataset = "synthetic_unseen" if templates == "seen" else "synthetic_unseen_templates"
  return [from_synthetic(synthetic.document("test", s * count + i, seed=seed, facts_per_document=int(n),
                                            questions_per_document=questions, paraphrase=2, templates=templates),
                         dataset, "unseen") for s, n in enumerate(sizes) for i in range(count)]


_SYNTHETIC_ID = re.compile(r"^synthetic-train-(?P<seed>\d+)-(?P<index>\d+)$")


def spread_steps(trained_steps: int, count: int) -> list[int]:
  """Every step of the run once, starting from `count` evenly spaced ones (0, n/count, 2n/count, ...), so the first
  `count` distinct documents found sample the whole run (every curriculum stage), not its first steps."""
  first = list(dict.fromkeys(int(i * trained_steps / count) for i in range(count))) if count > 0 else []
  taken = set(first)
  return first + [s for s in range(trained_steps) if s not in taken]


def seen_synthetic(run: Mapping, trained_steps: int, count: int, tokenizer) -> list[EvalDocument]:
  """`count` documents the training run visited (its data order, replayed), from steps spread over the whole run
  (`spread_steps`), asked in the paraphrase training never used (2): seen worlds, new questions. Empty for a run
  trained on real QA."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from doc2atom_jax.train import data as data_lib  # pylint: disable=import-outside-toplevel  (tfds is slow)

  data = run["data"]
  if data["source"] == "qa":
    return []
  stages = data_lib.curriculum_stages(data.get("curriculum") or ())
  documents_for_step = data_lib.source_from_config(ml_collections.ConfigDict({"seed": run["seed"], "data": data}))
  found: dict[str, EvalDocument] = {}
  for step in spread_steps(trained_steps, count):
    facts = stages[data_lib.stage_index(stages, step)][1] if stages else data["facts_per_document"]
    for trained in documents_for_step(step, tokenizer):
      m = _SYNTHETIC_ID.match(trained.doc.doc_id)
      if not m or trained.doc.doc_id in found:
        continue
      doc = synthetic.document("train", int(m["index"]), seed=int(m["seed"]), facts_per_document=tuple(facts),
                               questions_per_document=data["questions_per_document"], paraphrase=2)
      if doc.text == trained.doc.text:  # the same world, by construction; checked, never assumed
        found[doc.doc_id] = from_synthetic(doc, "synthetic_seen", "seen")
      if len(found) == count:
        return list(found.values())
  return list(found.values())


@dataclasses.dataclass
class Coverage:
  """What a dataset contributed: documents and questions evaluated, documents skipped as too long."""
  documents: int = 0
  questions: int = 0
  skipped_long: int = 0
  seconds: float = 0.0
  note: str = ""


def select_documents(documents: Sequence[EvalDocument], *, max_questions: int | None, fits: Callable[[str], bool],
                     coverage: Coverage) -> list[EvalDocument]:
  """Documents in order, skipping (and counting) those that do not fit, until `max_questions` questions."""
  chosen, left = [], max_questions if max_questions else float("inf")
  for doc in documents:
    if left <= 0:
      break
    if not fits(doc.text):
      coverage.skipped_long += 1
      continue
    doc = dataclasses.replace(doc, questions=doc.questions[:int(min(left, len(doc.questions)))])
    chosen.append(doc)
    left -= len(doc.questions)
  coverage.documents, coverage.questions = len(chosen), sum(len(d.questions) for d in chosen)
  return chosen


# ---------------------------------------------------------------------------------------------------------
# Evidence labels in a system's atomization.
# ---------------------------------------------------------------------------------------------------------
def evidence_atoms(doc: EvalDocument, question: EvalQuestion, atoms) -> tuple[int, ...] | None:
  """Atom indices holding the question's evidence; None for unanswerable or unlabelled questions.

  Synthetic: every atom whose span overlaps an evidence fact (in evidence order; the rule-based atomizer
  reproduces the facts exactly for SmolLM2). Real QA: the one atom holding a normalized answer, if unique.
  """
  if not question.answerable:
    return None
  if doc.fact_spans is None:
    i = evidence_lib.evidence_atom(atoms, question.references)
    return None if i is None else (i,)
  hits: dict[int, None] = {}
  for f in question.fact_evidence:
    start, end = doc.fact_spans[f]
    hits.update((j, None) for j, a in enumerate(atoms) if a.char_start < end and a.char_end > start)
  return tuple(hits) or None


# ---------------------------------------------------------------------------------------------------------
# Model calls at bucketed shapes.
# ---------------------------------------------------------------------------------------------------------
def generate(model, user_turns: Sequence[str], *, max_new_tokens: int, adapter=None, stop: bool = True,
             prefix=None, answer_prefixes=None) -> list[str]:
  """Greedy answers to user turns (chat template, answer prefixes prefilled) at the evaluator's prompt buckets
  (`shapes.length_bucket`), decoded and stripped; a row that hits the budget keeps what it has. `prefix`: a
  document's prefix cache."""
  return [text.strip() for text in model.generate(
      list(user_turns), max_new_tokens=max_new_tokens, adapter=adapter, stop=stop, prefix=prefix,
      bucket=shapes.length_bucket, answer_prefixes=answer_prefixes)]


def document_prefix_ids(model, text: str) -> list[int]:
  """The tokens every in-context prompt over `text` starts with (chat header, document, the "Question:" label):
  the shared prefix of its rendered prompts for two unlike questions."""
  return model.shared_prefix_ids([prompts.in_context_prompt(text, q) for q in ("a", "b")])




@functools.partial(jax.jit, static_argnames="k")
def teacher_scores(logits, targets, mask, *, k: int = teacher_lib.TOP_K):
  """From the in-context answer logits: the teacher's top-K (ids, log-probs) [B, A, K], as
  `teacher.topk_on_answers` computes them, the gold-answer NLL [B] and teacher-forced exact match [B]."""
  logp, ids = jax.lax.top_k(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), k)
  return ids, logp, losses.answer_ce(logits, targets, mask), losses.greedy_match(logits, targets, mask)


@jax.jit
def student_scores(logits, targets, mask, teacher_ids, teacher_logp):
  """(gold-answer NLL [B], top-K KL to the teacher [B], teacher-forced exact match [B]) from a method's answer
  logits."""
  return (losses.answer_ce(logits, targets, mask), losses.topk_kl(logits, teacher_ids, teacher_logp, mask),
          losses.greedy_match(logits, targets, mask).astype(jnp.float32))


def _padded(items: list, size: int) -> list:
  return items + [items[-1]] * (size - len(items))


# ---------------------------------------------------------------------------------------------------------
# Methods: what each feeds the model for a batch of questions.
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Inputs:
  """One method's inputs for a batch: user turns and adapter; routing and abstention per row; which rows to
  record (None: all); `answers` replaces generation (rule-based methods, e.g. a test's always-refuser);
  `document`, where every turn is `prompts.in_context_prompt(document, question)`, lets generation reuse the
  document's prefix KV cache."""
  user_turns: list[str]
  adapter: object = None
  routed: list | None = None
  abstained: list | None = None
  keep: list | None = None
  answers: list | None = None
  document: str | None = None  # every user turn is in_context_prompt(document, question): its prefix is shared


class DocumentRun:
  """One document under evaluation: its compiled banks (lazily, one per system), evidence labels, routing."""

  def __init__(self, doc: EvalDocument, systems: Mapping, *, code_dtype: str, trunc_tokens: int,
               key_dtype: str = "float32"):
    self.doc, self.systems, self.code_dtype, self.trunc_tokens = doc, systems, code_dtype, trunc_tokens
    self.key_dtype = key_dtype
    main = systems["doc2atom"]
    self.model = main.model
    self.doc_tokens = costs_lib.count_tokens(self.model, doc.text)
    self.atoms = main.split(doc.text, doc.doc_id).atoms
    self.evidence = [evidence_atoms(doc, q, self.atoms) for q in doc.questions]
    self.banks: dict[str, object] = {}
    self.compile_seconds: dict[str, float] = {}
    self._routes: dict[tuple, tuple] = {}
    self._prefixes: dict[str, tuple] = {}

  def document_cache(self, text: str):
    """The prefix cache of the in-context prompts over `text` (`BaseModel.prefix_cache`), built once per
    document (and per text: in_context_trunc has its own)."""
    if text not in self._prefixes:
      self._prefixes[text] = self.model.prefix_cache(document_prefix_ids(self.model, text))
    return self._prefixes[text]

  def bank(self, system_name: str):
    """The document compiled by one system, as the bank it would load as (codes rounded to storage)."""
    if system_name not in self.banks:
      start = time.perf_counter()
      self.use_compiled(system_name, self.systems[system_name].compile_document(self.doc.text, self.doc.doc_id))
      self.compile_seconds[system_name] = time.perf_counter() - start
    return self.banks[system_name]

  def use_compiled(self, system_name: str, compiled) -> None:
    """Adopts a compilation of this document made (and timed) elsewhere as `bank(system_name)`."""
    self.banks[system_name] = quick.in_memory_bank([compiled], self.code_dtype, self.key_dtype,
                                                   shared_tail=self.systems[system_name].cfg.copy_dim)

  def route(self, rows: tuple[int, ...]):
    """The router's (indices, weights, abstain) for question rows, computed once for rag_atoms and doc2atom."""
    if rows not in self._routes:
      questions = [self.doc.questions[i].question for i in rows]
      self._routes[rows] = self.systems["doc2atom"].select(self.bank("doc2atom"), questions)
    return self._routes[rows]

  def clear_routes(self) -> None:
    """Forgets the cached routing, so a latency measurement of answering includes it."""
    self._routes.clear()


def _routed_atoms(indices, weights) -> list[tuple[int, ...]]:
  """Per row, the atoms actually used, in rank order (the null atom and zero-weight padding dropped)."""
  rows = zip(np.asarray(indices).tolist(), np.asarray(weights).tolist())
  return [tuple(int(i) for i, w in zip(idx, wt) if i >= 0 and w > 0) for idx, wt in rows]


def _question_turns(run: DocumentRun, rows) -> list[str]:
  return [prompts.question_prompt(run.doc.questions[i].question) for i in rows]


def _document_turns(run: DocumentRun, rows, text: str) -> list[str]:
  return [prompts.in_context_prompt(text, run.doc.questions[i].question) for i in rows]


def _no_context(run: DocumentRun, rows) -> Inputs:
  return Inputs(_question_turns(run, rows))


def _in_context(run: DocumentRun, rows) -> Inputs:
  return Inputs(_document_turns(run, rows, run.doc.text), document=run.doc.text)


def _in_context_trunc(run: DocumentRun, rows) -> Inputs:
  text = costs_lib.truncated(run.model, run.doc.text, run.trunc_tokens)
  return Inputs(_document_turns(run, rows, text), document=text)


def _rag_atoms(run: DocumentRun, rows) -> Inputs:
  indices, weights, abstain = run.route(rows)
  routed, atoms = _routed_atoms(indices, weights), run.bank("doc2atom").atoms
  turns = []
  for i, used in zip(rows, routed):
    question = run.doc.questions[i].question
    context = " ".join(atoms[j].text for j in used)
    turns.append(prompts.in_context_prompt(context, question) if context else prompts.question_prompt(question))
  return Inputs(turns, routed=routed, abstained=np.asarray(abstain).tolist())


def _doc2atom(run: DocumentRun, rows) -> Inputs:
  indices, weights, abstain = run.route(rows)
  adapter = run.systems["doc2atom"].adapter(run.bank("doc2atom"), indices, weights)
  return Inputs(_question_turns(run, rows), adapter, _routed_atoms(indices, weights), np.asarray(abstain).tolist())


def _doc2atom_oracle(run: DocumentRun, rows) -> Inputs | None:
  """Evidence atoms at uniform weight; rows without labels are composed with no atom and not recorded."""
  evidence = [run.evidence[i] or () for i in rows]
  if not any(evidence):
    return None
  system = run.systems["doc2atom"]
  width = shapes.pow2(max(map(len, evidence)), system.method.k)  # doc2atom's shape where it fits: no new compile
  indices, weights = np.zeros((len(rows), width), np.int32), np.zeros((len(rows), width), np.float32)
  for r, atoms in enumerate(evidence):
    indices[r, :len(atoms)], weights[r, :len(atoms)] = atoms, 1.0 / max(1, len(atoms))
  adapter = system.adapter(run.bank("doc2atom"), indices, weights)
  return Inputs(_question_turns(run, rows), adapter, routed=list(evidence), abstained=[False] * len(rows),
                keep=[bool(e) for e in evidence])


def _all_atoms_of(method: str) -> Callable[[DocumentRun, tuple], Inputs]:
  """d2l / d2l_atom: every chunk or atom of the document at weight 1, padded to a power-of-two count."""

  def inputs(run: DocumentRun, rows) -> Inputs:
    system, bank = run.systems[method], run.bank(method)
    indices, weights, _ = system.select(bank, [run.doc.questions[i].question for i in rows], run.doc.doc_id)
    extra = ((0, 0), (0, shapes.pow2(indices.shape[1]) - indices.shape[1]))
    return Inputs(_question_turns(run, rows), system.adapter(bank, np.pad(indices, extra), np.pad(weights, extra)))

  return inputs


def _capacity(run: DocumentRun, rows, method: str, answers, teacher, cfg: capacity_lib.OracleConfig,
              doc_rank: int) -> Inputs | None:
  """The capacity oracle's inputs: free LoRAs fitted on these rows' answerable questions (the time it takes is
  the document's internalization time for the method). Rows with nothing to fit are not recorded."""
  questions = [run.doc.questions[i] for i in rows]
  if method == "capacity_atom":
    fitted = [run.evidence[i] if q.answerable and run.evidence[i] else None for i, q in zip(rows, questions)]
  else:
    fitted = [(0,) if q.answerable else None for q in questions]
  if not any(fitted):
    return None
  if method == "capacity_atom":
    members, weights = capacity_lib.atom_members(fitted, max(len(e) for e in fitted if e))
    count = len(run.atoms)
  else:
    members, weights = capacity_lib.document_members(fitted)
    count, cfg = 1, dataclasses.replace(cfg, rank=doc_rank)
  start = time.perf_counter()
  batch = {**quick.pack_prompt_answers(run.model, _question_turns(run, rows), answers,
                                      [run.doc.questions[i].answer_prefix for i in rows]),
           "teacher_ids": teacher[0], "teacher_logp": teacher[1]}
  adapter, _, _ = capacity_lib.fit_adapter(run.model, batch, members, weights, count, cfg)
  run.compile_seconds[method] = run.compile_seconds.get(method, 0.0) + time.perf_counter() - start
  return Inputs(_question_turns(run, rows), adapter, routed=[tuple(e or ()) for e in fitted],
                abstained=[False] * len(rows), keep=[e is not None for e in fitted])


BUILDERS: dict[str, Callable[[DocumentRun, tuple], Inputs | None]] = {
    "no_context": _no_context, "in_context": _in_context, "in_context_trunc": _in_context_trunc,
    "rag_atoms": _rag_atoms, "doc2atom": _doc2atom, "doc2atom_oracle": _doc2atom_oracle,
    "d2l": _all_atoms_of("d2l"), "d2l_atom": _all_atoms_of("d2l_atom"),
}


# ---------------------------------------------------------------------------------------------------------
# Scoring a document.
# ---------------------------------------------------------------------------------------------------------
def _cached_teacher(run: DocumentRun, rows, answers, cache):
  """Teacher top-K [B, A, K] from the disk cache (computed where missing), keyed as the trainer keys it."""
  model, doc = run.model, run.doc
  questions = [doc.questions[i] for i in rows]
  prompt_ids, answer_ids = model.prompt_answer_ids(_document_turns(run, rows, doc.text), answers,
                                                   [q.answer_prefix for q in questions])
  keys = [teacher_lib.example_key(doc.doc_id, q.qid, q.question, q.answer_prefix, a) + "\x00doc"
          for q, a in zip(questions, answers)]
  found = cache.get_or_compute(model, keys, prompt_ids, answer_ids)
  width = shapes.multiple(max(map(len, answer_ids)), teacher_lib.ANSWER_BUCKET)  # as pack_answers pads
  ids = np.zeros((len(rows), width, teacher_lib.TOP_K), np.int32)
  logp = np.zeros((len(rows), width, teacher_lib.TOP_K), np.float32)
  for r, (i_, l_) in enumerate(found):
    ids[r, :len(i_)], logp[r, :len(l_)] = i_, l_
  return ids, logp


def _scores(model, inputs: Inputs, answers, answer_prefixes, teacher):
  """(nll [B], kl [B], tf_em [B]) of the gold answers under a method's inputs."""
  logits, batch = quick.prompt_answer_logits(model, inputs.user_turns, answers, inputs.adapter, answer_prefixes)
  return tuple(np.asarray(x) for x in student_scores(logits, batch["targets"], batch["answer_mask"], *teacher))


def evaluate_document(run: DocumentRun, methods: Sequence[str], *, batch_size: int, max_new_tokens: int,
                      cache: teacher_lib.TeacherCache | None = None,
                      capacity: capacity_lib.OracleConfig = capacity_lib.OracleConfig(),
                      capacity_doc_rank: int = 8, reuse_prefix: bool = True) -> list[agg.QuestionRecord]:
  """Every method on the document's questions, in batches of at most `batch_size` (padded to a power of 2).

  reuse_prefix: in-context methods answer from the document's prefix KV cache (False: every prompt is prefilled
  whole, as `generate` does; the same answers up to float rounding, the reference in tests)."""
  doc, model, records = run.doc, run.model, []
  for start in range(0, len(doc.questions), batch_size):
    real = list(range(start, min(start + batch_size, len(doc.questions))))
    rows = tuple(_padded(real, shapes.pow2(len(real))))
    answers = [doc.questions[i].references[0] if doc.questions[i].answerable else synthetic.UNKNOWN for i in rows]
    answer_prefixes = [doc.questions[i].answer_prefix for i in rows]
    scored = any(doc.questions[i].answerable for i in real)
    teacher = teacher_nll = teacher_em = None
    if scored and "in_context" in methods:  # the teacher is in_context's own scoring pass
      logits, batch = quick.prompt_answer_logits(model, _document_turns(run, rows, doc.text), answers,
                                                 answer_prefixes=answer_prefixes)
      *teacher, teacher_nll, teacher_em = teacher_scores(logits, batch["targets"], batch["answer_mask"])
      teacher_nll, teacher_em = np.asarray(teacher_nll), np.asarray(teacher_em, np.float32)
    elif scored:
      teacher = _cached_teacher(run, rows, answers, cache or teacher_lib.TeacherCache.for_model(model))
    done = {}  # the same prompts without an adapter (in_context_trunc of a short document) are run once
    for method in methods:
      if method in CAPACITY:
        inputs = _capacity(run, rows, method, answers, teacher, capacity, capacity_doc_rank) if scored else None
      else:
        inputs = BUILDERS[method](run, rows)
      if inputs is None:
        continue
      key = tuple(inputs.user_turns) if inputs.adapter is None and inputs.answers is None else None
      if key in done:
        texts, scores = done[key]
      else:
        scores = (None, None, None)  # nll, kl, tf_em
        if method == "in_context":
          scores = (teacher_nll, np.zeros(len(rows)), teacher_em)
        elif scored:
          scores = _scores(model, inputs, answers, answer_prefixes, teacher)
        if inputs.answers:
          texts = inputs.answers
        else:
          reuse = reuse_prefix and inputs.document is not None and inputs.adapter is None
          texts = generate(model, inputs.user_turns, max_new_tokens=max_new_tokens, adapter=inputs.adapter,
                           prefix=run.document_cache(inputs.document) if reuse else None,
                           answer_prefixes=answer_prefixes)
        if key is not None:
          done[key] = texts, scores
      records += [_record(method, run, i, r, texts[r], scores, inputs) for r, i in enumerate(real)
                  if inputs.keep is None or inputs.keep[r]]
  return records


def _record(method: str, run: DocumentRun, i: int, r: int, prediction: str, scores, inputs: Inputs):
  doc, q = run.doc, run.doc.questions[i]
  score = lambda values: float(values[r]) if values is not None and q.answerable else None
  nll, kl, tf_em = scores
  return agg.QuestionRecord(
      method=method, dataset=doc.dataset, doc_id=doc.doc_id, qid=q.qid, kind=q.kind, answerable=q.answerable,
      prediction=prediction, references=q.references, nll=score(nll), kl=score(kl), tf_em=score(tf_em),
      doc_tokens=run.doc_tokens,
      facts=doc.facts, world=doc.world, routed=inputs.routed[r] if inputs.routed is not None else None,
      evidence=run.evidence[i], abstained=bool(inputs.abstained[r]) if inputs.abstained is not None else False,
      category=q.category or None, templates=doc.templates)


# ---------------------------------------------------------------------------------------------------------
# Datasets and the evaluation loop.
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Settings:
  max_new_tokens: int = 12
  max_doc_tokens: int = 2048
  trunc_tokens: int = 256
  batch_size: int = 8
  code_dtype: str = "bfloat16"
  key_dtype: str = "float32"
  capacity_steps: int = 0  # the capacity oracle's Adam steps per batch of questions; 0 = off
  capacity_rank: int = 1
  capacity_doc_rank: int = 8
  capacity_learning_rate: float = 5e-3

  def __post_init__(self):
    if self.capacity_steps < 0 or self.capacity_learning_rate <= 0:
      raise UserError(f"eval.capacity_steps must be >= 0 and eval.capacity_learning_rate > 0 (got "
                      f"{self.capacity_steps}, {self.capacity_learning_rate})")
    for name in ("max_new_tokens", "max_doc_tokens", "trunc_tokens", "batch_size", "capacity_rank",
                 "capacity_doc_rank"):
      if getattr(self, name) < 1:
        raise UserError(f"eval.{name} must be >= 1 (got {getattr(self, name)})")


def document_limit(model, settings: Settings) -> int:
  """The most document tokens evaluated: max_doc_tokens, and room in the context for question and answer."""
  return min(settings.max_doc_tokens,
             model.config.max_position_embeddings - QUESTION_RESERVE - settings.max_new_tokens)


def load_datasets(names: Sequence[str], model, settings: Settings, *, max_questions: int, synthetic_documents: int,
                  facts_per_document: Sequence[int], questions_per_document: int, seed: int,
                  run: Mapping | None = None, trained_steps: int = 0):
  """name -> the documents evaluated, and name -> Coverage. `max_questions` caps each QA dataset; synthetic
  sets take `synthetic_documents` per facts size (unseen, and the same worlds in held-out templates) or that many
  in all per size count (seen)."""
  limit = document_limit(model, settings)
  fits = lambda text: costs_lib.count_tokens(model, text) <= limit
  datasets, coverage = {}, {}
  for name in dict.fromkeys(names):
    cov = coverage[name] = Coverage()
    cap = None
    if name in ("synthetic_unseen", "synthetic_unseen_templates"):
      docs = unseen_synthetic(synthetic_documents, facts_per_document, seed=seed, questions=questions_per_document,
                              templates=SYNTHETIC[name][1])
    elif name == "synthetic_seen":
      docs = [] if run is None else seen_synthetic(run, trained_steps, synthetic_documents * len(facts_per_document),
                                                   model.tokenizer)
      if not docs:
        cov.note = ("no training run to replay (set --config.params to a mode=train export)" if run is None
                    else "the training run visited no synthetic document")
    else:
      docs, cap = qa_documents(name), max_questions
    datasets[name] = select_documents(docs, max_questions=cap, fits=fits, coverage=cov)
  return datasets, coverage


def system_of(method: str) -> str:
  """Which system (and bank) a method uses: its own export for d2l / d2l_atom, else the main one."""
  return method if method in TRAINED_ELSEWHERE else "doc2atom"


def _document_stats(run: DocumentRun) -> dict:
  units = {"doc2atom": len(run.atoms)}
  for name, system in run.systems.items():
    if name != "doc2atom":
      units[name] = len(run.banks[name].atoms) if name in run.banks else len(system.split(run.doc.text, "x").atoms)
  return {"dataset": run.doc.dataset, "doc_id": run.doc.doc_id, "tokens": run.doc_tokens,
          "text_bytes": len(run.doc.text.encode("utf-8")), "units": units, "compile_seconds": run.compile_seconds}


def evaluate(systems: Mapping, datasets: Mapping[str, Sequence[EvalDocument]], methods: Sequence[str],
             settings: Settings, coverage: Mapping[str, Coverage] | None = None):
  """(records, per-document stats) for every method on every document; a progress bar over the documents
(ETA) and one line per dataset."""
  records, stats = [], []
  bar = tqdm.tqdm(total=sum(len(d) for d in datasets.values()), desc="eval", unit="doc", dynamic_ncols=True)
  for name, docs in datasets.items():
    start = time.perf_counter()
    bar.set_postfix_str(name)
    for doc in docs:
      run = DocumentRun(doc, systems, code_dtype=settings.code_dtype, trunc_tokens=settings.trunc_tokens,
                        key_dtype=settings.key_dtype)
      records += evaluate_document(
          run, methods, batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens,
          capacity=capacity_lib.OracleConfig(rank=settings.capacity_rank, steps=settings.capacity_steps,
                                             learning_rate=settings.capacity_learning_rate),
          capacity_doc_rank=settings.capacity_doc_rank)
      stats.append(_document_stats(run))
      bar.update(1)
    seconds = time.perf_counter() - start
    cov = (coverage or {}).get(name)
    if cov is not None:
      cov.seconds = seconds
    skipped = f", {cov.skipped_long} skipped as too long" if cov and cov.skipped_long else ""
    bar.write(f"eval {name}: {sum(len(d.questions) for d in docs)} questions, {len(docs)} documents{skipped} "
              f"({seconds:.1f} s)")
  bar.close()
  return records, stats


# ---------------------------------------------------------------------------------------------------------
# Costs, measured on this run's systems.
# ---------------------------------------------------------------------------------------------------------
def bytes_per_document(methods: Sequence[str], systems: Mapping, stats: Sequence[Mapping], settings: Settings) -> dict:
  """method -> mean bytes per evaluated document, per storage form (costs.document_bytes)."""
  model_cfg = systems["doc2atom"].model.config
  number_bytes = costs_lib.float_bytes(settings.code_dtype)  # factors, KV cache; codes as the bank stores them
  out = {}
  for method in (m for m in methods if m not in CAPACITY):  # fitted, not compiled: no stored form measured
    system = system_of(method)
    per_doc = [costs_lib.document_bytes(method, tokens=s["tokens"], atoms=s["units"][system],
                                        text_bytes=s["text_bytes"], compiler_cfg=systems[system].cfg,
                                        model_cfg=model_cfg, trunc_tokens=settings.trunc_tokens,
                                        number_bytes=number_bytes, code_dtype=settings.code_dtype,
                                        key_dtype=settings.key_dtype) for s in stats]
    if per_doc and per_doc[0] is not None:
      out[method] = costs_lib.mean_bytes(per_doc)
  return out


IN_CONTEXT = ("in_context", "in_context_trunc")


def _internalize_fn(run: DocumentRun, method: str, trunc_tokens: int) -> Callable | None:
  """trunc_tokens is the run's (`run.trunc_tokens`), kept in the signature for callers."""
  del trunc_tokens
  if method in IN_CONTEXT:  # building the document's prefix KV cache, as answering uses it
    ids = document_prefix_ids(run.model, BUILDERS[method](run, (0,)).document)
    return lambda: run.model.prefix_cache(ids).cache
  if method == "no_context":
    return None
  system = run.systems[system_of(method)]
  return lambda: system.compile_document(run.doc.text, run.doc.doc_id).codes


def _answer_fn(run: DocumentRun, method: str, new_tokens: int, reuse_prefix: bool = True) -> Callable:
  """Answering one question with exactly `new_tokens` generated tokens, routing and composition included.

  In-context methods continue the document's prefix cache, built here, before timing (it is their
  internalization); reuse_prefix=False prefills the whole prompt per question instead."""
  model = run.model
  if reuse_prefix and method in IN_CONTEXT:
    inputs = BUILDERS[method](run, (0,))
    prefix = run.document_cache(inputs.document)
    return lambda: model.generate_ids(model.chat_ids(inputs.user_turns), max_new_tokens=new_tokens, stop=False,
                                      prefix=prefix)

  def answer():
    run.clear_routes()
    inputs = BUILDERS[method](run, (0,))
    return model.generate_ids(model.chat_ids(inputs.user_turns), max_new_tokens=new_tokens, adapter=inputs.adapter,
                              stop=False, bucket=shapes.length_bucket)

  return answer


def measure_costs(systems: Mapping, methods: Sequence[str], datasets: Mapping[str, Sequence[EvalDocument]],
                  stats: Sequence[Mapping], settings: Settings, *, lengths: Sequence[int], repeats: int,
                  new_tokens: int) -> dict | None:
  """The report's costs: bytes per document (means over this run's documents), and internalize / answer
  seconds on the evaluated text cut to each of `lengths` tokens (medians after a warm-up)."""
  docs = [d for ds in datasets.values() for d in ds]
  if not docs:
    return None
  model = systems["doc2atom"].model
  question = dataclasses.replace(docs[0].questions[0], fact_evidence=())
  limit = model.config.max_position_embeddings - QUESTION_RESERVE - new_tokens
  # The oracle answers as doc2atom, minus routing; the capacity oracle is fitted per batch of questions.
  timed = [m for m in methods if m != "doc2atom_oracle" and m not in CAPACITY]
  internalize, answer = {}, {}
  measured = sorted({int(t) for t in lengths if 0 < int(t) <= limit})
  print(f"eval: timing {', '.join(timed)} at {', '.join(map(str, measured))} document tokens "
        f"({repeats} repetitions after a warm-up)", flush=True)
  for length in measured:
    text = costs_lib.text_of_length(model, [d.text for d in docs], length)
    run = DocumentRun(EvalDocument("costs", f"costs-{length}", text, (question,)), systems,
                      code_dtype=settings.code_dtype, trunc_tokens=settings.trunc_tokens, key_dtype=settings.key_dtype)
    by_system: dict[str, float] = {}
    internalize[length] = {}
    for method in timed:
      fn = _internalize_fn(run, method, settings.trunc_tokens)
      key = method if method.startswith("in_context") else system_of(method)
      if fn is not None:
        if key not in by_system:
          by_system[key] = costs_lib.median_seconds(fn, repeats)
        internalize[length][method] = by_system[key]
    answer[length] = {m: costs_lib.median_seconds(_answer_fn(run, m, new_tokens), repeats) for m in timed}
    # For reference (printed, not a report key): in-context answers with the whole prompt prefilled per question.
    whole = {m: costs_lib.median_seconds(_answer_fn(run, m, new_tokens, reuse_prefix=False), repeats)
             for m in timed if m in IN_CONTEXT}
    print(f"costs at {length} document tokens: answer " + ", ".join(
        f"{m} {s * 1000:.0f} ms" for m, s in answer[length].items()) + "".join(
        f"; {m} with the prompt prefilled per question {s * 1000:.0f} ms" for m, s in whole.items()), flush=True)
  return costs_lib.assemble(bytes_per_document(methods, systems, stats, settings), internalize, answer)


# ---------------------------------------------------------------------------------------------------------
# mode=eval.
# ---------------------------------------------------------------------------------------------------------
def parse_exports(entries: Sequence[str]) -> dict[str, str]:
  """("d2l=runs/d2l/export", ...) -> {"d2l": "runs/d2l/export"}."""
  exports = {}
  for entry in entries:
    method, sep, path = entry.partition("=")
    if not sep or not path.strip():
      raise UserError(f"eval.exports entry {entry!r} must be method=path, e.g. d2l=runs/d2l/export")
    if method not in TRAINED_ELSEWHERE:
      raise UserError(f"eval.exports entry {entry!r}: {method!r} is not a separately trained method; valid: "
                      f"{', '.join(TRAINED_ELSEWHERE)} (doc2atom's export is --config.params)")
    if method in exports:
      raise UserError(f"eval.exports names {method!r} twice")
    exports[method] = path.strip()
  return exports


def resolve_methods(requested: Sequence[str], exports: Mapping[str, str], capacity_steps: int = 0) -> tuple[str, ...]:
  """The methods to run, in METHODS order: the requested ones (checked), or every one that can run (the
  capacity oracle's where `capacity_steps` > 0)."""
  unknown = [m for m in requested if m not in METHODS]
  if unknown:
    raise UserError(f"unknown eval method(s) {', '.join(map(repr, unknown))}; valid: {', '.join(METHODS)}")
  if capacity_steps <= 0 and any(m in CAPACITY for m in requested):
    raise UserError("the capacity oracle fits its adapters with Adam: set --config.eval.capacity_steps (e.g. 30)")
  wanted = set(requested) or {m for m in METHODS if (m not in TRAINED_ELSEWHERE or m in exports)
                              and (m not in CAPACITY or capacity_steps > 0)}
  missing = [m for m in TRAINED_ELSEWHERE if m in wanted and m not in exports]
  if missing:
    raise UserError(f"method {missing[0]} is trained separately: give its export, e.g. "
                    f"--config.eval.exports='(\"{missing[0]}=runs/{missing[0]}/export\",)'")
  return tuple(m for m in METHODS if m in wanted)


def _coverage_section(coverage: Mapping[str, Coverage], settings: Settings, limit: int, wall_seconds: float) -> str:
  rows = [[name, str(c.documents), str(c.questions), str(c.skipped_long), f"{c.seconds:.1f}", c.note]
          for name, c in coverage.items()]
  header = "| dataset | documents | questions | skipped: too long | seconds | note |\n|---|---|---|---|---|---|\n"
  return ("\n## Coverage\n\n"
          f"Documents over {limit} tokens (eval.max_doc_tokens = {settings.max_doc_tokens}, and room for the "
          f"question and answer in the context) are skipped, not cut; in_context_trunc cuts each document to its "
          f"first {settings.trunc_tokens} tokens. Answers: greedy, at most {settings.max_new_tokens} new tokens. "
          f"Wall time of the whole evaluation: {wall_seconds:.0f} s.\n\n"
          + header + "".join("| " + " | ".join(r) + " |\n" for r in rows))


def run(config, workdir: pathlib.Path | None) -> pathlib.Path:
  """mode=eval: the configured methods on the configured datasets -> the report folder (default
  <workdir>/eval): report.md, results.json and the plots."""
  from doc2atom_jax.eval import report as report_lib  # pylint: disable=import-outside-toplevel

  start = time.perf_counter()
  e = config.eval
  exports = parse_exports(e.exports)
  methods = resolve_methods(e.methods, exports, e.capacity_steps)
  if e.output:
    output = pathlib.Path(e.output)
  elif workdir is not None:
    output = workdir / "eval"
  else:
    raise UserError("set --workdir (the report goes to <workdir>/eval) or --config.eval.output")
  fileio.writable_dir(output, "the evaluation's output folder")  # before the model loads
  settings = Settings(max_new_tokens=e.max_new_tokens, max_doc_tokens=e.max_doc_tokens, trunc_tokens=e.trunc_tokens,
                      batch_size=e.batch_size, code_dtype=config.atoms.code_dtype,
                      key_dtype=config.atoms.get("key_dtype", "float32"),
                      capacity_steps=e.capacity_steps, capacity_rank=e.capacity_rank,
                      capacity_doc_rank=e.capacity_doc_rank, capacity_learning_rate=e.capacity_learning_rate)
  # A scanned layer stack compiles ~6x faster than the unrolled loop and runs as fast (SmolLM2, 2 CPU cores):
  # an evaluation compiles a few dozen shapes, so that is most of a cold run's time.
  print(f"eval: loading {config.model.name} and the systems of {', '.join(methods)}", flush=True)
  model = system_lib.load_model(config, scan_layers=e.scan_layers)
  main = system_lib.build_system(config, model=model)
  if not config.params:
    print("note: no --config.params: doc2atom's compiler and router are untrained (initialized)")
  systems = {"doc2atom": main, **{m: system_lib.trained_system(config, m, p, main.model) for m, p in exports.items()
                                  if m in methods}}
  trained = system_lib.export_meta(config.params) if config.params else {}
  datasets, coverage = load_datasets(
      tuple(e.datasets) or default_datasets(), main.model, settings, max_questions=e.max_questions,
      synthetic_documents=e.synthetic_documents, facts_per_document=tuple(e.facts_per_document),
      questions_per_document=config.data.questions_per_document, seed=config.seed, run=trained.get("run"),
      trained_steps=int(trained.get("step") or 0))
  if not any(datasets.values()):
    raise UserError("no document to evaluate: every dataset is empty or all its documents are over "
                    f"eval.max_doc_tokens={e.max_doc_tokens}")
  print("eval: " + ", ".join(f"{name} {len(docs)} documents" for name, docs in datasets.items())
        + f"; {len(methods)} methods each", flush=True)
  records, stats = evaluate(systems, datasets, methods, settings, coverage)
  costs = measure_costs(systems, methods, datasets, stats, settings, lengths=tuple(e.latency_lengths),
                        repeats=e.cost_repeats, new_tokens=e.cost_new_tokens)
  meta = {"methods": list(methods), "params": config.params, "exports": exports, "documents": stats,
          "coverage": {k: dataclasses.asdict(v) for k, v in coverage.items()},
          "wall_seconds": time.perf_counter() - start}
  print(f"eval: writing the report to {output}", flush=True)
  report_lib.write_report(output, records, config=config.to_dict(), costs=costs, meta=meta)
  wall = time.perf_counter() - start
  report_md = output / "report.md"
  fileio.atomic_write_text(report_md, fileio.read_text(report_md) + _coverage_section(
      coverage, settings, document_limit(main.model, settings), wall))
  print(f"eval: {len(records)} records ({', '.join(methods)}) in {wall:.0f} s -> {report_md}")
  return output
