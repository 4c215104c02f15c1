"""Atom banks with a shared tail (format version 3): the copy path's code entries, the same at every layer,
stored once per atom; round trips per dtype, exact byte savings, refusals, version checks, byte accounting."""

import json

import numpy as np
import pytest
import safetensors.numpy

from doc2atom_jax.atoms import bank as bank_lib
from doc2atom_jax.atoms.compiler import CompilerConfig
from doc2atom_jax.errors import UserError
from doc2atom_jax.eval import costs
from tests.atoms.test_bank import FP, KEY_DIM, first_shard, make_doc, snapshot

SHAPE = (3, 2, 1, 5)  # L, n_t, r, c
TAIL = 3  # k: the last 3 of 5 code entries are the same at every layer
DTYPES = ("float32", "bfloat16", "int8")
ITEMSIZE = {"float32": 4, "bfloat16": 2, "int8": 1}


def shared_doc(doc_id, sentences, seed, tail=TAIL):
  """A document whose codes' last `tail` entries are layer 0's at every layer, as the copy path makes them."""
  doc = make_doc(doc_id, sentences, seed=seed, shape=SHAPE)
  doc.codes[..., -tail:] = doc.codes[:, :1, ..., -tail:]
  return doc


DOC_A = shared_doc("a", ["Alpha is a letter.", "It was 1990.", "Bob met Carol."], seed=1)
DOC_B = shared_doc("b", ["Zeta ends it."], seed=2)


def new_bank(tmp_path, docs=(DOC_A, DOC_B), code_dtype="bfloat16", shared_tail=TAIL, name="bank"):
  path = tmp_path / name
  bank_lib.create(path, fingerprint=FP, meta={}, code_dtype=code_dtype, shared_tail=shared_tail)
  for doc in docs:
    bank_lib.append(path, doc, fingerprint=FP)
  return path


def shard(path):
  """(tensors, string metadata, tensor data bytes) of the bank's first shard."""
  data = first_shard(path).read_bytes()
  header = int.from_bytes(data[:8], "little")
  return safetensors.numpy.load(data), json.loads(data[8:8 + header])["__metadata__"], len(data) - 8 - header


@pytest.mark.parametrize("code_dtype", DTYPES)
def test_round_trip_returns_whole_codes_as_roundtrip_codes_says(tmp_path, code_dtype):
  bank = bank_lib.load(new_bank(tmp_path, code_dtype=code_dtype), fingerprint=FP)
  codes = np.concatenate([DOC_A.codes, DOC_B.codes])
  assert bank.codes.shape == codes.shape and bank.codes.dtype == np.float32
  np.testing.assert_array_equal(bank.codes, bank_lib.roundtrip_codes(codes, code_dtype, shared_tail=TAIL))
  assert np.all(bank.codes[..., -TAIL:] == bank.codes[:, :1, ..., -TAIL:])  # the tail broadcast back
  if code_dtype == "float32":
    np.testing.assert_array_equal(bank.codes, codes)
  np.testing.assert_array_equal(bank.document("b").codes, bank.codes[3:])


@pytest.mark.parametrize("code_dtype", DTYPES)
def test_manifest_and_shard_tensors_of_version_3(tmp_path, code_dtype):
  path = new_bank(tmp_path, code_dtype=code_dtype)
  manifest = json.loads((path / bank_lib.MANIFEST).read_text())
  assert manifest["format_version"] == 3 and manifest["shared_tail"] == TAIL and manifest["code_shape"] == [3, 2, 1, 5]
  tensors, meta, _ = shard(path)
  assert meta["format_version"] == "3" and meta["code_dtype"] == code_dtype
  assert tensors["codes"].shape == (3, 3, 2, 1, 2) and tensors["shared_codes"].shape == (3, 2, 1, TAIL)
  assert tensors["codes"].dtype == tensors["shared_codes"].dtype == bank_lib._STORED_AS[code_dtype]
  if code_dtype == "int8":  # per (atom, layer) for the per-layer part, per atom for the tail
    head, tail = DOC_A.codes[..., :-TAIL], DOC_A.codes[:, 0, ..., -TAIL:]
    np.testing.assert_array_equal(tensors["code_scales"], bank_lib.quantize_int8(head)[1])
    np.testing.assert_array_equal(tensors["shared_scales"], (np.abs(tail).max(axis=(1, 2, 3)) / 127).astype(np.float32))
    assert tensors["shared_scales"].shape == (3,) and tensors["shared_scales"].dtype == np.float32
  else:
    assert "code_scales" not in tensors and "shared_scales" not in tensors


