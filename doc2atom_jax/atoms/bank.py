"""Atom banks (DESIGN §2.3–2.5, §9, §11): compiled documents on disk, appended one by one, loaded whole.

A bank stores, per document, its atoms' codes (the compiler's output, turned into LoRA factors by the
linear head later), keys (routing vectors), types and provenance. Nothing here is specific to doc2atom:
a Doc-to-LoRA chunk is an "atom" with a larger rank.

Format (version 1, 2 or 3), a directory:

  manifest.json        {"format": "doc2atom-atom-bank", "format_version": 1 | 2 | 3, "fingerprint", "meta",
                        "code_dtype": "bfloat16" | "float32" | "int8" (2, 3), "key_dtype": "float32" |
                        "bfloat16" (2, 3 only; absent = "float32"), "shared_tail": k > 0 (3 only),
                        "code_shape": [L, n_t, r, c] | null, "key_dim": d_k | null, "atom_types": [...],
                        "num_atoms", "documents": [{"doc_id", "shard", "num_atoms", "bytes", "sha256"}, ...],
                        "checksum": sha256 of the canonical JSON of everything else}
  shards/000042.safetensors
                       one per document; tensors "codes" [n, L, n_t, r, c] (bfloat16 stored as its uint16
                       bit pattern, since safetensors' numpy loader cannot read BF16; or float32; or int8,
                       with "code_scales" [n, L] float32: symmetric absmax quantization per (atom, layer),
                       code = int8 * scale, scale = max |code| / 127 over the layer's n_t·r·c entries,
                       0 for an all-zero layer), "keys" [n, d_k] (float32, or bfloat16 as uint16 bits),
                       "types" [n] int32 (indices into "atom_types");
                       version 3: "codes" holds the first c - k entries, [n, L, n_t, r, c - k], and
                       "shared_codes" [n, n_t, r, k] the last k, the same at every layer (the compiler's
                       copy path), stored once per atom in the same dtype (int8: "code_scales" [n, L] for
                       "codes", "shared_scales" [n] float32 for "shared_codes", absmax over its n_t·r·k);
                       string metadata: format, format_version, doc_id, code_dtype, key_dtype (2, 3 only),
                       text (the document) and atoms (JSON list of {index, type, char_start, char_end,
                       token_start, token_end}; an atom's text is the document slice, checked on append).
  .lock                flock'ed by appenders, so two writers cannot interleave.

A bank is written as version 1 (byte for byte what older programs write and read) unless it uses int8 codes
or bfloat16 keys, which need version 2, or a shared tail (`create(shared_tail=k)`), which needs version 3:
an older program then refuses the bank by its version instead of misreading int8 codes, bfloat16 key bits or
split codes. Codes and keys load as float32 whatever their storage, codes whole ([n, L, n_t, r, c]: the
shared tail broadcast back over the layers); appending codes whose tail differs between layers to a
shared-tail bank is a UserError, never a silently wrong tail.

`code_shape` and `key_dim` are fixed by the first document appended. Appending writes the new shards
atomically (temp + fsync + rename), fsyncs the directory, then replaces the manifest atomically: a crash in
between leaves orphan shards, which `load` never reads (it reads only what the manifest lists) and the
next append deletes. So a kill at any moment leaves a loadable bank of whole documents (mode=compile resumes
from it, `stored_texts`); a `create` killed before its manifest leaves a folder `create` accepts again.
`load` checks every listed shard's size and sha256, and the manifest's own checksum,
so truncated or bit-flipped files are a `UserError` naming the file, never silently wrong numbers.
"""

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import pathlib
from collections.abc import Iterable, Sequence

import ml_dtypes
import numpy as np
import safetensors.numpy

from doc2atom_jax import fileio, shapes
from doc2atom_jax.atoms import atomize
from doc2atom_jax.errors import UserError

FORMAT_VERSION = 3  # the newest version this program reads and writes (versions 1 and 2 are still written)
FORMAT_NAME = "doc2atom-atom-bank"
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
LOCK = ".lock"
CODE_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "int8": np.int8}
KEY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
_STORED_AS = {"bfloat16": np.uint16, "float32": np.float32, "int8": np.int8}  # the array written to the shard
INT8_MAX = 127  # int8 codes are symmetric: -127..127
SCALE_BYTES = 4  # int8 codes: one float32 scale per (atom, layer), and one for an atom's shared tail
_SHARED_NAMES = {"codes": "shared_codes", "code_scales": "shared_scales"}  # version 3: the tail's tensors
_FIRST_BUCKET = 64
_BUCKET_GROWTH = 4


@dataclasses.dataclass(frozen=True)
class BankDocument:
  """One compiled document, as appended to (and returned from) a bank."""
  doc_id: str
  text: str  # the document text: ask mode prints atom spans from it
  atoms: tuple  # tuple[atomize.Atom, ...]
  codes: np.ndarray  # [n, L, n_t, r, c] float32
  keys: np.ndarray  # [n, d_k] float32


