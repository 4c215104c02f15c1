"""The atomizer (DESIGN §2.1): a document becomes typed atoms, spans of roughly one fact with provenance.

Pipeline of `atomize`: `split_sentences` (character rules, no tokenizer) -> sentences longer than
`max_atom_tokens` split at clause boundaries -> pieces shorter than `min_atom_tokens` merged into a neighbour
-> each atom typed by `classify`. `atomize_given` takes the atoms from a dataset instead.

Invariants (checked by `check_tiling` on every document built here, and by the tests):
  * characters: atoms cover the document in order; every non-whitespace character belongs to exactly one
    atom, and the text between atoms is whitespace.
  * tokens: the document is encoded ONCE with the tokenizer's special tokens (the router and the compiler see
    the same ids as the model); a token belongs to the atom holding its first non-whitespace character, so a
    byte-level "Ġword" goes with "word". A whitespace-only token goes with the next token that has text (the
    last atom at the end of the document). Tokens with empty offsets at either end (BOS, EOS) belong to no
    atom. A token that straddles an atom boundary (a merge across a boundary, e.g. ".I" in the glued
    "Alfonso VII.In 1219", or ".▁The" in a tokenizer without pre-splitting) goes to the atom holding its
    first non-space character. So the atoms' token spans are contiguous, in order, and cover every token
    between the special ones; an atom's token span may thus miss the start of its first word.
"""

import bisect
import dataclasses
import numbers
import re
from collections.abc import Callable, Sequence

from doc2atom_jax.errors import UserError

ATOM_TYPES = ("definition", "quantity", "temporal", "relation", "event", "other")


@dataclasses.dataclass(frozen=True)
class Atom:
  """One fact-sized span of a document; `text == document[char_start:char_end]`."""
  doc_id: str
  index: int
  text: str
  type: str
  char_start: int
  char_end: int
  token_start: int  # in AtomizedDocument.token_ids (the one encoding of the whole document)
  token_end: int


@dataclasses.dataclass(frozen=True)
class AtomizedDocument:
  """A document encoded once, and its atoms tiling it."""
  doc_id: str
  text: str
  token_ids: tuple[int, ...]
  atoms: tuple[Atom, ...]


# --------------------------------------------------------------------------------------------------------
# Sentence splitting.

_TERMINATORS = ".!?…‼⁇⁈⁉؟।۔。！？"
_CJK_TERMINATORS = "。！？"
_CLOSERS = "\"'”’»)]}」』）】〉》"
_OPENERS = "\"'“‘«([{「『（【〈《"
_BULLETS = "-*+•‣◦▪▫●○■□–—·"
# A run of terminators, closing quotes/brackets after it, and citation marks like "[3]".
_SENTENCE_END = re.compile(rf"(?P<run>[{re.escape(_TERMINATORS)}]+)[{re.escape(_CLOSERS)}]*(?:\[\d+\])*")

# The word before a single ".", lower-cased, decides whether the "." ends a sentence:
# titles and Latin abbreviations never end one ("Dr. Amsten", "e.g. The Hobbit");
_NEVER_END = frozenset(
    "mr mrs ms mx dr prof sen rep gov gen col capt cpt maj lt sgt rev hon pres fr e.g i.e cf vs viz approx ca "
    "fig figs eq eqs vol vols pp ch chap sec art est incl".split())
# prenominal abbreviations, initials and dotted acronyms end one only before a typical sentence opener
# ("J. R. R. Tolkien", "Jan. 5", "No. 7", "the U.S. Army" stay; "moved to the U.S. The next year" splits);
_PRENOMINAL = frozenset("st mt ft ave no nos al jan feb mar apr jun jul aug sep sept oct nov dec".split())
# everything else ("etc.", "Inc.", "Ltd.", "Jr.", "p.m.", words) ends one before anything but lowercase.
_SENTENCE_OPENERS = frozenset(
    "The A An In On At By For From With To After Before During Since Until When While This That These Those "
    "There Here It He She They We His Her Its Their Our Both Each Every Many Most Some All Later Today "
    "However Also Then Thus Finally Meanwhile Despite Although Because As If".split())
_DOTTED_ACRONYM = re.compile(r"(?:[^\W\d_]{1,2}\.)+[^\W\d_]{1,2}")
# A list marker ("1.", "b)", "iv.") at the start of a line or sentence is not a sentence end.
_MARKER = re.compile(r"\(?(?:\d{1,3}|[^\W\d_]|[ivxlcIVXLC]{1,4})")
_LOWER_LIST_ITEM = re.compile(r"\(?(?:[a-z]|[ivx]{1,4})[.)]\s")
_LONGEST_WORD = 32
_GLUED_WORD = re.compile(r"[^\W\d_]{2,}(?=\s|$)")  # "In" in "VII.In 1219"
_LETTERS = re.compile(r"[^\W\d_]*")


