"""Training data as a pure function of (seed, global step): which documents and questions each step sees.

`tfds_source` (the default): the synthetic corpus is prepared once as a TFDS array_record dataset and read
through `tfds.data_source`; step s takes the documents at positions s·D·P + p·D … of a seeded per-epoch
permutation (grain's index shuffle), so a resumed run, or one on another number of processes, sees exactly
the same global batches. `SyntheticSource` generates the same documents directly by index (no dataset on
disk), for tests and quick experiments.
"""

import dataclasses
import pathlib

from doc2atom_jax import paths
from doc2atom_jax.data import synthetic
from doc2atom_jax.errors import UserError
from doc2atom_jax.train import batch as batch_lib


@dataclasses.dataclass(frozen=True)
class SyntheticSource:
  seed: int = 0
  documents_per_step: int = 1
  facts_per_document: tuple[int, int] = (4, 8)
  questions_per_document: int = 8
  split: str = "train"
  paraphrases: tuple[int, ...] = (0, 1)  # phrasing 2 is kept for "seen facts, new paraphrase" evaluation

  def document(self, index: int) -> synthetic.SyntheticDocument:
    return synthetic.document(self.split, index, seed=self.seed, facts_per_document=self.facts_per_document,
                              questions_per_document=self.questions_per_document, paraphrase=self.paraphrases)

  def __call__(self, step: int, tokenizer) -> list[batch_lib.TrainDocument]:
    return [to_train_document(self.document(step * self.documents_per_step + j), tokenizer)
            for j in range(self.documents_per_step)]


def to_train_document(doc: synthetic.SyntheticDocument, tokenizer) -> batch_lib.TrainDocument:
  questions = tuple(batch_lib.Question(q.qid, q.question, q.answer, tuple(q.evidence) or None,
                                       out_of_scope=q.kind == "out_of_scope") for q in doc.questions)
  return batch_lib.TrainDocument(doc.atomized(tokenizer), questions)


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


def source_from_config(config):
  """The `data` section of a config -> `documents_for_step(step, tokenizer)` for the trainer."""
  d = config.data
  source = SyntheticSource(seed=config.seed, documents_per_step=d.documents_per_step,
                           facts_per_document=tuple(d.facts_per_document),
                           questions_per_document=d.questions_per_document)
  if d.source == "tfds":
    data_dir = pathlib.Path(d.data_dir) if d.data_dir else paths.cache_root() / "tfds"
    return tfds_source(data_dir, seed=config.seed, documents=d.train_documents,
                       documents_per_step=d.documents_per_step, facts_per_document=d.facts_per_document,
                       questions_per_document=d.questions_per_document, paraphrases=source.paraphrases)
  if d.source == "generator":
    return source
  raise UserError(f"unknown data.source {d.source!r}; valid: tfds, generator")


def heldout_documents(config, count: int) -> list[synthetic.SyntheticDocument]:
  """The first `count` validation-split documents of the config's synthetic worlds (disjoint from train)."""
  source = SyntheticSource(seed=config.seed, facts_per_document=tuple(config.data.facts_per_document),
                           questions_per_document=config.data.questions_per_document, split="validation")
  return [source.document(i) for i in range(count)]
