"""Where training checkpoints and exports live, their checksums, and params-only exports of the trained compiler
and router, for compiling banks and downstream evaluation.

An export is an Orbax checkpoint of the (compiler, router) parameters — no optimizer state — plus a JSON
file with the run's configuration, step and storage dtype. Orbax writes into a temporary folder and renames
it when the save is complete, and export.json (which loading requires) is removed before and written after
it, so an export is never half-written; loading checks that the shapes fit the system. Floating parameters
can be stored as bfloat16 (half the bytes); loading casts them back to the modules' own dtype (float32).

Orbax reads altered bytes without a word (a flipped bit inside a compressed chunk can still decode, to other
numbers), so exports and training checkpoints carry checksums.json: the size and sha256 of each of their files,
written once the save has committed (an export's just before export.json, its last file). Loading verifies them:
a mismatch makes an export a UserError naming the file, and a training checkpoint one to skip for the previous
one; one without checksums.json (an older version's) loads unverified, with a note.
"""

import contextlib
import gc
import hashlib
import json
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from doc2atom_jax import fileio
from doc2atom_jax.errors import UserError

# The layout, named once: <workdir>/checkpoints/<step>/{state, meta} (the trainer's Orbax CheckpointManager) and
# <workdir>/export/{params, export.json} (mode=train's export; mode=export writes the same layout anywhere).
CHECKPOINTS = "checkpoints"
STATE, META = "state", "meta"  # a training checkpoint's items: {params, opt_state, step}, the run's metadata
ITEMS = (STATE, META)
EXPORT = "export"
PARAMS = "params"  # an export's Orbax folder
META_FILE = "export.json"
CHECKSUMS_FILE = "checksums.json"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # storage dtype of the floating parameters


def checkpoints_dir(workdir) -> pathlib.Path:
  return pathlib.Path(workdir) / CHECKPOINTS


def export_dir(workdir) -> pathlib.Path:
  return pathlib.Path(workdir) / EXPORT


def is_export(path) -> bool:
  path = pathlib.Path(path)
  return (path / META_FILE).is_file() or (path / PARAMS).is_dir()


def is_checkpoint_step(path) -> bool:
  """<workdir>/checkpoints/<step>: one training checkpoint."""
  path = pathlib.Path(path)
  return path.name.isdigit() and (path / STATE).is_dir()


def one_line(e: BaseException, limit: int = 200) -> str:
  """An exception as one short line. Orbax wraps a storage error in one that prints pages of TensorStore spec:
  say the innermost cause (the storage layer's own words), without the folder it names (the caller names it)."""
  while e.__cause__ is not None:
    e = e.__cause__
  text = " ".join(str(e).split()).split(" See full TensorStore details")[0]
  text = re.sub(r' in OCDBT database at local file "[^"]*"', "", text)
  text = f"{type(e).__name__}: {text}" if text else type(e).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _orbax_read_noise(unraisable) -> bool:
  """Whether an unraisable exception is a dropped concurrent read of Orbax's (its traceback runs through it)."""
  tb = unraisable.exc_traceback
  while tb is not None:
    if "orbax" in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


@contextlib.contextmanager
def quiet_failed_reads():
  """Around an Orbax restore. It reads an array's chunks concurrently; when one read fails, the others'
  coroutines are dropped with their own errors, and Python prints each of them ("Exception ignored in:
  <coroutine ...>", a traceback and pages of TensorStore spec) whenever they are collected — sometimes after
  the one-line error was printed. The first error is the one reported; after a failure, the rest are
  filtered out for the rest of the process (nothing else is hidden)."""
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _orbax_read_noise(unraisable):
      previous(unraisable)

  sys.unraisablehook = hook
  try:
    yield
  except BaseException:
    gc.collect()  # finalize the dropped reads now, while they are filtered; the hook stays for stragglers
    raise
  sys.unraisablehook = previous


# ---------------------------------------------------------------------------------------------------------
# Checksums: checksums.json lists the size and sha256 of every file of a checkpoint step or an export.
# ---------------------------------------------------------------------------------------------------------
class ChecksumMismatch(Exception):
  """A file of a checkpoint or export is missing or differs from its checksums.json."""


