"""The frozen base decoder (Llama and Gemma families) as an NNX module over stacked per-layer weights.

Every per-layer weight is stored stacked on a leading `layers` axis, so one parameter layout serves both the
Python loop over layers and `jax.lax.scan` (a config switch: scan compiles once per layer body, the loop
lets XLA specialize each layer). The module is a container of `nnx.Param`s with logical sharding names;
the computation is `forward`, a pure function of the weight pytree, which is what crosses jit boundaries:

    graphdef, weights = nnx.split(model)          # weights: nnx.State, a pytree
    out = jax.jit(forward, static_argnums=1)(nnx.to_pure_dict(weights), cfg, tokens, ...)

The optional adapter (see `adapter.py`) adds per-example low-rank terms inside the targeted projections;
the base weights are never modified or copied per example.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from doc2atom_jax.models import adapter as adapter_lib
from doc2atom_jax.models import attention, rope
from doc2atom_jax.models.config import DecoderConfig


# ---------------------------------------------------------------------------------------------------------
# Parameter layout: name -> (shape, logical axis names, initializer).
# ---------------------------------------------------------------------------------------------------------
def param_specs(cfg: DecoderConfig) -> dict:
  """Nested dict of (shape, logical axes, init) for every weight; per-layer weights carry `layers` first."""
  d, f, L, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.head_dim
  q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
  norm_init = "zeros" if cfg.norm_offset else "ones"
  layers = {
      "attn_norm": ((L, d), ("layers", "norm"), norm_init),
      "q": ((L, d, q), ("layers", "embed", "heads"), "normal"),
      "k": ((L, d, kv), ("layers", "embed", "kv"), "normal"),
      "v": ((L, d, kv), ("layers", "embed", "kv"), "normal"),
      "o": ((L, q, d), ("layers", "heads", "embed"), "normal"),
      "mlp_norm": ((L, d), ("layers", "norm"), norm_init),
      "gate": ((L, d, f), ("layers", "embed", "mlp"), "normal"),
      "up": ((L, d, f), ("layers", "embed", "mlp"), "normal"),
      "down": ((L, f, d), ("layers", "mlp", "embed"), "normal"),
  }
  if cfg.attention_bias:
    layers |= {"q_bias": ((L, q), ("layers", "heads"), "zeros"),
               "k_bias": ((L, kv), ("layers", "kv"), "zeros"),
               "v_bias": ((L, kv), ("layers", "kv"), "zeros")}
  if cfg.qk_norm:
    layers |= {"q_norm": ((L, hd), ("layers", "head_dim"), norm_init),
               "k_norm": ((L, hd), ("layers", "head_dim"), norm_init)}
  if cfg.post_norms:
    layers |= {"post_attn_norm": ((L, d), ("layers", "norm"), norm_init),
               "post_mlp_norm": ((L, d), ("layers", "norm"), norm_init)}
  specs = {"embed": ((cfg.vocab_size, d), ("vocab", "embed"), "normal"),
           "final_norm": ((d,), ("norm",), norm_init),
           "layers": layers}
  if not cfg.tie_embeddings:
    specs["lm_head"] = ((d, cfg.vocab_size), ("embed", "vocab"), "normal")
  return specs


def _is_spec(x) -> bool:
  return isinstance(x, tuple) and len(x) == 3 and isinstance(x[0], tuple)


class Decoder(nnx.Module):
  """Holds the frozen weights as `nnx.Param`s (with logical sharding names) and runs `forward`."""

  def __init__(self, cfg: DecoderConfig, *, seed: int = 0, init_std: float = 0.02, weights: dict | None = None):
    """Random init (tests, shape-only planning) or, with `weights`, wraps given arrays of the same layout."""
    self.cfg = cfg
    rng = np.random.default_rng(seed)
    dtype = jnp.dtype(cfg.param_dtype)

    def make(spec, given):
      shape, axes, init = spec
      if given is not None:
        value = jnp.asarray(given, dtype)
        if value.shape != shape:
          raise ValueError(f"weight of shape {value.shape} where {shape} was expected")
      elif init == "normal":
        value = jnp.asarray(rng.normal(0.0, init_std, shape), dtype)
      else:
        value = (jnp.zeros if init == "zeros" else jnp.ones)(shape, dtype)
      return nnx.Param(value, out_sharding=axes, eager_sharding=False)

    specs = param_specs(cfg)
    weights = weights or {}
    self.embed = make(specs["embed"], weights.get("embed"))
    self.final_norm = make(specs["final_norm"], weights.get("final_norm"))
    if "lm_head" in specs:
      self.lm_head = make(specs["lm_head"], weights.get("lm_head"))
    given_layers = weights.get("layers", {})
    self.layers = nnx.data({k: make(s, given_layers.get(k)) for k, s in specs["layers"].items()})

  def weights(self) -> dict:
    """The weight pytree (plain arrays) that `forward` takes."""
    return nnx.to_pure_dict(nnx.state(self, nnx.Param))

  def __call__(self, tokens, **kwargs) -> "DecoderOutput":
    return forward(self.weights(), self.cfg, tokens, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# KV cache.
# ---------------------------------------------------------------------------------------------------------
class KVCache(NamedTuple):
  k: jax.Array  # [layers, batch, max_len, kv_heads, head_dim]
  v: jax.Array
  positions: jax.Array  # [batch, max_len] int32, position of the token in each slot
  valid: jax.Array  # [batch, max_len] bool, slot holds a real token
  length: jax.Array  # [] int32, slots filled so far (shared by the batch: prompts are left-padded)


def _fresh_cache(cfg: DecoderConfig, kvs, positions, mask, slots: int) -> KVCache:
  """A cache of `slots` slots whose first T hold one pass's keys and values [L, B, T, kv, hd] (a prefill)."""
  length = positions.shape[1]
  extra = slots - length
  pad = lambda x: jnp.pad(x.astype(jnp.dtype(cfg.dtype)), ((0, 0), (0, 0), (0, extra), (0, 0), (0, 0)))
  return KVCache(pad(kvs[0]), pad(kvs[1]), jnp.pad(positions.astype(jnp.int32), ((0, 0), (0, extra))),
                 jnp.pad(mask, ((0, 0), (0, extra))), jnp.asarray(length, jnp.int32))


