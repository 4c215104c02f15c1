"""A composed adapter <-> Hugging Face PEFT's LoRA layout, so other stacks (PEFT, vLLM, ...) can load it.

PEFT stores per adapted module `lora_A.weight [r, d_in]` and `lora_B.weight [d_out, r]` and adds
`(lora_alpha / r) · lora_B @ lora_A` to the `[out, in]` weight. Our hook adds `scale · bᵀ a` in that layout
(`a [r, d_in]`, `b [r, d_out]` per example and layer, see `models/adapter.py`), so

    lora_A = a[example, l]    lora_B = b[example, l]ᵀ    lora_alpha = scale · r   (PEFT's scaling = scale)

`scale` is one number per example (a scalar, or the example's entry of a per-example [batch] scale), so it
always fits in `lora_alpha`; only a scale ≤ 0 (which some loaders reject as an alpha) is folded into lora_B,
with `lora_alpha = r`. Targets of different ranks are zero-padded to the largest (exact: zero rows of A
meet zero columns of B), so the file has one `r` and no `rank_pattern`. Tensors are float32.

Module names come from `hf_weights.LAYER_TABLES` (the same for the Llama and Gemma families), keys as PEFT's
`save_pretrained` writes them for a *ForCausalLM:
`base_model.model.model.layers.{i}.{self_attn.q_proj|...|mlp.down_proj}.lora_{A|B}.weight`.
"""

import json
import math
import pathlib
import re

import jax.numpy as jnp
import numpy as np

from doc2atom_jax import fileio
from doc2atom_jax.errors import UserError
from doc2atom_jax.models import adapter as adapter_lib
from doc2atom_jax.models import hf_weights
from doc2atom_jax.models.config import ADAPTER_TARGETS, DecoderConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."  # PeftModel.base_model (LoraModel) -> .model (the wrapped *ForCausalLM)
_KEY = re.compile(r"^base_model\.model\.(?P<prefix>(?:[\w]+\.)*?)layers\.(?P<layer>\d+)\."
                  r"(?P<module>[\w.]+?)\.lora_(?P<ab>[AB])\.weight$")


def _modules(cfg: DecoderConfig) -> dict[str, str]:
  """Our target name -> the HF module path inside a layer ("down" -> "mlp.down_proj")."""
  table = hf_weights.LAYER_TABLES[cfg.family]
  return {t: table[t][0].removesuffix(".weight") for t in ADAPTER_TARGETS}


def _example_scale(scale, example: int, batch: int) -> float:
  s = np.asarray(scale, np.float64)
  if s.ndim == 1:
    if s.shape[0] != batch:
      raise UserError(f"adapter scale has {s.shape[0]} entries for a batch of {batch}")
    s = s[example]
  elif s.ndim != 0:
    raise UserError(f"adapter scale must be a scalar or one value per example, got shape {s.shape}")
  s = float(s)
  if not math.isfinite(s):
    raise UserError(f"adapter scale of example {example} is {s}: cannot export a non-finite adapter")
  return s


def _number(x: float):
  """An integral float as int (tools that read `lora_alpha` as an int), else the float."""
  return int(x) if float(x).is_integer() else float(x)


