"""Cheap lexical signals for routing and abstention (DESIGN §2.4, §14): words, BM25, names, answer types.

Why they exist: a pooled dense score blurs exact names and numbers, and a null key scored against the question
alone cannot know whether *this* document holds the answer. Four cheap signals that read the words:
  * `BM25` over atom texts (stored with a bank through `state`/`from_state`), fused with the dense score by
    `reciprocal_rank_fusion`;
  * `absent_names`: the question's proper-name words the document never mentions. A question about an entity
    the document does not name is out of scope (§14: half of the out-of-scope questions, no false refusal);
  * `expected_type`: a rule-based guess of the answer's atom type (`atomize.ATOM_TYPES`) from the question's
    wording, to prefer atoms of that type (§14: BM25 p@1 0.5-0.6, 0.8 when the type is known exactly).
`measure` reports all of them on synthetic worlds. Pure Python + numpy: no model, no jax.
"""

import collections
import functools
import math
import re
from collections.abc import Iterable, Sequence

import numpy as np

from doc2atom_jax.atoms.atomize import ATOM_TYPES, may_hold
from doc2atom_jax.errors import UserError

# --------------------------------------------------------------------------------------------------------
# Words.

# Numbers with thousands separators ("12,400") and decimals ("3.5") are one token; else runs of letters/digits.
# A possessive "'s" is dropped with its apostrophe, so "Amsten's" is the token "Amsten".
_TOKEN = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d)|\d+\.\d+|[^\W_]+")
_POSSESSIVE = re.compile(r"(?<=[^\W_])['’]s\b")
_NUMBER = re.compile(r"[\d.,]+")

# Function words that say nothing about which atom answers: question words, articles, auxiliaries,
# prepositions, conjunctions, pronouns. Not "may" (the month) nor "will" (a name) nor negations.
STOPWORDS = frozenset(
    "what which who whom whose when where why how many much "
    "the a an this that these those "
    "is are was were be been being am do does did has have had "
    "of in on at to for from by with about as into onto over under between through during before after since "
    "until than per via upon within "
    "and or but nor so if then "
    "it its he she they his her their him them i me my you your we our us there here "
    "s".split())


def _tokens(text: str) -> list[str]:
  """Word tokens of `text` in their original case, possessives removed."""
  return _TOKEN.findall(_POSSESSIVE.sub("", text))


def words(text: str) -> list[str]:
  """Lowercase word tokens of `text` (decimals and "12,400" are one token), without `STOPWORDS`, in order."""
  return [w for w in (t.lower() for t in _tokens(text)) if w not in STOPWORDS]


def _is_number(token: str) -> bool:
  return bool(_NUMBER.fullmatch(token))


# --------------------------------------------------------------------------------------------------------
# BM25.


