"""The SIGTERM flag the trainer and selfgen poll: set by the signal, the previous handler put back after."""

import os
import signal
import threading

from doc2atom_jax import preemption


def test_sigterm_sets_the_flag_and_restore_puts_the_previous_handler_back():
  seen = []
  previous = signal.signal(signal.SIGTERM, lambda *a: seen.append(a))
  try:
    flag = preemption.SigtermFlag()
    assert not flag.requested
    os.kill(os.getpid(), signal.SIGTERM)
    assert flag.requested and not seen  # the flag took it, not the handler it replaced
    flag.restore()
    os.kill(os.getpid(), signal.SIGTERM)
    assert len(seen) == 1
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_off_the_main_thread_it_installs_nothing():
  before = signal.getsignal(signal.SIGTERM)
  flags = []
  thread = threading.Thread(target=lambda: flags.append(preemption.SigtermFlag()))
  thread.start()
  thread.join()
  assert not flags[0].requested and signal.getsignal(signal.SIGTERM) is before
  flags[0].restore()
  assert signal.getsignal(signal.SIGTERM) is before
