"""The loss terms of DESIGN §2.7 as pure functions of arrays (shapes in each docstring).

Token-level terms return one value per question (mean over its answer tokens) so the objective can be
averaged per question, then per document (`per_document_mean`): a document with 16 questions weighs as
much as one with 8.
"""

import jax
import jax.numpy as jnp

from doc2atom_jax.train import vocab


def _mean_over(x, mask, axis):
  mask = mask.astype(x.dtype)
  return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def _logprobs_at(student, ids):
  """Log-softmax over the vocabulary read at ids [..., K]: from full logits [..., V], or by vocabulary chunks."""
  if isinstance(student, vocab.ChunkedLogits):
    return student.logprobs_at(ids)
  return jnp.take_along_axis(jax.nn.log_softmax(student.astype(jnp.float32), axis=-1), ids, axis=-1)


def topk_kl(student_logits, teacher_ids, teacher_logprobs, mask):
  """KL(teacher ‖ student) on the teacher's top-K tokens, renormalized, per question [B].

  student_logits [B, T, V] (or a `vocab.ChunkedLogits` standing for them); teacher_ids/logprobs [B, T, K] at the
  same (answer) positions; mask [B, T]. The student's log-probs are normalized over the full vocabulary, then
  read at the teacher's K ids.
  """
  student_at_k = _logprobs_at(student_logits, teacher_ids)
  teacher_logp = jax.nn.log_softmax(teacher_logprobs, axis=-1)  # renormalize the top-K mass
  kl = jnp.sum(jnp.exp(teacher_logp) * (teacher_logp - student_at_k), axis=-1)
  return _mean_over(kl, mask, axis=-1)


def answer_ce(student_logits, targets, mask):
  """Cross-entropy of the gold answer tokens, per question [B]; targets [B, T] aligned with logits (full
  [B, T, V], or a `vocab.ChunkedLogits`)."""
  nll = -_logprobs_at(student_logits, targets[..., None])[..., 0]
  return _mean_over(nll, mask, axis=-1)


def greedy_match(student_logits, targets, mask):
  """Teacher-forced exact match per question [B] bool: every answer token is the argmax of its logits [B, A, V]
  (what greedy decoding would say, given the right prefix). Full logits only: an evaluation metric."""
  hit = (jnp.argmax(student_logits, axis=-1) == targets) | ~mask
  return jnp.all(hit, axis=-1) & jnp.any(mask, axis=-1)


def per_document_mean(per_question, doc_of_question, valid, num_docs: int):
  """Mean over each document's valid questions, then over documents that have any: a scalar."""
  valid = valid.astype(jnp.float32)
  sums = jax.ops.segment_sum(per_question * valid, doc_of_question, num_segments=num_docs)
  counts = jax.ops.segment_sum(valid, doc_of_question, num_segments=num_docs)
  has = counts > 0
  return jnp.sum(jnp.where(has, sums / jnp.maximum(counts, 1.0), 0.0)) / jnp.maximum(jnp.sum(has), 1.0)


def info_nce(scores, positives, valid):
  """-log of the softmax mass on the positive columns (several allowed: two-hop), mean over valid rows.

  scores [B, C] (-inf = out of scope); positives [B, C] bool; valid [B] (rows with a label).
  """
  logp = jax.nn.log_softmax(jnp.where(jnp.isfinite(scores), scores, -1e30), axis=-1)
  pos = jax.nn.logsumexp(jnp.where(positives, logp, -1e30), axis=-1)
  return _mean_over(-pos, valid & jnp.any(positives, axis=-1), axis=0)


def type_ce(type_logits, types, atom_mask):
  """Type logits [..., n_types] vs the typer's labels [...], mean over real atoms."""
  logp = jax.nn.log_softmax(type_logits, axis=-1)
  nll = -jnp.take_along_axis(logp, types[..., None], axis=-1)[..., 0]
  return _mean_over(nll.reshape(-1), atom_mask.reshape(-1), axis=0)


def l1_factors(factors, atom_mask):
  """Mean |A| + |B| of generated factors (Doc-to-LoRA's regularizer); factors: per target (A, B) with
  leading atom axes matching atom_mask [...]."""
  total = 0.0
  for a, b in factors:
    for x in (a, b):
      per_atom = jnp.mean(jnp.abs(x).reshape(*atom_mask.shape, -1), axis=-1)
      total = total + _mean_over(per_atom.reshape(-1), atom_mask.reshape(-1), axis=0)
  return total


def orthogonality(a, atom_mask):
  """Overlap between the atoms of one document: mean over pairs i != j (and layers) of the squared cosine
  between their A row spaces, ‖Â_i Â_jᵀ‖² with unit-norm rows. a [D, N, L, r, d_in]; atom_mask [D, N]."""
  # sqrt(|a|² + eps), not max(|a|, eps): the norm's gradient is 0/0 at a zero row (a padding atom), and
  # max() still multiplies that NaN by zero.
  unit = a / jnp.sqrt(jnp.sum(a * a, axis=-1, keepdims=True) + 1e-12)
  overlap = jnp.einsum("dnlrx,dmlsx->dnmlrs", unit, unit) ** 2
  per_pair = jnp.mean(overlap, axis=(3, 4, 5))  # [D, N, N]
  n = a.shape[1]
  pairs = atom_mask[:, :, None] & atom_mask[:, None, :] & ~jnp.eye(n, dtype=bool)[None]
  return _mean_over(per_pair.reshape(-1), pairs.reshape(-1), axis=0)
