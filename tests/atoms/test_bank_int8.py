"""Atom banks with int8 codes (absmax per atom and layer) and bfloat16 keys: quantization error bound, round
trips, format versions (plain banks stay version 1, byte for byte), and exact byte accounting by hand."""

import json
import types

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from doc2atom_jax.atoms import bank as bank_lib
from doc2atom_jax.atoms.atomize import ATOM_TYPES
from doc2atom_jax.atoms.compiler import CompilerConfig
from doc2atom_jax.errors import UserError
from doc2atom_jax.eval import costs
from tests.atoms.test_bank import DOC_A, DOC_B, FP, KEY_DIM, SHAPE, first_shard, make_doc


def new_bank(tmp_path, docs=(DOC_A, DOC_B), code_dtype="int8", key_dtype="float32", name="bank"):
  path = tmp_path / name
  bank_lib.create(path, fingerprint=FP, meta={"method": "doc2atom"}, code_dtype=code_dtype, key_dtype=key_dtype)
  for doc in docs:
    bank_lib.append(path, doc, fingerprint=FP)
  return path


def shard_tensors(path):
  data = first_shard(path).read_bytes()
  header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
  return safetensors.numpy.load(data), header["__metadata__"], data


# ---------------------------------------------------------------------------------------------------------
# Quantization.


def test_quantize_by_hand():
  x = np.array([2.54, -1.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0], np.float32).reshape(1, 2, 1, 1, 4)  # layer 1 is zero
  q, scales = bank_lib.quantize_int8(x)
  assert q.dtype == np.int8 and q.shape == x.shape and scales.dtype == np.float32 and scales.shape == (1, 2)
  assert scales[0, 0] == np.float32(np.float32(2.54) / 127) and scales[0, 1] == 0  # 0.02; zero layer: 0
  np.testing.assert_array_equal(q.reshape(-1), [127, -50, 0, 25, 0, 0, 0, 0])
  back = bank_lib.dequantize_int8(q, scales)
  assert back.dtype == np.float32 and np.all(np.isfinite(back)) and not back[0, 1].any()


def test_round_trip_error_is_at_most_half_a_step_per_atom_and_layer():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((5, 3, 2, 2, 8)).astype(np.float32)
  x *= np.float32(10.0) ** rng.integers(-6, 6, size=(5, 3, 1, 1, 1))  # layers of very different magnitudes
  x[1, 2] = 0  # an all-zero layer
  x[2, 0] = np.float32(1e-44) * np.sign(x[2, 0])  # subnormal: absmax / 127 underflows to 0 in float32
  x[3, 1, 0, 0, 0] = 3.4e38  # near float32's max: no overflow
  q, scales = bank_lib.quantize_int8(x)
  back = bank_lib.dequantize_int8(q, scales)
  assert np.all(np.isfinite(back)) and np.all(np.abs(q.astype(int)) <= 127)
  assert scales[1, 2] == 0 and not back[1, 2].any()
  absmax = np.abs(x).max(axis=(2, 3, 4))
  normal = absmax > 1e-30
  np.testing.assert_array_equal(scales[normal], (absmax[normal].astype(np.float64) / 127).astype(np.float32))
  assert np.all(np.abs(q).max(axis=(2, 3, 4))[normal] == 127)  # the absmax entry uses the full range
  step = scales[..., None, None, None]
  # |dequant - x| <= scale / 2, plus float32 rounding of the product q * scale (<= 127.5 * scale * 2^-24).
  assert np.all(np.abs(back.astype(np.float64) - x) <= step.astype(np.float64) * (0.5 + 127.5 * 2.0 ** -24))


