"""The one exception type for mistakes a user can fix (bad paths, names, inputs, configs).

The CLI turns a `UserError` into one clear line on stderr and exit status 2, without a traceback;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """A problem with the user's input, files or configuration, with a message that says how to fix it."""


def at_least(name: str, value, minimum) -> None:
  """A count or size from the config below `minimum` is a UserError where it is read, not a wrong result later
  (a plan for -1 chips, a negative token budget)."""
  if value < minimum:
    raise UserError(f"--config.{name}={value!r} must be at least {minimum}")


def positive(name: str, value) -> None:
  """A size that must be above zero (a memory budget, a probability mass)."""
  if not value > 0:
    raise UserError(f"--config.{name}={value!r} must be positive")


def one_of(name: str, value, choices) -> None:
  """An enum-like config string must be one of `choices`: an unknown one would otherwise act as a default."""
  if value not in choices:
    raise UserError(f"--config.{name}={value!r} is not one of: {', '.join(map(str, choices))}")
