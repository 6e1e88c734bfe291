"""The workdir's plain files: ``config.json``, ``launches.jsonl`` and ``metrics.jsonl``.

A workdir belongs to one run. ``check_config`` refuses a relaunch whose
config would change the training its checkpoints continue (`gmix_jax.drift`:
every field but an allow-list of logging/storage fields);
``record_launch`` appends each launch to ``launches.jsonl`` (and keeps
``config.json`` describing the run); ``MetricsWriter``
appends one JSON record per event and ``truncate_metrics`` cuts the file
back to a checkpoint's step so a resumed run's file equals an uninterrupted
one's.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import time
import types

import ml_collections

from gmix_jax import configure
from gmix_jax import drift

LAUNCHES = 'launches.jsonl'
DEVICES = 'devices (num_devices x processes)'    # compared like a config field


class MetricsWriter:
  """metrics.jsonl, appended (a resumed run continues the same file)."""

  def __init__(self, workdir: str, enabled: bool):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.enabled = enabled
    self.events = None        # also to TensorBoard: a `tb_events.EventWriter` (tensorboard=True)

  def write(self, record: dict) -> None:
    if self.enabled:
      with open(self.path, 'a') as f:
        f.write(json.dumps(record) + '\n')
      if self.events is not None:
        self.events.write(record)

  def close(self) -> None:
    if self.events is not None:
      self.events.close()


def truncate_metrics(path: str, max_step: int, rewrite: bool = True) -> list[dict]:
  """The records of ``path`` up to ``max_step``; with ``rewrite``, the file
  is replaced (atomically) by exactly those.

  A run killed after its last checkpoint has already appended records for
  steps it will redo; the resumed run drops them, so the file ends up as an
  uninterrupted run's. A line cut short by the kill is dropped too.
  """
  if not os.path.exists(path):
    return []
  kept, dropped = [], False
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:                       # a partial last line
        dropped = True
        continue
      if record.get('step', 0) <= max_step:
        kept.append(record)
      else:
        dropped = True
  if rewrite and dropped:
    tmp = f'{path}.tmp.{os.getpid()}'
    with open(tmp, 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in kept)
    os.replace(tmp, path)
  return kept


def read_config(workdir: str) -> dict | None:
  """The run's ``config.json`` (None in a workdir without one)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def check_config(workdir: str, config: ml_collections.ConfigDict,
                 devices: int | None = None) -> dict:
  """Refuses a relaunch that would change the run its checkpoints continue.

  Compares ``config`` with ``config.json`` (and ``devices``, the device count
  in use, with the last launch's: per-device methods depend on it). Returns
  the changed fields a resume may change (``drift.NON_TRAJECTORY``), as
  ``{field: (old, new)}``, for ``record_launch``.

  Raises:
    drift.ConfigDriftError: a trajectory field differs, listing each
      ``old -> new``; nothing has been written.
  """
  old = read_config(workdir)
  if old is None or not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    return {}                 # nothing to continue: the launch starts the run afresh
  new = json.loads(config.to_json())
  old = _upgrade_dataset(old)
  if devices is not None:
    previous = [r['devices'] for r in read_launches(workdir) if 'devices' in r]
    if previous:
      old, new = {**old, DEVICES: previous[-1]}, {**new, DEVICES: devices}
  defaults = {k: v for k, v in configure.OPTIONAL_FIELDS.items() if v is not None}
  return drift.check(workdir, old, new, defaults)


def _upgrade_dataset(old: dict) -> dict:
  """An older ``config.json`` in today's terms: ``dataset.augment`` was a bool
  (True = pad-4 crop + flip = today's ``'cifar'``), so such a workdir resumes."""
  augment = old.get('dataset', {}).get('augment')
  if isinstance(augment, bool):
    from gmix_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    old = {**old, 'dataset': {**old['dataset'], 'augment': pipeline.augment_name(augment)}}
  return old


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """``config.json``: the config of the run this workdir holds (replaced
  atomically: a kill never leaves half a file)."""
  path = os.path.join(workdir, 'config.json')
  tmp = f'{path}.tmp.{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(config.to_json(indent=2))
  os.replace(tmp, path)


def read_launches(workdir: str) -> list[dict]:
  path = os.path.join(workdir, LAUNCHES)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip().endswith('}')]


def record_launch(workdir: str, config: ml_collections.ConfigDict, start_step: int,
                  changed: dict, devices: int, fresh: bool) -> None:
  """Appends this launch to ``launches.jsonl`` (time, host, pid, the step it
  starts from, the device count, the non-trajectory fields it changed, old
  and new). A fresh run writes ``config.json``; a resume that changed some
  fields rewrites it, so it describes the latest launch (whose trajectory
  fields are the run's)."""
  record = {'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'host': socket.gethostname(),
            'pid': os.getpid(), 'start_step': start_step, 'devices': devices,
            'changed': {k: list(v) for k, v in changed.items()}}
  with open(os.path.join(workdir, LAUNCHES), 'a') as f:
    f.write(json.dumps(record) + '\n')
  if fresh or changed:
    write_config(workdir, config)


