"""The grouped adapter (one adapter per group, jax.lax.ragged_dot) equals the gather form with the group's
factors copied per example, and explicitly merged weights: unsorted groups, uneven and empty groups, scalar
and per-example scale, under jit, through the decoder with and without scan; gradients agree too."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from doc2atom_jax.errors import UserError
from doc2atom_jax.models import adapter as adapter_lib
from doc2atom_jax.models import decoder
from tests.models.test_adapter import TARGETS, merged, random_adapter, tiny_random_weights

GROUPS = (3, 0, 3, 2, 0, 3)  # 6 examples in 4 groups: unsorted, uneven (3, 2, 1), group 1 has no example
NUM_GROUPS = 4
PER_EXAMPLE_SCALE = (0.5, 1.0, 2.0, 1.5, 0.25, 0.75)


def grouped_adapter(cfg, targets, scale, groups=GROUPS, seed=0):
  per_group = random_adapter(cfg, NUM_GROUPS, 2, targets, scale=scale, seed=seed)
  return per_group._replace(groups=jnp.asarray(groups, jnp.int32))


@pytest.mark.parametrize("family,targets,scan,per_example_scale", [
    ("llama", TARGETS, True, True),
    ("gemma3", ("down", "q", "o"), False, False),
])
def test_grouped_equals_gather_and_merged_weights_through_the_decoder(family, targets, scan, per_example_scale):
  cfg, weights = tiny_random_weights(family, scan_layers=scan)
  batch = len(GROUPS)
  tokens = jnp.asarray(np.random.default_rng(1).integers(3, cfg.vocab_size, (batch, 9)), jnp.int32)
  scale = jnp.asarray(PER_EXAMPLE_SCALE) if per_example_scale else 1.5
  adapter = grouped_adapter(cfg, targets, scale)
  gathered = adapter_lib.ungroup(adapter)
  assert gathered.groups is None and gathered.factors["down"].a.shape[0] == batch
  forward = jax.jit(lambda a: decoder.forward(weights, cfg, tokens, adapter=a).logits)
  grouped, gather = forward(adapter), forward(gathered)
  np.testing.assert_allclose(grouped, gather, rtol=1e-5, atol=2e-5)
  base = decoder.forward(weights, cfg, tokens).logits
  for n in range(batch):
    alone = decoder.forward(merged(weights, gathered, n), cfg, tokens[n:n + 1]).logits[0]
    np.testing.assert_allclose(grouped[n], alone, atol=2e-4, rtol=1e-4)
    assert np.abs(np.asarray(grouped[n] - base[n])).max() > 1e-2  # the adapter really changes the output


@pytest.mark.parametrize("groups", [GROUPS, (0, 0, 2, 3, 3, 3), (1, 1, 1, 1, 1, 1)],
                         ids=["unsorted", "sorted", "one_group"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_project_matches_explicit_per_example_weights(groups, jit):
  """project() alone, against x (W + scale aᵀ b) per example; eager with sorted groups skips the permutation."""
  rng = np.random.default_rng(2)
  batch, length, d_in, d_out, rank = len(groups), 5, 12, 7, 3
  x = jnp.asarray(rng.normal(size=(batch, length, d_in)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(d_in, d_out)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(d_out,)), jnp.float32)
  a = rng.normal(size=(NUM_GROUPS, 1, rank, d_in)).astype(np.float32)  # one layer
  b = rng.normal(size=(NUM_GROUPS, 1, rank, d_out)).astype(np.float32)
  scale = jnp.asarray(PER_EXAMPLE_SCALE, jnp.float32)
  adapter = adapter_lib.Adapter({"up": adapter_lib.LoRA(jnp.asarray(a), jnp.asarray(b))}, scale,
                                jnp.asarray(groups, jnp.int32))

  def run(adapter, x):
    layer = jax.tree.map(lambda t: t[0], adapter_lib.layer_major(adapter))
    return adapter_lib.project(x, kernel, bias, "up", layer, adapter.scale)

  if not jit:
    layer = adapter_lib.layer_major(adapter)["up"]
    assert isinstance(layer, adapter_lib.GroupedLoRA) and layer.a.shape == (1, NUM_GROUPS, rank, d_in)
    assert (layer.order is None) == bool(np.all(np.diff(groups) >= 0))
    np.testing.assert_array_equal(layer.sizes[0], np.bincount(groups, minlength=NUM_GROUPS))
  y = np.asarray((jax.jit(run) if jit else run)(adapter, x))
  for n, g in enumerate(groups):
    w = np.asarray(kernel) + PER_EXAMPLE_SCALE[n] * a[g, 0].T @ b[g, 0]
    np.testing.assert_allclose(y[n], np.asarray(x[n]) @ w + np.asarray(bias), rtol=1e-5, atol=1e-4)
  # and the gather form of the same adapter gives the same numbers
  np.testing.assert_allclose(y, run(adapter_lib.ungroup(adapter), x), rtol=1e-5, atol=1e-5)


def test_gradients_of_the_grouped_form_equal_the_gather_form():
  cfg, weights = tiny_random_weights("llama")
  tokens = jnp.asarray(np.random.default_rng(3).integers(3, cfg.vocab_size, (len(GROUPS), 8)), jnp.int32)
  adapter = grouped_adapter(cfg, ("down", "q"), jnp.asarray(PER_EXAMPLE_SCALE))

  def loss(factors, form):
    a = adapter._replace(factors=factors)
    a = adapter_lib.ungroup(a) if form == "gather" else a
    return jnp.mean(decoder.forward(weights, cfg, tokens, adapter=a).logits ** 2)

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  grouped, gather = grad(adapter.factors, "grouped"), grad(adapter.factors, "gather")
  for g, r in zip(jax.tree.leaves(grouped), jax.tree.leaves(gather)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-7)
  empty = grouped["down"].a[1]  # group 1 serves no example: no gradient
  assert float(jnp.abs(empty).max()) == 0.0 and float(jnp.abs(grouped["down"].a[3]).max()) > 0


def test_grouped_shape_errors_are_clear():
  cfg, weights = tiny_random_weights("llama")
  tokens = jnp.zeros((len(GROUPS), 4), jnp.int32)
  adapter = grouped_adapter(cfg, ("down", "q"), 1.0)
  with pytest.raises(UserError, match="groups: got shape"):
    decoder.forward(weights, cfg, tokens[:4], adapter=adapter)
  with pytest.raises(UserError, match="must be integers"):
    decoder.forward(weights, cfg, tokens, adapter=adapter._replace(groups=adapter.groups.astype(jnp.float32)))
  ragged = dict(adapter.factors, q=jax.tree.map(lambda x: x[:2], adapter.factors["q"]))  # 2 groups vs 4
  with pytest.raises(UserError, match="a\\[groups, layers, rank, d_in\\]"):
    decoder.forward(weights, cfg, tokens, adapter=adapter._replace(factors=ragged))
