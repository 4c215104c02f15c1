"""The one command line of the project: `--config=<file>.py[:arg]` (locked, `--config.a.b=v` overrides),
`--workdir=DIR`, and the error handling every entry point shares.

`python -m doc2atom_jax.main` (dispatch on `config.mode`), `python -m doc2atom_jax.bench` and
`python -m doc2atom_jax.experiment` all run through `run(entry)`: a UserError, a config typo or a bad override,
an unexpected argument — each becomes one `error: ...` line on stderr and exit status 2; anything else is a bug
and keeps its traceback. jax.distributed and the persistent compilation cache are set up here, before anything
touches a device.
"""

import logging
import pathlib
import sys
from collections.abc import Callable, Sequence

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from doc2atom_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file (get_config() -> ConfigDict).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs (checkpoints, banks, reports).")


def message(e: BaseException) -> str:
  """The innermost message of a (possibly wrapped) exception, without the repr quoting of KeyError."""
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  text = str(e.args[0]) if e.args else str(e)
  return " ".join(text.replace("\\n", "\n").split("\n"))


def fail(text: str) -> None:
  """One `error:` line and exit status 2: the project's answer to bad input."""
  print(f"error: {text}", file=sys.stderr)
  sys.exit(2)


def config(required: bool = True, example: str = "configs/quickstart.py"):
  """The parsed, locked config (None when not given and not `required`); its file's errors as a UserError."""
  value = _CONFIG.value
  if value is None:
    if required:
      raise UserError(f"--config is required, e.g. --config={example}")
    return None
  try:
    value.mode  # the config file is loaded lazily: its errors surface on first access
  except OSError as e:
    raise UserError(message(e)) from None
  return value


def workdir() -> pathlib.Path | None:
  return pathlib.Path(_WORKDIR.value) if _WORKDIR.value else None


def _parse_flags(argv):
  """absl's parsing, with config typos and bad override values as one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError, UserError) as e:
    fail(f"bad flags or config override: {message(e)}")


def run(entry: Callable[[Sequence[str]], None], *, positional: Sequence[str] = (), usage: str = "") -> None:
  """Parses the command line and calls `entry(args)` (args: the positional arguments, at most as many as
  `positional` names), turning UserError into one `error:` line and exit status 2."""

  def main(argv) -> None:
    args = list(argv[1:])
    if len(args) > len(positional):
      expected = f"expected {' '.join(positional)}" if positional else "this command takes only flags"
      fail(f"unexpected argument(s): {' '.join(args[len(positional):])} ({expected}{'; ' + usage if usage else ''})")
    try:
      entry(args)
    except UserError as e:
      fail(str(e))

  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "no TPU found" is not news on CPU
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save step at INFO
  app.run(main, flags_parser=_parse_flags)


def prepare(config_value) -> None:
  """What every job needs before it touches a device: jax.distributed (a multi-process job, per the config)
  and the persistent compilation cache."""
  from doc2atom_jax import distributed, paths  # pylint: disable=import-outside-toplevel

  distributed.maybe_initialize(config_value)
  paths.enable_compilation_cache()
