"""A workdir nobody can corrupt (issue #12): data validated before compiling,
checksummed checkpoints with fallback, the workdir lock, refused config
drift, clean ends (signals, full disk, strict-JSON summary).

Unit tests compare each check with an independent computation (a Python loop
over examples, a hand-made file); the end-to-end tests run the trainer, and
the CLI in a subprocess where the behaviour is the CLI's, on the tiny config
of tests/reliability_config.py.
"""
import errno
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest

from gmix_jax import checkpoints
from gmix_jax import outputs
from gmix_jax import train
from gmix_jax import workdir as workdir_lib
from gmix_jax.data import npz_source
from gmix_jax.data import validate
from test_reliability import CONFIG, assert_same_state, comparable, finalized_steps, run_config
from test_reliability import wait_for
from test_train import read_metrics, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- Data validation ------------------------------------------------------------
def test_nonfinite_rows_match_a_loop_over_examples(monkeypatch):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(50, 3, 4)).astype(np.float32)
  x[7, 1, 2], x[7, 0, 0], x[31, 2, 3], x[49, 0, 1] = np.nan, np.inf, -np.inf, np.nan
  monkeypatch.setattr(validate, '_CHUNK_BYTES', 3 * x[:1].nbytes)   # several chunks
  count, rows = validate.nonfinite_rows(x)
  loop = [i for i in range(len(x)) if not all(np.isfinite(v) for v in x[i].ravel())]
  assert count == 4 and rows.tolist() == loop == [7, 31, 49]
  assert validate.nonfinite_rows(np.zeros((3, 2), np.uint8))[0] == 0


def test_check_record_names_the_record():
  validate.check_record('d', 'train', 3, {'x': np.ones(2, np.float32), 'y': np.int64(1)}, 2)
  with pytest.raises(ValueError, match=r"'d': train record 3: label 2 outside \[0, 2\)"):
    validate.check_record('d', 'train', 3, {'image': np.ones(2), 'label': 2}, 2)
  with pytest.raises(ValueError, match=r"'d': test record 8: 1 non-finite feature"):
    validate.check_record('d', 'test', 8, (np.array([1.0, np.nan]), 0), 2)


def write_npz(path, case):
  rng = np.random.default_rng(0)
  a = {'x_train': rng.normal(size=(40, 6)).astype(np.float32), 'y_train': np.arange(40) % 3,
       'x_test': rng.normal(size=(9, 6)).astype(np.float32), 'y_test': np.arange(9) % 3}
  if case == 'nan_train':
    a['x_train'][[4, 17], 2] = np.nan
  elif case == 'inf_test':
    a['x_test'][5, 0] = np.inf
  elif case == 'label_declared':
    a['num_classes'] = np.int64(3)
    a['y_test'][2] = 3
  elif case == 'empty_test':
    a['x_test'], a['y_test'] = a['x_test'][:0], a['y_test'][:0]
  elif case == 'gap':                      # one stray label adds 6 empty classes
    a['y_train'][0] = 9
  elif case == 'npy':
    np.save(path, a['x_train'])
    os.replace(f'{path}.npy', path)
    return f'npz:{path}'
  elif case == 'pickled':
    a['y_test'] = np.array([None] * 9, dtype=object)
  np.savez(path, **a)
  return f'npz:{path}'


BAD_DATA = [
    ('nan_train', r'x_train holds 2 non-finite value\(s\) \(NaN or Inf\) in 2 example\(s\); '
                  r'first example indices: \[4, 17\]'),
    ('inf_test', r'x_test holds 1 non-finite .* indices: \[5\]'),
    ('label_declared', r'y_test has 1 label\(s\) outside \[0, 3\) \(num_classes=3\); '
                       r'first indices: \[2\], values: \[3\]'),
    ('empty_test', r'the test split is empty; the evaluation after each epoch needs'),
    ('npy', r'not an .npz file \(a single .npy array\)'),
    ('pickled', r"array 'y_test' holds Python objects \(pickled\)"),
]


