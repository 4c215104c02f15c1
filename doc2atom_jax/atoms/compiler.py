"""The atom compiler: a Perceiver-style hypernetwork from an atom's hidden states to its codes and key.

Per layer l, `n_t * r` learned latent queries (one per target and rank row, plus layer, type and target
embeddings) cross-attend to the atom's span states at the *input* of layer l; residual MLP blocks and a
parameter-free RMS normalization give **codes** `[L, n_t, r, c]`. A per-layer linear head maps a code row to
one row of `A [d_in]` and one of `B [d_out]`, times learned per-layer, per-target scalers (B's map starts at 0, so a
fresh compiler changes nothing, as a fresh LoRA). The head is linear and the code is its exact input, so
an atom is *stored* as its codes and materialized at composition time (`compose.py`): L·n_t·r·c numbers
instead of L·n_t·r·(d_in + d_out).

Choices the design leaves open, and why:
- Span states are standardized per layer and feature by the base model's own statistics
  (`encode.calibration_statistics`, held here as frozen `state_mean`/`state_scale`, shared with the router's
  question features), then RMS-normalized (no gain) before the input projection: raw states share massive
  features and a common direction, and their scale grows ~10-100x from the first to the last layer; one
  shared projection must read what distinguishes one atom from another at every layer.
- The code is the normalized sum of what the attention blocks read from the span; the queries (latents,
  layer, type and target embeddings) only choose where to read. Queries, and MLPs of them, are the same
  for every atom: wherever they reached the code they dominated it, and trained atoms all wrote one
  direction (B rows of different atoms at cosine 0.997) — the atoms became one shared adapter.
- The copy path (`copy_dim` > 0): the last `copy_dim` code entries are an attention-weighted mean of the
  span's token embeddings in a frozen basis of the embedding matrix, and the head maps them straight back
  into the residual stream (B rows of `down`/`o`), scaled per layer by learned gains that start at 0. Facts
  are mostly names and numbers the base model cannot know, and saying one means pushing the residual stream
  toward its embedding. Without this path, B rows of an atom's own document and of another document scored
  the same held-out KL under oracle routing at 100 and 300 steps (the atoms wrote one shared adapter); a
  hand-built copy adapter (the gold answer's embedding as B, one shared A) fitted on 4 training documents
  took held-out KL from 3.45 to 2.56, and 3.63 with another question's answer.
- The key reads the masked mean of the span at one middle layer (`key_layer`), the same layer the router
  reads for the question, so question and atom features come from one representation; a small MLP, a
  type embedding and L2 normalization follow. Type logits share the MLP's hidden layer.
- The null atom and the always-on default adapter are learned codes passed through the same head, so
  every adapter in the system has one parameterization and one storage form.
- The Doc-to-LoRA baseline is this module with `rank=8` applied to whole documents or fixed-length chunks
  instead of atoms (DESIGN §3, §13): one trunk, so the budgets compare.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from doc2atom_jax.atoms.atomize import ATOM_TYPES


STATISTICS = ("state_mean", "state_scale", "copy_basis")  # frozen: set from the base model, never trained
RESIDUAL_TARGETS = ("down", "o")  # targets that write into the residual stream: where the copy path adds


@dataclasses.dataclass(frozen=True)
class CompilerConfig:
  num_layers: int  # L of the base model
  hidden_size: int  # d of the base model
  target_dims: tuple[tuple[int, int], ...]  # (d_in, d_out) per target
  targets: tuple[str, ...] = ("down",)
  rank: int = 1  # r: micro rank per atom (8 for the d2l baseline)
  code_dim: int = 256  # c
  width: int = 256  # trunk width
  num_blocks: int = 2  # cross-attention + MLP blocks (Doc-to-LoRA: 9 x 512)
  num_heads: int = 4
  mlp_ratio: int = 2
  key_dim: int = 128
  key_layer: int = -1  # layer whose input states give keys and router features; -1 = L // 2
  default_rank: int = 2  # rank of the always-on default ("bias") adapter; 0 disables it
  num_types: int = len(ATOM_TYPES)
  alpha: float = 2.0  # fixed adapter scale (per atom rank)
  copy_dim: int = 0  # code entries that carry the copied span tokens (the copy path); 0 = off
  copy_gain_scale: float = 40.0  # gains are stored /scale: Adam (~lr a step) moves them ~scale*lr a step
  shared_head: bool = False  # one code -> (A, B) map for every layer (the per-layer scalers still differ)
  # Keys and queries add a linear path, (pooled - centre) @ P, to their MLPs (whose last layers start at 0):
  # they start as the frozen model's centred cosine, which routes better than a trained MLP alone on worlds it
  # was not trained on (docs/method.md), and training refines it. False: the MLP alone (exports before it).
  route_skip: bool = True

  def __post_init__(self):
    if not 0 <= self.copy_dim < self.code_dim:
      raise ValueError(f"copy_dim must be in [0, code_dim) (got {self.copy_dim}, code_dim {self.code_dim})")

  @property
  def layer_for_keys(self) -> int:
    return self.key_layer if self.key_layer >= 0 else self.num_layers // 2

  @property
  def num_targets(self) -> int:
    return len(self.targets)


def config_for(model_cfg, **overrides) -> CompilerConfig:
  """A CompilerConfig sized for a base model's DecoderConfig."""
  targets = overrides.pop("targets", ("down",))
  return CompilerConfig(num_layers=model_cfg.num_layers, hidden_size=model_cfg.hidden_size,
                        target_dims=tuple(model_cfg.target_dims(t) for t in targets), targets=tuple(targets),
                        **overrides)


