"""Self-generated answers (DESIGN §2.7, §6): the frozen base model answers given questions about given
documents with the document in its prompt; its greedy answers become training targets where no gold short
answer exists (Doc-to-LoRA's "self-generated" responses).

Layout of the output folder (`selfgen.output`):
  * `selfgen.json`: what the answers depend on (model, dtype, prompt template, answer budget, sharding,
    part size, a digest of the input). A rerun with anything else is refused, so a resumed run never mixes
    answers of two configurations.
  * `shard-00003-of-00008.jsonl`: the shard's trainable records in the project QA schema (`qa.read_jsonl`
    reads it), `answers` = [the greedy answer], plus `source_answers` (the input's answers),
    `self_generated: true` and `model`.
  * `empty-00003-of-00008.jsonl` (only when there are some): questions the model answered with nothing, or
    with nothing left after SQuAD normalization (punctuation, articles): `answers: []`, `empty: true` and the
    raw text as `generated`. They live apart ON PURPOSE: in a shard file such a record would read as an
    unanswerable question (`data/answers.py: is_unanswerable`) and train the null atom on "unknown", which the model
    never said. The trainer must not read these files; they are kept for inspection and counted.
    An answer that is a refusal ("I don't know", "not mentioned") stays in the shard file: the model
    declined with the document in view, so the student learning to decline there is faithful distillation;
    `qa.read_jsonl` reads it as unanswerable. Refusals are counted.
  * `parts/shard-00003-of-00008.part-00012.jsonl`: the work in progress, `selfgen.documents_per_part`
    documents each, written atomically. A rerun reuses finished parts; once all parts of a shard exist they
    are merged into the shard file (atomically) and removed. An existing shard file means the shard is done.

Documents go to shards by a stable hash of their doc_id (sha256, not Python's salted `hash`), so every
question of a document lands in the same shard and every process agrees on the assignment. A process runs
`selfgen.shard`, or by default every shard i with i % process_count == process_index.
"""

import dataclasses
import hashlib
import json
import pathlib
import time
from collections.abc import Callable, Sequence

from doc2atom_jax import fileio, preemption
from doc2atom_jax.data import answers as answers_lib
from doc2atom_jax.data import prompts, qa
from doc2atom_jax.errors import UserError

MANIFEST = "selfgen.json"
PARTS = "parts"
ON_LONG = ("error", "skip")


@dataclasses.dataclass(frozen=True)
class Settings:
  """How to generate: the shard layout, this process's shards, the answer budget and batching."""
  num_shards: int
  shards: tuple[int, ...]
  max_new_tokens: int = 32
  documents_per_part: int = 16
  on_long: str = "error"  # a document whose prompt exceeds the context: "error" or "skip" (and count it)
  batch_size: int = 16  # most questions of one document per generate call

  def __post_init__(self):
    if self.num_shards < 1:
      raise UserError(f"selfgen.num_shards must be at least 1 (got {self.num_shards})")
    bad = [s for s in self.shards if not 0 <= s < self.num_shards]
    if bad:
      raise UserError(f"selfgen.shard {bad[0]} is not in [0, num_shards={self.num_shards})")
    for name in ("max_new_tokens", "documents_per_part", "batch_size"):
      if getattr(self, name) < 1:
        raise UserError(f"selfgen.{name} must be at least 1 (got {getattr(self, name)})")
    if self.on_long not in ON_LONG:
      raise UserError(f"selfgen.on_long must be one of {ON_LONG} (got {self.on_long!r})")


@dataclasses.dataclass
class Counts:
  """What one run did (parts reused from an earlier run are counted only in `parts_reused`)."""
  documents: int = 0
  questions: int = 0
  empty: int = 0  # questions answered with nothing (written to empty-*.jsonl, not trained on)
  refusals: int = 0  # answers that decline (kept; they read as unanswerable)
  skipped_documents: int = 0  # too long for the context (on_long="skip")
  skipped_questions: int = 0
  # Answer tokens generated, stop tokens not counted. An estimate: model.generate returns text only, so the
  # answers are re-encoded (capped at max_new_tokens; bytes split mid-character re-encode longer).
  tokens: int = 0
  parts_written: int = 0
  parts_reused: int = 0
  shards_merged: int = 0
  seconds: float = 0.0
  interrupted: bool = False  # stopped by SIGTERM after finishing a part

  def line(self) -> str:
    stop = "stopped by SIGTERM (rerun to resume); " if self.interrupted else ""
    return (f"selfgen: {stop}{self.documents} documents, {self.questions} questions ({self.empty} empty answers, {self.refusals} refusals), "
            f"skipped {self.skipped_documents} documents ({self.skipped_questions} questions) as too long, "
            f"{self.tokens} tokens generated in {self.seconds:.1f} s; {self.parts_written} parts written, "
            f"{self.parts_reused} reused, {self.shards_merged} shards merged")