def write_peft_adapter(folder, adapter: adapter_lib.Adapter, model_config: DecoderConfig, *, example: int = 0,
                       base_model_name_or_path: str = "", module_prefix: str = "model.") -> pathlib.Path:
  """Writes example `example` of a (batched) adapter as `adapter_model.safetensors` + `adapter_config.json`.

  Load it with `peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)`.
  `module_prefix` is where the decoder's layers sit in the HF model: "model." for *ForCausalLM (a multimodal
  Gemma 3 would need "model.language_model."). Each file is replaced atomically; an old adapter_config.json
  is removed first and the new one written last, so a folder with a config always has its weights.
  Returns the folder.
  """
  if not adapter.factors:
    raise UserError("the adapter has no targets: nothing to export")
  batch = next(iter(adapter.factors.values())).a.shape[0]
  adapter_lib.validate(adapter, model_config, batch)
  if not 0 <= example < batch:
    raise UserError(f"example {example} is out of range for an adapter batch of {batch}")
  scale = _example_scale(adapter.scale, example, batch)
  rank = max(lora.a.shape[2] for lora in adapter.factors.values())
  if scale > 0:
    lora_alpha, fold = _number(scale * rank), 1.0
  else:
    lora_alpha, fold = rank, scale

  modules = _modules(model_config)
  tensors = {}
  for target in ADAPTER_TARGETS:  # a fixed order: the same adapter always gives the same bytes
    if target not in adapter.factors:
      continue
    lora = adapter.factors[target]
    a = np.asarray(lora.a[example], np.float32)  # [L, r_t, d_in]
    b = np.asarray(lora.b[example], np.float32) * np.float32(fold)  # [L, r_t, d_out]
    pad = ((0, 0), (0, rank - a.shape[1]), (0, 0))
    a, b = np.pad(a, pad), np.pad(b, pad)
    for i in range(model_config.num_layers):
      key = f"{_PEFT_PREFIX}{module_prefix}layers.{i}.{modules[target]}"
      tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(a[i])
      tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(b[i].T)

  config = {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model_name_or_path or None,
      "r": rank,
      "lora_alpha": lora_alpha,
      "target_modules": [modules[t].rsplit(".", 1)[-1] for t in ADAPTER_TARGETS if t in adapter.factors],
      "lora_dropout": 0.0,
      "bias": "none",
      "fan_in_fan_out": False,
      "use_rslora": False,
      "use_dora": False,
      "lora_bias": False,
      "modules_to_save": None,
      "layers_to_transform": None,
      "layers_pattern": None,
      "rank_pattern": {},
      "alpha_pattern": {},
      "init_lora_weights": True,
      "inference_mode": True,
      "revision": None,
  }
  from safetensors.numpy import save

  folder = pathlib.Path(folder).expanduser()
  try:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).unlink(missing_ok=True)
  except OSError as e:
    raise UserError(f"cannot write a PEFT adapter to {folder}: {e.strerror or e}") from None
  with fileio.atomic_open(folder / WEIGHTS_NAME, "wb") as f:
    f.write(save(tensors, metadata={"format": "pt"}))
  fileio.atomic_write_text(folder / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
  return folder


def _pattern_value(patterns: dict, module_key: str, default):
  """PEFT's rank_pattern/alpha_pattern lookup (`peft.utils.other.get_pattern_key`): first key matching the end."""
  for pattern, value in patterns.items():
    if re.match(rf"(.*\.)?({pattern})$", module_key):
      return value
  return default


def _read_config(path: pathlib.Path) -> dict:
  try:
    config = json.loads(fileio.read_text(path))
  except ValueError as e:
    raise UserError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(config, dict):
    raise UserError(f"{path}: expected a JSON object")
  if config.get("peft_type") != "LORA":
    raise UserError(f"{path}: peft_type is {config.get('peft_type')!r}; only LoRA adapters (\"LORA\") can be read")
  for flag, what in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out (Conv1D) weights"),
                     ("lora_bias", "LoRA biases")):
    if config.get(flag):
      raise UserError(f"{path}: {what} are not supported by this model's adapter hook")
  if config.get("bias", "none") != "none":
    raise UserError(f"{path}: bias={config['bias']!r} is not supported (only \"none\")")
  for field in ("r", "lora_alpha"):
    if not isinstance(config.get(field), (int, float)) or isinstance(config.get(field), bool):
      raise UserError(f"{path}: {field!r} must be a number, got {config.get(field)!r}")
  return config


