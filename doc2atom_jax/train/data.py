"""Training data as a pure function of (seed, global step): which documents and questions each step sees.

Sources (`data.source`):
  * "tfds" (the default): the synthetic corpus is prepared once as a TFDS array_record dataset and read
    through `tfds.data_source`; step s takes the documents at positions s·D·P + p·D … of a seeded per-epoch
    permutation (grain's index shuffle), so a resumed run, or one on another number of processes, sees
    exactly the same global batches.
  * "generator": `SyntheticSource` generates the same documents directly by index (no dataset on disk), for
    tests and quick experiments.
  * "qa": real QA JSONL (`data.qa_files`) and Doc-to-LoRA's self-generated QA (`data.self_gen`), normalized
    into one JSONL, prepared with the LocalQAJsonl builder under a name derived from its content and read in
    the same order as "tfds". The rule-based atomizer makes the atoms; a question's evidence is the one atom
    holding its normalized answer, else it stays unlabelled (`pipeline.records_to_train_documents`).

`data.curriculum` switches synthetic corpora by step: stage i (from its start step on) reads documents of its
own facts range, each stage from its own prepared corpus (the range is part of the corpus name) or
generator, at the stage's local step, so which stage and which documents a step sees are pure functions of
the step. Held-out documents always use `data.facts_per_document`.
"""

import bisect
import dataclasses
import glob
import hashlib
import itertools
import json
import pathlib

import numpy as np

from doc2atom_jax import fileio, paths
from doc2atom_jax.data import qa, synthetic
from doc2atom_jax.errors import UserError
from doc2atom_jax.data import records

SOURCES = ("tfds", "generator", "qa")
ON_ERROR = ("raise", "skip")
SELF_GEN_SUFFIXES = (".parquet", ".jsonl", ".json")


@dataclasses.dataclass(frozen=True)
class SyntheticSource:
  seed: int = 0
  documents_per_step: int = 1
  facts_per_document: tuple[int, int] = (4, 8)
  questions_per_document: int = 8
  split: str = "train"
  paraphrases: tuple[int, ...] = (0, 1)  # phrasing 2 is kept for "seen facts, new paraphrase" evaluation
  process_index: int = 0  # documents_per_step is this process's share; the step's documents are
  process_count: int = 1  # (step · P + p) · D + j, as pipeline.document_indices orders them
  templates: str = "seen"  # "unseen": the held-out statement/question forms, for evaluation only (synthetic.TEMPLATES)

  def document(self, index: int) -> synthetic.SyntheticDocument:
    return synthetic.document(self.split, index, seed=self.seed, facts_per_document=self.facts_per_document,
                              questions_per_document=self.questions_per_document, paraphrase=self.paraphrases,
                              templates=self.templates)

  def __call__(self, step: int, tokenizer) -> list[records.TrainDocument]:
    start = (step * self.process_count + self.process_index) * self.documents_per_step
    return [to_train_document(self.document(start + j), tokenizer) for j in range(self.documents_per_step)]


def to_train_document(doc: synthetic.SyntheticDocument, tokenizer) -> records.TrainDocument:
  questions = tuple(records.TrainQuestion(q.qid, q.question, q.answer, tuple(q.evidence) or None,
                                          out_of_scope=q.kind == "out_of_scope", answer_prefix=q.answer_prefix)
                    for q in doc.questions)
  return records.TrainDocument(doc.atomized(tokenizer), questions)


def in_units(document: records.TrainDocument, split) -> records.TrainDocument:
  """The document in a method's own units, `split(text, doc_id)` (d2l: its chunks), each question's evidence
  carried to the units that overlap its evidence atoms.

  Training must compile the units that evaluation compiles: a d2l adapter is trained on its whole document
  (or 256-token chunk), not on one adapter per fact summed. The evidence teacher is keyed by question, not
  by its evidence text, so a batch of re-split documents must not ask for it (`batch.build(evidence_teacher=
  False)`; d2l has no atom-fidelity term).
  """
  doc = split(document.doc.text, document.doc.doc_id)

  def evidence(atoms):
    if atoms is None:
      return None
    spans = [(document.doc.atoms[i].char_start, document.doc.atoms[i].char_end) for i in atoms]
    overlapping = (j for j, u in enumerate(doc.atoms) if any(u.char_start < e and s < u.char_end for s, e in spans))
    return tuple(overlapping) or None

  return records.TrainDocument(doc, tuple(dataclasses.replace(q, evidence=evidence(q.evidence))
                                            for q in document.questions))


