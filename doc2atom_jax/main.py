"""Command line: `python -m doc2atom_jax.main --config=configs/<file>.py [--config.a.b=v] [--workdir=DIR]`.

Thin on purpose: flags, the locked config, jax.distributed (a multi-process job: `config.distributed`, before
anything touches a device), the compilation cache, dispatch on `config.mode`. A UserError becomes one line on
stderr and exit status 2; anything else is a bug and keeps its traceback.
"""

import logging
import pathlib
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from doc2atom_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file (get_config() -> ConfigDict).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs (checkpoints, banks, reports).")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from doc2atom_jax import distributed, modes, paths

  try:
    config = _CONFIG.value
    if config is None:
      raise UserError("--config is required, e.g. --config=configs/quickstart.py")
    try:
      config.mode  # the config file is loaded lazily: its errors surface on first access
    except OSError as e:
      raise UserError(_message(e)) from None
    if config.mode not in modes.MODES:
      raise UserError(f"unknown mode {config.mode!r}; available: {', '.join(modes.MODES)}")
    distributed.maybe_initialize(config)
    paths.enable_compilation_cache()
    workdir = pathlib.Path(_WORKDIR.value) if _WORKDIR.value else None
    modes.MODES[config.mode](config, workdir)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _message(e: BaseException) -> str:
  """The innermost message of a (possibly wrapped) exception, without the repr quoting of KeyError."""
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  text = str(e.args[0]) if e.args else str(e)
  return " ".join(text.replace("\\n", "\n").split("\n"))


def _parse_flags(argv):
  """absl's parsing, with config typos and bad override values as one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError, UserError) as e:
    print(f"error: bad flags or config override: {_message(e)}", file=sys.stderr)
    sys.exit(2)


def run() -> None:
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "no TPU found" is not news on CPU
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save step at INFO
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