# --------------------------------------------------------------------------------------------------------
# Shards and names.

def shard_of(doc_id: str, num_shards: int) -> int:
  """The shard of a document: stable across processes, runs and Python versions."""
  digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") % num_shards


def assign(doc_ids: Sequence[str], num_shards: int) -> list[list[str]]:
  """doc ids per shard, each in input order."""
  shards: list[list[str]] = [[] for _ in range(num_shards)]
  for doc_id in doc_ids:
    shards[shard_of(doc_id, num_shards)].append(doc_id)
  return shards


def process_shards(num_shards: int, process_index: int, process_count: int) -> tuple[int, ...]:
  """The shards one process runs by default: round robin, so any num_shards works with any process count."""
  return tuple(range(process_index, num_shards, process_count))


def _stem(shard: int, num_shards: int) -> str:
  return f"shard-{shard:05d}-of-{num_shards:05d}"


def shard_file(output, shard: int, num_shards: int) -> pathlib.Path:
  return pathlib.Path(output) / f"{_stem(shard, num_shards)}.jsonl"


def empty_file(output, shard: int, num_shards: int) -> pathlib.Path:
  return pathlib.Path(output) / f"empty-{shard:05d}-of-{num_shards:05d}.jsonl"


def part_file(output, shard: int, num_shards: int, part: int) -> pathlib.Path:
  return pathlib.Path(output) / PARTS / f"{_stem(shard, num_shards)}.part-{part:05d}.jsonl"


# --------------------------------------------------------------------------------------------------------
# Generation.

def _prompt_tokens(model, example: qa.QAExample) -> int:
  return len(model.encode(model.chat_prompt(prompts.in_context_prompt(example.context, example.question))))


def longest_prompt(model, examples: Sequence[qa.QAExample]) -> int:
  """Tokens of the longest teacher prompt (chat template included) among one document's questions."""
  return max(_prompt_tokens(model, ex) for ex in examples)


def _padded_size(n: int, batch_size: int) -> int:
  """Batch sizes rounded up to a power of two (at most batch_size): few shapes, so few compilations."""
  size = 1
  while size < n:
    size *= 2
  return min(size, batch_size)


def answer_document(model, examples: Sequence[qa.QAExample], max_new_tokens: int, batch_size: int) -> list[str]:
  """Greedy answers (raw text) to one document's questions, in batches of at most batch_size.

  The document's prompts share most of their length, so the model's length buckets waste little. A short
  batch is padded by repeating its last prompt (rows are independent; the copies are dropped).
  """
  texts = [prompts.in_context_prompt(ex.context, ex.question) for ex in examples]
  answer_prefixes = [ex.answer_prefix for ex in examples]  # the answer format every method is scored in
  answers = []
  for start in range(0, len(texts), batch_size):
    batch, batch_prefixes = texts[start:start + batch_size], answer_prefixes[start:start + batch_size]
    pad = _padded_size(len(batch), batch_size) - len(batch)
    out = model.generate(batch + batch[-1:] * pad, max_new_tokens=max_new_tokens, temperature=0.0,
                         answer_prefixes=batch_prefixes + batch_prefixes[-1:] * pad)
    answers.extend(out[:len(batch)])
  return answers


def _answer_tokens(model, answer: str, max_new_tokens: int) -> int:
  return min(len(model.tokenizer(answer, add_special_tokens=False)["input_ids"]), max_new_tokens)


def is_empty(answer: str) -> bool:
  """Nothing to train on: no text left after SQuAD normalization (which would read as a refusal)."""
  return not answers_lib.normalize_answer(answer)


def record(example: qa.QAExample, answer: str, model_name: str) -> dict:
  """One output line: the input example with the greedy answer as its only answer (see the module doc)."""
  answer = answer.strip()
  empty = is_empty(answer)
  out = {"id": example.id, "dataset": example.dataset, "doc_id": example.doc_id, "context": example.context,
         "question": example.question, "answers": [] if empty else [answer],
         "source_answers": list(example.answers), "self_generated": True, "model": model_name}
  if example.evidence is not None:
    out["evidence"] = list(example.evidence)
  if example.kind is not None:
    out["kind"] = example.kind
  if example.answer_prefix:
    out["answer_prefix"] = example.answer_prefix
  if empty:
    out.update(empty=True, generated=answer)
  return out


