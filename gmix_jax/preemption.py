"""SIGTERM as a request: the loop checkpoints after its current step and stops."""
from __future__ import annotations

import signal
import threading


class Preemption:
  """SIGTERM -> ``requested`` (a flag the loop reads), for the ``with`` body
  only: the previous handler is put back on exit. A no-op outside the main
  thread (Python delivers signals there only)."""

  def __init__(self):
    self.requested = False
    self._previous, self._installed = None, False

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.getsignal(signal.SIGTERM)
      signal.signal(signal.SIGTERM, self._handle)
      self._installed = True
    return self

  def __exit__(self, *exc):
    if self._installed:
      # None: the old handler was not installed from Python and cannot be restored.
      signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
    return False