def method_units(documents: list[records.TrainDocument], method: str, split) -> list[records.TrainDocument]:
  """A step's documents in the units `method` compiles: d2l's chunks (`in_units`); doc2atom and d2l_atom train
  on the given atoms (the synthetic facts), whose evidence labels the router learns from."""
  return [in_units(d, split) for d in documents] if method == "d2l" else documents


def tfds_source(data_dir, *, seed: int, documents: int, documents_per_step: int, facts_per_document,
                questions_per_document: int, paraphrases=(0, 1), process_index: int = 0, process_count: int = 1):
  """step -> this process's TrainDocuments, read from the prepared TFDS synthetic corpus."""
  from doc2atom_jax.data import pipeline, tfds_builders  # local: tfds is slow to import

  config = tfds_builders.synthetic_config(train=documents, validation=0, test=0,
                                          facts_per_document=tuple(facts_per_document),
                                          questions_per_document=questions_per_document, seed=seed,
                                          paraphrase=tuple(paraphrases))
  builder = tfds_builders.prepare_synthetic(pathlib.Path(data_dir), config)
  records_for_step = pipeline.training_documents(pipeline.document_source(builder, "train"), seed=seed,
                                                 documents_per_step=documents_per_step,
                                                 process_index=process_index, process_count=process_count)
  return lambda step, tokenizer: pipeline.records_to_train_documents(records_for_step(step), tokenizer)


# --------------------------------------------------------------------------------------------------------
# Curriculum: the facts range by step.


def curriculum_stages(curriculum) -> tuple[tuple[int, tuple[int, int]], ...]:
  """`((start_step, (min_facts, max_facts)), ...)` validated: starts rising from 0, 2 <= min <= max."""
  stages = []
  for i, stage in enumerate(curriculum):
    try:
      start, (lo, hi) = stage
    except (TypeError, ValueError):
      raise UserError(f"data.curriculum stage {i} must be (start_step, (min_facts, max_facts)) (got "
                      f"{stage!r})") from None
    if not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in (start, lo, hi)):
      raise UserError(f"data.curriculum stage {i}: steps and fact counts must be integers (got {stage!r})")
    if not 2 <= lo <= hi:
      raise UserError(f"data.curriculum stage {i}: needs 2 <= min_facts <= max_facts (got ({lo}, {hi}))")
    stages.append((int(start), (int(lo), int(hi))))
  if stages and stages[0][0] != 0:
    raise UserError(f"data.curriculum must start at step 0 (its first stage starts at {stages[0][0]})")
  for (a, _), (b, _) in itertools.pairwise(stages):
    if b <= a:
      raise UserError(f"data.curriculum stages must start at increasing steps (got {a} then {b})")
  return tuple(stages)


def stage_index(stages, step: int) -> int:
  """The stage that global step `step` trains in: the last one starting at or before it."""
  if step < 0:
    raise UserError(f"the step must be non-negative (got {step})")
  return bisect.bisect_right([start for start, _ in stages], step) - 1


def staged_source(stages, source_for_range):
  """step -> documents of the step's stage, at the stage's local step (each stage starts its own order)."""
  sources = [source_for_range(facts) for _, facts in stages]

  def documents_for_step(step: int, tokenizer) -> list[records.TrainDocument]:
    i = stage_index(stages, step)
    return sources[i](step - stages[i][0], tokenizer)

  return documents_for_step


# --------------------------------------------------------------------------------------------------------
# Real QA: JSONL files, named sources and self-generated data through the LocalQAJsonl builder.


def _expand(pattern: str, field: str) -> list[str]:
  """A glob pattern -> its files (sorted; none is an error); a plain path stays itself."""
  if not any(c in pattern for c in "*?["):
    return [pattern]
  found = sorted(glob.glob(str(pathlib.Path(pattern).expanduser())))
  if not found:
    raise UserError(f"{field}: no file matches {pattern!r}")
  return found


def _jsonl_paths(entry: str) -> list[pathlib.Path] | None:
  """The JSONL files behind a qa_files entry (a path or glob, local:<path>, a bundled sample), else None."""
  if entry.startswith("local:") or entry.endswith(".jsonl"):
    return [pathlib.Path(p) for p in _expand(entry.removeprefix("local:"), "data.qa_files")]
  name, _, split = entry.partition("@")
  if name in qa.BUNDLED:
    path = qa.qa_dir() / f"{name}.{split or qa.BUNDLED_SPLIT}.jsonl"
    return [path] if path.is_file() else None  # None: load_source says which splits exist
  return None