# --------------------------------------------------------------------------------------------------------
# The run: manifest, parts, merge, SIGTERM.

def input_digest(examples: Sequence[qa.QAExample]) -> str:
  """Identifies the input: ids, documents, questions and answers, in order."""
  h = hashlib.sha256()
  for ex in examples:
    h.update(json.dumps([ex.id, ex.doc_id, ex.context, ex.question, ex.answers]).encode("utf-8"))
  return h.hexdigest()


def manifest(model, settings: Settings, digest: str) -> dict:
  return {"model": model.name, "dtype": model.config.dtype,
          "prompt": model.chat_prompt(prompts.in_context_prompt("<document>", "<question>")),
          "max_new_tokens": settings.max_new_tokens, "num_shards": settings.num_shards,
          "documents_per_part": settings.documents_per_part, "input": digest}


def _check_manifest(output: pathlib.Path, expected: dict) -> None:
  """Writes the manifest, or refuses an output folder that holds another configuration's answers."""
  path = output / MANIFEST
  if path.exists():
    try:
      found = json.loads(fileio.read_text(path))
    except json.JSONDecodeError:
      raise UserError(f"{path} is not valid JSON; remove the folder {output} or use another selfgen.output") from None
    diff = sorted(k for k in set(expected) | set(found) if expected.get(k) != found.get(k))
    if diff:
      raise UserError(f"{output} holds self-generated answers of another configuration (differs in: "
                      f"{', '.join(diff)}); use another selfgen.output or remove that folder")
    return
  fileio.atomic_write_text(path, json.dumps(expected, indent=1) + "\n")


def _write_part(path: pathlib.Path, records: list[dict]) -> None:
  with fileio.atomic_open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")


def merge(output, shard: int, num_shards: int, num_parts: int) -> tuple[int, int]:
  """Parts -> the shard file (trainable records) and the empty-answer file; removes the parts.

  The empty file is written first and the shard file last, so the shard file's existence means done.
  Returns (records, empty records).
  """
  parts = [part_file(output, shard, num_shards, p) for p in range(num_parts)]
  kept, empty = [], []
  for path in parts:
    for line in fileio.read_text(path).splitlines():
      if line.strip():
        (empty if json.loads(line).get("empty") else kept).append(line + "\n")
  if empty:
    fileio.atomic_write_text(empty_file(output, shard, num_shards), "".join(empty))
  fileio.atomic_write_text(shard_file(output, shard, num_shards), "".join(kept))
  for path in parts:
    path.unlink(missing_ok=True)
  return len(kept), len(empty)


def _generate_part(model, documents: dict[str, list[qa.QAExample]], doc_ids: Sequence[str], settings: Settings,
                   counts: Counts, bar) -> list[dict]:
  """The records of one part's documents; updates `counts`."""
  context = model.config.max_position_embeddings
  budget = context - settings.max_new_tokens
  records = []
  for doc_id in doc_ids:
    questions = documents[doc_id]
    longest = longest_prompt(model, questions)
    if longest > budget:
      if settings.on_long == "error":
        raise UserError(f"document {doc_id!r}: a prompt of {longest} tokens; with selfgen.max_new_tokens="
                        f"{settings.max_new_tokens} the model's context of {context} allows {budget} "
                        "(selfgen.on_long=skip skips such documents)")
      counts.skipped_documents += 1
      counts.skipped_questions += len(questions)
    else:
      answers = answer_document(model, questions, settings.max_new_tokens, settings.batch_size)
      records.extend(record(ex, a, model.name) for ex, a in zip(questions, answers))
      counts.documents += 1
      counts.questions += len(questions)
      counts.empty += sum(map(is_empty, answers))
      counts.refusals += sum(not is_empty(a) and answers_lib.is_refusal(a) for a in answers)
      counts.tokens += sum(_answer_tokens(model, a, settings.max_new_tokens) for a in answers)
    bar.update(1)
  return records


def _pending_shards(output: pathlib.Path, settings: Settings) -> list[int]:
  """This process's shards without a shard file; drops parts a crash between merge and cleanup left behind."""
  todo = []
  for shard in settings.shards:
    if shard_file(output, shard, settings.num_shards).exists():
      for leftover in (output / PARTS).glob(f"{_stem(shard, settings.num_shards)}.part-*.jsonl"):
        leftover.unlink(missing_ok=True)
    else:
      todo.append(shard)
  return todo


