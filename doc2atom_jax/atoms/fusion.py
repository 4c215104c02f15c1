"""Answer-time routing beyond the dense score: lexical and answer-type evidence fused with the router, and
abstention that reads the document (DESIGN §2.4).

The learned router ranks atoms by `q·k`; alone, with a 135M model's states, it confuses atoms that share a
subject (every fact about "Sunrenith" looks alike). Words tell them apart: BM25 over the atoms' words finds
the name, the question's expected answer type ("When ..." -> temporal) finds the attribute. `select`
ranks by reciprocal-rank fusion of the dense and BM25 scores, atoms of the expected type first; the
composition weights stay the dense scores' (normalized over the chosen atoms), as in training.

A two-hop question ("Where was the founder of the Tarnow Institute born?") names only its first entity; the
answer fact ("Maria Delvane was born in Kestrava.") shares no name with it, and the answer-type preference pushes
the bridge fact ("... founded by Maria Delvane.", another type) down too, so at 64 facts neither is found. The
optional second hop (`second_hop = "names"`, `second_hop_order`) follows the names a bridge adds: it places the
best (bridge, answer) pair right after the first hop's first atom, which never moves (single-fact precision@1
is unchanged). Measured on validation worlds in docs/method.md §3.

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
SECOND_HOPS = ("names", "off")
HOP_BRIDGES = 3  # bridge candidates: the question's best BM25 atoms (1 found fewer bridges at 64 facts, 2 too)
HOP_ANSWER_WEIGHT = 0.5  # a pair's score: the bridge's BM25 share + this x its answer's (hop BM25 share + type)


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


def fused_order(dense: np.ndarray, question: str, lexicon: Lexicon, second_hop: str = "off") -> np.ndarray:
  """Atom columns best first: RRF of the dense scores [N] (-inf = padding) and BM25, atoms of the question's
  expected answer type ahead of the rest; with `second_hop="names"`, reordered by `second_hop_order`."""
  n = len(lexicon.texts)
  valid = np.isfinite(dense[:n])
  words = lexicon.bm25.scores(question)
  fused = lexical.reciprocal_rank_fusion(dense[:n], words, mask=valid)
  typed = _typed(question, lexicon)
  order = np.argsort(-np.where(valid, fused + typed * 10.0, -np.inf), kind="stable")
  if second_hop == "off":
    return order
  if second_hop != "names":
    raise ValueError(f"unknown second_hop {second_hop!r}; valid: {', '.join(SECOND_HOPS)}")
  return second_hop_order(order, question, lexicon, words=words, typed=typed, valid=valid)


def _typed(question: str, lexicon: Lexicon) -> np.ndarray:
  """[N] 1.0 where an atom has the question's expected answer type (`lexical.expected_type`), else 0."""
  wanted = lexical.expected_type(question)
  return np.asarray([wanted is not None and t == wanted for t in lexicon.types], np.float64)


def second_hop_order(order: np.ndarray, question: str, lexicon: Lexicon, *, words: np.ndarray, typed: np.ndarray,
                     valid: np.ndarray) -> np.ndarray:
  """`order` with the best (bridge, answer) pair moved right after its first atom, which stays first.

  Bridges are the question's `HOP_BRIDGES` best atoms by BM25 (`words`): the bridge shares the question's name,
  and the fused order, which prefers the answer's type, often ranks it out of the top k. A bridge's answer is
  the atom best by BM25 over the names the bridge adds (`lexical.new_names`), plus 1 for the expected type
  (`typed`). Each pair scores its bridge's BM25 over the best bridge's plus `HOP_ANSWER_WEIGHT` x its answer's
  score; the best pair wins. Pure numpy over the bank's lexicon: at most `HOP_BRIDGES` more BM25 queries.
  No bridge with a name of its own, or no atom with one of those names: `order` unchanged.
  """
  if not len(order):
    return order
  first, best, best_score = int(order[0]), None, -np.inf
  top = float(words.max(initial=0.0))
  for bridge in np.argsort(-np.where(valid, words, -np.inf), kind="stable")[:HOP_BRIDGES]:
    if words[bridge] <= 0:
      break
    query = lexical.new_names(lexicon.texts[bridge], question)
    if not query:
      continue
    hop = lexicon.bm25.scores(" ".join(query)).astype(np.float64)
    hop[~valid | (np.arange(len(hop)) == bridge) | (np.arange(len(hop)) == first)] = 0.0
    if hop.max() <= 0:
      continue
    answer_scores = np.where(hop > 0, hop / hop.max() + typed, -np.inf)
    answer = int(np.argmax(answer_scores))
    score = words[bridge] / top + HOP_ANSWER_WEIGHT * answer_scores[answer]
    if score > best_score:
      best, best_score = (int(bridge), answer), score
  if best is None:
    return order
  chosen = list(dict.fromkeys([first, *best]))
  return np.concatenate([chosen, [a for a in order if a not in chosen]]).astype(order.dtype)


def margins(scores: np.ndarray) -> np.ndarray:
  """The best atom's dense score minus the null atom's, per question; scores [B, N + 1] (null last)."""
  return np.max(scores[:, :-1], axis=-1) - scores[:, -1]


def select(scores: np.ndarray, questions, lexicon: Lexicon, *, k: int, route_score: str, abstain: str,
           margin: float, normalize, second_hop: str = "off"):
  """(indices [B, k], weights [B, k], abstain [B]) over a bank's atoms from the router's dense scores
  [B, N_padded + 1] (null last); `normalize(top_scores)` is the router's weight normalization; `second_hop`
  applies to fused routing only (`fused_order`)."""
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
    order = (fused_order(dense, question, lexicon, second_hop) if route_score == "fused"
             else np.argsort(-dense, kind="stable"))
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
