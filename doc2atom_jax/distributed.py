"""Multi-process (multi-host) runs: `jax.distributed` start-up and the few cross-process agreements training needs.

Why a module of its own: `jax.distributed.initialize` must run before anything creates the XLA backend (the
first `jax.devices()`, array or jit), so `main.py` calls `maybe_initialize` right after the config is read, before
a mode runs. `config.distributed.initialize` is "auto" (initialize when the environment shows a multi-process
job: SLURM with SLURM_NTASKS > 1, a Cloud TPU pod worker, Open MPI, MEGASCALE_*, or JAX_COORDINATOR_ADDRESS),
"on" or "off"; the environment variable DOC2ATOM_DISTRIBUTED=1 / 0 forces on / off.

A coordinator that never answers must not hang a job, and JAX's own timeout aborts the process from C++ (no
Python exception to catch). So the wait is bounded here: a process that is not the coordinator first checks
that the coordinator's port answers (a clear `UserError` naming the address when it does not within
`timeout_s`), and a watchdog covers the rest of `initialize` (peers that never arrive): at `timeout_s` it
prints one `error:` line and exits with status 2, the status `main.py` gives every `UserError`.

Training on P processes: each process builds its share of every step's documents (`train/data.py`), the shares
are padded to shapes all processes agree on (`agree_on_shapes`: a collective step with different shapes would
deadlock) and assembled into global arrays (`global_batch`); files are written by process 0 only
(`is_main_process`), while Orbax checkpoint saves are collective (every process calls them).

Why `barrier` (the coordination service's, not a collective) before collectives: on CPU, gloo sets up the
communicator of each new compiled computation at its first run and gives the processes 30 s (fixed, not
configurable) to arrive; processes that spent uneven time on their own work just before (compiling, teacher
numbers for their own documents, preparing data, evaluating) would fail there. So every cross-process helper
here, and the trainer before the first run of a newly compiled step, first waits for all processes.
"""

import itertools
import os
import socket
import sys
import threading
import time
import types

import jax
import numpy as np

from doc2atom_jax import shapes
from doc2atom_jax.errors import UserError

MODES = ("auto", "on", "off")
ENV_FLAG = "DOC2ATOM_DISTRIBUTED"
_FLAG_VALUES = {"1": "on", "on": "on", "true": "on", "0": "off", "off": "off", "false": "off", "auto": "auto"}
# The settings of a config without a `distributed` section (all detected from the environment).
DEFAULTS = types.SimpleNamespace(initialize="auto", coordinator_address="", num_processes=0, process_id=-1,
                                 local_device_ids=(), timeout_s=300)
# Waiting at a barrier for processes that compile, evaluate or prepare data (a dead process fails it sooner: the
# coordination service reports missing heartbeats).
BARRIER_TIMEOUT_S = 3600
_barriers = itertools.count()
# How long JAX's own connect timeout outlasts ours: our error, not its abort, is what a user sees.
_JAX_TIMEOUT_MARGIN_S = 60


# --------------------------------------------------------------------------------------------------------
# Start-up.


def multiprocess_environment(environ=None) -> str | None:
  """Why the environment looks like one process of a multi-process job (a short reason), or None."""
  env = os.environ if environ is None else environ

  def count(name):
    try:
      return int(env.get(name, "") or 0)
    except ValueError:
      return 0

  if count("SLURM_NTASKS") > 1:
    return f"SLURM job with SLURM_NTASKS={env['SLURM_NTASKS']}"
  if count("OMPI_COMM_WORLD_SIZE") > 1:
    return f"Open MPI job with OMPI_COMM_WORLD_SIZE={env['OMPI_COMM_WORLD_SIZE']}"
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1:
    return f"Cloud TPU pod worker ({len(hosts)} hosts in TPU_WORKER_HOSTNAMES)"
  megascale = sorted(k for k in env if k.startswith("MEGASCALE_"))
  if megascale:
    return f"TPU multislice job ({megascale[0]} is set)"
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return f"JAX_COORDINATOR_ADDRESS={env['JAX_COORDINATOR_ADDRESS']}"
  return None


def resolve_mode(cfg, environ=None) -> str:
  """"on" or "off": the config's `initialize`, overridden by DOC2ATOM_DISTRIBUTED, "auto" decided by the env."""
  env = os.environ if environ is None else environ
  mode = cfg.initialize
  if env.get(ENV_FLAG, "").strip():
    raw = env[ENV_FLAG].strip().lower()
    if raw not in _FLAG_VALUES:
      raise UserError(f"{ENV_FLAG}={env[ENV_FLAG]!r}: use 1 (initialize jax.distributed), 0 (do not) or auto")
    mode = _FLAG_VALUES[raw]
  if mode not in MODES:
    raise UserError(f"distributed.initialize must be one of {', '.join(MODES)} (got {mode!r})")
  if mode == "auto":
    return "on" if multiprocess_environment(env) else "off"
  return mode


