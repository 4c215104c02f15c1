"""Training data as a pure function of (seed, global step): which documents and questions each step sees.

Step s takes synthetic documents s·D … s·D + D − 1 of the train split (random access: nothing before them is
generated), so a resumed or re-sharded run sees exactly the same batches. (The TFDS array_record + grain
path of DESIGN §6 will feed the same function signature.)
"""

import dataclasses

from doc2atom_jax.data import synthetic
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
