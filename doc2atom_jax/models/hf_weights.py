"""Hugging Face checkpoint <-> our stacked weight layout, as one small table per family.

HF stores `[out, in]` matrices per layer under `model.layers.N.<module>.weight`; we store `[in, out]`
kernels stacked on a leading layer axis. The tables below are the whole mapping.
"""

import json
import pathlib

import numpy as np

from doc2atom_jax.errors import UserError
from doc2atom_jax.models.config import DecoderConfig

# our per-layer name -> (HF name inside a layer, transpose to [in, out])
_COMMON = {
    "q": ("self_attn.q_proj.weight", True),
    "k": ("self_attn.k_proj.weight", True),
    "v": ("self_attn.v_proj.weight", True),
    "o": ("self_attn.o_proj.weight", True),
    "gate": ("mlp.gate_proj.weight", True),
    "up": ("mlp.up_proj.weight", True),
    "down": ("mlp.down_proj.weight", True),
    "q_bias": ("self_attn.q_proj.bias", False),
    "k_bias": ("self_attn.k_proj.bias", False),
    "v_bias": ("self_attn.v_proj.bias", False),
    "q_norm": ("self_attn.q_norm.weight", False),
    "k_norm": ("self_attn.k_norm.weight", False),
    "attn_norm": ("input_layernorm.weight", False),
}
LAYER_TABLES = {
    "llama": _COMMON | {"mlp_norm": ("post_attention_layernorm.weight", False)},
    "gemma": _COMMON | {
        "post_attn_norm": ("post_attention_layernorm.weight", False),
        "mlp_norm": ("pre_feedforward_layernorm.weight", False),
        "post_mlp_norm": ("post_feedforward_layernorm.weight", False),
    },
}
_TOP = {"embed": ("embed_tokens.weight", False), "final_norm": ("norm.weight", False)}


def _decoder_prefix(names) -> str:
  """'model.' for *ForCausalLM, 'model.language_model.' for multimodal Gemma 3 checkpoints, ..."""
  for name in names:
    if name.endswith("embed_tokens.weight"):
      return name[: -len("embed_tokens.weight")]
  raise UserError("checkpoint has no '*embed_tokens.weight': not a supported decoder checkpoint")


def from_hf_state_dict(state: dict, cfg: DecoderConfig) -> dict:
  """HF tensors (name -> array) -> our weight pytree (numpy, float32). Unknown names are ignored."""
  from doc2atom_jax.models.decoder import param_specs  # local: avoids an import cycle

  specs = param_specs(cfg)
  prefix = _decoder_prefix(state)
  table = LAYER_TABLES[cfg.family]

  def fetch(name, transpose):
    if name not in state:
      raise UserError(f"checkpoint is missing tensor {name!r}")
    x = np.asarray(state[name], np.float32)
    return x.T if transpose else x

  weights = {ours: fetch(prefix + hf, t) for ours, (hf, t) in _TOP.items()}
  if "lm_head" in specs:
    lm_head = "lm_head.weight" if "lm_head.weight" in state else prefix.replace("model.", "", 1) + "lm_head.weight"
    weights["lm_head"] = fetch(lm_head, True)
  weights["layers"] = {}
  for ours in specs["layers"]:
    hf, transpose = table[ours]
    weights["layers"][ours] = np.stack(
        [fetch(f"{prefix}layers.{i}.{hf}", transpose) for i in range(cfg.num_layers)])
  return weights


def to_hf_state_dict(weights: dict, cfg: DecoderConfig, prefix: str = "model.") -> dict:
  """Our weight pytree -> HF tensor names (numpy), the inverse of `from_hf_state_dict`."""
  table = LAYER_TABLES[cfg.family]
  state = {prefix + hf: np.asarray(weights[ours]) for ours, (hf, _) in _TOP.items()}
  if "lm_head" in weights:
    state["lm_head.weight"] = np.asarray(weights["lm_head"]).T
  for ours, stacked in weights["layers"].items():
    hf, transpose = table[ours]
    for i in range(cfg.num_layers):
      x = np.asarray(stacked[i])
      state[f"{prefix}layers.{i}.{hf}"] = x.T if transpose else x
  return state


def safetensors_files(folder: pathlib.Path) -> list[pathlib.Path]:
  """The checkpoint's safetensors files (sharded via the index, or one file); checks they all exist."""
  index = folder / "model.safetensors.index.json"
  if index.exists():
    try:
      names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError) as e:
      raise UserError(f"{index}: unreadable safetensors index ({e})") from None
    files = [folder / n for n in names]
  else:
    files = sorted(folder.glob("*.safetensors"))
  if not files:
    raise UserError(f"{folder}: no *.safetensors weights (only safetensors checkpoints are supported)")
  missing = [f.name for f in files if not f.exists()]
  if missing:
    raise UserError(f"{folder}: checkpoint is incomplete, missing {', '.join(missing)}")
  return files


def read_safetensors(folder: pathlib.Path) -> dict:
  """All tensors of a folder's checkpoint as arrays (safetensors' flax loader: bfloat16 is kept)."""
  from safetensors import SafetensorError
  from safetensors.flax import load_file

  state = {}
  for f in safetensors_files(folder):
    try:
      state |= load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
      raise UserError(f"{f}: cannot read safetensors (truncated or corrupt?): {e}") from None
  return state

