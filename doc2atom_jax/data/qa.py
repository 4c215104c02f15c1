"""Question answering examples from every source behind one interface (DESIGN §6).

`load_source(name)` names a source:
  * `local:<path.jsonl>`: a JSONL file in the project schema (one example per line):
    `{"id", "dataset", "doc_id", "context", "question", "answers": [...]}`, plus optional `evidence` (atom
    indices) and `kind` (question type), which the synthetic corpus writes, and `answer_prefix` (the start of
    the answer, prefilled in the assistant turn; DESIGN §2.7). Unanswerable: `answers: []`
    (or only refusals, like the synthetic "unknown"; see `answers.is_unanswerable`).
  * a bundled development sample by dataset name (BUNDLED): `<name>.<split>.jsonl` in the shared QA folder
    (`$DOC2ATOM_QA_DIR`, else the first `shared/data/qa` found walking up from this package).
  * a remote benchmark (REMOTE): TFDS via `tfds.data_source` (array_record; `tfds.load`/`as_dataset` would
    need TensorFlow) or the Hugging Face hub via `datasets`. These need internet access the first time.

`group_by_document` turns examples into the unit of training: one document with its questions.
`read_self_gen` reads Doc-to-LoRA's released self-generated QA.
"""

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from doc2atom_jax import fileio
from doc2atom_jax.errors import UserError
from doc2atom_jax.data import answers as answers_lib

log = logging.getLogger(__name__)

BUNDLED = ("squad", "squad_v2", "drop", "ropes", "hotpotqa", "2wikimultihopqa", "musique", "qasper")
QA_DIR_ENV = "DOC2ATOM_QA_DIR"
BUNDLED_SPLIT = "dev"
_ON_ERROR = ("raise", "skip")
_MAX_KEPT_ERRORS = 20


@dataclasses.dataclass(frozen=True)
class QAExample:
  """One question about one document; `answers` are its references (empty for an unanswerable one)."""
  id: str
  dataset: str
  doc_id: str
  context: str
  question: str
  answers: tuple[str, ...]
  evidence: tuple[int, ...] | None = None  # gold evidence atom indices, when the source has them
  kind: str | None = None  # question type, when the source has one (e.g. "single", "two_hop", "out_of_scope")
  answer_prefix: str = ""  # the start of the answer, prefilled in the assistant turn ("" = none)

  @property
  def answerable(self) -> bool:
    """False for no answers or only refusals (the synthetic out-of-scope answer "unknown")."""
    return not answers_lib.is_unanswerable(self.answers)


@dataclasses.dataclass
class ReadStats:
  """What a JSONL read kept and skipped; `errors` keeps the first few messages of skipped lines."""
  read: int = 0
  skipped: int = 0
  errors: list[str] = dataclasses.field(default_factory=list)


# --------------------------------------------------------------------------------------------------------
# JSONL in the project schema.

_TEXT_FIELDS = ("id", "dataset", "doc_id", "context", "question")
_SCHEMA_HINT = 'each line must be one JSON object: {"id", "dataset", "doc_id", "context", "question", "answers": [...]}'


class _BadField(ValueError):
  """A record that breaks the schema; `field` is the offending field (None for the line as a whole)."""

  def __init__(self, field: str | None, problem: str):
    super().__init__(problem)
    self.field = field


def _text_field(obj: Mapping, name: str) -> str:
  if name not in obj:
    raise _BadField(name, "missing")
  value = obj[name]
  if not isinstance(value, str) or not value.strip():
    raise _BadField(name, f"must be a non-empty string (got {_describe(value)})")
  return value


def _answers_field(obj: Mapping) -> tuple[str, ...]:
  if "answers" not in obj:
    raise _BadField("answers", "missing (use [] for an unanswerable question)")
  value = obj["answers"]
  if not isinstance(value, list) or not all(isinstance(a, str) and a.strip() for a in value):
    raise _BadField("answers", f"must be a list of non-empty strings (got {_describe(value)})")
  return tuple(value)


def _evidence_field(obj: Mapping) -> tuple[int, ...] | None:
  value = obj.get("evidence")
  if value is None:
    return None
  if not isinstance(value, list) or not all(type(i) is int and i >= 0 for i in value):
    raise _BadField("evidence", f"must be a list of atom indices (non-negative integers) or null (got "
                    f"{_describe(value)})")
  return tuple(value)


