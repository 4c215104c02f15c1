"""SIGTERM as a request to stop at the next safe point (the trainer after a step, selfgen after a part).

A preempted job gets SIGTERM and some seconds before SIGKILL; Orbax's own preemption check needs
`jax.distributed`, so the long loops install this flag instead, poll it, and stop cleanly (exit status 0).
"""

import signal
import threading


class SigtermFlag:
  """SIGTERM sets `requested`; `restore()` puts the previous handler back. Off the main thread (where Python
  cannot install signal handlers) it installs nothing and `requested` stays False."""

  def __init__(self):
    self.requested = False
    self._previous = None
    self._installed = threading.current_thread() is threading.main_thread()
    if self._installed:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self) -> None:
    if self._installed:
      # None: the previous handler was not installed from Python; the default is the nearest we can put back
      signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
      self._installed = False
