"""Documents with their questions -> one training batch (the arrays of `step.BATCH_FIELDS`).

The unit of training is a document with its questions: the document is encoded and compiled once and
every question reuses its atoms. Student prompts are the question alone in the chat template; the
teacher reads the document (and the evidence teacher only the evidence atoms) in the shared prompt; both
prefill the question's answer prefix and score the same answer tokens (`BaseModel.prompt_answer_ids`).
Shapes are padded to buckets so the jitted step compiles for a handful of shapes only.
"""

import dataclasses

import numpy as np

from doc2atom_jax import shapes
from doc2atom_jax.atoms import atomize, encode
from doc2atom_jax.data import prompts
from doc2atom_jax.data.records import TrainDocument
from doc2atom_jax.errors import UserError
from doc2atom_jax.train import state_cache as state_cache_lib
from doc2atom_jax.train import teacher as teacher_lib


def _pad(rows, length, dtype, fill=0):
  out = np.full((len(rows), length, *np.shape(rows[0])[1:]), fill, dtype)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out


def build(model, documents: list[TrainDocument], *, cache: teacher_lib.TeacherCache | None = None,
          k: int = teacher_lib.TOP_K, token_bucket: int = 16, doc_bucket: int = 32, atom_bucket: int = 8,
          span_bucket: int = 16, answer_bucket: int = 8,
          num_questions: int | None = None, evidence_teacher: bool = True,
          states: state_cache_lib.DocumentStateCache | None = None) -> dict:
  """numpy arrays of one batch; teacher top-K from the cache (computed and stored where missing).

  evidence_teacher False: the evidence teacher's fields stay zero and nothing computes them (a loss without
  the atom-fidelity term never reads them: the unrouted methods, the evaluators).

  num_questions pads the question axis to a fixed size (rows with q_valid False), so batches whose
  documents have fewer questions keep the step's compiled shape.

  states: the document-state cache; the batch then carries each atom's frozen span states (`doc_spans`) and the
  step runs no document pass.
  """
  D = len(documents)
  N = shapes.atom_bucket(max(len(d.doc.atoms) for d in documents), atom_bucket)
  S = shapes.multiple(max(a.token_end - a.token_start for d in documents for a in d.doc.atoms), span_bucket)
  T = shapes.multiple(max(len(d.doc.token_ids) for d in documents), doc_bucket)
  if T > model.config.max_position_embeddings:
    raise UserError(f"a training document has {T} tokens, over the model's context of "
                    f"{model.config.max_position_embeddings}")
  batch = {"doc_tokens": _pad([d.doc.token_ids for d in documents], T, np.int32),
           "atom_idx": np.zeros((D, N, S), np.int32), "atom_span_mask": np.zeros((D, N, S), bool),
           "atom_types": np.zeros((D, N), np.int32), "atom_mask": np.zeros((D, N), bool)}
  batch["doc_mask"] = np.arange(T)[None] < np.asarray([len(d.doc.token_ids) for d in documents])[:, None]
  for j, d in enumerate(documents):
    for i, a in enumerate(d.doc.atoms):
      n = a.token_end - a.token_start
      batch["atom_idx"][j, i, :n] = np.arange(a.token_start, a.token_end)
      batch["atom_span_mask"][j, i, :n] = True
      batch["atom_types"][j, i] = atomize.ATOM_TYPES.index(a.type)
      batch["atom_mask"][j, i] = True
  if states is not None:
    batch["doc_spans"] = state_cache_lib.span_states(states, model, documents, N, S)

  rows = [(j, q) for j, d in enumerate(documents) for q in d.questions]
  texts = [q.answer for _, q in rows]
  answer_prefixes = [q.answer_prefix for _, q in rows]
  students, answers = model.prompt_answer_ids([prompts.question_prompt(q.question) for _, q in rows], texts,
                                              answer_prefixes)
  teachers, _ = model.prompt_answer_ids([prompts.in_context_prompt(documents[j].doc.text, q.question)
                                         for j, q in rows], texts, answer_prefixes)
  keys = [teacher_lib.example_key(documents[j].doc.doc_id, q.qid, q.question, q.answer_prefix, q.answer)
          for j, q in rows]

  def teacher(prompts_, suffix):
    if cache is not None:
      return cache.get_or_compute(model, [k_ + suffix for k_ in keys], prompts_, answers, k)
    return teacher_lib.topk_on_answers(model, prompts_, answers, k)

  top = teacher(teachers, "\x00doc")
  ev_top = None
  if evidence_teacher:
    evidence_texts = [" ".join(documents[j].doc.atoms[i].text for i in (q.evidence or ())) or documents[j].doc.text
                      for j, q in rows]
    ev_teachers, _ = model.prompt_answer_ids([prompts.in_context_prompt(e, q.question)
                                              for e, (_, q) in zip(evidence_texts, rows)], texts, answer_prefixes)
    ev_top = teacher(ev_teachers, "\x00evidence")

  Ts = shapes.multiple(max(len(s) + len(a) for s, a in zip(students, answers)), token_bucket)
  A = shapes.multiple(max(map(len, answers)), answer_bucket)
  B = len(rows)
  batch.update(s_tokens=_pad([s + a for s, a in zip(students, answers)], Ts, np.int32),
               s_mask=_pad([[True] * (len(s) + len(a)) for s, a in zip(students, answers)], Ts, bool),
               answer_pos=np.zeros((B, A), np.int32), answer_mask=np.zeros((B, A), bool),
               targets=np.zeros((B, A), np.int32), teacher_ids=np.zeros((B, A, k), np.int32),
               teacher_logp=np.zeros((B, A, k), np.float32), ev_teacher_ids=np.zeros((B, A, k), np.int32),
               ev_teacher_logp=np.zeros((B, A, k), np.float32))
  for b, (s, a) in enumerate(zip(students, answers)):
    n = len(a)
    batch["answer_pos"][b, :n] = np.arange(len(s) - 1, len(s) + n - 1)
    batch["answer_mask"][b, :n] = True
    batch["targets"][b, :n] = a
    batch["teacher_ids"][b, :n], batch["teacher_logp"][b, :n] = top[b]
    if ev_top is not None:
      batch["ev_teacher_ids"][b, :n], batch["ev_teacher_logp"][b, :n] = ev_top[b]
  questions, own = encode.question_ids(model, [q.question for _, q in rows])  # the router reads no prefix
  Tq = shapes.multiple(max(map(len, questions)), token_bucket)
  batch.update(q_tokens=_pad(questions, Tq, np.int32), q_mask=_pad([[True] * len(s) for s in questions], Tq, bool),
               q_own=_pad(own, Tq, bool))
  batch["doc_of_q"] = np.asarray([j for j, _ in rows], np.int32)
  batch["evidence"] = np.zeros((B, N), bool)
  for b, (_, q) in enumerate(rows):
    batch["evidence"][b, list(q.evidence or ())] = True
  batch["labelled"] = np.asarray([q.evidence is not None and len(q.evidence) > 0 for _, q in rows])
  batch["out_of_scope"] = np.asarray([q.out_of_scope for _, q in rows])
  batch["q_valid"] = np.ones(B, bool)
  if num_questions is not None and num_questions > B:
    for name in batch:
      if name == "doc_of_q" or not (name.startswith("doc_") or name.startswith("atom_")):  # question rows
        pad = [(0, num_questions - B)] + [(0, 0)] * (batch[name].ndim - 1)
        batch[name] = np.pad(batch[name], pad)
  return batch
