"""TFDS builders for the project's corpora, written as array_record and read without TensorFlow (DESIGN §6).

Two `GeneratorBasedBuilder`s, registered with TFDS when this module is imported:
  * `synthetic_fact_worlds`: the synthetic fact worlds; a config fixes the documents per split and the
    generator's arguments, and its name is derived from them (`synthetic_config`), so two parameter sets
    never share a prepared folder.
  * `local_qa_jsonl`: QA JSONL files in the project schema (`qa.read_jsonl`) from `manual_dir`, grouped by
    document (`qa.group_by_document`). Optional `atom_spans`/`atom_types` (what `synthetic.write_jsonl`
    writes) come along, so stored evidence indices keep their atoms.

One record per *document*, the unit of training (FEATURES). Its questions are one JSON string: a
question's evidence list inside the document's question list is a ragged nested sequence, and TFDS
serializes those only through TensorFlow ("No module named 'tensorflow'" while writing); flat `Text`,
`Scalar`, `Tensor` and `Sequence(Text)` features encode and decode with numpy alone. Records are stored
in index order (`disable_shuffling`), so record i of a split is document i; the grain pipeline shuffles.

Prepare with `prepare_synthetic` / `prepare_local_qa` (or the classes directly, `file_format=
"array_record"`), read with `tfds.data_source(name, data_dir=...)` or `builder.as_data_source()` and
`decode`. Never `tfds.load` / `as_dataset`: they need TensorFlow.
"""

import contextlib
import dataclasses
import json
import pathlib
import re
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from doc2atom_jax import fileio
from doc2atom_jax.data import qa, synthetic
from doc2atom_jax.errors import UserError

FILE_FORMAT = "array_record"
# 1.1.0: questions carry "answer_prefix" (DESIGN §2.7), so folders prepared before are prepared again, not read
# without prefixes; records of 1.0.0 still decode (no prefix = "").
VERSION = "1.1.0"


def features() -> tfds.features.FeaturesDict:
  """One document: its text, the facts (= given atoms) as character spans, and its questions as JSON.

  `fact_spans` [n, 2] int32 [start, end) and `fact_types` [n]; n = 0 means "no given atoms" (the reader
  atomizes). `questions` is a JSON list of {"id", "question", "answers", "kind", "evidence", "answer_prefix",
  ...} (inside JSON, a new question field needs no new feature; a record without "answer_prefix" has none).
  """
  text = tfds.features.Text()
  return tfds.features.FeaturesDict({
      "index": tfds.features.Scalar(np.int64), "doc_id": text, "dataset": text, "text": text,
      "fact_spans": tfds.features.Tensor(shape=(None, 2), dtype=np.int32),
      "fact_types": tfds.features.Sequence(text), "questions": text})


def _example(index: int, doc_id: str, dataset: str, text: str, spans, types, questions: list[dict]) -> dict:
  """A FEATURES example; spans as an [n, 2] array even when n = 0."""
  return {"index": index, "doc_id": doc_id, "dataset": dataset, "text": text,
          "fact_spans": np.asarray(spans, np.int32).reshape(-1, 2), "fact_types": list(types),
          "questions": json.dumps(questions, ensure_ascii=False)}