@dataclasses.dataclass
class AtomBank:
  """A loaded bank: all documents concatenated along the atom axis, in append order."""
  path: pathlib.Path
  fingerprint: str
  meta: dict
  doc_ids: list[str]
  doc_offsets: np.ndarray  # [num_docs + 1]: atoms of doc j are rows doc_offsets[j]:doc_offsets[j + 1]
  codes: np.ndarray  # [N, L, n_t, r, c] float32
  keys: np.ndarray  # [N, d_k] float32
  types: np.ndarray  # [N] int32, indices into atomize.ATOM_TYPES
  atoms: list  # list[atomize.Atom], N entries
  texts: dict[str, str]  # doc_id -> document text
  code_dtype: str  # how the codes are stored ("bfloat16", "float32" or "int8")
  key_dtype: str = "float32"  # how the keys are stored ("float32" or "bfloat16")
  _padded: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)  # bucket -> padded arrays
  _lexicon: object = dataclasses.field(default=None, repr=False, compare=False)  # fusion.Lexicon, built on use

  def __len__(self) -> int:
    return len(self.atoms)

  def document(self, doc_id: str) -> BankDocument:
    """The stored document `doc_id` (views into the bank's arrays)."""
    try:
      j = self.doc_ids.index(doc_id)
    except ValueError:
      shown = ", ".join(map(repr, self.doc_ids[:5])) + (", ..." if len(self.doc_ids) > 5 else "")
      raise UserError(f"no document {doc_id!r} in the atom bank at {self.path} "
                      f"({len(self.doc_ids)} documents: {shown})") from None
    rows = slice(int(self.doc_offsets[j]), int(self.doc_offsets[j + 1]))
    return BankDocument(doc_id, self.texts[doc_id], tuple(self.atoms[rows]), self.codes[rows], self.keys[rows])

  def padded(self, bucket_sizes: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes, keys, mask) padded with zeros (mask False) to `bucket_size(len(self))` rows.

    Jitted routing and composition then trace once per bucket, not once per bank size.
    """
    n, size = len(self), bucket_size(len(self), bucket_sizes)
    if size not in self._padded:  # routing and composition both ask for it: pad once per bucket
      codes = np.zeros((size, *self.codes.shape[1:]), np.float32)
      keys = np.zeros((size, *self.keys.shape[1:]), np.float32)
      codes[:n], keys[:n] = self.codes, self.keys
      self._padded[size] = (codes, keys, np.arange(size) < n)
    return self._padded[size]


def bucket_size(n: int, bucket_sizes: Sequence[int] | None = None) -> int:
  """The smallest bucket >= n: from `bucket_sizes`, or else the unbounded ladder 64, 256, 1024, ..."""
  if bucket_sizes is None:
    return shapes.ladder(n, _FIRST_BUCKET, _BUCKET_GROWTH)
  fitting = [b for b in bucket_sizes if b >= n]
  if not fitting:
    raise UserError(f"{n} atoms do not fit the largest bucket ({max(bucket_sizes, default=0)}); "
                    "add a larger bucket size")
  return min(fitting)


def code_numbers(codes_shape: Sequence[int], shared_tail: int = 0) -> int:
  """Numbers stored for one atom's codes: L·n_t·r·(c - k) + n_t·r·k, the shared tail (k entries) once.

  `codes_shape` is (L, n_t, r, c) or a whole codes shape (n, L, n_t, r, c).
  """
  if len(codes_shape) not in (4, 5):
    raise ValueError(f"expected (L, n_t, r, c) or (n, L, n_t, r, c), got {tuple(codes_shape)}")
  L, n_t, r, c = codes_shape[-4:]
  if shared_tail < 0 or shared_tail and shared_tail >= c:
    raise ValueError(f"shared_tail must be in [0, c) (got {shared_tail}, c {c})")
  return n_t * r * (L * (c - shared_tail) + shared_tail)


def bytes_per_atom(codes_shape: Sequence[int], code_dtype: str = "bfloat16", *, key_dim: int = 0,
                   key_dtype: str = "float32", shared_tail: int = 0) -> int:
  """Storage bytes of one atom's codes (int8: with their float32 scales, one per layer plus one for a shared
  tail), plus its key if `key_dim`, as the shard's tensors hold them; `code_numbers` counts the codes.
  """
  codes = code_numbers(codes_shape, shared_tail) * np.dtype(_code_dtype(code_dtype)).itemsize
  scales = (codes_shape[-4] + bool(shared_tail)) * SCALE_BYTES if code_dtype == "int8" else 0
  return codes + scales + key_dim * np.dtype(_key_dtype(key_dtype)).itemsize


def quantize_int8(codes) -> tuple[np.ndarray, np.ndarray]:
  """float codes [..., L, n_t, r, c] -> (int8 codes, float32 scales [..., L]): symmetric absmax per layer
  (a shared tail [n, n_t, r, k] gets one scale per atom).

  scale = max |x| / 127 over the layer's n_t·r·c entries (0 for an all-zero layer); q = round(x / scale), so
  |q · scale - x| <= scale / 2 elementwise (up to float32 rounding of the product).
  """
  x = np.asarray(codes, np.float32)
  absmax = np.max(np.abs(x), axis=(-3, -2, -1)) if x.size else np.zeros(x.shape[:-3], np.float32)
  scales = (absmax.astype(np.float64) / INT8_MAX).astype(np.float32)
  # An absmax below 127 · 2^-149 underflows to a zero scale: use the smallest positive float32 instead.
  scales = np.where((absmax > 0) & (scales == 0), np.finfo(np.float32).smallest_subnormal, scales)
  safe = np.where(scales > 0, scales, 1).astype(np.float64)[..., None, None, None]
  q = np.clip(np.rint(x / safe), -INT8_MAX, INT8_MAX).astype(np.int8)  # float64: no overflow near float32 max
  return q, scales


def dequantize_int8(q, scales) -> np.ndarray:
  """int8 codes [..., L, n_t, r, c] and float32 scales [..., L] -> float32 codes."""
  return np.asarray(q, np.float32) * np.asarray(scales, np.float32)[..., None, None, None]


def roundtrip_codes(codes, code_dtype: str, shared_tail: int = 0) -> np.ndarray:
  """float32 codes as a bank stored as `code_dtype` (with `shared_tail`) returns them: rounded or quantized,
  back in float32 (int8: the tail quantized per atom). Codes whose tail differs between layers are a
  ValueError: such a bank refuses them."""
  _code_dtype(code_dtype)
  if shared_tail:
    if not _tail_is_shared(codes, shared_tail):
      raise ValueError(f"the last {shared_tail} code entries differ between layers: no shared-tail storage")
    head, tail = _split_tail(codes, shared_tail)
    return _join_tail(roundtrip_codes(head, code_dtype), roundtrip_codes(tail, code_dtype))
  if code_dtype == "int8":
    return dequantize_int8(*quantize_int8(codes))
  return np.asarray(codes, np.float32).astype(CODE_DTYPES[code_dtype]).astype(np.float32)


def roundtrip_keys(keys, key_dtype: str = "float32") -> np.ndarray:
  """float32 keys as a bank stored with `key_dtype` returns them."""
  return np.asarray(keys, np.float32).astype(_key_dtype(key_dtype)).astype(np.float32)


def format_version(code_dtype: str, key_dtype: str = "float32", shared_tail: int = 0) -> int:
  """The format version a bank is written as: the oldest that holds it (3: a shared tail; 2: int8 codes or
  bfloat16 keys; else 1), so older programs read every bank they can."""
  if shared_tail:
    return 3
  return 1 if code_dtype in ("bfloat16", "float32") and key_dtype == "float32" else 2


# --------------------------------------------------------------------------------------------------------
# Public operations.


def create(path, *, fingerprint: str, meta: dict, code_dtype: str = "bfloat16", key_dtype: str = "float32",
           shared_tail: int = 0) -> None:
  """Makes a new, empty bank at `path`; an existing bank (or any non-empty directory) is a UserError.

  `shared_tail` k > 0: the last k entries of every code are the same at every layer (the compiler's copy path,
  `copy_dim`) and are stored once per atom (version 3), not L times.
  """
  path = pathlib.Path(path).expanduser()
  _code_dtype(code_dtype)
  _key_dtype(key_dtype)
  if not isinstance(fingerprint, str) or not fingerprint:
    raise UserError("an atom bank needs a non-empty fingerprint string (base model + compiler + config)")
  if isinstance(shared_tail, bool) or not isinstance(shared_tail, int) or shared_tail < 0:
    raise UserError(f"an atom bank's shared_tail must be a whole number >= 0, got {shared_tail!r}")
  check_new(path)
  version = format_version(code_dtype, key_dtype, shared_tail)
  manifest = {"format": FORMAT_NAME, "format_version": version, "fingerprint": fingerprint,
              "meta": _json_roundtrip(meta, "bank metadata"), "code_dtype": code_dtype,
              **({"key_dtype": key_dtype} if version >= 2 else {}),
              **({"shared_tail": shared_tail} if version >= 3 else {}), "code_shape": None,
              "key_dim": None, "atom_types": list(atomize.ATOM_TYPES), "num_atoms": 0, "documents": []}
  (path / SHARD_DIR).mkdir(parents=True, exist_ok=True)
  (path / LOCK).touch()
  _write_manifest(path, manifest)


def check_new(path) -> None:
  """A UserError unless `create(path)` can make a bank there: nothing there, an empty folder, or what an
  interrupted `create` left (an empty shards/ and the lock file, no manifest yet)."""
  path = pathlib.Path(path).expanduser()
  if (path / MANIFEST).exists():
    raise UserError(f"an atom bank already exists at {path}; choose another path or delete it first")
  if path.exists() and (not path.is_dir() or not _empty_or_unfinished(path)):
    raise UserError(f"{path} exists and is not an empty directory; choose another path for the atom bank")


def _empty_or_unfinished(path: pathlib.Path) -> bool:
  """True for an empty folder, or one holding only an empty shards/ and .lock (create killed before its manifest)."""
  names = {p.name for p in path.iterdir()}
  shards = path / SHARD_DIR
  return names <= {SHARD_DIR, LOCK} and (SHARD_DIR not in names or (shards.is_dir() and not any(shards.iterdir())))


def stored_texts(path) -> dict[str, str]:
  """doc_id -> document text of every document in the bank, from its verified shards (no codes decoded).

  What a resumed compile compares its input with: the same text is skipped, another text under a stored id is
  an error before anything is written.
  """
  path = pathlib.Path(path).expanduser()
  manifest = _read_manifest(path)
  texts = {}
  for entry in manifest["documents"]:
    file = path / entry["shard"]
    data = _verified_bytes(file, entry)
    try:
      texts[entry["doc_id"]] = _shard_metadata(data)["text"]
    except (ValueError, KeyError, TypeError) as e:  # sha256 matched: only a hand-made file gets here
      raise UserError(f"{file} is not a valid atom bank shard ({type(e).__name__}: {e})") from None
  return texts


def check_fingerprint(path, fingerprint: str) -> None:
  """A UserError if the bank at `path` was made by another model/compiler than `fingerprint` names."""
  path = pathlib.Path(path).expanduser()
  _check_fingerprint(path, _read_manifest(path)["fingerprint"], fingerprint)


def append(path, document: BankDocument, *, fingerprint: str) -> None:
  """Adds one document to the bank at `path` (see `append_many`)."""
  append_many(path, [document], fingerprint=fingerprint)


def append_many(path, documents: Iterable[BankDocument], *, fingerprint: str) -> None:
  """Adds documents in order, all or none: every check passes before anything is written.

  The manifest is rewritten once, after all shards are on disk.
  """
  path = pathlib.Path(path).expanduser()
  documents = list(documents)
  for doc in documents:
    _check_document(doc)
  with _locked(path):
    manifest = _read_manifest(path)
    _check_fingerprint(path, manifest["fingerprint"], fingerprint)
    _check_fit(manifest, documents)
    if not documents:
      return
    _remove_orphans(path, manifest)
    entries = [_write_shard(path, len(manifest["documents"]) + i, doc, manifest)
               for i, doc in enumerate(documents)]
    _fsync_dir(path / SHARD_DIR)
    _write_manifest(path, _with_documents(manifest, documents, entries))


def load(path, *, fingerprint: str | None = None) -> AtomBank:
  """The whole bank, every shard verified; `fingerprint` (unless None) must match the bank's."""
  path = pathlib.Path(path).expanduser()
  manifest = _read_manifest(path)
  if fingerprint is not None:
    _check_fingerprint(path, manifest["fingerprint"], fingerprint)
  if manifest["atom_types"] != list(atomize.ATOM_TYPES):
    raise UserError(f"the atom bank at {path} uses atom types {manifest['atom_types']}, this program "
                    f"{list(atomize.ATOM_TYPES)}; rebuild the bank")
  docs = manifest["documents"]
  offsets = np.cumsum([0] + [d["num_atoms"] for d in docs])
  code_shape, key_dim = manifest["code_shape"] or (0, 0, 0, 0), manifest["key_dim"] or 0
  codes = np.empty((offsets[-1], *code_shape), np.float32)
  keys = np.empty((offsets[-1], key_dim), np.float32)
  types = np.empty((offsets[-1],), np.int32)
  atoms, texts = [], {}
  for j, entry in enumerate(docs):
    rows = slice(offsets[j], offsets[j + 1])
    doc, types[rows] = _read_shard(path, entry, manifest)
    codes[rows], keys[rows], texts[doc.doc_id] = doc.codes, doc.keys, doc.text
    atoms.extend(doc.atoms)
  return AtomBank(path, manifest["fingerprint"], manifest["meta"], [d["doc_id"] for d in docs], offsets,
                  codes, keys, types, atoms, texts, manifest["code_dtype"], _manifest_key_dtype(manifest))


