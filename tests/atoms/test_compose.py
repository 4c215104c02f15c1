"""Compiler, router and composition: merged-weight equivalence, codes vs factors, one trace, gradient flow."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from doc2atom_jax.atoms import compiler as compiler_lib
from doc2atom_jax.atoms import compose, encode, router as router_lib
from doc2atom_jax.atoms.atomize import atomize
from doc2atom_jax.models import base, decoder

TEXT = ("Velkor Amsten was born in 1943. He founded the Tarnow Institute in Daskel. The institute has 412 "
        "employees. Daskel is a coastal city in Vorland. Mira Oskel won the Halden Prize in 1988.")


@pytest.fixture(scope="module")
def setup():
  model = base.tiny_random("llama")
  cfg = compiler_lib.config_for(model.config, targets=("down", "q"), rank=2, code_dim=32, width=32, key_dim=16,
                                num_blocks=1, num_heads=2)
  comp = compiler_lib.AtomCompiler(cfg, rngs=nnx.Rngs(0))
  doc = atomize(TEXT, "d0", model.tokenizer, min_atom_tokens=4, max_atom_tokens=48)
  states = encode.document_states(model, doc.token_ids)
  idx, mask = encode.span_indices(doc.atoms)
  types = jnp.asarray([compiler_lib.ATOM_TYPES.index(a.type) for a in doc.atoms])
  return model, cfg, comp, doc, states, encode.gather_spans(states, idx, mask), jnp.asarray(mask), types


def perturbed(comp, seed=1):
  """A copy of the compiler with every parameter nudged (B's scalers no longer 0)."""
  graphdef, state = nnx.split(comp)
  keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(state))))
  state = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape), state)
  return nnx.merge(graphdef, state)


def test_compiler_shapes_and_a_fresh_compiler_is_a_no_op(setup):
  model, cfg, comp, doc, _, spans, mask, types = setup
  codes, keys, type_logits = comp(spans, mask, types)
  n = len(doc.atoms)
  assert n == 5
  assert codes.shape == (n, cfg.num_layers, 2, 2, 32) and keys.shape == (n, 16) and type_logits.shape == (n, 6)
  np.testing.assert_allclose(np.linalg.norm(keys, axis=-1), 1.0, atol=1e-4)
  np.testing.assert_allclose(np.sqrt(np.mean(np.asarray(codes) ** 2, axis=-1)), 1.0, atol=1e-3)  # unit-RMS rows
  adapter = compose.adapter_from_bank(comp.head(), codes, jnp.asarray([[0, 1, 2]]), jnp.ones((1, 3)),
                                      comp.null()[0], comp.default_codes[...], alpha=cfg.alpha, targets=cfg.targets)
  tokens = jnp.asarray([model.encode("Who founded the Tarnow Institute?")])
  np.testing.assert_array_equal(decoder.forward(model.weights, model.config, tokens, adapter=adapter).logits,
                                decoder.forward(model.weights, model.config, tokens).logits)


def test_codes_are_what_the_attention_read_from_the_span(setup):
  # The queries (latents, layer, type, target embeddings) only choose where to read: an atom whose span is
  # one token gets the same code whatever its type (attention has one place to read), while atoms with
  # different spans get different codes. Were the queries part of the code, every atom would share them.
  model, cfg, comp, doc, _, spans, mask, types = setup
  comp = perturbed(comp)
  one_token = jnp.zeros_like(mask).at[:, 0].set(True)
  by_type = [comp.codes(spans, one_token, jnp.full_like(types, t)) for t in range(3)]
  np.testing.assert_allclose(by_type[0], by_type[1], atol=1e-5)
  np.testing.assert_allclose(by_type[0], by_type[2], atol=1e-5)
  codes = np.asarray(comp.codes(spans, mask, types)).reshape(len(doc.atoms), -1)
  unit = codes / np.linalg.norm(codes, axis=-1, keepdims=True)
  cosine = unit @ unit.T
  assert cosine[~np.eye(len(codes), dtype=bool)].max() < 0.95


