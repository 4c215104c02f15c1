"""Multi-process training on one machine: 2 processes x 4 CPU devices (gloo) train like 1 process x 8 devices.

configs/tiny.py with generator data, mesh (-1, 1, 1) (data parallel over all 8 devices), 2 documents a step
(one per process), a checkpoint every step. Each run is a subprocess of `python -m doc2atom_jax.main`:
  a: 1 process, steps 1-3 (the reference)        b: 2 processes, steps 1-3
  c: 1 process resuming b's checkpoint 2 -> 3    d: 2 processes resuming a's checkpoint 1 -> 2-3
(all with train.steps=3, so the learning-rate schedule, and the compiled steps, are the same).
The global batch of a step is the same in all of them, so the losses agree up to the order of the gradient
all-reduce (in-process vs gloo): measured equal to ~1e-7 relative; asserted with rtol 1e-5. Bad inputs: a
coordinator that never answers, a checkpoint resumed on a process count that does not split the step's
documents, and per-process batches of different shapes (some not split by the data axis).
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from doc2atom_jax import distributed
from doc2atom_jax.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[2]
RTOL = 1e-5  # all-reduce order: in-process vs gloo; measured differences ~1e-7 relative
TRAIN = ("--config=configs/tiny.py", "--config.data.source=generator", "--config.data.documents_per_step=2",
         "--config.train.checkpoint_every=1", "--config.eval.documents=0", "--config.train.eval_every=0")


def _gloo_available() -> bool:
  try:
    from jax._src.lib import _jax
  except ImportError:  # another layout of jaxlib: let the runs tell
    return True
  return hasattr(_jax, "make_gloo_tcp_collectives")


pytestmark = pytest.mark.skipif(not _gloo_available(), reason="this jaxlib has no gloo CPU collectives")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def environment(devices: int, **extra) -> dict:
  env = {k: v for k, v in os.environ.items() if k != distributed.ENV_FLAG}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])), **extra)
  return env


def distributed_flags(port: int, processes: int, pid: int, timeout_s: int = 300) -> list[str]:
  return [f"--config.distributed.coordinator_address=127.0.0.1:{port}",
          f"--config.distributed.num_processes={processes}", f"--config.distributed.process_id={pid}",
          f"--config.distributed.timeout_s={timeout_s}"]


class Job:
  """Processes of one run; `finish()` waits (bounded) and returns [(returncode, output)] per process."""

  def __init__(self, commands, log_stem: pathlib.Path):
    self.logs = [pathlib.Path(f"{log_stem}.{i}.log") for i in range(len(commands))]
    self.started = time.monotonic()
    self.procs = []
    for (argv, env), log in zip(commands, self.logs):
      with open(log, "wb") as f:
        self.procs.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))

  def finish(self, timeout=900):
    results = []
    for proc, log in zip(self.procs, self.logs):
      try:
        proc.wait(timeout=max(timeout - (time.monotonic() - self.started), 1))
      except subprocess.TimeoutExpired:
        for p in self.procs:
          p.kill()
        pytest.fail(f"{log} still running after {timeout} s:\n{log.read_text(errors='replace')[-3000:]}")
      results.append((proc.returncode, log.read_text(errors="replace")))
    self.seconds = time.monotonic() - self.started
    return results


def train(workdir: pathlib.Path, processes: int, steps: int, *flags, via_env=False) -> Job:
  """A training run of `processes` processes sharing 8 CPU devices; distributed via flags or via the env."""
  argv = [sys.executable, "-m", "doc2atom_jax.main", *TRAIN, f"--workdir={workdir}", f"--config.train.steps={steps}",
          *flags]
  if processes == 1:
    return Job([(argv, environment(8))], workdir)
  port = free_port()
  commands = []
  for pid in range(processes):
    if via_env:  # initialize stays "auto"; DOC2ATOM_DISTRIBUTED=1 turns it on
      commands.append((argv + distributed_flags(port, processes, pid), environment(8 // processes, DOC2ATOM_DISTRIBUTED="1")))
    else:
      commands.append((argv + ["--config.distributed.initialize=on"] + distributed_flags(port, processes, pid),
                       environment(8 // processes)))
  return Job(commands, workdir)


def succeeded(job: Job) -> list[str]:
  outputs = []
  for (code, output), log in zip(job.finish(), job.logs):
    assert code == 0, f"{log} exited {code}:\n{output[-3000:]}"
    outputs.append(output)
  return outputs


def losses(workdir: pathlib.Path) -> dict[int, float]:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in rows}


def keep_checkpoints_up_to(workdir: pathlib.Path, step: int) -> None:
  for folder in (workdir / "checkpoints").iterdir():
    if folder.name.isdigit() and int(folder.name) > step:
      shutil.rmtree(folder)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multiprocess")
  a, b = train(root / "a", 1, 3), train(root / "b", 2, 3)
  logs = {"a": succeeded(a)}
  shutil.copytree(root / "a", root / "d")  # each resume starts as soon as the run it resumes is done
  keep_checkpoints_up_to(root / "d", 1)
  d = train(root / "d", 2, 3, via_env=True)
  logs["b"] = succeeded(b)
  shutil.copytree(root / "b", root / "c")
  keep_checkpoints_up_to(root / "c", 2)
  c = train(root / "c", 1, 3)
  logs.update(c=succeeded(c), d=succeeded(d))
  print(f"\nrun seconds: a {a.seconds:.0f}, b {b.seconds:.0f}, c {c.seconds:.0f}, d {d.seconds:.0f} (a, b started "
        "together; d after a, c after b)")
  result = {"root": root, "logs": logs, **{name: losses(root / name) for name in "abcd"}}
  print("losses:", {name: result[name] for name in "abcd"})
  return result


def test_two_processes_train_like_one(runs):
  a, b = runs["a"], runs["b"]
  assert sorted(b) == [1, 2, 3]
  np.testing.assert_allclose([b[1], b[2], b[3]], [a[1], a[2], a[3]], rtol=RTOL)
  # Files are process 0's: one metrics line a step, one event file, one export; process 1 said nothing of them.
  root = runs["root"]
  assert len((root / "b" / "metrics.jsonl").read_text().splitlines()) == 3
  assert len(list((root / "b" / "tensorboard").glob("events.out.tfevents.*"))) == 1
  assert (root / "b" / "export" / "export.json").is_file()
  first, second = runs["logs"]["b"]
  assert "exported the trained compiler and router" in first and "exported" not in second
  meta = json.loads(next((root / "b" / "checkpoints" / "3" / "meta").glob("*")).read_text())
  assert meta["layout"] == {"processes": 2, "devices": 8, "mesh": {"data": 8, "fsdp": 1, "tensor": 1}}
  # Process 0 wrote the checksums of what both processes saved, once the save had committed; resumes verified them.
  from doc2atom_jax import checkpoint

  for step in checkpoint.checkpoint_steps(root / "b" / "checkpoints"):
    assert checkpoint.verify_checksums(root / "b" / "checkpoints" / str(step))
  assert not any("checksums.json" in log for name in "cd" for log in runs["logs"][name])


def test_checkpoint_of_two_processes_resumes_on_one(runs):
  a, c = runs["a"], runs["c"]
  assert sorted(c) == [1, 2, 3]  # b's steps 1-2 (its step 3 was dropped on resume), then this run's step 3
  np.testing.assert_allclose(c[3], a[3], rtol=RTOL)
  assert "resumed from step 2" in runs["logs"]["c"][0]
  assert "written on {'processes': 2" in runs["logs"]["c"][0]


def test_checkpoint_of_one_process_resumes_on_two(runs):
  a, d = runs["a"], runs["d"]
  assert sorted(d) == [1, 2, 3]  # a's step 1 (the later records were dropped on resume), then steps 2-3
  np.testing.assert_allclose([d[2], d[3]], [a[2], a[3]], rtol=RTOL)
  assert all("resumed from step 1" in log for log in runs["logs"]["d"])


def test_export_of_two_processes_holds_the_trained_parameters(runs):
  """The export process 0 wrote alone equals the parameters of the collective checkpoint of the same step."""
  import jax
  from flax import nnx

  from configs import tiny
  from doc2atom_jax import checkpoint
  from doc2atom_jax import system as system_lib

  config = tiny.get_config()
  exported, saved = system_lib.build_system(config), system_lib.build_system(config)
  checkpoint.load_params((exported.compiler, exported.router), runs["root"] / "b" / "export")
  checkpoint.load_checkpoint_params((saved.compiler, saved.router), runs["root"] / "b" / "checkpoints", 3)
  for x, y in zip(jax.tree.leaves(nnx.state((exported.compiler, exported.router), nnx.Param)),
                  jax.tree.leaves(nnx.state((saved.compiler, saved.router), nnx.Param))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resuming_on_a_process_count_that_does_not_split_the_documents_is_one_clear_error(runs, tmp_path):
  """A checkpoint moves to any process count that divides data.documents_per_step (2 here); 3 processes cannot
  each build an equal share of a step's documents, and say so before anything is read or written."""
  workdir = tmp_path / "a"
  shutil.copytree(runs["root"] / "a", workdir)
  before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  port = free_port()
  argv = [sys.executable, "-m", "doc2atom_jax.main", *TRAIN, f"--workdir={workdir}", "--config.train.steps=4",
          "--config.distributed.initialize=on"]
  job = Job([(argv + distributed_flags(port, 3, pid, timeout_s=120), environment(2)) for pid in range(3)],
            tmp_path / "three")
  for code, output in job.finish(timeout=300):
    assert code == 2, output[-3000:]
    assert output.strip().splitlines()[-1] == (
        "error: data.documents_per_step=2 does not split over 3 processes: each process builds an equal share of "
        "every step's documents. Use a multiple of 3 (a run, and its checkpoints, move to any process count that "
        "divides it)")
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before
  assert sorted(losses(workdir)) == [1, 2, 3]