@pytest.mark.parametrize("code_dtype", DTYPES)
def test_shard_is_smaller_by_the_tail_stored_l_minus_1_fewer_times(tmp_path, code_dtype):
  _, _, shared = shard(new_bank(tmp_path, code_dtype=code_dtype))
  _, _, whole = shard(new_bank(tmp_path, code_dtype=code_dtype, shared_tail=0, name="whole"))
  L, n_t, r, _ = SHAPE
  n = len(DOC_A.atoms)
  saved = n * ((L - 1) * n_t * r * TAIL * ITEMSIZE[code_dtype] - (4 if code_dtype == "int8" else 0))
  assert whole - shared == saved  # int8: one more scale per atom, for the tail
  per_atom = bank_lib.bytes_per_atom(SHAPE, code_dtype, key_dim=KEY_DIM, shared_tail=TAIL)
  assert shared == n * per_atom + n * 4  # + types
  info = bank_lib.info(tmp_path / "bank")
  assert info["shared_tail"] == TAIL and info["format_version"] == 3
  assert info["bytes_per_atom"] == bank_lib.bytes_per_atom(SHAPE, code_dtype, shared_tail=TAIL)


@pytest.mark.parametrize("code_dtype", DTYPES)
def test_a_tail_that_differs_between_layers_is_refused_and_nothing_is_written(tmp_path, code_dtype):
  path = new_bank(tmp_path, docs=(DOC_A,), code_dtype=code_dtype)
  before = snapshot(path)
  bad = shared_doc("bad", ["Zeta ends it."], seed=3)
  bad.codes[0, 2, 1, 0, -1] = np.nextafter(bad.codes[0, 2, 1, 0, -1], np.float32(np.inf))  # one float32 ulp
  with pytest.raises(UserError, match="document 'bad'.*last 3 code entries differ between layers"):
    bank_lib.append_many(path, [DOC_B, bad], fingerprint=FP)
  assert snapshot(path) == before
  with pytest.raises(ValueError, match="differ between layers"):
    bank_lib.roundtrip_codes(bad.codes, code_dtype, shared_tail=TAIL)
  ok = shared_doc("whole", ["Zeta ends it."], seed=3)  # codes of the copy path's shape are stored
  bank_lib.append(path, ok, fingerprint=FP)
  assert bank_lib.load(path).doc_ids == ["a", "whole"]


def test_a_tail_as_long_as_the_code_and_bad_shared_tails_are_refused(tmp_path):
  path = tmp_path / "bank"
  bank_lib.create(path, fingerprint=FP, meta={}, shared_tail=5)  # c = 5: nothing would be per layer
  before = snapshot(path)
  with pytest.raises(UserError, match="codes of 5 entries cannot have the atom bank's shared tail of 5"):
    bank_lib.append(path, DOC_A, fingerprint=FP)
  assert snapshot(path) == before
  for bad in (-1, 1.5, True, "3"):
    with pytest.raises(UserError, match="shared_tail must be a whole number"):
      bank_lib.create(tmp_path / "other", fingerprint=FP, meta={}, shared_tail=bad)


def test_version_3_is_refused_by_a_program_that_reads_up_to_version_2(tmp_path, monkeypatch):
  path = new_bank(tmp_path)
  monkeypatch.setattr(bank_lib, "FORMAT_VERSION", 2)
  for call in (lambda: bank_lib.load(path), lambda: bank_lib.info(path),
               lambda: bank_lib.append(path, shared_doc("c", ["Zeta ends it."], seed=4), fingerprint=FP)):
    with pytest.raises(UserError, match="format version 3; this program reads versions up to 2"):
      call()


def test_shards_that_do_not_match_the_manifests_tail_are_refused(tmp_path):
  path = new_bank(tmp_path)
  manifest = json.loads((path / bank_lib.MANIFEST).read_text())
  manifest["shared_tail"] = TAIL - 1  # same code_shape: the joined codes would have the right shape
  bank_lib._write_manifest(path, {k: v for k, v in manifest.items() if k != "checksum"})
  with pytest.raises(UserError, match=r"does not match .*manifest.json \(document 'a', code tensors"):
    bank_lib.load(path)