def _sha256(file: pathlib.Path) -> str:
  with open(file, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def write_checksums(folder, parts: tuple[str, ...] | None = None, pending: dict[str, bytes] | None = None) -> None:
  """Writes `folder`/checksums.json (atomically) for the files under `folder` — only those under `parts`
  (names of files or subfolders) when given — plus `pending` {name: bytes} files about to be written.
  Call it once the save has committed: the files must be final."""
  folder = pathlib.Path(folder)
  roots = [folder] if parts is None else [folder / p for p in parts]
  files = {}
  for root in roots:
    for f in sorted([root] if root.is_file() else root.rglob("*")):
      name = f.relative_to(folder).as_posix()
      if f.is_file() and name != CHECKSUMS_FILE:
        files[name] = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
  for name, data in (pending or {}).items():
    files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
  fileio.atomic_write_text(folder / CHECKSUMS_FILE, json.dumps(
      {"format": "doc2atom-checksums", "version": 1, "files": files}, indent=1) + "\n")


def verify_checksums(folder) -> bool:
  """True when every file that `folder`/checksums.json lists has its size and sha256; False when there is no
  checksums.json (written before checksums were kept); raises ChecksumMismatch naming the first file that
  differs. Files it does not list (none that the save wrote) are not checked."""
  folder = pathlib.Path(folder)
  manifest = folder / CHECKSUMS_FILE
  if not manifest.is_file():
    return False
  try:
    files = json.loads(manifest.read_bytes())["files"]
    entries = [(name, int(e["bytes"]), str(e["sha256"])) for name, e in sorted(files.items())]
  except (ValueError, KeyError, TypeError, AttributeError):
    raise ChecksumMismatch(f"{CHECKSUMS_FILE} is not a valid checksum list") from None
  for name, size, digest in entries:
    f = folder / name
    if not f.is_file():
      raise ChecksumMismatch(f"{name} is missing")
    if f.stat().st_size != size:
      raise ChecksumMismatch(f"{name} has {f.stat().st_size} bytes, {CHECKSUMS_FILE} says {size}")
    if _sha256(f) != digest:
      raise ChecksumMismatch(f"{name} does not match its sha256 in {CHECKSUMS_FILE}")
  return True


# ---------------------------------------------------------------------------------------------------------
# Params-only exports: <folder>/{params, export.json, checksums.json}.
# ---------------------------------------------------------------------------------------------------------
def storage_dtype(name: str):
  if name not in DTYPES:
    raise UserError(f"unknown export dtype {name!r}; valid: {', '.join(DTYPES)}")
  return DTYPES[name]


def export_params(modules, path, meta: dict, dtype: str = "float32") -> pathlib.Path:
  """Writes the Params of `modules` (e.g. (compiler, router)) to `path`, replacing an older export; floating
  parameters are stored as `dtype` ("float32" or "bfloat16"), recorded in export.json. In a multi-process run the
  calling process alone writes it (no collective: `modes.train` calls it on process 0 only)."""
  cast = storage_dtype(dtype)
  path = pathlib.Path(path).absolute()
  params = nnx.to_pure_dict(nnx.state(modules, nnx.Param))
  params = jax.tree.map(lambda x: x.astype(cast) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
  (path / META_FILE).unlink(missing_ok=True)  # until the new params are complete, this is no export
  (path / CHECKSUMS_FILE).unlink(missing_ok=True)
  options = ocp.options.MultiprocessingOptions()
  if jax.process_count() > 1:  # one process (the caller) writes: host arrays, no barrier with the others
    params = jax.device_get(params)
    options = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                                 active_processes={jax.process_index()})
  checkpointer = ocp.StandardCheckpointer(multiprocessing_options=options)
  checkpointer.save(path / PARAMS, params, force=True)
  checkpointer.wait_until_finished()
  text = json.dumps({**meta, "dtype": dtype}, indent=1, default=str)
  write_checksums(path, (PARAMS,), pending={META_FILE: text.encode("utf-8")})  # before export.json, the last file
  fileio.atomic_write_text(path / META_FILE, text)
  return path


def load_params(modules, path) -> dict:
  """Loads an export into `modules` in place; returns its metadata. Damaged files are a UserError naming them."""
  path = pathlib.Path(path).absolute()
  if not (path / PARAMS).is_dir() or not (path / META_FILE).exists():
    raise UserError(f"no parameter export at {path} (expected {PARAMS}/ and {META_FILE}, written by mode=train)")
  try:
    if not verify_checksums(path):
      print(f"note: {path} has no {CHECKSUMS_FILE} (an export of an older version): its files are not verified")
  except ChecksumMismatch as e:
    raise UserError(f"{path} is damaged ({e})") from None
  state = nnx.state(modules, nnx.Param)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(state))
  try:
    with quiet_failed_reads():
      restored = ocp.StandardCheckpointer().restore(path / PARAMS, abstract)
  except (ValueError, KeyError) as e:
    raise UserError(f"the export at {path} does not fit this compiler/router configuration: "
                    f"{' '.join(str(e).split())[:300]}") from None
  except Exception as e:  # Orbax raises several types for damaged files
    raise UserError(f"{path} is damaged ({one_line(e)})") from None
  # Orbax casts a bfloat16 export to the target dtype; make sure of it (eval and ask compute in float32).
  restored = jax.tree.map(lambda x, want: x if x.dtype == want.dtype else x.astype(want.dtype), restored, abstract)
  nnx.replace_by_pure_dict(state, restored)
  nnx.update(modules, state)
  return json.loads(fileio.read_text(path / META_FILE))