def test_a_coordinator_that_never_answers_is_a_bounded_clear_error(tmp_path):
  """Process 1 finds no coordinator at its address; process 0 (the coordinator) never sees process 1. Both stop
  after distributed.timeout_s (5 s) with one `error:` line naming the address, exit status 2."""
  argv = [sys.executable, "-m", "doc2atom_jax.main", *TRAIN, f"--workdir={tmp_path / 'w'}",
          "--config.distributed.initialize=on"]
  ports = [free_port(), free_port()]
  jobs = [Job([(argv + distributed_flags(ports[pid], 2, pid, timeout_s=5), environment(4))], tmp_path / f"p{pid}")
          for pid in (1, 0)]
  (code1, out1), = jobs[0].finish(timeout=120)
  (code0, out0), = jobs[1].finish(timeout=120)
  assert code1 == 2 and code0 == 2, (out1, out0)
  assert out1.strip().splitlines()[-1].startswith(f"error: no coordinator answered at 127.0.0.1:{ports[1]} within 5 s")
  assert out0.strip().splitlines()[-1].startswith(
      f"error: the distributed job did not come together within 5 s (process 0 of 2, hosting the coordinator at "
      f"127.0.0.1:{ports[0]})")
  assert max(job.seconds for job in jobs) < 90  # 5 s of waiting plus start-up on busy cores, not JAX's 5 minutes
  assert not (tmp_path / "w").exists()


