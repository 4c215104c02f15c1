"""Device mesh, sharding plans (logical-axis rules), and the shardings of parameters, batches and atom banks.

Parameters carry logical axis names (`embed`, `mlp`, `heads`, ...; see the models and the compiler);
rules map them to mesh axes `("data", "fsdp", "tensor")`. The model code never names a mesh axis, so how
a run is laid out over chips is a config choice (MaxText's idea): `config.sharding.plan` picks a rule table
from `PLANS`, and `config.sharding.rules` overrides single entries of it. A dimension that its mesh axes do
not divide stays replicated, so one rule set serves tiny test models and real ones. The logical axis
`batch` says which mesh axes split the example (question) axis of a batch; `atoms` does the same for the
rows of an atom bank.

Why three plans: `dp` is the fastest when everything fits one chip (no collectives but the gradient
all-reduce); `fsdp` keeps one copy of the parameters and the optimizer state per fsdp group (what lets a
2B base model and its compiler fit 16 GB chips); `fsdp_tp` adds tensor parallelism for layers too wide for
one chip's activations. `fsdp_tp` equals the rules this project always used, so it is the default and
existing checkpoints, meshes and tests keep their layout. `doc2atom_jax/plan.py` prices a plan before
any chip is rented.
"""

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from doc2atom_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis (None: replicated). Base model, then the compiler/router, then data.
DEFAULT_RULES = (
    ("vocab", "tensor"), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("kv", "tensor"),
    ("layers", None), ("norm", None), ("head_dim", None),
    ("width", "fsdp"), ("width_out", "tensor"), ("blocks", None), ("code", None), ("key", None),
    ("adapter_in", "tensor"), ("adapter_out", "fsdp"), ("targets", None), ("rank", None), ("types", None),
    ("atoms", ("data", "fsdp")),
)
LOGICAL_AXES = tuple(name for name, _ in DEFAULT_RULES) + ("batch",)


def _plan(**sharded) -> tuple:
  """A full rule table: every logical axis, replicated unless named here."""
  return tuple((name, sharded.get(name)) for name in LOGICAL_AXES)


PLANS = {
    # Pure data parallelism: weights and optimizer state replicated, the batch split over every chip.
    # Banks are data, not weights: their atoms still split over every chip.
    "dp": _plan(batch=MESH_AXES, atoms=MESH_AXES),
    # ZeRO-3 style: every large weight (and so its Adam moments) split over fsdp along its model-width axis;
    # the compiler's head maps split along their d_in / d_out axis (the head of `down` is L x c x d_ff).
    "fsdp": _plan(embed="fsdp", width="fsdp", adapter_in="fsdp", adapter_out="fsdp",
                  batch=BATCH_AXES, atoms=BATCH_AXES),
    # FSDP + tensor parallelism (the base model's vocab/mlp/heads, the compiler's width_out/adapter_in).
    "fsdp_tp": DEFAULT_RULES + (("batch", BATCH_AXES),),
}
DEFAULT_PLAN = "fsdp_tp"


def _flat(axes) -> tuple:
  return (axes,) if isinstance(axes, str) else tuple(axes or ())


def rules_for(plan: str = DEFAULT_PLAN, overrides=()) -> tuple:
  """The rule table of a named plan with `overrides` ((logical axis, mesh axes or None), ...) taking precedence."""
  if plan not in PLANS:
    raise UserError(f"unknown sharding plan {plan!r}; valid: {', '.join(PLANS)}")
  overrides = tuple(overrides or ())
  for entry in overrides:
    if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)):
      raise UserError(f"sharding rule {entry!r}: expected (logical axis, mesh axis | (mesh axes) | None)")
    name, axes = entry
    if name not in LOGICAL_AXES:
      raise UserError(f"sharding rule {tuple(entry)!r}: unknown logical axis {name!r}; "
                      f"valid: {', '.join(LOGICAL_AXES)}")
    if not (axes is None or isinstance(axes, str) or all(isinstance(a, str) for a in axes)):
      raise UserError(f"sharding rule {tuple(entry)!r}: mesh axes must be a name, a tuple of names or None")
    bad = [a for a in _flat(axes) if a not in MESH_AXES]
    if bad:
      raise UserError(f"sharding rule {tuple(entry)!r} names unknown mesh axis {bad[0]!r}; the mesh axes are "
                      f"{', '.join(MESH_AXES)}")
    if len(set(_flat(axes))) != len(_flat(axes)):
      raise UserError(f"sharding rule {tuple(entry)!r} names a mesh axis twice")
  merged = dict(PLANS[plan])
  merged.update({name: (axes if axes is None or isinstance(axes, str) else tuple(axes)) for name, axes in overrides})
  return tuple(merged.items())


