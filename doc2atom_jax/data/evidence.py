"""Evidence atoms for real QA (DESIGN §6): the one atom that holds the answer, or no label at all.

Real benchmarks give no fact ids, and not every answer is a span (DROP numbers, ROPES choices, yes/no,
Qasper free text). A question gets an evidence atom only when exactly one atom contains a reference answer
after SQuAD normalization; otherwise it stays unlabelled, and routing losses and routing metrics leave it
out rather than learn from a guess.
"""

import math
from collections.abc import Iterable, Sequence

from doc2atom_jax.atoms.atomize import Atom
from doc2atom_jax.data.qa import QAExample
from doc2atom_jax.data.answers import is_unanswerable, normalize_answer


def _contains(haystack: str, needle: str) -> bool:
  """Whether normalized `needle` occurs in normalized `haystack` on word boundaries ("10" is not in "100")."""
  return f" {needle} " in f" {haystack} "


def evidence_atom(atoms: Sequence[Atom], answers: Sequence[str]) -> int | None:
  """The position in `atoms` of the only atom containing a reference answer, else None.

  None when the question is unanswerable (no answers, or only refusals like "unknown"), when no atom
  matches (an answer split across atoms or not in the text) or when several do (a repeated answer: the
  evidence is ambiguous). For `AtomizedDocument.atoms` the position is `Atom.index`. Answers that
  normalize to nothing ("the", ".") match nothing.
  """
  if is_unanswerable(answers):
    return None
  needles = [n for n in (normalize_answer(a) for a in answers) if n]
  if not needles:
    return None
  texts = (normalize_answer(atom.text) for atom in atoms)
  matches = [i for i, text in enumerate(texts) if any(_contains(text, n) for n in needles)]
  return matches[0] if len(matches) == 1 else None


def label_coverage(examples_with_atoms: Iterable[tuple[QAExample, Sequence[Atom]]]) -> float:
  """Fraction of answerable examples that get an evidence atom; NaN when there are none.

  Unanswerable examples are left out: they route to the null atom, not to evidence.
  """
  answerable = labelled = 0
  for example, atoms in examples_with_atoms:
    if example.answerable:
      answerable += 1
      labelled += evidence_atom(atoms, example.answers) is not None
  return labelled / answerable if answerable else math.nan