def info(path) -> dict:
  """A summary from the manifest alone (no shard is read)."""
  path = pathlib.Path(path).expanduser()
  manifest = _read_manifest(path)
  docs = manifest["documents"]
  shape, tail = manifest["code_shape"], _manifest_shared_tail(manifest)
  return {"path": str(path), "format_version": manifest["format_version"],
          "fingerprint": manifest["fingerprint"], "meta": manifest["meta"],
          "code_dtype": manifest["code_dtype"], "key_dtype": _manifest_key_dtype(manifest),
          "code_shape": shape, "shared_tail": tail, "key_dim": manifest["key_dim"],
          "num_documents": len(docs), "num_atoms": manifest["num_atoms"],
          "bytes": sum(d["bytes"] for d in docs),
          "bytes_per_atom": bytes_per_atom(shape, manifest["code_dtype"], shared_tail=tail) if shape else None,
          "doc_ids": [d["doc_id"] for d in docs]}


# --------------------------------------------------------------------------------------------------------
# Checks on documents to append.


def _check_document(doc: BankDocument) -> None:
  """A document must be self-consistent before it can be compared with a bank."""
  if not isinstance(doc, BankDocument):
    raise TypeError(f"expected a BankDocument, got {type(doc).__name__}")
  if not isinstance(doc.doc_id, str) or not doc.doc_id:
    raise UserError(f"a document id must be a non-empty string, got {doc.doc_id!r}")
  where = f"document {doc.doc_id!r}"
  n = len(doc.atoms)
  if n == 0:
    raise UserError(f"{where} has no atoms: nothing to store in the atom bank")
  codes, keys = np.asarray(doc.codes), np.asarray(doc.keys)
  if codes.ndim != 5 or keys.ndim != 2:
    raise UserError(f"{where}: codes must be [n, L, n_t, r, c] and keys [n, d_k], "
                    f"got {codes.shape} and {keys.shape}")
  if codes.shape[0] != n or keys.shape[0] != n:
    raise UserError(f"{where}: {n} atoms but {codes.shape[0]} rows of codes and {keys.shape[0]} of keys")
  for name, array in (("codes", codes), ("keys", keys)):
    if not np.all(np.isfinite(array)):
      raise UserError(f"{where}: {name} contain NaN or infinite values; refusing to store them")
  for i, atom in enumerate(doc.atoms):
    _check_atom(doc, i, atom)