def _self_gen_files(entry: str) -> list[pathlib.Path]:
  path = pathlib.Path(entry).expanduser()
  if path.is_dir():
    files = sorted(p for p in path.iterdir() if p.suffix in SELF_GEN_SUFFIXES)
    if not files:
      raise UserError(f"data.self_gen: no {'/'.join(SELF_GEN_SUFFIXES)} file in {path}")
    return files
  if not path.is_file():
    raise UserError(f"data.self_gen: file not found: {path}")
  return [path]


def qa_examples(qa_files=(), self_gen=(), *, on_error: str = "raise", tokenizer=None) -> list[qa.QAExample]:
  """The examples of every qa_files entry, then of every self_gen file, in the order given.

  qa_files entries: a JSONL path (or `local:<path>`, or a glob), a bundled sample name, or a remote name
  of `qa.load_source`, with an optional `@split` (`squad@dev`, `tfds:squad/v1.1@train`). `on_error` applies
  to JSONL lines ("skip" prints one line with the skipped count per file); self_gen files (`qa.read_self_gen`:
  files, folders of them, globs) and remote records always raise. `tokenizer` decodes tokenized self_gen.
  """
  if on_error not in ON_ERROR:
    raise UserError(f"data.on_error must be one of {', '.join(ON_ERROR)} (got {on_error!r})")
  qa_files, self_gen = ((x,) if isinstance(x, str) else tuple(x) for x in (qa_files, self_gen))
  examples, skipped = [], {}
  for entry in qa_files:
    files = _jsonl_paths(entry)
    if files is None:  # a remote source (or a bundled name without that split: load_source explains)
      name, _, split = entry.partition("@")
      examples += qa.load_source(name, split=split or None)
      continue
    for path in files:
      read, stats = qa.read_jsonl_stats(path, on_error=on_error)
      examples += read
      skipped[str(path)] = stats
  for entry in (e for pattern in self_gen for e in _expand(pattern, "data.self_gen")):
    for path in _self_gen_files(entry):
      examples += qa.read_self_gen(path, tokenizer=tokenizer)
  if on_error == "skip" and skipped:
    first = next((s.errors[0] for s in skipped.values() if s.errors), None)
    print("data.on_error='skip': malformed QA lines skipped per file: "
          + ", ".join(f"{path}: {s.skipped} (kept {s.read})" for path, s in skipped.items())
          + (f"; first: {first}" if first else ""))
  if not examples:
    raise UserError("data.source='qa' found no QA examples: set data.qa_files and/or data.self_gen")
  return examples


def _record(example: qa.QAExample) -> dict:
  """A QA JSONL line without evidence: the reader atomizes, so stored atom indices would not apply."""
  record = {k: getattr(example, k) for k in ("id", "dataset", "doc_id", "context", "question")}
  record["answers"] = list(example.answers)
  if example.kind is not None:
    record["kind"] = example.kind
  if example.answer_prefix:
    record["answer_prefix"] = example.answer_prefix
  return record


def prepare_qa(data_dir, examples):
  """Examples -> a prepared LocalQAJsonl builder (split "train") named after a digest of their JSONL.

  The same examples reuse the prepared folder; other examples never collide with it.
  """
  from doc2atom_jax.data import tfds_builders  # local: tfds is slow to import

  text = "".join(json.dumps(_record(ex), ensure_ascii=False) + "\n" for ex in examples)
  digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
  manual_dir = pathlib.Path(data_dir) / "qa_jsonl" / digest
  if not (manual_dir / "train.jsonl").is_file():
    fileio.atomic_write_text(manual_dir / "train.jsonl", text)
  return tfds_builders.prepare_local_qa(data_dir, manual_dir, files={"train": "train.jsonl"}, name=f"qa_{digest}")


def sample_questions(record: dict, count: int, *, seed: int, step: int, slot: int) -> dict:
  """At most `count` of a record's questions (in document order), drawn from (seed, step, slot).

  Real documents have any number of questions; the step's compiled shape allows `count` per document.
  """
  questions = record["questions"]
  if len(questions) <= count:
    return record
  rng = np.random.default_rng([seed, step, slot])
  keep = sorted(rng.choice(len(questions), size=count, replace=False).tolist())
  return {**record, "questions": [questions[i] for i in keep]}