def test_roundtrip_codes_and_keys_as_banks_return_them():
  x = DOC_A.codes
  np.testing.assert_array_equal(bank_lib.roundtrip_codes(x, "float32"), x)
  np.testing.assert_array_equal(bank_lib.roundtrip_codes(x, "bfloat16"), x.astype(ml_dtypes.bfloat16).astype(np.float32))
  np.testing.assert_array_equal(bank_lib.roundtrip_codes(x, "int8"), bank_lib.dequantize_int8(*bank_lib.quantize_int8(x)))
  np.testing.assert_array_equal(bank_lib.roundtrip_keys(DOC_A.keys), DOC_A.keys)
  np.testing.assert_array_equal(bank_lib.roundtrip_keys(DOC_A.keys, "bfloat16"),
                                DOC_A.keys.astype(ml_dtypes.bfloat16).astype(np.float32))
  with pytest.raises(UserError, match="code dtype"):
    bank_lib.roundtrip_codes(x, "int4")
  with pytest.raises(UserError, match="key dtype"):
    bank_lib.roundtrip_keys(DOC_A.keys, "float16")


# ---------------------------------------------------------------------------------------------------------
# Banks on disk.


def test_int8_bank_round_trip(tmp_path):
  path = new_bank(tmp_path)
  bank = bank_lib.load(path, fingerprint=FP)
  assert bank.code_dtype == "int8" and bank.key_dtype == "float32" and bank.doc_ids == ["a", "b"]
  expected = np.concatenate([DOC_A.codes, DOC_B.codes])
  np.testing.assert_array_equal(bank.codes, bank_lib.roundtrip_codes(expected, "int8"))
  assert bank.codes.dtype == np.float32 and not np.array_equal(bank.codes, expected)  # really quantized
  np.testing.assert_array_equal(bank.keys, np.concatenate([DOC_A.keys, DOC_B.keys]))  # float32 keys: exact
  assert bank.atoms == list(DOC_A.atoms + DOC_B.atoms)
  tensors, meta, _ = shard_tensors(path)
  n = len(DOC_A.atoms)
  assert tensors["codes"].dtype == np.int8 and tensors["codes"].shape == (n, *SHAPE)
  assert tensors["code_scales"].dtype == np.float32 and tensors["code_scales"].shape == (n, SHAPE[0])
  assert meta["format_version"] == "2" and meta["code_dtype"] == "int8" and meta["key_dtype"] == "float32"
  manifest = json.loads((path / "manifest.json").read_text())
  assert manifest["format_version"] == 2 and manifest["key_dtype"] == "float32"
  summary = bank_lib.info(path)
  assert summary["code_dtype"] == "int8" and summary["key_dtype"] == "float32" and summary["format_version"] == 2
  assert summary["bytes_per_atom"] == bank_lib.bytes_per_atom(SHAPE, "int8") == 8 + 2 * 4


def test_bfloat16_keys_round_trip(tmp_path):
  path = new_bank(tmp_path, code_dtype="bfloat16", key_dtype="bfloat16")
  bank = bank_lib.load(path)
  assert bank.key_dtype == "bfloat16" and bank.keys.dtype == np.float32
  keys = np.concatenate([DOC_A.keys, DOC_B.keys])
  np.testing.assert_array_equal(bank.keys, keys.astype(ml_dtypes.bfloat16).astype(np.float32))
  assert not np.array_equal(bank.keys, keys)
  tensors, meta, _ = shard_tensors(path)
  assert tensors["keys"].dtype == np.uint16 and meta["key_dtype"] == "bfloat16" and meta["format_version"] == "2"
  assert bank_lib.info(path)["format_version"] == 2


def test_int8_bank_takes_codes_bfloat16_would_overflow(tmp_path):
  big = bank_lib.BankDocument(DOC_B.doc_id, DOC_B.text, DOC_B.atoms, np.full_like(DOC_B.codes, 3.4e38), DOC_B.keys)
  bank = bank_lib.load(new_bank(tmp_path, docs=(big,)))
  assert np.all(np.isfinite(bank.codes)) and np.allclose(bank.codes, 3.4e38, rtol=1e-6)


