"""Training documents from a prepared TFDS corpus, in an order that is a pure function of (seed, step).

DESIGN §6-§7: the order of documents is an epoch-wise shuffled permutation of the split, epoch e drawn from
(seed, e) by grain's stateless index shuffle (`MapDataset.shuffle(seed).repeat()`: epoch e uses seed + e).
Global step s takes positions s·D·P … s·D·P + D·P − 1 of that order, and process p of P reads its D of
them at s·D·P + p·D, so the global batch of a step is the same for any process count, and resuming at step
s needs no iterator state (`training_documents`).

`train_dataset` is the same order as a grain `MapDataset` (shuffle, map to `TrainDocument`, batch,
per-process slice) for prefetching in threads; its iterator's `get_state` / `set_state` skip recomputing
the position only while the layout (seed, D, P, p, start step) is unchanged, otherwise restart it from the
step. Per-process splits with `tfds.split_for_jax_process` suit evaluation (`document_source(name,
tfds.split_for_jax_process("validation"))`), not training: their shards change with the process count.
"""

import functools
from collections.abc import Callable, Mapping, Sequence

import grain
import tensorflow_datasets as tfds

from doc2atom_jax.atoms import atomize
from doc2atom_jax.data import evidence as evidence_lib
from doc2atom_jax.data import synthetic, tfds_builders
from doc2atom_jax.errors import UserError
from doc2atom_jax.data import answers as answers_lib
from doc2atom_jax.data import records as records_lib

# Small by default: elements are tokenized documents, and a training step consumes one at a time.
DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


class DocumentSource:
  """Decoded document records (`tfds_builders.decode`) of one split: random access, as grain wants."""

  def __init__(self, data_source: Sequence):
    self._data = data_source

  def __len__(self) -> int:
    return len(self._data)

  def __getitem__(self, index: int) -> dict:
    return tfds_builders.decode(self._data[index])

  def __repr__(self) -> str:
    return f"DocumentSource({self._data!r})"


def document_source(dataset, split="train", *, data_dir=None) -> DocumentSource:
  """One split of a prepared dataset: a builder, or a name such as "synthetic_fact_worlds/<config>".

  Reads only (`download=False`): prepare first with `tfds_builders.prepare_*`.
  """
  if isinstance(dataset, tfds.core.DatasetBuilder):
    return DocumentSource(dataset.as_data_source(split=split))
  try:
    data = tfds.data_source(dataset, split=split, data_dir=None if data_dir is None else str(data_dir),
                            download=False)
  except Exception as e:  # a missing name, config, split or folder: say what to do, keep the cause
    where = data_dir or "the default data_dir"
    raise UserError(f"cannot read TFDS dataset {dataset!r} split {split!r} from {where} ({type(e).__name__}: "
                    f"{e}); prepare it first (doc2atom_jax.data.tfds_builders)") from e
  return DocumentSource(data)


# --------------------------------------------------------------------------------------------------------
# The order: a pure function of (seed, global step).


def _check_layout(num_documents: int, seed: int, documents_per_step: int, process_index: int,
                  process_count: int) -> None:
  if num_documents < 1:
    raise UserError("the training split has no documents")
  if not 0 <= seed < 2**32:
    raise UserError(f"the data seed must be in [0, 2**32) (got {seed})")
  if documents_per_step < 1:
    raise UserError(f"documents_per_step must be at least 1 (got {documents_per_step})")
  if not 0 <= process_index < process_count:
    raise UserError(f"process_index must be in [0, process_count={process_count}) (got {process_index})")


def _order(num_documents: int, seed: int) -> grain.MapDataset:
  """Position -> document index: epoch e is a permutation drawn from (seed, e), random access."""
  return grain.MapDataset.range(num_documents).shuffle(seed).repeat()


def _start(step: int, documents_per_step: int, process_index: int, process_count: int) -> int:
  if step < 0:
    raise UserError(f"the step must be non-negative (got {step})")
  return (step * process_count + process_index) * documents_per_step


def document_indices(step: int, *, num_documents: int, seed: int, documents_per_step: int,
                     process_index: int = 0, process_count: int = 1) -> list[int]:
  """The document indices process `process_index` trains on at global step `step`."""
  _check_layout(num_documents, seed, documents_per_step, process_index, process_count)
  order, start = _order(num_documents, seed), _start(step, documents_per_step, process_index, process_count)
  return [order[start + j] for j in range(documents_per_step)]