def split_sentences(text: str) -> list[tuple[int, int]]:
  """Character spans of the sentences (and list items, headings, lines) of `text`, whitespace trimmed.

  The spans tile `text`: every non-whitespace character lies in exactly one span. Lines end a sentence
  unless the next line continues it (starts in lowercase); blank lines always do.
  """
  line_cuts = _line_cuts(text)
  cuts = sorted(set(line_cuts) | set(_sentence_cuts(text, line_cuts)))
  bounds = [0] + cuts + [len(text)]
  return [span for a, b in zip(bounds, bounds[1:]) if (span := _trim(text, a, b))]


def _trim(text: str, start: int, end: int) -> tuple[int, int] | None:
  """(start, end) without surrounding whitespace, or None if only whitespace is left."""
  while start < end and text[start].isspace():
    start += 1
  while end > start and text[end - 1].isspace():
    end -= 1
  return (start, end) if start < end else None


def _line_cuts(text: str) -> list[int]:
  """Starts of lines that begin a new segment: after a blank line, or unless the line continues the last."""
  lines = [m for m in re.finditer(r"[^\n]+", text) if not m.group().isspace()]
  cuts = []
  for prev, line in zip(lines, lines[1:]):
    body = line.group().lstrip()
    blank_between = text.count("\n", prev.end(), line.start()) > 1
    continues = (body[0].islower() and not _LOWER_LIST_ITEM.match(body)
                 and not prev.group().rstrip().endswith(":"))
    if blank_between or not continues:
      cuts.append(line.start() + len(line.group()) - len(body))
  return cuts


def _sentence_cuts(text: str, line_cuts: list[int]) -> list[int]:
  """Starts of sentences that follow a sentence end inside a line or across a soft line break."""
  cuts = []
  for m in _SENTENCE_END.finditer(text):
    end = m.end()
    if end >= len(text):
      break
    segment_start = max(cuts[-1] if cuts else 0, _last_at_most(line_cuts, m.start()))
    if not text[end].isspace():
      if _ends_without_space(text, m):
        cuts.append(end)
      continue
    nxt = _skip_space(text, end)
    if nxt < len(text) and _ends_sentence(text, m, nxt, segment_start):
      cuts.append(nxt)
  return cuts


def _last_at_most(sorted_values: list[int], x: int) -> int:
  i = bisect.bisect_right(sorted_values, x)
  return sorted_values[i - 1] if i else 0


def _skip_space(text: str, i: int) -> int:
  while i < len(text) and text[i].isspace():
    i += 1
  return i


def _word_before(text: str, i: int) -> tuple[str, int]:
  """The non-space word that ends at `i`, without opening quotes/brackets, and where it starts.

  A word longer than any abbreviation or list marker (a URL) comes back as "", which reads as an ordinary
  word; the bound keeps the scan linear on long unbroken text.
  """
  start = i
  while start > 0 and not text[start - 1].isspace():
    start -= 1
    if i - start > _LONGEST_WORD:
      return "", i
  while start < i and text[start] in _OPENERS:
    start += 1
  return text[start:i], start


def _ends_without_space(text: str, m: re.Match) -> bool:
  """A CJK full stop, or a "." glued to the next sentence ("Alfonso VII.In 1219"), as in scraped text.

  A CJK stop inside a closing quote continues the sentence ("「止まれ。」と彼は言った。") unless another
  quote opens right after it.
  """
  if any(c in _CJK_TERMINATORS for c in m.group("run")):
    return m.group() == m.group("run") or text[m.end()] in _OPENERS
  end = m.end()
  if m.group() != "." or end + 1 >= len(text) or not (text[end].isupper() and text[end + 1].islower()):
    return False
  word, _ = _word_before(text, m.start())
  return (len(word) >= 2 and word.isalpha() and word.lower() not in _NEVER_END and word.lower() not in _PRENOMINAL
          and bool(_GLUED_WORD.match(text, end)))