def _check_atom(doc: BankDocument, i: int, atom) -> None:
  """An atom's provenance must point into its document, since ask mode prints spans from the text."""
  where = f"document {doc.doc_id!r}, atom {i}"
  if not isinstance(atom, atomize.Atom):
    raise TypeError(f"{where}: expected an atomize.Atom, got {type(atom).__name__}")
  if atom.doc_id != doc.doc_id:
    raise UserError(f"{where} belongs to document {atom.doc_id!r}")
  if atom.type not in atomize.ATOM_TYPES:
    raise UserError(f"{where}: unknown atom type {atom.type!r}; valid: {', '.join(atomize.ATOM_TYPES)}")
  if not 0 <= atom.char_start <= atom.char_end <= len(doc.text) or \
      doc.text[atom.char_start:atom.char_end] != atom.text:
    raise UserError(f"{where}: text {atom.text[:40]!r} is not the document's characters "
                    f"[{atom.char_start}:{atom.char_end}]")


def _check_fit(manifest: dict, documents: list[BankDocument]) -> None:
  """New documents must have fresh ids, the bank's shapes, and codes representable in its dtype."""
  seen = {d["doc_id"] for d in manifest["documents"]}
  code_shape, key_dim = manifest["code_shape"], manifest["key_dim"]
  for doc in documents:
    if doc.doc_id in seen:
      raise UserError(f"document {doc.doc_id!r} is already in the atom bank; give it another id")
    seen.add(doc.doc_id)
    shape, dim = list(np.shape(doc.codes)[1:]), np.shape(doc.keys)[1]
    code_shape, key_dim = code_shape or shape, key_dim or dim
    if shape != code_shape or dim != key_dim:
      raise UserError(f"document {doc.doc_id!r}: codes [L, n_t, r, c] = {shape} and key size {dim} do not "
                      f"match the atom bank's {code_shape} and {key_dim}")
    tail = _manifest_shared_tail(manifest)
    if tail and tail >= shape[-1]:
      raise UserError(f"document {doc.doc_id!r}: codes of {shape[-1]} entries cannot have the atom bank's "
                      f"shared tail of {tail} entries")
    if tail and not _tail_is_shared(doc.codes, tail):
      raise UserError(f"document {doc.doc_id!r}: the last {tail} code entries differ between layers, but the "
                      f"atom bank stores them once per atom (shared_tail {tail}); compile with copy_dim {tail}, "
                      "or use a bank created with shared_tail=0")
    code_dtype, key_dtype = manifest["code_dtype"], _manifest_key_dtype(manifest)
    if code_dtype != "int8" and not np.all(np.isfinite(roundtrip_codes(doc.codes, code_dtype))):
      raise UserError(f"document {doc.doc_id!r}: codes overflow {code_dtype}; store the bank in float32")
    if not np.all(np.isfinite(roundtrip_keys(doc.keys, key_dtype))):
      raise UserError(f"document {doc.doc_id!r}: keys overflow {key_dtype}; store the keys in float32")


