"""The capacity oracle: free micro-LoRAs fitted against the teacher lower the KL of the questions they serve
and leave every other question alone."""

import numpy as np

from doc2atom_jax.eval import capacity
from doc2atom_jax.models import base
from tests.train.test_step import tiny_batch


def test_fitted_atoms_and_document_adapter_lower_the_kl_of_their_questions_only():
  model = base.tiny_random("llama")
  batch = tiny_batch(model)  # 3 labelled questions (one atom each) and one out-of-scope question
  evidence = [(0,), (1,), (2,), None]
  cfg = capacity.OracleConfig(rank=1, steps=60, learning_rate=5e-2)
  members, weights = capacity.atom_members(evidence)
  np.testing.assert_array_equal(members[:, 0], [0, 1, 2, 0])
  np.testing.assert_array_equal(weights, [[1, 0], [1, 0], [1, 0], [0, 0]])
  before, after = capacity.fit(model, batch, members, weights, 3, cfg)
  assert np.all(before[:3] > 0.05)
  assert np.all(after[:3] < 0.7 * before[:3]), (before, after)
  np.testing.assert_allclose(after[3], before[3], rtol=1e-5)  # no member: nothing fitted, nothing changed

  members, weights = capacity.document_members(evidence)
  doc_before, doc_after = capacity.fit(model, batch, members, weights, 1,
                                       capacity.OracleConfig(rank=8, steps=60, learning_rate=5e-2))
  np.testing.assert_allclose(doc_before, before, rtol=1e-5)  # a fresh adapter is a no-op in both forms
  assert np.mean(doc_after[:3]) < 0.7 * np.mean(doc_before[:3])
  np.testing.assert_allclose(doc_after[3], doc_before[3], rtol=1e-5)