def _ends_sentence(text: str, m: re.Match, nxt: int, segment_start: int) -> bool:
  """Whether the terminator run `m`, followed by whitespace and then `text[nxt]`, ends a sentence."""
  if text[nxt] in _TERMINATORS:  # a spaced ellipsis ". . ."
    return False
  first = nxt
  while first < len(text) and text[first] in _OPENERS:
    first += 1
  if first < len(text) and text[first].islower():
    return False
  if m.group("run") != ".":
    return True
  word, word_start = _word_before(text, m.start())
  if _MARKER.fullmatch(word) and all(c.isspace() or c in _BULLETS for c in text[segment_start:word_start]):
    return False
  if word.lower() in _NEVER_END:
    return False
  if _is_prenominal(word):
    return _LETTERS.match(text, first).group() in _SENTENCE_OPENERS
  return True


def _is_prenominal(word: str) -> bool:
  """An abbreviation usually followed by a name or number: "St.", "Jan.", "No.", initials, "U.S."."""
  key = word.lower()
  if key in ("a.m", "p.m"):
    return False
  return key in _PRENOMINAL or (len(word) == 1 and word.isalpha()) or bool(_DOTTED_ACRONYM.fullmatch(word))


# --------------------------------------------------------------------------------------------------------
# Long sentences: clause boundaries, then word boundaries, then token boundaries.

# Each tier is a pattern whose match ends where the next piece starts; a higher tier is used only when no
# boundary of a lower one leaves both pieces at least `min_atom_tokens` long.
_CLAUSE_TIERS = (
    re.compile(r"[;；]\s+|:\s+|\s+[—–]\s+|\s--\s+|(?<=\S)—(?=\S)|,\s+(?=(?:and|but|or|nor|yet|so|which|who|whom|"
               r"whose|where|when|while|whereas|although|though|because|since|after|before|until|unless|if)\b)"),
    re.compile(r",\s+|，|、"),
    re.compile(r"\s+"),
)


def _split_long(span: tuple[int, int], text: str, counter: "_TokenCounter", lo: int,
                hi: int) -> list[tuple[int, int]]:
  """Splits `span` in two until every piece has at most `hi` tokens, at the best boundary near the middle."""
  n = counter.count(*span)
  if n <= hi:
    return [span]
  cut = _best_cut(span, text, counter, max(lo, 1))
  left, right = _trim(text, span[0], cut), _trim(text, cut, span[1])
  return _split_long(left, text, counter, lo, hi) + _split_long(right, text, counter, lo, hi)


def _best_cut(span: tuple[int, int], text: str, counter: "_TokenCounter", lo: int) -> int:
  """The lowest-tier boundary that leaves >= lo tokens on both sides, nearest the token middle."""
  start, end = span
  n = counter.count(start, end)
  tiers = [[m.end() for m in tier.finditer(text, start, end)] for tier in _CLAUSE_TIERS]
  tiers.append(counter.anchors_in(start, end))
  for positions in tiers:
    admissible = [(abs(2 * left - n), p) for p in positions if start < p < end
                  if lo <= (left := counter.count(start, p)) <= n - lo]
    if admissible:
      return min(admissible)[1]
  raise AssertionError(f"no token boundary in a {n}-token span")  # n > hi >= 2 * lo, so one exists


# --------------------------------------------------------------------------------------------------------
# Tiny pieces: merged into a neighbour.


def _merge_tiny(spans: list[tuple[int, int]], text: str, counter: "_TokenCounter", lo: int,
                hi: int) -> list[tuple[int, int]]:
  """Merges pieces under `lo` tokens into a neighbour while the result stays within `hi` tokens.

  The neighbour is the previous one (the next one for the first piece), except that a piece joins the
  side it is not separated from by a stronger break (blank line > line break > space), and a tiny heading
  (a line with no final punctuation, "Early life") joins the text it heads.
  """
  spans = list(spans)
  i = 0
  while i < len(spans):
    j = _merge_target(spans, i, text, counter, lo, hi)
    if j is None:
      i += 1
      continue
    a, b = sorted((i, j))
    spans[a:b + 1] = [(spans[a][0], spans[b][1])]
    i = a
  return spans


def _merge_target(spans: list[tuple[int, int]], i: int, text: str, counter: "_TokenCounter", lo: int,
                  hi: int) -> int | None:
  """The neighbour tiny piece i joins (see `_merge_tiny`), or None if it is not tiny or cannot join."""
  if len(spans) == 1 or counter.count(*spans[i]) >= max(lo, 1):  # a token-less piece always merges
    return None
  order = [j for j in (i - 1, i + 1) if 0 <= j < len(spans)]
  if len(order) == 2:
    prev_break = _break_strength(text[spans[i - 1][1]:spans[i][0]])
    next_break = _break_strength(text[spans[i][1]:spans[i + 1][0]])
    heading = text[spans[i][1] - 1] not in _TERMINATORS + _CLOSERS and next_break > 0
    if next_break < prev_break or next_break == prev_break and heading:
      order.reverse()
  for j in order:
    merged = (min(spans[i][0], spans[j][0]), max(spans[i][1], spans[j][1]))
    if counter.count(*merged) <= hi:
      return j
  return None