@pytest.mark.parametrize('case,message', BAD_DATA)
def test_read_npz_refuses_bad_data(case, message, tmp_path):
  name = write_npz(tmp_path / 'd.npz', case)
  with pytest.raises(ValueError, match=message):
    npz_source.read_npz(name[4:])


def test_a_class_without_training_examples_is_warned(tmp_path):
  name = write_npz(tmp_path / 'd.npz', 'gap')
  with pytest.warns(UserWarning, match=r'6 of 10 classes have no training example: \[3, 4, 5'):
    *_, num_classes, _ = npz_source.read_npz(name[4:])
  assert num_classes == 10
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    npz_source.read_npz(write_npz(tmp_path / 'ok.npz', 'ok')[4:])


@pytest.mark.parametrize('case,message', BAD_DATA[:4])
def test_bad_data_stops_the_trainer_before_anything_compiles(case, message, tmp_path, monkeypatch):
  def no_jit(*a, **k):
    raise AssertionError('jax.jit called before the data was validated')
  # Every task module imported first: their module-level @jax.jit (gmix_jax.knn)
  # is not compilation, and whether an earlier test imported them depends on the
  # order the tests run in.
  from gmix_jax import tasks
  tasks.names()
  monkeypatch.setattr(jax, 'jit', no_jit)
  c = tiny_config('erm', 'digits', tmp_path / 'data')
  c.dataset.name = write_npz(tmp_path / 'd.npz', case)
  c.dataset.examples_per_class = None
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(c, str(tmp_path / 'wd'))
  written = os.listdir(tmp_path / 'wd') if os.path.exists(tmp_path / 'wd') else []
  assert set(written) <= {'.lock'}, written


# -- Workdir lock -------------------------------------------------------------------
def try_lock_in_child(workdir, hold_and_die=False):
  """A fresh process tries the lock (flock is per open file, so a child is
  a second launch); with ``hold_and_die`` it takes it and SIGKILLs itself."""
  code = ('import os, signal, sys; from gmix_jax import lock\n'
          f'l = lock.WorkdirLock({str(workdir)!r}); l.acquire()\n'
          'print("locked", flush=True)\n'
          + ('os.kill(os.getpid(), signal.SIGKILL)\n' if hold_and_die else ''))
  return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                        env={**os.environ, 'PYTHONPATH': REPO}, timeout=60)


@pytest.mark.slow
def test_the_lock_refuses_a_second_holder_and_dies_with_its_process(tmp_path):
  from gmix_jax import lock
  with lock.WorkdirLock(str(tmp_path)):
    record = json.loads((tmp_path / '.lock').read_text())
    assert record['pid'] == os.getpid() and record['host'] == socket.gethostname()
    out = try_lock_in_child(tmp_path)
    assert out.returncode != 0
    assert (f"in use by another run: host {socket.gethostname()!r}, pid {os.getpid()}, started "
            f"{record['started']}") in out.stderr
  assert (tmp_path / '.lock').read_text() == '', 'a clean end clears the record'
  killed = try_lock_in_child(tmp_path, hold_and_die=True)
  assert killed.returncode == -signal.SIGKILL and 'locked' in killed.stdout
  again = try_lock_in_child(tmp_path)       # SIGKILL left no stale lock, only a note
  assert again.returncode == 0 and 'did not release it' in again.stderr, again.stderr