def training_documents(source: Sequence, *, seed: int, documents_per_step: int, process_index: int = 0,
                       process_count: int = 1) -> Callable[[int], list[dict]]:
  """step -> this process's document records of global step `step` (no state: resume anywhere)."""
  _check_layout(len(source), seed, documents_per_step, process_index, process_count)
  order = _order(len(source), seed)

  def documents(step: int) -> list[dict]:
    start = _start(step, documents_per_step, process_index, process_count)
    return [source[order[start + j]] for j in range(documents_per_step)]

  return documents


# --------------------------------------------------------------------------------------------------------
# The same order as a grain pipeline.


def train_dataset(source: Sequence, *, seed: int, documents_per_step: int, process_index: int = 0,
                  process_count: int = 1, tokenizer=None) -> grain.MapDataset:
  """Element s = this process's documents of global step s: `TrainDocument`s, or records if no tokenizer."""
  _check_layout(len(source), seed, documents_per_step, process_index, process_count)
  ds = grain.MapDataset.source(source).shuffle(seed).repeat()
  if tokenizer is not None:
    ds = ds.map(functools.partial(record_to_train_document, tokenizer=tokenizer))
  return ds.batch(documents_per_step, batch_fn=list)[process_index::process_count]


def train_iterator(dataset: grain.MapDataset, *, start_step: int = 0,
                   read_options: grain.ReadOptions | None = None) -> grain.DatasetIterator:
  """A prefetching iterator from `start_step`; its state is valid for the same dataset and start_step."""
  if start_step < 0:
    raise UserError(f"the start step must be non-negative (got {start_step})")
  return iter(dataset[start_step:].to_iter_dataset(read_options or DEFAULT_READ_OPTIONS))


# --------------------------------------------------------------------------------------------------------
# Records -> TrainDocument.


def _evidence(question: Mapping, atoms: Sequence[atomize.Atom], given: bool) -> tuple[int, ...] | None:
  """Stored indices when the atoms were given with them, else the one atom holding the answer (or None).

  Without given atoms, stored indices would point into an unknown atomization, so they are recomputed.
  """
  stored = question.get("evidence")
  if not given or stored is None:
    i = evidence_lib.evidence_atom(atoms, question.get("answers") or [])
    return None if i is None else (i,)
  if any(not 0 <= i < len(atoms) for i in stored):
    raise UserError(f"question {question['id']!r}: evidence {stored} outside the document's {len(atoms)} atoms")
  return tuple(stored) or None  # out-of-scope questions have no evidence: unlabelled


def _question(question: Mapping, atoms: Sequence[atomize.Atom], given: bool) -> records_lib.TrainQuestion:
  """The first reference is the target; out-of-scope from `kind`, else from having no real answer. Records
  prepared before answer prefixes existed have none ("")."""
  answers = list(question.get("answers") or [])
  kind = question.get("kind")
  out_of_scope = kind == "out_of_scope" if kind is not None else answers_lib.is_unanswerable(answers)
  answer = answers[0] if answers else synthetic.UNKNOWN
  return records_lib.TrainQuestion(question["id"], question["question"], answer, _evidence(question, atoms, given),
                                   out_of_scope=out_of_scope, answer_prefix=question.get("answer_prefix") or "")


def record_to_train_document(record: Mapping, tokenizer) -> records_lib.TrainDocument:
  """A decoded record -> TrainDocument: given fact spans are the atoms, else the rule-based atomizer's."""
  given = bool(record["fact_spans"])
  if given:
    doc = atomize.atomize_given(record["text"], record["doc_id"], tokenizer, record["fact_spans"],
                                record["fact_types"] or None)
  else:
    doc = atomize.atomize(record["text"], record["doc_id"], tokenizer)
  questions = tuple(_question(q, doc.atoms, given) for q in record["questions"])
  return records_lib.TrainDocument(doc, questions)


def records_to_train_documents(records: Sequence[Mapping], tokenizer) -> list[records_lib.TrainDocument]:
  """Decoded records (`training_documents(step)`) -> the trainer's documents."""
  return [record_to_train_document(r, tokenizer) for r in records]