def _break_strength(gap: str) -> int:
  """2 for a blank line, 1 for a line break, 0 for spaces."""
  return min(gap.count("\n"), 2)


# --------------------------------------------------------------------------------------------------------
# Tokens.


_NON_SPACE = re.compile(r"\S")


class _TokenCounter:
  """Token ownership of one encoding: `anchors[k]` is the character that token `first + k` belongs to."""

  def __init__(self, text: str, offsets: Sequence[tuple[int, int]]):
    texted = [i for i, (a, b) in enumerate(offsets) if b > a]
    if not texted:
      raise UserError("the tokenizer returned no token with character offsets for a non-empty document")
    self.first, last = texted[0], texted[-1] + 1
    owned = [_first_non_space(text, *offsets[i]) for i in range(self.first, last)]
    self.anchors = _fill_forward_then_back(owned)
    if any(a > b for a, b in zip(self.anchors, self.anchors[1:])):
      raise UserError("the tokenizer's character offsets are not in text order; atoms need monotonic offsets")

  def count(self, start: int, end: int) -> int:
    """Tokens that belong to characters [start, end)."""
    return bisect.bisect_left(self.anchors, end) - bisect.bisect_left(self.anchors, start)

  def token_span(self, start: int, end: int) -> tuple[int, int]:
    return (self.first + bisect.bisect_left(self.anchors, start), self.first + bisect.bisect_left(self.anchors, end))

  def anchors_in(self, start: int, end: int) -> list[int]:
    return sorted(set(self.anchors[bisect.bisect_left(self.anchors, start):bisect.bisect_left(self.anchors, end)]))


def _first_non_space(text: str, start: int, end: int) -> int | None:
  m = _NON_SPACE.search(text, start, end)
  return m.start() if m else None


def _fill_forward_then_back(values: list[int | None]) -> list[int]:
  """Each None takes the next value (whitespace joins the following word), else the previous one."""
  out, nxt = list(values), None
  for i in reversed(range(len(out))):
    out[i] = nxt = out[i] if out[i] is not None else nxt
  prev = None
  for i in range(len(out)):
    out[i] = prev = out[i] if out[i] is not None else prev
  if out and out[0] is None:
    raise UserError("no token of the document covers a non-whitespace character")
  return out


def _encode(text: str, tokenizer) -> tuple[list[int], list[tuple[int, int]]]:
  """The one encoding of the whole document, with the tokenizer's special tokens (Gemma's BOS)."""
  try:
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
  except NotImplementedError:  # slow (Python) tokenizers have no offsets
    raise UserError(f"{type(tokenizer).__name__} gives no character offsets: atomize needs a fast tokenizer "
                    "(PreTrainedTokenizerFast)") from None
  return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


# --------------------------------------------------------------------------------------------------------
# The typer.

_YEAR = re.compile(r"(?<![\d.,$€£¥])(?:1\d{3}|20\d{2})(?![\d%]|[.,]\d)")
# Lowercase words after a 1000-2099 number: function words keep it a year ("in 1871 the", "1943 saw"); plural
# nouns and units make it a count ("1500 members", "1200 km"); other singular words keep it a year, as a
# modifier ("the 1961 film").
_AFTER_YEAR = frozenset(
    "s and or to until till when while with after before as at in on the for by he she it they we was were is "
    "are had has saw sees through onward onwards from during where which that but ad bc ce bce".split())
_COUNT_WORDS = frozenset(
    "people men women children staff personnel feet cattle sheep fish km m cm mm kg g t mi ft lb mph ha "
    "metre meter kilometre kilometer mile ton tonne dollar euro pound yen acre hectare".split())
