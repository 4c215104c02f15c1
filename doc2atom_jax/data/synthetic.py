"""Synthetic "fact worlds" (DESIGN §6): the embedded default data and the controlled experiments.

A document is a small fictional world: people, organizations, cities and artifacts with names built from
syllables (so the base model cannot know them) and typed attributes and relations. It renders N facts, one
sentence each, in shuffled order, some with a pronoun for an entity the previous sentence named. Each
sentence is one atom (`SyntheticDocument.atomized`), so gold evidence indices are atom indices.

Questions per document: single-fact (answer = the fact's value), two-hop (a relation fact names an entity,
a second fact about that entity holds the answer: "In which year was the founder of the Tarnow Institute
born?"), and out-of-scope (an entity or attribute the document does not have; answer "unknown"). Each
carries an answer prefix (DESIGN §2.7), the start of the answer in the words a document would use: the stem of
the fact's statement template up to its value ("Sunrenith was first settled in" + " 1643"); for two-hop with
the via phrase as subject ("The founder of the Tarnow Institute was born in"), and for out-of-scope in the
same forms, so the prefix does not tell that the question cannot be answered. Each answerable question also
carries its answer category (`answers.CATEGORIES`), known from how the value was made: an entity is a
generated name, a profession or field a closed-pool pick, a year or count a number, a length a quantity.

Held-out templates (TEMPLATES): every attribute also has statement templates, question phrasings and via
phrases in other sentence shapes that only `templates="unseen"` uses, to evaluate documents and questions
written unlike any the training split ("seen", the default) contains.

Reproducibility: document i of a split is a pure function of (split, index, seed, arguments), drawn from
its own RNG (`numpy.random.SeedSequence(seed, spawn_key=(split, index))`), so a trainer can build any
document by index. The text does not depend on the question arguments, and which facts are asked does
not depend on `paraphrase`, so evaluation can ask the training facts in phrasings never trained on.

Disjoint worlds: every generated name word ("Velkor", "Tarnow", "Vorland") belongs to exactly one split
by a hash of the word (`name_split`), so no name appears in two splits. Within a document every name word
is unique. Across documents of one split a name can recur by chance (a few per thousand documents).
"""

import dataclasses
import hashlib
import json
import math
import numbers
from collections.abc import Sequence

import numpy as np

from doc2atom_jax import fileio
from doc2atom_jax.atoms import atomize
from doc2atom_jax.data import answers
from doc2atom_jax.errors import UserError

SPLITS = ("train", "validation", "test")
KINDS = ("single", "two_hop", "out_of_scope")
TEMPLATES = ("seen", "unseen")  # the statement/question forms a document uses: training's, or the held-out ones
UNKNOWN = "unknown"
NUM_PARAPHRASES = 3  # question phrasings per attribute: paraphrase indices 0, 1, 2
DATASET = "synthetic"


@dataclasses.dataclass(frozen=True)
class Fact:
  """One rendered fact: one sentence, one atom. `subject` is the real subject even behind a pronoun."""
  index: int
  text: str
  type: str
  subject: str
  attribute: str
  value: str
  template: str = ""  # the statement template it was rendered with (answer prefixes reuse its stem)


@dataclasses.dataclass(frozen=True)
class Question:
  """A question with gold labels; `evidence` are fact (= atom) indices, bridge fact first for two-hop."""
  qid: str
  question: str
  answer: str
  kind: str  # one of KINDS
  evidence: tuple[int, ...]
  evidence_types: tuple[str, ...]
  paraphrase: int
  subject: str = ""  # the entity asked about (for two-hop, the one the question names)
  attribute: str = ""  # for two-hop "relation>attribute", e.g. "founder>birth_year"
  answer_prefix: str = ""  # the start of the answer, prefilled in the assistant turn: "Sunrenith was first settled in"
  answer_category: str = ""  # answers.CATEGORIES, from how the answer's value was made; "" for out-of-scope


@dataclasses.dataclass(frozen=True)
class SyntheticDocument:
  """A rendered world: text, its facts with character spans, and questions about it."""
  doc_id: str
  world: str
  split: str
  text: str
  facts: tuple[Fact, ...]
  fact_spans: tuple[tuple[int, int], ...]
  questions: tuple[Question, ...]

  def atomized(self, tokenizer) -> atomize.AtomizedDocument:
    """The document as given atoms: fact i is atom i, typed by the generator."""
    return atomize.atomize_given(self.text, self.doc_id, tokenizer, self.fact_spans, [f.type for f in self.facts])

  def qa_records(self) -> list[dict]:
    """One QA JSONL record per question; the atoms ride along so a reader can rebuild atom indices."""
    spans = [list(span) for span in self.fact_spans]
    types = [f.type for f in self.facts]
    return [{"id": q.qid, "dataset": DATASET, "doc_id": self.doc_id, "context": self.text,
             "question": q.question, "answers": [q.answer], "kind": q.kind, "evidence": list(q.evidence),
             "evidence_types": list(q.evidence_types), "paraphrase": q.paraphrase, "split": self.split,
             "answer_prefix": q.answer_prefix, "atom_spans": spans, "atom_types": types} for q in self.questions]


# --------------------------------------------------------------------------------------------------------
# Names.

# Weighted by repetition: mostly plain consonant-vowel syllables ("Velkor Amsten", "Daskel", "Orlen").
_ONSETS = ("", "b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr",
           "st", "tr", "th", "sk", "b", "d", "k", "l", "m", "n", "r", "s", "t", "v")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "a", "e", "i", "o", "y", "ae")
_CODAS = ("", "", "", "", "", "l", "n", "r", "s", "k", "m", "l", "n", "r", "st", "sk", "rn", "nd", "lk", "rk")
_FEMALE_ENDINGS = ("a", "ia", "ine", "elle", "ra", "is", "wen")
_MALE_ENDINGS = ("or", "an", "ek", "ard", "us", "orn", "ed")
_SURNAME_ENDINGS = ("", "", "", "sten", "ow", "ek", "ard", "vik", "in", "ley")
_CITY_ENDINGS = ("", "", "", "el", "ow", "en", "ith", "burg", "mere")
_COUNTRY_ENDINGS = ("land", "ia", "mark", "ora", "heim")
_LANGUAGE_ENDINGS = ("ish", "ic", "ese", "ian")
# Name words must not read as English words the atomizer's typer keys on ("May", "Ten", "Born").
_BLOCKED_WORDS = frozenset(
    "january february march april may june july august september october november december monday tuesday "
    "wednesday thursday friday saturday sunday one two three four five six seven eight nine ten eleven twelve "
    "twenty thirty forty fifty sixty seventy eighty ninety hundred hundreds thousand thousands million "
    "millions billion dozen dozens born borne bound held hold gold bold told sold fold kind mind find bind "
    "band land hand sand stand grand brand bend lend mend send tend vend rend fend then than them they "
    "these those there here where were when what with from into onto over under after before during since "
    "until while about above below this that have having been being done gone none some same more most "
    "also very just only even ever never else once thus then ago early late later last next soon upon "
    "many much each every both either neither other another such whose which while whom".split())


def name_split(word: str) -> str:
  """The split a generated name word belongs to: a stable hash, so splits never share a name."""
  digest = hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest()
  return SPLITS[int.from_bytes(digest, "big") % len(SPLITS)]


def _pick(rng: np.random.Generator, items: Sequence):
  """A uniform choice that keeps the item's Python type (numpy's choice would turn str into np.str_)."""
  return items[int(rng.integers(len(items)))]


