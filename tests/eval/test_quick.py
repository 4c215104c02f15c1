"""The quick evaluator on a tiny model: every method scored on the same questions, sane numbers."""

import numpy as np

from doc2atom_jax.atoms import pipeline
from doc2atom_jax.atoms import compiler as compiler_lib
from doc2atom_jax.data import synthetic
from doc2atom_jax.eval import quick
from doc2atom_jax.models import base


def test_quick_evaluation_on_held_out_documents():
  model = base.tiny_random("llama")
  cfg = compiler_lib.config_for(model.config, code_dim=32, width=32, key_dim=16, num_blocks=1, num_heads=2)
  system = pipeline.AtomSystem.create(model, cfg, pipeline.MethodConfig(k=2))
  docs = [synthetic.document("validation", i, facts_per_document=(3, 4), questions_per_document=4)
          for i in range(2)]
  results = quick.evaluate(system, docs, max_new_tokens=4)
  print("\n" + quick.format_table(results))
  assert set(results) == set(quick.METHODS) | set(quick.CONTROLS) | {quick.ORACLE}
  assert results["in_context"]["kl"] == 0.0
  for method in quick.METHODS:
    assert np.isfinite(results[method]["nll"]) and results[method]["nll"] > 0
    assert 0.0 <= results[method]["f1"] <= 1.0
  assert results["no_context"]["kl"] > 0 and 0.0 <= results["doc2atom"]["route_top1"] <= 1.0
  # An untrained compiler is a no-op (B scalers start at 0) apart from the default adapter, also a no-op.
  np.testing.assert_allclose(results["doc2atom"]["nll"], results["no_context"]["nll"], rtol=1e-5)
  # So are its controls; all three are the no-context model here.
  for control in (*quick.CONTROLS, quick.ORACLE):
    np.testing.assert_allclose(results[control]["kl"], results["no_context"]["kl"], rtol=1e-5)


def test_learning_check_states_margins_and_verdicts():
  results = {"doc2atom": {"kl": 1.0, "tf_em": 0.5}, "default_only": {"kl": 1.2, "tf_em": 0.47},
             "wrong_document": {"kl": 1.03, "tf_em": 0.2}}
  rows = quick.learning_check(results, {"doc2atom": {"kl": 2.0, "tf_em": 0.0}}, margin=0.05, em_margin=0.05)
  assert [(r["control"], r["metric"], r["passed"]) for r in rows] == [
      ("untrained compiler", "kl", True), ("default adapter only", "kl", True),
      ("atoms of another document", "kl", False), ("untrained compiler", "tf_em", True),
      ("default adapter only", "tf_em", False), ("atoms of another document", "tf_em", True)]
  table = quick.format_check(rows)
  assert "FAIL (+0.030)" in table and "PASS (+1.000)" in table and "0.050" in table and "PASS (+0.300)" in table
  assert [r["control"] for r in quick.learning_check({"doc2atom": {"kl": 1.0}}, None, 0.05)] == []


def test_oracle_routes_compose_each_questions_evidence_at_uniform_weight():
  q = lambda evidence: type("Q", (), {"evidence": evidence})()
  indices, weights = quick._oracle_routes([q((3,)), q((1, 5)), q(None), q(())], k=4)
  assert indices.tolist() == [[3, 0, 0, 0], [1, 5, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
  np.testing.assert_allclose(weights, [[1, 0, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