def mesh_sizes(shape, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) sizes of a mesh shape (a dict or a 3-tuple; -1 = the rest) on `num_devices` chips."""
  sizes = [shape.get(a, 1) for a in MESH_AXES] if isinstance(shape, dict) else [int(s) for s in shape]
  named = dict(zip(MESH_AXES, sizes))
  if len(sizes) != len(MESH_AXES):
    raise UserError(f"mesh {tuple(sizes)}: expected 3 sizes (data, fsdp, tensor)")
  if sizes.count(-1) > 1:
    raise UserError(f"mesh {named}: at most one axis may be -1")
  if any(s < 1 and s != -1 for s in sizes):
    raise UserError(f"mesh {named}: sizes must be positive (or -1 for the rest)")
  if -1 in sizes:
    rest = int(np.prod([s for s in sizes if s != -1]))
    if num_devices % rest:
      raise UserError(f"mesh {named}: the fixed axes ({rest} devices) do not divide the {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // rest
  if int(np.prod(sizes)) != num_devices:
    raise UserError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices; "
                    f"{num_devices} are available")
  return tuple(sizes)


def make_mesh(shape, devices=None) -> jax.sharding.Mesh:
  """A ("data", "fsdp", "tensor") mesh of the given sizes (a dict or a 3-tuple; -1 = the rest)."""
  devices = devices if devices is not None else jax.devices()
  sizes = mesh_sizes(shape, len(devices))
  return jax.make_mesh(sizes, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def _axis_sizes(mesh) -> dict:
  """{axis: size} of a Mesh, or of a plain dict of sizes (planning for chips this machine does not have)."""
  return dict(mesh) if isinstance(mesh, dict) else dict(mesh.shape)


def _mesh_size(mesh, axes) -> int:
  sizes = _axis_sizes(mesh)
  return int(np.prod([sizes[a] for a in _flat(axes)]))


def spec_for(shape, logical_axes, mesh, rules=DEFAULT_RULES) -> P:
  """PartitionSpec for an array with these logical axes; each mesh axis used once, divisibility checked.

  `mesh` may be a Mesh or a dict {axis: size}: the spec depends only on the axis sizes.
  """
  table = dict(rules)
  used, spec = set(), []
  for dim, name in zip(shape, logical_axes):
    axes = table.get(name)
    flat = _flat(axes)
    if not flat or used & set(flat) or dim % _mesh_size(mesh, flat) != 0:
      spec.append(None)
      continue
    used |= set(flat)
    spec.append(axes)
  return P(*spec)


def shard_shape(shape, spec: P, mesh) -> tuple[int, ...]:
  """One device's shard of an array of `shape` under `spec` on a mesh (or a dict of axis sizes)."""
  spec = tuple(spec) + (None,) * (len(shape) - len(spec))
  return tuple(dim // _mesh_size(mesh, axes) for dim, axes in zip(shape, spec))


def shardings(values, logical_specs, mesh, rules=DEFAULT_RULES):
  """NamedShardings for a tree of arrays given a matching tree of logical PartitionSpecs."""
  return jax.tree.map(lambda x, axes: NamedSharding(mesh, spec_for(x.shape, tuple(axes), mesh, rules)),
                      values, logical_specs)


def state_shardings(state: nnx.State, mesh, rules=DEFAULT_RULES):
  """NamedShardings (an nnx.State of them) for an nnx.State, from its Params' logical axis names."""
  return shardings(state, nnx.get_partition_spec(state), mesh, rules)


def module_weight_shardings(module: nnx.Module, mesh, rules=DEFAULT_RULES):
  """NamedShardings for `nnx.to_pure_dict` of a module's Params (e.g. the frozen decoder's weights)."""
  state = nnx.state(module, nnx.Param)
  return shardings(nnx.to_pure_dict(state), nnx.to_pure_dict(nnx.get_partition_spec(state)), mesh, rules)


def batch_axes(rules=DEFAULT_RULES) -> tuple[str, ...]:
  """The mesh axes that split a batch's example axis (the rules' `batch` entry; data x fsdp by default)."""
  return _flat(dict(rules).get("batch", BATCH_AXES))


def batch_shardings(batch: dict, mesh, example_fields: set[str], rules=DEFAULT_RULES):
  """Fields whose leading axis is the example axis shard it over the `batch` axes when divisible."""
  axes = batch_axes(rules)
  size = _mesh_size(mesh, axes)

  def one(name, x):
    if axes and name in example_fields and x.shape and x.shape[0] % size == 0:
      return NamedSharding(mesh, P(axes))
    return NamedSharding(mesh, P())

  return {name: one(name, x) for name, x in batch.items()}


def padded_batch(num_examples: int, mesh, rules=DEFAULT_RULES, *, say=print) -> int:
  """`num_examples` (questions a step) rounded up to a multiple of the `batch` axes' shard count.

  The trainer pads the question axis with masked rows (same loss) to this size: a batch the axes do not
  split would otherwise be replicated, every chip computing every question. Says so when it pads.
  """
  axes = batch_axes(rules)
  size = _mesh_size(mesh, axes)
  padded = -(-num_examples // size) * size
  if padded != num_examples:
    sizes = _axis_sizes(mesh)
    say(f"note: {num_examples} questions a step do not split over the batch mesh axes "
        f"{' x '.join(f'{a}={sizes[a]}' for a in axes)}; padded to {padded} with masked rows (same loss, idle "
        f"compute). A multiple of {size} for data.documents_per_step x data.questions_per_document uses every chip.")
  return padded


# Logical axes of an atom bank's arrays (`bank.AtomBank.padded()`): rows are atoms.
BANK_AXES = {"codes": ("atoms", "layers", "targets", "rank", "code"), "keys": ("atoms", "key"), "mask": ("atoms",)}


def bank_shardings(arrays: dict, mesh, rules=DEFAULT_RULES) -> dict:
  """NamedShardings for a bank's {"codes", "keys", "mask"}: the atom axis over the rules' `atoms` axes."""
  return {name: NamedSharding(mesh, spec_for(x.shape, BANK_AXES[name], mesh, rules)) for name, x in arrays.items()}


def bytes_per_device(x) -> int:
  """Bytes of one device's shard of a (possibly sharded) array."""
  shard = x.addressable_shards[0].data
  return shard.size * shard.dtype.itemsize


def like_params(tree, params, param_shardings, mesh):
  """Shardings for a tree holding copies of `params` (optimizer moments, accumulated gradients): a leaf whose
  path ends in a parameter's path, with its shape, gets that parameter's sharding; the rest (step counts) are
  replicated."""
  table = {tuple(path): (x.shape, s) for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(params),
                                                            jax.tree.leaves(param_shardings))}

  def one(path, x):
    for i in range(len(path)):
      hit = table.get(tuple(path[i:]))
      if hit is not None and hit[0] == x.shape:
        return hit[1]
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(one, tree)


def optimizer_state(optimizer, params, param_shardings, mesh):
  """(the optimizer's initial state, its shardings), each moment sharded like its parameter.

  `jax.jit(optimizer.init)` alone leaves the moments replicated (zeros depend on no sharded value), which
  would keep FSDP's largest saving, 2x the trainable parameters per chip, from happening.
  """
  shardings = like_params(jax.eval_shape(optimizer.init, params), params, param_shardings, mesh)
  return jax.jit(optimizer.init, out_shardings=shardings)(params), shardings


def on_mesh(tree, mesh):
  """Shardings of a tree already placed by jit (e.g. an optimizer state initialized from sharded params):
  kept where they are on the mesh, replicated over the mesh where they sit on one device (scalars)."""
  def one(x):
    s = x.sharding
    return s if isinstance(s, NamedSharding) and s.mesh == mesh else NamedSharding(mesh, P())
  shard = jax.tree.map(one, tree)
  return jax.device_put(tree, shard), shard