def test_per_process_batches_of_different_shapes_make_one_global_batch(tmp_path):
  """agree_on_shapes pads every process's batch to the same shapes (a collective step would deadlock otherwise);
  global_batch concatenates the shares: in place where the data axis splits the question rows (4 a process),
  gathered where it does not (3 a process: 6 rows on 8 devices, replicated)."""
  output, port = tmp_path / "result.json", free_port()
  worker = str(pathlib.Path(__file__).with_name("multiprocess_worker.py"))
  job = Job([([sys.executable, worker, str(pid), "2", str(port), str(output)], environment(4)) for pid in (0, 1)],
            tmp_path / "worker")
  for code, log in job.finish(timeout=300):
    assert code == 0, log[-3000:]
  result = json.loads(output.read_text())
  assert result["process_count"] == 2 and result["device_count"] == 8
  assert result["any_process"] is True and result["process_sum"] == 3
  for questions, sharded in ((3, False), (4, True)):
    r = result[str(questions)]
    assert r["floor"]["doc_tokens"] == [1, 16]  # process 0 built 8 tokens, process 1 16: both feed 16
    assert r["sharded"] == {"doc_tokens": False, "q_tokens": sharded, "doc_of_q": sharded}
    q = np.arange(questions * 4).reshape(questions, 4)
    np.testing.assert_array_equal(r["values"]["q_tokens"], np.concatenate([q, q + 100]))
    np.testing.assert_array_equal(r["values"]["doc_of_q"], [0] * questions + [1] * questions)
    np.testing.assert_array_equal(r["values"]["doc_tokens"], [[1] * 8 + [0] * 8, [2] * 16])
    assert r["sums"]["q_tokens"] == int(2 * q.sum() + 100 * q.size)


