"""Atom banks: round trips (bf16/f32), integrity and crash safety, fingerprints, bad input, padding, sizes."""

import json

import ml_dtypes
import numpy as np
import pytest

from doc2atom_jax.atoms import bank as bank_lib
from doc2atom_jax.atoms.atomize import ATOM_TYPES, Atom
from doc2atom_jax.errors import UserError

SHAPE = (2, 1, 1, 4)  # L, n_t, r, c
KEY_DIM = 3
FP = "smollm2-135m/compiler-r1c4/cfg-abc123"


def make_doc(doc_id, sentences, seed=0, shape=SHAPE, key_dim=KEY_DIM):
  """A document whose atoms are its sentences, with random codes and keys."""
  text = " ".join(sentences)
  atoms, start = [], 0
  for i, sentence in enumerate(sentences):
    atoms.append(Atom(doc_id, i, sentence, ATOM_TYPES[i % len(ATOM_TYPES)], start, start + len(sentence),
                      3 * i, 3 * i + 3))
    start += len(sentence) + 1
  rng = np.random.default_rng(seed)
  n = len(sentences)
  codes = rng.standard_normal((n, *shape)).astype(np.float32)
  keys = rng.standard_normal((n, key_dim)).astype(np.float32)
  return bank_lib.BankDocument(doc_id, text, tuple(atoms), codes, keys)


DOC_A = make_doc("a", ["Alpha is a letter.", "It was 1990.", "Bob met Carol."], seed=1)
DOC_B = make_doc("b", ["Zeta ends it."], seed=2)


def new_bank(tmp_path, docs=(DOC_A, DOC_B), code_dtype="bfloat16", name="bank"):
  path = tmp_path / name
  bank_lib.create(path, fingerprint=FP, meta={"method": "doc2atom", "rank": 1}, code_dtype=code_dtype)
  for doc in docs:
    bank_lib.append(path, doc, fingerprint=FP)
  return path


def snapshot(path):
  """Every file under `path` with its bytes, to prove a failed call changed nothing."""
  return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def first_shard(path):
  return path / json.loads((path / "manifest.json").read_text())["documents"][0]["shard"]


# ---------------------------------------------------------------------------------------------------------
# Round trips.


def test_bf16_round_trip_concatenates_in_append_order(tmp_path):
  bank = bank_lib.load(new_bank(tmp_path), fingerprint=FP)
  assert len(bank) == 4 and bank.doc_ids == ["a", "b"] and bank.code_dtype == "bfloat16"
  np.testing.assert_array_equal(bank.doc_offsets, [0, 3, 4])
  expected = np.concatenate([DOC_A.codes, DOC_B.codes])
  np.testing.assert_array_equal(bank.codes, expected.astype(ml_dtypes.bfloat16).astype(np.float32))
  assert not np.array_equal(bank.codes, expected)  # really stored as bfloat16
  assert bank.codes.dtype == np.float32 and bank.keys.dtype == np.float32 and bank.types.dtype == np.int32
  np.testing.assert_array_equal(bank.keys, np.concatenate([DOC_A.keys, DOC_B.keys]))
  np.testing.assert_array_equal(bank.types, [ATOM_TYPES.index(a.type) for a in DOC_A.atoms + DOC_B.atoms])
  assert bank.atoms == list(DOC_A.atoms + DOC_B.atoms)
  assert bank.texts == {"a": DOC_A.text, "b": DOC_B.text}
  assert bank.meta == {"method": "doc2atom", "rank": 1} and bank.fingerprint == FP


def test_float32_storage_is_exact_and_document_returns_what_was_appended(tmp_path):
  bank = bank_lib.load(new_bank(tmp_path, code_dtype="float32"))
  for doc in (DOC_A, DOC_B):
    got = bank.document(doc.doc_id)
    assert got.doc_id == doc.doc_id and got.text == doc.text and got.atoms == doc.atoms
    assert all(isinstance(a, Atom) for a in got.atoms)
    np.testing.assert_array_equal(got.codes, doc.codes)
    np.testing.assert_array_equal(got.keys, doc.keys)
  with pytest.raises(UserError, match="no document 'zz'"):
    bank.document("zz")


def test_append_many_and_empty_bank(tmp_path):
  path = new_bank(tmp_path, docs=())
  empty = bank_lib.load(path)
  assert len(empty) == 0 and empty.doc_ids == [] and empty.codes.shape[0] == 0
  codes, keys, mask = empty.padded()
  assert codes.shape[0] == keys.shape[0] == 64 and not mask.any()
  bank_lib.append_many(path, [DOC_A, DOC_B], fingerprint=FP)
  assert bank_lib.load(path).doc_ids == ["a", "b"]