def init_cache(cfg: DecoderConfig, batch: int, max_len: int, dtype=None) -> KVCache:
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  dtype = dtype or jnp.dtype(cfg.dtype)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, max_len), jnp.int32),
                 jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))


# ---------------------------------------------------------------------------------------------------------
# Forward.
# ---------------------------------------------------------------------------------------------------------
class DecoderOutput(NamedTuple):
  logits: jax.Array | None  # [B, T, vocab] float32 (None when compute_logits=False)
  hidden: jax.Array  # [B, T, d]: final hidden state, after the final norm
  hidden_states: jax.Array | None  # [L + 1, B, T, d]: input of each layer, then `hidden` (as transformers)
  cache: KVCache | None


def rms_norm(x, weight, cfg: DecoderConfig):
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.rms_norm_eps)
  return (y * (cfg.norm_offset + weight.astype(jnp.float32))).astype(x.dtype)


def _activation(cfg: DecoderConfig, x):
  return jax.nn.silu(x) if cfg.activation == "silu" else jax.nn.gelu(x, approximate=True)


def _pick(flag, if_true, if_false):
  """Per-layer choice: a Python bool in the layer loop, a traced bool under scan."""
  if isinstance(flag, (bool, np.bool_)):
    return if_true if flag else if_false
  return jax.tree.map(lambda a, b: jnp.where(flag, a, b), if_true, if_false)


