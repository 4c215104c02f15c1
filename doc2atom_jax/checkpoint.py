"""Params-only exports of the trained compiler and router, for compiling banks and downstream evaluation.

An export is an Orbax checkpoint of the (compiler, router) parameters — no optimizer state — plus a JSON
file with the run's configuration, step and storage dtype. Orbax writes into a temporary folder and renames
it when the save is complete, and export.json (which loading requires) is removed before and written after
it, so an export is never half-written; loading checks that the shapes fit the system. Floating parameters
can be stored as bfloat16 (half the bytes); loading casts them back to the modules' own dtype (float32).
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from doc2atom_jax import fileio
from doc2atom_jax.errors import UserError

META_FILE = "export.json"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # storage dtype of the floating parameters


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
  options = ocp.options.MultiprocessingOptions()
  if jax.process_count() > 1:  # one process (the caller) writes: host arrays, no barrier with the others
    params = jax.device_get(params)
    options = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                                 active_processes={jax.process_index()})
  checkpointer = ocp.StandardCheckpointer(multiprocessing_options=options)
  checkpointer.save(path / "params", params, force=True)
  checkpointer.wait_until_finished()
  fileio.atomic_write_text(path / META_FILE, json.dumps({**meta, "dtype": dtype}, indent=1, default=str))
  return path


def load_params(modules, path) -> dict:
  """Loads an export into `modules` in place; returns its metadata."""
  path = pathlib.Path(path).absolute()
  if not (path / "params").is_dir() or not (path / META_FILE).exists():
    raise UserError(f"no parameter export at {path} (expected params/ and {META_FILE}, written by mode=train)")
  state = nnx.state(modules, nnx.Param)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(state))
  try:
    restored = ocp.StandardCheckpointer().restore(path / "params", abstract)
  except (ValueError, KeyError) as e:
    raise UserError(f"the export at {path} does not fit this compiler/router configuration: {str(e)[:300]}") from None
  except Exception as e:  # Orbax raises several types for damaged files
    raise UserError(f"cannot read the export at {path} (damaged?): {type(e).__name__}: {str(e)[:300]}") from None
  # Orbax casts a bfloat16 export to the target dtype; make sure of it (eval and ask compute in float32).
  restored = jax.tree.map(lambda x, want: x if x.dtype == want.dtype else x.astype(want.dtype), restored, abstract)
  nnx.replace_by_pure_dict(state, restored)
  nnx.update(modules, state)
  return json.loads(fileio.read_text(path / META_FILE))


# ---------------------------------------------------------------------------------------------------------
# Training checkpoints (train/trainer.py: <workdir>/checkpoints/<step>/{state, meta}), read for their params.
# ---------------------------------------------------------------------------------------------------------
def _read_only_manager(directory):
  from absl import logging as absl_logging

  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)  # read_only=True logs three warnings about itself
  try:
    return ocp.CheckpointManager(pathlib.Path(directory).absolute(), item_names=("state", "meta"),
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
        restored = manager.restore(s, args=args)
        break
      except Exception as e:  # Orbax raises several types for damaged files and for shapes that do not fit
        if s == steps[0]:
          raise UserError(f"cannot read the training checkpoint {directory / str(s)} (damaged, or of another "
                          f"compiler/router configuration?): {type(e).__name__}: {str(e)[:300]}") from None
        print(f"training checkpoint {s} unreadable ({type(e).__name__}: {str(e)[:200]}); trying an older one")
  finally:
    manager.close()
  nnx.replace_by_pure_dict(state, restored.state["params"])
  nnx.update(modules, state)
  return {**(restored.meta or {}), "step": int(s)}