def _syllable(rng: np.random.Generator) -> str:
  return _pick(rng, _ONSETS) + _pick(rng, _VOWELS) + _pick(rng, _CODAS)


def _pronounceable(word: str) -> bool:
  """No three consonants or vowels in a row and no doubled letter: "Tarnow", not "Laernnosk"."""
  word = word.lower()
  if any(a == b for a, b in zip(word, word[1:])):
    return False
  run, vowel = 0, None
  for c in word:
    is_vowel = c in "aeiouy"
    run = run + 1 if is_vowel == vowel else 1
    vowel = is_vowel
    if run >= 3:
      return False
  return True


class _Namer:
  """Fresh name words of one split, unique within one document."""

  def __init__(self, split: str):
    self.split = split
    self.used: set[str] = set()  # membership only: never iterated, so hash order cannot leak into output

  def word(self, rng: np.random.Generator, syllables: Sequence[int] = (2,), endings: Sequence[str] = ("",)) -> str:
    """A capitalized word of `syllables` (a choice) and an ending, in this split and new in this document."""
    while True:
      n = _pick(rng, syllables)
      word = ("".join(_syllable(rng) for _ in range(n)) + _pick(rng, endings)).capitalize()
      if (4 <= len(word) <= 9 and word.lower() not in _BLOCKED_WORDS and word not in _FIXED_WORDS
          and _pronounceable(word)
          and word not in self.used and name_split(word) == self.split):
        self.used.add(word)
        return word


# --------------------------------------------------------------------------------------------------------
# Entities and the attribute schema.


@dataclasses.dataclass(frozen=True)
class _Entity:
  """A named thing. Subjects are people, orgs, cities, artifacts; other kinds only appear as values."""
  name: str  # bare, as answers give it: "Tarnow Institute"
  kind: str
  article: str = ""  # "the" for "the Tarnow Institute"
  gender: str = ""  # people: "female" / "male"
  noun: str = ""  # what "The institute" / "The city" calls it

  @property
  def mention(self) -> str:
    return f"{self.article} {self.name}" if self.article else self.name


@dataclasses.dataclass(frozen=True)
class _Value:
  """An attribute value: the short answer, how the text mentions it, the entity it names (if any), and its
  answer category (`answers.CATEGORIES`), known here from how the value was made."""
  answer: str
  mention: str
  entity: _Entity | None = None
  category: str = ""


def _entity_value(entity: _Entity) -> _Value:
  """Every entity value is a generated name (a person, an organization, a prize, a language, ...)."""
  return _Value(entity.name, entity.mention, entity, answers.NAME)


def _literal(text: str, category: str) -> _Value:
  return _Value(text, text, category=category)