def _layer(cfg, w, h, *, is_sliding, tables, lora, scale, cache_kv, cache_index, blocks, collect_kv=False):
  """One decoder block. tables = ((cos, sin, visible) for full layers, the same for sliding layers); visible
  is None when `blocks` = (positions, valid) asks for causal query blocks. Returns (h, kv): kv is the updated
  cache slice with a cache, this layer's new (k, v) with `collect_kv` (a prefill, no cache), else None."""
  batch, length, _ = h.shape
  cos, sin, visible = _pick(is_sliding, tables[1], tables[0])
  proj = lambda x, name: adapter_lib.project(x, w[name], w.get(name + "_bias"), name, lora, scale)

  x = rms_norm(h, w["attn_norm"], cfg)
  q = proj(x, "q").reshape(batch, length, cfg.num_heads, cfg.head_dim)
  k = proj(x, "k").reshape(batch, length, cfg.num_kv_heads, cfg.head_dim)
  v = proj(x, "v").reshape(batch, length, cfg.num_kv_heads, cfg.head_dim)
  if cfg.qk_norm:
    q, k = rms_norm(q, w["q_norm"], cfg), rms_norm(k, w["k_norm"], cfg)
  q, k = rope.apply(q, cos, sin), rope.apply(k, cos, sin)
  if collect_kv:
    cache_kv = (k, v)
  elif cache_kv is not None:
    start = (0, cache_index, 0, 0)
    cache_kv = (jax.lax.dynamic_update_slice(cache_kv[0], k.astype(cache_kv[0].dtype), start),
                jax.lax.dynamic_update_slice(cache_kv[1], v.astype(cache_kv[1].dtype), start))
    k, v = cache_kv[0].astype(q.dtype), cache_kv[1].astype(q.dtype)
  if blocks is not None:
    window = cfg.sliding_window if cfg.has_sliding_layers else None
    o = attention.attend_causal_blocks(q, k, v, *blocks, window, is_sliding, scale=cfg.attn_scale,
                                       softcap=cfg.attn_softcap, block=cfg.attention_block)
  else:
    o = attention.attend(q, k, v, visible, scale=cfg.attn_scale, softcap=cfg.attn_softcap)
  o = proj(o.reshape(batch, length, cfg.num_heads * cfg.head_dim), "o")
  if cfg.post_norms:
    o = rms_norm(o, w["post_attn_norm"], cfg)
  h = h + o

  x = rms_norm(h, w["mlp_norm"], cfg)
  m = proj(_activation(cfg, proj(x, "gate")) * proj(x, "up"), "down")
  if cfg.post_norms:
    m = rms_norm(m, w["post_mlp_norm"], cfg)
  return h + m, cache_kv


def embed_tokens(weights, cfg: DecoderConfig, tokens):
  h = jnp.take(weights["embed"], tokens, axis=0).astype(cfg.dtype)
  if cfg.embed_scale:
    h = h * jnp.asarray(math.sqrt(cfg.hidden_size), cfg.dtype)
  return h


def logits_from_hidden(weights, cfg: DecoderConfig, hidden):
  """Vocabulary logits in float32 from final (normed) hidden states [..., d]."""
  head = weights["lm_head"] if "lm_head" in weights else weights["embed"].T
  logits = jnp.matmul(hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)
  if cfg.final_softcap is not None:
    logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
  return logits


def default_positions(attention_mask, start=None):
  """Positions that skip padding: cumsum of the mask - 1 (+ start per row), clipped at 0 on left padding."""
  pos = jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1
  if start is not None:
    pos = pos + start[:, None]
  return jnp.maximum(pos, 0)


REMAT_POLICIES = {"none": None, "full": "nothing_saveable", "dots": "dots_with_no_batch_dims_saveable"}


def _remat(fn, cfg: DecoderConfig):
  """The layer function under `jax.checkpoint` with the config's policy (what the backward pass may keep)."""
  if cfg.remat not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {cfg.remat!r}; valid: {', '.join(REMAT_POLICIES)}")
  policy = REMAT_POLICIES[cfg.remat]
  return fn if policy is None else jax.checkpoint(fn, policy=getattr(jax.checkpoint_policies, policy))


