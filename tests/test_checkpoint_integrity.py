"""Damaged checkpoints and exports on a tiny model: Orbax reads altered bytes without a word (a flipped bit in a
compressed chunk can still decode, to other numbers), so checksums catch them; a training checkpoint that fails
falls back to the previous one with one line, an export is one UserError line naming the file."""

import os
import pathlib
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from doc2atom_jax import checkpoint
from doc2atom_jax import system as system_lib
from doc2atom_jax.errors import UserError
from tests.train import test_trainer as tt

ROOT = pathlib.Path(__file__).resolve().parents[1]


def with_steps(steps: int):
  return tt.TCFG.__class__(**{**tt.TCFG.__dict__, "steps": steps})


def chunks(folder: pathlib.Path) -> list[pathlib.Path]:
  """The array chunk files of an Orbax item folder (OCDBT data files), largest first."""
  return sorted((f for f in folder.rglob("*") if f.is_file() and f.parent.name == "d"),
                key=lambda f: -f.stat().st_size)


def flip_a_bit(file: pathlib.Path) -> None:
  data = bytearray(file.read_bytes())
  data[len(data) // 2] ^= 0x01
  file.write_bytes(bytes(data))


def truncate(file: pathlib.Path) -> None:
  file.write_bytes(file.read_bytes()[:50])


def params_of(modules) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(modules, nnx.Param)))]


def lines_with(text: str, needle: str) -> list[str]:
  return [l for l in text.splitlines() if needle in l]


# ---------------------------------------------------------------------------------------------------------
# Training checkpoints.
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> pathlib.Path:
  """A 4-step run of the trainer's tiny system: checkpoints at steps 2 and 4."""
  workdir = tmp_path_factory.mktemp("run")
  tt.run(workdir, tcfg=with_steps(4))
  return workdir


def test_checkpoints_carry_checksums_of_their_committed_files(trained):
  folder = checkpoint.checkpoints_dir(trained)
  assert checkpoint.checkpoint_steps(folder) == [2, 4]
  for step in (2, 4):
    assert (folder / str(step) / checkpoint.CHECKSUMS_FILE).is_file()
    assert checkpoint.verify_checksums(folder / str(step))


def test_a_bit_flip_in_a_training_checkpoint_falls_back_to_the_previous_one(trained, tmp_path, capsys):
  workdir = shutil.copytree(trained, tmp_path / "run")
  flip_a_bit(chunks(workdir / "checkpoints" / "4" / "state")[0])

  # mode=export's reader: the newest readable checkpoint, the damaged one reported (and kept).
  system = tt.make_system()
  meta = checkpoint.load_checkpoint_params((system.compiler, system.router), workdir / "checkpoints")
  out = capsys.readouterr().out
  assert meta["step"] == 2
  assert len(lines_with(out, "training checkpoint 4 unreadable (ChecksumMismatch: state/")) == 1, out

  # The trainer: one line, the damaged checkpoint dropped, the run resumed from step 2.
  history = tt.run(workdir, tcfg=with_steps(5))
  out = capsys.readouterr().out
  assert [r["step"] for r in history] == [3, 4, 5]
  said = lines_with(out, "checkpoint 4 unreadable")
  assert len(said) == 1 and "does not match its sha256 in checksums.json); deleting it, trying an older one" in said[0]
  assert "resumed from step 2" in out
  for step in checkpoint.checkpoint_steps(workdir / "checkpoints"):  # the new ones verify
    assert checkpoint.verify_checksums(workdir / "checkpoints" / str(step))


def test_a_checkpoint_without_checksums_resumes_with_a_note(trained, tmp_path, capsys):
  """As one written before checksums were kept (or by a run stopped between the save and its checksums)."""
  workdir = shutil.copytree(trained, tmp_path / "run")
  (workdir / "checkpoints" / "4" / "checksums.json").unlink(missing_ok=True)
  history = tt.run(workdir, tcfg=with_steps(5))
  out = capsys.readouterr().out
  assert [r["step"] for r in history] == [5] and "resumed from step 4" in out
  assert len(lines_with(out, "checkpoint 4 has no checksums.json")) == 1, out


# ---------------------------------------------------------------------------------------------------------
# Exports.
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """An export of the trainer's tiny system (untrained: the numbers do not matter here) and that system."""
  system = tt.make_system()
  path = checkpoint.export_params((system.compiler, system.router), tmp_path_factory.mktemp("e") / "export",
                                  {"step": 0})
  return path, system


