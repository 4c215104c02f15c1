"""Cost accounting: the byte formulas against hand numbers for SmolLM2-135M's shapes, and the timing helpers."""

import types

import pytest

from doc2atom_jax.atoms.compiler import CompilerConfig
from doc2atom_jax.eval import costs

# SmolLM2-135M: 30 layers, d 576, MLP 1536, 3 KV heads of 64; the down-projection maps 1536 -> 576.
SMOLLM2 = types.SimpleNamespace(num_layers=30, num_kv_heads=3, head_dim=64)
ATOM = CompilerConfig(num_layers=30, hidden_size=576, target_dims=((1536, 576),), rank=1, code_dim=256, key_dim=128)
D2L = CompilerConfig(num_layers=30, hidden_size=576, target_dims=((1536, 576),), rank=8, code_dim=256, key_dim=128)
DOWN_UP = CompilerConfig(num_layers=30, hidden_size=576, target_dims=((1536, 576), (576, 1536)),
                         targets=("down", "up"), rank=1, code_dim=256, key_dim=128)


def test_one_smollm2_atom_by_hand():
  assert costs.dtype_bytes("bfloat16") == 2 and costs.dtype_bytes("float32") == 4
  assert costs.code_bytes(ATOM, 1) == 30 * 256 * 2 == 15_360
  assert costs.factor_bytes(ATOM, 1) == 30 * (1536 + 576) * 2 == 126_720
  assert costs.key_bytes(ATOM, 1) == 128 * 4 == 512
  assert costs.code_bytes(ATOM, 1, number_bytes=4) == 30_720
  # Two targets: codes double, factors add each target's own (d_in + d_out).
  assert costs.code_bytes(DOWN_UP, 1) == 30_720 and costs.factor_bytes(DOWN_UP, 1) == 30 * 4224 * 2 == 253_440


def test_kv_cache_of_a_2048_token_document_is_47_mb():
  assert costs.kv_cache_bytes(SMOLLM2, 2048) == 2 * 30 * 3 * 64 * 2048 * 2 == 47_185_920
  assert costs.kv_cache_bytes(SMOLLM2, 1, number_bytes=4) == 46_080


def test_document_bytes_per_method_and_form():
  """A 2,048-token SQuAD document of 72 atoms (README): codes + keys are 2.4% of the KV cache."""
  common = dict(tokens=2048, atoms=72, text_bytes=9_000, compiler_cfg=ATOM, model_cfg=SMOLLM2, trunc_tokens=256)
  doc2atom = costs.document_bytes("doc2atom", **common)
  assert doc2atom == {"codes": 72 * 15_872, "factors": 72 * 127_232}
  assert doc2atom["codes"] == 1_142_784 and doc2atom["codes"] / 47_185_920 == pytest.approx(0.0242, abs=1e-4)
  assert costs.document_bytes("doc2atom_oracle", **common) == doc2atom
  assert costs.document_bytes("d2l_atom", **common) == {"codes": 72 * 15_360, "factors": 72 * 126_720}  # no keys
  assert costs.document_bytes("rag_atoms", **common) == {"keys+text": 72 * 512 + 9_000}
  assert costs.document_bytes("in_context", **common) == {"kv_cache": 47_185_920}
  assert costs.document_bytes("in_context_trunc", **common) == {"kv_cache": 5_898_240}
  assert costs.document_bytes("no_context", **common) is None
  # d2l: one rank-8 adapter for the whole document (chunk_tokens = 0).
  d2l = costs.document_bytes("d2l", **{**common, "atoms": 1, "compiler_cfg": D2L})
  assert d2l == {"codes": 30 * 8 * 256 * 2, "factors": 30 * 8 * 2112 * 2} == {"codes": 122_880, "factors": 1_013_760}


def test_the_quickstart_atom_stores_its_copied_entries_once():
  """The quickstart's compiler (c = 640, of which the copy path's 576 are the same at every layer): the bank keeps
  those once per atom, so an atom costs 30 · 64 + 576 numbers, not 30 · 640 (README's memory paragraph)."""
  quick = CompilerConfig(num_layers=30, hidden_size=576, target_dims=((1536, 576),), rank=1, code_dim=640,
                         copy_dim=576, key_dim=128)
  assert costs.code_bytes(quick, 1) == (30 * 64 + 576) * 2 == 4_992  # not 38_400
  assert costs.code_bytes(quick, 1, code_dtype="int8") == 30 * 64 + 576 + 4 * 31 == 2_620
  doc = costs.document_bytes("doc2atom", tokens=2048, atoms=72, text_bytes=9_000, compiler_cfg=quick,
                             model_cfg=SMOLLM2, trunc_tokens=256)
  assert doc["codes"] == 72 * (4_992 + 512) == 396_288
  assert doc["codes"] / costs.kv_cache_bytes(SMOLLM2, 2048) == pytest.approx(0.0084, abs=1e-4)


def test_mean_bytes_over_documents():
  assert costs.mean_bytes([{"codes": 10, "factors": 100}, {"codes": 21, "factors": 200}]) == {"codes": 16,
                                                                                              "factors": 150}


def test_median_seconds_warms_up_then_times_each_repeat():
  calls = []
  seconds = costs.median_seconds(lambda: calls.append(1) or 0, repeats=3, warmup=2)
  assert len(calls) == 5 and 0 <= seconds < 1


def test_assemble_reports_the_longest_length_and_the_whole_sweep():
  answer = {512: {"in_context": 0.2, "doc2atom": 0.05}, 128: {"in_context": 0.1, "doc2atom": 0.05}}
  internalize = {512: {"in_context": 0.3}, 128: {"in_context": 0.1}}
  out = costs.assemble({"doc2atom": {"codes": 1}}, internalize, answer)
  assert out["answer_seconds"] == {"in_context": 0.2, "doc2atom": 0.05}
  assert out["internalize_seconds"] == {"in_context": 0.3}
  assert out["latency_by_length"]["in_context"] == [[128, 0.1], [512, 0.2]]
  assert set(out) == {"bytes_per_document", "internalize_seconds", "answer_seconds", "latency_by_length"}
