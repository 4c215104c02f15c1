"""Running the command line in a subprocess as a user would, and the shape of a user error (one `error:` line,
exit status 2, no traceback), shared by the command-line tests."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_module(module: str, *args, timeout: int = 600) -> subprocess.CompletedProcess:
  """`python -m <module> <args>` from the repository root, on one device (XLA_FLAGS cleared)."""
  return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ, XLA_FLAGS=""), timeout=timeout)


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> str:
  """Exit status 2, no traceback, exactly one `error:` line holding every needle; returns that line."""
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  assert "Traceback" not in result.stderr, result.stderr
  lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1, result.stderr
  for needle in needles:
    assert needle in lines[0], lines[0]
  return lines[0]