# ---------------------------------------------------------------------------------------------------------
# Training checkpoints (train/trainer.py: <workdir>/checkpoints/<step>/{state, meta}), read for their params.
# ---------------------------------------------------------------------------------------------------------
def verify_step(directory, step: int) -> None:
  """Checks training checkpoint `step` against its checksums (ChecksumMismatch when they differ); one without
  them (an older version's, or a run stopped between the save and its checksums) is noted and passes."""
  if not verify_checksums(pathlib.Path(directory) / str(step)):
    print(f"note: checkpoint {step} has no {CHECKSUMS_FILE} (an older version's, or the run stopped just after "
          "saving it): its files are not verified")


def _read_only_manager(directory):
  from absl import logging as absl_logging

  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)  # read_only=True logs three warnings about itself
  try:
    return ocp.CheckpointManager(pathlib.Path(directory).absolute(), item_names=ITEMS,
                                 options=ocp.CheckpointManagerOptions(read_only=True, create=False,
                                                                      save_interval_steps=0))
  finally:
    absl_logging.set_verbosity(verbosity)


def checkpoint_steps(directory) -> list[int]:
  """The finished training checkpoints under `directory`, oldest first (one being written is not listed)."""
  if not pathlib.Path(directory).is_dir():
    return []
  manager = _read_only_manager(directory)
  try:
    return sorted(manager.all_steps())
  finally:
    manager.close()


def load_checkpoint_params(modules, directory, step: int | None = None) -> dict:
  """Loads the (compiler, router) parameters of a training checkpoint into `modules` in place, without its
  optimizer state; returns its metadata ({"run", "step"}). Without `step`, the newest readable checkpoint
  (an unreadable newer one is reported and skipped, never deleted: the run may still be writing)."""
  directory = pathlib.Path(directory).absolute()
  steps = checkpoint_steps(directory)
  if step is not None:
    steps = [s for s in steps if s == step]
  if not steps:
    raise UserError(f"no training checkpoint{f' {step}' if step is not None else ''} under {directory}")
  state = nnx.state(modules, nnx.Param)
  abstract = {"params": jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(state))}
  args = ocp.args.Composite(
      state=ocp.args.PyTreeRestore(item=abstract, partial_restore=True,  # the params only, not opt_state
                                   restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)),
      meta=ocp.args.JsonRestore())
  manager = _read_only_manager(directory)
  try:
    for s in reversed(steps):
      try:
        verify_step(directory, s)
        with quiet_failed_reads():
          restored = manager.restore(s, args=args)
        break
      except Exception as e:  # Orbax raises several types for damaged files and for shapes that do not fit
        if s == steps[0]:
          raise UserError(f"cannot read the training checkpoint {directory / str(s)} (damaged, or of another "
                          f"compiler/router configuration?): {one_line(e, 300)}") from None
        print(f"training checkpoint {s} unreadable ({one_line(e)}); trying an older one")
  finally:
    manager.close()
  nnx.replace_by_pure_dict(state, restored.state["params"])
  nnx.update(modules, state)
  return {**(restored.meta or {}), "step": int(s)}