# -- A full disk ---------------------------------------------------------------
class DiskFullError(OSError):
  """The workdir's disk (or quota) is full; the message says what was kept."""


def _full_disk_cause(e: BaseException) -> BaseException | None:
  """The ENOSPC/EDQUOT error in ``e``'s chain (Orbax and TensorStore wrap it
  in their own exceptions, some only as text), or None."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return e
    if 'No space left on device' in str(e) or 'Disk quota exceeded' in str(e):
      return e
    e = e.__cause__ or e.__context__
  return None


def kept_after_failure(workdir: str) -> str:
  """What a run that failed while writing leaves to resume from."""
  d = os.path.join(workdir, 'checkpoints')
  steps = sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []
  steps = [st for st in steps if os.path.exists(os.path.join(d, str(st), 'digest'))]
  records = truncate_metrics(os.path.join(workdir, 'metrics.jsonl'), 1 << 62, rewrite=False)
  ckpt = f'checkpoint step {steps[-1]} in {d}' if steps else 'no checkpoint'
  metrics = (f'metrics.jsonl up to step {records[-1].get("step")}' if records
             else 'no metrics records')
  return f'{ckpt} and {metrics}'


class _QuietFullDisk(logging.Filter):
  """Drops log records of a full disk: Orbax's background save threads log
  each failure with its traceback through absl (~100 lines), and asyncio
  logs the futures they left at exit; the run reports it itself, in one
  line."""

  reported = False        # once the run has reported it: Orbax's follow-up failures too

  def filter(self, record: logging.LogRecord) -> bool:
    if self.reported and f'{os.sep}orbax{os.sep}' in (record.pathname or ''):
      return False          # e.g. its metadata thread, at exit: "cannot schedule new futures"
    exc = record.exc_info[1] if record.exc_info else None
    if exc is not None and _full_disk_cause(exc) is not None:
      return False
    text = str(record.msg)
    return not ('No space left on device' in text or 'Disk quota exceeded' in text)


def _orbax_aftermath(exc: BaseException | None) -> bool:
  """An error printed straight to stderr (``sys.excepthook``) by a write that
  completed after Orbax closed the event loop of a failed save: TensorStore's
  callback finds ``Event loop is closed``; or the full disk itself."""
  if exc is None:
    return False
  return ((isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed')
          or _full_disk_cause(exc) is not None)


def _quiet_hooks():
  """Installs ``sys.excepthook`` / ``sys.unraisablehook`` that drop
  `_orbax_aftermath`; returns a function that puts the previous ones back."""
  excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

  def quiet_excepthook(kind, exc, tb):
    if not _orbax_aftermath(exc):
      excepthook(kind, exc, tb)

  def quiet_unraisablehook(unraisable):
    if not _orbax_aftermath(unraisable.exc_value):
      unraisablehook(unraisable)

  sys.excepthook, sys.unraisablehook = quiet_excepthook, quiet_unraisablehook

  def restore():
    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook
  return restore


@contextlib.contextmanager
def disk_full_report(workdir: str):
  """Turns a full disk, anywhere in the body, into one ``DiskFullError``
  naming the path that failed and what was kept. Yields a report whose
  ``ckpt`` (a CheckpointManager, once there is one) gets to finish its
  pending writes first, so no background thread fails during shutdown; the
  checkpoint that could not be written is removed (it frees space; one whose
  folder Orbax creates later is removed when the next launch starts) and its
  logged tracebacks are dropped."""
  report = types.SimpleNamespace(ckpt=None)
  quiet = _QuietFullDisk()
  loggers = [logging.getLogger(name) for name in ('absl', 'asyncio')]
  for logger in loggers:
    logger.addFilter(quiet)
  full = False
  restore_hooks = _quiet_hooks()
  try:
    yield report
  except Exception as e:  # pylint: disable=broad-except
    cause = _full_disk_cause(e)
    if cause is None:
      raise
    full = quiet.reported = True
    for finish in ('wait_until_finished', 'close'):   # no Orbax thread outlives the run
      try:
        if report.ckpt is not None:
          getattr(report.ckpt, finish)()
      except Exception:  # pylint: disable=broad-except  (the same full disk)
        pass
    from gmix_jax import preemption  # pylint: disable=g-import-not-at-top
    preemption.discard_partial_checkpoints(workdir)
    path = getattr(cause, 'filename', None) or workdir
    where = path if path == workdir else f'{path} ({workdir})'
    raise DiskFullError(
        errno.ENOSPC, f'no space left on the device of {where}. Kept: '
        f'{kept_after_failure(workdir)}. Free space (or raise the quota) and rerun the same '
        'command to resume from there.') from None
  finally:
    if not full:              # after a full disk, Orbax's threads may still log it at exit
      for logger in loggers:
        logger.removeFilter(quiet)
      restore_hooks()