def test_info_reads_the_manifest_only(tmp_path):
  path = new_bank(tmp_path)
  for shard in (path / "shards").iterdir():
    shard.write_bytes(b"")  # info must not look at shards
  summary = bank_lib.info(path)
  assert summary["num_documents"] == 2 and summary["num_atoms"] == 4
  assert summary["fingerprint"] == FP and summary["meta"]["method"] == "doc2atom"
  assert summary["code_shape"] == list(SHAPE) and summary["key_dim"] == KEY_DIM
  assert summary["doc_ids"] == ["a", "b"] and summary["bytes"] > 0
  assert summary["bytes_per_atom"] == bank_lib.bytes_per_atom(SHAPE, "bfloat16")


# ---------------------------------------------------------------------------------------------------------
# Sizes and padding.


@pytest.mark.parametrize("code_dtype, itemsize", [("bfloat16", 2), ("float32", 4)])
def test_bytes_per_atom_matches_formula_and_shard_data(tmp_path, code_dtype, itemsize):
  assert bank_lib.bytes_per_atom(SHAPE, code_dtype) == np.prod(SHAPE) * itemsize
  assert bank_lib.bytes_per_atom((7, *SHAPE), code_dtype, key_dim=KEY_DIM) == np.prod(SHAPE) * itemsize + 12
  path = new_bank(tmp_path, docs=(DOC_A,), code_dtype=code_dtype)
  data = first_shard(path).read_bytes()
  header_len = int.from_bytes(data[:8], "little")
  n = len(DOC_A.atoms)
  tensor_bytes = len(data) - 8 - header_len  # safetensors: length, JSON header, then the raw tensors
  assert tensor_bytes == n * bank_lib.bytes_per_atom(SHAPE, code_dtype, key_dim=KEY_DIM) + n * 4  # + types


@pytest.mark.parametrize("n, size", [(0, 64), (1, 64), (64, 64), (65, 256), (1024, 1024), (5000, 16384),
                                     (70000, 262144)])
def test_bucket_ladder_grows_without_bound(n, size):
  assert bank_lib.bucket_size(n) == size


def test_custom_buckets():
  assert bank_lib.bucket_size(5, (8, 4, 16)) == 8
  with pytest.raises(UserError, match="largest bucket"):
    bank_lib.bucket_size(17, (8, 16))


def test_padded_shapes_mask_and_zero_padding(tmp_path):
  bank = bank_lib.load(new_bank(tmp_path))
  codes, keys, mask = bank.padded()
  assert codes.shape == (64, *SHAPE) and keys.shape == (64, KEY_DIM) and mask.shape == (64,)
  assert mask.dtype == bool and mask[:4].all() and not mask[4:].any()
  np.testing.assert_array_equal(codes[:4], bank.codes)
  np.testing.assert_array_equal(keys[:4], bank.keys)
  assert not codes[4:].any() and not keys[4:].any()
  assert bank.padded(bucket_sizes=(2, 8))[0].shape[0] == 8


def test_banks_of_different_sizes_in_one_bucket_pad_alike(tmp_path):
  small = bank_lib.load(new_bank(tmp_path, docs=(DOC_B,), name="small"))
  large = bank_lib.load(new_bank(tmp_path, docs=(DOC_A, DOC_B), name="large"))
  assert len(small) != len(large)
  assert [x.shape for x in small.padded()] == [x.shape for x in large.padded()]


# ---------------------------------------------------------------------------------------------------------
# Integrity and crash safety.


def test_missing_bank(tmp_path):
  with pytest.raises(UserError, match="no atom bank at"):
    bank_lib.load(tmp_path / "nowhere")
  with pytest.raises(UserError, match="no atom bank at"):
    bank_lib.append(tmp_path / "nowhere", DOC_A, fingerprint=FP)
  with pytest.raises(UserError, match="no atom bank at"):
    bank_lib.info(tmp_path)


def truncate_shard(path):
  shard = first_shard(path)
  shard.write_bytes(shard.read_bytes()[:-5])
  return shard