_NEXT_WORD = re.compile(r"(\s*)([^\W\d_]*)")
_TEMPORAL = re.compile("|".join((
    r"\b(?:January|February|April|June|July|August|September|October|November|December)\b",
    r"\b(?:in|of|early|late|mid-?|since|until|by|during|last|next)\s+(?:May|March)\b|\b(?:May|March)\s+\d",
    r"\b(?:Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)\.?\s+\d{1,2}\b",
    r"\b(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)s?\b",
    r"\b(?:centur(?:y|ies)|decades?|millenni(?:um|a)|ago)\b",
    r"\d\s*(?:BCE?|AD|CE|B\.C\.|A\.D\.)(?!\w)|\bAD\s+\d",
    r"\b\d{1,2}([/-])\d{1,2}\1\d{2,4}\b|\b\d{1,2}\.\d{1,2}\.\d{4}\b|\b\d{4}-\d{2}-\d{2}\b",  # 12/3/1990, 12.3.1990
    r"\b\d{1,2}:\d{2}\b|\b\d{1,2}\s?(?:a\.m\.|p\.m\.|am|pm)(?!\w)",
    r"\d+\s*年|\d+\s*月\s*\d+\s*日",
)))
_QUANTITY = re.compile(
    r"(?<![^\W\d_])\d|[$€£¥₹]|%|\bper ?cent\b|\b(?:two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|"
    r"thirteen|fourteen|fifteen|sixteen|seventeen|eighteen|nineteen|twenty|thirty|forty|fifty|sixty|seventy|"
    r"eighty|ninety|hundreds?|thousands?|millions?|billions?|trillions?|dozens?)\b", re.IGNORECASE)
_ROLE_NOUNS = (
    "capital|member|part|head|leader|director|president|chair|chairman|chairwoman|ceo|founder|co-?founder|"
    "owner|mayor|governor|king|queen|citizen|resident|subsidiary|division|branch|student|professor|son|"
    "daughter|child|father|mother|parent|brother|sister|sibling|wife|husband|spouse|uncle|aunt|nephew|niece|"
    "cousin|grandson|granddaughter|grandfather|grandmother|mentor|colleague|rival|successor|predecessor|"
    "author|creator|designer|inventor|architect|composer|manufacturer|publisher|sponsor|twin|employee|"
    "partner|ally|patron|editor|coach|captain|deputy|secretary|minister|chancellor|dean|rector")
_RELATION = re.compile(
    rf"\b(?:(?:{_ROLE_NOUNS}) (?:of|to)|co-?founded|founded|established|married|divorced|joined|"
    r"works? (?:for|at|with|under)|worked (?:for|at|with|under)|employed by|employs|owns|owned|leads|led|"
    r"heads|headed|directs|directed|manages|managed|chairs|chaired|runs|ran|governs|ruled|represents|"
    r"born (?:in|at)|died (?:in|at)|buried (?:in|at)|located (?:in|on|at|near)|situated (?:in|on|near)|"
    r"based in|headquartered in|lives? in|lived in|resides? in|settled in|lies (?:in|on)|flows (?:through|into)|"
    r"borders|studied|graduated from|attended|teaches at|taught at|trained (?:at|under)|belongs? to|"
    r"reports to|succeeded|designed|invented|created|wrote|authored|composed|built|developed|produces|produced|"
    r"manufactures|manufactured|publishes|published by|sponsors|sponsored|funds|funded|acquired|bought|"
    r"merged with|partnered with|allied with|collaborated with|affiliated with|named after|named for|"
    r"engaged to|related to|mentored|supervised|operates|operated)\b")
_EVENT = re.compile(
    r"\b(?:won|wins|lost|defeated|beat|discovered|launched|collapsed|signed|held|hosted|visited|opened|closed|"
    r"released|announced|published|premiered|debuted|completed|began|started|ended|finished|merged|acquired|"
    r"founded|established|built|designed|invented|created|wrote|composed|married|divorced|died|retired|"
    r"resigned|elected|appointed|awarded|received|earned|broke|destroyed|burned|flooded|erupted|exploded|"
    r"crashed|sank|invaded|captured|conquered|attacked|fought|escaped|survived|rescued|arrested|sentenced|"
    r"toured|performed|competed|scored|climbed|crossed|explored|traveled|travelled|moved|emigrated|returned|"
    r"fled|celebrated|organized|organised|staged|took place|occurred|happened|struck|sold|bought|expanded|"
    r"relocated|renamed|reopened|abolished|banned|approved|rejected|introduced|unveiled|inaugurated|restored|"
    r"renovated|demolished|evacuated|surrendered|ratified|declared|disbanded|dissolved|graduated|joined|quit|"
    r"hired|fired|stole|passed away)\b")