def run(examples: Sequence[qa.QAExample], model, settings: Settings, output, *, progress: bool = True) -> Counts:
  """Generates this process's shards of `examples` into `output` (see the module docstring).

  SIGTERM lets the current part finish and be written, then returns with `interrupted` set.
  """
  import tqdm

  output = pathlib.Path(output)
  if not examples:
    raise UserError("the input holds no questions")
  if settings.max_new_tokens >= model.config.max_position_embeddings:
    raise UserError(f"selfgen.max_new_tokens={settings.max_new_tokens} leaves no room for a prompt in the "
                    f"model's context of {model.config.max_position_embeddings} tokens")
  documents = qa.group_by_document(examples)
  assignment = assign(list(documents), settings.num_shards)
  _check_manifest(output, manifest(model, settings, input_digest(examples)))
  per, counts, start = settings.documents_per_part, Counts(), time.perf_counter()
  todo = _pending_shards(output, settings)
  bar = tqdm.tqdm(total=sum(len(assignment[s]) for s in todo), desc="selfgen", unit="doc", dynamic_ncols=True,
                  disable=not progress)
  stop = preemption.SigtermFlag()  # the current part finishes, then the run returns (exit status 0)
  try:
    for shard in todo:
      doc_ids = assignment[shard]
      num_parts = -(-len(doc_ids) // per)
      for part in range(num_parts):
        chunk = doc_ids[part * per:(part + 1) * per]
        path = part_file(output, shard, settings.num_shards, part)
        if path.exists():
          counts.parts_reused += 1
          bar.update(len(chunk))
          continue
        if stop.requested:
          counts.interrupted = True
          bar.write(f"SIGTERM: stopped before {path.name}; finished parts are kept (rerun to resume)")
          return counts
        _write_part(path, _generate_part(model, documents, chunk, settings, counts, bar))
        counts.parts_written += 1
      merge(output, shard, settings.num_shards, num_parts)
      counts.shards_merged += 1
  finally:
    stop.restore()
    bar.close()
    counts.seconds = time.perf_counter() - start
  return counts


# --------------------------------------------------------------------------------------------------------
# mode=selfgen.

def read_input(cfg) -> list[qa.QAExample]:
  """The examples named by selfgen.input (a JSONL path) or selfgen.source (a qa.load_source name)."""
  if bool(cfg.input) == bool(cfg.source):
    raise UserError("set exactly one of --config.selfgen.input=<qa.jsonl> and --config.selfgen.source=<name> "
                    f"(names: {', '.join(qa.source_names())}, or local:<path.jsonl>)")
  limit = cfg.limit or None
  if cfg.input:
    if cfg.split:
      raise UserError("selfgen.split applies to selfgen.source only (a JSONL file is one split)")
    examples = qa.read_jsonl(cfg.input, on_error=cfg.on_error)
    return examples if limit is None else examples[:limit]
  return qa.load_source(cfg.source, split=cfg.split or None, limit=limit)


def settings_from_config(cfg, process_index: int, process_count: int) -> Settings:
  if cfg.shard < -1:
    raise UserError(f"selfgen.shard must be a shard index, or -1 for this process's shards (got {cfg.shard})")
  num_shards = cfg.num_shards or process_count
  shards = (cfg.shard,) if cfg.shard >= 0 else process_shards(num_shards, process_index, process_count)
  return Settings(num_shards=num_shards, shards=shards, max_new_tokens=cfg.max_new_tokens,
                  documents_per_part=cfg.documents_per_part, on_long=cfg.on_long, batch_size=cfg.batch_size)


def main(config, workdir: pathlib.Path | None, load_model: Callable[[], object]) -> Counts:
  """mode=selfgen: checks the config and reads the input before loading the model, then runs."""
  import jax

  cfg = config.selfgen
  if cfg.output:
    output = pathlib.Path(cfg.output).expanduser()
  elif workdir is not None:
    output = workdir / "selfgen"
  else:
    raise UserError("set --workdir (answers go to <workdir>/selfgen) or --config.selfgen.output")
  settings = settings_from_config(cfg, jax.process_index(), jax.process_count())
  examples = read_input(cfg)
  counts = run(examples, load_model(), settings, output)
  print(counts.line())
  if not counts.interrupted:
    print(f"wrote shards {', '.join(map(str, settings.shards)) or 'none'} of {settings.num_shards} to {output}")
  return counts