def _str(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode(example: Mapping) -> dict:
  """A record as TFDS returns it without TF (bytes, numpy) -> plain Python values."""
  return {"index": int(example["index"]), "doc_id": _str(example["doc_id"]),
          "dataset": _str(example["dataset"]), "text": _str(example["text"]),
          "fact_spans": [(int(a), int(b)) for a, b in np.asarray(example["fact_spans"]).reshape(-1, 2)],
          "fact_types": [_str(t) for t in example["fact_types"]],
          "questions": json.loads(_str(example["questions"]))}


def _info(builder: tfds.core.DatasetBuilder, description: str) -> tfds.core.DatasetInfo:
  # DatasetInfo directly: `dataset_info_from_configs` reads README/CITATIONS from the module's folder.
  return tfds.core.DatasetInfo(builder=builder, description=description, features=features(),
                               disable_shuffling=True)


# --------------------------------------------------------------------------------------------------------
# Synthetic fact worlds.


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  """Documents per split and `synthetic.document`'s arguments; build it with `synthetic_config`."""
  documents: Mapping[str, int] = dataclasses.field(default_factory=dict)
  facts_per_document: tuple[int, int] = (4, 8)
  questions_per_document: int = 8
  seed: int = 0
  paraphrase: tuple[int, ...] | None = None
  templates: str = "seen"  # synthetic.TEMPLATES: "unseen" writes every split in the held-out forms


def synthetic_config(*, train: int = 1000, validation: int = 100, test: int = 100,
                     facts_per_document: tuple[int, int] = (4, 8), questions_per_document: int = 8,
                     seed: int = 0, paraphrase: Sequence[int] | None = None,
                     templates: str = "seen") -> SyntheticConfig:
  """A config named after its parameters: a prepared folder always holds what its name says."""
  lo, hi = facts_per_document
  documents = {"train": train, "validation": validation, "test": test}
  for split, n in documents.items():
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
      raise UserError(f"documents for split {split!r} must be a non-negative integer (got {n!r})")
  if templates not in synthetic.TEMPLATES:
    raise UserError(f"unknown templates {templates!r}; valid: {', '.join(synthetic.TEMPLATES)}")
  paraphrase = None if paraphrase is None else tuple(int(p) for p in paraphrase)
  name = (f"seed{seed}_facts{lo}-{hi}_q{questions_per_document}_docs{train}-{validation}-{test}"
          + ("" if paraphrase is None else "_p" + "".join(map(str, paraphrase)))
          + ("" if templates == "seen" else f"_{templates}"))
  return SyntheticConfig(name=name, version=VERSION, documents=documents, facts_per_document=(lo, hi),
                         questions_per_document=questions_per_document, seed=seed, paraphrase=paraphrase,
                         templates=templates)


def document_kwargs(config: SyntheticConfig) -> dict:
  """The `synthetic.document` keyword arguments of a config (tests rebuild documents with them)."""
  return {"seed": config.seed, "facts_per_document": tuple(config.facts_per_document),
          "questions_per_document": config.questions_per_document, "paraphrase": config.paraphrase,
          "templates": config.templates}


def _synthetic_questions(doc: synthetic.SyntheticDocument) -> list[dict]:
  return [{"id": q.qid, "question": q.question, "answers": [q.answer], "kind": q.kind,
           "evidence": list(q.evidence), "evidence_types": list(q.evidence_types), "paraphrase": q.paraphrase,
           "subject": q.subject, "attribute": q.attribute, "answer_prefix": q.answer_prefix} for q in doc.questions]


def synthetic_example(doc: synthetic.SyntheticDocument, index: int) -> dict:
  """The FEATURES example of a synthetic document."""
  return _example(index, doc.doc_id, synthetic.DATASET, doc.text, doc.fact_spans, [f.type for f in doc.facts],
                  _synthetic_questions(doc))


class SyntheticFactWorlds(tfds.core.GeneratorBasedBuilder):
  """Synthetic fact worlds, one record per document; record i of a split is `synthetic.document(split, i)`."""

  VERSION = tfds.core.Version(VERSION)
  BUILDER_CONFIGS = [synthetic_config()]

  def _info(self) -> tfds.core.DatasetInfo:
    return _info(self, "Synthetic fact worlds (doc2atom_jax.data.synthetic): documents with their questions.")

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the generator is the data
    return {split: self._generate_examples(split, n) for split, n in self.builder_config.documents.items() if n}

  def _generate_examples(self, split: str, n: int) -> Iterator[tuple[int, dict]]:
    kwargs = document_kwargs(self.builder_config)
    for i in range(n):
      yield i, synthetic_example(synthetic.document(split, i, **kwargs), i)


# --------------------------------------------------------------------------------------------------------
# Local QA JSONL.


@dataclasses.dataclass(eq=False)
class LocalQAConfig(tfds.core.BuilderConfig):
  """`files`: split -> file name in manual_dir; None: every `*.jsonl` there, split = its sanitized stem."""
  files: Mapping[str, str] | None = None


def split_name(filename: str) -> str:
  """The split of a JSONL file in the default config: "squad.dev.jsonl" -> "squad_dev"."""
  return re.sub(r"\W", "_", filename.removesuffix(".jsonl"))


def _jsonl_files(manual_dir: pathlib.Path, files: Mapping[str, str] | None) -> dict[str, pathlib.Path]:
  if not manual_dir.is_dir():
    raise UserError(f"manual_dir {manual_dir} is not a folder")
  if files is None:
    found = {split_name(p.name): p for p in sorted(manual_dir.glob("*.jsonl"))}
    if not found:
      raise UserError(f"no *.jsonl file in manual_dir {manual_dir}")
    return found
  paths = {split: manual_dir / name for split, name in files.items()}
  missing = [str(p) for p in paths.values() if not p.is_file()]
  if missing:
    raise UserError(f"QA JSONL file(s) not found in manual_dir: {', '.join(missing)}")
  return paths


def _given_atom(obj: dict, where: str) -> tuple[list, list] | None:
  """(spans, types) of a line with `atom_spans`, else None; types may be absent (the reader classifies)."""
  spans, types = obj.get("atom_spans"), obj.get("atom_types") or []
  if spans is None:
    return None
  ok = isinstance(spans, list) and all(isinstance(s, list) and len(s) == 2 and all(type(v) is int for v in s)
                                       for s in spans)
  if not ok or not isinstance(types, list) or (types and len(types) != len(spans)):
    raise UserError(f"{where}: atom_spans must be [[start, end], ...] and atom_types one string per span")
  return spans, types


def given_atoms(path) -> dict[str, tuple[list, list]]:
  """context -> (atom_spans, atom_types) of the lines that carry them (first line per context wins).

  Keyed by context because `group_by_document` may rename a doc_id; a context is one document.
  """
  atoms: dict[str, tuple[list, list]] = {}
  for lineno, line in enumerate(fileio.read_text(path).splitlines(), 1):
    if '"atom_spans"' not in line:
      continue
    obj = json.loads(line)  # read_jsonl has validated the line already
    given = _given_atom(obj, f"{path}, line {lineno}")
    if given is not None:
      atoms.setdefault(obj["context"], given)
  return atoms


def _qa_questions(examples: Sequence[qa.QAExample]) -> list[dict]:
  return [{"id": ex.id, "question": ex.question, "answers": list(ex.answers), "kind": ex.kind,
           "evidence": None if ex.evidence is None else list(ex.evidence), "answer_prefix": ex.answer_prefix}
          for ex in examples]


def local_qa_examples(path) -> Iterator[tuple[int, dict]]:
  """(position, FEATURES example) per document of a QA JSONL file, documents in first-seen order."""
  atoms = given_atoms(path)
  for i, (doc_id, examples) in enumerate(qa.group_by_document(qa.read_jsonl(path)).items()):
    first = examples[0]
    spans, types = atoms.get(first.context, ([], []))
    yield i, _example(i, doc_id, first.dataset, first.context, spans, types, _qa_questions(examples))


class LocalQAJsonl(tfds.core.GeneratorBasedBuilder):
  """QA JSONL files (project schema) from manual_dir, one record per document with its questions.

  The prepared data depends on manual_dir's files, which the config name does not capture: prepare
  different folders into different data_dirs (or name a config per file set).
  """

  VERSION = tfds.core.Version(VERSION)
  BUILDER_CONFIGS = [LocalQAConfig(name="all_files", version=VERSION)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("Put QA JSONL files in the project schema ({'id', 'dataset', 'doc_id', "
                                  "'context', 'question', 'answers': [...]}, one per line) in manual_dir.")

  def _info(self) -> tfds.core.DatasetInfo:
    return _info(self, "Local QA JSONL (doc2atom_jax.data.qa schema), grouped by document.")

  def _split_generators(self, dl_manager):
    files = _jsonl_files(pathlib.Path(dl_manager.manual_dir), self.builder_config.files)
    return {split: self._generate_examples(path) for split, path in files.items()}

  def _generate_examples(self, path: pathlib.Path) -> Iterator[tuple[int, dict]]:
    yield from local_qa_examples(path)


# --------------------------------------------------------------------------------------------------------
# Preparing.


def _settings(config: tfds.core.BuilderConfig) -> dict:
  """A config's own fields (those BuilderConfig does not have)."""
  base = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
  return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in base}


def _config_arg(cls, config: tfds.core.BuilderConfig | None):
  """A registered config by its name (TFDS refuses a new object of the same name), else the config."""
  registered = cls.builder_configs.get(config.name) if config is not None else None
  if registered is None:
    return config
  if _settings(registered) != _settings(config):
    raise UserError(f"config name {config.name!r} is taken by {cls.__name__}'s built-in config with other "
                    "settings; choose another name")
  return config.name


@contextlib.contextmanager
def _quiet():
  """TFDS's absl warnings ("Using custom data configuration ...") and progress bars, off while we prepare."""
  from absl import logging as absl_logging

  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  tfds.display_progress_bar(False)
  try:
    yield
  finally:
    tfds.display_progress_bar(True)
    absl_logging.set_verbosity(verbosity)


def _announce(builder) -> None:
  if not pathlib.Path(builder.data_dir).exists():
    print(f"preparing {builder.name}/{builder.builder_config.name} as array_record under {builder.data_dir}")


def prepare_synthetic(data_dir, config: SyntheticConfig | None = None) -> SyntheticFactWorlds:
  """Writes the synthetic corpus of `config` (default: the first BUILDER_CONFIG) into data_dir, once."""
  with _quiet():
    builder = SyntheticFactWorlds(config=_config_arg(SyntheticFactWorlds, config), data_dir=str(data_dir),
                                  file_format=FILE_FORMAT)
    _announce(builder)
    builder.download_and_prepare()
  return builder


def prepare_local_qa(data_dir, manual_dir, *, files: Mapping[str, str] | None = None,
                     name: str | None = None) -> LocalQAJsonl:
  """Writes the QA JSONL files of manual_dir into data_dir (see LocalQAConfig), once.

  `name` names the config (default "all_files", or "files_<splits>" for an explicit `files`).
  """
  if files is not None and not name:
    name = "files_" + "-".join(sorted(files))
  _jsonl_files(pathlib.Path(manual_dir), files)  # a clear error before TFDS's about manual_dir
  config = LocalQAConfig(name=name or "all_files", version=VERSION, files=None if files is None else dict(files))
  with _quiet():
    builder = LocalQAJsonl(config=_config_arg(LocalQAJsonl, config), data_dir=str(data_dir), file_format=FILE_FORMAT)
    _announce(builder)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder
