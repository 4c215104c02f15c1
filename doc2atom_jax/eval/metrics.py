"""Answer metrics (DESIGN §8): SQuAD-normalized EM and token F1, ROUGE-L, and refusal detection.

Every metric takes the best score over the references, as the official SQuAD script does. A question is
unanswerable when its references are empty (SQuAD v2 `answers: []`) or all refusals themselves (the
synthetic corpus's out-of-scope answer "unknown"): there the only right answer is to decline, so a
prediction scores 1 exactly when `is_refusal` holds. That differs from the official SQuAD v2 script only in
also accepting refusal phrases, not just "", because chat models answer in words.
"""

import collections
from collections.abc import Sequence

# The answer-text rules, re-exported: the metrics' vocabulary (`data/answers.py` owns them).
from doc2atom_jax.data.answers import (REFUSAL_ANSWERS, REFUSAL_PHRASES, is_refusal,  # noqa: F401
                                      is_unanswerable, normalize_answer)


def _tokens(s: str) -> list[str]:
  return normalize_answer(s).split()


def _best(prediction: str, references: Sequence[str], score) -> float:
  """max over references of `score(prediction, reference)`; for unanswerables, whether it refused."""
  if isinstance(references, str):
    raise TypeError("references must be a sequence of strings, not one string")
  if is_unanswerable(references):
    return float(is_refusal(prediction))
  return max(float(score(prediction, ref)) for ref in references)


def exact_match(prediction: str, references: Sequence[str]) -> float:
  """1.0 when the normalized prediction equals a normalized reference."""
  return _best(prediction, references, lambda p, r: normalize_answer(p) == normalize_answer(r))


def _token_f1(prediction: str, reference: str) -> float:
  pred, ref = _tokens(prediction), _tokens(reference)
  if not pred or not ref:  # as in the official script: both empty is a match, one empty is not
    return float(pred == ref)
  same = sum((collections.Counter(pred) & collections.Counter(ref)).values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred), same / len(ref)
  return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, references: Sequence[str]) -> float:
  """Bag-of-tokens F1 between normalized prediction and reference, best over references."""
  return _best(prediction, references, _token_f1)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
  """Length of the longest common subsequence, in O(len(a) * len(b)) time and O(len(b)) memory."""
  row = [0] * (len(b) + 1)  # row[j]: LCS of the prefix of `a` seen so far and b[:j]
  for x in a:
    diagonal = 0  # the previous row's row[j - 1]
    for j, y in enumerate(b, 1):
      above = row[j]
      row[j] = diagonal + 1 if x == y else max(above, row[j - 1])
      diagonal = above
  return row[-1]


def _rouge_l(prediction: str, reference: str) -> float:
  pred, ref = _tokens(prediction), _tokens(reference)
  if not pred or not ref:
    return float(pred == ref)
  lcs = _lcs_length(pred, ref)
  if lcs == 0:
    return 0.0
  precision, recall = lcs / len(pred), lcs / len(ref)
  return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
  """ROUGE-L F1 (LCS of normalized tokens, precision and recall weighted equally), best over references.

  For free-form references (Qasper) where word order matters but exact wording does not.
  """
  return _best(prediction, references, _rouge_l)


# Routing against gold evidence atoms (DESIGN §8). None when the question has no evidence label, so an
# unlabelled question is left out of the mean instead of counting as a miss.


def _routed_hits(routed: Sequence[int], evidence: Sequence[int], k: int) -> int:
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  return len(set(routed[:k]) & set(evidence))


def precision_at_k(routed: Sequence[int] | None, evidence: Sequence[int] | None, k: int) -> float | None:
  """Share of the top-k slots that hold gold evidence atoms (divided by k, so routing fewer atoms costs)."""
  if not evidence or routed is None:
    return None
  return _routed_hits(routed, evidence, k) / k


def recall_at_k(routed: Sequence[int] | None, evidence: Sequence[int] | None, k: int) -> float | None:
  """Share of the gold evidence atoms among the top-k routed ones (two-hop questions need both)."""
  if not evidence or routed is None:
    return None
  return _routed_hits(routed, evidence, k) / len(set(evidence))
