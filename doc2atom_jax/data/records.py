"""The training records every data source produces: a split document with its questions. They live with the
data (the readers build them, `train/batch.py` turns them into arrays) so that data/ never imports train/."""

import dataclasses

from doc2atom_jax.atoms import atomize


@dataclasses.dataclass(frozen=True)
class TrainQuestion:
  """A question as training sees it: its gold (or self-generated) answer and evidence atoms."""
  qid: str
  question: str
  answer: str
  evidence: tuple[int, ...] | None = None  # atom indices; None = unlabelled
  out_of_scope: bool = False
  answer_prefix: str = ""  # the start of the assistant turn, prefilled for every method; the target follows it


@dataclasses.dataclass(frozen=True)
class TrainDocument:
  doc: atomize.AtomizedDocument
  questions: tuple[TrainQuestion, ...]