_DEFINITION = re.compile(
    r"^[^,;:.!?]{1,80}?\b(?:is|was|are|were|became|becomes|remains|remained)\s+(?:a|an|the|one of)\b"
    r"|^[^,]{1,60},\s+(?:a|an|the)\s+[^,]{1,80},"
    r"|\b(?:refers? to|referred to as|(?:is|are) defined as|(?:also |better |commonly |widely )?known as|"
    r"(?:is|are) called|stands for|means|denotes)\b")
_WORD = re.compile(r"[^\W\d_][\w'’-]*")
_LEFT_PRONOUNS = frozenset("he she it they who which".split())
_RIGHT_PRONOUNS = frozenset("him her them".split())
_NOT_ENTITIES = _SENTENCE_OPENERS | frozenset(
    "I Of And Or But Who Whose Which Where Now Once Soon Early Late Together Originally Eventually Yesterday "
    "Tomorrow Following According Unless".split())


def _is_temporal(text: str) -> bool:
  return bool(_TEMPORAL.search(text)) or any(_is_year(text, m) for m in _YEAR.finditer(text))


def _is_year(text: str, m: re.Match) -> bool:
  """Whether a 1000-2099 number is a year, judged by the word after it (see `_AFTER_YEAR`)."""
  space, word = _NEXT_WORD.match(text, m.end()).groups()
  if not word or not word[0].islower() or word in _AFTER_YEAR:
    return True
  if not space:
    return False  # "1500km"
  return word not in _COUNT_WORDS and not word.endswith("s")


def _is_quantity(text: str) -> bool:
  return bool(_QUANTITY.search(text))


_YEARISH = re.compile(r"(?<![\d.,])\d{3,4}(?![\d%])")


def may_hold(text: str, atom_type: str) -> bool | None:
  """Whether `text` could state a value of `atom_type` — a date or year for temporal (any 3-4 digit number
  counts: a sentence's own type label may be another, "founded in 1871 by X" reads as temporal or relation), a
  number or amount for quantity; None for the types words cannot check (a name, a definition)."""
  if atom_type == "temporal":
    return bool(_YEARISH.search(text)) or _is_temporal(text)
  if atom_type == "quantity":  # years do not count ("born in 1943"), counts that look like years do ("1200 staff")
    return _is_quantity("".join(text[a:b] for a, b in _gaps([m.span() for m in _YEAR.finditer(text)
                                                             if _is_year(text, m)], len(text))))
  return None


