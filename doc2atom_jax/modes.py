"""What each `config.mode` does. `main.py` only parses flags and dispatches here."""

import json
import pathlib
import time

from doc2atom_jax import fileio, models
from doc2atom_jax.data import prompts
from doc2atom_jax.errors import UserError


def load_model(config) -> models.BaseModel:
  return models.load(config.model.name, dtype=config.model.dtype, scan_layers=config.model.scan_layers)


def generate(config, workdir: pathlib.Path | None) -> list[dict]:
  """Answers questions with the document in the prompt (the `in_context` baseline) and prints them."""
  g = config.generate
  document = fileio.read_text(g.document_file) if g.document_file else g.document
  questions = [g.question] if g.question else list(g.questions)
  if not document.strip():
    raise UserError("the document is empty: set generate.document or generate.document_file")
  if not questions or any(not q.strip() for q in questions):
    raise UserError("empty question: set generate.question or generate.questions")
  model = load_model(config)
  start = time.perf_counter()
  answers = model.generate([prompts.in_context_prompt(document, q) for q in questions],
                           max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                           seed=config.seed, truncation=g.truncation)
  seconds = time.perf_counter() - start
  records = [{"question": q, "answer": a.strip(), "model": model.name} for q, a in zip(questions, answers)]
  for r in records:
    print(f"Q: {r['question']}\nA: {r['answer']}\n")
  print(f"({len(records)} answers in {seconds:.1f} s with {model.name})")
  if workdir is not None:
    out = workdir / "generate.jsonl"
    fileio.atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in records))
    print(f"wrote {out}")
  return records


MODES = {"generate": generate}