class BM25:
  """Okapi BM25 over a fixed list of atom texts (one document's atoms, or a whole bank's: IDF is over all).

  IDF is Lucene's `log(1 + (N - df + 0.5) / (df + 0.5))`, never negative, so a word in every atom adds a
  little instead of pushing those atoms down. Each distinct question word counts once.
  """

  def __init__(self, texts: Sequence[str], k1: float = 1.2, b: float = 0.75):
    counts = [dict(collections.Counter(words(t))) for t in texts]
    self._build(counts, k1, b)

  def _build(self, counts: list[dict[str, int]], k1: float, b: float) -> None:
    self.k1, self.b = float(k1), float(b)
    self.counts = counts
    self.lengths = np.asarray([sum(c.values()) for c in counts], dtype=np.float32)
    df: collections.Counter = collections.Counter()
    postings: dict[str, tuple[list[int], list[int]]] = {}
    for i, c in enumerate(counts):
      for w, n in c.items():
        df[w] += 1
        atoms, tfs = postings.setdefault(w, ([], []))
        atoms.append(i)
        tfs.append(n)
    self.df = dict(df)
    self._postings = {w: (np.asarray(a, dtype=np.int64), np.asarray(t, dtype=np.float32))
                      for w, (a, t) in postings.items()}
    n = len(counts)
    mean_length = float(self.lengths.mean()) if n else 0.0
    # The length norm K_i of every atom, once: score_i(w) = idf(w) * tf (k1 + 1) / (tf + K_i).
    self._norm = self.k1 * (1 - self.b + self.b * self.lengths / max(mean_length, 1e-9))

  def __len__(self) -> int:
    return len(self.counts)

  def idf(self, word: str) -> float:
    n, df = len(self.counts), self.df.get(word, 0)
    return math.log(1 + (n - df + 0.5) / (df + 0.5))

  def scores(self, question: str) -> np.ndarray:
    """[n_atoms] float32: the BM25 score of every atom for the question's words (0 where none occurs)."""
    out = np.zeros(len(self.counts), dtype=np.float32)
    for w in dict.fromkeys(words(question)):
      if w in self._postings:
        atoms, tf = self._postings[w]
        out[atoms] += self.idf(w) * tf * (self.k1 + 1) / (tf + self._norm[atoms])
    return out

  def state(self) -> dict:
    """A JSON-serialisable state (parameters, document frequencies, lengths, per-atom word counts)."""
    return {"k1": self.k1, "b": self.b, "df": dict(self.df), "lengths": [int(x) for x in self.lengths],
            "counts": [dict(c) for c in self.counts]}

  @classmethod
  def from_state(cls, state: dict) -> "BM25":
    """The BM25 a `state()` came from; its scores are identical. A damaged state is a UserError."""
    try:
      counts = [{str(w): int(n) for w, n in c.items()} for c in state["counts"]]
      k1, b = float(state["k1"]), float(state["b"])
      lengths, df = [int(x) for x in state["lengths"]], {str(w): int(n) for w, n in state["df"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
      raise UserError(f"not a BM25 state ({type(e).__name__}: {e}); it needs k1, b, df, lengths and counts") \
          from None
    bm25 = cls.__new__(cls)
    bm25._build(counts, k1, b)
    if lengths != [int(x) for x in bm25.lengths] or df != bm25.df:
      raise UserError("damaged BM25 state: its lengths or document frequencies disagree with its word counts")
    return bm25


# --------------------------------------------------------------------------------------------------------
# Names and abstention.

_MIN_NUMBER_DIGITS = 2  # "1943", "12,400", "3.5"; a lone "2" is often spelled "two" in the document
# Endings that make one name word of another: plurals and demonyms ("Catholics", "Asian", "Americans").
_NAME_ENDINGS = ("s", "es", "n", "an", "ian", "ns", "ans", "ians")
_MIN_STEM = 3


def names(text: str) -> list[str]:
  """The proper-name words of a question, in order, deduplicated: capitalised words and numbers.

  A capitalised word counts unless it is a function word (`STOPWORDS`, at any position: "Which", "In", a
  title's "The") or "I". The first word counts only when the second is capitalised too ("Velkor Amsten was
  born when?"): a capitalised opener is usually an ordinary word ("Compared to ...", "Name the city ...").
  Numbers count with at least two digits. Possessives are stripped ("Amsten's" -> "Amsten"). Lowercase
  words never count. Every rule errs toward missing a name, so toward answering, never a false refusal.
  """
  tokens = _tokens(text)
  out = []
  for i, token in enumerate(tokens):
    if _is_number(token):
      keep = sum(c.isdigit() for c in token) >= _MIN_NUMBER_DIGITS
    else:
      keep = _is_capitalised_name(token) and (i > 0 or (len(tokens) > 1 and _is_capitalised_name(tokens[1])))
    if keep and token not in out:
      out.append(token)
  return out


def new_names(text: str, question: str) -> list[str]:
  """The `names` of `text` that the question does not name (compared as `absent_names` compares): what an atom
  found for the question adds, e.g. the bridge entity of a two-hop question, the query of a second routing hop."""
  asked = {_key(n) for n in names(question)}
  return [n for n in names(text) if _key(n) not in asked]


def _is_capitalised_name(token: str) -> bool:
  return token[0].isupper() and token.lower() not in STOPWORDS and token != "I"


def _key(token: str) -> str:
  """How a word is compared across question and document: lowercase, numbers without thousands commas."""
  return token.replace(",", "") if _is_number(token) else token.lower()


@functools.lru_cache(maxsize=64)
def _document_keys(document_text: str) -> frozenset[str]:
  """The compared forms of every word of a document (cached: many questions ask about one document)."""
  return frozenset(_key(t) for t in _tokens(document_text))


def absent_names(question: str, document_text: str, *, numbers: bool = False) -> list[str]:
  """The question's `names` that occur nowhere in the document as a whole word (case-insensitive).

  Non-empty means the question asks about something the document never mentions: a strong sign it is out of
  scope. "Amsten's" in the document counts as "Amsten"; so do forms one of `_NAME_ENDINGS` apart ("Asian"
  for "Asia", "Catholics" for "Catholic"); "Amsten" inside "Amstenford" does not. Numbers are skipped unless
  `numbers`: in natural questions they are often thresholds the text never states ("more than 300 papers").
  """
  present = _document_keys(document_text)
  return [n for n in names(question) if (numbers or not _is_number(n)) and not _mentioned(_key(n), present)]


def _mentioned(key: str, present: frozenset[str]) -> bool:
  if key in present or any(key + e in present for e in _NAME_ENDINGS):
    return True
  return any(key.endswith(e) and len(key) - len(e) >= _MIN_STEM and key[:-len(e)] in present
             for e in _NAME_ENDINGS)


_REFERRING = re.compile(r"^(?:He|She|It|They|Its|His|Her|Their|The [a-z]+)\b")


def resolved_texts(texts: Sequence[str]) -> list[str]:
  """Atom texts for lexical matching, each that opens with a pronoun or "The institute" followed by the
  previous atom's names ("It is 6.7 metres long." + " Velkor Lens"): such atoms carry no name of their own,
  and a reader resolves them from the sentence before (the compiler's states see it too)."""
  out = []
  for i, text in enumerate(texts):
    extra = names(texts[i - 1]) if i and _REFERRING.match(text) else []
    out.append(" ".join([text, *extra]))
  return out


def unsupported(question: str, sentences: Sequence[str]) -> bool:
  """True when the question asks for a date or an amount (`expected_type` temporal or quantity), names
  something, and no sentence that mentions one of its names, or a name one hop away (a name sharing a sentence
  with one of the question's: a two-hop bridge), could state such a value (`atomize.may_hold`): the document
  states nothing of the kind about what is asked, an unstated attribute of a named entity. `sentences` as
  `resolved_texts` gives them (pronouns carry the previous sentence's names).

  Only the two types words can check: a name or a definition cannot be told from other words, and the rule-based
  typer's one label per sentence is too coarse to refuse on ("The Orlen Observatory was founded in 1871 by the
  astronomer Maria Delvane." is temporal to it, yet answers "Who founded ...?").

  Measured with `absent_names` on 150 validation worlds per size (4-8 and 64 facts; `synthetic.document`'s text
  split by `atomize.split_sentences`): flags 62-63% of out-of-scope questions with our templates and 49-52% with
  held-out ones, 0% of single-fact and 0-1.3% of two-hop questions.
  """
  wanted = expected_type(question)
  asked = {_key(n) for n in names(question) if not _is_number(n)}
  if wanted not in ("temporal", "quantity") or not asked:
    return False
  keys = [frozenset(_key(t) for t in _tokens(text)) for text in sentences]
  near = set(asked)
  for text, k in zip(sentences, keys):
    if asked & k:
      near |= {_key(n) for n in names(text) if not _is_number(n)}
  return not any(near & k and may_hold(text, wanted) for text, k in zip(sentences, keys))


# --------------------------------------------------------------------------------------------------------
# Fusion.


def reciprocal_rank_fusion(*score_arrays, k: float = 60, mask=None) -> np.ndarray:
  """Reciprocal-rank fusion `sum_j 1 / (k + rank_j)` of score vectors over the same atoms (higher = better).

  Ranks start at 1 and are taken among the atoms `mask` keeps (all if None); tied scores share the best rank
  of their group, so atom order never breaks a tie (BM25 gives many atoms 0). NaN ranks last. Masked-out
  atoms get -inf. Returns float64 [n_atoms].
  """
  if not score_arrays:
    raise ValueError("reciprocal_rank_fusion needs at least one score array")
  arrays = [np.asarray(s, dtype=np.float64) for s in score_arrays]
  n = arrays[0].shape
  if len(n) != 1 or any(a.shape != n for a in arrays):
    raise ValueError(f"score arrays must be 1-D of one length (got shapes {[a.shape for a in arrays]})")
  keep = np.ones(n, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
  if keep.shape != n:
    raise ValueError(f"mask shape {keep.shape} differs from the scores' {n}")
  out = np.full(n, -np.inf)
  kept = np.flatnonzero(keep)
  if kept.size:
    out[kept] = sum(1.0 / (k + _tied_ranks(a[kept])) for a in arrays)
  return out


def _tied_ranks(scores: np.ndarray) -> np.ndarray:
  """1-based descending ranks; equal scores take the smallest rank of their group; NaN ranks last."""
  s = np.where(np.isnan(scores), -np.inf, scores)
  order = np.argsort(-s, kind="stable")
  ordered = s[order]
  positions = np.arange(len(s))
  starts = np.maximum.accumulate(np.where(np.r_[True, ordered[1:] != ordered[:-1]], positions, 0))
  ranks = np.empty(len(s))
  ranks[order] = starts + 1
  return ranks


# --------------------------------------------------------------------------------------------------------
# The expected answer type.

# Nouns that name what a "what/which ..." question asks for, by the atom type whose atoms state it. The wh-
# phrase's noun decides ("which prize", "what is the population of", "Amsten's height"), not the subject's.
_ANSWER_NOUNS = {
    "temporal": "year years date dates day days month century centuries decade decades time era period birthday "
                "anniversary",
    "quantity": "population number count length height weight mass elevation altitude area size depth width "
                "breadth distance speed price cost budget revenue income salary age capacity temperature "
                "percentage percent amount total average rate ratio volume diameter radius duration rainfall "
                "score staff workforce headcount",
    "relation": "city cities town village country countries nation region state province county river lake "
                "place location birthplace hometown headquarters capital organization organisation company "
                "firm employer institution university school college club team person founder spouse wife "
                "husband partner mentor teacher tutor advisor adviser director leader head chief ceo chair "
                "president mayor governor owner designer inventor architect maker manufacturer producer "
                "builder creator author parent father mother son daughter brother sister sibling child "
                "successor predecessor",
    "event": "prize prizes award awards medal medals honor honour honors honours event events competition "
             "tournament championship title conference symposium congress festival fair exhibition battle "
             "war election ceremony match race",
    "definition": "profession occupation job career trade vocation field discipline specialty speciality "
                  "specialization specialisation category kind type sort genre class species role",
    "other": "language languages tongue dialect color colour religion nickname motto nationality",
}
_NOUN_TYPE = {noun: t for t, nouns in _ANSWER_NOUNS.items() for noun in nouns.split()}
assert set(_ANSWER_NOUNS) <= set(ATOM_TYPES)
# "how <adjective>" asks for an amount; "how long ago" is a date.
_HOW_QUANTITY = frozenset(
    "many much tall high long heavy large big far old young deep wide thick fast short small expensive cheap "
    "hot cold steep".split())
_BE = frozenset("is are was were".split())
_DO = frozenset("do does did".split())
_WH = ("what", "which", "who", "whom", "whose", "when", "where", "how")
# Main verbs of "what did X <verb>?" by the type of their object.
_VERB_TYPE = {
    **dict.fromkeys("win won wins receive received receives earn earned earns host hosted hosts organize "
                    "organized organise organised organizes hold held happen happened happens occurred took "
                    "award awarded attend attended".split(), "event"),
    **dict.fromkeys("weigh weighs weighed cost costs measure measures".split(), "quantity"),
    **dict.fromkeys("specialize specialise specializes specialises study studied studies research do mean "
                    "means".split(), "definition"),
    **dict.fromkeys("speak speaks spoke".split(), "other"),
}


def expected_type(question: str) -> str | None:
  """A rule-based guess of the `ATOM_TYPES` type of the atom that answers `question`, or None when unsure.

  Rules, on the first question word: "when" -> temporal; "where" -> relation; "who/whom/whose" -> relation,
  except a bare "Who is <Name>?" (definition); "how many/much/<adjective>" -> quantity ("how long ago" ->
  temporal). "what/which": the answer noun of the wh-phrase by `_ANSWER_NOUNS` ("which prize", "what is the
  population of", "what is X's height", "what is X by profession"), else the main verb of "what did X <verb>"
  ("win" -> event), else "what is <Name>?" -> definition.
  """
  tokens = _tokens(question)
  low = [t.lower() for t in tokens]
  at = next((i for i, w in enumerate(low) if w in _WH), None)
  if at is None:
    return None
  wh, rest, rest_tokens = low[at], low[at + 1:], tokens[at + 1:]
  if wh == "when":
    return "temporal"
  if wh == "where":
    return "relation"
  if wh == "how":
    if rest[:2] == ["long", "ago"]:
      return "temporal"
    return "quantity" if rest and rest[0] in _HOW_QUANTITY else None
  if wh in ("who", "whom", "whose"):
    if rest and rest[0] in _BE and len(rest) > 1 and all(_is_name_word(t) for t in rest_tokens[1:]):
      return "definition"  # "Who was Velkor Amsten?"
    return "relation"
  return _what_type(rest, rest_tokens)


def _is_name_word(token: str) -> bool:
  return token[0].isupper() or token.lower() == "the"


def _what_type(rest: list[str], tokens: list[str]) -> str | None:
  """The type for a "what/which ..." question from the words after the question word."""
  if rest and rest[0] in _VERB_TYPE and rest[0] != "do":
    return _VERB_TYPE[rest[0]]  # "what happened at ..."
  # "which prize", "what kind of", "in which European country": the noun right after the question word.
  for w, t in zip(rest[:3], tokens[:3]):
    if w in _BE or w in _DO or w in ("has", "have", "had") or t[0].isupper():
      break
    if w in _NOUN_TYPE:
      return _NOUN_TYPE[w]
  if rest and rest[0] in _BE:
    return _what_is_type(rest[1:], tokens[1:])
  if rest and rest[0] in _DO:
    for w in reversed(rest[1:]):  # the main verb comes last: "what did the founder of X win"
      if w in _VERB_TYPE:
        return _VERB_TYPE[w]
  return None


def _what_is_type(rest: list[str], tokens: list[str]) -> str | None:
  """The type for "what is ..." from the words after "is"."""
  # "what is the population of X", "what is the birth year of X": the noun before "of" or a name;
  # "what is the name of X's wife": the noun after "name of".
  for i, (w, t) in enumerate(zip(rest, tokens)):
    if w == "of" and i and rest[i - 1] in ("name", "title"):
      return next((_NOUN_TYPE[v] for v in rest[i + 1:] if v in _NOUN_TYPE), None)
    if w == "of" or t[0].isupper():
      break
    if w in _NOUN_TYPE:
      return _NOUN_TYPE[w]
  # "what is X's height" (the possessive is dropped: the noun right after the name), "what is X by
  # profession": an answer noun just after the name; "what is X (known for)?" defines X.
  after_name = _after_name(tokens)
  if after_name is None:
    return None
  for w in after_name[:3]:
    if w in _NOUN_TYPE:
      return _NOUN_TYPE[w]
  if not [w for w in after_name if w not in STOPWORDS] or after_name[:2] == ["known", "for"]:
    return "definition"
  return None


def _after_name(tokens: list[str]) -> list[str] | None:
  """The lowercase words after a run of name words that opens `tokens` (after articles); None if none does."""
  i = 0
  while i < len(tokens) and tokens[i].lower() in ("the", "a", "an"):
    i += 1
  if i >= len(tokens) or not tokens[i][0].isupper():
    return None
  while i < len(tokens) and (tokens[i][0].isupper() or _is_number(tokens[i])):
    i += 1
  return [t.lower() for t in tokens[i:]]


# --------------------------------------------------------------------------------------------------------
# Measurement on synthetic worlds.


def measure(split: str = "validation", n_documents: int = 200, facts=(4, 64), seed: int = 0) -> dict:
  """BM25, answer-type and absent-name numbers on `n_documents` synthetic worlds (one atom per fact).

  Per document (its own atoms only, as one routing step sees them):
    bm25_p1, bm25_r4: the evidence atom is BM25's top 1 / in its top 4 (single questions);
    two_hop_both_top4, two_hop_bridge_r4: both evidence atoms / the bridge atom in BM25's top 4 (two-hop);
    type_oracle_p1: BM25 top 1 among atoms of the evidence atom's type (an upper bound for type matching);
    expected_type_accuracy / _coverage: `expected_type` equals the evidence type / is not None (single);
    typed_p1: BM25 top 1 among atoms of `expected_type`'s type when any atom has it, else among all;
    fused_p1: top 1 of BM25 fused (RRF) with a type indicator (down-weights other types, never filters);
    oos_flagged / answerable_flagged: `absent_names` non-empty on out-of-scope / answerable questions.
  Ties go to the lower atom index (the generator shuffles facts, so that is a random pick).
  """
  from doc2atom_jax.data import synthetic  # lazily: this module stays free of the data package

  tallies: dict[str, list[float]] = collections.defaultdict(list)
  for i in range(n_documents):
    doc = synthetic.document(split, i, seed=seed, facts_per_document=facts)
    texts, types = [f.text for f in doc.facts], np.asarray([f.type for f in doc.facts])
    bm25 = BM25(texts)
    for q in doc.questions:
      tallies[f"{q.kind}_flagged"].append(bool(absent_names(q.question, doc.text)))
      if q.kind == "out_of_scope":
        continue
      s = bm25.scores(q.question)
      top4 = np.argsort(-s, kind="stable")[:4]
      if q.kind == "two_hop":
        tallies["two_hop_both_top4"].append(all(e in top4 for e in q.evidence))
        tallies["two_hop_bridge_r4"].append(q.evidence[0] in top4)
        continue
      (gold,) = q.evidence
      tallies["bm25_p1"].append(int(np.argmax(s)) == gold)
      tallies["bm25_r4"].append(gold in top4)
      tallies["type_oracle_p1"].append(_masked_argmax(s, types == types[gold]) == gold)
      guess = expected_type(q.question)
      tallies["expected_type_coverage"].append(guess is not None)
      tallies["expected_type_accuracy"].append(guess == types[gold])
      same = types == guess
      tallies["typed_p1"].append(_masked_argmax(s, same if same.any() else None) == gold)
      fused = reciprocal_rank_fusion(s, same.astype(np.float32)) if guess else s
      tallies["fused_p1"].append(int(np.argmax(fused)) == gold)
  out = {"split": split, "documents": n_documents, "facts": tuple(facts), "seed": seed,
         "single_questions": len(tallies["bm25_p1"]), "two_hop_questions": len(tallies["two_hop_both_top4"]),
         "out_of_scope_questions": len(tallies["out_of_scope_flagged"])}
  for name in ("bm25_p1", "bm25_r4", "two_hop_both_top4", "two_hop_bridge_r4", "type_oracle_p1",
               "expected_type_accuracy", "expected_type_coverage", "typed_p1", "fused_p1"):
    out[name] = _mean(tallies[name])
  out["oos_flagged"] = _mean(tallies["out_of_scope_flagged"])
  out["answerable_flagged"] = _mean(tallies["single_flagged"] + tallies["two_hop_flagged"])
  return out


def _masked_argmax(scores: np.ndarray, keep: np.ndarray | None) -> int:
  return int(np.argmax(scores if keep is None else np.where(keep, scores, -np.inf)))


def _mean(values: Iterable) -> float:
  values = list(values)
  return float(np.mean(values)) if values else float("nan")
