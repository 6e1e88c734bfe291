"""SIGTERM and SIGINT as requests: the loop checkpoints after its current step
and stops.

SIGTERM is how schedulers preempt (and SIGKILL a grace period later); Ctrl-C
(SIGINT) is a person stopping the run. Both leave a checkpoint to resume
from. The CLI exits 0 after SIGTERM (the job is resumable: schedulers that
retry on failure need not) and 130 after SIGINT (128 + 2, the shell's
convention for an interrupted command, so a script running several commands
stops too); see ``main.py``.

A second Ctrl-C aborts at once, for a run that hangs: no new checkpoint
starts, one being written may finish (``ABORT_WAIT_S``) or is removed, one
line on stderr names what is kept, exit 130.
Python runs signal handlers only when the main thread is back in Python (not
during an XLA compile or a blocked collective), and two signals that arrive
meanwhile run the handler once; so each delivery is counted from the
interpreter's wakeup fd (one byte per signal, written by its C-level handler)
by a watcher thread, which also aborts while the main thread is stuck.

Start-up: ``on_start_up()`` (the CLI's first call) records SIGTERM/SIGINT
until a ``Preemption`` takes over, which then raises ``StoppedBeforeStart``
before the run writes anything (the CLI exits 0 for SIGTERM, 130 for
SIGINT). A signal after that, during setup or compilation, is a request like
any other: the first step runs and is checkpointed.
"""
from __future__ import annotations

import glob
import os
import shutil
import signal
import sys
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)
ABORT_EXIT = 128 + signal.SIGINT
ABORT_WAIT_S = 30.0                       # a checkpoint being written may finish first
TMP_SUFFIX = '.orbax-checkpoint-tmp'      # Orbax's folder of a checkpoint being written

_early = {'signal': None}                 # a request before any Preemption (start-up)


class StoppedBeforeStart(RuntimeError):
  """A stop request arrived before the run began; nothing was written."""

  def __init__(self, signal_name: str):
    super().__init__(f'stopped by {signal_name} before the run started; nothing was written')
    self.signal_name = signal_name


def _early_handler(signum, frame):
  del frame
  name = signal.Signals(signum).name
  if signum == signal.SIGINT and _early['signal'] == 'SIGINT':
    print('aborted (second Ctrl-C) during start-up; nothing was written', file=sys.stderr,
          flush=True)
    os._exit(ABORT_EXIT)
  _early['signal'] = _early['signal'] or name


def on_start_up() -> None:
  """From now on SIGTERM/SIGINT are recorded, not fatal, until a
  ``Preemption`` takes over (for a command line: call first)."""
  _early['signal'] = None
  for sig in SIGNALS:
    signal.signal(sig, _early_handler)


def discard_partial_checkpoints(workdir: str) -> None:
  """Removes checkpoints being written (Orbax's ``*.orbax-checkpoint-tmp*``
  folders) under ``workdir/checkpoints``: each is first renamed (atomic: it
  either wins over Orbax's own rename into ``<step>`` or finds it gone), so a
  finished checkpoint is never touched."""
  for path in glob.glob(os.path.join(workdir, 'checkpoints', f'*{TMP_SUFFIX}*')):
    if path.endswith('.discarded'):
      continue
    target = f'{path}.{os.getpid()}.discarded'
    try:
      os.rename(path, target)
    except OSError:
      continue
    shutil.rmtree(target, ignore_errors=True)
  for path in glob.glob(os.path.join(workdir, 'checkpoints', f'*{TMP_SUFFIX}*.discarded')):
    shutil.rmtree(path, ignore_errors=True)


class Preemption:
  """SIGTERM/SIGINT -> ``requested`` (a flag the loop reads), for the
  ``with`` body only: the previous handlers are put back on exit. A no-op
  outside the main thread (Python delivers signals there only).

  ``workdir``: the run's folder, named by the abort line (what is kept) and
  cleared of a half-written checkpoint. ``on_abort``: what the second Ctrl-C
  does (default: that line, then ``os._exit(130)``), called from the
  watcher thread.

  Raises (on entry):
    StoppedBeforeStart: ``on_start_up`` recorded a signal before this.
  """

  def __init__(self, workdir: str | None = None, on_abort=None):
    self.requested = False
    self.signal_name = None            # 'SIGTERM' | 'SIGINT': the first request
    self.workdir = workdir
    self.on_abort = on_abort or self.abort
    self._previous = {}
    self._mutex = threading.Lock()
    self._sigints = 0
    self._pipe = None
    self._previous_wakeup = -1
    self._watcher = None

  def _request(self, name: str) -> None:
    with self._mutex:
      if not self.requested:
        self.signal_name = name
      self.requested = True

  def _handle(self, signum, frame):
    """The Python-level handler (main thread; runs once for signals that
    arrived together): the flag only. The watcher counts."""
    del frame
    self._request(signal.Signals(signum).name)

  def _watch(self, fd: int) -> None:
    while True:
      try:
        data = os.read(fd, 64)
      except OSError:
        return
      if not data:                     # the write end closed: the body ended
        return
      for signum in data:
        if signum not in SIGNALS:
          continue
        self._request(signal.Signals(signum).name)
        if signum == signal.SIGINT:
          self._sigints += 1
          if self._sigints == 1:
            print('\ninterrupted: stopping after this step with a checkpoint '
                  '(Ctrl-C again to abort without one)', file=sys.stderr, flush=True)
          elif self._sigints == 2:
            self.on_abort()

  def abort(self) -> None:
    """The second Ctrl-C: exit 130 at once (no interpreter shutdown: Orbax's
    threads would fail noisily), after one line. No checkpoint starts any
    more; one being written gets ``ABORT_WAIT_S`` to finish, else it is
    removed."""
    line = 'aborted (second Ctrl-C)'
    if self.workdir is not None:
      try:
        from gmix_jax import checkpoints  # pylint: disable=g-import-not-at-top
        from gmix_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
        checkpoints.quiesce(ABORT_WAIT_S)
        discard_partial_checkpoints(self.workdir)
        line += (f'. Kept: {workdir_lib.kept_after_failure(self.workdir)}; rerun the same '
                 'command to resume from there')
      except Exception:  # pylint: disable=broad-except  (never block the abort)
        pass
    print(line, file=sys.stderr, flush=True)
    os._exit(ABORT_EXIT)

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      return self
    for sig in SIGNALS:
      self._previous[sig] = signal.getsignal(sig)
      signal.signal(sig, self._handle)
    read, write = os.pipe()
    os.set_blocking(write, False)
    self._pipe = read, write
    self._previous_wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    self._watcher = threading.Thread(target=self._watch, args=(read,), daemon=True,
                                     name='gmix-signals')
    self._watcher.start()
    early = _early['signal']
    if early is not None and self._previous.get(signal.SIGTERM) is _early_handler:
      _early['signal'] = None
      self.__exit__(None, None, None)
      raise StoppedBeforeStart(early)
    return self

  def __exit__(self, *exc):
    if self._pipe is not None:
      signal.set_wakeup_fd(self._previous_wakeup)
      read, write = self._pipe
      os.close(write)                  # the watcher reads EOF and ends
      self._watcher.join(timeout=5)
      os.close(read)
      self._pipe = self._watcher = None
    for sig, previous in self._previous.items():
      # None: the old handler was not installed from Python and cannot be restored.
      signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
    self._previous = {}
    return False
