"""Approximate routing (router.top_k / select with approximate=True, jax.lax.approx_max_k).

Only TPUs approximate: on CPU (and GPU) jax lowers approx_max_k to an exact sort-based top-k, so here the
recall measured is 1.0 and the results equal the exact ones; the tests state the properties that must hold
on any backend (sorted values, true columns, recall >= the target, the null column merged exactly).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from doc2atom_jax.atoms import compose
from doc2atom_jax.atoms import router as router_lib

ON_CPU = jax.default_backend() == "cpu"


def recall(got_columns, want_columns):
  """Mean share of each row's exact top-k columns that the approximate top-k found."""
  got, want = np.asarray(got_columns), np.asarray(want_columns)
  return float(np.mean([len(set(g) & set(w)) / len(w) for g, w in zip(got, want)]))


@pytest.mark.parametrize("blocks", [1, 4, 3])  # 3 does not divide the axis: one block
def test_approximate_top_k_sorted_true_columns_and_recall(blocks):
  scores = jax.random.normal(jax.random.PRNGKey(0), (32, 8192))
  k, target = 16, 0.9
  values, columns = jax.jit(lambda s: router_lib.top_k(s, k, blocks, approximate=True, recall_target=target))(scores)
  values, columns = np.asarray(values), np.asarray(columns)
  assert values.shape == columns.shape == (32, k)
  assert (np.diff(values, axis=-1) <= 0).all()  # descending
  np.testing.assert_array_equal(np.take_along_axis(np.asarray(scores), columns, -1), values)  # true columns
  assert all(len(set(row)) == k for row in columns)  # no column twice
  exact = jax.lax.top_k(scores, k)
  measured = recall(columns, exact[1])
  assert measured >= target, measured
  if ON_CPU:  # approx_max_k falls back to the exact top-k
    assert measured == 1.0
    np.testing.assert_array_equal(columns, np.asarray(exact[1]))


def test_approximate_top_k_ties_on_cpu_are_lax_top_k():
  if not ON_CPU:
    pytest.skip("ties are only resolved like lax.top_k where approx_max_k is exact")
  x = jnp.asarray(np.random.default_rng(1).integers(0, 16, (5, 4096)).astype(np.float32))
  want = jax.lax.top_k(x, 8)
  for blocks in (1, 8):
    got = router_lib.top_k(x, 8, blocks, approximate=True)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


def _scores(batch=6, atoms=4096, seed=2):
  s = np.array(jax.random.normal(jax.random.PRNGKey(seed), (batch, atoms + 1)))
  s[:, 100:200] = -np.inf  # masked atoms
  s[0, -1] = 10.0  # null first: abstain
  s[1, -1] = np.sort(s[1, :-1])[-2]  # null ties the second atom: the atom (lower column) ranks first
  s[2, -1] = -10.0  # null last
  s[3, -1] = np.sort(s[3, :-1])[-3] - 1e-3  # null third
  return jnp.asarray(s, jnp.float32)


@pytest.mark.parametrize("blocks", [1, 8])
def test_select_approximate_merges_the_null_column_exactly(blocks):
  scores = _scores()
  k = 4
  idx, w, abstain = jax.jit(lambda s: router_lib.select(s, k, "softmax", blocks, approximate=True))(scores)
  want = router_lib.select(scores, k, "softmax")  # exact, over all N + 1 columns
  idx, w, abstain = np.asarray(idx), np.asarray(w), np.asarray(abstain)
  assert abstain.tolist() == [True, False, False, False, False, False]
  assert idx[0, 0] == compose.NULL_INDEX
  assert idx[1, 2] == compose.NULL_INDEX and compose.NULL_INDEX not in idx[1, :2]  # the tie: atom first
  assert compose.NULL_INDEX not in idx[2]
  assert idx[3, 3] == compose.NULL_INDEX
  # Weights are those of the returned scores; every index points at its score.
  cols = np.where(idx == compose.NULL_INDEX, scores.shape[-1] - 1, idx)
  top = np.take_along_axis(np.asarray(scores), cols, -1)
  assert (np.diff(top, axis=-1) <= 0).all()
  np.testing.assert_allclose(w, np.asarray(jax.nn.softmax(jnp.asarray(top), axis=-1)), rtol=1e-6)
  if ON_CPU:
    for got, exp in zip((idx, w, abstain), want):
      np.testing.assert_array_equal(got, np.asarray(exp))


def test_select_approximate_with_fewer_valid_atoms_than_k():
  scores = jnp.asarray([[0.3, -jnp.inf, 0.9, -jnp.inf, 0.1], [-jnp.inf, -jnp.inf, -jnp.inf, -jnp.inf, 0.0]])
  for blocks in (1, 2):
    idx, w, abstain = router_lib.select(scores, 4, "softmax", blocks, approximate=True)
    idx, w = np.asarray(idx), np.asarray(w)
    assert idx[0].tolist() == [2, 0, compose.NULL_INDEX, 0] and w[0, 3] == 0.0
    assert idx[1, 0] == compose.NULL_INDEX and np.asarray(abstain).tolist() == [False, True]
    np.testing.assert_allclose(w[1], [1.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(w[0].sum(), 1.0, rtol=1e-6)


def test_route_approx_reaches_select_through_the_method_config():
  """configs: atoms.route_approx -> MethodConfig.route_approx -> pipeline._route -> router.select; off by default."""
  from configs import quickstart
  from doc2atom_jax.atoms import pipeline
  from doc2atom_jax.eval import quick
  from tests.atoms.test_pipeline import TEXT, tiny_system

  assert quickstart.get_config().atoms.route_approx is False
  assert pipeline.MethodConfig().route_approx is False
  exact, approx = tiny_system(k=3), tiny_system(k=3, route_approx=True)
  assert approx.method.route_approx
  bank = quick.in_memory_bank([exact.compile_document(TEXT, "d0")])
  questions = ["Who founded the Tarnow Institute?", "When was Velkor Amsten born?"]
  got, want = approx.select(bank, questions), exact.select(bank, questions)
  assert got[0].shape == want[0].shape == (2, 3)
  if ON_CPU:
    for a, b in zip(got, want):
      np.testing.assert_array_equal(a, b)
