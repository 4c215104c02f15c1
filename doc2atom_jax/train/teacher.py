"""The teacher: the frozen base model reading the document (or only the evidence atoms) scores the answer.

Its top-K log-probs per answer token are what the student distils. They are a pure function of (model,
prompt template, example), so they are cached on disk, one small file per example, keyed by a hash of
all three: CPU training then spends its time on the student.
"""

import functools
import hashlib
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from doc2atom_jax import fileio, paths, shapes
from doc2atom_jax.data import prompts
from doc2atom_jax.models import decoder as decoder_lib
from doc2atom_jax.train import vocab

TOP_K = 16


@functools.partial(jax.jit, static_argnames=("cfg", "k", "vocab_chunk"))
def _topk_logprobs(weights, cfg, tokens, mask, positions, *, k, vocab_chunk=0):
  """Top-k log-probs [B, A, k] at `positions` [B, A] only (the vocabulary projection of the document is skipped).

  vocab_chunk > 0: by vocabulary chunks of that size (`vocab.topk_logprobs`: no [B, A, V] logits; the same ids,
  ties included, and the same values to float rounding, so cached entries stay valid either way)."""
  hidden = decoder_lib.forward(weights, cfg, tokens, attention_mask=mask, compute_logits=False).hidden
  at_answers = jnp.take_along_axis(hidden, positions[..., None], axis=1)
  if vocab_chunk > 0:
    matrix, axis = vocab.head_of(weights)
    return vocab.topk_logprobs(at_answers, matrix, k, chunk=vocab_chunk, vocab_axis=axis, softcap=cfg.final_softcap)
  logits = decoder_lib.logits_from_hidden(weights, cfg, at_answers)
  return jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), k)


ANSWER_BUCKET = 8  # answer axis of a packed batch: a multiple of this


def pack_answers(prompts: list[list[int]], answers: list[list[int]], bucket: int = 64,
                 answer_bucket: int = ANSWER_BUCKET) -> dict:
  """Prompt + answer rows, right-padded to buckets, with the positions whose logits predict each answer token.

  Returns numpy arrays in the batch layout of `step.BATCH_FIELDS`: s_tokens, s_mask [B, T]; answer_pos,
  answer_mask, targets [B, A].
  """
  B = len(prompts)
  length = shapes.multiple(max(len(p) + len(a) for p, a in zip(prompts, answers)), bucket)
  width = shapes.multiple(max(map(len, answers)), answer_bucket)
  out = {"s_tokens": np.zeros((B, length), np.int32), "s_mask": np.zeros((B, length), bool),
         "answer_pos": np.zeros((B, width), np.int32), "answer_mask": np.zeros((B, width), bool),
         "targets": np.zeros((B, width), np.int32)}
  for i, (p, a) in enumerate(zip(prompts, answers)):
    out["s_tokens"][i, :len(p) + len(a)], out["s_mask"][i, :len(p) + len(a)] = p + a, True
    out["answer_pos"][i, :len(a)] = np.arange(len(p) - 1, len(p) + len(a) - 1)
    out["answer_mask"][i, :len(a)], out["targets"][i, :len(a)] = True, a
  return out


def topk_on_answers(model, prompts: list[list[int]], answers: list[list[int]], k: int = TOP_K, bucket: int = 64,
                    answer_bucket: int = 8, vocab_chunk: int = 0):
  """Teacher top-K (ids [A, K], log-probs [A, K]) at the positions that predict each answer token; vocab_chunk > 0
  ranks the vocabulary in chunks of that many ids (no [B, A, V] logits; same results)."""
  packed = pack_answers(prompts, answers, bucket, answer_bucket)
  logp, ids = _topk_logprobs(model.weights, model.config, jnp.asarray(packed["s_tokens"]),
                             jnp.asarray(packed["s_mask"]), jnp.asarray(packed["answer_pos"]), k=k,
                             vocab_chunk=int(vocab_chunk))
  logp, ids = np.asarray(logp), np.asarray(ids)
  return [(ids[i, :len(a)].astype(np.int32), logp[i, :len(a)].astype(np.float32)) for i, a in enumerate(answers)]


# The answer format's version (`BaseModel.prompt_answer_ids`): part of every cache key, so entries scored in
# another format (v1: no answer prefix, the end-of-turn token scored) are never read for these targets.
ANSWER_FORMAT = "v2: answer prefix prefilled, ' ' + answer scored, no end-of-turn"


def example_key(doc_id: str, qid: str, question: str, answer_prefix: str, answer: str) -> str:
  """One example's part of a cache key: everything its teacher prompt and targets depend on besides the
  document's text (the doc id stands for it) and the model."""
  return "\x00".join((doc_id, qid, question, answer_prefix, answer))


def template_of(model) -> str:
  """The rendered teacher template and answer format, the cache's key beside the model: a change of either
  moves the cache to a fresh folder."""
  return model.chat_prompt(prompts.in_context_prompt("{document}", "{question}")) + "{answer_prefix}\x00" + ANSWER_FORMAT


class TeacherCache:
  """On-disk cache of teacher top-K per (model, template, example); atomic writes, safe to share."""

  def __init__(self, root, model_key: str, template: str):
    self.root = pathlib.Path(root)
    self.prefix = hashlib.sha256(json.dumps([model_key, template]).encode()).hexdigest()[:16]

  @classmethod
  def for_model(cls, model) -> "TeacherCache":
    """The project's shared cache for a model (under `paths.cache_root()`), keyed by `template_of`."""
    return cls(paths.cache_root() / "teacher", f"{model.name}/{model.config.dtype}",
               template_of(model))

  def _path(self, example_key: str) -> pathlib.Path:
    digest = hashlib.sha256(example_key.encode()).hexdigest()
    return self.root / self.prefix / digest[:2] / f"{digest}.npz"

  def get_or_compute(self, model, keys: list[str], prompts, answers, k: int = TOP_K, vocab_chunk: int = 0):
    """Cached entries where present; the rest computed in one batch and stored (vocab_chunk: see
    `topk_on_answers`; not part of the key, the results are the same)."""
    results = [None] * len(keys)
    missing = []
    for i, key in enumerate(keys):
      path = self._path(key)
      if path.exists():
        try:
          with np.load(path) as f:
            results[i] = (f["ids"], f["logp"])
          continue
        except (OSError, ValueError, KeyError):
          pass  # unreadable entry: recompute it
      missing.append(i)
    if missing:
      computed = topk_on_answers(model, [prompts[i] for i in missing], [answers[i] for i in missing], k,
                                 vocab_chunk=vocab_chunk)
      for i, (ids, logp) in zip(missing, computed):
        with fileio.atomic_open(self._path(keys[i]), "wb") as f:
          np.savez(f, ids=ids, logp=logp)
        results[i] = (ids, logp)
    return results
