"""Routing pre-training on cached frozen features (DESIGN §2.4).

What the router and the atom keys read are constants of the frozen model: the pooled key-layer states of a
question's own tokens and of each atom's span (`compiler.pooled`). Computed once per document and cached on
disk (as the teacher is), they turn the routing objective into a small-MLP problem: thousands of steps over many
documents a step, each question scored against its document's other atoms (hard negatives: same entities, same
types) and every other document's atoms, on worlds larger than the end-to-end run can afford (it sees one
document of 4-8 facts a step, and its router was noise at 64 facts). Only the key and query maps, the keys' type
embedding, the null key and the temperature train here (`ROUTING_PARAMS`); the end-to-end run starts from them.
"""

import dataclasses
import hashlib
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx

from doc2atom_jax import fileio, paths, shapes
from doc2atom_jax.atoms import atomize, encode
from doc2atom_jax.atoms import compiler as compiler_lib
from doc2atom_jax.train import losses

# (module index in (compiler, router), attribute names): the parameters routing pre-training moves.
ROUTING_PARAMS = {0: ("key_w1", "key_w2", "key_type", "null_key", "key_center", "key_skip"),
                  1: ("w1", "w2", "log_inv_temperature", "q_center", "q_skip")}
FORMAT = 1  # of the cached features; part of the cache key


@dataclasses.dataclass(frozen=True)
class Features:
  """One document's routing inputs: pooled atom spans and questions, and the labels."""
  atoms: np.ndarray  # [N, d] float32
  types: np.ndarray  # [N] int32 (atomize.ATOM_TYPES)
  questions: np.ndarray  # [Q, d] float32
  evidence: np.ndarray  # [Q, N] bool
  out_of_scope: np.ndarray  # [Q] bool


def document_features(system, document) -> Features:
  """A `records.TrainDocument`'s features: one frozen pass over the document and one over its questions, both
  read at the key layer only, standardized and pooled as the compiler's keys and the router's queries read them."""
  doc = document.doc
  layer = system.cfg.layer_for_keys
  states = encode.document_states(system.model, doc.token_ids, system.method.max_chunk_tokens or None, (layer,))
  states = system.compiler.standardize(states, (layer,))[0]  # [T, d]
  idx, mask = encode.span_indices(doc.atoms)
  atoms = np.asarray(compiler_lib.pooled(states[jnp.asarray(idx)], jnp.asarray(mask)))
  q_states, own = system.question_states([q.question for q in document.questions])
  questions = np.asarray(compiler_lib.pooled(q_states, own))
  evidence = np.zeros((len(document.questions), len(doc.atoms)), bool)
  for i, q in enumerate(document.questions):
    evidence[i, list(q.evidence or ())] = True
  return Features(atoms=atoms, types=np.asarray([atomize.ATOM_TYPES.index(a.type) for a in doc.atoms], np.int32),
                  questions=questions, evidence=evidence,
                  out_of_scope=np.asarray([q.out_of_scope for q in document.questions], bool))


class FeatureCache:
  """Features on disk per (model, key layer, state statistics, document and questions); atomic writes."""

  def __init__(self, root, system):
    compiler = system.compiler
    statistics = hashlib.sha256(np.asarray(compiler.state_mean[...]).tobytes()
                                + np.asarray(compiler.state_scale[...]).tobytes()).hexdigest()
    identity = [FORMAT, system.model.name, system.model.config.dtype, system.cfg.layer_for_keys, statistics,
                system.method.max_chunk_tokens]
    self.root = pathlib.Path(root) / hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]

  @classmethod
  def for_system(cls, system) -> "FeatureCache":
    return cls(paths.cache_root() / "route_features", system)

  def _path(self, document) -> pathlib.Path:
    doc = document.doc
    key = json.dumps([doc.text, [(a.token_start, a.token_end, a.type) for a in doc.atoms],
                      [(q.question, q.evidence, q.out_of_scope) for q in document.questions]])
    digest = hashlib.sha256(key.encode()).hexdigest()
    return self.root / digest[:2] / f"{digest}.npz"

  def get_or_compute(self, system, document) -> Features:
    path = self._path(document)
    if path.exists():
      try:
        with np.load(path) as f:
          return Features(**{k: f[k] for k in Features.__dataclass_fields__})
      except (OSError, ValueError, KeyError):
        pass  # unreadable entry: recompute it
    features = document_features(system, document)
    with fileio.atomic_open(path, "wb") as f:
      np.savez(f, **dataclasses.asdict(features))
    return features


def collect(system, documents, cache: FeatureCache | None = None, progress: str | None = None) -> list[Features]:
  """Features of every document (cached where a cache is given)."""
  out = []
  for document in tqdm.tqdm(documents, desc=progress, unit="doc", dynamic_ncols=True, disable=progress is None):
    out.append(cache.get_or_compute(system, document) if cache else document_features(system, document))
  return out


# ---------------------------------------------------------------------------------------------------------
# Batches and the step.
# ---------------------------------------------------------------------------------------------------------
def make_batch(features: list[Features], atoms: int, questions: int) -> dict:
  """Several documents' features as one padded batch: every atom of every document in one list [M], every
  question [B] with its positives (its own evidence atoms, or the null column if out of scope)."""
  d = features[0].atoms.shape[1]
  batch = {"atoms": np.zeros((atoms, d), np.float32), "types": np.zeros(atoms, np.int32),
           "atom_mask": np.zeros(atoms, bool), "questions": np.zeros((questions, d), np.float32),
           "positives": np.zeros((questions, atoms + 1), bool), "own": np.zeros((questions, atoms), bool),
           "q_mask": np.zeros(questions, bool)}
  a = q = 0
  for f in features:
    n, m = len(f.atoms), len(f.questions)
    if a + n > atoms or q + m > questions:
      raise ValueError(f"batch too small for its documents ({atoms} atoms, {questions} questions)")
    batch["atoms"][a:a + n], batch["types"][a:a + n], batch["atom_mask"][a:a + n] = f.atoms, f.types, True
    batch["questions"][q:q + m], batch["q_mask"][q:q + m] = f.questions, True
    batch["positives"][q:q + m, a:a + n] = f.evidence
    batch["positives"][q:q + m, -1] = f.out_of_scope
    batch["own"][q:q + m, a:a + n] = True
    a, q = a + n, q + m
  return batch


