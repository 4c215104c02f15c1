"""Answer-text rules shared by the data readers and the metrics: SQuAD normalization, and what counts as a
refusal or as an unanswerable question (no references, or only refusals like the synthetic "unknown").

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