def load_into_fresh(path):
  """(the export's metadata, a system whose parameters were zeroed, then loaded from `path`)."""
  system = tt.make_system()
  modules = (system.compiler, system.router)
  nnx.update(modules, jax.tree.map(lambda x: x * 0, nnx.state(modules, nnx.Param)))
  return checkpoint.load_params(modules, path), system


def test_an_export_carries_checksums_and_loads(exported, capsys):
  path, system = exported
  assert checkpoint.verify_checksums(path)
  meta, loaded = load_into_fresh(path)
  assert meta["step"] == 0 and "not verified" not in capsys.readouterr().out
  for got, want in zip(params_of((loaded.compiler, loaded.router)), params_of((system.compiler, system.router))):
    np.testing.assert_array_equal(got, want)


def test_a_bit_flip_in_an_export_is_one_line_naming_the_file(exported, tmp_path):
  path = shutil.copytree(exported[0], tmp_path / "export")
  chunk = chunks(path / "params")[0]
  flip_a_bit(chunk)
  with pytest.raises(UserError) as e:
    load_into_fresh(path)
  message = str(e.value)
  assert "\n" not in message
  assert message == (f"{path} is damaged ({chunk.relative_to(path).as_posix()} does not match its sha256 in "
                     "checksums.json)")


@pytest.mark.parametrize("checksums", [True, False])
def test_a_truncated_export_chunk_is_one_line(exported, tmp_path, checksums):
  path = shutil.copytree(exported[0], tmp_path / "export")
  truncate(chunks(path / "params")[0])
  if not checksums:  # an export of an older version: Orbax's own error, made one line
    (path / "checksums.json").unlink(missing_ok=True)
  with pytest.raises(UserError) as e:
    load_into_fresh(path)
  message = str(e.value)
  assert "\n" not in message and message.startswith(f"{path} is damaged (") and message.endswith(")")
  assert len(message) < len(str(path)) + 250


def test_an_export_without_checksums_loads_with_a_note(exported, tmp_path, capsys):
  path = shutil.copytree(exported[0], tmp_path / "export")
  (path / "checksums.json").unlink(missing_ok=True)
  meta, loaded = load_into_fresh(path)
  assert meta["step"] == 0
  assert len(lines_with(capsys.readouterr().out, "checksums.json (an export of an older version)")) == 1
  system = exported[1]
  for got, want in zip(params_of((loaded.compiler, loaded.router)), params_of((system.compiler, system.router))):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("checksums", [True, False])
def test_the_command_line_reports_a_damaged_export_in_one_line(tmp_path, checksums):
  c = tiny.get_config()
  c.unlock()
  c.params = ""
  system = system_lib.build_system(c)
  path = checkpoint.export_params((system.compiler, system.router), tmp_path / "export",
                                  {"step": 0, "model": system.model.name})
  truncate(chunks(path / "params")[0])
  if not checksums:
    (path / "checksums.json").unlink(missing_ok=True)
  cmd = [sys.executable, "-m", "doc2atom_jax.main", "--config=configs/tiny.py", "--config.mode=export",
         f"--config.params={path}", f"--config.export.output={tmp_path / 'out'}"]
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, XLA_FLAGS=""),
                          timeout=300)
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and errors[0].startswith(f"error: {path} is damaged ("), result.stderr[-3000:]
  assert result.stderr.rstrip().endswith(errors[0]), result.stderr[-3000:]  # nothing after it


def test_dropped_orbax_reads_are_filtered_after_a_failed_restore(monkeypatch):
  """Orbax's concurrent chunk reads, dropped when one fails, print "Exception ignored in: <coroutine ...>" with
  pages of TensorStore spec whenever they are collected (seen after the one error line in CI): after a failed
  restore those, and only those, are filtered."""
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  namespace = {}
  exec(compile("def read():\n  raise Exception('chunk unreadable')\n", "/venv/site-packages/orbax/checkpoint/x.py",
               "exec"), namespace)

  def unraisable(fn):
    try:
      fn()
    except Exception as e:  # pylint: disable=broad-except
      return types.SimpleNamespace(exc_type=type(e), exc_value=e, exc_traceback=e.__traceback__, err_msg=None,
                                   object=None)

  with checkpoint.quiet_failed_reads():  # a restore that succeeds changes nothing
    pass
  assert sys.unraisablehook == seen.append
  with pytest.raises(RuntimeError):
    with checkpoint.quiet_failed_reads():
      raise RuntimeError("restore failed")
  orbax_read, other = unraisable(namespace["read"]), unraisable(lambda: 1 / 0)
  sys.unraisablehook(orbax_read)
  sys.unraisablehook(other)
  assert seen == [other]
