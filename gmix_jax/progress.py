"""The progress display (``progress=True``): a tqdm bar on a terminal, plain
lines anywhere else.

tqdm redraws its bar with carriage returns; written to a file or a pipe (a
pod's log, ``> run.log 2>&1``) that becomes one ever-growing line. When the
stream is not a terminal, `PlainProgress` prints one line per train record
and per evaluation instead (the moments the bar's postfix changes), with the
same figures: steps, rate and ETA (compilation left out), loss, throughput,
test accuracy and ECE. Both write to stderr, as tqdm does, so stdout keeps
only the run's result.
"""
from __future__ import annotations

import sys
import time


def make_bar(total: int, initial: int, stream=None):
  """A tqdm bar if ``stream`` (default stderr) is a terminal, else `PlainProgress`."""
  stream = sys.stderr if stream is None else stream
  if _is_terminal(stream):
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    return tqdm(total=total, initial=initial, unit='step', dynamic_ncols=True, file=stream)
  return PlainProgress(total, initial, stream)


def _is_terminal(stream) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):       # no isatty, or a closed stream
    return False


def _clock(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class PlainProgress:
  """The part of tqdm's interface the trainer uses, as whole lines.

  The trainer sets the postfix when it writes a record, which may be just
  before it counts that step: a line is printed at the next count, on
  ``unpause`` (after an evaluation) or on ``close``, so its step count is the
  record's.
  """

  def __init__(self, total: int, initial: int, stream):
    self.total, self.n, self.stream = total, initial, stream
    self._n0, self._t0 = initial, time.time()
    self._t_update, self._paused = self._t0, 0.0
    self._postfix, self._dirty = {}, False

  def update(self, n: int = 1) -> None:
    self.n += n
    self._t_update = time.time()
    self._flush()

  def set_postfix(self, **postfix) -> None:
    self._flush()                             # a record not yet shown keeps its line
    self._postfix, self._dirty = postfix, True

  def unpause(self) -> None:
    """After an evaluation: its time (since the last step) is left out of the rate, as tqdm does."""
    now = time.time()
    self._paused += now - self._t_update
    self._t_update = now
    self._flush()

  def close(self) -> None:
    self._flush()

  def _flush(self) -> None:
    if not self._dirty:
      return
    self._dirty = False
    elapsed = time.time() - self._t0
    stepping = elapsed - self._paused
    rate = (self.n - self._n0) / stepping if stepping > 0 else 0.0
    eta = _clock((self.total - self.n) / rate) if rate > 0 else '?'
    fields = ' '.join(f'{k}={v}' for k, v in self._postfix.items())
    print(f'step {self.n}/{self.total} ({100 * self.n / self.total:.0f} %), {_clock(elapsed)} '
          f'elapsed, {rate:.2f} step/s, eta {eta}: {fields}', file=self.stream, flush=True)