def qa_source(data_dir, *, seed: int, qa_files=(), self_gen=(), on_error: str = "raise", documents_per_step: int,
              questions_per_document: int, tokenizer=None, process_index: int = 0, process_count: int = 1):
  """step -> this process's TrainDocuments of real QA, in the order of `pipeline.training_documents`."""
  from doc2atom_jax.data import pipeline  # local: tfds is slow to import

  examples = qa_examples(qa_files, self_gen, on_error=on_error, tokenizer=tokenizer)
  builder = prepare_qa(data_dir, examples)
  records_for_step = pipeline.training_documents(pipeline.document_source(builder, "train"), seed=seed,
                                                 documents_per_step=documents_per_step,
                                                 process_index=process_index, process_count=process_count)

  def documents_for_step(step: int, tokenizer) -> list[records.TrainDocument]:
    # slot: the document's place in the global step, so the sample does not depend on the process count
    first = process_index * documents_per_step
    records = [sample_questions(r, questions_per_document, seed=seed, step=step, slot=first + j)
               for j, r in enumerate(records_for_step(step))]
    return pipeline.records_to_train_documents(records, tokenizer)

  return documents_for_step


# --------------------------------------------------------------------------------------------------------
# From the config.


def documents_per_process(documents_per_step: int, process_count: int) -> int:
  """Each process's share of a step's documents: every process must build as many (one global batch)."""
  if documents_per_step % process_count:
    raise UserError(f"data.documents_per_step={documents_per_step} does not split over {process_count} processes: "
                    "each process builds an equal share of every step's documents. Use a multiple of "
                    f"{process_count} (a run, and its checkpoints, move to any process count that divides it)")
  return documents_per_step // process_count


def source_from_config(config, tokenizer=None, *, process_index: int = 0, process_count: int = 1):
  """The `data` section of a config -> `documents_for_step(step, tokenizer)` for the trainer.

  `tokenizer` is needed only to decode tokenized self-generated records at preparation time. On P processes,
  process p gets its share p of each step's `data.documents_per_step` documents (the default, one process, gets
  them all): the global batch, like the data order, depends on the seed and the step only.
  """
  d = config.data
  if d.source not in SOURCES:
    raise UserError(f"unknown data.source {d.source!r}; valid: {', '.join(SOURCES)}")
  if d.on_error not in ON_ERROR:
    raise UserError(f"data.on_error must be one of {', '.join(ON_ERROR)} (got {d.on_error!r})")
  per_process = documents_per_process(d.documents_per_step, process_count)
  layout = {"documents_per_step": per_process, "process_index": process_index, "process_count": process_count}
  data_dir = pathlib.Path(d.data_dir) if d.data_dir else paths.cache_root() / "tfds"
  if d.source == "qa":
    if d.curriculum:
      raise UserError("data.curriculum needs synthetic data (data.source tfds or generator), not 'qa'")
    return qa_source(data_dir, seed=config.seed, qa_files=d.qa_files, self_gen=d.self_gen, on_error=d.on_error,
                     questions_per_document=d.questions_per_document, tokenizer=tokenizer, **layout)

  def synthetic_source(facts):
    if d.source == "generator":
      return SyntheticSource(seed=config.seed, facts_per_document=tuple(facts),
                             questions_per_document=d.questions_per_document, **layout)
    return tfds_source(data_dir, seed=config.seed, documents=d.train_documents, facts_per_document=tuple(facts),
                       questions_per_document=d.questions_per_document, paraphrases=SyntheticSource.paraphrases,
                       **layout)

  stages = curriculum_stages(d.curriculum)
  return staged_source(stages, synthetic_source) if stages else synthetic_source(d.facts_per_document)


CALIBRATION_START = 10_000  # validation indices from here calibrate (abstention); held-out ones start at 0
ROUTE_PRETRAIN_START = 1_000_000  # train-split indices from here feed routing pre-training, not the end-to-end run


def heldout_documents(config, count: int, start: int = 0, templates: str = "seen") -> list[synthetic.SyntheticDocument]:
  """`count` validation-split documents of the config's synthetic worlds (disjoint from train) from index
  `start`: 0 for the held-out evaluation, CALIBRATION_START for calibration (never the same worlds);
  templates="unseen" writes them with the statement and question forms training never sees."""
  source = SyntheticSource(seed=config.seed, facts_per_document=tuple(config.data.facts_per_document),
                           questions_per_document=config.data.questions_per_document, split="validation",
                           templates=templates)
  return [source.document(start + i) for i in range(count)]
