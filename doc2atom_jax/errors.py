"""The one exception type for mistakes a user can fix (bad paths, names, inputs, configs).

The CLI turns a `UserError` into one clear line on stderr and exit status 2, without a traceback;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """A problem with the user's input, files or configuration, with a message that says how to fix it."""