def read_peft_adapter(folder, model_config: DecoderConfig) -> adapter_lib.Adapter:
  """Reads a PEFT LoRA folder as an adapter for `model_config` (batch of 1), e.g. to check an export.

  Honours `r`, `lora_alpha`, `use_rslora`, `rank_pattern` and `alpha_pattern`. When every module has the
  same scaling it becomes the adapter's scale; otherwise each module's scaling is folded into b and the
  scale is 1. Layers a `layers_to_transform` (or regex `target_modules`) adapter leaves out get zero factors.
  """
  folder = pathlib.Path(folder).expanduser()
  if not folder.is_dir():
    raise UserError(f"PEFT adapter folder not found: {folder}")
  missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / n).is_file()]
  if missing:
    hint = " (adapter_model.bin is not supported: re-save with safe_serialization=True)" if (
        WEIGHTS_NAME in missing and (folder / "adapter_model.bin").exists()) else ""
    raise UserError(f"{folder} is not a PEFT LoRA adapter folder: missing {', '.join(missing)}{hint}")
  config = _read_config(folder / CONFIG_NAME)

  modules = _modules(model_config)
  target_of = {m: t for t, m in modules.items()}
  leaves = {m.rsplit(".", 1)[-1] for m in modules.values()}
  declared = config.get("target_modules")
  if isinstance(declared, list):
    foreign = sorted({str(m).rsplit(".", 1)[-1] for m in declared} - leaves)
    if foreign:
      raise UserError(f"{folder}: adapter targets {', '.join(foreign)}, which this model's adapter hook does not "
                      f"have (supported: {', '.join(sorted(leaves))})")

  from safetensors import SafetensorError
  from safetensors.flax import load_file

  try:
    state = load_file(str(folder / WEIGHTS_NAME))
  except (SafetensorError, OSError, ValueError) as e:
    raise UserError(f"{folder / WEIGHTS_NAME}: cannot read safetensors (truncated or corrupt?): {e}") from None

  entries, prefixes, unknown = {}, set(), []
  for name, value in state.items():
    m = _KEY.match(name)
    if m is None or m["module"] not in target_of:
      unknown.append(m["module"] if m else name)
      continue
    prefixes.add(m["prefix"])
    entries.setdefault((target_of[m["module"]], int(m["layer"])), {})[m["ab"]] = np.asarray(value, np.float32)
  if unknown:
    raise UserError(f"{folder}: adapter has tensors for modules this model's adapter hook does not have: "
                    f"{', '.join(sorted(set(unknown))[:5])} (supported: {', '.join(sorted(modules.values()))})")
  if not entries:
    raise UserError(f"{folder / WEIGHTS_NAME}: no LoRA tensors")
  if len(prefixes) > 1:
    raise UserError(f"{folder}: LoRA tensors under several module paths ({', '.join(sorted(prefixes))}); "
                    "expected one decoder")
  prefix = prefixes.pop()

  layers = model_config.num_layers
  r, alpha = config["r"], config["lora_alpha"]
  rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
  scalings = {}
  for (target, i), pair in sorted(entries.items()):
    where = f"{folder.name}: {prefix}layers.{i}.{modules[target]}"
    if i >= layers:
      raise UserError(f"{where}: the model has only {layers} layers (an adapter of a different base model?)")
    if set(pair) != {"A", "B"}:
      raise UserError(f"{where}: has lora_{''.join(pair)} without its lora_{'B' if 'A' in pair else 'A'}")
    d_in, d_out = model_config.target_dims(target)
    a, b = pair["A"], pair["B"]
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != d_in or b.shape[0] != d_out or a.shape[0] != b.shape[1]:
      raise UserError(f"{where}: lora_A {a.shape} and lora_B {b.shape} do not fit this model (expected "
                      f"[r, {d_in}] and [{d_out}, r]): an adapter of a different base model?")
    module_key = f"{prefix}layers.{i}.{modules[target]}"
    rank = _pattern_value(rank_pattern, module_key, r)
    if a.shape[0] != rank:
      raise UserError(f"{where}: tensors have rank {a.shape[0]} but {CONFIG_NAME} says r={rank}")
    scaling = _pattern_value(alpha_pattern, module_key, alpha) / (math.sqrt(rank) if config.get("use_rslora")
                                                                   else rank)
    scalings[target, i] = float(scaling)

  targets = [t for t in ADAPTER_TARGETS if any(k[0] == t for k in entries)]
  partial = config.get("layers_to_transform") is not None or isinstance(declared, str)
  for t in targets:
    absent = [i for i in range(layers) if (t, i) not in entries]
    if absent and not partial:
      raise UserError(f"{folder}: adapter has no {modules[t]} factors for layers {absent} of this {layers}-layer "
                      "model (an adapter of a different base model?)")

  common = set(scalings.values())
  fold = len(common) > 1  # per-module scalings do not fit one adapter scale: fold them into b
  scale = 1.0 if fold else common.pop()
  factors = {}
  for t in targets:
    d_in, d_out = model_config.target_dims(t)
    rank = max(entries[k]["A"].shape[0] for k in entries if k[0] == t)
    a = np.zeros((1, layers, rank, d_in), np.float32)
    b = np.zeros((1, layers, rank, d_out), np.float32)
    for i in range(layers):
      if (t, i) in entries:
        la, lb = entries[t, i]["A"], entries[t, i]["B"]
        a[0, i, :la.shape[0]] = la
        b[0, i, :la.shape[0]] = lb.T * (scalings[t, i] if fold else 1.0)
    factors[t] = adapter_lib.LoRA(jnp.asarray(a), jnp.asarray(b))
  return adapter_lib.Adapter(factors, scale)
