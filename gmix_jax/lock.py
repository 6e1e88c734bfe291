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
    self.path = os.path.join(workdir, LOCK_NAME)
    self.enabled = enabled
    self._fd = None

  def acquire(self) -> None:
    if not self.enabled:
      return
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)   # never truncates
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      record = _read_record(fd)
      os.close(fd)
      raise WorkdirLockedError(
          f'workdir {os.path.dirname(self.path)!r} is in use by another run: {describe(record)} '
          f'(lock {self.path}). Nothing was written. Wait for it to end, stop it, or use '
          'another --workdir.') from None
    except OSError as e:
      if e.errno not in _UNSUPPORTED:
        os.close(fd)
        raise
      warnings.warn(f'the file system of {self.path} does not support flock ({e.strerror}): '
                    'running without the workdir lock, so a second launch on this workdir '
                    'would not be refused', stacklevel=2)
    stale = _read_record(fd)
    if stale:
      print(f'note: the lock file {self.path} names {describe(stale)}, which did not release '
            'it (killed, or running on another host of a file system without shared locks, '
            'e.g. GCS FUSE: then stop one of them)', file=sys.stderr)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder_record()).encode(), 0)
    self._fd = fd

  def release(self) -> None:
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      os.ftruncate(fd, 0)               # a clean end leaves no holder record
    finally:
      os.close(fd)                      # releases the lock

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
    lock.acquire()
  except WorkdirLockedError as e:
    error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    refused = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if refused and error is None:
      error = WorkdirLockedError(f'workdir {workdir!r} is in use by another run (process 0 of '
                                 'this job could not lock it; its message names the holder)')
  if error is not None:
    raise error
  try:
    yield lock
  finally:
    lock.release()
