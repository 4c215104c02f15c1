"""A small evaluation on held-out synthetic documents: no_context vs in_context vs doc2atom, and controls.

Primary metrics are continuous — the teacher-forced negative log-likelihood of the gold answer and the
top-K KL to the in-context teacher on the answer tokens — because at CPU scale generated-answer metrics
(F1, EM) move late. Refusals are counted on out-of-scope questions, false refusals on the others. The full
evaluator (every method of DESIGN §3, real QA, confidence intervals, report) grows from this module.

Controls say whether doc2atom learned anything about *the document*: `default_only` (the trained default
adapter, no atoms: what format learning alone buys) and `wrong_document` (the question routed over the
atoms of another held-out document). `learning_check` compares doc2atom against them, and against the
untrained compiler, by a stated margin.
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from doc2atom_jax import shapes
from doc2atom_jax.atoms import atomize, bank as bank_lib, fusion
from doc2atom_jax.data import prompts
from doc2atom_jax.errors import UserError
from doc2atom_jax.eval import metrics as metrics_lib
from doc2atom_jax.train import batch as batch_lib
from doc2atom_jax.train import data as data_lib
from doc2atom_jax.train import losses
from doc2atom_jax.train import step as step_lib
from doc2atom_jax.train import teacher as teacher_lib

METHODS = ("no_context", "in_context", "doc2atom")
CONTROLS = ("default_only", "wrong_document")
ORACLE = "doc2atom_oracle"  # the evidence atoms at uniform weight: the compiler's share, routing aside


def in_memory_bank(documents: list[bank_lib.BankDocument], code_dtype: str = "bfloat16",
                   key_dtype: str = "float32", shared_tail: int = 0) -> bank_lib.AtomBank:
  """The bank these documents would load as from disk (codes and keys rounded or quantized as stored);
  `shared_tail`: the bank's (compile mode's is the compiler's copy_dim), which changes int8 codes' scales."""
  if not any(len(d.atoms) for d in documents):
    raise UserError("empty bank: no document with atoms to route over or compose")
  codes = bank_lib.roundtrip_codes(np.concatenate([d.codes for d in documents]), code_dtype,  # as bank.py stores
                                   shared_tail)
  keys = bank_lib.roundtrip_keys(np.concatenate([d.keys for d in documents]), key_dtype)
  atoms = [a for d in documents for a in d.atoms]
  return bank_lib.AtomBank(
      path=None, fingerprint="", meta={}, doc_ids=[d.doc_id for d in documents],
      doc_offsets=np.cumsum([0] + [len(d.atoms) for d in documents]), codes=codes, keys=keys,
      types=np.asarray([atomize.ATOM_TYPES.index(a.type) for a in atoms], np.int32), atoms=atoms,
      texts={d.doc_id: d.text for d in documents}, code_dtype=code_dtype, key_dtype=key_dtype)


# Student logits at the answer positions, jitted once for every evaluator (quick, runner).
answer_logits = jax.jit(step_lib.answer_logits, static_argnums=1)

def pack_prompt_answers(model, user_turns, answers, answer_prefixes=None) -> dict:
  """The packed numpy batch of chat prompt + gold answer rows in the one answer format
  (`BaseModel.prompt_answer_ids`): packed as the teacher packs them (`teacher.pack_answers`), then padded to a
  `shapes.length_bucket`."""
  packed = teacher_lib.pack_answers(*model.prompt_answer_ids(user_turns, answers, answer_prefixes))
  length = packed["s_tokens"].shape[1]
  target = max(length, min(shapes.length_bucket(length), model.config.max_position_embeddings))
  for name in ("s_tokens", "s_mask"):
    packed[name] = np.pad(packed[name], ((0, 0), (0, target - length)))
  return packed


def prompt_answer_logits(model, user_turns, answers, adapter=None, answer_prefixes=None):
  """(logits [B, A, V] at the answer positions, the packed numpy batch) for chat prompt + gold answer rows."""
  packed = pack_prompt_answers(model, user_turns, answers, answer_prefixes)
  return answer_logits(model.weights, model.config, packed, adapter), packed


def _teacher_scores(model, question_rows, doc_text):
  """(gold-answer NLL, teacher-forced exact match) with the document in the prompt, per question (one padded
  batch, one forward)."""
  logits, b = prompt_answer_logits(model, [prompts.in_context_prompt(doc_text, q.question) for q in question_rows],
                                   [q.answer for q in question_rows],
                                   answer_prefixes=[q.answer_prefix for q in question_rows])
  return (np.asarray(losses.answer_ce(logits, b["targets"], b["answer_mask"])),
          np.asarray(losses.greedy_match(logits, b["targets"], b["answer_mask"])))


def evaluate(system, documents, *, max_new_tokens: int = 12, generate: bool = True, controls: bool = True,
             baselines: bool = True, progress: str | None = None) -> dict:
  """Per method: mean nll, kl (to the in-context teacher), tf_em (teacher-forced exact match: greedy decoding
  after the answer prefix would say the gold), f1, em, refusal rates; plus routing top-1.

  nll and kl are over answerable questions (as the training's kd term): on out-of-scope ones the right
  behaviour is to refuse, which `refusal` measures, while a small teacher reading the document often
  makes an answer up, and KL to it would count a correct abstention against the method.

  With `controls`, also `doc2atom_oracle` (the question's evidence atoms at uniform weight, as training's
  atom-fidelity term composes them: what the compiler alone gives) and, with two documents or more,
  `default_only` and `wrong_document` (nll, kl, tf_em); without `baselines`, doc2atom (and its controls) only. `progress`: a progress bar's label (None: no bar).
  """
  model = system.model
  per = collections.defaultdict(lambda: collections.defaultdict(list))
  banks = [in_memory_bank([system.compile_document(doc.text, doc.doc_id)], shared_tail=system.cfg.copy_dim)
           for doc in documents]
  for j, doc in enumerate(tqdm.tqdm(documents, desc=progress, unit="doc", dynamic_ncols=True,
                                    disable=progress is None)):
    td = data_lib.to_train_document(doc, model.tokenizer)
    b = batch_lib.build(model, [td], evidence_teacher=False)  # only the document teacher is read here
    bank = banks[j]
    questions = [q.question for q in td.questions]
    indices, weights, abstain = system.select(bank, questions)
    adapters = {"no_context": None} if baselines else {}
    adapters["doc2atom"] = system.adapter(bank, indices, weights)
    if controls:
      adapters[ORACLE] = system.adapter(bank, *_oracle_routes(td.questions, indices.shape[1]))
    if controls and len(documents) > 1:
      adapters["default_only"] = system.adapter(bank, indices, np.zeros_like(weights))
      other = banks[(j + 1) % len(documents)]
      adapters["wrong_document"] = system.adapter(other, *system.select(other, questions)[:2])
    b = {k_: jnp.asarray(v) for k_, v in b.items()}
    ans = b["answer_mask"]
    answerable = np.asarray([not q.out_of_scope for q in td.questions])
    for method, adapter in adapters.items():
      logits = answer_logits(model.weights, model.config, b, adapter)
      nll = np.asarray(losses.answer_ce(logits, b["targets"], ans))
      kl = np.asarray(losses.topk_kl(logits, b["teacher_ids"], b["teacher_logp"], ans))
      tf_em = np.asarray(losses.greedy_match(logits, b["targets"], ans), np.float32)
      per[method]["nll"] += nll[answerable].tolist()
      per[method]["kl"] += kl[answerable].tolist()
      per[method]["tf_em"] += tf_em[answerable].tolist()
    if baselines:
      nll, tf_em = _teacher_scores(model, td.questions, doc.text)
      per["in_context"]["nll"] += nll[answerable].tolist()
      per["in_context"]["kl"] += [0.0] * int(answerable.sum())
      per["in_context"]["tf_em"] += tf_em[answerable].astype(np.float32).tolist()
    for q, idx, abst in zip(td.questions, indices, abstain):
      if q.evidence:
        per["doc2atom"]["route_top1"].append(float(not abst and int(idx[0]) in q.evidence))
      elif q.out_of_scope:
        per["doc2atom"]["route_top1"].append(float(bool(abst)))
    if not generate:
      continue
    answer_prefixes = [q.answer_prefix for q in td.questions]
    ask = lambda turns, adapter=None: model.generate(turns, max_new_tokens=max_new_tokens, adapter=adapter,
                                                     answer_prefixes=answer_prefixes)
    outputs = {"doc2atom": [("unknown" if a else o) for a, o in zip(
        abstain, ask([prompts.question_prompt(q) for q in questions], adapters["doc2atom"]))]}
    if baselines:
      outputs["no_context"] = ask([prompts.question_prompt(q) for q in questions])
      outputs["in_context"] = ask([prompts.in_context_prompt(doc.text, q) for q in questions])
    for method, answers in outputs.items():
      for q, text in zip(td.questions, answers):
        refs = [q.answer]
        per[method]["f1"].append(metrics_lib.f1_score(text, refs))
        per[method]["em"].append(metrics_lib.exact_match(text, refs))
        per[method]["refusal" if q.out_of_scope else "false_refusal"].append(float(metrics_lib.is_refusal(text)))
  return {m: {k: float(np.mean(v)) for k, v in per[m].items() if v} for m in (*METHODS, ORACLE, *CONTROLS)
          if m in per}


def _oracle_routes(questions, k: int):
  """(indices [B, k], weights [B, k]) composing each question's evidence atoms at uniform weight (training's
  `L_atom` composition); a question without evidence gets the default adapter only."""
  indices, weights = np.zeros((len(questions), k), np.int32), np.zeros((len(questions), k), np.float32)
  for row, q in enumerate(questions):
    evidence = list(q.evidence or ())[:k]
    indices[row, :len(evidence)] = evidence
    weights[row, :len(evidence)] = 1.0 / max(len(evidence), 1)
  return indices, weights


def calibrate_abstention(system, documents, false_refusal: float) -> dict:
  """The evidence abstention's margin threshold (`fusion.calibrate_margin`) from these documents' answerable
  questions that the lexical check lets through: below it, about `false_refusal` of them would be refused."""
  margins = []
  for doc in documents:
    bank = in_memory_bank([system.compile_document(doc.text, doc.doc_id)], shared_tail=system.cfg.copy_dim)
    asked = [q.question for q in doc.questions if q.kind != "out_of_scope"]
    if not asked:
      continue
    lexicon = system.lexicon(bank)
    gaps = fusion.margins(np.asarray(system.scores(bank, asked)))
    margins += [float(g) for q, g in zip(asked, gaps) if not fusion.refuses(q, lexicon)]
  return {"margin": fusion.calibrate_margin(margins, false_refusal), "false_refusal": false_refusal,
          "questions": len(margins), "documents": len(documents)}


CHECKED = (("kl", -1), ("tf_em", 1))  # (metric, direction): KL must fall, teacher-forced exact match rise


def learning_check(results: dict, untrained: dict | None, margin: float, em_margin: float = 0.05) -> list[dict]:
  """doc2atom on the held-out documents against each control, per metric: its KL lower by at least `margin`
  (nats per token) and its teacher-forced exact match higher by at least `em_margin` (a share of questions).
  A row per control and metric the results have."""
  controls = {"untrained compiler": (untrained or {}).get("doc2atom", {}),
              "default adapter only": results.get("default_only", {}),
              "atoms of another document": results.get("wrong_document", {})}
  rows = []
  for metric, direction in CHECKED:
    need = margin if metric == "kl" else em_margin
    ours = results["doc2atom"].get(metric)
    for name, control in controls.items():
      theirs = control.get(metric)
      if ours is None or theirs is None:
        continue
      gain = (ours - theirs) * direction
      rows.append({"control": name, "metric": metric, "control_value": theirs, "doc2atom_value": ours,
                   "margin": need, "passed": bool(gain >= need)})
  return rows


def format_check(rows: list[dict]) -> str:
  lines = ["| doc2atom vs | metric | control | doc2atom | required margin | result |", "|---|---|---|---|---|---|"]
  for r in rows:
    gain = (r["doc2atom_value"] - r["control_value"]) * dict(CHECKED)[r["metric"]]
    lines.append(f"| {r['control']} | {r['metric']} | {r['control_value']:.3f} | {r['doc2atom_value']:.3f} | "
                 f"{r['margin']:.3f} | {'PASS' if r['passed'] else 'FAIL'} ({gain:+.3f}) |")
  return "\n".join(lines)


def format_table(results: dict) -> str:
  columns = ["nll", "kl", "tf_em", "f1", "em", "refusal", "false_refusal", "route_top1"]
  lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
  for method, row in results.items():
    lines.append(f"| {method} | " + " | ".join(f"{row[c]:.3f}" if c in row else "" for c in columns) + " |")
  return "\n".join(lines)
