"""One hashable config for every supported decoder, read from a transformers config object.

The Llama and Gemma families differ only in a handful of switches (norm offset, extra norms, soft-capping,
q/k-norm, activation, embedding scale, per-layer sliding windows and rotary bases), so one decoder
implementation reads them from here. The config is frozen and hashable: it is a static argument of every
jitted function.
"""

import dataclasses

from doc2atom_jax.errors import UserError

ADAPTER_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")

# transformers `model_type` -> decoder family.
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
GEMMA_LIKE = ("gemma2", "gemma3_text", "gemma3")
SUPPORTED_MODEL_TYPES = LLAMA_LIKE + GEMMA_LIKE


@dataclasses.dataclass(frozen=True)
class RopeSpec:
  """Rotary embedding of one layer type: base, and the frequency scaling rule (`default|linear|llama3`)."""
  theta: float
  kind: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float
  max_position_embeddings: int
  layer_types: tuple[str, ...]  # "full_attention" | "sliding_attention" per layer
  rope_full: RopeSpec
  rope_sliding: RopeSpec
  sliding_window: int | None = None
  tie_embeddings: bool = True
  attention_bias: bool = False  # Qwen2: biases on q/k/v
  qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over head_dim of q and k before rotary
  norm_offset: float = 0.0  # Gemma: RMSNorm scales by (1 + w)
  post_norms: bool = False  # Gemma 2/3: norms after attention and after the MLP too
  embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden_size)
  activation: str = "silu"  # "silu" | "gelu_tanh"
  attn_softcap: float | None = None  # Gemma 2
  final_softcap: float | None = None  # Gemma 2
  query_pre_attn_scalar: float | None = None  # Gemma: q·k scaled by this**-0.5 instead of head_dim**-0.5
  dtype: str = "float32"  # compute dtype: float32 on CPU, bfloat16 on accelerators
  param_dtype: str = "float32"
  scan_layers: bool = False
  # Cache-free passes longer than this many tokens attend in causal query blocks of this size
  # (attention.attend_causal_blocks: no [T, T] scores, the upper triangle skipped); 0 = one dense block.
  attention_block: int = 512
  remat: str = "none"  # recompute each layer in the backward pass: none | full | dots (REMAT_POLICIES)

  @property
  def family(self) -> str:
    return "gemma" if self.model_type in GEMMA_LIKE else "llama"

  @property
  def attn_scale(self) -> float:
    return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

  @property
  def has_sliding_layers(self) -> bool:
    return self.sliding_window is not None and "sliding_attention" in self.layer_types

  def target_dims(self, target: str) -> tuple[int, int]:
    """(d_in, d_out) of an adapter target's projection."""
    d, f = self.hidden_size, self.intermediate_size
    q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    dims = {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, f), "up": (d, f), "down": (f, d)}
    if target not in dims:
      raise UserError(f"unknown adapter target {target!r}; valid targets: {', '.join(ADAPTER_TARGETS)}")
    return dims[target]

  def replace(self, **kw) -> "DecoderConfig":
    return dataclasses.replace(self, **kw)


def _rope_spec(params: dict, default_theta: float) -> RopeSpec:
  kind = params.get("rope_type", params.get("type", "default")) or "default"
  theta = float(params.get("rope_theta", default_theta))
  if kind == "default":
    return RopeSpec(theta)
  if kind == "linear":
    return RopeSpec(theta, "linear", float(params["factor"]))
  if kind == "llama3":
    return RopeSpec(theta, "llama3", float(params["factor"]), float(params["low_freq_factor"]),
                    float(params["high_freq_factor"]), int(params["original_max_position_embeddings"]))
  raise UserError(f"rotary scaling {kind!r} is not supported (supported: default, linear, llama3)")


def _rope_specs(hf) -> tuple[RopeSpec, RopeSpec]:
  """transformers 5 keeps rotary settings in `rope_parameters`: flat, or one dict per layer type."""
  params = getattr(hf, "rope_parameters", None) or {}
  theta = float(getattr(hf, "rope_theta", None) or params.get("rope_theta", 10000.0))
  if "full_attention" in params or "sliding_attention" in params:
    full = _rope_spec(params.get("full_attention", {}), theta)
    return full, _rope_spec(params.get("sliding_attention", params.get("full_attention", {})), theta)
  spec = _rope_spec(params, theta)
  return spec, spec


def _layer_types(hf, num_layers: int) -> tuple[str, ...]:
  types = getattr(hf, "layer_types", None)
  if types:
    return tuple(types)[:num_layers]
  # Mistral (v0.1) applies its sliding window to every layer and has no layer_types.
  if hf.model_type == "mistral" and getattr(hf, "sliding_window", None):
    return ("sliding_attention",) * num_layers
  return ("full_attention",) * num_layers


def from_hf_config(hf, **overrides) -> DecoderConfig:
  """Builds a DecoderConfig from a transformers PretrainedConfig (Llama/Mistral/Qwen2/Qwen3/Gemma2/Gemma3)."""
  model_type = hf.model_type
  if model_type == "gemma3":  # multimodal wrapper: the decoder lives in text_config
    hf = hf.text_config
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise UserError(f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
  gemma = model_type in GEMMA_LIKE
  num_layers = hf.num_hidden_layers
  head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
  layer_types = _layer_types(hf, num_layers)
  window = getattr(hf, "sliding_window", None) if "sliding_attention" in layer_types else None
  if model_type == "qwen2" and not getattr(hf, "use_sliding_window", False):
    layer_types, window = ("full_attention",) * num_layers, None
  rope_full, rope_sliding = _rope_specs(hf)
  act = getattr(hf, "hidden_activation", None) or getattr(hf, "hidden_act", "silu")
  if act not in ("silu", "gelu_pytorch_tanh", "gelu_tanh"):
    raise UserError(f"activation {act!r} is not supported (silu, gelu_pytorch_tanh)")
  cfg = DecoderConfig(
      model_type=model_type,
      vocab_size=hf.vocab_size,
      hidden_size=hf.hidden_size,
      intermediate_size=hf.intermediate_size,
      num_layers=num_layers,
      num_heads=hf.num_attention_heads,
      num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
      head_dim=head_dim,
      rms_norm_eps=float(hf.rms_norm_eps),
      max_position_embeddings=int(getattr(hf, "max_position_embeddings", 8192)),
      layer_types=layer_types,
      rope_full=rope_full,
      rope_sliding=rope_sliding,
      sliding_window=int(window) if window else None,
      tie_embeddings=bool(getattr(hf, "tie_word_embeddings", gemma)),
      attention_bias=bool(getattr(hf, "attention_bias", False)) or model_type == "qwen2",
      qk_norm=model_type in ("qwen3", "gemma3_text"),
      norm_offset=1.0 if gemma else 0.0,
      post_norms=gemma,
      embed_scale=gemma,
      activation="silu" if act == "silu" else "gelu_tanh",
      attn_softcap=getattr(hf, "attn_logit_softcapping", None),
      final_softcap=getattr(hf, "final_logit_softcapping", None),
      query_pre_attn_scalar=getattr(hf, "query_pre_attn_scalar", None) if gemma else None,
  )
  return cfg.replace(**overrides)


def kv_cache_bytes(cfg: DecoderConfig, num_tokens: int, bytes_per_value: int = 2) -> int:
  """Bytes of the K and V cache for `num_tokens` tokens (the in-context memory reference)."""
  return 2 * cfg.num_layers * num_tokens * cfg.num_kv_heads * cfg.head_dim * bytes_per_value