def _kind_field(obj: Mapping) -> str | None:
  value = obj.get("kind")
  if value is not None and not isinstance(value, str):
    raise _BadField("kind", f"must be a string or null (got {_describe(value)})")
  return value


def _answer_prefix_field(obj: Mapping) -> str:
  value = obj.get("answer_prefix")
  if value is None:
    return ""
  if not isinstance(value, str):
    raise _BadField("answer_prefix", f"must be a string or null (got {_describe(value)})")
  return value


def _describe(value: Any) -> str:
  text = json.dumps(value, ensure_ascii=False) if isinstance(value, (str, list, dict)) else repr(value)
  return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _parse_record(obj: Any) -> QAExample:
  """A parsed JSON object in the project schema -> QAExample, or _BadField."""
  if not isinstance(obj, dict):
    raise _BadField(None, f"expected a JSON object, got {type(obj).__name__}")
  text = {name: _text_field(obj, name) for name in _TEXT_FIELDS}
  return QAExample(**text, answers=_answers_field(obj), evidence=_evidence_field(obj), kind=_kind_field(obj),
                   answer_prefix=_answer_prefix_field(obj))


def _parse_line(line: str) -> QAExample:
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    raise _BadField(None, f"not valid JSON ({e.msg} at column {e.colno})") from None
  return _parse_record(obj)


def _line_error(path, lineno: int, e: _BadField) -> str:
  where = f"{path}, line {lineno}"
  return f"{where}: field {e.field!r} {e}" if e.field else f"{where}: {e}"


def read_jsonl_stats(path, *, on_error: str = "raise") -> tuple[list[QAExample], ReadStats]:
  """Examples of a JSONL file and what was skipped; blank lines are ignored.

  on_error="raise": a malformed line is a UserError naming the file, line and field.
  on_error="skip": such lines are left out and counted in the returned ReadStats.
  """
  if on_error not in _ON_ERROR:
    raise UserError(f"on_error must be one of {_ON_ERROR}, got {on_error!r}")
  stats, examples = ReadStats(), []
  for lineno, line in enumerate(fileio.read_text(path).splitlines(), 1):
    if not line.strip():
      continue
    try:
      examples.append(_parse_line(line))
    except _BadField as e:
      message = _line_error(path, lineno, e)
      if on_error == "raise":
        raise UserError(f"{message}; {_SCHEMA_HINT} (on_error='skip' leaves such lines out)") from None
      stats.skipped += 1
      if len(stats.errors) < _MAX_KEPT_ERRORS:
        stats.errors.append(message)
  stats.read = len(examples)
  return examples, stats


def read_jsonl(path, *, on_error: str = "raise") -> list[QAExample]:
  """Examples of a JSONL file in the project schema (see read_jsonl_stats); logs how many were skipped."""
  examples, stats = read_jsonl_stats(path, on_error=on_error)
  if stats.skipped:
    log.warning("%s: skipped %d malformed line(s), kept %d; first: %s", path, stats.skipped, stats.read,
                stats.errors[0])
  return examples


# --------------------------------------------------------------------------------------------------------
# Bundled development samples.

def qa_dir(data_dir=None) -> pathlib.Path:
  """The folder of the bundled samples: `data_dir`, else $DOC2ATOM_QA_DIR, else shared/data/qa upward."""
  explicit = data_dir or os.environ.get(QA_DIR_ENV)
  if explicit:
    path = pathlib.Path(explicit).expanduser()
    if not path.is_dir():
      raise UserError(f"QA data folder {path} does not exist (from {'data_dir' if data_dir else QA_DIR_ENV})")
    return path
  for parent in pathlib.Path(__file__).resolve().parents:
    candidate = parent / "shared" / "data" / "qa"
    if candidate.is_dir():
      return candidate
  raise UserError(f"no shared/data/qa folder found above {pathlib.Path(__file__).parent}; set {QA_DIR_ENV} "
                  "to the folder holding <dataset>.dev.jsonl")


def _read_bundled(name: str, split: str | None, data_dir) -> list[QAExample]:
  folder = qa_dir(data_dir)
  split = split or BUNDLED_SPLIT
  path = folder / f"{name}.{split}.jsonl"
  if not path.is_file():
    have = sorted(p.name.split(".")[1] for p in folder.glob(f"{name}.*.jsonl"))
    raise UserError(f"no {name!r} sample for split {split!r} in {folder} (splits there: {have or 'none'})")
  return read_jsonl(path)


