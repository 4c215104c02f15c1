"""Log-probs by vocabulary chunks (train/vocab.py) equal the full-logits path: values, gradients, top-K ids."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from doc2atom_jax.atoms import compiler as compiler_lib
from doc2atom_jax.atoms import router as router_lib
from doc2atom_jax.models import base
from doc2atom_jax.models import decoder as decoder_lib
from doc2atom_jax.train import losses, teacher, vocab
from doc2atom_jax.train import step as step_lib
from tests.train.test_step import tiny_batch

CHUNK = 96  # the tiny vocabulary (320) is not a multiple of it: the last chunk overlaps the previous one


@functools.cache
def tiny(family):
  return base.tiny_random(family)


def head_case(family):
  """(weights with only the output head, cfg, hidden [2, 5, d], ids [2, 5, 7], targets [2, 5], mask [2, 5])."""
  model = tiny(family)
  weights = {k: model.weights[k] for k in ("embed", "lm_head") if k in model.weights}
  keys = jax.random.split(jax.random.PRNGKey(1), 3)
  hidden = jax.random.normal(keys[0], (2, 5, model.config.hidden_size)) * 3.0  # large logits: softcap matters
  ids = jax.random.randint(keys[1], (2, 5, 7), 0, model.config.vocab_size)
  targets = jax.random.randint(keys[2], (2, 5), 0, model.config.vocab_size)
  mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  return weights, model.config, hidden, ids, targets, mask


# llama: tied, no softcap; gemma2: tied, final softcap 30; qwen3: untied lm_head, no softcap.
@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3"])
@pytest.mark.parametrize("chunk", [CHUNK, 7, 320, 1000])
def test_losses_by_chunks_equal_full_logits_values_and_grads(family, chunk):
  weights, cfg, hidden, ids, targets, mask = head_case(family)
  assert ("lm_head" in weights) == (family == "qwen3")
  assert (cfg.final_softcap is not None) == (family == "gemma2")
  teacher_logp = jax.random.normal(jax.random.PRNGKey(2), ids.shape)

  def loss(weights, hidden, chunk):
    student = (vocab.chunked(weights, cfg, hidden, chunk) if chunk else
               decoder_lib.logits_from_hidden(weights, cfg, hidden))
    kd = losses.topk_kl(student, ids, teacher_logp, mask)
    ce = losses.answer_ce(student, targets, mask)
    return jnp.sum(kd * jnp.asarray([1.0, 2.0])) + jnp.sum(ce * jnp.asarray([0.5, 3.0]))

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
  (full, (gw_full, gh_full)), (got, (gw, gh)) = grad(weights, hidden, 0), grad(weights, hidden, chunk)
  np.testing.assert_allclose(float(got), float(full), rtol=1e-5)
  np.testing.assert_allclose(gh, gh_full, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(gh_full))))
  for name in gw_full:
    np.testing.assert_allclose(gw[name], gw_full[name], rtol=1e-5,
                               atol=1e-5 * float(jnp.max(jnp.abs(gw_full[name]))), err_msg=name)


@pytest.mark.parametrize("vocab_axis", [0, 1])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_log_normalizer_and_logits_at_match_log_softmax(vocab_axis, softcap):
  """Both head layouts ([V, d] embedding, [d, V] lm_head), an odd vocabulary, leading axes of any rank."""
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  d, V = 16, 1001
  head = jax.random.normal(keys[0], (d, V))
  matrix = head.T if vocab_axis == 0 else head
  hidden = jax.random.normal(keys[1], (3, 2, 4, d)) * 4.0
  ids = jax.random.randint(keys[2], (3, 2, 4, 5), 0, V)
  logits = hidden @ head
  if softcap is not None:
    logits = jnp.tanh(logits / softcap) * softcap
  want = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), ids, axis=-1)
  lse = vocab.log_normalizer(hidden, matrix, chunk=64, vocab_axis=vocab_axis, softcap=softcap)
  np.testing.assert_allclose(lse, jax.nn.logsumexp(logits, axis=-1), rtol=1e-6)
  got = vocab.logits_at(hidden, matrix, ids, vocab_axis=vocab_axis, softcap=softcap) - lse[..., None]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_the_chunked_backward_keeps_no_rows_by_vocab_array():
  """The point of it: the gradient's temporaries stay far below one [rows, V] float32 array."""
  d, V, rows = 32, 50_000, 64
  hidden = jnp.ones((rows, d))
  head = jnp.ones((d, V)) * 0.01
  ids = jnp.zeros((rows, 4), jnp.int32)
  full = lambda h: jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(h @ head), ids, -1))
  chunked = lambda h: jnp.sum(vocab.logits_at(h, head, ids) - vocab.log_normalizer(h, head, chunk=2048)[:, None])
  temp = lambda f: jax.jit(jax.grad(f)).lower(hidden).compile().memory_analysis().temp_size_in_bytes
  assert temp(full) >= rows * V * 4
  assert temp(chunked) < rows * V * 4 / 4


def _full_topk(hidden, head, k, softcap=None):
  logits = jnp.matmul(hidden, head, preferred_element_type=jnp.float32)
  if softcap is not None:
    logits = jnp.tanh(logits / softcap) * softcap
  return jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), k)