def _check_fingerprint(path: pathlib.Path, bank: str, current: str) -> None:
  if bank != current:
    a, b = _shorten_pair(bank, current)
    raise UserError(f"the atom bank at {path} was made by another model/compiler (bank fingerprint {a}, "
                    f"current {b}); rebuild the bank or use the model and compiler that made it")


def _shorten_pair(a: str, b: str, width: int = 32) -> tuple[str, str]:
  """Both strings cut to a window of `width` characters around where they first differ."""
  first_diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
  start = max(0, first_diff - width // 4)

  def cut(s):
    return ("…" if start else "") + s[start:start + width] + ("…" if len(s) > start + width else "")

  return repr(cut(a)), repr(cut(b))


# --------------------------------------------------------------------------------------------------------
# Shards.


def _write_shard(path: pathlib.Path, number: int, doc: BankDocument, manifest: dict) -> dict:
  """Writes one document's shard atomically; returns its manifest entry."""
  name = f"{SHARD_DIR}/{number:06d}.safetensors"
  data = _encode_shard(doc, manifest)
  with fileio.atomic_open(path / name, "wb") as f:
    f.write(data)
  return {"doc_id": doc.doc_id, "shard": name, "num_atoms": len(doc.atoms), "bytes": len(data),
          "sha256": hashlib.sha256(data).hexdigest()}


def _encode_shard(doc: BankDocument, manifest: dict) -> bytes:
  code_dtype, key_dtype, version = manifest["code_dtype"], _manifest_key_dtype(manifest), manifest["format_version"]
  tensors = {**_code_tensors(doc.codes, code_dtype, _manifest_shared_tail(manifest)),
             "keys": _key_tensor(doc.keys, key_dtype),
             "types": np.array([atomize.ATOM_TYPES.index(a.type) for a in doc.atoms], np.int32)}
  atoms = [_atom_record(a) for a in doc.atoms]
  metadata = {"format": FORMAT_NAME, "format_version": str(version), "doc_id": doc.doc_id,
              "code_dtype": code_dtype, **({"key_dtype": key_dtype} if version >= 2 else {}),
              "text": doc.text, "atoms": json.dumps(atoms, separators=(",", ":"))}
  return safetensors.numpy.save(tensors, metadata=metadata)


def _atom_record(atom: atomize.Atom) -> dict:
  """The atom's provenance; doc_id and text are restored from the shard's document."""
  return {"index": int(atom.index), "type": atom.type, "char_start": int(atom.char_start),
          "char_end": int(atom.char_end), "token_start": int(atom.token_start), "token_end": int(atom.token_end)}


def _code_tensors(codes, code_dtype: str, shared_tail: int = 0) -> dict[str, np.ndarray]:
  """float32 codes -> the tensors written to disk: "codes" (bfloat16 as its uint16 bit pattern; int8 with
  "code_scales" [n, L] float32); with a shared tail, "codes" holds the per-layer part and "shared_codes"
  (int8: with "shared_scales" [n]) the tail, once per atom."""
  if shared_tail:
    head, tail = _split_tail(codes, shared_tail)
    return {**_code_tensors(head, code_dtype),
            **{_SHARED_NAMES[name]: t for name, t in _code_tensors(tail, code_dtype).items()}}
  if code_dtype == "int8":
    q, scales = quantize_int8(codes)
    return {"codes": np.ascontiguousarray(q), "code_scales": np.ascontiguousarray(scales, np.float32)}
  cast = np.asarray(codes, np.float32).astype(CODE_DTYPES[code_dtype])
  return {"codes": np.ascontiguousarray(cast.view(_STORED_AS[code_dtype]))}


def _loaded_codes(tensors: dict, code_dtype: str, shared_tail: int = 0) -> np.ndarray:
  """The shard's code tensors -> float32 codes (the inverse of `_code_tensors`, up to its rounding)."""
  if shared_tail:
    tail = _loaded_codes({name: tensors[shared] for name, shared in _SHARED_NAMES.items()
                          if name == "codes" or code_dtype == "int8"}, code_dtype)
    return _join_tail(_loaded_codes(tensors, code_dtype), tail)
  stored = tensors["codes"]
  if stored.dtype != _STORED_AS[code_dtype]:
    raise ValueError(f"codes are {stored.dtype}, expected {np.dtype(_STORED_AS[code_dtype])} for {code_dtype}")
  if code_dtype == "int8":
    scales = tensors["code_scales"]
    if scales.dtype != np.float32 or scales.shape != stored.shape[:-3]:
      raise ValueError(f"code_scales are {scales.dtype} {scales.shape}, expected float32 {stored.shape[:-3]}")
    return dequantize_int8(stored, scales)
  return stored.view(CODE_DTYPES[code_dtype]).astype(np.float32)


def _key_tensor(keys, key_dtype: str) -> np.ndarray:
  """float32 keys -> the array written to disk (bfloat16 as its uint16 bit pattern)."""
  cast = np.asarray(keys, np.float32).astype(KEY_DTYPES[key_dtype])
  return np.ascontiguousarray(cast.view(np.uint16) if key_dtype == "bfloat16" else cast)


def _loaded_keys(stored: np.ndarray, key_dtype: str) -> np.ndarray:
  expected = np.uint16 if key_dtype == "bfloat16" else np.float32
  if stored.dtype != expected:
    raise ValueError(f"keys are {stored.dtype}, expected {np.dtype(expected)} for {key_dtype}")
  return stored.view(KEY_DTYPES[key_dtype]).astype(np.float32)


def _read_shard(path: pathlib.Path, entry: dict, manifest: dict) -> tuple[BankDocument, np.ndarray]:
  """One verified shard as (document with float32 codes, types)."""
  file = path / entry["shard"]
  data = _verified_bytes(file, entry)
  expected = _stored_shapes(entry["num_atoms"], manifest)
  try:
    tensors = safetensors.numpy.load(data)
    meta = _shard_metadata(data)
    atoms = tuple(atomize.Atom(doc_id=entry["doc_id"], text=meta["text"][a["char_start"]:a["char_end"]], **a)
                  for a in json.loads(meta["atoms"]))
    doc_id, text, code_dtype = meta["doc_id"], meta["text"], meta["code_dtype"]
    key_dtype = meta.get("key_dtype", "float32")  # version 1: no key_dtype
    _code_dtype(code_dtype), _key_dtype(key_dtype)
    stored = {name: tensors[name].shape for name in expected if name in tensors}
    # Decoded only when the stored shapes are the manifest's: a split code must not join into a wrong one.
    codes = _loaded_codes(tensors, code_dtype, _manifest_shared_tail(manifest)) if stored == expected else None
    keys, types = _loaded_keys(tensors["keys"], key_dtype), tensors["types"]
  except Exception as e:  # sha256 matched, so only a hand-made or foreign file gets here
    raise UserError(f"{file} is not a valid atom bank shard ({type(e).__name__}: {e})") from None
  if codes is None or doc_id != entry["doc_id"] or len(atoms) != len(types):
    raise UserError(f"{file} does not match {path / MANIFEST} (document {doc_id!r}, code tensors {stored}, "
                    f"expected {expected})")
  return BankDocument(doc_id, text, atoms, codes, keys), types


def _stored_shapes(num_atoms: int, manifest: dict) -> dict[str, tuple]:
  """The shapes of a shard's code tensors, as the manifest describes the bank."""
  L, n_t, r, c = manifest["code_shape"]
  k = _manifest_shared_tail(manifest)
  return {"codes": (num_atoms, L, n_t, r, c - k), **({"shared_codes": (num_atoms, n_t, r, k)} if k else {})}


def _shard_metadata(data: bytes) -> dict:
  """A safetensors shard's string metadata, from its JSON header alone (no tensor decoded)."""
  return json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"]


def _verified_bytes(file: pathlib.Path, entry: dict) -> bytes:
  """The file's bytes, if their size and sha256 match the manifest entry."""
  try:
    data = file.read_bytes()
  except FileNotFoundError:
    raise UserError(f"{file} is missing (listed in the atom bank's manifest); the bank is damaged") from None
  except OSError as e:
    raise UserError(f"cannot read {file}: {e.strerror}") from None
  if len(data) != entry["bytes"]:
    raise UserError(f"{file} is truncated or corrupt: {len(data)} bytes, the manifest says {entry['bytes']}")
  if hashlib.sha256(data).hexdigest() != entry["sha256"]:
    raise UserError(f"{file} is corrupt: its sha256 does not match the manifest")
  return data


def _remove_orphans(path: pathlib.Path, manifest: dict) -> None:
  """Deletes shard-directory files the manifest does not list, and temporary manifests (left by a crash
  mid-append)."""
  listed = {pathlib.PurePath(d["shard"]).name for d in manifest["documents"]}
  for file in (path / SHARD_DIR).iterdir():
    if file.name not in listed and file.is_file():
      file.unlink()
  for file in path.glob(f".{MANIFEST}.*.tmp"):  # a manifest write killed before its rename (we hold the lock)
    file.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------
# Manifest.


def _read_manifest(path: pathlib.Path) -> dict:
  """The manifest, checked for format, version and checksum."""
  file = path / MANIFEST
  if not file.is_file():
    raise UserError(f"no atom bank at {path}" + (" (no manifest.json)" if path.is_dir() else ""))
  try:
    manifest = json.loads(file.read_bytes())
  except (ValueError, OSError) as e:
    raise UserError(f"{file} is corrupt or unreadable ({e}); the atom bank is damaged") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
    raise UserError(f"{file} is not an atom bank manifest")
  version = manifest.get("format_version")
  if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
    raise UserError(f"{file} has atom bank format version {version!r}; this program reads versions up to "
                    f"{FORMAT_VERSION}: upgrade doc2atom_jax or rebuild the bank")
  if manifest.get("checksum") != _checksum(manifest):
    raise UserError(f"{file} is corrupt (checksum mismatch); the atom bank is damaged")
  return manifest


def _write_manifest(path: pathlib.Path, manifest: dict) -> None:
  manifest = {**manifest, "checksum": _checksum(manifest)}
  fileio.atomic_write_text(path / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
  _fsync_dir(path)


def _checksum(manifest: dict) -> str:
  """sha256 of the canonical JSON of the manifest without its checksum: catches edits JSON parsing can't."""
  body = {k: v for k, v in manifest.items() if k != "checksum"}
  canonical = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
  return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _with_documents(manifest: dict, documents: list[BankDocument], entries: list[dict]) -> dict:
  """The manifest after appending `documents` (their shards described by `entries`)."""
  first = documents[0]
  return {**manifest,
          "code_shape": manifest["code_shape"] or [int(x) for x in np.shape(first.codes)[1:]],
          "key_dim": manifest["key_dim"] or int(np.shape(first.keys)[1]),
          "num_atoms": manifest["num_atoms"] + sum(e["num_atoms"] for e in entries),
          "documents": manifest["documents"] + entries}


# --------------------------------------------------------------------------------------------------------
# Small helpers.


def _code_dtype(name: str):
  if name not in CODE_DTYPES:
    raise UserError(f"unknown code dtype {name!r}; valid: {', '.join(CODE_DTYPES)}")
  return CODE_DTYPES[name]


def _key_dtype(name: str):
  if name not in KEY_DTYPES:
    raise UserError(f"unknown key dtype {name!r}; valid: {', '.join(KEY_DTYPES)}")
  return KEY_DTYPES[name]


def _manifest_key_dtype(manifest: dict) -> str:
  return manifest.get("key_dtype", "float32")  # version 1 manifests have none: float32


def _manifest_shared_tail(manifest: dict) -> int:
  return manifest.get("shared_tail", 0)  # versions 1 and 2 have none: every layer's codes whole


def _tail_is_shared(codes, shared_tail: int) -> bool:
  """Whether the last `shared_tail` entries of codes [..., L, n_t, r, c] are the same at every layer (exact)."""
  tail = np.asarray(codes, np.float32)[..., -shared_tail:]
  return bool(np.all(tail == tail[..., :1, :, :, :]))


def _split_tail(codes, shared_tail: int) -> tuple[np.ndarray, np.ndarray]:
  """codes [..., L, n_t, r, c] -> (per-layer part [..., L, n_t, r, c - k], layer 0's tail [..., n_t, r, k])."""
  x = np.asarray(codes, np.float32)
  c = x.shape[-1] - shared_tail
  return x[..., :c], x[..., 0, :, :, c:]


def _join_tail(head: np.ndarray, tail: np.ndarray) -> np.ndarray:
  """The inverse of `_split_tail`: the tail broadcast back over the layers, after the per-layer part."""
  tail = np.broadcast_to(tail[..., None, :, :, :], (*head.shape[:-1], tail.shape[-1]))
  return np.concatenate([head, tail], axis=-1)


def _json_roundtrip(value, what: str):
  """`value` as it will read back from JSON (tuples become lists); non-JSON values are a UserError."""
  try:
    return json.loads(json.dumps(value, allow_nan=False))
  except (TypeError, ValueError) as e:
    raise UserError(f"{what} must be plain JSON (strings, numbers, lists, dicts): {e}") from None


@contextlib.contextmanager
def _locked(path: pathlib.Path):
  """Holds the bank's exclusive lock, so concurrent appenders cannot lose each other's documents."""
  if not (path / MANIFEST).is_file():
    raise UserError(f"no atom bank at {path}; create it first")
  with open(path / LOCK, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _fsync_dir(path: pathlib.Path) -> None:
  """Makes renames inside `path` durable, so the manifest never outlives the shards it lists."""
  fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)
