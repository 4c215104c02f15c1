"""Params-only exports of the trained compiler and router, for compiling banks and downstream evaluation.

An export is an Orbax checkpoint of the (compiler, router) parameters — no optimizer state — plus a JSON
file with the run's configuration and step. Orbax writes into a temporary folder and renames it when the
save is complete, so an export is never half-written; loading checks that the shapes fit the system.
"""

import json
import pathlib

import jax
import orbax.checkpoint as ocp
from flax import nnx

from doc2atom_jax import fileio
from doc2atom_jax.errors import UserError

META_FILE = "export.json"


def export_params(modules, path, meta: dict) -> pathlib.Path:
  """Writes the Params of `modules` (e.g. (compiler, router)) to `path`, replacing an older export."""
  path = pathlib.Path(path).absolute()
  params = nnx.to_pure_dict(nnx.state(modules, nnx.Param))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path / "params", params, force=True)
  checkpointer.wait_until_finished()
  fileio.atomic_write_text(path / META_FILE, json.dumps(meta, indent=1, default=str))
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
  nnx.replace_by_pure_dict(state, restored)
  nnx.update(modules, state)
  return json.loads(fileio.read_text(path / META_FILE))
