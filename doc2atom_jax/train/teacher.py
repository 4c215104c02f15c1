"""The teacher: the frozen base model reading the document (or only the evidence atoms) scores the answer.

Its top-K log-probs per answer token are what the student distils. They are a pure function of (model,
prompt template, example), so they are cached on disk, one small file per example, keyed by a hash of
all three: CPU training then spends its time on the student.

Rows that share a long token prefix (one document's questions: the chat header and the document) are scored
from that prefix's KV cache: the prefix runs once, each row only its suffix (question, assistant header,
answer prefix, answer), instead of the whole document once per question (`topk_on_answers`).
"""

import collections
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
from doc2atom_jax.models import generate as generate_lib
from doc2atom_jax.train import vocab

TOP_K = 16


def _topk_at(weights, cfg, hidden, positions, k: int, vocab_chunk: int):
  """Top-k log-probs [B, A, k] of final hidden states [B, T, d] at `positions` [B, A] (columns of T)."""
  at_answers = jnp.take_along_axis(hidden, positions[..., None], axis=1)
  if vocab_chunk > 0:
    matrix, axis = vocab.head_of(weights)
    return vocab.topk_logprobs(at_answers, matrix, k, chunk=vocab_chunk, vocab_axis=axis, softcap=cfg.final_softcap)
  logits = decoder_lib.logits_from_hidden(weights, cfg, at_answers)
  return jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), k)


@functools.partial(jax.jit, static_argnames=("cfg", "k", "vocab_chunk"))
def _topk_logprobs(weights, cfg, tokens, mask, positions, *, k, vocab_chunk=0):
  """Top-k log-probs [B, A, k] at `positions` [B, A] only (the vocabulary projection of the document is skipped).

  vocab_chunk > 0: by vocabulary chunks of that size (`vocab.topk_logprobs`: no [B, A, V] logits; the same ids,
  ties included, and the same values to float rounding, so cached entries stay valid either way)."""
  hidden = decoder_lib.forward(weights, cfg, tokens, attention_mask=mask, compute_logits=False).hidden
  return _topk_at(weights, cfg, hidden, positions, k, vocab_chunk)


@functools.partial(jax.jit, static_argnames=("cfg", "k", "vocab_chunk"))
def _topk_logprobs_after_prefix(weights, cfg, prefix_tokens, prefix_mask, tokens, mask, positions, prefix_length,
                                *, k, vocab_chunk=0):
  """`_topk_logprobs` of rows prefix + suffix: the prefix [1, P] (`generate.right_pad`) prefilled once, its KV
  cache broadcast over the B left-padded suffixes [B, S] (`generate.run_suffixes`); `positions` [B, A] are
  columns of the suffixes. Suffix tokens take positions prefix_length, prefix_length + 1, ... as in the
  whole row, so every row sees the keys and positions of its packed pass (sliding windows included): the
  same results to float rounding."""
  prefix = generate_lib.prefill_prefix(weights, cfg, prefix_tokens, prefix_mask)
  hidden = generate_lib.run_suffixes(weights, cfg, prefix, tokens, mask, prefix_length).hidden
  return _topk_at(weights, cfg, hidden, positions, k, vocab_chunk)


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


# The shared-prefix path runs for a group of >= 2 rows whose prompts share >= this many tokens. It saves
# (rows - 1) x shared tokens of a whole decoder pass and costs a second pass launch, the prefix's bucket
# padding (<= 25%) and the suffixes' attention over the prefix's slots: below ~64 shared tokens (one or two
# question-length rows) the saving is within that overhead and not worth another compiled shape. A
# document's chat header alone (the evidence teacher: each row has its own evidence) stays under it.
MIN_SHARED_PREFIX = 64

PATH_RUNS = collections.Counter()  # passes run by `topk_on_answers`, by path ("shared_prefix", "packed")


def prefix_groups(prompts: list[list[int]], min_shared: int) -> list[tuple[list[int], int]]:
  """Rows grouped by a common prompt prefix: [(row indices, shared tokens)], in order of first row. A row
  joins the first group whose first prompt shares >= `min_shared` tokens with it; a group's shared length is
  its rows' common prefix, capped so that every prompt keeps its last token out of it (that token's
  position predicts the first answer token: it must be a suffix column)."""
  groups = []  # [first prompt, rows, shared]
  for i, p in enumerate(prompts):
    for g in groups:
      shared = min(generate_lib.common_prefix(g[0], p), len(p) - 1)
      if shared >= min_shared:
        g[1].append(i)
        g[2] = min(g[2], shared)
        break
    else:
      groups.append([p, [i], len(p) - 1])
  return [(rows, shared) for _, rows, shared in groups]