def route_scores(compiler, router, batch):
  """Scores [B, M + 1] of every question against every atom of the batch and the null atom (last column)."""
  keys, _ = compiler.keys_from_pooled(jnp.asarray(batch["atoms"]), jnp.asarray(batch["types"]))
  queries = router.query_from_pooled(jnp.asarray(batch["questions"]))
  return router.scores(queries, keys, jnp.asarray(batch["atom_mask"]), compiler.null()[1])


def _loss(trainable, rest, graphdef, batch):
  compiler, router = nnx.merge(graphdef, trainable, rest)
  scores = route_scores(compiler, router, batch)
  valid = batch["q_mask"] & jnp.any(batch["positives"], axis=-1)
  loss = losses.info_nce(scores, batch["positives"], valid)
  # Precision@1 of answerable questions within their own document's atoms (what answering one document needs)
  # and over every atom of the batch (a bank of several documents); the null column is left out of both.
  answerable = valid & ~batch["positives"][:, -1]
  hit = lambda s: jnp.take_along_axis(batch["positives"], jnp.argmax(s, axis=-1)[:, None], axis=-1)[:, 0]
  share = lambda x: jnp.sum(x & answerable) / jnp.maximum(jnp.sum(answerable), 1)
  atoms_only = scores[:, :-1]
  return loss, {"route": loss, "p_at_1_document": share(hit(jnp.where(batch["own"], atoms_only, -jnp.inf))),
                "p_at_1_batch": share(hit(atoms_only))}


def _is_routing(path, _value) -> bool:
  return len(path) >= 2 and path[0] in ROUTING_PARAMS and path[1] in ROUTING_PARAMS[path[0]]


def pretrain(system, features: list[Features], *, steps: int, documents_per_step: int = 16,
             learning_rate: float = 3e-3, warmup_steps: int = 50, seed: int = 0, log_every: int = 100,
             center: bool = True, progress: str | None = None) -> list[dict]:
  """Trains the routing parameters of `system` in place on the documents' features; returns the logged metrics
  (every `log_every` steps: the mean of those steps). center: first set the linear paths' centres to the mean
  atom and question features (a fresh router then scores their centred cosine). Documents are drawn in a seeded order, reshuffled each
  pass; every step has the same padded shapes, so the step compiles once."""
  if not features:
    raise ValueError("routing pre-training needs at least one document")
  per_step = min(documents_per_step, len(features))
  atoms = shapes.multiple(per_step * max(len(f.atoms) for f in features), 64)
  questions = shapes.multiple(per_step * max(len(f.questions) for f in features), 64)
  if center and system.cfg.route_skip:  # the linear paths start from the features' own means (centred cosine)
    system.compiler.key_center[...] = jnp.asarray(np.mean(np.concatenate([f.atoms for f in features]), 0))
    system.router.q_center[...] = jnp.asarray(np.mean(np.concatenate([f.questions for f in features]), 0))
  graphdef, trainable, rest = nnx.split((system.compiler, system.router), _is_routing, ...)
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(warmup_steps, max(steps - 1, 1)),
                                                max(steps, warmup_steps + 1), end_value=learning_rate * 0.1)
  optimizer = optax.adamw(schedule, weight_decay=0.01)
  opt_state = optimizer.init(trainable)

  @jax.jit
  def step(trainable, opt_state, batch):
    (_, metrics), grads = jax.value_and_grad(_loss, has_aux=True)(trainable, rest, graphdef, batch)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, metrics

  rng = np.random.default_rng(seed)
  order, history, window = [], [], []
  for i in tqdm.trange(steps, desc=progress, disable=progress is None, dynamic_ncols=True):
    if len(order) < per_step:
      order += rng.permutation(len(features)).tolist()
    chosen, order = order[:per_step], order[per_step:]
    batch = make_batch([features[j] for j in chosen], atoms, questions)
    trainable, opt_state, metrics = step(trainable, opt_state, batch)
    window.append(metrics)
    if (i + 1) % log_every == 0 or i + 1 == steps:
      history.append({"step": i + 1, **{k: float(np.mean([float(m[k]) for m in window])) for k in window[0]}})
      window = []
  nnx.update((system.compiler, system.router), trainable)
  return history


def evaluate(system, features: list[Features], documents_per_batch: int = 1) -> dict:
  """Routing metrics of `system` on documents' features, each question against its own document's atoms
  (documents_per_batch=1) or against several documents' atoms at once: mean loss and precision@1."""
  compiler, router = system.compiler, system.router
  totals = {"route": [], "p_at_1_document": [], "p_at_1_batch": []}
  for start in range(0, len(features), documents_per_batch):
    group = features[start:start + documents_per_batch]
    atoms = shapes.multiple(sum(len(f.atoms) for f in group), 64)
    questions = shapes.multiple(sum(len(f.questions) for f in group), 64)
    batch = make_batch(group, atoms, questions)
    graphdef, trainable, rest = nnx.split((compiler, router), _is_routing, ...)
    _, metrics = _loss(trainable, rest, graphdef, batch)
    for k, v in metrics.items():
      totals[k].append(float(v))
  return {k: float(np.mean(v)) for k, v in totals.items()}
