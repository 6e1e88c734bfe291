"""One run per workdir: an exclusive OS lock on ``<workdir>/.lock``.

Two launches on one workdir interleave their ``metrics.jsonl`` records and
each deletes the other's checkpoints (``keep_checkpoints``). The first
launch takes ``flock(LOCK_EX | LOCK_NB)`` on ``<workdir>/.lock`` and holds it
until it ends; the kernel releases it when the process dies in any way
(SIGKILL, OOM, a lost host), so a lock is never stale. The holder writes its
host, pid and start time into the file; a second launch is refused at once
(no waiting) with a message naming them, and writes nothing.

Multi-host: process 0 alone takes the lock (the processes of one job are one
run; two processes of the same job on different hosts locking the same file
would refuse each other on NFS) and broadcasts the outcome, so every process
of a refused job stops at the same point. What the lock guarantees depends on
the file system holding the workdir:

* local disk: exclusive between all processes of the machine.
* NFS: the Linux client turns ``flock`` into a whole-file POSIX lock held by
  the server, so it excludes launches on every client (NFSv4: in the protocol;
  NFSv3: needs the lock daemon, ``lockd``; a ``nolock`` mount makes it local
  only). POSIX-lock semantics apply: any ``close`` of the file by the holding
  process releases the lock, which is why this module opens the file once and
  nothing else in the run opens it.
* GCS FUSE (and other FUSE mounts without lock support): the kernel grants
  ``flock`` locally only, so it excludes launches on the same VM but not on
  another one. There the job scheduler must run one job per workdir; as a
  best-effort hint, a launch that finds the record of a holder that did not
  release the lock (killed, or alive on another host) says so on stderr.
* A file system that refuses ``flock`` (``ENOLCK``/``EOPNOTSUPP``): the run
  goes on without the lock, with a warning.

The workdir folder itself is locked too (``flock`` on its open fd, held with
the file's): deleting ``.lock`` while a run trains must not let a second
launch lock a fresh ``.lock`` beside it, and a folder in use cannot be
replaced. On NFS that folder lock is local to the client (the file's lock
still spans clients). A workdir that cannot be created or written (read-only
file system, no permission) is ``WorkdirNotWritableError``, one line.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
import warnings

import numpy as np

LOCK_NAME = '.lock'
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class WorkdirLockedError(RuntimeError):
  """Another run holds the workdir's lock."""


def holder_record() -> dict:
  """What the holder writes into the lock file."""
  return {'host': socket.gethostname(), 'pid': os.getpid(),
          'started': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'argv': sys.argv}


def _read_record(fd: int) -> dict | None:
  os.lseek(fd, 0, os.SEEK_SET)
  raw = os.read(fd, 1 << 16)
  try:
    return json.loads(raw) if raw.strip() else None
  except ValueError:
    return None


def describe(record: dict | None) -> str:
  if not record:
    return 'an unknown process (the lock file holds no record)'
  return (f"host {record.get('host')!r}, pid {record.get('pid')}, started "
          f"{record.get('started')}")


class WorkdirNotWritableError(OSError):
  """The workdir cannot be created or written (read-only, no permission)."""

  def __str__(self) -> str:
    return self.strerror


_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def not_writable(workdir: str, e: OSError) -> OSError:
  """``WorkdirNotWritableError`` for a read-only / forbidden workdir, else ``e``."""
  if e.errno not in _NOT_WRITABLE:
    return e
  return WorkdirNotWritableError(
      e.errno, f'workdir {workdir!r} is not writable ({e.strerror}): a run writes its lock, '
      'records and checkpoints there. Nothing was written. Use a writable --workdir (a finished '
      "run's results can be read where they are: summary.json, metrics.jsonl).")


def make_workdir(workdir: str) -> None:
  """Creates ``workdir`` (and its parents) if needed.

  Raises:
    WorkdirNotWritableError: it cannot be created (read-only file system, no
      permission).
  """
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise not_writable(workdir, e) from None


def refused(workdir: str, record: dict | None, path: str) -> WorkdirLockedError:
  return WorkdirLockedError(
      f'workdir {workdir!r} is in use by another run: {describe(record)} '
      f'(lock {path}). Nothing was written. Wait for it to end, stop it, or use '
      'another --workdir.')