def test_banks_without_a_shared_tail_are_written_as_before(tmp_path):
  assert [bank_lib.format_version(d) for d in DTYPES] == [1, 1, 2]
  assert bank_lib.format_version("bfloat16", "bfloat16") == 2
  assert [bank_lib.format_version(d, shared_tail=TAIL) for d in DTYPES] == [3, 3, 3]
  for code_dtype in DTYPES:
    zero = new_bank(tmp_path, code_dtype=code_dtype, shared_tail=0, name=f"zero-{code_dtype}")
    default = tmp_path / f"default-{code_dtype}"
    bank_lib.create(default, fingerprint=FP, meta={}, code_dtype=code_dtype)
    for doc in (DOC_A, DOC_B):
      bank_lib.append(default, doc, fingerprint=FP)
    # shared_tail=0 writes what the default writes (whose bytes test_bank_int8 pins to the old program's), but
    # for the order of safetensors' header keys (by hash; hence the sha256s too): headers parsed, sha256s left out.
    assert parsed(zero) == parsed(default)
    manifest = json.loads((zero / bank_lib.MANIFEST).read_text())
    assert "shared_tail" not in manifest and manifest["format_version"] == bank_lib.format_version(code_dtype)
    assert bank_lib.info(zero)["shared_tail"] == 0


def parsed(path):
  """A bank's files comparable across writes: shards as (parsed header, tensor bytes), the manifest without
  its checksum and the shards' sha256."""
  files = snapshot(path)
  manifest = json.loads(files.pop(bank_lib.MANIFEST))
  manifest.pop("checksum")
  for entry in manifest["documents"]:
    entry.pop("sha256")
  ends = {name: 8 + int.from_bytes(data[:8], "little") for name, data in files.items() if name.startswith("shards/")}
  return manifest, {name: (json.loads(data[8:ends[name]]), data[ends[name]:]) if name in ends else data
                    for name, data in files.items()}


def test_in_memory_bank_matches_the_bank_on_disk(tmp_path):
  from doc2atom_jax.eval import quick  # pylint: disable=import-outside-toplevel

  on_disk = bank_lib.load(new_bank(tmp_path, code_dtype="int8"))
  in_memory = quick.in_memory_bank([DOC_A, DOC_B], code_dtype="int8", shared_tail=TAIL)
  np.testing.assert_array_equal(in_memory.codes, on_disk.codes)
  # Per-layer scales over the whole code differ from the bank's: the tail's scale is the atom's own.
  assert not np.array_equal(quick.in_memory_bank([DOC_A, DOC_B], code_dtype="int8").codes, on_disk.codes)


SMOLLM2_ATOM = CompilerConfig(num_layers=30, hidden_size=576, target_dims=((1536, 576),), rank=1, code_dim=640,
                              copy_dim=576, key_dim=128)  # configs/quickstart.py's compiler on SmolLM2-135M


def test_one_smollm2_atom_by_hand():
  shape = (30, 1, 1, 640)
  assert bank_lib.code_numbers(shape) == 30 * 640 == 19_200
  assert bank_lib.code_numbers(shape, 576) == 30 * 64 + 576 == 2_496
  assert bank_lib.bytes_per_atom(shape, "bfloat16") == 38_400
  assert bank_lib.bytes_per_atom(shape, "bfloat16", shared_tail=576) == 2 * 2_496 == 4_992
  assert bank_lib.bytes_per_atom(shape, "bfloat16", key_dim=128, shared_tail=576) == 4_992 + 512 == 5_504
  assert bank_lib.bytes_per_atom(shape, "int8") == 19_200 + 30 * 4 == 19_320
  assert bank_lib.bytes_per_atom(shape, "int8", shared_tail=576) == 2_496 + 31 * 4 == 2_620
  assert bank_lib.bytes_per_atom(shape, "float32", shared_tail=576) == 4 * 2_496 == 9_984
  with pytest.raises(ValueError, match="shared_tail must be in"):
    bank_lib.bytes_per_atom(shape, "int8", shared_tail=640)
  # Costs count the copy path's entries once, with or without a bank code dtype.
  assert costs.code_bytes(SMOLLM2_ATOM, 1) == costs.code_bytes(SMOLLM2_ATOM, 1, code_dtype="bfloat16") == 4_992
  assert costs.code_bytes(SMOLLM2_ATOM, 1, number_bytes=4) == costs.code_bytes(SMOLLM2_ATOM, 1,
                                                                                code_dtype="float32") == 9_984
  assert costs.code_bytes(SMOLLM2_ATOM, 10, code_dtype="int8") == 26_200
  common = dict(tokens=2048, atoms=152, text_bytes=9_000, compiler_cfg=SMOLLM2_ATOM, trunc_tokens=256,
                model_cfg=None)
  assert costs.document_bytes("doc2atom", **common)["codes"] == 152 * (4_992 + 512)
