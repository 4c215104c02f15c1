"""Device mesh, logical-axis sharding rules, and the shardings of parameters and batches.

Parameters carry logical axis names (`embed`, `mlp`, `heads`, ...; see the models and the compiler);
rules map them to mesh axes `("data", "fsdp", "tensor")`. A dimension that the mesh axis does not divide
stays replicated, so one rule set serves tiny test models and real ones. Batches shard their leading
(example) axis over `("data", "fsdp")`.
"""

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from doc2atom_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis (None: replicated). Base model, then the compiler/router.
DEFAULT_RULES = (
    ("vocab", "tensor"), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("kv", "tensor"),
    ("layers", None), ("norm", None), ("head_dim", None),
    ("width", "fsdp"), ("width_out", "tensor"), ("blocks", None), ("code", None), ("key", None),
    ("adapter_in", "tensor"), ("adapter_out", "fsdp"), ("targets", None), ("rank", None), ("types", None),
    ("atoms", ("data", "fsdp")),
)


def make_mesh(shape, devices=None) -> jax.sharding.Mesh:
  """A ("data", "fsdp", "tensor") mesh of the given sizes (a dict or a 3-tuple; -1 = the rest)."""
  sizes = [shape.get(a, 1) for a in MESH_AXES] if isinstance(shape, dict) else list(shape)
  devices = devices if devices is not None else jax.devices()
  if sizes.count(-1) > 1:
    raise UserError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
  if -1 in sizes:
    rest = int(np.prod([s for s in sizes if s != -1]))
    sizes[sizes.index(-1)] = len(devices) // max(rest, 1)
  if int(np.prod(sizes)) != len(devices) or min(sizes) < 1:
    raise UserError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices; "
                    f"{len(devices)} are available")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)


def _mesh_size(mesh, axes) -> int:
  axes = (axes,) if isinstance(axes, str) else axes
  return int(np.prod([mesh.shape[a] for a in axes]))


def spec_for(shape, logical_axes, mesh, rules=DEFAULT_RULES) -> P:
  """PartitionSpec for an array with these logical axes; each mesh axis used once, divisibility checked."""
  table = dict(rules)
  used, spec = set(), []
  for dim, name in zip(shape, logical_axes):
    axes = table.get(name)
    flat = (axes,) if isinstance(axes, str) else tuple(axes or ())
    if not flat or used & set(flat) or dim % _mesh_size(mesh, flat) != 0:
      spec.append(None)
      continue
    used |= set(flat)
    spec.append(axes)
  return P(*spec)


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


def batch_shardings(batch: dict, mesh, example_fields: set[str]):
  """Fields whose leading axis is the example axis shard it over ("data", "fsdp") when divisible."""
  size = _mesh_size(mesh, BATCH_AXES)

  def one(name, x):
    if name in example_fields and x.shape and x.shape[0] % size == 0:
      return NamedSharding(mesh, P(BATCH_AXES))
    return NamedSharding(mesh, P())

  return {name: one(name, x) for name, x in batch.items()}


def bytes_per_device(x) -> int:
  """Bytes of one device's shard of a (possibly sharded) array."""
  shard = x.addressable_shards[0].data
  return shard.size * shard.dtype.itemsize


def on_mesh(tree, mesh):
  """Shardings of a tree already placed by jit (e.g. an optimizer state initialized from sharded params):
  kept where they are on the mesh, replicated over the mesh where they sit on one device (scalars)."""
  def one(x):
    s = x.sharding
    return s if isinstance(s, NamedSharding) and s.mesh == mesh else NamedSharding(mesh, P())
  shard = jax.tree.map(one, tree)
  return jax.device_put(tree, shard), shard