def test_composition_equals_explicitly_merged_weights(setup):
  model, cfg, comp, doc, _, spans, mask, types = setup
  comp = perturbed(comp)
  codes, _, _ = comp(spans, mask, types)
  head, null_codes, default_codes = comp.head(), comp.null()[0], comp.default_codes[...]
  indices = jnp.asarray([[0, 3, compose.NULL_INDEX], [4, 1, 2]])  # different atoms per example, one null
  weights = jnp.asarray([[0.5, 0.3, 0.2], [0.7, 0.2, 0.1]])
  adapter = compose.adapter_from_bank(head, codes, indices, weights, null_codes, default_codes,
                                      alpha=cfg.alpha, targets=cfg.targets)
  assert adapter.factors["down"].a.shape == (2, cfg.num_layers, 3 * 2 + cfg.default_rank, cfg.target_dims[0][0])
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 300, (2, 10)), jnp.int32)
  composed = decoder.forward(model.weights, model.config, tokens, adapter=adapter).logits

  def factors_of(code_rows):  # per target: A [L, r, i], B [L, r, o], by explicit arithmetic on the head
    out = []
    for t in range(len(cfg.targets)):
      a = np.einsum("lrc,lci->lri", code_rows[:, t], head["a"][t]) * np.asarray(head["scale_a"])[:, t, :, None]
      b = np.einsum("lrc,lco->lro", code_rows[:, t], head["b"][t]) * np.asarray(head["scale_b"])[:, t, :, None]
      out.append((a, b))
    return out

  for n in range(2):
    layers = {k: np.array(v) for k, v in model.weights["layers"].items()}
    items = [(np.asarray(null_codes) if i == compose.NULL_INDEX else np.asarray(codes[i]), float(w))
             for i, w in zip(np.asarray(indices[n]), np.asarray(weights[n]))] + [(np.asarray(default_codes), 1.0)]
    for code_rows, w in items:
      for target, (a, b) in zip(cfg.targets, factors_of(code_rows)):
        layers[target] = layers[target] + cfg.alpha * w * np.einsum("lri,lro->lio", a, b)
    merged = decoder.forward({**model.weights, "layers": layers}, model.config, tokens[n:n + 1]).logits[0]
    np.testing.assert_allclose(composed[n], merged, atol=3e-4, rtol=1e-4)
  base_logits = decoder.forward(model.weights, model.config, tokens).logits
  assert float(jnp.abs(composed - base_logits).max()) > 1e-2


def test_storing_codes_equals_storing_factors(setup):
  _, cfg, comp, _, _, spans, mask, types = setup
  comp = perturbed(comp)
  codes, _, _ = comp(spans, mask, types)
  head = comp.head()
  factors = compose.materialize(head, codes)  # [N, L, r, i] per target: "stored factors"
  indices, weights = jnp.asarray([[2, 0], [1, 4]]), jnp.asarray([[0.6, 0.4], [1.0, 0.5]])
  from_factors = compose.compose_factors([(a[indices], b[indices]) for a, b in factors], weights)
  from_codes = compose.compose(head, codes[indices], weights, None, cfg.alpha, cfg.targets)
  for lora, (a, b) in zip(from_codes.factors.values(), from_factors):
    np.testing.assert_allclose(lora.a, a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lora.b, b, rtol=1e-5, atol=1e-5)
  # bfloat16 storage of codes: the adapter moves by bf16 rounding only.
  rounded = compose.compose(head, codes.astype(jnp.bfloat16)[indices], weights, None, cfg.alpha, cfg.targets)
  a, a16 = from_codes.factors["down"].a, rounded.factors["down"].a
  assert float(jnp.abs(a - a16).max()) <= 2 ** -7 * float(jnp.abs(a).max())