# -- Config drift ---------------------------------------------------------------------
def test_drift_lists_trajectory_changes_and_lets_the_others_through():
  from gmix_jax import drift
  old = {'seed': 0, 'num_epochs': 2, 'progress': True, 'model': {'name': 'mlp', 'dtype': None},
         'optimizer': {'learning_rate': 0.1}, 'dataset': {'workers': 0, 'name': 'digits'}}
  new = json.loads(json.dumps(old))
  new.update(num_epochs=4, progress=False)
  new['optimizer']['learning_rate'] = 0.5
  new['dataset']['workers'] = 8
  new['model']['dtype'] = 'bfloat16'          # a field the list does not know: trajectory
  with pytest.raises(drift.ConfigDriftError) as e:
    drift.check('/wd', old, new)
  assert ("(changed: model.dtype, num_epochs, optimizer.learning_rate)" in str(e.value))
  assert ('  model.dtype: "(absent)" -> "bfloat16"\n  num_epochs: 2 -> 4\n'
          '  optimizer.learning_rate: 0.1 -> 0.5\nNothing was written') in str(e.value)
  assert 'cannot be extended in place' in str(e.value)
  new = json.loads(json.dumps(old))
  new.update(progress=False, dataset={'workers': 8, 'name': 'digits'}, nan_policy='skip')
  assert drift.check('/wd', old, new, defaults={'nan_policy': 'stop'}) == {
      'dataset.workers': (0, 8), 'nan_policy': ('stop', 'skip'), 'progress': (True, False)}
  # A knob absent from an old config.json is read at its default; None matches absent.
  assert drift.check('/wd', {**old, 'nan_policy': 'stop'}, old, {'nan_policy': 'stop'}) == {}
  assert drift.trajectory_hash(old) == drift.trajectory_hash({**old, 'progress': False})
  assert drift.trajectory_hash(old) != drift.trajectory_hash({**old, 'seed': 1})


# -- Digests ---------------------------------------------------------------------------
def test_digest_names_the_changed_array_and_ignores_the_container_type():
  import hashlib
  from gmix_jax import digest
  tree = {'params': {'w': np.arange(6, dtype=np.float32).reshape(2, 3)},
          'step': np.int32(4), 'opt': (np.zeros(3), np.ones(2, np.int8))}
  saved = digest.record(tree, {'pending': [{'loss': 0.5}]})
  w = tree['params']['w']
  assert saved['arrays']['params/w'] == hashlib.sha256(   # independent: hashlib on the bytes
      b'<f4(2, 3)' + w.tobytes()).hexdigest()
  assert set(saved['arrays']) == {'params/w', 'step', 'opt/0', 'opt/1'}
  assert digest.mismatches(saved, jax.tree.map(np.array, tree), {'pending': [{'loss': 0.5}]}) == []
  flipped = jax.tree.map(np.array, tree)
  flipped['params']['w'].view(np.uint32)[1, 2] ^= 1 << 7      # one bit
  assert digest.mismatches(saved, flipped, {'pending': [{'loss': 0.25}]}) == [
      'array params/w differs', 'loop state differs']
  assert digest.mismatches(saved, {**tree, 'extra': np.zeros(1)}, {'pending': [{'loss': 0.5}]}) \
      == ['array extra unexpected']


# -- End to end: one uninterrupted run, corrupted copies of it ----------------------
# reliability_config with one epoch: 10 steps, checkpoints at 3, 6, 9 and 10 (the
# last 3 kept), a train record every 2 steps, BG-Mix with the stale table.
def launch(workdir, data_dir, *extra, epochs=1):
  return subprocess.Popen(
      [sys.executable, '-m', 'gmix_jax.main', f'--config={CONFIG}', f'--workdir={workdir}',
       f'--config.dataset.data_dir={data_dir}', f'--config.num_epochs={epochs}', *extra],
      cwd=REPO, env={**os.environ, 'PYTHONPATH': REPO}, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)


