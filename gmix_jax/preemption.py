"""SIGTERM and SIGINT as requests: the loop checkpoints after its current step
and stops.

SIGTERM is how schedulers preempt (and SIGKILL a grace period later); Ctrl-C
(SIGINT) is a person stopping the run. Both leave a checkpoint to resume
from. A second Ctrl-C aborts at once (Python's KeyboardInterrupt), for a run
that hangs. The CLI exits 0 after SIGTERM (the job is resumable: schedulers
that retry on failure need not) and 130 after SIGINT (128 + 2, the shell's
convention for an interrupted command, so a script running several commands
stops too); see ``main.py``.
"""
from __future__ import annotations

import signal
import sys
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
  """SIGTERM/SIGINT -> ``requested`` (a flag the loop reads), for the
  ``with`` body only: the previous handlers are put back on exit. A no-op
  outside the main thread (Python delivers signals there only)."""

  def __init__(self):
    self.requested = False
    self.signal_name = None            # 'SIGTERM' | 'SIGINT': the first request
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if not self.requested:
      self.signal_name = signal.Signals(signum).name
    self.requested = True
    if signum == signal.SIGINT:
      print('\ninterrupted: stopping after this step with a checkpoint '
            '(Ctrl-C again to abort without one)', file=sys.stderr, flush=True)
      signal.signal(signal.SIGINT, signal.default_int_handler)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in SIGNALS:
        self._previous[sig] = signal.getsignal(sig)
        signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      # None: the old handler was not installed from Python and cannot be restored.
      signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
    self._previous = {}
    return False