def forward(weights: dict, cfg: DecoderConfig, tokens, *, attention_mask=None, positions=None,
            adapter: adapter_lib.Adapter | None = None, cache: KVCache | None = None, new_cache_slots: int = 0,
            return_hidden_states: bool = False, compute_logits: bool = True) -> DecoderOutput:
  """Runs the decoder on tokens [B, T].

  attention_mask [B, T] marks real tokens (1) vs padding (0); positions default to the count of real
  tokens before each one (after what the cache holds). With a cache, the T new tokens are written at slot
  `cache.length` and attend to everything cached before them. Without one, `new_cache_slots` ≥ T returns a
  fresh cache of that many slots holding this pass (a prefill: the pass runs cache-free, so long prompts
  get the blocked causal attention; slots after T are free for decoding).
  """
  batch, length = tokens.shape
  if new_cache_slots and (cache is not None or new_cache_slots < length):
    raise ValueError(f"new_cache_slots={new_cache_slots} needs no cache and at least the {length} tokens")
  blocked = (cache is None and positions is None and 0 < cfg.attention_block < length)
  if attention_mask is None:
    attention_mask = jnp.ones((batch, length), bool)
  attention_mask = attention_mask.astype(bool)
  if positions is None:
    start = None
    if cache is not None:
      start = jnp.max(jnp.where(cache.valid, cache.positions + 1, 0), axis=-1)
    positions = default_positions(attention_mask, start)
  if adapter is not None:
    adapter_lib.validate(adapter, cfg, batch)

  if cache is not None:
    index = cache.length
    k_positions = jax.lax.dynamic_update_slice(cache.positions, positions.astype(jnp.int32), (0, index))
    k_valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, index))
  else:
    index, k_positions, k_valid = None, positions, attention_mask

  def tables(spec, window):
    cos, sin = rope.cos_sin(spec, cfg.head_dim, positions)
    return cos, sin, None if blocked else attention.visibility(positions, k_positions, k_valid, window)

  full = tables(cfg.rope_full, None)
  sliding = tables(cfg.rope_sliding, cfg.sliding_window) if cfg.has_sliding_layers else full
  is_sliding = np.array([t == "sliding_attention" for t in cfg.layer_types]) & cfg.has_sliding_layers
  loras = adapter_lib.layer_major(adapter)
  scale = adapter.scale if adapter is not None else None
  layer_kw = dict(tables=(full, sliding), scale=scale, cache_index=index,
                  blocks=(positions, attention_mask) if blocked else None)
  def layer(w, h, flag, lora, kv):  # arrays only in the signature: what jax.checkpoint differentiates
    return _layer(cfg, w, h, is_sliding=flag, lora=lora, cache_kv=kv, collect_kv=bool(new_cache_slots), **layer_kw)

  h = embed_tokens(weights, cfg, tokens)
  if cfg.scan_layers:
    layer = _remat(layer, cfg)

    def body(h, xs):
      new_h, kv = layer(h=h, **dict(zip(("w", "flag", "lora", "kv"), xs)))
      return new_h, (h if return_hidden_states else None, kv)
    kvs = (cache.k, cache.v) if cache is not None else None
    h, (inputs, kvs) = jax.lax.scan(body, h, (weights["layers"], jnp.asarray(is_sliding), loras, kvs))
  else:
    inputs, ks, vs = [], [], []
    for i in range(cfg.num_layers):
      take = lambda tree: jax.tree.map(lambda x: x[i], tree)
      kv = (cache.k[i], cache.v[i]) if cache is not None else None
      inputs.append(h)
      flag = bool(is_sliding[i])
      h, kv = _remat(lambda w, h, lora, kv, flag=flag: layer(w, h, flag, lora, kv), cfg)(
          take(weights["layers"]), h, take(loras), kv)
      if kv is not None:
        ks.append(kv[0])
        vs.append(kv[1])
    inputs = jnp.stack(inputs) if return_hidden_states else None
    kvs = (jnp.stack(ks), jnp.stack(vs)) if ks else None

  hidden = rms_norm(h, weights["final_norm"], cfg)
  new_cache = None
  if cache is not None:
    new_cache = KVCache(kvs[0], kvs[1], k_positions, k_valid, cache.length + length)
  elif new_cache_slots:
    new_cache = _fresh_cache(cfg, kvs, positions, attention_mask, new_cache_slots)
  return DecoderOutput(
      logits=logits_from_hidden(weights, cfg, hidden) if compute_logits else None,
      hidden=hidden,
      hidden_states=jnp.concatenate([inputs, hidden[None]]) if return_hidden_states else None,
      cache=new_cache,
  )
