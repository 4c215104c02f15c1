"""Answer-time routing beyond the dense score: lexical and answer-type evidence fused with the router, and
abstention that reads the document (DESIGN §2.4).

The learned router ranks atoms by `q·k`; alone, with a 135M model's states, it confuses atoms that share a
subject (every fact about "Sunrenith" looks alike). Words tell them apart: BM25 over the atoms' words finds
the name, the question's expected answer type ("When ..." -> temporal) finds the attribute. `select`
ranks by reciprocal-rank fusion of the dense and BM25 scores, atoms of the expected type first; the
composition weights stay the dense scores' (normalized over the chosen atoms), as in training.

Abstention reads the evidence, not a per-question prior: a question naming something the document never
mentions, or asking for a date or an amount where no sentence about what it names holds one
(`lexical.unsupported`), is refused; otherwise the best atom's dense margin over the null atom decides,
against a threshold calibrated on validation worlds (`calibrate_margin`). The null atom's adapter is composed
only for a refusal, never mixed into an answer.
"""

import dataclasses

import numpy as np

from doc2atom_jax.atoms import atomize, compose, lexical

ROUTE_SCORES = ("dense", "fused")
ABSTAIN = ("null", "evidence")


@dataclasses.dataclass
class Lexicon:
  """The lexical view of a bank: BM25 over its atoms (pronoun atoms resolved), their types, the documents'
  text and their sentences (pronouns resolved), which the abstention checks read."""
  bm25: lexical.BM25
  texts: list[str]
  types: list[str]
  document: str
  sentences: list[str]

  @classmethod
  def of(cls, atoms, documents) -> "Lexicon":
    texts = lexical.resolved_texts([a.text for a in atoms])
    sentences = [s for d in documents for s in lexical.resolved_texts(
        [d[a:b] for a, b in atomize.split_sentences(d)])]
    return cls(lexical.BM25(texts), texts, [a.type for a in atoms], "\n".join(documents), sentences)


def refuses(question: str, lexicon: Lexicon) -> bool:
  """The lexical refusal: a name the documents never mention, or no date / amount about what it names."""
  return bool(lexical.absent_names(question, lexicon.document)) or lexical.unsupported(question, lexicon.sentences)


def fused_order(dense: np.ndarray, question: str, lexicon: Lexicon) -> np.ndarray:
  """Atom columns best first: RRF of the dense scores [N] (-inf = padding) and BM25, atoms of the question's
  expected answer type ahead of the rest."""
  n = len(lexicon.texts)
  valid = np.isfinite(dense[:n])
  fused = lexical.reciprocal_rank_fusion(dense[:n], lexicon.bm25.scores(question), mask=valid)
  wanted = lexical.expected_type(question)
  if wanted is not None:
    fused = fused + np.asarray([t == wanted for t in lexicon.types], np.float64) * 10.0
  return np.argsort(-np.where(valid, fused, -np.inf), kind="stable")


def margins(scores: np.ndarray) -> np.ndarray:
  """The best atom's dense score minus the null atom's, per question; scores [B, N + 1] (null last)."""
  return np.max(scores[:, :-1], axis=-1) - scores[:, -1]


def select(scores: np.ndarray, questions, lexicon: Lexicon, *, k: int, route_score: str, abstain: str,
           margin: float, normalize):
  """(indices [B, k], weights [B, k], abstain [B]) over a bank's atoms from the router's dense scores
  [B, N_padded + 1] (null last); `normalize(top_scores)` is the router's weight normalization."""
  B, n = scores.shape[0], len(lexicon.texts)
  k = min(k, n)
  indices, weights = np.zeros((B, k), np.int32), np.zeros((B, k), np.float32)
  refused = np.zeros(B, bool)
  gaps = margins(scores)
  for b, question in enumerate(questions):
    dense = scores[b, :-1]
    if abstain == "evidence":
      refused[b] = gaps[b] < margin or refuses(question, lexicon)
    else:  # v1: the null atom outranks every atom
      refused[b] = scores[b, -1] > np.max(dense)
    if refused[b]:
      indices[b, 0], weights[b, 0] = compose.NULL_INDEX, 1.0
      continue
    order = fused_order(dense, question, lexicon) if route_score == "fused" else np.argsort(-dense, kind="stable")
    top = order[:k]
    indices[b] = top
    weights[b] = np.asarray(normalize(dense[top][None]))[0]
  return indices, weights, refused


def calibrate_margin(margin_values, false_refusal: float) -> float:
  """The threshold under which `false_refusal` of answerable questions' margins fall (those not already
  refused lexically): abstaining below it refuses about that share of what should be answered."""
  values = np.asarray(margin_values, np.float64)
  if values.size == 0 or false_refusal <= 0:
    return float("-inf")  # nothing to calibrate on, or no margin wanted: refuse by the lexical checks only
  return float(np.quantile(values, false_refusal))