def test_bad_dtypes_and_bfloat16_key_overflow(tmp_path):
  with pytest.raises(UserError, match="unknown code dtype 'int4'"):
    bank_lib.create(tmp_path / "a", fingerprint=FP, meta={}, code_dtype="int4")
  with pytest.raises(UserError, match="unknown key dtype 'int8'"):
    bank_lib.create(tmp_path / "b", fingerprint=FP, meta={}, key_dtype="int8")
  path = new_bank(tmp_path, docs=(), key_dtype="bfloat16", name="c")
  huge = bank_lib.BankDocument(DOC_B.doc_id, DOC_B.text, DOC_B.atoms, DOC_B.codes, np.full_like(DOC_B.keys, 3.4e38))
  with pytest.raises(UserError, match="keys overflow bfloat16"):
    bank_lib.append(path, huge, fingerprint=FP)


@pytest.mark.parametrize("code_dtype", ["bfloat16", "float32"])
def test_plain_banks_are_still_written_as_version_1_byte_for_byte(tmp_path, code_dtype):
  """bfloat16/float32 codes with float32 keys: the shard the previous program wrote (same header, same tensor
  bytes; safetensors orders header keys by hash, so whole files are compared parsed), so both programs read it."""
  path = new_bank(tmp_path, docs=(DOC_A, DOC_B), code_dtype=code_dtype)
  manifest = json.loads((path / "manifest.json").read_text())
  assert manifest["format_version"] == 1 and "key_dtype" not in manifest
  stored = DOC_A.codes.astype(bank_lib.CODE_DTYPES[code_dtype])
  old_tensors = {"codes": stored.view(np.uint16) if code_dtype == "bfloat16" else stored, "keys": DOC_A.keys,
                 "types": np.array([ATOM_TYPES.index(a.type) for a in DOC_A.atoms], np.int32)}
  atoms = [{"index": a.index, "type": a.type, "char_start": a.char_start, "char_end": a.char_end,
            "token_start": a.token_start, "token_end": a.token_end} for a in DOC_A.atoms]
  old_meta = {"format": bank_lib.FORMAT_NAME, "format_version": "1", "doc_id": "a", "code_dtype": code_dtype,
              "text": DOC_A.text, "atoms": json.dumps(atoms, separators=(",", ":"))}
  new, old = first_shard(path).read_bytes(), safetensors.numpy.save(old_tensors, metadata=old_meta)
  header_end = lambda data: 8 + int.from_bytes(data[:8], "little")
  assert json.loads(new[8:header_end(new)]) == json.loads(old[8:header_end(old)]) and len(new) == len(old)
  assert new[header_end(new):] == old[header_end(old):]
  bank = bank_lib.load(path)
  assert bank.key_dtype == "float32" and bank_lib.info(path)["key_dtype"] == "float32"


def test_padded_int8_bank_is_float32(tmp_path):
  bank = bank_lib.load(new_bank(tmp_path))
  codes, keys, mask = bank.padded()
  assert codes.dtype == keys.dtype == np.float32 and mask.sum() == 4
  np.testing.assert_array_equal(codes[:4], bank.codes)


def test_in_memory_bank_matches_the_bank_on_disk(tmp_path):
  from doc2atom_jax.eval import quick  # pylint: disable=import-outside-toplevel

  on_disk = bank_lib.load(new_bank(tmp_path, code_dtype="int8", key_dtype="bfloat16"))
  in_memory = quick.in_memory_bank([DOC_A, DOC_B], code_dtype="int8", key_dtype="bfloat16")
  np.testing.assert_array_equal(in_memory.codes, on_disk.codes)
  np.testing.assert_array_equal(in_memory.keys, on_disk.keys)
  assert in_memory.code_dtype == "int8" and in_memory.key_dtype == "bfloat16"


# ---------------------------------------------------------------------------------------------------------
# Bytes.


@pytest.mark.parametrize("code_dtype, key_dtype", [("int8", "float32"), ("int8", "bfloat16"),
                                                   ("bfloat16", "bfloat16"), ("float32", "float32")])