def pack_suffixes(prompts: list[list[int]], answers: list[list[int]], shared: int, pad_id: int = 0,
                  answer_bucket: int = ANSWER_BUCKET) -> dict:
  """The rows prompt + answer after their first `shared` tokens (which all prompts share, at most each
  prompt's length - 1), left-padded to a `shapes.length_bucket` (floor `generate.SUFFIX_BUCKET`), with the
  suffix columns whose hidden states predict each answer token. A row's last answer token is left out: no
  position reads it. Returns numpy arrays: tokens, mask [B, S]; answer_pos, answer_mask [B, A]."""
  suffixes = [list(p[shared:]) + list(a[:-1]) for p, a in zip(prompts, answers)]
  length = shapes.length_bucket(max(map(len, suffixes)), generate_lib.SUFFIX_BUCKET)
  tokens, mask = generate_lib.left_pad(suffixes, length, pad_id)
  width = shapes.multiple(max(map(len, answers)), answer_bucket)
  answer_pos, answer_mask = np.zeros((len(prompts), width), np.int32), np.zeros((len(prompts), width), bool)
  for i, (p, a, s) in enumerate(zip(prompts, answers, suffixes)):
    first = length - len(s) + len(p) - shared - 1  # the prompt's last token, in suffix columns
    answer_pos[i, :len(a)] = np.arange(first, first + len(a))
    answer_mask[i, :len(a)] = True
  return {"tokens": tokens, "mask": mask, "answer_pos": answer_pos, "answer_mask": answer_mask}


def _split(logp, ids, answers):
  logp, ids = np.asarray(logp), np.asarray(ids)
  return [(ids[i, :len(a)].astype(np.int32), logp[i, :len(a)].astype(np.float32)) for i, a in enumerate(answers)]


def _topk_shared_prefix(model, prompts, answers, shared: int, k: int, answer_bucket: int, vocab_chunk: int):
  pad_id = model.pad_id
  prefix_tokens, prefix_mask = generate_lib.right_pad(prompts[0][:shared], shapes.length_bucket(shared), pad_id)
  packed = pack_suffixes(prompts, answers, shared, pad_id, answer_bucket)
  logp, ids = _topk_logprobs_after_prefix(
      model.weights, model.config, jnp.asarray(prefix_tokens), jnp.asarray(prefix_mask),
      jnp.asarray(packed["tokens"]), jnp.asarray(packed["mask"]), jnp.asarray(packed["answer_pos"]),
      np.int32(shared), k=k, vocab_chunk=int(vocab_chunk))
  PATH_RUNS["shared_prefix"] += 1
  return _split(logp, ids, answers)


def _topk_packed(model, prompts, answers, k: int, bucket: int, answer_bucket: int, vocab_chunk: int):
  packed = pack_answers(prompts, answers, bucket, answer_bucket)
  logp, ids = _topk_logprobs(model.weights, model.config, jnp.asarray(packed["s_tokens"]),
                             jnp.asarray(packed["s_mask"]), jnp.asarray(packed["answer_pos"]), k=k,
                             vocab_chunk=int(vocab_chunk))
  PATH_RUNS["packed"] += 1
  return _split(logp, ids, answers)


def topk_on_answers(model, prompts: list[list[int]], answers: list[list[int]], k: int = TOP_K, bucket: int = 64,
                    answer_bucket: int = 8, vocab_chunk: int = 0,
                    min_shared_prefix: int | None = MIN_SHARED_PREFIX):
  """Teacher top-K (ids [A, K], log-probs [A, K]) at the positions that predict each answer token; vocab_chunk > 0
  ranks the vocabulary in chunks of that many ids (no [B, A, V] logits; same results).

  Rows are grouped by shared prompt prefix (`prefix_groups`): a group of >= 2 rows sharing >= min_shared_prefix
  tokens runs its prefix once and each row's suffix against the prefix's KV cache
  (`_topk_logprobs_after_prefix`); the other rows run whole, packed in one batch (`pack_answers`). Both give
  the same results to float rounding (the same ids but for exact ties), so cached entries are valid either
  way. min_shared_prefix None: every row packed."""
  results = [None] * len(prompts)
  rest = list(range(len(prompts)))
  if min_shared_prefix is not None and len(prompts) > 1:
    rest = []
    for rows, shared in prefix_groups(prompts, max(int(min_shared_prefix), 1)):
      if len(rows) < 2 or shared < min_shared_prefix:
        rest += rows
        continue
      found = _topk_shared_prefix(model, [prompts[i] for i in rows], [answers[i] for i in rows], shared, k,
                                  answer_bucket, vocab_chunk)
      for i, r in zip(rows, found):
        results[i] = r
  if rest:
    rest = sorted(rest)
    found = _topk_packed(model, [prompts[i] for i in rest], [answers[i] for i in rest], k, bucket, answer_bucket,
                         vocab_chunk)
    for i, r in zip(rest, found):
      results[i] = r
  return results


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