# ---------------------------------------------------------------------------------------------------------
# In this process (no jax.distributed): when to initialize, and the checks made before any connection.


class Settings:
  def __init__(self, **kw):
    self.__dict__.update({**vars(distributed.DEFAULTS), **kw})


def test_auto_initializes_only_in_a_multi_process_environment():
  auto = Settings()
  assert distributed.resolve_mode(auto, {}) == "off"
  assert distributed.resolve_mode(auto, {"SLURM_NTASKS": "1", "TPU_WORKER_HOSTNAMES": "localhost"}) == "off"
  for env in ({"SLURM_NTASKS": "4"}, {"TPU_WORKER_HOSTNAMES": "t0,t1"}, {"MEGASCALE_COORDINATOR_ADDRESS": "x:1"},
              {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, {"OMPI_COMM_WORLD_SIZE": "2"}):
    assert distributed.resolve_mode(auto, env) == "on", env
  assert distributed.resolve_mode(Settings(initialize="on"), {}) == "on"
  assert distributed.resolve_mode(Settings(initialize="off"), {"SLURM_NTASKS": "4"}) == "off"
  assert distributed.resolve_mode(auto, {"DOC2ATOM_DISTRIBUTED": "1"}) == "on"
  assert distributed.resolve_mode(Settings(initialize="on"), {"DOC2ATOM_DISTRIBUTED": "0"}) == "off"
  with pytest.raises(UserError, match="DOC2ATOM_DISTRIBUTED='yes'"):
    distributed.resolve_mode(auto, {"DOC2ATOM_DISTRIBUTED": "yes"})
  with pytest.raises(UserError, match="must be one of auto, on, off"):
    distributed.resolve_mode(Settings(initialize="maybe"), {})
  assert distributed.maybe_initialize(type("Config", (), {"distributed": auto})(), {}) is False  # nothing to do


@pytest.mark.parametrize("settings, message", [
    (dict(num_processes=2, process_id=2), "process_id=2 must be below distributed.num_processes=2"),
    (dict(coordinator_address="node0", num_processes=2, process_id=1), "'node0' must be host:port"),
    (dict(num_processes=-1), "num_processes must be >= 0"),
    (dict(coordinator_address="127.0.0.1:1", num_processes=2, process_id=1, timeout_s=0), "timeout_s must be positive"),
])
def test_bad_settings_fail_before_connecting(settings, message):
  config = type("Config", (), {"distributed": Settings(initialize="on", **settings)})()
  with pytest.raises(UserError, match=message):
    distributed.maybe_initialize(config, {})


def test_each_process_builds_its_share_of_the_global_batch():
  from configs import tiny
  from doc2atom_jax import system as system_lib
  from doc2atom_jax.train import data as data_lib

  config = tiny.get_config()
  with config.unlocked():
    config.data.source, config.data.documents_per_step = "generator", 4
  tokenizer = system_lib.load_model(config).tokenizer
  ids = lambda source, step: [d.doc.doc_id for d in source(step, tokenizer)]
  one = data_lib.source_from_config(config)
  shares = [data_lib.source_from_config(config, process_index=p, process_count=2) for p in (0, 1)]
  for step in (0, 5):
    assert ids(one, step) == ids(shares[0], step) + ids(shares[1], step)
    assert len(set(ids(one, step))) == 4
  with pytest.raises(UserError, match="documents_per_step=4 does not split over 3 processes"):
    data_lib.source_from_config(config, process_index=0, process_count=3)