def flip_shard_byte(path):
  shard = first_shard(path)
  data = bytearray(shard.read_bytes())
  data[len(data) // 2] ^= 0x01
  shard.write_bytes(bytes(data))
  return shard


def delete_shard(path):
  shard = first_shard(path)
  shard.unlink()
  return shard


def break_manifest_json(path):
  manifest = path / "manifest.json"
  manifest.write_text(manifest.read_text()[:-20])
  return manifest


def edit_manifest_meta(path):
  """Valid JSON, wrong content: only the checksum can tell."""
  manifest = path / "manifest.json"
  manifest.write_text(manifest.read_text().replace('"rank": 1', '"rank": 7'))
  return manifest


@pytest.mark.parametrize("damage", [truncate_shard, flip_shard_byte, delete_shard, break_manifest_json,
                                    edit_manifest_meta])
def test_damage_is_a_user_error_naming_the_file(tmp_path, damage):
  path = new_bank(tmp_path)
  file = damage(path)
  with pytest.raises(UserError) as e:
    bank_lib.load(path)
  assert str(file) in str(e.value)


def test_newer_format_version_is_refused(tmp_path):
  path = new_bank(tmp_path)
  manifest = json.loads((path / "manifest.json").read_text())
  manifest["format_version"] = bank_lib.FORMAT_VERSION + 1
  (path / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(UserError, match=f"format version {bank_lib.FORMAT_VERSION + 1}.*upgrade"):
    bank_lib.load(path)


def crash(*args):
  raise KeyboardInterrupt  # the process dies after the shard is written, before the manifest


def test_crash_between_shard_and_manifest_leaves_an_orphan_that_is_ignored_then_cleaned(tmp_path, monkeypatch):
  path = new_bank(tmp_path, docs=(DOC_A,))
  with monkeypatch.context() as m:
    m.setattr(bank_lib, "_write_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
      bank_lib.append(path, DOC_B, fingerprint=FP)
  assert len(list((path / "shards").iterdir())) == 2  # the orphan
  (path / "shards" / "999999.safetensors.tmp").write_bytes(b"junk")  # a killed writer's temp file
  assert bank_lib.load(path).doc_ids == ["a"]
  bank_lib.append(path, make_doc("c", ["Gamma."], seed=3), fingerprint=FP)
  assert bank_lib.load(path).doc_ids == ["a", "c"]
  assert sorted(p.name for p in (path / "shards").iterdir()) == ["000000.safetensors", "000001.safetensors"]


# ---------------------------------------------------------------------------------------------------------
# Fingerprints and bad input.


def test_fingerprint_mismatch(tmp_path):
  path = new_bank(tmp_path)
  other = "gemma-2-2b/compiler-r2c512/cfg-" + "f" * 80
  with pytest.raises(UserError, match="another model/compiler") as e:
    bank_lib.load(path, fingerprint=other)
  assert "smollm2" in str(e.value) and "gemma" in str(e.value) and "f" * 60 not in str(e.value)
  before = snapshot(path)
  with pytest.raises(UserError, match="another model/compiler"):
    bank_lib.append(path, make_doc("c", ["Gamma."]), fingerprint=other)
  assert snapshot(path) == before
  assert len(bank_lib.load(path, fingerprint=None)) == 4


def test_fingerprints_differing_late_are_shown_where_they_differ(tmp_path):
  path = tmp_path / "bank"
  bank_lib.create(path, fingerprint="x" * 100 + "AAA", meta={})
  with pytest.raises(UserError) as e:
    bank_lib.load(path, fingerprint="x" * 100 + "BBB")
  assert "AAA" in str(e.value) and "BBB" in str(e.value)


def test_create_refuses_existing_bank_or_nonempty_dir_and_bad_args(tmp_path):
  path = new_bank(tmp_path)
  with pytest.raises(UserError, match="already exists"):
    bank_lib.create(path, fingerprint=FP, meta={})
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("hi")
  with pytest.raises(UserError, match="not an empty directory"):
    bank_lib.create(tmp_path / "other", fingerprint=FP, meta={})
  with pytest.raises(UserError, match="code dtype"):
    bank_lib.create(tmp_path / "c", fingerprint=FP, meta={}, code_dtype="float16")
  with pytest.raises(UserError, match="plain JSON"):
    bank_lib.create(tmp_path / "d", fingerprint=FP, meta={"x": object()})
  with pytest.raises(UserError, match="fingerprint"):
    bank_lib.create(tmp_path / "e", fingerprint="", meta={})


def test_duplicate_doc_id_changes_nothing(tmp_path):
  path = new_bank(tmp_path)
  before = snapshot(path)
  with pytest.raises(UserError, match="already in the atom bank"):
    bank_lib.append(path, make_doc("a", ["Other text."], seed=9), fingerprint=FP)
  with pytest.raises(UserError, match="already in the atom bank"):
    bank_lib.append_many(path, [make_doc("c", ["C."]), make_doc("c", ["C again."])], fingerprint=FP)
  assert snapshot(path) == before


def test_zero_atoms_writes_nothing(tmp_path):
  path = new_bank(tmp_path)
  before = snapshot(path)
  empty = bank_lib.BankDocument("z", "", (), np.zeros((0, *SHAPE), np.float32), np.zeros((0, KEY_DIM)))
  with pytest.raises(UserError, match="nothing to store"):
    bank_lib.append(path, empty, fingerprint=FP)
  assert snapshot(path) == before


def with_codes(doc, codes):
  return bank_lib.BankDocument(doc.doc_id, doc.text, doc.atoms, codes, doc.keys)


def with_keys(doc, keys):
  return bank_lib.BankDocument(doc.doc_id, doc.text, doc.atoms, doc.codes, keys)


DOC_C = make_doc("c", ["One.", "Two."], seed=4)
BAD_DOCS = {
    "codes rows": (with_codes(DOC_C, DOC_C.codes[:1]), "2 atoms but 1 rows of codes"),
    "keys rows": (with_keys(DOC_C, DOC_C.keys[:1]), "2 atoms but 2 rows of codes and 1 of keys"),
    "codes rank": (with_codes(DOC_C, DOC_C.codes[:, 0]), r"must be \[n, L, n_t, r, c\]"),
    "code shape": (make_doc("c", ["One."], shape=(2, 1, 2, 4)), "do not match the atom bank"),
    "key size": (make_doc("c", ["One."], key_dim=5), "do not match the atom bank"),
    "nan codes": (with_codes(DOC_C, np.where(DOC_C.codes > 0, np.nan, DOC_C.codes)), "NaN or infinite"),
    "inf keys": (with_keys(DOC_C, np.full_like(DOC_C.keys, np.inf)), "NaN or infinite"),
    "bf16 overflow": (with_codes(DOC_C, np.full_like(DOC_C.codes, 3.4e38)), "overflow bfloat16"),
    "foreign atom": (bank_lib.BankDocument("c", DOC_A.text, DOC_A.atoms, DOC_A.codes, DOC_A.keys),
                     "belongs to document 'a'"),
    "wrong span": (bank_lib.BankDocument("c", "One. Two", DOC_C.atoms, DOC_C.codes, DOC_C.keys),
                   "is not the document's characters"),
}


@pytest.mark.parametrize("case", BAD_DOCS)
def test_bad_documents_are_refused_and_change_nothing(tmp_path, case):
  path = new_bank(tmp_path)
  doc, message = BAD_DOCS[case]
  before = snapshot(path)
  with pytest.raises(UserError, match=message):
    bank_lib.append(path, doc, fingerprint=FP)
  assert snapshot(path) == before


# ---------------------------------------------------------------------------------------------------------
# What a resumed compile reads, and a create killed before its manifest.


def test_stored_texts_and_check_fingerprint(tmp_path):
  path = new_bank(tmp_path)
  assert bank_lib.stored_texts(path) == {"a": DOC_A.text, "b": DOC_B.text}
  bank_lib.check_fingerprint(path, FP)
  with pytest.raises(UserError, match="another model/compiler"):
    bank_lib.check_fingerprint(path, FP + "x")
  flip_shard_byte(path)
  with pytest.raises(UserError, match="corrupt"):
    bank_lib.stored_texts(path)


def test_a_create_killed_before_its_manifest_can_be_redone(tmp_path, monkeypatch):
  path = tmp_path / "bank"
  with monkeypatch.context() as m:
    m.setattr(bank_lib, "_write_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
      bank_lib.create(path, fingerprint=FP, meta={})
  assert (path / "shards").is_dir() and not (path / "manifest.json").exists()
  bank_lib.check_new(path)
  new_bank(tmp_path)
  assert bank_lib.load(path).doc_ids == ["a", "b"]
  (tmp_path / "other" / "shards").mkdir(parents=True)
  (tmp_path / "other" / "shards" / "x").write_text("not ours")
  with pytest.raises(UserError, match="not an empty directory"):
    bank_lib.check_new(tmp_path / "other")


def test_an_append_removes_a_killed_manifest_write(tmp_path):
  path = new_bank(tmp_path, docs=(DOC_A,))
  (path / ".manifest.json.abc123.tmp").write_text("{half")
  bank_lib.append(path, DOC_B, fingerprint=FP)
  assert not list(path.glob(".manifest.json.*")) and bank_lib.load(path).doc_ids == ["a", "b"]