def _split_address(address: str) -> tuple[str, int]:
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise UserError(f"distributed.coordinator_address {address!r} must be host:port (e.g. 10.0.0.1:8476)")
  return host.strip("[]"), int(port)


def _wait_for_port(address: str, deadline: float) -> bool:
  """True once a TCP connection to `address` succeeds, False if none does before `deadline`."""
  host, port = _split_address(address)
  while True:
    left = deadline - time.monotonic()
    if left <= 0:
      return False
    try:
      with socket.create_connection((host, port), timeout=min(2.0, left)):
        return True
    except OSError:
      time.sleep(min(0.5, max(deadline - time.monotonic(), 0)))


def _arguments(cfg, environ) -> dict:
  """jax.distributed.initialize's arguments from the config; None where JAX should detect them."""
  address = cfg.coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS") or None
  num, pid = int(cfg.num_processes), int(cfg.process_id)
  if num < 0 or pid < -1:
    raise UserError(f"distributed.num_processes must be >= 0 (0 = detect) and distributed.process_id >= -1 (-1 = "
                    f"detect) (got {num} and {pid})")
  if num and pid >= num:
    raise UserError(f"distributed.process_id={pid} must be below distributed.num_processes={num}")
  if address is not None:
    _split_address(address)
  ids = tuple(int(i) for i in cfg.local_device_ids) or None
  return {"coordinator_address": address, "num_processes": num or None, "process_id": None if pid < 0 else pid,
          "local_device_ids": ids}


def maybe_initialize(config, environ=None) -> bool:
  """Initializes jax.distributed when `config.distributed` (or DOC2ATOM_DISTRIBUTED, or the environment) asks
  for it; True if this process is now part of a multi-process job. Call before anything touches jax devices."""
  env = os.environ if environ is None else environ
  cfg = getattr(config, "distributed", None) or DEFAULTS
  if resolve_mode(cfg, env) == "off":
    return False
  if jax.distributed.is_initialized():
    return True
  args = _arguments(cfg, env)
  timeout_s = float(cfg.timeout_s)
  if timeout_s <= 0:
    raise UserError(f"distributed.timeout_s must be positive (got {cfg.timeout_s})")
  if not env.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
    # CPU processes exchange collectives over gloo (TCP); GPU/TPU backends ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  address, pid, num = args["coordinator_address"], args["process_id"], args["num_processes"]
  where = address or "the coordinator detected from the environment"
  who = f"process {pid if pid is not None else '?'} of {num or '?'}"
  deadline = time.monotonic() + timeout_s
  if address and pid not in (None, 0) and not _wait_for_port(address, deadline):
    raise UserError(f"no coordinator answered at {address} within {timeout_s:g} s ({who}): start process 0 there "
                    "(it hosts the coordinator), check the address and port, or raise distributed.timeout_s")
  watchdog = threading.Timer(max(deadline - time.monotonic(), 0.0), _give_up, (where, who, timeout_s, num))
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(**args, initialization_timeout=int(timeout_s) + _JAX_TIMEOUT_MARGIN_S)
  except (ValueError, TypeError) as e:  # arguments JAX could not complete or accept (nothing detected, bad ids)
    raise UserError(f"cannot start the distributed job ({who}, coordinator {where}): {e}. Set "
                    "distributed.coordinator_address, num_processes and process_id, or run under SLURM, Open MPI "
                    "or on a TPU pod") from None
  finally:
    watchdog.cancel()
  return True


def _give_up(where, who, timeout_s, num):
  """The watchdog: JAX is still connecting at the deadline; its own timeout would abort from C++ later."""
  waiting = ("hosting the coordinator at" if who.startswith("process 0 ") else "connecting to the coordinator at")
  print(f"error: the distributed job did not come together within {timeout_s:g} s ({who}, {waiting} {where}): are "
        f"all {num or 'the'} processes started, with the same coordinator address and distinct process ids? (raise "
        "distributed.timeout_s for slow starts)", file=sys.stderr, flush=True)
  os._exit(2)


def is_main_process() -> bool:
  """Process 0 writes the files of a run (logs, events, exports, results); every process computes."""
  return jax.process_index() == 0


# --------------------------------------------------------------------------------------------------------
# Agreements between processes during training (no-ops on one process).


