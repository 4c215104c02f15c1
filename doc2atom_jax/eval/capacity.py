"""The capacity oracle (DESIGN §8): free micro-LoRAs fitted by gradient descent, no compiler involved.

Per atom, a free rank-r LoRA on the compiler's targets is trained with a few dozen Adam steps so that the
student (the question alone, the atom's adapter composed at weight 1 by oracle routing) matches the teacher
on the answers of the questions whose evidence it holds; the same at one rank-8 adapter per document gives
the `d2l` form. The fitted adapters are scored on the questions they were fitted on: this is an upper bound
on what an adapter of that size can hold, not a generalization result. It separates "an adapter this size
cannot hold the fact" (the oracle's KL stays high) from "the compiler has not learned to write it" (the
oracle's KL is low and the compiled atoms' is not).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from doc2atom_jax.models import adapter as adapter_lib
from doc2atom_jax.train import losses
from doc2atom_jax.train import step as step_lib


@dataclasses.dataclass(frozen=True)
class OracleConfig:
  rank: int = 1  # per atom (8 for the per-document form)
  steps: int = 30
  learning_rate: float = 5e-3
  targets: tuple[str, ...] = ("down",)
  scale: float = 1.0
  seed: int = 0


def _init(cfg, model_cfg, count: int, key) -> dict:
  """count LoRAs per target: A ~ N(0, 1/d_in), B = 0 (a fitted adapter starts as a no-op)."""
  params = {}
  for t, k in zip(cfg.targets, jax.random.split(key, len(cfg.targets))):
    d_in, d_out = model_cfg.target_dims(t)
    params[t] = (jax.random.normal(k, (count, model_cfg.num_layers, cfg.rank, d_in)) * d_in ** -0.5,
                 jnp.zeros((count, model_cfg.num_layers, cfg.rank, d_out)))
  return params


def _adapter(params, members, weights, scale) -> adapter_lib.Adapter:
  """Per question, its member LoRAs (rows of `params`) concatenated along rank, A scaled by the weight.

  members [B, M] int, weights [B, M] (0 = unused slot) -> rank M·r per question.
  """
  factors = {}
  for t, (a, b) in params.items():
    qa = a[members] * weights[:, :, None, None, None]  # [B, M, L, r, i]
    qb = b[members]
    merge = lambda x: jnp.moveaxis(x, 1, 2).reshape(x.shape[0], x.shape[2], -1, x.shape[-1])
    factors[t] = adapter_lib.LoRA(merge(qa), merge(qb))
  return adapter_lib.Adapter(factors, scale)


def _kl(params, weights, model_cfg, batch, members, member_weights, scale):
  """Per-question top-K KL to the teacher on the answer tokens, the fitted LoRAs composed."""
  logits = step_lib.answer_logits(weights, model_cfg, batch, _adapter(params, members, member_weights, scale))
  return losses.topk_kl(logits, batch["teacher_ids"], batch["teacher_logp"], batch["answer_mask"])


@functools.partial(jax.jit, static_argnames=("model_cfg", "learning_rate", "scale"))
def _update(params, opt_state, weights, batch, members, member_weights, *, model_cfg, learning_rate, scale):
  """One Adam step on the mean KL of the questions with members (frozen weights an argument, never baked in)."""
  used = jnp.any(member_weights > 0, axis=1).astype(jnp.float32)

  def loss(p):
    per_question = _kl(p, weights, model_cfg, batch, members, member_weights, scale)
    return jnp.sum(per_question * used) / jnp.maximum(jnp.sum(used), 1.0)

  value, grads = jax.value_and_grad(loss)(params)
  updates, opt_state = optax.adam(learning_rate).update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, value


_score = jax.jit(_kl, static_argnames=("model_cfg", "scale"))


def fit_adapter(model, batch: dict, members, member_weights, count: int, cfg: OracleConfig = OracleConfig()):
  """Fits `count` free LoRAs; question q uses the rows members[q] at member_weights[q] (0 = unused).

  `batch` holds the packed student rows (s_tokens, s_mask, answer_pos, answer_mask) and the teacher's top-K
  (teacher_ids, teacher_logp). Returns (the fitted per-question adapter, KL before fitting [B], after [B]);
  questions with all-zero member weights (nothing to fit: out of scope, unlabelled) keep the base model's KL.
  """
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  members, member_weights = jnp.asarray(members, jnp.int32), jnp.asarray(member_weights, jnp.float32)
  params = _init(cfg, model.config, count, jax.random.key(cfg.seed))
  score = lambda p: np.asarray(_score(p, model.weights, model.config, batch, members, member_weights, cfg.scale))
  before = score(params)
  opt_state = optax.adam(cfg.learning_rate).init(params)
  for _ in range(cfg.steps):
    params, opt_state, _ = _update(params, opt_state, model.weights, batch, members, member_weights,
                                   model_cfg=model.config, learning_rate=cfg.learning_rate, scale=cfg.scale)
  return _adapter(params, members, member_weights, cfg.scale), before, score(params)


def fit(model, batch: dict, members, member_weights, count: int, cfg: OracleConfig = OracleConfig()):
  """(KL before fitting [B], after [B]) of `fit_adapter`."""
  _, before, after = fit_adapter(model, batch, members, member_weights, count, cfg)
  return before, after


def atom_members(evidence: list[tuple[int, ...] | None], max_members: int = 2):
  """Oracle routing as member rows: each question's evidence atoms at weight 1 (none: all weights 0)."""
  members = np.zeros((len(evidence), max_members), np.int32)
  weights = np.zeros((len(evidence), max_members), np.float32)
  for q, ev in enumerate(evidence):
    for slot, atom in enumerate((ev or ())[:max_members]):
      members[q, slot], weights[q, slot] = atom, 1.0
  return members, weights


def document_members(evidence: list[tuple[int, ...] | None]):
  """The per-document form: every labelled question uses the document's single adapter (row 0)."""
  weights = np.asarray([[1.0 if ev else 0.0] for ev in evidence], np.float32)
  return np.zeros((len(evidence), 1), np.int32), weights
