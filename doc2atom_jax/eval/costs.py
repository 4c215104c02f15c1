"""Cost accounting (DESIGN §8, §10): what it takes to internalize a document, per method, in bytes and seconds.

Bytes are formulas of the shapes, so they are exact and testable by hand; seconds are measured (median of a
few repetitions after a warm-up that absorbs compilation). Storage forms:
- `codes`: an atom as its codes, `L·n_t·r·c` numbers (the compiler's head is linear, so this is exact);
- `factors`: the materialized LoRA factors, `L·r·Σ_t (d_in + d_out)` numbers per atom;
- routed methods add each atom's float32 key (`d_k` numbers) to both forms: the router needs it;
- `kv_cache`: the in-context baseline's memory, `2·L·n_kv·head_dim·T` numbers for T document tokens;
- `keys+text`: rag_atoms keeps the keys and the document's UTF-8 text (it re-reads the text at answer time).
Codes, factors and the KV cache are counted at the same storage dtype (bfloat16 by default), so the ratios
compare forms, not precisions.
"""

import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np

KEY_BYTES = 4  # keys are stored as float32 (atoms/bank.py)
ROUTED = ("rag_atoms", "doc2atom", "doc2atom_oracle")  # methods whose atoms carry a key


def dtype_bytes(name: str) -> int:
  """Bytes per number of a storage dtype name ("bfloat16", "float32", ...)."""
  import ml_dtypes  # pylint: disable=import-outside-toplevel  (numpy has no bfloat16)

  return np.dtype(getattr(ml_dtypes, name, None) or name).itemsize


def code_bytes(compiler_cfg, atoms: int, number_bytes: int = 2) -> int:
  """Codes of `atoms` atoms: atoms · L · n_t · r · c numbers."""
  c = compiler_cfg
  return atoms * c.num_layers * c.num_targets * c.rank * c.code_dim * number_bytes


def factor_bytes(compiler_cfg, atoms: int, number_bytes: int = 2) -> int:
  """Materialized factors of `atoms` atoms: atoms · L · r · Σ_targets (d_in + d_out) numbers."""
  c = compiler_cfg
  return atoms * c.num_layers * c.rank * sum(d_in + d_out for d_in, d_out in c.target_dims) * number_bytes


def key_bytes(compiler_cfg, atoms: int) -> int:
  return atoms * compiler_cfg.key_dim * KEY_BYTES


def kv_cache_bytes(model_cfg, tokens: int, number_bytes: int = 2) -> int:
  """The KV cache of `tokens` tokens: keys and values of every layer, 2 · L · n_kv · head_dim · T numbers."""
  return 2 * model_cfg.num_layers * model_cfg.num_kv_heads * model_cfg.head_dim * tokens * number_bytes


def document_bytes(method: str, *, tokens: int, atoms: int, text_bytes: int, compiler_cfg, model_cfg,
                   trunc_tokens: int, number_bytes: int = 2) -> dict[str, int] | None:
  """Bytes to internalize one document for `method`, per storage form; None for no_context (nothing kept).

  `atoms` are the method's own units (d2l: chunks); `compiler_cfg` is the method's compiler.
  """
  if method == "no_context":
    return None
  if method == "in_context":
    return {"kv_cache": kv_cache_bytes(model_cfg, tokens, number_bytes)}
  if method == "in_context_trunc":
    return {"kv_cache": kv_cache_bytes(model_cfg, min(tokens, trunc_tokens), number_bytes)}
  if method == "rag_atoms":
    return {"keys+text": key_bytes(compiler_cfg, atoms) + text_bytes}
  keys = key_bytes(compiler_cfg, atoms) if method in ROUTED else 0
  return {"codes": code_bytes(compiler_cfg, atoms, number_bytes) + keys,
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