@pytest.mark.parametrize("vocab_axis", [0, 1])
def test_topk_by_chunks_equals_lax_top_k_ties_to_the_lower_id(vocab_axis):
  """Integer hidden states and head columns: the logits are exact, so duplicated columns tie exactly; the ties
  sit in different chunks (one in the shifted last chunk) and straddle the k cut."""
  rng = np.random.default_rng(0)
  d, V, chunk, k = 8, 50, 8, 4
  head = rng.integers(-2, 3, size=(d, V)).astype(np.float32)
  hidden = rng.integers(-2, 3, size=(3, d)).astype(np.float32)
  hidden[:, 0] = 4.0
  head[0] = -3.0
  head[:, 10] = head[:, 10] * 0 + [6, 0, 0, 0, 0, 0, 0, 0]  # the best column for every row
  for col in (3, 20, 33, 49):  # four-way tie for the remaining three slots: 49 (last chunk) loses to the lower ids
    head[:, col] = [5, 0, 0, 0, 0, 0, 0, 0]
  hidden, head = jnp.asarray(hidden), jnp.asarray(head)
  want_values, want_ids = _full_topk(hidden, head, k)
  np.testing.assert_array_equal(want_ids, np.tile([10, 3, 20, 33], (3, 1)))
  matrix = head.T if vocab_axis == 0 else head
  values, ids = vocab.topk_logprobs(hidden, matrix, k, chunk=chunk, vocab_axis=vocab_axis)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(values, want_values, atol=1e-5)  # lse ~24: ulps
  # The whole tie group: the shifted last chunk has fewer real columns than k (its -inf ones never win), and a
  # chunk smaller than k (raised to k).
  for chunk in (6, 2):
    values, ids = vocab.topk_logprobs(hidden, matrix, 5, chunk=chunk, vocab_axis=vocab_axis)
    np.testing.assert_array_equal(ids, np.tile([10, 3, 20, 33, 49], (3, 1)))
    np.testing.assert_allclose(values, _full_topk(hidden, head, 5)[0], atol=1e-5)


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("chunk", [7, 64, 1001, 5000])
def test_topk_by_chunks_on_random_logits(softcap, chunk):
  keys = jax.random.split(jax.random.PRNGKey(3), 2)
  hidden = jax.random.normal(keys[0], (2, 6, 16)) * 3.0
  head = jax.random.normal(keys[1], (16, 1001))
  want_values, want_ids = _full_topk(hidden, head, 16, softcap)
  values, ids = vocab.topk_logprobs(hidden, head, 16, chunk=chunk, softcap=softcap)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(values, want_values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gemma2", "qwen3"])
def test_teacher_topk_by_chunks_equals_full(family, tmp_path):
  model = tiny(family)
  prompts = [list(b"The observatory was founded in 1901. When? "), list(b"Who? ")]
  answers = [list(b"1901"), list(b"Ada Orlen")]
  full = teacher.topk_on_answers(model, prompts, answers, k=16)
  chunked = teacher.topk_on_answers(model, prompts, answers, k=16, vocab_chunk=CHUNK)
  for (ids_f, logp_f), (ids_c, logp_c) in zip(full, chunked):
    np.testing.assert_array_equal(ids_c, ids_f)
    np.testing.assert_allclose(logp_c, logp_f, rtol=1e-5, atol=1e-5)
  cache = teacher.TeacherCache(tmp_path, model.name, "t")
  cached = cache.get_or_compute(model, ["a", "b"], prompts, answers, k=16, vocab_chunk=CHUNK)
  for (ids_f, _), (ids_c, _) in zip(full, cached):
    np.testing.assert_array_equal(ids_c, ids_f)


def test_loss_fn_with_vocab_chunks_equals_full_logits_loss_and_grads():
  """The whole objective on tiny Gemma 2 (tied head, final softcap): routed and oracle passes by chunks."""
  model = tiny("gemma2")
  cfg = compiler_lib.config_for(model.config, code_dim=32, width=32, key_dim=16, num_blocks=1, num_heads=2)
  rngs = nnx.Rngs(0)
  graphdef, params = nnx.split((compiler_lib.AtomCompiler(cfg, rngs=rngs), router_lib.Router(cfg, rngs=rngs)))
  batch = jax.tree.map(jnp.asarray, tiny_batch(model))

  @functools.partial(jax.jit, static_argnums=0)
  def grads(loss_cfg, params):
    return jax.grad(step_lib.loss_fn, has_aux=True)(params, graphdef, model.weights, batch, model_cfg=model.config,
                                                    loss_cfg=loss_cfg)

  every = dict(kd_tokens="all", atom_target="teacher")  # every term reads the student's log-probs
  g_full, m_full = grads(step_lib.LossConfig(k=2, **every), params)
  g_chunk, m_chunk = grads(step_lib.LossConfig(k=2, vocab_chunk=CHUNK, **every), params)
  for name in ("loss", "kd", "ce", "atom", "null"):
    assert float(m_full[name]) > 0, name
    np.testing.assert_allclose(float(m_chunk[name]), float(m_full[name]), rtol=1e-5, err_msg=name)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_full), jax.tree.leaves(g_chunk)):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * max(float(np.abs(a).max()), 1e-6),
                               err_msg=jax.tree_util.keystr(path))


def test_loss_config_reads_vocab_chunk_from_the_config():
  from configs import tiny as tiny_config

  config = tiny_config.get_config()
  assert step_lib.loss_config(config).vocab_chunk == 0
  config.unlock()
  config.loss.vocab_chunk = 4096
  assert step_lib.loss_config(config).vocab_chunk == 4096