def _gaps(spans: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
  """The stretches of [0, length) outside sorted, disjoint `spans`."""
  edges = [0] + [x for span in spans for x in span] + [length]
  return list(zip(edges[::2], edges[1::2]))


def _is_relation(text: str) -> bool:
  """A relation phrase with a named entity (or a subject pronoun) before it and a named entity after it."""
  for m in _RELATION.finditer(text):
    before = [w.group() for w in _WORD.finditer(text, 0, m.start())]
    after = [w.group() for w in _WORD.finditer(text, m.end())]
    if (any(_is_entity(w) or w.lower() in _LEFT_PRONOUNS for w in before)
        and any(_is_entity(w) or w in _RIGHT_PRONOUNS for w in after)):
      return True
  return False


def _is_entity(word: str) -> bool:
  """A capitalised word that is not a capitalised function word ("The", "In", "However")."""
  return word[0].isupper() and word not in _NOT_ENTITIES


def _is_definition(text: str) -> bool:
  return bool(_DEFINITION.search(text))


def _is_event(text: str) -> bool:
  return bool(_EVENT.search(text))


# The typer's rules, in precedence order: the first that matches gives the type, else "other".
# Temporal and quantity come first because a date or an amount is what "when"/"how many" questions ask for,
# so it is the atom's most retrievable content ("Mira Oskel founded the Tarnow Institute in 1871." is
# temporal). Relation comes before definition and event: a named relation between two entities is more
# specific than a copula ("Daskel is the capital of Vorland.") or an action. Definition comes before event:
# a main-clause copula defines its subject; an event verb after it is usually in a relative clause.
TYPE_RULES: tuple[tuple[str, Callable[[str], bool], tuple[str, ...]], ...] = (
    ("temporal", _is_temporal, ("Velkor Amsten was born in 1943.", "The bridge opened on 4 May 1962.",
                                "It was built in the 12th century.", "They met on a Tuesday in June.")),
    ("quantity", _is_quantity, ("The Tarnow Institute has 412 employees.", "The Tarnow Institute has 1500 members.",
                                "The dam cost $85 million.", "Mira Oskel has three children.")),
    ("relation", _is_relation, ("Mira Oskel founded the Tarnow Institute.", "Daskel is the capital of Vorland.",
                                "She works for Orvan Holdings.", "Brask Halloway was born in Daskel.")),
    ("definition", _is_definition, ("Daskel is a coastal city in Vorland.", "Velkor Amsten was a chemist.",
                                    "The term kelvar refers to a woven basket.")),
    ("event", _is_event, ("Mira Oskel won the Halden Prize.", "The Orvan Bridge collapsed.",
                          "Tesk Motors launched a new sedan.")),
)


def classify(text: str) -> str:
  """The semantic type of an atom's text by the first matching rule of `TYPE_RULES`, else "other"."""
  for atom_type, rule, _ in TYPE_RULES:
    if rule(text):
      return atom_type
  return "other"


# --------------------------------------------------------------------------------------------------------
# Building documents.


def atomize(text: str, doc_id: str, tokenizer, *, min_atom_tokens: int = 4,
            max_atom_tokens: int = 48) -> AtomizedDocument:
  """Splits `text` into typed atoms with the rule-based atomizer (see the module docstring)."""
  _require_text(text, doc_id)
  if not 0 <= 2 * min_atom_tokens <= max_atom_tokens:
    raise UserError(f"need 0 <= 2 * min_atom_tokens <= max_atom_tokens (got min {min_atom_tokens}, max "
                    f"{max_atom_tokens}): a split must not leave a piece below the minimum")
  ids, offsets = _encode(text, tokenizer)
  counter = _TokenCounter(text, offsets)
  spans = [piece for span in split_sentences(text)
           for piece in _split_long(span, text, counter, min_atom_tokens, max_atom_tokens)]
  spans = _merge_tiny(spans, text, counter, min_atom_tokens, max_atom_tokens)
  return _build(text, doc_id, ids, counter, spans, [classify(text[a:b]) for a, b in spans])


def atomize_given(text: str, doc_id: str, tokenizer, spans: Sequence[tuple[int, int]] | Sequence[str],
                  types: Sequence[str] | None = None) -> AtomizedDocument:
  """Atoms given by a dataset: character spans, or atom strings found in order in `text`.

  Atom i is given atom i, so a dataset's fact ids index the atoms. To keep the tiling, non-whitespace text
  between given atoms joins the atom before it (text before the first atom joins the first).
  """
  _require_text(text, doc_id)
  char_spans = _given_spans(text, doc_id, spans)
  if types is None:
    types = [classify(text[a:b]) for a, b in char_spans]
  _check_types(doc_id, types, len(char_spans))
  char_spans = _absorb_gaps(text, char_spans)
  ids, offsets = _encode(text, tokenizer)
  counter = _TokenCounter(text, offsets)
  for span in char_spans:
    if not counter.count(*span):
      raise UserError(f"document {doc_id}: atom span {span} {text[span[0]:span[1]]!r} holds no token of its own "
                      "(it lies inside a token that starts in the previous atom); join it to a neighbour")
  return _build(text, doc_id, ids, counter, char_spans, list(types))


def _require_text(text: str, doc_id: str) -> None:
  if not isinstance(text, str) or not text.strip():
    raise UserError(f"document {doc_id} is empty: nothing to atomize")


def _given_spans(text: str, doc_id: str, spans) -> list[tuple[int, int]]:
  """Validated, trimmed character spans from spans or strings; in order, in range, not overlapping."""
  spans = list(spans)
  if not spans:
    raise UserError(f"document {doc_id}: no atoms given")
  if all(isinstance(s, str) for s in spans):
    spans = _locate(text, doc_id, spans)
  out, prev_end = [], 0
  for span in spans:
    if not (isinstance(span, (tuple, list)) and len(span) == 2
            and all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in span)):
      raise UserError(f"document {doc_id}: atom {span!r} is neither a (start, end) span nor a string "
                      "(give all spans or all strings)")
    start, end = int(span[0]), int(span[1])
    if not 0 <= start < end <= len(text):
      raise UserError(f"document {doc_id}: atom span {(start, end)} is out of range for a text of {len(text)} "
                      "characters (need 0 <= start < end <= length)")
    if start < prev_end:
      raise UserError(f"document {doc_id}: atom span {(start, end)} overlaps or precedes the previous atom "
                      f"(ending at {prev_end}); give atoms in text order without overlaps")
    trimmed = _trim(text, start, end)
    if trimmed is None:
      raise UserError(f"document {doc_id}: atom span {(start, end)} holds only whitespace")
    out.append(trimmed)
    prev_end = end
  return out


