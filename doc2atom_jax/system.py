"""A config -> the system it describes: the frozen base model, the atom system (compiler, router, method) with
its trained parameters, and the checks that an export belongs to that model and method.

Below the modes, the evaluator, the benchmark and the experiment, which all build systems from configs; it
imports nothing of theirs. The config is passed in (an `ml_collections.ConfigDict` as `configs/*.py` make it).
"""

import dataclasses
import importlib.util
import json
import pathlib

import ml_collections

from doc2atom_jax import checkpoint, fileio, models, variants
from doc2atom_jax.atoms import compiler as compiler_lib
from doc2atom_jax.atoms import pipeline
from doc2atom_jax.errors import UserError


def load_model(config, scan_layers: bool = False) -> models.BaseModel:
  """The run's base model with its `config.model` settings (`scan_layers` True forces the scanned stack)."""
  m = config.model
  return models.load(m.name, dtype=m.dtype, scan_layers=bool(m.scan_layers or scan_layers),
                     attention_block=m.get("attention_block", 512), remat=m.get("remat", "none"))


def export_meta(path) -> dict:
  """The metadata (export.json) of a parameter export; {} where it has none (loading it then explains)."""
  meta_file = pathlib.Path(path) / checkpoint.META_FILE
  if not meta_file.is_file():
    return {}
  try:
    return json.loads(fileio.read_text(meta_file))
  except json.JSONDecodeError as e:
    raise UserError(f"{meta_file} is not valid JSON ({e.msg}): a damaged export?") from None


def check_export(path, model_name: str, method: str) -> None:
  """A parameter export must come from this base model and this method: another model's export can have the
  same shapes (and would load), and would then compile garbage without a word."""
  check_trained(export_meta(path), f"the export at {path}", model_name, method)


def check_trained(meta: dict, what: str, model_name: str, method: str) -> None:
  """The check of `check_export` on the metadata of an export or a training checkpoint ({"run", "model"})."""
  trained_on = meta.get("model") or ((meta.get("run") or {}).get("model") or {}).get("name")
  if trained_on and trained_on != model_name:
    raise UserError(f"{what} was trained on base model {trained_on!r}, not {model_name!r}: set "
                    f"--config.model.name={trained_on} or use an export of {model_name}")
  trained_for = ((meta.get("run") or {}).get("atoms") or {}).get("method")
  if trained_for and trained_for != method:
    raise UserError(f"{what} was trained for method {trained_for!r}, not {method!r} "
                    f"(--config=<file>.py:{trained_for} selects it)")


def _route_skip(config, params: str | None) -> bool:
  """compiler.route_skip, except for an export that predates it (its run config has no such field): those
  were trained without the linear path, and still load. An export without a run config (`checkpoint.export_params`
  called directly) says nothing either way: the config's value."""
  params = config.params if params is None else params
  if params:
    try:
      trained = (export_meta(params).get("run") or {}).get("compiler")
    except UserError:
      trained = None  # not an export: load_params says why
    if isinstance(trained, dict) and "route_skip" not in trained:
      return False
  return bool(config.compiler.get("route_skip", True))


def build_system(config, model=None, params: str | None = None):
  """The atom system of a config (on `model` when given, else the config's), with `params` (default
  `config.params`; "" = none) loaded."""
  method = pipeline.MethodConfig(
      method=config.atoms.method, min_atom_tokens=config.atoms.min_atom_tokens,
      max_atom_tokens=config.atoms.max_atom_tokens, chunk_tokens=config.atoms.chunk_tokens, k=config.atoms.k,
      normalization=config.atoms.normalization, max_chunk_tokens=config.atoms.max_chunk_tokens,
      route_approx=bool(config.atoms.get("route_approx", False)),
      route_score=config.atoms.get("route_score", "fused"), abstain=config.atoms.get("abstain", "evidence"),
      second_hop=config.atoms.get("second_hop", "names"))
  model = model or load_model(config)
  c = config.compiler
  try:
    compiler_cfg = compiler_lib.config_for(
        model.config, targets=tuple(c.targets), rank=c.rank, code_dim=c.code_dim, width=c.width,
        num_blocks=c.num_blocks, num_heads=c.num_heads, key_dim=c.key_dim, default_rank=c.default_rank,
        alpha=c.alpha, copy_dim=c.copy_dim,
        copy_gain_scale=c.copy_gain_scale, shared_head=bool(c.get("shared_head", False)),
        route_skip=_route_skip(config, params))
  except ValueError as e:
    raise UserError(f"bad compiler config: {e}") from None
  system = pipeline.AtomSystem.create(model, compiler_cfg, method, seed=config.seed)
  params = config.params if params is None else params
  if params:
    check_export(params, model.name, config.atoms.method)
    meta = checkpoint.load_params((system.compiler, system.router), params)
    print(f"loaded trained compiler and router from {params} (step {meta.get('step')})")
    calibrated = (meta.get("abstention") or {}).get("margin")
    if calibrated is not None:  # the evidence abstention's margin, calibrated at the end of training
      system.method = dataclasses.replace(system.method, abstain_margin=float(calibrated))
  return system


def trained_system(config, method: str, path: str, model):
  """The AtomSystem of a separately trained method (d2l, d2l_atom): `config` with the export's own atoms and
  compiler sections (as it was trained; the method's variant where the export does not record them), on
  `model`."""
  check_export(path, model.name if model is not None else config.model.name, method)
  run = export_meta(path).get("run") or {}
  values = config.to_dict()
  values["params"] = path
  if isinstance(run.get("atoms"), dict) and isinstance(run.get("compiler"), dict):
    values["atoms"].update(run["atoms"])
    values["compiler"].update(run["compiler"])
    derived = ml_collections.ConfigDict(values)
  else:
    derived = variants.apply(ml_collections.ConfigDict(values), method)
  return build_system(derived, model=model)


def config_from_file(spec: str) -> ml_collections.ConfigDict:
  """The config of `path.py[:arg]` (`get_config(arg)`), as `--config=path.py:arg` gives it, for code that
  drives several configs itself (the experiment's parameter counts). Run from the repository root: config
  files import `configs.*`."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location(f"_config_{pathlib.Path(path).stem}", path)
  if module_spec is None or not pathlib.Path(path).is_file():
    raise UserError(f"config file {path} does not exist")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)
