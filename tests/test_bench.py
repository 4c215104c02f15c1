"""The benchmark harness at a tiny size (issue 7's CI check: correctness, no timing assertions): one command
writes bench.json with every figure (positive medians, spreads), bench.png, and a table with met / missed for
each target; bad inputs are one `error:` line and exit status 2."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from configs import bench as bench_config
from doc2atom_jax import bench
from doc2atom_jax.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cli(*args, timeout=240):
  env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-m", "doc2atom_jax.bench", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _positive_timing(t):
  assert t["median"] > 0 and 0 < t["min"] <= t["median"] <= t["max"] and t["iqr"] >= 0
  assert t["repeats"] == len(t["times"]) >= 1


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  proc = _cli("--config=configs/bench.py:tiny", f"--config.bench.output={out}", "--config.bench.repeats=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out, proc.stdout


def test_every_figure_is_measured_with_its_spread(tiny_run):
  out, _ = tiny_run
  results = json.loads((out / "bench.json").read_text())
  assert set(results["documents"]) == {"32", "64"}
  for r in results["documents"].values():
    assert r["tokens"] > 0 and r["atoms"] >= 1
    for t in (r["compile_seconds"], r["forward_seconds"], *r["answer_seconds"].values()):
      _positive_timing(t)
    assert set(r["answer_seconds"]) == {"doc2atom", "in_context"}
    assert r["answer_ratio"]["low"] <= r["answer_ratio"]["median"] <= r["answer_ratio"]["high"]
    b = r["bytes"]
    assert 0 < b["atom_codes"] and 0 < b["d2l_adapter"] and 0 < b["kv_cache"]
    assert b["codes_over_kv"] == pytest.approx(b["atom_codes"] / b["kv_cache"])
    forms = b["forms"]
    assert set(forms) == {"bfloat16/float32", "int8/bfloat16"}
    assert forms["bfloat16/float32"]["atom_codes"] == b["atom_codes"]  # tiny's storage is the first form
    assert forms["int8/bfloat16"]["atom_codes"] < b["atom_codes"]
  # The KV cache grows with the document; here, 2x the tokens -> 2x the bytes.
  docs = results["documents"]
  assert docs["64"]["bytes"]["kv_cache"] == 2 * docs["32"]["bytes"]["kv_cache"]
  f = results["composed_forward"]
  _positive_timing(f["plain_seconds"])
  g = f["batched"]
  for t in (g["plain_seconds"], g["gather_seconds"], g["grouped_seconds"]):
    _positive_timing(t)
  assert g["questions"] == 8 and g["groups"] == 2
  assert set(f["by_kr"]) == {"8", "32"}
  for r in f["by_kr"].values():
    _positive_timing(r["composed_seconds"])
    assert r["ratio"]["median"] > 0
  t, c = results["train_step"], results["matmul_ceiling"]
  _positive_timing(t["seconds"])
  assert t["tokens"] > 0 and t["tokens_per_second"] > 0 and c["flops_per_second"] > 0
  assert t["flops"] is None or (t["flops"] > 0 and t["fraction_of_ceiling"] > 0)
  routing = results["routing"]["by_batch"]
  assert set(routing) == {"1", "8"}
  for r in routing.values():
    assert set(r["seconds"]) == {"1000", "4000"}
    for s in r["seconds"].values():
      _positive_timing(s)
    assert isinstance(r["exponent"], float)
  assert results["git"].keys() == {"commit", "dirty"} and results["machine"]["cpu_count"] >= 1
  assert results["config"]["bench"]["repeats"] == 2 and results["config"]["model"]["name"] == "tiny-random-llama"
  assert "untrained" in results["params"]


def test_the_table_says_met_or_missed_for_each_target(tiny_run):
  out, stdout = tiny_run
  results = json.loads((out / "bench.json").read_text())
  rows = results["table"]
  targeted = [r for r in rows if r["target"]]
  # tiny's targets: answer latency at 64 tokens, k·r = 8, bytes at 64 tokens (two storage forms), compile at
  # both lengths, routing growth for both query batches.
  assert len(targeted) == 8
  assert all(r["status"] in ("met", "MISSED") for r in targeted)
  assert all(r["status"] == "-" for r in rows if not r["target"])
  assert results["targets_missed"] == [r["figure"] for r in targeted if r["status"] == "MISSED"]
  for r in targeted:
    line = next(line for line in stdout.splitlines() if line.startswith(r["figure"]))
    assert line.rstrip().endswith(r["status"])
  assert "target(s) missed" in stdout


def test_the_plot_is_a_png(tiny_run):
  out, _ = tiny_run
  assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # atomic writes leave no temporaries


def test_bad_inputs_are_one_error_line_and_exit_2(tmp_path):
  proc = _cli("--config=configs/bench.py:tiny", "--config.model.name=no-such-model",
              f"--config.bench.output={tmp_path}", timeout=120)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith("error:") and "no-such-model" in lines[-1] and "Traceback" not in proc.stderr


def test_a_length_over_the_context_is_refused_before_measuring(tmp_path):
  config = bench_config.get_config("tiny")
  with config.unlocked():
    config.bench.lengths = (32, 100_000)
    config.bench.output = str(tmp_path)
  with pytest.raises(UserError, match=r"100000.*context of 2048"):
    bench.run(config, None, log=lambda _: None)
  assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("field, value, match", [("repeats", 0, "repeats"), ("lengths", (), "lengths is empty"),
                                                 ("route_k", 5000, "smallest bank")])
def test_bad_settings_are_user_errors(field, value, match):
  config = bench_config.get_config("tiny")
  with config.unlocked():
    setattr(config.bench, field, value)
  with pytest.raises(UserError, match=match):
    bench.check_settings(config.bench)


def test_output_folder_needs_a_workdir_or_an_output():
  config = bench_config.get_config("tiny")
  with pytest.raises(UserError, match="--workdir"):
    bench.output_folder(config, None)
  assert bench.output_folder(config, pathlib.Path("w")) == pathlib.Path("w/bench")


def test_growth_exponent():
  assert bench.growth_exponent([1e3, 1e4, 1e5], [1.0, 10.0, 100.0]) == pytest.approx(1.0)
  assert bench.growth_exponent([1e3, 1e4, 1e5], [1.0, 1.0, 1.0]) == pytest.approx(0.0, abs=1e-12)
