"""Command line: `python -m doc2atom_jax.main --config=configs/<file>.py [--config.a.b=v] [--workdir=DIR]`.

Thin on purpose: the flags and their errors are `cli.py`'s; this dispatches on `config.mode` (modes.py).
"""

from doc2atom_jax import cli
from doc2atom_jax.errors import UserError


def dispatch(args) -> None:
  del args  # cli.run allows none
  from doc2atom_jax import modes  # pylint: disable=import-outside-toplevel  (jax loads after the flags parse)

  config = cli.config()
  if config.mode not in modes.MODES:
    raise UserError(f"unknown mode {config.mode!r}; available: {', '.join(modes.MODES)}")
  cli.prepare(config)
  modes.MODES[config.mode](config, cli.workdir())


def run() -> None:
  cli.run(dispatch)


if __name__ == "__main__":
  run()
