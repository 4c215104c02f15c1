"""Loss terms against explicit numpy computations and their defining properties."""

import jax
import jax.numpy as jnp
import numpy as np

from doc2atom_jax.train import losses


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_topk_kl_matches_numpy_and_is_zero_for_the_teacher_itself():
  rng = np.random.default_rng(0)
  student = rng.normal(size=(2, 3, 10)).astype(np.float32)
  teacher = rng.normal(size=(2, 3, 10)).astype(np.float32)
  ids = np.argsort(-teacher, axis=-1)[..., :4]
  t_logp = np.take_along_axis(log_softmax(teacher), ids, -1)
  mask = np.array([[1, 1, 0], [1, 0, 0]], bool)
  got = losses.topk_kl(jnp.asarray(student), jnp.asarray(ids), jnp.asarray(t_logp), jnp.asarray(mask))
  p = np.exp(log_softmax(t_logp))
  kl = (p * (log_softmax(t_logp) - np.take_along_axis(log_softmax(student), ids, -1))).sum(-1)
  np.testing.assert_allclose(got, [(kl[0, 0] + kl[0, 1]) / 2, kl[1, 0]], rtol=1e-5)
  # A student equal to the teacher restricted to its top-K support has zero KL.
  restricted = np.full_like(teacher, -1e9)
  np.put_along_axis(restricted, ids, np.take_along_axis(teacher, ids, -1), -1)
  zero = losses.topk_kl(jnp.asarray(restricted), jnp.asarray(ids), jnp.asarray(t_logp), jnp.asarray(mask))
  np.testing.assert_allclose(zero, 0.0, atol=1e-5)


def test_answer_ce_and_per_document_mean():
  logits = jnp.log(jnp.asarray([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
  ce = losses.answer_ce(logits, jnp.asarray([[0, 1]]), jnp.asarray([[True, True]]))
  np.testing.assert_allclose(ce, [-(np.log(0.5) + np.log(0.8)) / 2], rtol=1e-6)
  per_q = jnp.asarray([1.0, 3.0, 10.0, 7.0])
  docs = jnp.asarray([0, 0, 1, 1])
  valid = jnp.asarray([True, True, True, False])
  # doc 0: (1 + 3) / 2 = 2; doc 1: 10 (the invalid question is out) -> (2 + 10) / 2
  np.testing.assert_allclose(losses.per_document_mean(per_q, docs, valid, 3), 6.0)


def test_info_nce_with_two_positives_and_masked_columns():
  scores = jnp.asarray([[2.0, 1.0, -jnp.inf, 0.0], [0.0, 0.0, 0.0, 0.0]])
  pos = jnp.asarray([[True, True, False, False], [False, False, False, False]])
  got = losses.info_nce(scores, pos, jnp.asarray([True, True]))  # row 2 has no positive: out
  p = np.exp([2.0, 1.0, 0.0]) / np.exp([2.0, 1.0, 0.0]).sum()
  np.testing.assert_allclose(got, -np.log(p[0] + p[1]), rtol=1e-6)
  grads = jax.grad(lambda s: losses.info_nce(s, pos, jnp.asarray([True, True])))(scores)
  assert float(grads[0, 0]) < 0 and float(grads[0, 3]) > 0 and float(grads[0, 2]) == 0


def test_orthogonality_is_zero_for_orthogonal_atoms_and_one_for_identical():
  eye = jnp.eye(4)
  ortho = jnp.stack([eye[0], eye[1], eye[2]])[None, :, None, None, :]  # [D=1, N=3, L=1, r=1, d=4]
  mask = jnp.asarray([[True, True, True]])
  np.testing.assert_allclose(losses.orthogonality(ortho, mask), 0.0, atol=1e-7)
  same = jnp.broadcast_to(eye[0], (1, 3, 1, 1, 4)) * jnp.asarray([1.0, 2.0, -3.0])[None, :, None, None, None]
  np.testing.assert_allclose(losses.orthogonality(same, mask), 1.0, rtol=1e-6)
  # A masked (padding) atom does not count.
  mixed = ortho.at[0, 2].set(ortho[0, 0])
  np.testing.assert_allclose(losses.orthogonality(mixed, jnp.asarray([[True, True, False]])), 0.0, atol=1e-7)


def test_type_ce_and_l1():
  logits = jnp.log(jnp.asarray([[[0.7, 0.3], [0.2, 0.8]]]))
  got = losses.type_ce(logits, jnp.asarray([[0, 0]]), jnp.asarray([[True, False]]))
  np.testing.assert_allclose(got, -np.log(0.7), rtol=1e-6)
  a = jnp.ones((1, 2, 3, 1, 4))
  b = -2.0 * jnp.ones((1, 2, 3, 1, 5))
  np.testing.assert_allclose(losses.l1_factors([(a, b)], jnp.asarray([[True, True]])), 3.0)
