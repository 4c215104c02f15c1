"""Routing pre-training on cached frozen features: the cache returns what it stored, only the routing
parameters move, and routing on the training documents improves."""

import numpy as np
from flax import nnx

from doc2atom_jax.atoms import compiler as compiler_lib
from doc2atom_jax.atoms import pipeline
from doc2atom_jax.data import synthetic
from doc2atom_jax.models import base
from doc2atom_jax.train import data as data_lib
from doc2atom_jax.train import route_pretrain as rp


def _system():
  model = base.tiny_random("llama")
  cfg = compiler_lib.config_for(model.config, code_dim=32, width=32, key_dim=16, num_blocks=1, num_heads=2)
  return pipeline.AtomSystem.create(model, cfg, pipeline.MethodConfig(k=2))


def _documents(system, count):
  return [data_lib.to_train_document(synthetic.document("train", i, facts_per_document=(3, 6),
                                                        questions_per_document=6), system.model.tokenizer)
          for i in range(count)]


def test_features_match_what_the_router_and_keys_read(tmp_path):
  system = _system()
  document = _documents(system, 1)[0]
  cache = rp.FeatureCache(tmp_path, system)
  features = cache.get_or_compute(system, document)
  again = rp.FeatureCache(tmp_path, system).get_or_compute(system, document)  # read back from disk
  for name in rp.Features.__dataclass_fields__:
    np.testing.assert_array_equal(getattr(features, name), getattr(again, name))
  assert len(list(tmp_path.rglob("*.npz"))) == 1
  # The router's scores from the cached features equal those of the real path (AtomSystem.scores).
  bank = __import__("doc2atom_jax.eval.quick", fromlist=["quick"]).in_memory_bank(
      [system.compile_document(document.doc.text, "d", document.doc)], code_dtype="float32")
  real = np.asarray(system.scores(bank, [q.question for q in document.questions]))
  n = len(document.doc.atoms)
  batch = rp.make_batch([features], atoms=n, questions=len(document.questions))
  cached = np.asarray(rp.route_scores(system.compiler, system.router, batch))
  np.testing.assert_allclose(cached[:, :n], real[:, :n], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(cached[:, -1], real[:, -1], rtol=1e-4, atol=1e-4)
  # Labels: each labelled question's evidence atoms; out-of-scope questions none.
  for q, row, oos in zip(document.questions, features.evidence, features.out_of_scope):
    assert sorted(np.flatnonzero(row).tolist()) == sorted(q.evidence or ()) and oos == q.out_of_scope


def test_pretraining_moves_only_routing_parameters_and_learns():
  system = _system()
  features = rp.collect(system, _documents(system, 8))
  before = nnx.state((system.compiler, system.router))
  before = {"/".join(map(str, p)): np.asarray(v) for p, v in nnx.to_flat_state(before)}
  start = rp.evaluate(system, features)
  history = rp.pretrain(system, features, steps=150, documents_per_step=4, log_every=50)
  end = rp.evaluate(system, features)
  after = {"/".join(map(str, p)): np.asarray(v) for p, v in nnx.to_flat_state(nnx.state((system.compiler,
                                                                                          system.router)))}
  moved = {name for name in before if not np.array_equal(before[name], after[name])}
  routing = {f"{m}/{name}" for m, names in rp.ROUTING_PARAMS.items() for name in names}
  assert moved and moved <= {name for name in moved if any(name.startswith(r) for r in routing)}, moved
  assert [h["step"] for h in history] == [50, 100, 150]
  assert end["route"] < start["route"] - 0.5 and end["p_at_1_document"] > start["p_at_1_document"] + 0.3, (start, end)
