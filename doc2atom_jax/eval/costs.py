"""Cost accounting (DESIGN §8, §10): what it takes to internalize a document, per method, in bytes and seconds.

Bytes are formulas of the shapes, so they are exact and testable by hand; seconds are measured (median of a
few repetitions after a warm-up that absorbs compilation). Storage forms:
- `codes`: an atom as its codes, `L·n_t·r·(c - k) + n_t·r·k` numbers (the compiler's head is linear, so this
  is exact): the copy path's k = `copy_dim` entries are the same at every layer and counted once, as the bank
  stores them (atoms/bank.py `shared_tail`);
- `factors`: the materialized LoRA factors, `L·r·Σ_t (d_in + d_out)` numbers per atom;
- routed methods add each atom's key (`d_k` numbers, float32 or bfloat16: `key_dtype`) to both forms: the
  router needs it;
- `kv_cache`: the in-context baseline's memory, `2·L·n_kv·head_dim·T` numbers for T document tokens;
- `keys+text`: rag_atoms keeps the keys and the document's UTF-8 text (it re-reads the text at answer time).
Codes, factors and the KV cache are counted at the same storage dtype (bfloat16 by default), so the ratios
compare forms, not precisions; except that codes given a bank `code_dtype` are counted as the bank stores
them (int8: 1 byte a number plus a float32 scale per atom and layer, and one for the shared tail), next to
factors and a KV cache at `float_bytes(code_dtype)` (bfloat16's 2 bytes for int8 codes).
"""

import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np

from doc2atom_jax.atoms import bank as bank_lib

ROUTED = ("rag_atoms", "doc2atom", "doc2atom_oracle")  # methods whose atoms carry a key


def dtype_bytes(name: str) -> int:
  """Bytes per number of a storage dtype name ("bfloat16", "float32", ...)."""
  import ml_dtypes  # pylint: disable=import-outside-toplevel  (numpy has no bfloat16)

  return np.dtype(getattr(ml_dtypes, name, None) or name).itemsize


def float_bytes(code_dtype: str) -> int:
  """Bytes per number of the float forms (factors, KV cache) counted next to codes stored as `code_dtype`:
  its own width for a float dtype, bfloat16's 2 for int8 (quantized codes against a bfloat16 KV cache)."""
  return 2 if code_dtype == "int8" else dtype_bytes(code_dtype)


def code_bytes(compiler_cfg, atoms: int, number_bytes: int = 2, *, code_dtype: str | None = None) -> int:
  """Codes of `atoms` atoms: atoms · n_t · r · (L · (c - k) + k) numbers of `number_bytes` each, the copy
  path's k = copy_dim entries once (they are the same at every layer); or, given a bank `code_dtype` (which
  then replaces `number_bytes`), the bytes the bank stores (int8: 1 a number + 4 per atom and layer for its
  scale, + 4 for the shared tail's; atoms/bank.py `bytes_per_atom`). Both count the tail once, as compile
  mode's bank (`shared_tail=copy_dim`) stores it."""
  c = compiler_cfg
  shape = (c.num_layers, c.num_targets, c.rank, c.code_dim)
  if code_dtype is not None:
    return atoms * bank_lib.bytes_per_atom(shape, code_dtype, shared_tail=c.copy_dim)
  return atoms * bank_lib.code_numbers(shape, c.copy_dim) * number_bytes


def factor_bytes(compiler_cfg, atoms: int, number_bytes: int = 2) -> int:
  """Materialized factors of `atoms` atoms: atoms · L · r · Σ_targets (d_in + d_out) numbers."""
  c = compiler_cfg
  return atoms * c.num_layers * c.rank * sum(d_in + d_out for d_in, d_out in c.target_dims) * number_bytes


def key_bytes(compiler_cfg, atoms: int, key_dtype: str = "float32") -> int:
  """Keys of `atoms` atoms: atoms · d_k numbers at the bank's `key_dtype`."""
  return atoms * compiler_cfg.key_dim * np.dtype(bank_lib.KEY_DTYPES[key_dtype]).itemsize