def _lock_directory(workdir: str, path: str) -> int | None:
  """``flock`` on the workdir folder itself: an open folder cannot be swapped
  for another one the way a deleted ``.lock`` file can (a launch after ``rm
  .lock`` would lock a new file while the run holding the old one goes on).
  Returns the folder's fd (kept open while the run holds it), or None where
  the file system refuses (the file lock alone then decides).

  Raises:
    WorkdirLockedError: another process holds the folder.
  """
  try:
    fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
  except OSError:
    return None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    try:                                        # the holder's record, if the file is still there
      with open(path, 'rb') as f:
        record = json.loads(f.read()) if os.path.getsize(path) else None
    except (OSError, ValueError):
      record = None
    raise refused(workdir, record, path) from None
  except OSError:
    os.close(fd)
    return None
  return fd


class WorkdirLock:
  """``with WorkdirLock(workdir):`` the body runs holding the workdir's lock.

  ``enabled=False`` (the processes other than 0) makes it a no-op. On exit
  the record is cleared and the lock released; the (empty) file stays, since
  removing a lock file lets a third launch lock a new file while a second
  still holds the old one.

  Raises:
    WorkdirLockedError: the lock is held, naming the holder.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_NAME)
    self.enabled = enabled
    self._fd = None
    self._dir_fd = None

  def acquire(self) -> None:
    if not self.enabled:
      return
    self._dir_fd = _lock_directory(self.workdir, self.path)
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)   # never truncates
    except OSError as e:
      self._release_directory()
      raise not_writable(self.workdir, e) from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:             # another host (NFS), or a folder lock unsupported
      record = _read_record(fd)
      os.close(fd)
      self._release_directory()
      raise refused(self.workdir, record, self.path) from None
    except OSError as e:
      if e.errno not in _UNSUPPORTED:
        os.close(fd)
        self._release_directory()
        raise
      warnings.warn(f'the file system of {self.path} does not support flock ({e.strerror}): '
                    'running without the workdir lock, so a second launch on this workdir '
                    'would not be refused', stacklevel=2)
    stale = _read_record(fd)
    if stale:
      print(f'note: the lock file {self.path} names {describe(stale)}, which did not release '
            'it (killed, or running on another host of a file system without shared locks, '
            'e.g. GCS FUSE: then stop one of them)', file=sys.stderr)
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, json.dumps(holder_record()).encode(), 0)
    except OSError as e:
      os.close(fd)
      self._release_directory()
      raise not_writable(self.workdir, e) from None
    self._fd = fd

  def _release_directory(self) -> None:
    if self._dir_fd is not None:
      fd, self._dir_fd = self._dir_fd, None
      os.close(fd)

  def release(self) -> None:
    if self._fd is None:
      self._release_directory()
      return
    fd, self._fd = self._fd, None
    try:
      os.ftruncate(fd, 0)               # a clean end leaves no holder record
    except OSError:
      pass
    finally:
      os.close(fd)                      # releases the lock
      self._release_directory()

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> bool:
    self.release()
    return False


@contextlib.contextmanager
def job_lock(workdir: str):
  """The workdir lock for a whole (possibly multi-process) job: process 0
  takes it and every process learns the outcome, so a refused job stops on
  every host at once, before any of them writes."""
  import jax
  lock = WorkdirLock(workdir, enabled=jax.process_index() == 0)
  error = None
  try:
    make_workdir(workdir)
    lock.acquire()
  except (WorkdirLockedError, WorkdirNotWritableError) as e:
    error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    refused_here = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if refused_here and error is None:
      error = WorkdirLockedError(f'workdir {workdir!r} is in use by another run, or not '
                                 'writable (process 0 of this job could not lock it; its '
                                 'message says which)')
  if error is not None:
    raise error
  try:
    yield lock
  finally:
    lock.release()


@contextlib.contextmanager
def preparing(data_dir: str, name: str):
  """Held while one process prepares dataset ``name`` in ``data_dir``: a
  sweep's first launches start together on an empty ``data_dir``, and tfds's
  builder, run twice at once, fails renaming its ``incomplete.*`` folder onto
  the other's finished one. The first to take it builds; the others
  wait (blocking ``flock`` on ``data_dir/.<name>.prepare.lock``), then find
  it prepared. Where the folder cannot be written or locked, nothing is held
  (preparing there fails, or is not shared, anyway)."""
  try:
    os.makedirs(data_dir, exist_ok=True)
    fd = os.open(os.path.join(data_dir, f".{name.replace(os.sep, '_')}.prepare.lock"),
                 os.O_RDWR | os.O_CREAT, 0o644)
  except OSError:
    yield
    return
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
      pass
    yield
  finally:
    os.close(fd)