# --------------------------------------------------------------------------------------------------------
# Remote benchmarks. The mappers follow the field names documented by each source (TFDS feature dicts,
# Hugging Face dataset cards); they are UNTESTED OFFLINE: no network here, so no record has gone through
# them. A record without the expected fields becomes a UserError that points here.

def _digest(text: str) -> str:
  return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def _str(value) -> str:
  """TFDS data sources give text features as bytes; Hugging Face gives str."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _unique(answers: Iterable) -> tuple[str, ...]:
  """Distinct non-empty references in order (SQuAD dev repeats an answer once per annotator)."""
  texts = (_str(a).strip() for a in answers)
  return tuple(dict.fromkeys(t for t in texts if t))


def _rows(value) -> list:
  """A sequence of records as a list of dicts, whether given as such or as a dict of columns."""
  if isinstance(value, Mapping):
    columns = list(value.values())
    return [dict(zip(value, row)) for row in zip(*columns)] if columns else []
  return list(value)


def _squad_mapper(dataset: str) -> Callable[[Mapping], list[QAExample]]:
  """TFDS squad/v1.1 and squad/v2.0: id, title, context, question, answers{text, answer_start}."""

  def mapper(r: Mapping) -> list[QAExample]:
    context = _str(r["context"])
    return [QAExample(id=_str(r["id"]), dataset=dataset, doc_id=f"{_str(r['title'])}#{_digest(context)}",
                      context=context, question=_str(r["question"]), answers=_unique(r["answers"]["text"]))]

  return mapper


def _drop_mapper(r: Mapping) -> list[QAExample]:
  """TFDS drop: passage, question, answer, validated_answers, query_id (doc_id as in the bundled sample)."""
  passage = _str(r["passage"])
  return [QAExample(id=_str(r["query_id"]), dataset="drop", doc_id=f"drop_p_{_digest(passage)}",
                    context=passage, question=_str(r["question"]),
                    answers=_unique([r["answer"], *r["validated_answers"]]))]


def _ropes_mapper(r: Mapping) -> list[QAExample]:
  """HF allenai/ropes: id, background, situation, question, answers{text} (context as in the sample)."""
  context = f"Background: {r['background']}\n\nSituation: {r['situation']}"
  return [QAExample(id=str(r["id"]), dataset="ropes", doc_id=f"ropes_bg_{_digest(r['background'])}",
                    context=context, question=r["question"], answers=_unique(r["answers"]["text"]))]


def _qasper_answer(annotation: Mapping) -> str | None:
  """One Qasper annotation as text, the usual way: spans joined, else free form, else yes/no."""
  if annotation.get("unanswerable"):
    return None
  if annotation.get("extractive_spans"):
    return ", ".join(annotation["extractive_spans"])
  if annotation.get("free_form_answer"):
    return annotation["free_form_answer"]
  if annotation.get("yes_no") is not None:
    return "Yes" if annotation["yes_no"] else "No"
  return None


def _qasper_mapper(r: Mapping) -> list[QAExample]:
  """HF allenai/qasper: one paper (id, title, abstract, full_text, qas) -> one example per question."""
  sections = ["\n".join([s["section_name"] or "", *s["paragraphs"]]).strip() for s in _rows(r["full_text"])]
  context = "\n\n".join([r["title"], r["abstract"], *sections])
  examples = []
  for qa in _rows(r["qas"]):
    annotations = [entry["answer"] for entry in _rows(qa["answers"])]  # one struct per annotator
    answers = _unique(a for a in map(_qasper_answer, annotations) if a)
    examples.append(QAExample(id=qa["question_id"], dataset="qasper", doc_id=f"qasper_{r['id']}",
                              context=context, question=qa["question"], answers=answers))
  return examples


def _longbench_mapper(task: str) -> Callable[[Mapping], list[QAExample]]:
  """HF THUDM/LongBench (config = task): _id, input (the question), context, answers."""

  def mapper(r: Mapping) -> list[QAExample]:
    doc_id = f"longbench_{task}_{_digest(r['context'])}"
    return [QAExample(id=r["_id"], dataset=f"longbench_{task}", doc_id=doc_id, context=r["context"],
                      question=r["input"], answers=_unique(r["answers"]))]

  return mapper


@dataclasses.dataclass(frozen=True)
class RemoteSource:
  hub: str  # "tfds" or "hf"
  path: str  # the TFDS name or the Hugging Face dataset id
  config: str | None
  default_split: str
  mapper: Callable[[Mapping], list[QAExample]]


REMOTE = {
    "tfds:squad/v1.1": RemoteSource("tfds", "squad/v1.1", None, "validation", _squad_mapper("squad")),
    "tfds:squad/v2.0": RemoteSource("tfds", "squad/v2.0", None, "validation", _squad_mapper("squad_v2")),
    "tfds:drop": RemoteSource("tfds", "drop", None, "dev", _drop_mapper),
    "hf:ropes": RemoteSource("hf", "allenai/ropes", None, "validation", _ropes_mapper),
    "hf:qasper": RemoteSource("hf", "allenai/qasper", "qasper", "validation", _qasper_mapper),
    **{f"longbench:{task}": RemoteSource("hf", "THUDM/LongBench", task, "test", _longbench_mapper(task))
       for task in ("qasper", "2wikimqa", "multifieldqa_en")},
}


def _tfds_records(source: RemoteSource, split: str, data_dir) -> Sequence:
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise UserError(f"TFDS source {source.path!r} needs tensorflow-datasets and array_record "
                    "(pip install tensorflow-datasets array_record)") from None
  try:
    return tfds.data_source(source.path, split=split, data_dir=data_dir)
  except Exception as e:  # anything from download/prepare: report what is needed, keep the cause
    raise UserError(f"could not get TFDS {source.path!r} split {split!r} ({type(e).__name__}: {e}); the first "
                    "use downloads and prepares it, which needs internet access (or a prepared copy in "
                    "data_dir / $TFDS_DATA_DIR)") from e


def _hf_records(source: RemoteSource, split: str, data_dir) -> Sequence:
  try:
    import datasets
  except ImportError:
    raise UserError(f"Hugging Face source {source.path!r} needs the `datasets` package (pip install datasets) "
                    "and internet access") from None
  try:
    return datasets.load_dataset(source.path, source.config, split=split, cache_dir=data_dir)
  except Exception as e:  # anything from the hub: report what is needed, keep the cause
    raise UserError(f"could not get Hugging Face dataset {source.path!r} ({source.config or 'default'}) split "
                    f"{split!r} ({type(e).__name__}: {e}); it needs internet access the first time") from e


def _read_remote(name: str, split: str | None, limit: int | None, data_dir) -> list[QAExample]:
  source = REMOTE[name]
  fetch = _tfds_records if source.hub == "tfds" else _hf_records
  records = fetch(source, split or source.default_split, data_dir)
  examples = []
  for i in range(len(records)):
    if limit is not None and len(examples) >= limit:
      break
    try:
      examples.extend(source.mapper(records[i]))
    except (KeyError, TypeError, AttributeError) as e:
      raise UserError(f"{name}: record {i} does not have the expected fields ({type(e).__name__}: {e}); the "
                      "mapper in doc2atom_jax/data/qa.py is untested offline and needs fixing") from e
  return examples


# --------------------------------------------------------------------------------------------------------
# One interface.

def source_names() -> list[str]:
  """Every name load_source takes (plus `local:<path.jsonl>`)."""
  return [*BUNDLED, *REMOTE]


def load_source(name: str, *, split: str | None = None, limit: int | None = None,
                data_dir=None) -> list[QAExample]:
  """The first `limit` examples (all if None) of a named source (see the module docstring).

  `split` defaults to "dev" for bundled samples and to each remote source's evaluation split; a local file
  is one split already. `data_dir` is the bundled-sample folder, the TFDS data_dir, or the Hugging Face
  cache_dir.
  """
  if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
    raise UserError(f"limit must be a non-negative integer or None, got {limit!r}")
  if name.startswith("local:"):
    if split is not None:
      raise UserError(f"{name}: a local file is one split; leave split unset (got {split!r})")
    examples = read_jsonl(name.removeprefix("local:"))
  elif name in BUNDLED:
    examples = _read_bundled(name, split, data_dir)
  elif name in REMOTE:
    examples = _read_remote(name, split, limit, data_dir)
  else:
    raise UserError(f"unknown QA source {name!r}; valid: {', '.join(source_names())}, or local:<path.jsonl>")
  return examples if limit is None else examples[:limit]


def group_by_document(examples: Iterable[QAExample]) -> dict[str, list[QAExample]]:
  """doc_id -> its examples, documents and questions in first-seen order.

  A document is one context. Some sources reuse a doc_id for several contexts (the bundled squad_v2 names
  every paragraph after its article; HotpotQA, MuSiQue and ROPES group questions that share a supporting
  page or background): those become documents `<doc_id>#ctx<k>` (k-th distinct context, from 0), and
  their examples carry that doc_id, so every group has exactly one context and key == example.doc_id.
  """
  examples = list(examples)
  contexts: dict[str, dict[str, int]] = {}
  for ex in examples:
    seen = contexts.setdefault(ex.doc_id, {})
    seen.setdefault(ex.context, len(seen))
  groups: dict[str, list[QAExample]] = {}
  for ex in examples:
    seen = contexts[ex.doc_id]
    if len(seen) > 1:
      ex = dataclasses.replace(ex, doc_id=f"{ex.doc_id}#ctx{seen[ex.context]}")
    groups.setdefault(ex.doc_id, []).append(ex)
  return groups


# --------------------------------------------------------------------------------------------------------
# Doc-to-LoRA's self-generated QA (Hugging Face `SakanaAI/self_gen_qa_d2l`, ~100 GB per base model).
#
# ASSUMED LAYOUT (the data could not be downloaded here; fix SELF_GEN_FIELDS if it differs). Each record
# is one document with several question/response pairs, in one of two forms:
#   * text: a context string and parallel lists of questions and of the base model's responses (the
#     layout of the generation step before tokenization: `context`, `prompts_level_<n>`,
#     `responses_level_<n>`);
#   * tokenized (what third-party loaders of the released parquet files read): `ctx_ids` (the context
#     in the base model's chat template), `input_ids` (one list per pair: chat-templated prompt, then the
#     response) and `response_start_end` (one [start, end) token span per pair), next to teacher
#     log-probability columns that are not read. Decoding needs that base model's tokenizer; the chat
#     template is stripped by rendering it around a sentinel. A question keeps any instruction text that
#     Doc-to-LoRA put around it inside the user turn.
# Each entry lists the accepted names of one field, first present wins.
SELF_GEN_FIELDS: dict[str, tuple[str, ...]] = {
    "id": ("id", "doc_id", "ctx_id"),
    "context": ("context", "ctx", "document"),
    "questions": ("questions", "prompts", "prompts_level_1", "prompts_level_0", "question"),
    "responses": ("responses", "answers", "responses_level_1", "responses_level_0", "response"),
    "context_ids": ("ctx_ids",),
    "pair_ids": ("input_ids",),
    "response_spans": ("response_start_end",),
}
SELF_GEN_DATASET = "self_gen"


def _field(record: Mapping, key: str):
  """The value of the first SELF_GEN_FIELDS[key] name in `record`, or None."""
  return next((record[n] for n in SELF_GEN_FIELDS[key] if n in record and record[n] is not None), None)


def _as_list(value) -> list:
  return [value] if isinstance(value, str) else list(value)


def _chat_wrappers(tokenizer) -> list[tuple[str, str]]:
  """(prefix, suffix) the chat template puts around a user turn, with and without an empty system turn."""
  wrappers = []
  for messages in ([{"role": "user", "content": "\x00"}],
                   [{"role": "system", "content": ""}, {"role": "user", "content": "\x00"}]):
    try:
      text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # templates without a system role raise; that variant just does not apply
      continue
    prefix, _, suffix = text.partition("\x00")
    wrappers.append((prefix, suffix))
  return wrappers


def _unwrap(text: str, wrappers: list[tuple[str, str]]) -> str:
  for prefix, suffix in sorted(wrappers, key=lambda w: -len(w[0])):
    if text.startswith(prefix) and text.endswith(suffix):
      return text[len(prefix):len(text) - len(suffix)].strip()
  return text.strip()


def _decode_tokenized(record: Mapping, tokenizer, wrappers) -> tuple[str, list[str], list[str]]:
  context = _unwrap(tokenizer.decode(_field(record, "context_ids"), skip_special_tokens=False), wrappers)
  questions, responses = [], []
  for ids, (start, end) in zip(_field(record, "pair_ids"), _field(record, "response_spans")):
    ids = list(ids)
    questions.append(_unwrap(tokenizer.decode(ids[:start], skip_special_tokens=False), wrappers))
    responses.append(tokenizer.decode(ids[start:end], skip_special_tokens=True).strip())
  return context, questions, responses


def _self_gen_texts(record: Mapping, where: str, tokenizer, wrappers) -> tuple[str, list[str], list[str]]:
  """(context, questions, responses) of a text or tokenized record."""
  context = _field(record, "context")
  if context is not None:
    return context, _as_list(_field(record, "questions") or []), _as_list(_field(record, "responses") or [])
  if _field(record, "context_ids") is None:
    raise UserError(f"{where}: no context field (looked for {SELF_GEN_FIELDS['context']} and "
                    f"{SELF_GEN_FIELDS['context_ids']}; fix SELF_GEN_FIELDS in {__name__} if the layout differs)")
  if tokenizer is None:
    raise UserError(f"{where}: a tokenized self-generated record (ctx_ids, input_ids); pass the tokenizer of "
                    "the base model that generated it")
  return _decode_tokenized(record, tokenizer, wrappers)


def _self_gen_examples(record: Mapping, where: str, tokenizer, wrappers) -> list[QAExample]:
  context, questions, responses = _self_gen_texts(record, where, tokenizer, wrappers)
  if len(questions) != len(responses):
    raise UserError(f"{where}: {len(questions)} questions but {len(responses)} responses")
  if not all(isinstance(text, str) for text in (*questions, *responses)):
    raise UserError(f"{where}: questions and responses must be strings")
  if not isinstance(context, str) or not context.strip():
    raise UserError(f"{where}: the context is empty or not text")
  doc_id = str(_field(record, "id") or f"self_gen_{_digest(context)}")
  return [QAExample(id=f"{doc_id}#q{j}", dataset=SELF_GEN_DATASET, doc_id=doc_id, context=context,
                    question=q.strip(), answers=_unique([r]))
          for j, (q, r) in enumerate(zip(questions, responses)) if q.strip()]


def _self_gen_records(path: pathlib.Path) -> Iterable[Mapping]:
  """Records of a .parquet (read in batches, only the SELF_GEN_FIELDS columns), .jsonl or .json file."""
  if path.suffix == ".parquet":
    import pyarrow.parquet as pq

    try:
      file = pq.ParquetFile(path)
    except (OSError, ValueError) as e:
      raise UserError(f"cannot read {path} as parquet: {e}") from None
    wanted = {n for names in SELF_GEN_FIELDS.values() for n in names}
    columns = [c for c in file.schema_arrow.names if c in wanted]
    return (row for batch in file.iter_batches(batch_size=256, columns=columns) for row in batch.to_pylist())
  text = fileio.read_text(path)
  try:
    if path.suffix == ".json":
      data = json.loads(text)
      return data if isinstance(data, list) else [data]
    return [json.loads(line) for line in text.splitlines() if line.strip()]
  except json.JSONDecodeError as e:
    raise UserError(f"{path} is not valid JSON{'' if path.suffix == '.json' else ' lines'}: {e}") from None


def read_self_gen(path_or_records, *, tokenizer=None, limit: int | None = None) -> list[QAExample]:
  """Doc-to-LoRA self-generated QA -> examples, one per question/response pair (layout: SELF_GEN_FIELDS).

  `path_or_records` is a .parquet/.jsonl/.json file or an iterable of record dicts. The base model's
  response is the single reference answer (none when it is empty). `tokenizer` decodes tokenized records.
  """
  if isinstance(path_or_records, (str, os.PathLike)):
    name = pathlib.Path(path_or_records).expanduser()
    records = _self_gen_records(name)
  else:
    name, records = "self-generated records", path_or_records
  wrappers = _chat_wrappers(tokenizer) if tokenizer is not None else []
  examples = []
  for i, record in enumerate(records):
    if limit is not None and len(examples) >= limit:
      break
    where = f"{name}, record {i}"
    if not isinstance(record, Mapping):
      raise UserError(f"{where}: expected an object, got {type(record).__name__}")
    examples.extend(_self_gen_examples(record, where, tokenizer, wrappers))
  return examples if limit is None else examples[:limit]