def kv_cache_bytes(model_cfg, tokens: int, number_bytes: int = 2) -> int:
  """The KV cache of `tokens` tokens: keys and values of every layer, 2 · L · n_kv · head_dim · T numbers."""
  return 2 * model_cfg.num_layers * model_cfg.num_kv_heads * model_cfg.head_dim * tokens * number_bytes


def document_bytes(method: str, *, tokens: int, atoms: int, text_bytes: int, compiler_cfg, model_cfg,
                   trunc_tokens: int, number_bytes: int = 2, code_dtype: str | None = None,
                   key_dtype: str = "float32") -> dict[str, int] | None:
  """Bytes to internalize one document for `method`, per storage form; None for no_context (nothing kept).

  `atoms` are the method's own units (d2l: chunks); `compiler_cfg` is the method's compiler. Factors and the
  KV cache take `number_bytes` a number; codes too, unless a bank `code_dtype` is given (`code_bytes`); keys
  are at `key_dtype`.
  """
  if method == "no_context":
    return None
  if method == "in_context":
    return {"kv_cache": kv_cache_bytes(model_cfg, tokens, number_bytes)}
  if method == "in_context_trunc":
    return {"kv_cache": kv_cache_bytes(model_cfg, min(tokens, trunc_tokens), number_bytes)}
  if method == "rag_atoms":
    return {"keys+text": key_bytes(compiler_cfg, atoms, key_dtype) + text_bytes}
  keys = key_bytes(compiler_cfg, atoms, key_dtype) if method in ROUTED else 0
  return {"codes": code_bytes(compiler_cfg, atoms, number_bytes, code_dtype=code_dtype) + keys,
          "factors": factor_bytes(compiler_cfg, atoms, number_bytes) + keys}


def mean_bytes(per_document: Sequence[Mapping[str, int]]) -> dict[str, int]:
  """The mean over documents of each storage form (rounded to whole bytes)."""
  forms = dict.fromkeys(f for d in per_document for f in d)
  return {f: int(round(np.mean([d[f] for d in per_document if f in d]))) for f in forms}


def timed_runs(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> list[float]:
  """Wall times of `repeats` runs of `fn()` (its result blocked on) after `warmup` untimed runs."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(max(1, repeats)):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def median_seconds(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
  """Median wall time of `fn()` over `repeats` runs after `warmup` untimed runs."""
  return statistics.median(timed_runs(fn, repeats, warmup))


def assemble(bytes_per_document: Mapping[str, dict], internalize: Mapping[int, Mapping[str, float]],
             answer: Mapping[int, Mapping[str, float]]) -> dict:
  """The report's costs dict: timings at the longest measured length, answer latency at every length.

  `internalize` and `answer` map document length (tokens) -> method -> seconds.
  """
  longest = max(answer or internalize or {0: {}})
  by_length: dict[str, list] = {}
  for length in sorted(answer):
    for method, seconds in answer[length].items():
      by_length.setdefault(method, []).append([length, seconds])
  return {"bytes_per_document": dict(bytes_per_document),
          "internalize_seconds": dict(internalize.get(longest, {})),
          "answer_seconds": dict(answer.get(longest, {})),
          "latency_by_length": by_length}


# ---------------------------------------------------------------------------------------------------------
# Texts of a measured length (latency at a stated number of document tokens).
# ---------------------------------------------------------------------------------------------------------
def count_tokens(model, text: str) -> int:
  return len(model.tokenizer(text, add_special_tokens=False)["input_ids"])


def truncated(model, text: str, tokens: int) -> str:
  """The text up to the end of its first `tokens` tokens."""
  offsets = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
  return text if len(offsets) <= tokens else text[:offsets[tokens - 1][1]]


def text_of_length(model, texts: Sequence[str], tokens: int) -> str:
  """The evaluated documents joined (cycling through them) to at least `tokens` tokens, then cut there."""
  parts, total = [], 0
  while total < tokens:
    for text in texts:
      parts.append(text)
      total += count_tokens(model, text) + 1
      if total >= tokens:
        break
  return truncated(model, "\n\n".join(parts), tokens)