def test_composition_traces_once_per_shape(setup):
  _, cfg, comp, _, _, spans, mask, types = setup
  codes, _, _ = comp(spans, mask, types)
  bank = jnp.concatenate([codes, jnp.zeros((64 - codes.shape[0], *codes.shape[1:]))])  # a padded bucket
  fn = chex.assert_max_traces(n=1)(lambda idx, w: compose.compose(comp.head(), compose.gather_codes(
      bank, idx, comp.null()[0]), w, comp.default_codes[...], cfg.alpha, cfg.targets))
  jitted = jax.jit(fn)
  rng = np.random.default_rng(0)
  for _ in range(4):  # new index sets and weights: no retrace
    jitted(jnp.asarray(rng.integers(-1, 5, (3, 4)), jnp.int32), jnp.asarray(rng.random((3, 4)), jnp.float32))
  other_bank = bank.at[:5].set(bank[:5] * 2.0)  # a different document's codes in the same bucket
  compose.adapter_from_bank(comp.head(), other_bank, jnp.zeros((3, 4), jnp.int32), jnp.ones((3, 4)),
                            comp.null()[0], comp.default_codes[...], alpha=cfg.alpha, targets=cfg.targets)
  before = compose.adapter_from_bank._cache_size()
  compose.adapter_from_bank(comp.head(), bank, jnp.ones((3, 4), jnp.int32), jnp.ones((3, 4)),
                            comp.null()[0], comp.default_codes[...], alpha=cfg.alpha, targets=cfg.targets)
  assert compose.adapter_from_bank._cache_size() == before


def test_top_k_selection_null_abstains_and_k_beyond_scope(setup):
  _, cfg, _, _, _, _, _, _ = setup
  router = router_lib.Router(cfg, rngs=nnx.Rngs(1))
  keys = jnp.eye(16)[:3]
  null_key = jnp.eye(16)[3]
  queries = jnp.stack([jnp.eye(16)[1], jnp.eye(16)[3]])  # the second matches only the null key
  scores = router.scores(queries, keys, jnp.asarray([True, True, False]), null_key)
  assert scores.shape == (2, 4) and bool(jnp.isneginf(scores[:, 2]).all())
  idx, w, abstain = router_lib.select(scores, k=2)
  assert int(idx[0, 0]) == 1 and not bool(abstain[0])
  assert int(idx[1, 0]) == compose.NULL_INDEX and bool(abstain[1])
  idx, w, _ = router_lib.select(scores, k=8)  # more than the 2 valid atoms + null
  assert idx.shape == (2, 4) and bool((w[:, -1] == 0).all()) and np.allclose(w.sum(-1), 1.0)
  for norm in router_lib.NORMALIZATIONS:
    _, w, _ = router_lib.select(scores, k=2, normalization=norm)
    assert bool(jnp.isfinite(w).all())


def test_gradients_reach_compiler_router_and_null_never_the_base(setup):
  model, cfg, comp, doc, states, spans, mask, types = setup
  router = router_lib.Router(cfg, rngs=nnx.Rngs(1))
  question = jnp.asarray([model.encode("Who founded the Tarnow Institute?")])
  q_states = decoder.forward(model.weights, model.config, question, return_hidden_states=True,
                             compute_logits=False).hidden_states[cfg.layer_for_keys]
  answer = jnp.asarray([[5, 6, 7]])

  def losses(trainable, weights):
    comp, router = trainable
    codes, keys, _ = comp(spans, mask, types)
    null_codes, null_key = comp.null()
    scores = router.scores(router.query(q_states, jnp.ones(q_states.shape[:2], bool)), keys,
                           jnp.ones(keys.shape[0], bool), null_key)
    w = router_lib.relaxed_weights(scores, k=keys.shape[0] + 1)  # everything selected: every atom trains
    all_codes = jnp.concatenate([codes, null_codes[None]])[None]  # every in-scope atom + null
    adapter = compose.compose(comp.head(), all_codes, w, comp.default_codes[...], cfg.alpha, cfg.targets)
    logits = decoder.forward(weights, model.config, jnp.concatenate([question, answer], 1), adapter=adapter).logits
    kd = -jnp.mean(jax.nn.log_softmax(logits[0, -4:-1])[jnp.arange(3), answer[0]])
    route = -jax.nn.log_softmax(scores[0])[1]  # InfoNCE with atom 1 ("He founded ...") as the positive
    return kd, route

  def grads_of(which, comp):
    # Only the compiler and router are differentiated; the base weights are a plain, frozen argument.
    graphdef, state = nnx.split((comp, router))
    base_leaves = {id(x) for x in jax.tree.leaves(model.weights)}
    assert not base_leaves & {id(x) for x in jax.tree.leaves(state)}
    return jax.grad(lambda st: losses(nnx.merge(graphdef, st), model.weights)[which])(state)

  def nonzero(tree):
    return {"/".join(map(str, p)): float(jnp.abs(x).max()) > 0 for p, x in jax.tree_util.tree_leaves_with_path(tree)}

  # Perturbed state: the KD term reaches the trunk, head, scalers, keys (through routing), router, null atom.
  state_grads = nonzero(grads_of(0, perturbed(comp)))
  for name in ("in_proj", "code_proj", "head_a", "head_b", "scale_b", "null_codes", "null_key", "key_w2",
               "default_codes", "w1", "log_inv_temperature"):
    assert any(name in k and v for k, v in state_grads.items()), name
  # At init (B's map 0, as a LoRA's B): KD reaches B's map at once — not A's map or B's scaler, which only
  # act through B — and the routing loss alone reaches the router and the keys.
  init_grads = nonzero(grads_of(0, comp))
  assert any("head_b" in k and v for k, v in init_grads.items())
  assert not any(("head_a" in k or "scale_b" in k) and v for k, v in init_grads.items())
  # The routing loss at init reaches the linear paths (compiler.route_skip) and the MLPs' last layers, which start
  # at 0 — so not yet their first layers; once the key MLP's last layer has moved, its first layer too.
  route_grads = nonzero(grads_of(1, comp))
  for name in ("[0]/['key_skip']", "[0]/['key_center']", "[0]/['key_w2']", "[0]/['null_key']", "[1]/['q_skip']",
               "[1]/['q_center']", "[1]/['w2']"):
    assert route_grads[f"{name}/.value"], name
  assert not route_grads["[0]/['key_w1']/.value"] and not route_grads["[1]/['w1']/.value"]
  assert nonzero(grads_of(1, perturbed(comp)))["[0]/['key_w1']/.value"]


