"""Reading user files with clear errors, and writing files atomically (never half-written)."""

import contextlib
import os
import pathlib
import tempfile

from doc2atom_jax.errors import UserError


def read_text(path) -> str:
  """UTF-8 text of a user file; a missing file or invalid bytes give a UserError naming the place."""
  path = pathlib.Path(path).expanduser()
  try:
    data = path.read_bytes()
  except FileNotFoundError:
    raise UserError(f"file not found: {path}") from None
  except IsADirectoryError:
    raise UserError(f"{path} is a directory, not a file") from None
  except OSError as e:
    raise UserError(f"cannot read {path}: {e.strerror}") from None
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise UserError(f"{path} is not valid UTF-8 (byte {e.start}, line {line}: {data[e.start:e.start + 4]!r}); "
                    "convert it to UTF-8 first") from None


def _umask() -> int:
  """The process umask, read without setting it where possible (os.umask is process-wide, not thread-safe)."""
  try:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
      if line.startswith("Umask:"):
        return int(line.split()[1], 8)
  except OSError:
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_open(path, mode: str = "w", **kwargs):
  """Writes to a temporary file beside `path`, fsyncs it and renames it into place on success."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the mode open() would give it
    with os.fdopen(fd, mode, **kwargs) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def atomic_write_text(path, text: str) -> None:
  with atomic_open(path, "w", encoding="utf-8") as f:
    f.write(text)


def writable_dir(path, what: str) -> pathlib.Path:
  """`path` as a folder this process can write into (it need not exist yet; nothing is made here).

  Modes call it before loading a model, so a --workdir that is a file, or a read-only output folder, is one
  clear line in a second instead of a traceback after the slow part. `what` names the folder in the message.
  """
  path = pathlib.Path(path).expanduser()
  existing = path.absolute()
  try:
    while not existing.exists():  # the nearest existing folder is where the new ones would be made
      existing = existing.parent
    if not existing.is_dir():
      where = "" if existing == path.absolute() else f": {existing}"
      raise UserError(f"{what} {path}{where} is a file, not a folder")
  except OSError as e:
    raise UserError(f"{what} {path}: cannot reach {e.filename or existing} ({e.strerror})") from None
  if not os.access(existing, os.W_OK | os.X_OK):
    where = "" if existing == path.absolute() else f" ({existing} is read-only)"
    raise UserError(f"{what} {path} is not writable{where}")
  return path
