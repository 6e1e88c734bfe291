"""Faults a user meets outside the training math: a deleted lock file, a
read-only workdir, a full disk, signals at awkward moments, concurrent first
use of an offline dataset, a mistyped model kwarg. Each ends in one line (or
is survived), never in a raw traceback or a second writer."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from gmix_jax import lock
from test_integrity import try_lock_in_child
from test_reliability import CONFIG, finalized_steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, 'PYTHONPATH': REPO}


def main_cmd(workdir, data_dir, *extra, config=CONFIG):
  return [sys.executable, '-m', 'gmix_jax.main', f'--config={config}', f'--workdir={workdir}',
          f'--config.dataset.data_dir={data_dir}', *extra]


def wait_until(condition, what, proc=None, timeout=300):
  """Polls ``condition`` (a bound on a hang, not a timing assertion)."""
  deadline = time.time() + timeout
  while not condition():
    if proc is not None and proc.poll() is not None:
      pytest.fail(f'the process ended (rc {proc.returncode}) before {what}:\n'
                  f'{proc.stdout.read()[-3000:] if proc.stdout else ""}')
    if time.time() > deadline:
      if proc is not None:
        proc.kill()
      pytest.fail(f'timed out waiting for {what}')
    time.sleep(0.01)


def delivered(pid, sig):
  """True once no ``sig`` is pending for the process (Linux /proc): a second
  identical signal sent before that would merge with the first in the kernel."""
  bit = 1 << (sig - 1)
  try:
    with open(f'/proc/{pid}/status') as f:
      fields = dict(line.split(':', 1) for line in f if ':' in line)
  except FileNotFoundError:
    return True
  return not int(fields['ShdPnd'], 16) & bit and not int(fields['SigPnd'], 16) & bit


def send(proc, sig):
  proc.send_signal(sig)
  wait_until(lambda: delivered(proc.pid, sig), f'delivery of {sig!r}')


# -- The workdir lock cannot be bypassed by deleting .lock -----------------------------
@pytest.mark.slow
def test_deleting_the_lock_file_does_not_free_the_workdir(tmp_path):
  with lock.WorkdirLock(str(tmp_path)):
    os.unlink(tmp_path / '.lock')
    out = try_lock_in_child(tmp_path)
    assert out.returncode != 0, 'a second launch locked a fresh .lock beside the running one'
    assert f"workdir '{tmp_path}' is in use by another run" in out.stderr, out.stderr
  again = try_lock_in_child(tmp_path)       # released with the run: free again
  assert again.returncode == 0 and 'locked' in again.stdout, again.stderr


@pytest.mark.slow
def test_a_replaced_lock_file_does_not_free_the_workdir(tmp_path):
  with lock.WorkdirLock(str(tmp_path)):
    os.rename(tmp_path / '.lock', tmp_path / 'old-lock')
    (tmp_path / '.lock').write_text('')
    assert try_lock_in_child(tmp_path).returncode != 0


# -- A workdir that cannot be written: one line, exit 2 ------------------------------
def run_main_in_process(argv, capsys):
  from gmix_jax import main
  handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
  try:
    rc = main.main(argv)
  finally:
    for sig, handler in handlers.items():
      signal.signal(sig, handler)
  out = capsys.readouterr()
  return rc, out.out, out.err


@pytest.fixture
def read_only(monkeypatch):
  """Makes the folders passed to it read-only for this process, the way a
  read-only mount does (EROFS on creating or opening for writing), also for
  root, which permission bits do not stop."""
  roots = []
  real_open, real_makedirs = os.open, os.makedirs

  def inside(path):
    path = os.path.abspath(os.fspath(path))
    return any(path == r or path.startswith(r + os.sep) for r in roots)

  def ro_open(path, flags, *args, **kwargs):
    if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
    return real_open(path, flags, *args, **kwargs)

  def ro_makedirs(path, *args, **kwargs):
    if inside(path) and not os.path.isdir(path):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
    return real_makedirs(path, *args, **kwargs)

  monkeypatch.setattr(os, 'open', ro_open)
  monkeypatch.setattr(os, 'makedirs', ro_makedirs)
  return lambda path: roots.append(os.path.abspath(os.fspath(path)))


@pytest.mark.parametrize('kind', ['new', 'partial', 'finished'])
def test_a_read_only_workdir_is_one_error_line(kind, tmp_path, read_only, capsys):
  ro = tmp_path / 'ro'
  ro.mkdir()
  wd = ro / 'wd'
  if kind != 'new':
    (wd / 'checkpoints' / '3').mkdir(parents=True)
    (wd / 'config.json').write_text('{}')
    (wd / '.lock').write_text('')
    if kind == 'finished':
      (wd / 'summary.json').write_text('{}')
  before = sorted(str(p) for p in ro.rglob('*'))
  read_only(ro)
  rc, out, err = run_main_in_process(main_cmd(wd, tmp_path / 'data')[3:], capsys)
  assert rc == 2, (out, err)
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"error: workdir '{wd}' is not writable "
                                                 '(Read-only file system)'), err
  assert 'Traceback' not in err and sorted(str(p) for p in ro.rglob('*')) == before


@pytest.mark.slow
def test_a_real_read_only_mount_is_one_error_line(tmp_path):
  """The same on a read-only tmpfs, where the machine allows mounting (root
  with CAP_SYS_ADMIN, as on CI); skipped elsewhere."""
  ro = tmp_path / 'ro'
  ro.mkdir()
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', str(ro)],
                    capture_output=True).returncode:
    pytest.skip('cannot mount a tmpfs here')
  try:
    (ro / 'wd').mkdir()
    (ro / 'wd' / 'summary.json').write_text('{}')
    assert subprocess.run(['mount', '-o', 'remount,ro', str(ro)]).returncode == 0
    for wd in (ro / 'wd', ro / 'new'):
      out = subprocess.run(main_cmd(wd, tmp_path / 'data'), cwd=REPO, env=ENV,
                           capture_output=True, text=True, timeout=300)
      assert out.returncode == 2 and out.stderr.strip().splitlines() == [
          f"error: workdir '{wd}' is not writable (Read-only file system): a run writes its lock, "
          'records and checkpoints there. Nothing was written. Use a writable --workdir (a '
          "finished run's results can be read where they are: summary.json, metrics.jsonl)."], \
          out.stderr
  finally:
    subprocess.run(['umount', str(ro)])


# -- Signals ----------------------------------------------------------------------
BLOCKED_IN_C = '''
import ctypes, fcntl, os, signal, sys, threading, time
from gmix_jax.preemption import Preemption
threading.Thread(target=time.sleep, args=(600,), daemon=True).start()   # takes the signals
with Preemption() as p:
  # The main thread stays in C (as in an XLA compile): Python's handler cannot run.
  signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
  fd = os.open(sys.argv[1], os.O_RDWR)
  print('ready', flush=True)
  ctypes.CDLL(None).flock(fd, fcntl.LOCK_EX)       # until the test releases it
  signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
  print('survived', p.requested, flush=True)
'''


@pytest.mark.slow
def test_two_ctrl_c_while_the_main_thread_is_in_c_code_abort(tmp_path):
  """Python runs its handler once for two signals that came while the main
  thread was busy in C; the second Ctrl-C must abort all the same."""
  gate = tmp_path / 'gate'
  gate.write_text('')
  with open(gate) as held:
    fcntl.flock(held, fcntl.LOCK_EX)
    proc = subprocess.Popen([sys.executable, '-c', BLOCKED_IN_C, str(gate)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == 'ready'
    send(proc, signal.SIGINT)
    send(proc, signal.SIGINT)
    try:
      proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
      pass                                           # not aborted: let it finish to show why
    fcntl.flock(held, fcntl.LOCK_UN)
    out, err = proc.communicate(timeout=60)
  assert proc.returncode == 130, (out, err)
  assert 'survived' not in out and err.strip().splitlines()[-1] == (
      'aborted (second Ctrl-C)'), err


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_in_one_line_keeping_the_last_checkpoint(tmp_path):
  """Two Ctrl-C in a row while a run checkpoints every step. If the first one's
  stop ends the run before the second arrives (a loaded machine), try again:
  the abort itself is what is tested."""
  from gmix_jax import train
  for attempt in range(3):
    wd = tmp_path / f'wd{attempt}'
    proc = subprocess.Popen(main_cmd(wd, tmp_path / 'data', '--config.num_epochs=1000',
                                     '--config.checkpoint_every_steps=1',
                                     '--config.model.kwargs.hidden_sizes=(512, 512)'),
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_until(lambda: len(finalized_steps(wd)) >= 2, 'two checkpoints', proc)
    send(proc, signal.SIGINT)
    send(proc, signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    if 'preempted at step' not in out:
      break
  assert proc.returncode == 130, err[-3000:]
  lines = err.strip().splitlines()
  assert lines[-1].startswith('aborted (second Ctrl-C). Kept: checkpoint step '), err[-3000:]
  assert 'Traceback' not in err and 'cannot schedule new futures' not in err, err[-3000:]
  assert [l for l in lines if l.strip()][-2:-1] == [
      'interrupted: stopping after this step with a checkpoint (Ctrl-C again to abort '
      'without one)'], err[-3000:]
  left = os.listdir(wd / 'checkpoints')
  assert not [n for n in left if 'tmp' in n], left
  step, state = train.restore_state(str(wd))        # verifies against its digest
  assert step == int(state['step']) == finalized_steps(wd)[-1]
  assert f'checkpoint step {step} in {wd}/checkpoints' in lines[-1]


def start_paused(tmp_path, wd):
  hook = tmp_path / 'paused'
  proc = subprocess.Popen(main_cmd(wd, tmp_path / 'data'), cwd=REPO,
                          env={**ENV, 'GMIX_START_HOOK': str(hook)}, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  wait_until(hook.exists, 'start-up', proc)
  return proc, hook


@pytest.mark.parametrize('sig,rc', [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_a_signal_during_start_up_stops_before_anything_is_written(sig, rc, tmp_path):
  wd = tmp_path / 'wd'
  proc, hook = start_paused(tmp_path, wd)
  send(proc, sig)
  hook.unlink()
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == rc, err[-3000:]
  assert err.strip().splitlines() == [
      f'stopped by {sig.name} before the run started; nothing was written'], err[-3000:]
  assert not wd.exists()


def test_two_ctrl_c_during_start_up_abort_at_once(tmp_path):
  wd = tmp_path / 'wd'
  proc, hook = start_paused(tmp_path, wd)
  send(proc, signal.SIGINT)
  send(proc, signal.SIGINT)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 130 and hook.exists(), err[-3000:]
  assert err.strip().splitlines() == [
      'aborted (second Ctrl-C) during start-up; nothing was written'], err
  assert not wd.exists()


# -- A mistyped model kwarg: one line naming the field and the type -----------------
@pytest.mark.parametrize('config,override,message', [
    ('configs/digits.py', 'hidden_sizes=abc',
     "error: --config.model.kwargs.hidden_sizes=abc: expected a tuple like the config file's "
     '(256, 256)'),
    ('configs/mnist_subset.py', 'width=abc',
     "error: --config.model.kwargs.width=abc: expected an int like the config file's 32"),
    ('configs/mnist_subset.py', 'width=1.5',
     "error: --config.model.kwargs.width=1.5: expected an int like the config file's 32"),
    # Keys the config file does not set: checked against the model's own fields.
    ('configs/mnist_subset.py', 'bn_momentum=fast',
     "error: model.kwargs.bn_momentum='fast': expected a number (model.name='cnn')"),
    ('configs/digits.py', 'norm=3 --config.model.name=cnn',
     "error: model.kwargs.norm=3: expected a string (model.name='cnn')"),
])
def test_a_mistyped_model_kwarg_is_one_error_line(config, override, message, tmp_path, capsys):
  wd = tmp_path / 'wd'
  rc, out, err = run_main_in_process(
      [f'--config={config}', f'--workdir={wd}', f'--config.dataset.data_dir={tmp_path}',
       *f'--config.model.kwargs.{override}'.split()], capsys)
  assert rc == 2 and err.strip().splitlines() == [message], err
  assert not wd.exists()


def test_model_kwargs_of_the_right_type_pass():
  from configs import digits
  from gmix_jax import configure
  c = digits.get_config()
  c.model.kwargs = {'hidden_sizes': [32, 16]}
  configure.check_model_kwargs(c)
  c.model.name, c.model.kwargs = 'cnn', {'width': 8, 'norm': 'batch', 'bn_momentum': 1}
  configure.check_model_kwargs(c)


# -- Concurrent first use of an offline dataset -----------------------------------------
PREPARE = '''
import os, sys, time
from gmix_jax.data import builders, jpeg_sources, sources   # imported before the start
name, data_dir, ready, go = sys.argv[1:]
open(ready, 'w').close()
while not os.path.exists(go):
  time.sleep(0.001)
train, test = sources.open_splits(name, data_dir)
print(len(train), len(test), flush=True)
'''


@pytest.mark.slow
@pytest.mark.parametrize('name', ['digits', 'mnist_jpeg'])
def test_concurrent_first_use_of_an_offline_dataset(name, tmp_path):
  """Four launches of a sweep prepare the same empty data_dir at once: each
  gets the same dataset, none fails (one builds, the others wait and read)."""
  data, n = tmp_path / 'data', 4
  go = tmp_path / 'go'
  procs = [subprocess.Popen([sys.executable, '-c', PREPARE, name, str(data),
                             str(tmp_path / f'ready{i}'), str(go)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(n)]
  wait_until(lambda: all((tmp_path / f'ready{i}').exists() for i in range(n)), 'the imports')
  go.write_text('')                       # all start preparing together
  results = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, results):
    assert p.returncode == 0 and 'Traceback' not in err, err[-3000:]
  assert len({out for out, _ in results}) == 1, results
  leftovers = [str(p) for p in data.rglob('*') if 'incomplete' in p.name or 'tmp' in p.name]
  assert not leftovers, leftovers


# -- A full disk: the one line, and only it ------------------------------------------
@contextlib.contextmanager
def tiny_tmpfs(path, size='4m'):
  path.mkdir()
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                    capture_output=True).returncode:
    pytest.skip('cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN, as on CI)')
  try:
    yield path
  finally:
    subprocess.run(['umount', '-l', str(path)])


def fill(folder):
  """Writes ``folder/filler`` until the device is full."""
  with open(folder / 'filler', 'wb', buffering=0) as f:
    with contextlib.suppress(OSError):
      while True:
        f.write(b'\0' * 65536)
    with contextlib.suppress(OSError):
      while True:
        f.write(b'\0')


@pytest.mark.slow
def test_a_full_disk_during_checkpoints_is_one_line_and_keeps_the_last_one(tmp_path):
  from gmix_jax import train
  data = tmp_path / 'data'
  with tiny_tmpfs(tmp_path / 'disk') as disk:
    wd = disk / 'wd'
    proc = subprocess.Popen(main_cmd(wd, data, '--config.num_epochs=1000',
                                     '--config.checkpoint_every_steps=1'),
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_until(lambda: len(finalized_steps(wd)) >= 2, 'two checkpoints', proc)
    fill(disk)
    out, err = proc.communicate(timeout=300)
    lines = [l for l in err.strip().splitlines()
             if not l.startswith('preparing the offline dataset')]
    assert proc.returncode == 1 and len(lines) == 1, err[:3000]
    assert lines[0].startswith('error: [Errno 28] no space left on the device of ')
    assert f'Kept: checkpoint step {finalized_steps(wd)[-1]} in {wd}/checkpoints' in lines[0]
    os.unlink(disk / 'filler')
    step, _ = train.restore_state(str(wd))           # the kept checkpoint verifies
    assert step == finalized_steps(wd)[-1]


def test_full_disk_log_records_are_dropped_and_others_kept(tmp_path, capsys):
  import logging
  from gmix_jax import workdir as workdir_lib
  absl = logging.getLogger('absl')
  seen = []
  handler = logging.Handler()
  handler.emit = seen.append
  absl.addHandler(handler)
  hooks, asyncio_log = (sys.excepthook, sys.unraisablehook), logging.getLogger('asyncio')
  filters = list(absl.filters), list(asyncio_log.filters)
  try:
    full = ValueError("RESOURCE_EXHAUSTED: Failed writing: No space left on device [os_error_code='28']")
    with pytest.raises(workdir_lib.DiskFullError):
      with workdir_lib.disk_full_report(str(tmp_path)):
        try:
          raise RuntimeError('background save failed') from full
        except RuntimeError:
          absl.exception('Save Finalize thread failed.')   # as Orbax logs it
        absl.error('an unrelated error')
        # TensorStore's callbacks of the failed save, printed through sys.excepthook.
        sys.excepthook(RuntimeError, RuntimeError('Event loop is closed'), None)
        sys.excepthook(KeyError, KeyError('unrelated'), None)
        raise OSError(errno.ENOSPC, 'No space left on device', str(tmp_path / 'metrics.jsonl'))
  finally:                 # a full disk leaves them installed: the process is ending
    absl.removeHandler(handler)
    sys.excepthook, sys.unraisablehook = hooks
    absl.filters[:], asyncio_log.filters[:] = filters
  assert [r.getMessage() for r in seen] == ['an unrelated error']
  err = capsys.readouterr().err
  assert 'unrelated' in err and 'Event loop is closed' not in err, err