def _param(rng, shape, axes, std=None, value=None):
  if value is None:
    value = jax.random.normal(rng, shape, jnp.float32) * (std if std is not None else 1.0 / math.sqrt(shape[-2]))
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def _rms(x, eps=1e-6):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def _layer_norm(x, scale, eps=1e-6):
  x = x - jnp.mean(x, axis=-1, keepdims=True)
  return _rms(x, eps) * (1.0 + scale)


def masked_mean(states, mask):
  """Mean over the token axis (-2) of states [..., S, d] where mask [..., S] is True."""
  weight = mask.astype(states.dtype)[..., None]
  return jnp.sum(states * weight, axis=-2) / jnp.maximum(jnp.sum(weight, axis=-2), 1.0)


def pooled(states, mask):
  """What keys and queries read of standardized key-layer states [..., S, d]: the masked mean of their RMS
  normalization [..., d]."""
  return masked_mean(_rms(states.astype(jnp.float32)), mask)


class AtomCompiler(nnx.Module):
  """Span states -> (codes, key, type logits); also holds the head, the null atom and the default adapter."""

  def __init__(self, cfg: CompilerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    L, d, w, c, r, nt = cfg.num_layers, cfg.hidden_size, cfg.width, cfg.code_dim, cfg.rank, cfg.num_targets
    nb, f = cfg.num_blocks, cfg.width * cfg.mlp_ratio
    key = lambda: rngs.params()
    zeros = lambda *shape: jnp.zeros(shape, jnp.float32)
    # Trunk.
    self.in_proj = _param(key(), (d, w), ("embed", "width"))
    self.latents = _param(key(), (nt, r, w), ("targets", "rank", "width"), std=1.0)
    self.layer_emb = _param(key(), (L, w), ("layers", "width"), std=1.0)
    self.type_emb = _param(key(), (cfg.num_types, w), ("types", "width"), std=1.0)
    self.target_emb = _param(key(), (nt, w), ("targets", "width"), std=1.0)
    self.blocks = nnx.data({
        "q_norm": _param(None, (nb, w), ("blocks", "width"), value=zeros(nb, w)),
        "kv_norm": _param(None, (nb, w), ("blocks", "width"), value=zeros(nb, w)),
        "wq": _param(key(), (nb, w, w), ("blocks", "width", "width_out")),
        "wk": _param(key(), (nb, w, w), ("blocks", "width", "width_out")),
        "wv": _param(key(), (nb, w, w), ("blocks", "width", "width_out")),
        "wo": _param(key(), (nb, w, w), ("blocks", "width", "width_out")),
        "mlp_norm": _param(None, (nb, w), ("blocks", "width"), value=zeros(nb, w)),
        "w1": _param(key(), (nb, w, f), ("blocks", "width", "mlp")),
        "w2": _param(key(), (nb, f, w), ("blocks", "mlp", "width")),
    })
    self.out_norm = _param(None, (w,), ("width",), value=zeros(w))
    cc = cfg.copy_dim
    self.code_proj = _param(key(), (w, c - cc), ("width", "code"))
    if cc:  # The copy path: which span tokens to copy (per target and rank row), the basis, per-layer gains.
      self.copy_query = _param(key(), (nt, r, d), ("targets", "rank", "embed"), std=0.5 / math.sqrt(d))
      self.copy_basis = _param(None, (d, cc), ("embed", "code"), value=jnp.eye(d, cc))
      self.copy_gain = _param(None, (L, nt), ("layers", "targets"), value=zeros(L, nt))
    # Head: per layer and target, a linear map code -> one row of A and one of B, plus per-rank scalers.
    # The maps are stored at the trunk's scale (entries ~ 1/sqrt(c)) and multiplied by a fixed 1/sqrt(d) in
    # `head()`: Adam moves every entry by ~lr, so maps stored at their output scale (~1/sqrt(c·d)) would
    # change by ~60% a step. A's rows start ~ N(0, 1/d_in) given unit-RMS codes (LoRA's scale); B's map starts
    # at 0 with its scaler at 1, as a LoRA's B: a fresh compiler changes nothing, yet the first gradient
    # already reaches B's map (a 0 scaler in front of a random map would leave it in a saddle).
    # A shared head is one map for every layer (its first axis has size 1, never sharded): 1/L of the
    # parameters (per-layer heads are ~90% of a CPU-sized compiler's), and every layer's gradient trains it.
    lh, layers = (1, None) if cfg.shared_head else (L, "layers")
    self.head_a = nnx.data([_param(key(), (lh, c, di), (layers, "code", "adapter_in"))
                            for di, _ in cfg.target_dims])
    self.head_b = nnx.data([_param(None, (lh, c, do), (layers, "code", "adapter_out"), value=zeros(lh, c, do))
                            for _, do in cfg.target_dims])
    self.scale_a = _param(None, (L, nt, 1), ("layers", "targets", None), value=jnp.ones((L, nt, 1)))
    self.scale_b = _param(None, (L, nt, 1), ("layers", "targets", None), value=jnp.ones((L, nt, 1)))
    # The base model's state statistics (identity until `set_statistics`; frozen: read under stop_gradient).
    self.state_mean = _param(None, (L, d), ("layers", "embed"), value=zeros(L, d))
    self.state_scale = _param(None, (L, d), ("layers", "embed"), value=jnp.ones((L, d)))
    # Keys and types.
    self.key_w1 = _param(key(), (d, w), ("embed", "width"))
    if cfg.route_skip:
      self.key_w2 = _param(None, (w, cfg.key_dim), ("width", "key"), value=zeros(w, cfg.key_dim))
      self.key_center = _param(None, (d,), ("embed",), value=zeros(d))
      self.key_skip = _param(None, (d, cfg.key_dim), ("embed", "key"), value=route_projection(d, cfg.key_dim))
    else:
      self.key_w2 = _param(key(), (w, cfg.key_dim), ("width", "key"))
    self.key_type = _param(key(), (cfg.num_types, cfg.key_dim), ("types", "key"), std=0.1)
    self.type_head = _param(key(), (w, cfg.num_types), ("width", "types"))
    # The null atom (abstain) and the always-on default adapter, as codes.
    self.null_codes = _param(key(), (L, nt, r, c), ("layers", "targets", "rank", "code"), std=1.0)
    self.null_key = _param(key(), (cfg.key_dim,), ("key",), std=1.0)
    if cfg.default_rank:
      self.default_codes = _param(key(), (L, nt, cfg.default_rank, c), ("layers", "targets", "rank", "code"), std=1.0)

  def set_statistics(self, mean, scale):
    """Per-layer feature mean and inverse spread [L, d] of the base model's states (from calibration)."""
    self.state_mean.value = jnp.asarray(mean, jnp.float32)
    self.state_scale.value = jnp.asarray(scale, jnp.float32)

  def set_copy_basis(self, basis):
    """Orthonormal columns [d, copy_dim]: the directions of the token embeddings kept by the copy path."""
    self.copy_basis.value = jnp.asarray(basis, jnp.float32)

  def standardize(self, states, layers=None):
    """States [L', ..., d] of `layers` (default: all, in order) centred and scaled by the frozen statistics."""
    mean, scale = jax.lax.stop_gradient(self.state_mean[...]), jax.lax.stop_gradient(self.state_scale[...])
    if layers is not None:
      mean, scale = mean[jnp.asarray(layers)], scale[jnp.asarray(layers)]
    shape = (mean.shape[0],) + (1,) * (states.ndim - 2) + (mean.shape[1],)
    return (states.astype(jnp.float32) - mean.reshape(shape)) * scale.reshape(shape)

  # -- trunk --------------------------------------------------------------------------------------------
  def _block(self, b: int, h, ctx, ctx_mask):
    """Latents h [..., Q, w] cross-attend to context ctx [..., S, w]; then a residual MLP.

    Returns the updated latents and what the attention read from the context (`read`, [..., Q, w]).
    """
    p = {k: v[b] for k, v in self.blocks.items()}
    heads, w = self.cfg.num_heads, self.cfg.width
    split = lambda x: x.reshape(*x.shape[:-1], heads, w // heads)
    q = split(_layer_norm(h, p["q_norm"]) @ p["wq"])
    kv_in = _layer_norm(ctx, p["kv_norm"])
    k, v = split(kv_in @ p["wk"]), split(kv_in @ p["wv"])
    scores = jnp.einsum("...qhd,...shd->...hqs", q, k) / math.sqrt(w // heads)
    scores = jnp.where(ctx_mask[..., None, None, :], scores, -1e30)
    att = jnp.einsum("...hqs,...shd->...qhd", jax.nn.softmax(scores, axis=-1), v)
    read = att.reshape(*att.shape[:-2], w) @ p["wo"]
    h = h + read
    return h + jax.nn.gelu(_layer_norm(h, p["mlp_norm"]) @ p["w1"]) @ p["w2"], read

  def codes(self, span_states, span_mask, types):
    """span_states [L, N, S, d] (inputs of each layer), span_mask [N, S], types [N] -> codes [N, L, n_t, r, c]."""
    cfg = self.cfg
    L, N = span_states.shape[:2]
    ctx = _rms(self.standardize(span_states)) @ self.in_proj[...]  # [L, N, S, w]: span content only
    queries = (self.latents[...][None, None] + self.target_emb[...][None, None, :, None]
               + self.layer_emb[...][:, None, None, None] + self.type_emb[...][types][None, :, None, None])
    h = queries.reshape(L, N, cfg.num_targets * cfg.rank, cfg.width)  # [L, N, Q, w]
    mask = jnp.broadcast_to(span_mask[None], (L, *span_mask.shape))
    readout = 0.0
    for b in range(cfg.num_blocks):
      h, read = self._block(b, h, ctx, mask)
      readout = readout + read
    # The code is what the attention read from the span (the queries only choose where to read): the
    # queries and anything computed from them alone are the same for every atom, and in the code they
    # dominated, so trained atoms all wrote one direction (B rows of different atoms at cosine 0.997).
    codes = _rms(_layer_norm(readout, self.out_norm[...]) @ self.code_proj[...])
    codes = codes.reshape(L, N, cfg.num_targets, cfg.rank, cfg.code_dim - cfg.copy_dim)
    if cfg.copy_dim:
      copied = jnp.broadcast_to(self._copied(span_states, span_mask)[None], (L, *codes.shape[1:-1], cfg.copy_dim))
      codes = jnp.concatenate([codes, copied], axis=-1)
    return jnp.moveaxis(codes, 1, 0)

  def _copied(self, span_states, span_mask):
    """The copy path's code entries [N, n_t, r, copy_dim]: an attention-weighted mean of the span's token
    embeddings (the input of layer 0), in the frozen basis of the embedding matrix, unit RMS.

    A document's facts are mostly names and numbers the base model cannot know; an adapter that makes the
    model say one must push the residual stream toward that token's embedding (SmolLM2 ties input and output
    embeddings). The trunk would have to learn that copy map through five random matrices; here it is the
    head's fixed part (`head`), scaled per layer by learned gains that start at 0, and training only learns
    *which* span tokens to copy (the queries read the key layer's standardized states).
    """
    layer = self.cfg.layer_for_keys
    where = _rms(self.standardize(span_states[layer][None], (layer,))[0])  # [N, S, d]
    scores = jnp.einsum("nsd,trd->ntrs", where, self.copy_query[...])
    scores = jnp.where(span_mask[:, None, None, :], scores, -1e30)
    tokens = _rms(span_states[0].astype(jnp.float32))  # [N, S, d]
    copied = jnp.einsum("ntrs,nsd->ntrd", jax.nn.softmax(scores, axis=-1), tokens)
    return _rms(copied @ jax.lax.stop_gradient(self.copy_basis[...]))

  def keys(self, key_layer_states, span_mask, types):
    """Standardized states of the key layer [N, S, d] -> (normalized keys [N, d_k], type logits [N, n_types])."""
    return self.keys_from_pooled(pooled(key_layer_states, span_mask), types)

  def keys_from_pooled(self, pooled_states, types):
    """`pooled` span states [N, d] -> (normalized keys [N, d_k], type logits [N, n_types]). The pooled states
    are constants of the frozen model: routing pre-training (train/route_pretrain.py) caches them."""
    hidden = jax.nn.gelu(pooled_states @ self.key_w1[...])
    keys = hidden @ self.key_w2[...] + self.key_type[...][types]
    if self.cfg.route_skip:
      keys = keys + (pooled_states - self.key_center[...]) @ self.key_skip[...]
    return _l2(keys), hidden @ self.type_head[...]

  def __call__(self, span_states, span_mask, types):
    """Compiles N atoms at once: (codes [N, L, n_t, r, c], keys [N, d_k], type logits [N, n_types])."""
    codes = self.codes(span_states, span_mask, types)
    layer = self.cfg.layer_for_keys
    keys, type_logits = self.keys(self.standardize(span_states[layer][None], (layer,))[0], span_mask, types)
    return codes, keys, type_logits

  def null(self):
    """(codes [L, n_t, r, c], normalized key [d_k]) of the null atom."""
    return self.null_codes[...], _l2(self.null_key[...])

  def head(self) -> dict:
    """The linear head as a pytree for `compose`: per-target A/B maps and scalers."""
    cfg = self.cfg
    per_layer = lambda h: jnp.broadcast_to(h[...], (cfg.num_layers, *h.shape[1:]))  # a shared head: [1, c, x]
    b = [per_layer(h) * do ** -0.5 for h, (_, do) in zip(self.head_b, cfg.target_dims)]
    if cfg.copy_dim:  # B += gain[l, t] * basis @ (copied entries) / sqrt(copy_dim): |B| ~ gain for unit-RMS codes
      basis = jax.lax.stop_gradient(self.copy_basis[...]).T / math.sqrt(cfg.copy_dim)  # [copy_dim, d]
      copy_map = jnp.concatenate([jnp.zeros((cfg.code_dim - cfg.copy_dim, cfg.hidden_size)), basis])  # [c, d]
      gain = self.copy_gain[...] * cfg.copy_gain_scale  # [L, n_t]
      b = [bt + gain[:, t, None, None] * copy_map if name in RESIDUAL_TARGETS else bt
           for t, (bt, name) in enumerate(zip(b, cfg.targets))]
    return {"a": [per_layer(h) * di ** -0.5 for h, (di, _) in zip(self.head_a, cfg.target_dims)], "b": b,
            "scale_a": self.scale_a[...], "scale_b": self.scale_b[...]}


def route_projection(d: int, key_dim: int, seed: int = 0):
  """The fixed orthonormal projection [d, key_dim] both the keys' and the queries' linear paths start from (the
  same for both, so a fresh router scores the cosine of centred frozen features, up to the projection)."""
  q, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(seed), (d, max(d, key_dim)), jnp.float32))
  return q[:, :key_dim] * math.sqrt(d / key_dim)  # norms kept: |x P| ~ |x|


def _l2(x, eps=1e-6):
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)
