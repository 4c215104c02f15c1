"""A small evaluation on held-out synthetic documents: no_context vs in_context vs doc2atom.

Primary metrics are continuous — the teacher-forced negative log-likelihood of the gold answer and the
top-K KL to the in-context teacher on the answer tokens — because at CPU scale generated-answer metrics
(F1, EM) move late. Refusals are counted on out-of-scope questions, false refusals on the others. The full
evaluator (every method of DESIGN §3, real QA, confidence intervals, report) grows from this module.
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np

from doc2atom_jax.atoms import atomize, bank as bank_lib
from doc2atom_jax.data import prompts
from doc2atom_jax.eval import metrics as metrics_lib
from doc2atom_jax.models import decoder as decoder_lib
from doc2atom_jax.train import batch as batch_lib
from doc2atom_jax.train import data as data_lib
from doc2atom_jax.train import losses

METHODS = ("no_context", "in_context", "doc2atom")


def in_memory_bank(documents: list[bank_lib.BankDocument], code_dtype: str = "bfloat16") -> bank_lib.AtomBank:
  """The bank these documents would load as from disk (codes rounded to the storage dtype)."""
  codes = np.concatenate([d.codes for d in documents])
  if code_dtype == "bfloat16":
    codes = np.asarray(jnp.asarray(codes, jnp.bfloat16).astype(jnp.float32))
  atoms = [a for d in documents for a in d.atoms]
  return bank_lib.AtomBank(
      path=None, fingerprint="", meta={}, doc_ids=[d.doc_id for d in documents],
      doc_offsets=np.cumsum([0] + [len(d.atoms) for d in documents]), codes=codes,
      keys=np.concatenate([d.keys for d in documents]),
      types=np.asarray([atomize.ATOM_TYPES.index(a.type) for a in atoms], np.int32), atoms=atoms,
      texts={d.doc_id: d.text for d in documents}, code_dtype=code_dtype)


def _forward_logits(model, tokens, mask, adapter=None):
  return decoder_lib.forward(model.weights, model.config, jnp.asarray(tokens), attention_mask=jnp.asarray(mask),
                             adapter=adapter).logits


def _teacher_nll(model, question_rows, doc_text):
  """Gold-answer NLL with the document in the prompt, per question."""
  out = []
  for q in question_rows:
    prompt = model.encode(model.chat_prompt(prompts.in_context_prompt(doc_text, q.question)))
    answer = batch_lib.answer_tokens(model, q.answer)
    tokens = np.asarray([prompt + answer], np.int32)
    logits = _forward_logits(model, tokens, np.ones_like(tokens, bool))
    logp = jax.nn.log_softmax(logits[0, len(prompt) - 1:-1], axis=-1)
    out.append(float(-jnp.mean(logp[jnp.arange(len(answer)), jnp.asarray(answer)])))
  return out


def evaluate(system, documents, *, max_new_tokens: int = 12, generate: bool = True) -> dict:
  """Per method: mean nll, kl (to the in-context teacher), f1, em, refusal rates; plus routing top-1."""
  model = system.model
  per = collections.defaultdict(lambda: collections.defaultdict(list))
  for doc in documents:
    td = data_lib.to_train_document(doc, model.tokenizer)
    b = batch_lib.build(model, [td])
    bank = in_memory_bank([system.compile_document(doc.text, doc.doc_id)])
    questions = [q.question for q in td.questions]
    indices, weights, abstain = system.select(bank, questions)
    adapters = {"no_context": None, "doc2atom": system.adapter(bank, indices, weights)}
    ans = jnp.asarray(b["answer_mask"])
    for method, adapter in adapters.items():
      logits = _forward_logits(model, b["s_tokens"], b["s_mask"], adapter)
      per[method]["nll"] += np.asarray(losses.answer_ce(logits, jnp.asarray(b["targets"]), ans)).tolist()
      per[method]["kl"] += np.asarray(losses.topk_kl(logits, jnp.asarray(b["teacher_ids"]),
                                                     jnp.asarray(b["teacher_logp"]), ans)).tolist()
    per["in_context"]["nll"] += _teacher_nll(model, td.questions, doc.text)
    per["in_context"]["kl"] += [0.0] * len(questions)
    for q, idx, abst in zip(td.questions, indices, abstain):
      if q.evidence:
        per["doc2atom"]["route_top1"].append(float(not abst and int(idx[0]) in q.evidence))
      elif q.out_of_scope:
        per["doc2atom"]["route_top1"].append(float(bool(abst)))
    if not generate:
      continue
    outputs = {
        "no_context": model.generate([prompts.question_prompt(q) for q in questions], max_new_tokens=max_new_tokens),
        "in_context": model.generate([prompts.in_context_prompt(doc.text, q) for q in questions],
                                     max_new_tokens=max_new_tokens),
        "doc2atom": [("unknown" if a else o) for a, o in zip(abstain, model.generate(
            [prompts.question_prompt(q) for q in questions], max_new_tokens=max_new_tokens,
            adapter=adapters["doc2atom"]))],
    }
    for method, answers in outputs.items():
      for q, text in zip(td.questions, answers):
        refs = [q.answer]
        per[method]["f1"].append(metrics_lib.f1_score(text, refs))
        per[method]["em"].append(metrics_lib.exact_match(text, refs))
        per[method]["refusal" if q.out_of_scope else "false_refusal"].append(float(metrics_lib.is_refusal(text)))
  return {m: {k: float(np.mean(v)) for k, v in per[m].items() if v} for m in METHODS}


def format_table(results: dict) -> str:
  columns = ["nll", "kl", "f1", "em", "refusal", "false_refusal", "route_top1"]
  lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
  for method, row in results.items():
    lines.append(f"| {method} | " + " | ".join(f"{row[c]:.3f}" if c in row else "" for c in columns) + " |")
  return "\n".join(lines)