@pytest.mark.parametrize("shape", [SHAPE, (3, 1, 1, 3)])  # 3·3 = 9 int8 bytes an atom: nothing pads them
def test_bytes_per_atom_is_the_shard_data(tmp_path, code_dtype, key_dtype, shape):
  doc = make_doc("a", ["Alpha is a letter.", "It was 1990.", "Bob met Carol."], seed=1, shape=shape)
  path = new_bank(tmp_path, docs=(doc,), code_dtype=code_dtype, key_dtype=key_dtype)
  _, _, data = shard_tensors(path)
  tensor_bytes = len(data) - 8 - int.from_bytes(data[:8], "little")  # safetensors: length, header, tensors
  n = len(doc.atoms)
  assert tensor_bytes == n * bank_lib.bytes_per_atom(shape, code_dtype, key_dim=KEY_DIM, key_dtype=key_dtype) + n * 4


SMOLLM2 = types.SimpleNamespace(num_layers=30, num_kv_heads=3, head_dim=64)
ATOM = CompilerConfig(num_layers=30, hidden_size=576, target_dims=((1536, 576),), rank=1, code_dim=256, key_dim=128)


def test_one_smollm2_atom_by_hand():
  assert bank_lib.bytes_per_atom((30, 1, 1, 256), "int8") == 30 * 256 + 30 * 4 == 7_800
  assert bank_lib.bytes_per_atom((30, 1, 1, 256), "int8", key_dim=128) == 7_800 + 512 == 8_312
  assert bank_lib.bytes_per_atom((30, 1, 1, 256), "int8", key_dim=128, key_dtype="bfloat16") == 8_056
  assert bank_lib.bytes_per_atom((30, 1, 1, 256), "bfloat16", key_dim=128) == 15_360 + 512 == 15_872  # as before
  assert costs.code_bytes(ATOM, 1, code_dtype="int8") == 7_800
  assert costs.code_bytes(ATOM, 1, code_dtype="bfloat16") == costs.code_bytes(ATOM, 1) == 15_360
  assert costs.code_bytes(ATOM, 1, code_dtype="float32") == costs.code_bytes(ATOM, 1, number_bytes=4) == 30_720
  assert costs.key_bytes(ATOM, 1) == 512 and costs.key_bytes(ATOM, 1, "bfloat16") == 256
  assert costs.float_bytes("int8") == 2 and costs.float_bytes("bfloat16") == 2 and costs.float_bytes("float32") == 4


def test_a_2048_token_document_of_152_atoms_by_hand():
  """One atom per ~13.5 tokens: bfloat16 codes + float32 keys are 5.1% of the bfloat16 KV cache, int8 2.7%."""
  common = dict(tokens=2048, atoms=152, text_bytes=9_000, compiler_cfg=ATOM, model_cfg=SMOLLM2, trunc_tokens=256)
  kv = 2 * 30 * 3 * 64 * 2048 * 2
  bf16 = costs.document_bytes("doc2atom", **common, code_dtype="bfloat16")
  assert bf16 == costs.document_bytes("doc2atom", **common) == {"codes": 152 * 15_872, "factors": 152 * 127_232}
  assert bf16["codes"] / kv == pytest.approx(0.05113, abs=1e-5)
  int8 = costs.document_bytes("doc2atom", **common, number_bytes=costs.float_bytes("int8"), code_dtype="int8")
  assert int8 == {"codes": 152 * 8_312, "factors": 152 * (126_720 + 512)}
  assert int8["codes"] / kv == pytest.approx(0.02678, abs=1e-5)
  both = costs.document_bytes("doc2atom", **common, code_dtype="int8", key_dtype="bfloat16")
  assert both == {"codes": 152 * 8_056, "factors": 152 * (126_720 + 256)}
  assert both["codes"] / kv == pytest.approx(0.02595, abs=1e-5)
  assert costs.document_bytes("d2l_atom", **common, code_dtype="int8") == {"codes": 152 * 7_800,
                                                                           "factors": 152 * 126_720}  # no keys
  assert costs.document_bytes("rag_atoms", **common, key_dtype="bfloat16") == {"keys+text": 152 * 256 + 9_000}
  assert costs.document_bytes("in_context", **common, number_bytes=costs.float_bytes("int8"),
                              code_dtype="int8") == {"kv_cache": kv}  # the KV cache stays bfloat16