@dataclasses.dataclass(frozen=True)
class _Attribute:
  """How one attribute is stated (`{s}` subject, `{v}` value) and asked (`{x}` the subject phrase).

  `via` describes the value in terms of the subject ("the founder of {s}") for two-hop questions; only
  entity-valued attributes have it. `{a_v}`/`{a_noun}` are the value/noun with "a"/"an"; `{noun}` is the
  subject's noun; `{spouse}` is "wife"/"husband".

  The `unseen_*` forms are held out (TEMPLATES): only `document(..., templates="unseen")` uses them, so an
  evaluation can ask about documents written in sentence shapes training never saw.
  """
  name: str
  type: str
  statements: tuple[str, ...]
  questions: tuple[str, ...]
  via: tuple[str, ...] = ()
  unseen_statements: tuple[str, ...] = ()
  unseen_questions: tuple[str, ...] = ()  # NUM_PARAPHRASES of them: paraphrase p asks the p-th
  unseen_via: tuple[str, ...] = ()

  def forms(self, templates: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(statements, questions, via) of the seen or the held-out forms."""
    if templates == "unseen":
      return self.unseen_statements, self.unseen_questions, self.unseen_via
    return self.statements, self.questions, self.via


def _attr(name, type_, statements, questions, via=(), unseen=((), ())) -> _Attribute:
  """`unseen`: (statements, questions) held out, plus the held-out via phrases where `via` is given."""
  unseen_statements, unseen_questions, unseen_via = (*unseen, ())[:3]
  return _Attribute(name, type_, tuple(statements), tuple(questions), tuple(via), tuple(unseen_statements),
                    tuple(unseen_questions), tuple(unseen_via))


SCHEMA: dict[str, tuple[_Attribute, ...]] = {
    "person": (
        _attr("birth_year", "temporal",
              ["{s} was born in {v}.", "{s} was born in the year {v}.", "{s}'s year of birth is {v}."],
              ["In which year was {x} born?", "When was {x} born?", "What is the birth year of {x}?"],
              unseen=(["Records show that {s} was born in {v}.", "The year {v} saw the birth of {s}."],
                      ["Tell me the year {x} was born.", "Which year saw the birth of {x}?",
                       "{x} was born in what year?"])),
        _attr("birthplace", "relation",
              ["{s} was born in {v}.", "{s} was born in the city of {v}.", "{s} was born in {v} and grew up there.",
               "{s} is a native of {v}."],
              ["Where was {x} born?", "In which city was {x} born?", "What is the birthplace of {x}?"],
              ["the city where {s} was born", "the birthplace of {s}"],
              unseen=(["According to the records, {s} was born in {v}.", "{s} was born in {v} to a large family."],
                      ["Name the city where {x} was born.", "{x} was born in which city?",
                       "What city does {x} come from?"],
                      ["the hometown of {s}"])),
        _attr("profession", "definition",
              ["{s} is {a_v}.", "{s} is {a_v} by profession.", "{s} is {a_v} by training.", "{s} works as {a_v}."],
              ["What is the profession of {x}?", "What does {x} do for a living?", "What is {x} by profession?"],
              unseen=(["{s} is widely known as {a_v}.", "{s} is a trained {v}."],
                      ["Name the profession of {x}.", "What job does {x} have?", "{x} works in which profession?"])),
        _attr("employer", "relation",
              ["{s} works for {v}.", "{s} is employed by {v}.", "{s} works at {v}."],
              ["Which organization does {x} work for?", "Who employs {x}?", "Where does {x} work?"],
              ["the employer of {s}", "the organization that employs {s}"],
              unseen=(["{s} currently works for {v}.", "{s} has worked at {v} for many years."],
                      ["Name the employer of {x}.", "{x} works for which organization?",
                       "For which organization does {x} work?"],
                      ["the workplace of {s}"])),
        _attr("spouse", "relation",
              ["{s} is married to {v}.", "{s} is the {spouse} of {v}.", "{s} married {v}.", "{s} and {v} are married."],
              ["Who is {x} married to?", "Who is the spouse of {x}?", "To whom is {x} married?"],
              ["the spouse of {s}"],
              unseen=(["{s} is wed to {v}.", "{s} has been married to {v} for years."],
                      ["Name the spouse of {x}.", "{x} is married to whom?", "Whom did {x} marry?"],
                      ["the partner of {s}"])),
        _attr("mentor", "relation",
              ["{s} studied under {v}.", "{s} was a student of {v}.", "{v} mentored {s}."],
              ["Who was the mentor of {x}?", "Under whom did {x} study?", "Who taught {x}?"],
              ["the mentor of {s}"],
              unseen=(["{s} trained under {v}.", "{v} supervised {s} as a student."],
                      ["Name the mentor of {x}.", "{x} studied under whom?", "Who trained {x}?"],
                      ["the teacher of {s}"])),
        _attr("award", "event",
              ["{s} won {v}.", "{s} received {v}.", "{s} was awarded {v}."],
              ["Which prize did {x} win?", "What award did {x} receive?", "Which prize was awarded to {x}?"],
              unseen=(["{s} earned {v}.", "{v} was awarded to {s}."],
                      ["Name the prize {x} won.", "{x} won which prize?", "Which honour did {x} earn?"])),
        _attr("language", "other",
              ["{s} speaks {v}.", "{s} speaks fluent {v}.", "{s}'s mother tongue is {v}."],
              ["Which language does {x} speak?", "What is the native language of {x}?",
               "In which language is {x} fluent?"],
              unseen=(["{s} grew up speaking {v}.", "At home, {s} speaks {v}."],
                      ["Name the language {x} speaks.", "{x} speaks which language?",
                       "What is the first language of {x}?"])),
        _attr("height", "quantity",
              ["{s} is {v} tall.", "{s} stands {v} tall.", "{s} has a height of {v}."],
              ["How tall is {x}?", "What is the height of {x}?", "How tall does {x} stand?"],
              unseen=(["The height of {s} is {v}.", "{s} is {v} in height."],
                      ["Tell me the height of {x}.", "{x} is how tall?", "What height does {x} stand at?"])),
    ),
    "org": (
        _attr("founder", "relation",
              ["{v} founded {s}.", "{s} was founded by {v}.", "{s} was established by {v}.",
               "The founder of {s} was {v}."],
              ["Who founded {x}?", "Who is the founder of {x}?", "By whom was {x} founded?"],
              ["the founder of {s}"],
              unseen=(["{s} was set up by {v}.", "It was {v} who founded {s}."],
                      ["Name the founder of {x}.", "{x} was founded by whom?", "Who set up {x}?"],
                      ["the person who set up {s}"])),
        _attr("founded_year", "temporal",
              ["{s} was founded in {v}.", "{s} was established in {v}.", "{s} has existed since {v}."],
              ["When was {x} founded?", "In which year was {x} established?", "What year was {x} founded in?"],
              unseen=(["{s} opened its doors in {v}.", "Since its founding in {v}, {s} has grown steadily."],
                      ["Tell me the year {x} was founded.", "{x} was founded in what year?",
                       "Since which year has {x} existed?"])),
        _attr("headquarters", "relation",
              ["{s} is headquartered in {v}.", "{s} is based in {v}.", "{s} is located in {v}.",
               "The headquarters of {s} are in {v}."],
              ["Where is {x} headquartered?", "In which city is {x} based?", "Where are the headquarters of {x}?"],
              ["the city where {s} is headquartered", "the home city of {s}"],
              unseen=(["{s} has its headquarters in {v}.", "{s} runs its business from {v}."],
                      ["Name the city where {x} is headquartered.", "{x} is based in which city?",
                       "Which city hosts the headquarters of {x}?"],
                      ["the seat of {s}"])),
        _attr("employees", "quantity",
              ["{s} has {v} employees.", "{s} employs {v} people.", "{s} has a staff of {v}."],
              ["How many employees does {x} have?", "How many people does {x} employ?",
               "How large is the staff of {x}?"],
              unseen=(["{s} employs a staff of {v}.", "A total of {v} people work at {s}."],
                      ["Tell me how many employees {x} has.", "{x} employs how many people?",
                       "What is the headcount of {x}?"])),
        _attr("director", "relation",
              ["{v} directs {s}.", "{s} is led by {v}.", "{v} is the director of {s}."],
              ["Who directs {x}?", "Who is the director of {x}?", "Who leads {x}?"],
              ["the director of {s}"],
              unseen=(["{s} is headed by {v}.", "{v} heads {s}."],
                      ["Name the director of {x}.", "{x} is directed by whom?", "Who is at the head of {x}?"],
                      ["the head of {s}"])),
        _attr("field", "definition",
              ["{s} is {a_noun} devoted to {v}.", "{s} is {a_noun} specializing in {v}.",
               "{s} is one of the leading names in {v}."],
              ["In which field is {x} active?", "What does {x} specialize in?", "What field does {x} work in?"],
              unseen=(["{s} works mainly in {v}.", "{s} is known as a pioneer of {v}."],
                      ["Name the field of {x}.", "{x} is active in which field?", "What is the main field of {x}?"])),
        _attr("event", "event",
              ["{s} hosted {v}.", "{s} organized {v}.", "{v} was held at {s}."],
              ["Which event did {x} host?", "What event did {x} organize?", "Which event was held at {x}?"],
              unseen=(["{s} staged {v}.", "{v} took place at {s}."],
                      ["Name the event {x} hosted.", "{x} hosted which event?", "Which event took place at {x}?"])),
    ),
    "city": (
        _attr("country", "relation",
              ["{s} is located in {v}.", "{s} lies in {v}.", "{s} is situated in {v}."],
              ["In which country is {x}?", "In which country is {x} located?", "Which country is {x} in?"],
              unseen=(["{s} is part of {v}.", "{s} belongs to {v}."],
                      ["Name the country {x} is in.", "{x} is in which country?",
                       "To which country does {x} belong?"])),
        _attr("population", "quantity",
              ["{s} has a population of {v}.", "{s} has {v} inhabitants.", "{v} people live in {s}."],
              ["What is the population of {x}?", "How many people live in {x}?",
               "How many inhabitants does {x} have?"],
              unseen=(["The population of {s} is {v}.", "{s} is home to {v} people."],
                      ["Tell me the population of {x}.", "{x} has how many inhabitants?",
                       "How many residents does {x} have?"])),
        _attr("founded_year", "temporal",
              ["{s} was founded in {v}.", "{s} dates back to {v}.", "{s} was first settled in {v}."],
              ["When was {x} founded?", "In which year was {x} founded?", "What year does {x} date back to?"],
              unseen=(["{s} was established as a settlement in {v}.", "The first settlers arrived in {s} in {v}."],
                      ["Tell me the year {x} was founded.", "{x} was founded in what year?",
                       "In what year did settlers first arrive in {x}?"])),
        _attr("elevation", "quantity",
              ["{s} lies at an elevation of {v}.", "{s} sits {v} above sea level.", "{s} is {v} above sea level."],
              ["At what elevation does {x} lie?", "How high above sea level is {x}?",
               "What is the elevation of {x}?"],
              unseen=(["The elevation of {s} is {v}.", "{s} stands at {v} above sea level."],
                      ["Tell me the elevation of {x}.", "{x} lies how high above sea level?",
                       "How far above sea level does {x} stand?"])),
        _attr("river", "relation",
              ["{s} lies on {v}.", "{v} flows through {s}.", "{s} is situated on {v}."],
              ["Which river flows through {x}?", "On which river does {x} lie?", "What river runs through {x}?"],
              unseen=(["{s} was built on the banks of {v}.", "{v} runs through {s}."],
                      ["Name the river that flows through {x}.", "{x} lies on which river?",
                       "Which river runs past {x}?"])),
        _attr("mayor", "relation",
              ["{v} is the mayor of {s}.", "{v} serves as the mayor of {s}.", "{s} is led by its mayor, {v}."],
              ["Who is the mayor of {x}?", "Who serves as mayor of {x}?", "Who leads {x} as its mayor?"],
              ["the mayor of {s}"],
              unseen=(["The office of mayor of {s} is held by {v}.", "{v} governs {s} as mayor."],
                      ["Name the mayor of {x}.", "{x} is governed by which mayor?",
                       "Who holds the office of mayor in {x}?"],
                      ["the person who governs {s}"])),
    ),
    "artifact": (
        _attr("designer", "relation",
              ["{s} was designed by {v}.", "{v} designed {s}.", "{s} was invented by {v}."],
              ["Who designed {x}?", "Who is the designer of {x}?", "Who invented {x}?"],
              ["the designer of {s}"],
              unseen=(["The design of {s} is the work of {v}.", "{v} created {s}."],
                      ["Name the designer of {x}.", "{x} was designed by whom?", "Whose design is {x}?"],
                      ["the creator of {s}"])),
        _attr("maker", "relation",
              ["{s} is produced by {v}.", "{v} manufactures {s}.", "{s} is built by {v}."],
              ["Which organization makes {x}?", "Who manufactures {x}?", "Who produces {x}?"],
              ["the maker of {s}", "the manufacturer of {s}"],
              unseen=(["{s} is manufactured by {v}.", "{v} builds {s} in its own workshops."],
                      ["Name the maker of {x}.", "{x} is produced by which organization?", "Which company builds {x}?"],
                      ["the company that builds {s}"])),
        _attr("completed_year", "temporal",
              ["{s} was completed in {v}.", "{s} was finished in {v}.", "Work on {s} was completed in {v}."],
              ["When was {x} completed?", "In which year was {x} finished?", "What year was {x} completed in?"],
              unseen=(["Construction of {s} ended in {v}.", "{s} was ready for use in {v}."],
                      ["Tell me the year {x} was completed.", "{x} was completed in what year?",
                       "In what year was work on {x} finished?"])),
        _attr("weight", "quantity",
              ["{s} weighs {v}.", "{s} has a mass of {v}.", "{s} weighs exactly {v}."],
              ["How much does {x} weigh?", "What is the weight of {x}?", "How heavy is {x}?"],
              unseen=(["The weight of {s} is {v}.", "{s} tips the scales at {v}."],
                      ["Tell me the weight of {x}.", "{x} weighs how much?", "How many kilograms does {x} weigh?"])),
        _attr("length", "quantity",
              ["{s} is {v} long.", "{s} measures {v} in length.", "{s} has a length of {v}."],
              ["How long is {x}?", "What is the length of {x}?", "How long does {x} measure?"],
              unseen=(["The length of {s} is {v}.", "{s} spans {v} from end to end."],
                      ["Tell me the length of {x}.", "{x} is how long?", "What length does {x} measure?"])),
        _attr("category", "definition",
              ["{s} is {a_v}.", "{s} is {a_v} of unusual design.", "{s} is an early example of {a_v}."],
              ["What kind of {noun} is {x}?", "What type of {noun} is {x}?", "Which kind of {noun} is {x}?"],
              unseen=(["{s} is best described as {a_v}.", "{s} counts as {a_v}."],
                      ["Name the kind of {noun} {x} is.", "{x} is what kind of {noun}?",
                       "Which sort of {noun} is {x}?"])),
    ),
}
SUBJECT_KINDS = tuple(SCHEMA)
_ATTRIBUTES = {(kind, a.name): a for kind, attrs in SCHEMA.items() for a in attrs}

_PROFESSIONS = ("chemist", "architect", "engineer", "botanist", "cartographer", "physician", "sculptor",
                "geologist", "astronomer", "surveyor", "glassblower", "watchmaker", "historian", "linguist",
                "mathematician", "painter", "pharmacist", "shipwright", "economist", "librarian")
_FIELDS = ("optics", "shipbuilding", "textiles", "metallurgy", "agriculture", "cartography", "medicine",
           "clockmaking", "printing", "glassmaking", "astronomy", "mining", "ceramics", "brewing", "forestry")
_ORG_FORMS = (("Institute", "the", "institute"), ("Society", "the", "society"),
              ("Foundation", "the", "foundation"), ("Company", "the", "company"), ("Holdings", "", "company"),
              ("Works", "", "company"), ("Laboratories", "", "laboratory"), ("Academy", "the", "academy"),
              ("Guild", "the", "guild"))
# Artifact noun -> (categories, length range in metres, weight range in kilograms).
_ARTIFACTS = {
    "Engine": (("steam engine", "rotary engine", "diesel engine"), (1.2, 8.0), (300, 9000)),
    "Lens": (("telescope lens", "camera lens", "magnifying lens"), (0.05, 1.2), (0.4, 80)),
    "Clock": (("tower clock", "pendulum clock", "water clock"), (0.3, 6.0), (5, 2000)),
    "Loom": (("power loom", "hand loom", "ribbon loom"), (1.0, 4.0), (80, 900)),
    "Press": (("printing press", "hydraulic press", "cider press"), (0.8, 5.0), (50, 6000)),
    "Lamp": (("oil lamp", "arc lamp", "signal lamp"), (0.2, 1.5), (1, 40)),
    "Pump": (("water pump", "piston pump", "steam pump"), (0.4, 3.0), (10, 800)),
    "Telescope": (("reflecting telescope", "refracting telescope", "solar telescope"), (0.5, 20.0), (5, 20000)),
}
_PRIZE_FORMS = ("Prize", "Medal", "Award")
_EVENT_FORMS = ("Conference", "Symposium", "Congress", "Fair", "Exhibition")
# The words of multi-word names that are not generated ("Institute", "River"): never a generated word.
_FIXED_WORDS = frozenset([form for form, _, _ in _ORG_FORMS] + list(_ARTIFACTS) + list(_PRIZE_FORMS)
                         + list(_EVENT_FORMS) + ["River"])
_SPOUSE_WORDS = {"female": "wife", "male": "husband"}
_PRONOUNS = {"female": "She", "male": "He"}
_KIND_WEIGHTS = {"person": 0.4, "org": 0.25, "city": 0.2, "artifact": 0.15}
_P_EXISTING = 0.75  # a relation names an entity of the document (not a fresh one) this often, if it can
_CHAIN_RATE = 0.9  # documents that get one two-hop chain planted (more arise by chance)
_PRONOUN_RATE = 0.5  # of the sentences where a pronoun would be unambiguous


def _new_entity(rng: np.random.Generator, namer: _Namer, kind: str) -> _Entity:
  """A fresh entity of `kind`, named with words new in this document."""
  if kind == "person":
    gender = _pick(rng, ("female", "male"))
    first = namer.word(rng, (1, 1, 2), _FEMALE_ENDINGS if gender == "female" else _MALE_ENDINGS)
    return _Entity(f"{first} {namer.word(rng, (2,), _SURNAME_ENDINGS)}", kind, gender=gender)
  if kind == "org":
    form, article, noun = _pick(rng, _ORG_FORMS)
    return _Entity(f"{namer.word(rng)} {form}", kind, article, noun=noun)
  if kind == "city":
    return _Entity(namer.word(rng, (2,), _CITY_ENDINGS), kind, noun="city")
  if kind == "artifact":
    noun = _pick(rng, tuple(_ARTIFACTS))
    return _Entity(f"{namer.word(rng)} {noun}", kind, "the", noun=noun.lower())
  if kind == "country":
    return _Entity(namer.word(rng, (1, 2), _COUNTRY_ENDINGS), kind)
  if kind == "river":
    return _Entity(f"{namer.word(rng)} River", kind, "the", noun="river")
  if kind == "prize":
    return _Entity(f"{namer.word(rng)} {_pick(rng, _PRIZE_FORMS)}", kind, "the")
  if kind == "event":
    return _Entity(f"{namer.word(rng)} {_pick(rng, _EVENT_FORMS)}", kind, "the")
  if kind == "language":
    return _Entity(namer.word(rng, (2,), _LANGUAGE_ENDINGS), kind)
  raise ValueError(f"unknown entity kind {kind!r}")


# --------------------------------------------------------------------------------------------------------
# Building a world: entities, then their literal values, then relations, then years that depend on them.


@dataclasses.dataclass
class _World:
  """The document's subjects and every attribute value they have (rendered or not)."""
  entities: list[_Entity]
  values: dict[tuple[str, str], _Value] = dataclasses.field(default_factory=dict)  # (subject, attribute)
  births: dict[str, int] = dataclasses.field(default_factory=dict)  # people, also value-only ones
  founded: dict[str, int] = dataclasses.field(default_factory=dict)  # organizations, also value-only ones

  def of_kind(self, kind: str) -> list[_Entity]:
    return [e for e in self.entities if e.kind == kind]

  def attributes(self, entity: _Entity) -> list[_Attribute]:
    """The attributes `entity` has a value for, in schema order."""
    return [a for a in SCHEMA.get(entity.kind, ()) if (entity.name, a.name) in self.values]


def _build_world(rng: np.random.Generator, namer: _Namer, n_facts: int) -> _World:
  """Enough entities for `n_facts` facts (each subject has at least 5 attributes), with all their values."""
  n_entities = max(2, math.ceil(n_facts / rng.uniform(2.5, 4.0)))
  kinds, weights = list(_KIND_WEIGHTS), np.array(list(_KIND_WEIGHTS.values()))
  chosen = ["person"] + [kinds[int(k)] for k in rng.choice(len(kinds), size=n_entities - 1, p=weights)]
  world = _World([_new_entity(rng, namer, kind) for kind in chosen])
  _literal_values(rng, namer, world)
  _relation_values(rng, namer, world)
  _dependent_years(rng, world)
  return world


def _literal_values(rng: np.random.Generator, namer: _Namer, world: _World) -> None:
  """Values that depend on nothing else: years of birth and settlement, quantities, kinds, named things."""
  for e in world.entities:
    for attr, value in _LITERALS[e.kind](rng, namer, e).items():
      world.values[(e.name, attr)] = value
    if e.kind == "person":
      world.births[e.name] = int(world.values[(e.name, "birth_year")].answer)


def _person_literals(rng: np.random.Generator, namer: _Namer, e: _Entity) -> dict[str, _Value]:
  return {"birth_year": _literal(str(int(rng.integers(1900, 1986))), answers.NUMBER),
          "profession": _literal(_pick(rng, _PROFESSIONS), answers.CLOSED_POOL),
          "award": _entity_value(_new_entity(rng, namer, "prize")),
          "language": _entity_value(_new_entity(rng, namer, "language")),
          "height": _literal(_metres(rng.uniform(1.52, 1.98), decimals=2), answers.QUANTITY)}


def _org_literals(rng: np.random.Generator, namer: _Namer, e: _Entity) -> dict[str, _Value]:
  return {"employees": _literal(f"{_round_count(rng, 12, 25000):,}", answers.NUMBER),
          "field": _literal(_pick(rng, _FIELDS), answers.CLOSED_POOL),
          "event": _entity_value(_new_entity(rng, namer, "event"))}


def _city_literals(rng: np.random.Generator, namer: _Namer, e: _Entity) -> dict[str, _Value]:
  return {"country": _entity_value(_new_entity(rng, namer, "country")),
          "population": _literal(f"{_round_count(rng, 2000, 900000):,}", answers.NUMBER),
          "founded_year": _literal(str(int(rng.integers(1050, 1851))), answers.NUMBER),
          "elevation": _literal(f"{_round_count(rng, 5, 2400):,} metres", answers.QUANTITY),
          "river": _entity_value(_new_entity(rng, namer, "river"))}


def _artifact_literals(rng: np.random.Generator, namer: _Namer, e: _Entity) -> dict[str, _Value]:
  categories, lengths, (light, heavy) = _ARTIFACTS[e.noun.capitalize()]
  return {"category": _literal(_pick(rng, categories), answers.CLOSED_POOL),
          "length": _literal(_metres(rng.uniform(*lengths)), answers.QUANTITY),
          "weight": _literal(_kilograms(float(np.exp(rng.uniform(np.log(light), np.log(heavy))))), answers.QUANTITY)}


_LITERALS = {"person": _person_literals, "org": _org_literals, "city": _city_literals,
             "artifact": _artifact_literals}


def _round_count(rng: np.random.Generator, lo: float, hi: float) -> int:
  """A log-uniform integer in [lo, hi] rounded to two significant digits (as documents round counts)."""
  x = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
  step = 10 ** max(0, int(math.floor(math.log10(x))) - 1)
  return max(1, int(round(x / step)) * step)


def _metres(x: float, decimals: int = 1) -> str:
  if x < 1:
    return f"{round(x * 100)} centimetres"
  return f"{x:.{decimals}f}".rstrip("0").rstrip(".") + " metres"


def _kilograms(x: float) -> str:
  return f"{x:.1f}".rstrip("0").rstrip(".") + " kilograms" if x < 10 else f"{int(round(x)):,} kilograms"


def _relation_values(rng: np.random.Generator, namer: _Namer, world: _World) -> None:
  """Entity-valued attributes; most name an entity of the document, so two-hop chains arise."""
  people = world.of_kind("person")
  _marry(rng, namer, world, people)
  for e in world.entities:
    if e.kind == "person":
      world.values[(e.name, "birthplace")] = _relative(rng, namer, world, "city")
      world.values[(e.name, "employer")] = _relative(rng, namer, world, "org")
      if rng.random() < 0.7:
        older = [p for p in people if world.births[p.name] <= world.births[e.name] - 12]
        world.values[(e.name, "mentor")] = _relative(
            rng, namer, world, "person", older, birth=world.births[e.name] - int(rng.integers(15, 36)))
    elif e.kind == "org":
      world.values[(e.name, "founder")] = _relative(rng, namer, world, "person")
      world.values[(e.name, "director")] = _relative(rng, namer, world, "person")
      world.values[(e.name, "headquarters")] = _relative(rng, namer, world, "city")
    elif e.kind == "city":
      world.values[(e.name, "mayor")] = _relative(rng, namer, world, "person")
    elif e.kind == "artifact":
      world.values[(e.name, "designer")] = _relative(rng, namer, world, "person")
      world.values[(e.name, "maker")] = _relative(rng, namer, world, "org")


def _marry(rng: np.random.Generator, namer: _Namer, world: _World, people: list[_Entity]) -> None:
  """Pairs some people of the document (only one of a pair states it), gives others a fresh spouse.

  One direction only, so "Who is A married to?" has exactly one evidence fact.
  """
  order = [people[int(i)] for i in rng.permutation(len(people))]
  single = []
  while order:
    a = order.pop()
    partner = next((b for b in order if abs(world.births[a.name] - world.births[b.name]) <= 12), None)
    if partner is not None and rng.random() < 0.5:
      order.remove(partner)
      world.values[(a.name, "spouse")] = _entity_value(partner)
    else:
      single.append(a)
  for a in single:
    if rng.random() < 0.4:
      birth = world.births[a.name] + int(rng.integers(-8, 9))
      world.values[(a.name, "spouse")] = _relative(rng, namer, world, "person", [], birth=birth)


def _relative(rng: np.random.Generator, namer: _Namer, world: _World, kind: str,
              candidates: list[_Entity] | None = None, birth: int | None = None) -> _Value:
  """An entity of the document (from `candidates`, default all of `kind`) or, sometimes, a fresh one."""
  candidates = world.of_kind(kind) if candidates is None else candidates
  if candidates and rng.random() < _P_EXISTING:
    return _entity_value(_pick(rng, candidates))
  fresh = _new_entity(rng, namer, kind)
  if kind == "person":
    world.births[fresh.name] = birth if birth is not None else int(rng.integers(1900, 1986))
  return _entity_value(fresh)


def _dependent_years(rng: np.random.Generator, world: _World) -> None:
  """Founding years after the founder's birth; completion after the designer's birth and the maker's founding."""
  for e in world.entities:
    if e.kind == "org":
      world.founded[e.name] = world.births[world.values[(e.name, "founder")].answer] + int(rng.integers(25, 41))
      world.values[(e.name, "founded_year")] = _literal(str(world.founded[e.name]), answers.NUMBER)
  for e in world.entities:
    if e.kind == "artifact":
      maker = world.values[(e.name, "maker")].answer
      founded = world.founded.setdefault(maker, int(rng.integers(1880, 2000)))  # a value-only maker
      designed = world.births[world.values[(e.name, "designer")].answer] + int(rng.integers(25, 51))
      year = min(max(designed, founded + int(rng.integers(1, 16))), 2024)
      world.values[(e.name, "completed_year")] = _literal(str(year), answers.NUMBER)


# --------------------------------------------------------------------------------------------------------
# Choosing and rendering facts.

_Key = tuple[str, str]  # (subject name, attribute name)


def _chains(world: _World, keys: Sequence[_Key]) -> list[tuple[_Key, _Key]]:
  """Pairs (relation naming entity E, another attribute of E) among `keys`, in `keys` order.

  The second fact must not simply point back at the first's subject ("the spouse of A's spouse").
  """
  subjects = {e.name: e for e in world.entities}
  kinds = {e.name: e.kind for e in world.entities}
  present = set(keys)
  out = []
  for first in keys:
    attr = _ATTRIBUTES[(kinds[first[0]], first[1])]
    target = world.values[first].entity
    if not attr.via or target is None or target.name not in subjects:
      continue
    for a in world.attributes(subjects[target.name]):
      second = (target.name, a.name)
      if second in present and world.values[second].answer != first[0]:
        out.append((first, second))
  return out


def _select_facts(rng: np.random.Generator, world: _World, n: int) -> list[_Key]:
  """`n` facts in document order: usually one planted chain, at least one fact per subject, the rest at random."""
  candidates = [(e.name, a.name) for e in world.entities for a in world.attributes(e)]
  if len(candidates) < n:
    raise AssertionError(f"world has {len(candidates)} facts for a {n}-fact document")
  chosen: list[_Key] = []
  chains = _chains(world, candidates)
  if chains and rng.random() < _CHAIN_RATE:
    chosen.extend(_pick(rng, chains))
  for e in world.entities:
    if all(subject != e.name for subject, _ in chosen):
      chosen.append((e.name, _pick(rng, world.attributes(e)).name))
  rest = [c for c in candidates if c not in chosen]
  chosen += [rest[int(i)] for i in rng.choice(len(rest), size=n - len(chosen), replace=False)]
  return [chosen[int(i)] for i in rng.permutation(len(chosen))]


class _Mentions:
  """Who a pronoun would point to: the last entity named per pronoun class, and the previous sentence."""

  def __init__(self):
    self.last: dict[str, str] = {}
    self.previous: list[str] = []

  def pronoun(self, e: _Entity) -> str | None:
    """"He"/"She"/"It"/"The institute" if it can only mean `e`, which the previous sentence named; else None."""
    if e.name not in self.previous:
      return None
    if e.kind == "person":
      return _PRONOUNS[e.gender] if self.last.get(e.gender) == e.name else None
    if self.last.get("it") == e.name:
      return "It"
    return f"The {e.noun}" if self.last.get("noun:" + e.noun) == e.name else None

  def sentence(self, named: Sequence[_Entity]) -> None:
    """Records the entities one sentence names, in text order."""
    for e in named:
      if e.kind == "person":
        self.last[e.gender] = e.name
      else:
        self.last["it"] = e.name
        self.last["noun:" + e.noun] = e.name
    self.previous = [e.name for e in named]


def _render(rng: np.random.Generator, world: _World, keys: Sequence[_Key], templates: str = "seen") -> list[Fact]:
  """One sentence per fact, a random phrasing each, a pronoun for the subject where unambiguous."""
  subjects = {e.name: e for e in world.entities}
  mentions = _Mentions()
  facts = []
  for i, key in enumerate(keys):
    subject, value = subjects[key[0]], world.values[key]
    attr = _ATTRIBUTES[(subject.kind, key[1])]
    template = _pick(rng, attr.forms(templates)[0])
    mention = subject.mention
    if template.startswith("{s} ") and rng.random() < _PRONOUN_RATE:
      mention = mentions.pronoun(subject) or mention
    text = _fill(template, s=mention, v=value.mention, a_v=_indefinite(value.mention), **_subject_fields(subject))
    mentions.sentence(_named_in_order(template, subject, value.entity))
    facts.append(Fact(i, text, attr.type, subject.name, attr.name, value.answer, template))
  return facts


def _subject_fields(subject: _Entity) -> dict[str, str]:
  """The template fields that describe the subject besides its mention: `{noun}`, `{a_noun}`, `{spouse}`."""
  return {"noun": subject.noun, "a_noun": _indefinite(subject.noun),
          "spouse": _SPOUSE_WORDS.get(subject.gender, "spouse")}


def _named_in_order(template: str, subject: _Entity, value: _Entity | None) -> list[_Entity]:
  """The entities a filled template names, in text order ("{v} founded {s}." names the value first)."""
  if value is None:
    return [subject]
  return [value, subject] if template.index("{v}") < template.index("{s}") else [subject, value]


def _fill(template: str, **fields) -> str:
  """The template filled in, its first letter capitalized ("the Tarnow Institute ..." starts a sentence)."""
  text = template.format(**fields)
  return text[:1].upper() + text[1:]


def _indefinite(phrase: str) -> str:
  return f"{'an' if phrase[:1].lower() in 'aeiou' else 'a'} {phrase}" if phrase else phrase


def _layout(facts: Sequence[Fact]) -> tuple[str, tuple[tuple[int, int], ...]]:
  """The document text (one paragraph) and each fact's character span in it."""
  spans, pos = [], 0
  for f in facts:
    spans.append((pos, pos + len(f.text)))
    pos += len(f.text) + 1
  return " ".join(f.text for f in facts), tuple(spans)


# --------------------------------------------------------------------------------------------------------
# Questions.


@dataclasses.dataclass(frozen=True)
class _Target:
  """What one question asks, before its phrasing is chosen."""
  kind: str
  evidence: tuple[int, ...] = ()
  subject: _Entity | None = None  # out-of-scope: the entity asked about
  attribute: str = ""  # out-of-scope: the attribute asked about


def _targets(rng: np.random.Generator, namer: _Namer, world: _World, facts: Sequence[Fact], n_questions: int,
             two_hop_fraction: float, out_of_scope_fraction: float) -> list[_Target]:
  """The question targets in question order; a fact or chain repeats (then re-phrased) when too few."""
  n_oos = min(_stochastic_round(rng, n_questions * out_of_scope_fraction), n_questions)
  keys = [(f.subject, f.attribute) for f in facts]
  position = {key: i for i, key in enumerate(keys)}
  chains = [(position[a], position[b]) for a, b in _chains(world, keys)]
  n_two = min(_stochastic_round(rng, n_questions * two_hop_fraction), n_questions - n_oos) if chains else 0
  n_single = n_questions - n_oos - n_two
  singles = _cycled(rng, [(i,) for i in range(len(facts))], n_single)
  two_hops = _cycled(rng, chains, n_two)
  targets = ([_Target("single", e) for e in singles] + [_Target("two_hop", e) for e in two_hops]
             + _out_of_scope(rng, namer, world, keys, n_oos))
  return [targets[int(i)] for i in rng.permutation(len(targets))]


def _stochastic_round(rng: np.random.Generator, x: float) -> int:
  """floor(x) plus one with probability frac(x): right on average over many documents."""
  return int(math.floor(x)) + int(rng.random() < x - math.floor(x))


def _cycled(rng: np.random.Generator, items: list, n: int) -> list:
  """`n` items: all of them in random order, then again, at most NUM_PARAPHRASES times each."""
  if not items:
    return []
  rounds = min(NUM_PARAPHRASES, math.ceil(n / len(items)))
  out = [items[int(i)] for _ in range(rounds) for i in rng.permutation(len(items))]
  return out[:n]


def _out_of_scope(rng: np.random.Generator, namer: _Namer, world: _World, keys: Sequence[_Key],
                  n: int) -> list[_Target]:
  """`n` distinct questions about an attribute the document does not state, or an entity it never names.

  Unstated attributes are asked only of entities the document names, and only attributes without a
  two-hop description (not relations between subjects): an unstated relation can often be inferred from
  another fact ("B married A" answers "Who is A married to?").
  """
  stated = set(keys)
  absent = [(e, a.name) for e in _named_subjects(world, keys) for a in SCHEMA[e.kind]
            if not a.via and (e.name, a.name) not in stated]
  targets = []
  for _ in range(n):
    if absent and rng.random() < 0.5:
      entity, attribute = absent.pop(int(rng.integers(len(absent))))
    else:
      entity = _new_entity(rng, namer, _pick(rng, SUBJECT_KINDS))
      attribute = _pick(rng, SCHEMA[entity.kind]).name
    targets.append(_Target("out_of_scope", subject=entity, attribute=attribute))
  return targets


def _named_subjects(world: _World, keys: Sequence[_Key]) -> list[_Entity]:
  """Entities of a subject kind that the rendered facts name, as subject or as value, first-named first."""
  subjects = {e.name: e for e in world.entities}
  named: dict[str, _Entity] = {}
  for key in keys:
    value = world.values[key].entity
    for e in (subjects[key[0]], value):
      if e is not None and e.kind in SCHEMA:
        named.setdefault(e.name, e)
  return list(named.values())


def _paraphrase_choices(paraphrase) -> tuple[int, ...]:
  """The allowed paraphrase indices: all (None), one (int) or several (a sequence)."""
  if paraphrase is None:
    return tuple(range(NUM_PARAPHRASES))
  choices = (paraphrase,) if isinstance(paraphrase, (int, np.integer)) else tuple(paraphrase)
  if not choices or any(isinstance(p, bool) or not isinstance(p, (int, np.integer))
                        or not 0 <= p < NUM_PARAPHRASES for p in choices):
    raise UserError(f"paraphrase must be None, an index in [0, {NUM_PARAPHRASES}) or a non-empty sequence of "
                    f"them (got {paraphrase!r})")
  return tuple(dict.fromkeys(int(p) for p in choices))


def _questions(rng: np.random.Generator, doc_id: str, world: _World, facts: Sequence[Fact],
               targets: Sequence[_Target], choices: tuple[int, ...], templates: str = "seen") -> tuple[Question, ...]:
  """Phrases each target; the k-th question on one target takes the k-th allowed phrasing after a random one.

  One draw per target whatever `choices` is, so the targets (and their order) never depend on it; a
  repeat that would only duplicate an earlier question (one allowed phrasing) is dropped.
  """
  subjects = {e.name: e for e in world.entities}
  offsets: dict[_Target, int] = {}
  seen: dict[_Target, int] = {}
  questions, asked = [], set()
  for target in targets:
    if target not in offsets:
      offsets[target] = int(rng.integers(NUM_PARAPHRASES))
    k = seen.get(target, 0)
    seen[target] = k + 1
    p = choices[(offsets[target] + k) % len(choices)]
    if (target, p) in asked:
      continue
    asked.add((target, p))
    qid = f"{doc_id}/q{len(questions)}"
    questions.append(_phrase(qid, target, p, facts, subjects, world, templates))
  return tuple(questions)


def _phrase(qid: str, target: _Target, p: int, facts: Sequence[Fact], subjects: dict[str, _Entity],
            world: _World, templates: str = "seen") -> Question:
  """The question for one target in phrasing `p`, with its gold labels and answer prefix."""
  if target.kind == "out_of_scope":
    e = target.subject
    attr = _ATTRIBUTES[(e.kind, target.attribute)]
    text = _ask(e, target.attribute, e.mention, p, templates)
    usable = _usable_statements(attr, templates)
    prefix = _answer_prefix(usable[p % len(usable)], e.mention, e, _unknown_value(target.attribute))
    return Question(qid, text, UNKNOWN, target.kind, (), (), p, e.name, target.attribute, prefix)
  first, last = facts[target.evidence[0]], facts[target.evidence[-1]]
  types = tuple(facts[i].type for i in target.evidence)
  subject = subjects[first.subject]
  if target.kind == "single":
    text = _ask(subject, first.attribute, subject.mention, p, templates)
    prefix = _fact_prefix(first, subject.mention, subjects, world, templates)
    return Question(qid, text, first.value, target.kind, target.evidence, types, p, first.subject, first.attribute,
                    prefix, world.values[(first.subject, first.attribute)].category)
  via = _ATTRIBUTES[(subject.kind, first.attribute)].forms(templates)[2]
  bridge = subjects[last.subject]
  phrase = via[p % len(via)].format(s=subject.mention)
  text = _ask(bridge, last.attribute, phrase, p, templates)
  return Question(qid, text, last.value, target.kind, target.evidence, types, p, first.subject,
                  f"{first.attribute}>{last.attribute}", _fact_prefix(last, phrase, subjects, world, templates),
                  world.values[(last.subject, last.attribute)].category)  # a two-hop answer is its last fact's


def _ask(entity: _Entity, attribute: str, phrase: str, p: int, templates: str = "seen") -> str:
  """Question template `p` of `attribute` (of `entity`'s kind), asked about `phrase`, first letter capitalized."""
  return _fill(_ATTRIBUTES[(entity.kind, attribute)].forms(templates)[1][p], x=phrase, noun=entity.noun)


# Answer prefixes (DESIGN §2.7): the statement a document would use, up to the answer, so that the answer is
# the natural continuation of the assistant turn ("Sunrenith was first settled in" + " 1643").

_VALUE_FIELDS = ("{v}", "{a_v}")
# Attributes whose every value is mentioned with "the" (prizes, events, rivers): an out-of-scope prefix keeps
# the article too ("... won the" + " unknown"), so its wording matches the answerable ones'.
_VALUE_ARTICLES = {"award": "the", "event": "the", "river": "the"}


def _usable(template: str) -> bool:
  """Whether a statement template can end an answer prefix: its value is the last thing before the final ".",
  after a non-empty stem naming the subject (so generating after the prefix ends with the answer)."""
  field = next((f for f in _VALUE_FIELDS if template.endswith(f + ".")), None)
  if field is None:
    return False
  stem = template[:-len(field) - 1]
  return bool(stem.strip()) and "{s}" in stem and not any(f in stem for f in _VALUE_FIELDS)


def _usable_statements(attr: _Attribute, templates: str) -> tuple[str, ...]:
  """The usable statements of `templates`' forms; the seen ones if none of those is usable."""
  return tuple(filter(_usable, attr.forms(templates)[0])) or tuple(filter(_usable, attr.statements))


def _fact_prefix(fact: Fact, phrase: str, subjects: dict[str, _Entity], world: _World, templates: str) -> str:
  """The prefix answering `fact` about `phrase` (its subject, or a via phrase naming it): from the fact's own
  template when usable (then it matches the document's sentence), else from the first usable one."""
  subject = subjects[fact.subject]
  attr = _ATTRIBUTES[(subject.kind, fact.attribute)]
  template = fact.template if _usable(fact.template) else _usable_statements(attr, templates)[0]
  return _answer_prefix(template, phrase, subject, world.values[(fact.subject, fact.attribute)])


def _unknown_value(attribute: str) -> _Value:
  """The value an out-of-scope prefix is written for: "unknown", with the article its attribute's values take."""
  article = _VALUE_ARTICLES.get(attribute)
  return _Value(UNKNOWN, f"{article} {UNKNOWN}" if article else UNKNOWN)


def _answer_prefix(template: str, phrase: str, subject: _Entity, value: _Value) -> str:
  """A usable `template` filled up to its answer, `{s}` = `phrase`, no trailing space.

  The value's article stays in the prefix ("is an" + "architect", "works for the" + "Tarnow Institute"): the
  answer is the bare value, and prefix + " " + answer reads as the document does.
  """
  field = next(f for f in _VALUE_FIELDS if template.endswith(f + "."))
  mention = _indefinite(value.mention) if field == "{a_v}" else value.mention
  lead = mention[:len(mention) - len(value.answer)] if mention.endswith(value.answer) else ""
  return _fill(template[:-len(field) - 1] + lead, s=phrase, **_subject_fields(subject)).rstrip()


# --------------------------------------------------------------------------------------------------------
# Public API.


def document(split: str, index: int, *, seed: int = 0, facts_per_document: int | tuple[int, int] = (4, 8),
             questions_per_document: int = 8, two_hop_fraction: float = 0.25,
             out_of_scope_fraction: float = 0.125, paraphrase=None, templates: str = "seen") -> SyntheticDocument:
  """Document `index` of `split`: a pure function of its arguments, built without the ones before it.

  `facts_per_document`: a count or an inclusive (low, high) range, at least 2. `paraphrase`: None (any
  question phrasing), an index in [0, NUM_PARAPHRASES), or a sequence of them; it changes only the
  phrasing, never the text or which facts are asked. `templates`: "seen" (training's forms) or "unseen"
  (every statement, question and answer prefix in held-out forms; the same world, facts and targets, and
  a doc_id ending in "-unseen" so caches keyed by id never mix the two texts).
  """
  lo, hi = _check_args(split, index, seed, facts_per_document, questions_per_document, two_hop_fraction,
                       out_of_scope_fraction, templates)
  choices = _paraphrase_choices(paraphrase)
  world_rng, render_rng, question_rng, paraphrase_rng = _streams(split, index, seed)
  doc_id = f"{DATASET}-{split}-{seed}-{index}" + ("" if templates == "seen" else f"-{templates}")
  namer = _Namer(split)
  n_facts = int(world_rng.integers(lo, hi + 1))
  world = _build_world(world_rng, namer, n_facts)
  facts = _render(render_rng, world, _select_facts(world_rng, world, n_facts), templates)
  text, spans = _layout(facts)
  targets = _targets(question_rng, namer, world, facts, questions_per_document, two_hop_fraction,
                     out_of_scope_fraction)
  questions = _questions(paraphrase_rng, doc_id, world, facts, targets, choices, templates)
  return SyntheticDocument(doc_id, f"world-{split}-{seed}-{index}", split, text, tuple(facts), spans, questions)


def generate(split: str, num_documents: int, *, seed: int = 0, **kwargs) -> list[SyntheticDocument]:
  """Documents 0..num_documents-1 of `split` (see `document` for the keyword arguments)."""
  if not isinstance(num_documents, (int, np.integer)) or num_documents < 0:
    raise UserError(f"num_documents must be a non-negative integer (got {num_documents!r})")
  return [document(split, i, seed=seed, **kwargs) for i in range(int(num_documents))]


def write_jsonl(path, documents: Sequence[SyntheticDocument]) -> int:
  """Writes every question of `documents` as QA JSONL (one record a line, atomically); returns the count."""
  n = 0
  with fileio.atomic_open(path, "w", encoding="utf-8") as f:
    for doc in documents:
      for record in doc.qa_records():
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        n += 1
  return n


def _streams(split: str, index: int, seed: int) -> list[np.random.Generator]:
  """Independent RNGs for (world and fact choice, phrasing of facts, question targets, question phrasing)."""
  root = np.random.SeedSequence(entropy=seed, spawn_key=(SPLITS.index(split), index))
  return [np.random.default_rng(s) for s in root.spawn(4)]


def _check_args(split, index, seed, facts_per_document, questions_per_document, two_hop_fraction,
                out_of_scope_fraction, templates="seen") -> tuple[int, int]:
  """Validates the arguments of `document`; returns the inclusive facts-per-document range."""
  if split not in SPLITS:
    raise UserError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
  if not isinstance(templates, str) or templates not in TEMPLATES:
    raise UserError(f"unknown templates {templates!r}; valid: {', '.join(TEMPLATES)}")
  for name, x in (("index", index), ("seed", seed), ("questions_per_document", questions_per_document)):
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 0:
      raise UserError(f"{name} must be a non-negative integer (got {x!r})")
  lo, hi = _fact_range(facts_per_document)
  for name, x in (("two_hop_fraction", two_hop_fraction), ("out_of_scope_fraction", out_of_scope_fraction)):
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not 0 <= x <= 1:
      raise UserError(f"{name} must be in [0, 1] (got {x!r})")
  if two_hop_fraction + out_of_scope_fraction > 1:
    raise UserError(f"two_hop_fraction + out_of_scope_fraction must be at most 1 (got {two_hop_fraction} + "
                    f"{out_of_scope_fraction})")
  return lo, hi


def _fact_range(facts_per_document) -> tuple[int, int]:
  """(low, high) from a count or a range; a document needs at least 2 facts (about 2 entities)."""
  lo_hi = (facts_per_document,) * 2 if isinstance(facts_per_document, (int, np.integer)) else facts_per_document
  try:
    lo, hi = (int(x) for x in lo_hi)
  except (TypeError, ValueError):
    raise UserError(f"facts_per_document must be a count or a (low, high) pair (got {facts_per_document!r})") \
        from None
  if not 2 <= lo <= hi:
    raise UserError(f"facts_per_document needs 2 <= low <= high (got {facts_per_document!r})")
  return lo, hi