def barrier(name: str) -> None:
  """Every process waits here until all arrived (no-op on one process). Call in the same order everywhere."""
  if jax.process_count() == 1:
    return
  import orbax.checkpoint as ocp  # its barrier: jax.distributed's client, with a timeout

  ocp.multihost.get_barrier_sync_fn()(key=f"doc2atom-{next(_barriers)}-{name}", timeout_ms=BARRIER_TIMEOUT_S * 1000)


def _allgather(x: np.ndarray) -> np.ndarray:
  """[process_count, *x.shape]: every process's `x` (same shape everywhere)."""
  from jax.experimental import multihost_utils

  barrier("allgather")
  return np.asarray(multihost_utils.process_allgather(np.asarray(x)))


def share(total: int, what: str) -> int:
  """This process's equal share of `total` things of a step."""
  count = jax.process_count()
  if total % count:
    raise UserError(f"{total} {what} do not split evenly over {count} processes")
  return total // count


def main_first(fn):
  """fn() on process 0, then, once it returned, on the others (e.g. preparing a dataset on a shared disk once).

  An exception on process 0 is raised there and becomes a UserError on the others, so no process waits forever.
  """
  if jax.process_count() == 1:
    return fn()
  error = None
  if is_main_process():
    try:
      result = fn()
    except Exception as e:  # re-raised below, after the others heard of it
      error = e
  if any_process(error is not None):
    if error is not None:
      raise error
    raise UserError("process 0 failed while preparing the data (its log says why)")
  return result if is_main_process() else fn()


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is True on any (e.g. a SIGTERM that reached only some processes)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(_allgather(np.int32(bool(flag))).any())


def process_sum(value: float) -> float:
  if jax.process_count() == 1:
    return float(value)
  return float(_allgather(np.float64(value)).sum())


def agree_on_shapes(batch: dict, floor: dict) -> tuple[dict, dict]:
  """`shapes.pad_up` to the per-axis maximum over processes: every process then feeds the same shapes."""
  
  batch, floor = shapes.pad_up(batch, floor)
  if jax.process_count() == 1:
    return batch, floor
  names = sorted(floor)
  dims = np.asarray([d for n in names for d in floor[n]], np.int64)
  most = _allgather(dims).max(axis=0)
  agreed, i = {}, 0
  for n in names:
    agreed[n] = tuple(int(d) for d in most[i:i + len(floor[n])])
    i += len(floor[n])
  return shapes.pad_up(batch, agreed)


def global_batch(batch: dict, shardings_for):
  """This process's batch (numpy) -> (global arrays, their shardings).

  `shardings_for(shapes)` gives the NamedShardings of a dict of global `jax.ShapeDtypeStruct`s. On P processes
  every field's leading axis holds the processes' equal-sized shares: a field sharded so that each process's
  devices hold as many rows as its share is built from the shares in place (`jax.make_array_from_process_local_
  data`: the rows sit where the process's devices are); any other (replicated, e.g. the documents every question
  may attend to) from all shares gathered, in process order. Fields with the same leading size and sharding
  (a batch's question fields) keep their rows aligned either way; indices into another field (doc_of_q) are the
  caller's to offset.
  """
  if jax.process_count() == 1:
    shardings = shardings_for(batch)
    return jax.device_put(batch, shardings), shardings
  count = jax.process_count()
  shapes = {k: jax.ShapeDtypeStruct((v.shape[0] * count, *v.shape[1:]), v.dtype) for k, v in batch.items()}
  shardings = shardings_for(shapes)
  own = {k for k, v in batch.items()
         if not shardings[k].is_fully_replicated and _rows_held(shardings[k], shapes[k].shape) == v.shape[0]}
  gathered = _gather({k: v for k, v in batch.items() if k not in own})
  out = {}
  for k, v in batch.items():
    data = v if k in own else gathered[k]
    out[k] = jax.make_array_from_process_local_data(shardings[k], data, shapes[k].shape)
  return out, shardings


def _rows_held(sharding, shape) -> int:
  """How many rows (leading axis) of a global array this process's devices hold (replicas counted once)."""
  held = set()
  for index in sharding.addressable_devices_indices_map(shape).values():
    held.update(range(*index[0].indices(shape[0])))
  return len(held)


def _gather(tree: dict) -> dict:
  if not tree:
    return {}
  from jax.experimental import multihost_utils

  barrier("gather")
  return {k: np.asarray(v) for k, v in multihost_utils.process_allgather(tree, tiled=True).items()}


def host_local(tree):
  """A tree of (possibly multi-process) arrays as arrays of this process alone (its default device): what
  process-local work such as evaluation or an export needs. Collective on P processes; unchanged on one."""
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils

  barrier("host_local")
  return jax.tree.map(jax.numpy.asarray, multihost_utils.process_allgather(tree, tiled=True))
