"""Answer-text rules shared by the data readers and the metrics: SQuAD normalization, what counts as a
refusal or as an unanswerable question (no references, or only refusals like the synthetic "unknown"), and
the answer category an evaluation splits its tables by (`answer_category`).

They live with the data because the readers need them to label questions (`qa.QAExample.answerable`,
evidence matching, self-generated targets); `eval/metrics.py` scores with them.
"""

import re
import string
from collections.abc import Sequence

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
  """The official SQuAD normalization: lowercase, drop punctuation and articles, collapse whitespace."""
  s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", s).split())


# Refusals, matched on normalized text (so "I don't know." and "i dont know" are the same). A
# REFUSAL_ANSWERS entry must be the whole reply ("Unknown Soldier" is an answer, not a refusal); a
# REFUSAL_PHRASES entry may sit inside a longer reply ("Sorry, the text does not mention it."). The empty
# answer is a refusal too (SQuAD v2's convention for "no answer").
REFUSAL_ANSWERS = ("unknown", "unanswerable", "n/a", "none of the above")
REFUSAL_PHRASES = (
    "i don't know", "i do not know", "i am not sure", "i'm not sure",
    "cannot be determined", "can't be determined", "cannot be answered", "can't be answered",
    "cannot answer", "can't answer", "unable to answer", "unable to determine",
    "not mentioned", "does not mention", "doesn't mention", "not stated", "does not say", "doesn't say",
    "not specified", "not provided", "not given", "not enough information", "no information",
    "no answer", "not answerable", "not possible to answer",
)
_REFUSAL_ANSWERS = frozenset(normalize_answer(w) for w in REFUSAL_ANSWERS)
_REFUSAL_PHRASES = tuple(f" {normalize_answer(p)} " for p in REFUSAL_PHRASES)


def is_refusal(text: str) -> bool:
  """Whether `text` declines to answer (see REFUSAL_ANSWERS and REFUSAL_PHRASES)."""
  norm = normalize_answer(text)
  if not norm or norm in _REFUSAL_ANSWERS:
    return True
  padded = f" {norm} "
  return any(phrase in padded for phrase in _REFUSAL_PHRASES)


def is_unanswerable(references: Sequence[str]) -> bool:
  """No references, or only refusals ("unknown"): declining is the right answer."""
  return all(is_refusal(ref) for ref in references)


# Answer categories (DESIGN §8, §14): metrics are split by what kind of string the gold answer is, because a
# closed-pool value ("architect") can be learned in training, a generated name of an unseen world never can.
CATEGORIES = ("closed_pool", "number", "quantity", "name", "other")
CLOSED_POOL, NUMBER, QUANTITY, NAME, OTHER = CATEGORIES

_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?: (?:hundred|thousand|million|billion|trillion))?"
_UNITS = frozenset(
    "m metre metres meter meters km kilometre kilometres kilometer kilometers cm centimetre centimetres centimeter "
    "centimeters mm millimetre millimetres millimeter millimeters mile miles mi ft foot feet inch inches yard "
    "yards yd kg kilogram kilograms g gram grams mg t tonne tonnes ton tons lb lbs pound pounds oz ounce ounces l "
    "litre litres liter liters ml gallon gallons percent % degree degrees °c °f ° kelvin k hectare "
    "hectares acre acres year years month months week weeks day days hour hours h minute minutes min second "
    "seconds s sec km/h mph knots dollar dollars usd euro euros eur yen cent cents pence £ kw mw w watts volts v "
    "hz khz mhz ghz calories kcal bytes kb mb gb tb km2 m2 sq square cubic".split())
_NUMBER_ONLY = re.compile(rf"^{_NUMBER}$")
_NUMBER_THEN = re.compile(rf"^(?:[$£€¥] ?)?({_NUMBER}) ?(\S*)")


def _text_category(answer: str) -> str:
  """Real QA, where no generator says how the answer was made: digits alone are a number, digits followed by a
  unit word (or "%", or after a currency sign) a quantity, anything else other."""
  text = answer.strip().rstrip(".").strip()
  if _NUMBER_ONLY.match(text):
    return NUMBER
  m = _NUMBER_THEN.match(text)
  if m is None:
    return OTHER
  unit = m.group(2).lower().rstrip(".,;")
  return QUANTITY if unit in _UNITS or (text[:1] in "$£€¥" and not unit) else OTHER


def answer_category(references: Sequence[str] | str, known: str = "") -> str:
  """The answer category of a question (one of CATEGORIES), or "" for an unanswerable one (reported by refusal).

  `known`: what the question's generator recorded (synthetic worlds know how each value was made: a name,
  a closed-pool pick, a number, a quantity) and is returned as is; without it, the text rule of
  `_text_category` on the first reference (the one the evaluator scores).
  """
  if isinstance(references, str):
    references = (references,)
  if is_unanswerable(references):
    return ""
  if known:
    if known not in CATEGORIES:
      raise ValueError(f"unknown answer category {known!r}; valid: {', '.join(CATEGORIES)}")
    return known
  return _text_category(references[0])