def tree_hashes(root):
  """``{relative path: sha256}`` of every file under ``root``."""
  import hashlib
  out = {}
  for d, _, files in os.walk(root):
    for name in files:
      path = os.path.join(d, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def strict_load(path):
  def refuse(name):
    raise ValueError(f'{path} is not strict JSON: {name}')
  with open(path) as f:
    return json.load(f, parse_constant=refuse)


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """One uninterrupted 10-step run (in-process); tests work on copies."""
  data = tmp_path_factory.mktemp('data')
  wd = tmp_path_factory.mktemp('straight') / 'wd'
  train.train_and_evaluate(run_config(data, num_epochs=1, plots=False), str(wd))
  assert finalized_steps(wd) == [6, 9, 10]
  return {'data': data, 'wd': wd, 'records': read_metrics(wd),
          'states': {s: train.restore_state(str(wd), s)[1] for s in (6, 9, 10)}}


def copy_run(straight, tmp_path):
  wd = tmp_path / 'wd'
  shutil.copytree(straight['wd'], wd)
  return wd


def data_file(wd, step):
  """The largest array data file of checkpoint ``step`` (process 0's OCDBT data: the
  top-level ``state/d`` file was not read by a restore here, so corrupting it tests nothing)."""
  files = glob.glob(str(wd / 'checkpoints' / str(step) / 'state' / 'ocdbt.process_0' / 'd' / '*'))
  return max(files, key=os.path.getsize)


def corrupt(wd, step, case):
  folder = wd / 'checkpoints' / str(step)
  if case == 'flipped_bit':
    path = data_file(wd, step)
    raw = bytearray(open(path, 'rb').read())
    raw[len(raw) // 2] ^= 1 << 3
    open(path, 'wb').write(raw)
  elif case == 'truncated_file':
    os.truncate(data_file(wd, step), os.path.getsize(data_file(wd, step)) // 2)
  elif case == 'deleted_file':
    os.remove(data_file(wd, step))
  elif case == 'emptied_folder':
    shutil.rmtree(folder)
    os.mkdir(folder)
  elif case == 'missing_digest':
    shutil.rmtree(folder / 'digest')
  elif case == 'missing_orbax_metadata':
    os.remove(folder / 'state' / '_METADATA')


@pytest.mark.parametrize('case,resumed,reason', [
    ('flipped_bit', 9, '(digest|unreadable)'), ('truncated_file', 9, 'unreadable'),
    ('deleted_file', 9, 'unreadable'), ('emptied_folder', 9, 'empty'),
    ('missing_digest', 9, 'no-digest'),
    ('missing_orbax_metadata', 10, None),     # the template supplies it: the data verify
])
def test_a_corrupt_checkpoint_is_set_aside_and_the_previous_one_restored(
    case, resumed, reason, straight, tmp_path, capfd):
  wd = copy_run(straight, tmp_path)
  corrupt(wd, 10, case)
  template = straight['states'][10]
  step, state, loop = checkpoints.restore_verified(str(wd), template)
  assert step == resumed
  assert_same_state(jax.device_get(state), straight['states'][resumed])
  names = set(os.listdir(wd / 'checkpoints'))
  err = capfd.readouterr().err
  if reason is None:
    assert names == {'6', '9', '10'} and 'set aside' not in err
  else:
    aside = names - {'6', '9'}
    assert len(aside) == 1 and re.fullmatch(rf'10\.corrupt-{reason}', aside.pop()), names
    assert f'checkpoint 10 in {wd}/checkpoints: ' in err and 'resuming from checkpoint 9' in err


@pytest.mark.slow
def test_when_no_checkpoint_verifies_nothing_is_touched(straight, tmp_path):
  wd = copy_run(straight, tmp_path)
  for step, case in ((10, 'flipped_bit'), (9, 'truncated_file'), (6, 'missing_digest')):
    corrupt(wd, step, case)
  before = tree_hashes(wd)
  with pytest.raises(checkpoints.CheckpointCorruptError,
                     match=r'(?s)no checkpoint in .* verifies:\n  step 10: it.*\n  step 9: it '
                           r'cannot be read .*\n  step 6: it has no digest item.*Nothing was '
                           'changed'):
    train.train_and_evaluate(run_config(straight['data'], num_epochs=1), str(wd))
  assert tree_hashes(wd) == before


@pytest.mark.slow
def test_bit_flip_resumes_from_the_previous_checkpoint_equal_to_the_uninterrupted_run(
    straight, tmp_path):
  """Through the CLI; a SIGTERM once the summary is written still exits 0."""
  wd = copy_run(straight, tmp_path)
  os.remove(wd / 'summary.json')
  corrupt(wd, 10, 'flipped_bit')
  proc = launch(wd, straight['data'])
  wait_for(proc, lambda: os.path.exists(wd / 'summary.json'), 'the summary')
  proc.send_signal(signal.SIGTERM)              # after the last step: nothing to stop
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-3000:]
  assert 'checkpoint 10 in' in out and 'resuming from checkpoint 9' in out, out[-3000:]
  assert comparable(read_metrics(wd)) == comparable(straight['records'])
  step, state = train.restore_state(str(wd))
  assert step == 10
  assert_same_state(state, straight['states'][10])
  summary = strict_load(wd / 'summary.json')
  launches = [json.loads(l) for l in open(wd / 'launches.jsonl')]
  assert [l['start_step'] for l in launches] == [0, 9]
  assert summary['total_wall_time_sec'] > summary['wall_time_sec'] > 0


@pytest.mark.slow
def test_summary_is_strict_json_with_provenance(straight, tmp_path):
  summary = strict_load(straight['wd'] / 'summary.json')
  assert summary['seed'] == 0 and len(summary['config_hash']) == 64
  assert summary['git_commit'] is None or re.fullmatch(r'[0-9a-f]{40}(\+dirty)?',
                                                       summary['git_commit'])
  assert summary['versions']['jax'] == jax.__version__ and summary['device_kind']
  assert summary['total_wall_time_sec'] == pytest.approx(summary['wall_time_sec'], abs=1.0)
  path = outputs.write_summary(str(tmp_path), {'ece': float('nan'), 'a': [np.float32(np.inf), 1.5]})
  assert strict_load(path) == {'ece': None, 'a': [None, 1.5]}


@pytest.mark.slow
def test_config_drift_is_refused_and_leaves_every_file_as_it_was(straight, tmp_path):
  wd = copy_run(straight, tmp_path)
  before = tree_hashes(wd)
  proc = launch(wd, straight['data'], '--config.optimizer.learning_rate=0.5', epochs=2)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 1, out[-3000:]
  assert ('holds a checkpoint from a different config (changed: num_epochs, '
          'optimizer.learning_rate)') in out
  assert '  num_epochs: 1 -> 2\n  optimizer.learning_rate: 0.05 -> 0.5\n' in out, out[-3000:]
  assert 'cannot be extended in place' in out and 'Traceback' not in out
  assert tree_hashes(wd) == before
  # Fields that leave the trajectory alone may change; recorded, nothing deleted.
  c = run_config(straight['data'], num_epochs=1, log_every_steps=5, keep_checkpoints=1,
                 plots=False)
  train.train_and_evaluate(c, str(wd))
  launches = [json.loads(l) for l in open(wd / 'launches.jsonl')]
  assert launches[-1]['changed'] == {'keep_checkpoints': [3, 1], 'log_every_steps': [2, 5]}
  assert json.loads((wd / 'config.json').read_text())['log_every_steps'] == 5
  after = tree_hashes(wd)
  assert {k: v for k, v in after.items() if k.startswith('checkpoints')} == \
      {k: v for k, v in before.items() if k.startswith('checkpoints')}
  assert after['metrics.jsonl'] == before['metrics.jsonl']


@pytest.mark.slow
def test_a_second_launch_is_refused_and_sigint_checkpoints_resumably(straight, tmp_path):
  wd, data, epochs = tmp_path / 'wd', straight['data'], 1000        # 10000 steps: stopped early
  first = launch(wd, data, epochs=epochs)
  wait_for(first, lambda: os.path.exists(wd / 'metrics.jsonl'), 'the first record')
  second = launch(wd, data, epochs=epochs)
  out2, _ = second.communicate(timeout=120)
  assert second.returncode == 1, out2[-3000:]
  assert (f"error: workdir '{wd}' is in use by another run: host {socket.gethostname()!r}, "
          f'pid {first.pid}, started ') in out2 and 'Traceback' not in out2, out2[-3000:]
  assert first.poll() is None, 'the first run was not disturbed'
  first.send_signal(signal.SIGINT)
  out1, _ = first.communicate(timeout=120)
  assert first.returncode == 130, out1[-3000:]
  stopped = finalized_steps(wd)[-1]
  assert f'preempted at step {stopped}/{epochs * 10} (SIGINT)' in out1, out1[-3000:]
  assert 'rerun the same command' in out1 and not os.path.exists(wd / 'summary.json')
  steps = [r['step'] for r in read_metrics(wd) if r['split'] == 'train']
  assert steps == list(range(2, stopped + 1, 2)), 'one writer: every record once, in order'
  assert len(finalized_steps(wd)) <= 3 and len(open(wd / 'launches.jsonl').readlines()) == 1
  # Resumable: the checkpoint verifies (the resume itself is the SIGTERM path, tested in
  # test_reliability.py) and the lock is free again.
  step, state = train.restore_state(str(wd))
  assert step == int(state['step']) == stopped
  assert (wd / '.lock').read_text() == ''


@pytest.mark.slow
def test_a_full_disk_is_one_error_naming_the_path_and_what_was_kept(straight, tmp_path,
                                                                   monkeypatch):
  wd = copy_run(straight, tmp_path)
  shutil.rmtree(wd / 'checkpoints' / '10')           # the run resumes at 9
  def full(self, record):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
  monkeypatch.setattr(workdir_lib.MetricsWriter, 'write', full)
  with pytest.raises(workdir_lib.DiskFullError) as e:
    train.train_and_evaluate(run_config(straight['data'], num_epochs=1), str(wd))
  assert str(e.value) == (
      f'[Errno 28] no space left on the device of {wd}/metrics.jsonl ({wd}). Kept: checkpoint '
      f'step 9 in {wd}/checkpoints and metrics.jsonl up to step 8. Free space (or raise the '
      'quota) and rerun the same command to resume from there.')
  assert e.value.__cause__ is None and e.value.__suppress_context__
  # Orbax reports it as text inside its own exception.
  wrapped = ValueError('RESOURCE_EXHAUSTED: ... No space left on device [OS error: 28]')
  assert workdir_lib._full_disk_cause(RuntimeError('save failed').with_traceback(None)) is None
  try:
    try:
      raise wrapped
    except ValueError as inner:
      raise RuntimeError('checkpoint save failed') from inner
  except RuntimeError as outer:
    assert workdir_lib._full_disk_cause(outer) is wrapped


def test_sigint_is_a_stop_request_and_a_second_one_aborts():
  import threading
  from gmix_jax.preemption import Preemption
  before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  aborted = threading.Event()
  with Preemption(on_abort=aborted.set) as p:
    os.kill(os.getpid(), signal.SIGINT)
    assert p.requested and p.signal_name == 'SIGINT' and not aborted.is_set()
    os.kill(os.getpid(), signal.SIGTERM)           # still a request, not the default (exit)
    assert p.signal_name == 'SIGINT'
    os.kill(os.getpid(), signal.SIGINT)
    assert aborted.wait(timeout=60), 'the second Ctrl-C did not abort'
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
  assert signal.set_wakeup_fd(-1) == -1, 'the wakeup fd was put back'


@pytest.mark.slow
def test_a_different_device_count_is_drift(tmp_path):
  c = tiny_config('erm', 'digits', tmp_path / 'data')
  workdir_lib.write_config(str(tmp_path), c)
  os.mkdir(tmp_path / 'checkpoints')
  workdir_lib.record_launch(str(tmp_path), c, 0, {}, devices=2, fresh=False)
  assert workdir_lib.check_config(str(tmp_path), c, devices=2) == {}
  with pytest.raises(ValueError, match=r'devices \(num_devices x processes\): 2 -> 4'):
    workdir_lib.check_config(str(tmp_path), c, devices=4)