def test_copy_path_writes_the_copied_tokens_embedding_into_b(setup):
  # With copy_dim > 0 a fresh compiler is still a no-op (gains start at 0). With a gain g, an atom whose span is
  # one token gets B rows = g * (that token's unit embedding projected onto the frozen basis), normalized:
  # the copy map is the head's fixed part, composed like any other code entry (storage form unchanged).
  model, _, _, doc, _, spans, mask, types = setup
  cfg = compiler_lib.config_for(model.config, targets=("down", "q"), rank=1, code_dim=48, width=32, key_dim=16,
                                num_blocks=1, num_heads=2, copy_dim=16)
  comp = compiler_lib.AtomCompiler(cfg, rngs=nnx.Rngs(0))
  basis = encode.embedding_basis(model.weights["embed"], 16)
  np.testing.assert_allclose(basis.T @ basis, np.eye(16), atol=1e-5)
  comp.set_copy_basis(basis)
  codes, _, _ = comp(spans, mask, types)
  assert codes.shape[-1] == 48
  tokens = jnp.asarray([model.encode("Who founded the Tarnow Institute?")])
  adapter = compose.adapter_from_bank(comp.head(), codes, jnp.asarray([[0, 1]]), jnp.ones((1, 2)), comp.null()[0],
                                      comp.default_codes[...], alpha=cfg.alpha, targets=cfg.targets)
  np.testing.assert_array_equal(decoder.forward(model.weights, model.config, tokens, adapter=adapter).logits,
                                decoder.forward(model.weights, model.config, tokens).logits)

  comp.copy_gain.value = jnp.full(comp.copy_gain.shape, 0.05)
  one_token = jnp.zeros_like(mask).at[:, 0].set(True)
  codes = comp.codes(spans, one_token, types)  # [N, L, n_t, r, c]
  head = comp.head()
  b_down = np.einsum("nlc,lcd->nld", np.asarray(codes[:, :, 0, 0]), np.asarray(head["b"][0]))  # head_b is 0
  embedding = np.asarray(spans[0, :, 0])  # the input of layer 0 at each atom's first token
  projected = embedding @ basis @ basis.T
  projected /= np.linalg.norm(projected, axis=-1, keepdims=True)
  for layer in range(cfg.num_layers):
    np.testing.assert_allclose(b_down[:, layer], 0.05 * cfg.copy_gain_scale * projected, atol=1e-5)
  assert np.allclose(np.asarray(head["b"][1]), 0.0)  # q's output is not the residual stream: no copy map
  # The basis is frozen like the state statistics: it is listed there, so training never moves it.
  assert "copy_basis" in compiler_lib.STATISTICS
