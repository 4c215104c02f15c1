"""Evidence atoms: a unique normalized match labels a question, anything else leaves it unlabelled."""

import math

import pytest

from doc2atom_jax.atoms.atomize import Atom, atomize
from doc2atom_jax.data import qa
from doc2atom_jax.data.evidence import evidence_atom, label_coverage
from doc2atom_jax.models.tiny import byte_tokenizer


def _atoms(*texts):
  """Hand-built atoms laid end to end (token spans are not used by the matcher)."""
  atoms, start = [], 0
  for i, text in enumerate(texts):
    atoms.append(Atom("doc", i, text, "other", start, start + len(text), i, i + 1))
    start += len(text) + 1
  return atoms


ATOMS = _atoms("Zorvan was founded in 1907 by Ilsa Marr.", "The company moved to Vell in 1912.",
               "It employs 100 people.", "Its rival, Kettra, was founded in 1907 too.")


@pytest.mark.parametrize("answers, expected", [
    (["Ilsa Marr"], 0),
    (["ilsa marr."], 0),  # normalization: case and punctuation
    (["the Vell"], 1),  # normalization: articles
    (["1912", "in 1912"], 1),  # several references, one atom
    (["100"], 2),
    (["10"], None),  # "10" is not a word of "100"
    (["1907"], None),  # in two atoms: ambiguous
    (["Ilsa Marr", "Vell"], None),  # references in different atoms: ambiguous
    (["Berlin"], None),  # not in the text
    (["Vell in 1912 It employs"], None),  # spans two atoms
    ([], None),  # unanswerable
    (["unknown"], None),  # the synthetic out-of-scope answer, though "Unknown" could be in the text
    (["the", "."], None),  # normalizes to nothing
])
def test_evidence_atom_on_hand_built_atoms(answers, expected):
  assert evidence_atom(ATOMS, answers) == expected


def test_label_coverage_counts_answerable_examples_only():
  def example(answers):
    return qa.QAExample(id="q", dataset="toy", doc_id="doc", context="", question="?", answers=tuple(answers))

  pairs = [(example(["Ilsa Marr"]), ATOMS), (example(["1907"]), ATOMS), (example([]), ATOMS),
           (example(["unknown"]), ATOMS), (example(["100"]), ATOMS)]
  assert label_coverage(pairs) == pytest.approx(2 / 3)
  assert math.isnan(label_coverage([(example([]), ATOMS)]))


def test_label_coverage_on_real_samples():
  """Atomizes the first 20 examples of each bundled sample and prints the labelled fraction."""
  tok = byte_tokenizer()
  coverage = {}
  for name in qa.BUNDLED:
    atoms_of, pairs = {}, []
    for ex in qa.load_source(name, limit=20):
      key = (ex.doc_id, ex.context)
      if key not in atoms_of:
        # One byte per token: 16..192 bytes is about 4..48 BPE tokens, the atomizer's defaults.
        atoms_of[key] = atomize(ex.context, ex.doc_id, tok, min_atom_tokens=16, max_atom_tokens=192).atoms
      pairs.append((ex, atoms_of[key]))
    coverage[name] = label_coverage(pairs)
  print("\nevidence-label coverage, first 20 examples:", ", ".join(f"{k} {v:.2f}" for k, v in coverage.items()))
  assert coverage["squad"] > 0
  assert all(0 <= v <= 1 for v in coverage.values())