def _locate(text: str, doc_id: str, atoms: list[str]) -> list[tuple[int, int]]:
  """Finds each atom string after the previous one."""
  spans, pos = [], 0
  for i, atom in enumerate(atoms):
    start = text.find(atom, pos) if atom.strip() else -1
    if start < 0:
      raise UserError(f"document {doc_id}: atom {i} {atom[:80]!r} is not in the text after the previous atom "
                      f"(from character {pos})")
    spans.append((start, start + len(atom)))
    pos = start + len(atom)
  return spans


def _check_types(doc_id: str, types: Sequence[str], n: int) -> None:
  if len(types) != n:
    raise UserError(f"document {doc_id}: {len(types)} types for {n} atoms")
  for t in types:
    if t not in ATOM_TYPES:
      raise UserError(f"document {doc_id}: unknown atom type {t!r}; valid: {', '.join(ATOM_TYPES)}")


def _absorb_gaps(text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
  """Widens each atom up to the next one's start (text before the first atom joins the first), trimmed."""
  next_starts = [a for a, _ in spans[1:]] + [len(text)]
  out = [(start, _trim(text, start, nxt)[1]) for (start, _), nxt in zip(spans, next_starts)]
  out[0] = (_trim(text, 0, out[0][1])[0], out[0][1])
  return out


def _build(text: str, doc_id: str, ids: list[int], counter: _TokenCounter, spans: list[tuple[int, int]],
           types: list[str]) -> AtomizedDocument:
  atoms = tuple(Atom(doc_id, i, text[a:b], t, a, b, *counter.token_span(a, b))
                for i, ((a, b), t) in enumerate(zip(spans, types)))
  doc = AtomizedDocument(doc_id, text, tuple(ids), atoms)
  check_tiling(doc)  # the per-token check (with offsets) holds by construction; the tests run it
  return doc


def check_tiling(doc: AtomizedDocument, offsets: Sequence[tuple[int, int]] | None = None) -> None:
  """Raises AssertionError unless the atoms tile the document's characters and tokens (module docstring).

  With the encoding's `offsets`, also checks that each token lies in its owner atom and that only
  text-less tokens at the ends (BOS, EOS) are left out.
  """
  text, atoms = doc.text, doc.atoms
  _expect(atoms, "no atoms")
  prev_end, prev_token_end = 0, None
  for i, atom in enumerate(atoms):
    where = f"atom {i} ({atom.char_start}, {atom.char_end})"
    _expect(atom.index == i and atom.doc_id == doc.doc_id, f"{where}: index {atom.index} / doc {atom.doc_id!r}")
    _expect(atom.type in ATOM_TYPES, f"{where}: unknown type {atom.type!r}")
    _expect(prev_end <= atom.char_start < atom.char_end <= len(text), f"{where}: out of order or empty")
    _expect(atom.text == text[atom.char_start:atom.char_end] and atom.text.strip() == atom.text,
            f"{where}: text is not the trimmed document slice")
    _expect(not text[prev_end:atom.char_start].strip(), f"{where}: non-whitespace text before it is in no atom")
    _expect(prev_token_end in (None, atom.token_start) and atom.token_start < atom.token_end,
            f"{where}: token span ({atom.token_start}, {atom.token_end}) is empty or not contiguous")
    prev_end, prev_token_end = atom.char_end, atom.token_end
  _expect(not text[prev_end:].strip(), "non-whitespace text after the last atom is in no atom")
  _expect(0 <= atoms[0].token_start and atoms[-1].token_end <= len(doc.token_ids), "token spans out of range")
  if offsets is not None:
    _check_token_owners(doc, offsets)


def _check_token_owners(doc: AtomizedDocument, offsets: Sequence[tuple[int, int]]) -> None:
  _expect(len(offsets) == len(doc.token_ids), "offsets and token ids differ in length")
  first, last = doc.atoms[0].token_start, doc.atoms[-1].token_end
  for t in [*range(first), *range(last, len(offsets))]:
    _expect(offsets[t][0] == offsets[t][1], f"token {t} {offsets[t]} has text but belongs to no atom")
  for atom in doc.atoms:
    for t in range(atom.token_start, atom.token_end):
      c = _first_non_space(doc.text, *offsets[t])
      _expect(c is None or atom.char_start <= c < atom.char_end,
              f"token {t} {offsets[t]} starts outside its atom {atom.index}")


def _expect(ok: bool, message: str) -> None:
  if not ok:
    raise AssertionError(f"atom tiling broken: {message}")
