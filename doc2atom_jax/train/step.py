"""The training objective and step: documents with their questions -> multi-objective distillation loss.

A batch (a pytree of arrays, see `BATCH_FIELDS`) holds D documents and B questions about them. Per step:
each document gets one frozen pass and one compiler call for all its atoms; each question one frozen
question-only pass (router features), one student pass with the routed composition, and — when `atom` or
`null` weigh in — one student pass with oracle routing (evidence atoms, or the null atom for out-of-scope
questions). Only the compiler and router are differentiated; the base weights are a separate argument
of the step, never donated, never in the optimizer.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from doc2atom_jax.atoms import compiler as compiler_lib
from doc2atom_jax.atoms import compose, encode, router as router_lib
from doc2atom_jax.errors import UserError
from doc2atom_jax.models import decoder as decoder_lib
from doc2atom_jax.train import losses, vocab

BATCH_FIELDS = {
    # documents
    "doc_tokens": "[D, T] int32", "doc_mask": "[D, T] bool",
    "atom_idx": "[D, N, S] int32 token positions", "atom_span_mask": "[D, N, S] bool",
    "atom_types": "[D, N] int32", "atom_mask": "[D, N] bool (real atom, not padding)",
    "doc_spans": "[D, N, S, L, d] optional: the atoms' frozen span states from the document-state cache",
    # questions
    "doc_of_q": "[B] int32", "q_tokens": "[B, Tq] question-only prompt", "q_mask": "[B, Tq] bool",
    "q_own": "[B, Tq] bool (the question's own tokens: what the router pools)",
    "s_tokens": "[B, Ts] student prompt + answer", "s_mask": "[B, Ts] bool",
    "answer_pos": "[B, A] int32 positions of s_tokens whose logits predict the answer tokens",
    "answer_mask": "[B, A] bool (real answer token)", "targets": "[B, A] the answer tokens",
    "teacher_ids": "[B, A, K]", "teacher_logp": "[B, A, K] (document teacher)",
    "ev_teacher_ids": "[B, A, K]", "ev_teacher_logp": "[B, A, K] (evidence teacher)",
    "evidence": "[B, N] bool", "labelled": "[B] bool", "out_of_scope": "[B] bool", "q_valid": "[B] bool",
}


@dataclasses.dataclass(frozen=True)
class LossConfig:
  kd: float = 1.0
  ce: float = 1.0  # gold CE, a first-class term (v1: 0.1 beside two weight-1 distillation terms)
  route: float = 1.0
  atom: float = 1.0
  null: float = 1.0
  type: float = 0.1
  l1: float = 0.1
  orth: float = 0.01
  vocab_chunk: int = 0  # >0: student log-probs by vocabulary chunks of this size (train/vocab.py), no [B, A, V]
  k: int = 4
  normalization: str = "softmax"
  routed: bool = True  # False: d2l / d2l_atom, every atom of the document at weight 1, no router
  # The unrouted methods' adapter: "gather" (one copy per question), "grouped" (one per document, applied with
  # jax.lax.ragged_dot) or "auto" (grouped off CPU). The routed method always gathers: its questions' atoms differ.
  compose_form: str = "gather"
  # Where the teacher is distilled: "right" = only answer tokens whose gold is the teacher's top-1 (a teacher
  # that is wrong pulls the student off the gold, DESIGN §14), "all" = every answer token (v1).
  kd_tokens: str = "right"
  # The oracle-routed student's target (L_atom): "gold" (CE) or "teacher" (KL to the evidence teacher, v1).
  atom_target: str = "gold"

  def __post_init__(self):
    if self.compose_form not in COMPOSE_FORMS:
      raise UserError(f"unknown compose_form {self.compose_form!r}; valid: {', '.join(COMPOSE_FORMS)}")
    if self.kd_tokens not in ("right", "all"):
      raise UserError(f"unknown loss.kd_tokens {self.kd_tokens!r}; valid: right, all")
    if self.atom_target not in ("gold", "teacher"):
      raise UserError(f"unknown loss.atom_target {self.atom_target!r}; valid: gold, teacher")

  @property
  def grouped(self) -> bool:
    """Whether the student pass composes one adapter per document (unrouted methods only). auto: on
    accelerators, where `ragged_dot` is a grouped kernel; on CPU it lowers to a dense product per group
    (measured 1.01x the gather form at 1 document a step, 1.47x at 8), so the gather form is kept there."""
    if self.routed or self.compose_form == "gather":
      return False
    return self.compose_form == "grouped" or jax.default_backend() != "cpu"


COMPOSE_FORMS = ("gather", "grouped", "auto")


def loss_config(config) -> LossConfig:
  """The loss of a run config: its weights, and the method's routing (d2l / d2l_atom have no router, so no
  routing, atom-fidelity or null terms)."""
  routed = config.atoms.method == "doc2atom"
  weights = config.loss.to_dict()
  if not routed:
    weights.update(route=0.0, atom=0.0, null=0.0)
  return LossConfig(**weights, k=config.atoms.k, normalization=config.atoms.normalization, routed=routed,
                    compose_form=config.atoms.get("compose_form", "auto"))


def answer_logits(weights, cfg, batch, adapter, vocab_chunk: int = 0):
  """Student logits [B, A, V] at the answer positions only: the vocabulary projection of every other position
  (most of a prompt) would cost ~20% of a small model's step for nothing. vocab_chunk > 0: a
  `vocab.ChunkedLogits` instead (the losses read it like logits; no [B, A, V] array, forward or backward)."""
  hidden = decoder_lib.forward(weights, cfg, batch["s_tokens"], attention_mask=batch["s_mask"], adapter=adapter,
                               compute_logits=False).hidden
  at_answers = jnp.take_along_axis(hidden, batch["answer_pos"][..., None], axis=1)
  if vocab_chunk > 0:
    return vocab.chunked(weights, cfg, at_answers, vocab_chunk)
  return decoder_lib.logits_from_hidden(weights, cfg, at_answers)


def loss_fn(trainable, graphdef, base_weights, batch, *, model_cfg, loss_cfg: LossConfig):
  """(total loss, metrics dict) for one batch; `trainable` is the nnx state of (compiler, router)."""
  compiler, router = nnx.merge(graphdef, trainable)
  ccfg = compiler.cfg
  D, N, S = batch["atom_idx"].shape
  B = batch["doc_of_q"].shape[0]
  atom_mask, doc_of_q = batch["atom_mask"], batch["doc_of_q"]

  # Documents: one frozen pass (or its cached span states), one compiler call for every atom of the batch.
  if "doc_spans" in batch:
    spans = jnp.moveaxis(batch["doc_spans"], 3, 0)  # [L, D, N, S, d]
  else:
    doc_states = encode.layer_states(base_weights, model_cfg, batch["doc_tokens"], batch["doc_mask"],
                                     tuple(range(model_cfg.num_layers)))  # [L, D, T, d]
    spans = jax.vmap(encode.gather_spans, in_axes=(1, 0, 0), out_axes=1)(
        doc_states, batch["atom_idx"], batch["atom_span_mask"])  # [L, D, N, S, d]
  span_mask = batch["atom_span_mask"] | ~atom_mask[..., None] & (jnp.arange(S) == 0)  # padding reads 1 token
  codes, keys, type_logits = compiler(spans.reshape(model_cfg.num_layers, D * N, S, -1),
                                      span_mask.reshape(D * N, S), batch["atom_types"].reshape(D * N))
  codes = codes.reshape(D, N, *codes.shape[1:])
  keys = keys.reshape(D, N, -1)
  null_codes, null_key = compiler.null()
  head = compiler.head()
  default = compiler.default_codes[...] if ccfg.default_rank else None

  # Questions: router scores over the own document's atoms + null; in-batch atoms of other docs as negatives.
  q_states = encode.layer_states(base_weights, model_cfg, batch["q_tokens"], batch["q_mask"],
                                 (ccfg.layer_for_keys,))
  q_states = compiler.standardize(q_states, (ccfg.layer_for_keys,))[0]
  queries = router.query(q_states, batch["q_own"])  # pooled over the question's own tokens, not the template
  own_scores = router.scores(queries, keys[doc_of_q], atom_mask[doc_of_q], null_key)  # [B, N + 1]
  all_scores = router.scores(queries, keys.reshape(D * N, -1), atom_mask.reshape(D * N), null_key)  # [B, D*N+1]
  own_cols = (jnp.arange(D)[None, :, None] == doc_of_q[:, None, None])  # [B, D, 1]
  positives = jnp.concatenate([(own_cols & batch["evidence"][:, None, :]).reshape(B, D * N),
                               batch["out_of_scope"][:, None]], axis=-1)
  route_valid = batch["q_valid"] & (batch["labelled"] | batch["out_of_scope"])

  # Routed composition over every atom of the own document (+ null): straight-through top-k weights.
  all_own = jnp.concatenate([codes[doc_of_q], jnp.broadcast_to(null_codes, (B, 1, *null_codes.shape))], axis=1)
  if loss_cfg.routed:
    weights = router_lib.relaxed_weights(own_scores, loss_cfg.k, loss_cfg.normalization)
  else:
    weights = jnp.concatenate([atom_mask[doc_of_q], jnp.zeros((B, 1), bool)], axis=1).astype(jnp.float32)
  if loss_cfg.grouped:  # one adapter per document, shared by its questions (no copy per question)
    adapter = compose.compose(head, codes, atom_mask.astype(jnp.float32), default, ccfg.alpha, ccfg.targets,
                              groups=doc_of_q)
  else:
    adapter = compose.compose(head, all_own, weights, default, ccfg.alpha, ccfg.targets)
  logits = answer_logits(base_weights, model_cfg, batch, adapter, loss_cfg.vocab_chunk)
  ans = batch["answer_mask"]
  teacher_right = ans & (batch["teacher_ids"][..., 0] == batch["targets"])  # the gold is the teacher's top-1
  kd_mask = teacher_right if loss_cfg.kd_tokens == "right" else ans
  kd_q = losses.topk_kl(logits, batch["teacher_ids"], batch["teacher_logp"], kd_mask)
  ce_q = losses.answer_ce(logits, batch["targets"], ans)
  per_doc = functools.partial(losses.per_document_mean, doc_of_question=doc_of_q, num_docs=D)
  in_scope = batch["q_valid"] & ~batch["out_of_scope"]
  metrics = {"kd": per_doc(kd_q, valid=in_scope & jnp.any(kd_mask, axis=-1)),
             "ce": per_doc(ce_q, valid=batch["q_valid"])}
  # How often the distilled teacher is right (answerable questions' answer tokens): top-1 and top-K gold rates.
  scored = ans & in_scope[:, None]
  in_top_k = jnp.any(batch["teacher_ids"] == batch["targets"][..., None], axis=-1)
  metrics["teacher_top1"] = jnp.sum(teacher_right & scored) / jnp.maximum(jnp.sum(scored), 1)
  metrics["teacher_topk"] = jnp.sum(in_top_k & scored) / jnp.maximum(jnp.sum(scored), 1)
  metrics["route"] = losses.info_nce(all_scores, positives, route_valid)

  # Oracle routing: the evidence atoms at uniform weight (atom fidelity: the gold, or the evidence teacher), or the
  # null atom alone for out-of-scope questions (it must make the model answer "unknown").
  if loss_cfg.atom or loss_cfg.null:
    ev = batch["evidence"] & atom_mask[doc_of_q]
    oracle = jnp.concatenate([ev, batch["out_of_scope"][:, None]], axis=1).astype(jnp.float32)
    oracle = oracle / jnp.maximum(oracle.sum(-1, keepdims=True), 1.0)
    oracle_logits = answer_logits(base_weights, model_cfg, batch, vocab_chunk=loss_cfg.vocab_chunk, adapter=
                                    compose.compose(head, all_own, oracle, default, ccfg.alpha, ccfg.targets))
    if loss_cfg.atom_target == "gold":
      atom_q = losses.answer_ce(oracle_logits, batch["targets"], ans)
    else:
      atom_q = losses.topk_kl(oracle_logits, batch["ev_teacher_ids"], batch["ev_teacher_logp"], ans)
    metrics["atom"] = per_doc(atom_q, valid=in_scope & batch["labelled"])
    metrics["null"] = per_doc(losses.answer_ce(oracle_logits, batch["targets"], ans),
                              valid=batch["q_valid"] & batch["out_of_scope"])
  else:
    metrics["atom"] = metrics["null"] = jnp.zeros(())

  factors = compose.materialize(head, codes)  # per target: [D, N, L, r, i], [D, N, L, r, o]
  metrics["type"] = losses.type_ce(type_logits.reshape(D, N, -1), batch["atom_types"], atom_mask)
  metrics["l1"] = losses.l1_factors(factors, atom_mask)
  metrics["orth"] = losses.orthogonality(factors[0][0], atom_mask)
  total = sum(getattr(loss_cfg, name) * metrics[name] for name in ("kd", "ce", "route", "atom", "null", "type",
                                                                     "l1", "orth"))
  metrics["loss"] = total
  top1 = jnp.argmax(own_scores, axis=-1)
  hit = jnp.take_along_axis(jnp.concatenate([batch["evidence"], batch["out_of_scope"][:, None]], 1),
                            top1[:, None], axis=-1)[:, 0]
  metrics["route_top1"] = jnp.sum(hit & route_valid) / jnp.maximum(jnp.sum(route_valid), 1)
  return total, metrics


SCHEDULES = ("cosine", "constant")


def make_optimizer(learning_rate: float = 1e-3, warmup_steps: int = 20, total_steps: int = 1000,
                   weight_decay: float = 0.01, clip_norm: float = 1.0, accumulate: int = 1, schedule: str = "cosine"):
  """AdamW with linear warmup, then cosine decay to 10% (or a constant rate), and global-norm clipping
  (optionally accumulated)."""
  if schedule not in SCHEDULES:
    raise UserError(f"unknown train.schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
  if schedule == "constant":
    schedule = optax.join_schedules([optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1)),
                                     optax.constant_schedule(learning_rate)], [max(warmup_steps, 1)])
  else:
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps,
                                                  max(total_steps, warmup_steps + 1), end_value=learning_rate * 0.1)
  opt = optax.chain(optax.clip_by_global_norm(clip_norm),
                    optax.adamw(schedule, weight_decay=weight_decay, mask=_decayed))
  return optax.MultiSteps(opt, accumulate) if accumulate > 1 else opt


def _decayed(params):
  """Weight decay on every parameter but the compiler's frozen state statistics (they get no gradient)."""
  frozen = lambda path: any(getattr(k, "key", getattr(k, "name", None)) in compiler_lib.STATISTICS for k in path)
  return jax.tree_util.tree_map_with_path(lambda path, _: not frozen(path), params)


def train_step(params, opt_state, base_weights, batch, *, graphdef, model_cfg, loss_cfg, optimizer):
  """One optimizer step on (compiler, router) params; a non-finite loss leaves params and state unchanged."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, metrics), grads = grad_fn(params, graphdef, base_weights, batch, model_cfg=model_cfg, loss_cfg=loss_cfg)
  updates, new_opt_state = optimizer.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  finite = jnp.isfinite(loss) & jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads), finite=finite)
  return keep(new_params, params), keep(new_opt_state, opt_state), metrics
