"""Reliability at pod scale (issue #6): exact resume after SIGKILL, SIGTERM
preemption, the non-finite policy, several processes, determinism.

The kill/preempt tests run the CLI in a subprocess on tests/reliability_config.py
(BG-Mix with the stale table, Mixup, crop + flip: every piece of state a resume
must restore) and compare with one uninterrupted in-process run of the same
config: every metrics record (wall-clock fields excepted) and the whole final
state, bitwise. Config validation is tested in test_train.py.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import reliability_config
from gmix_jax import outputs, train
from gmix_jax import workdir as workdir_lib
from test_train import read_metrics, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, 'tests', 'reliability_config.py')
WALL_CLOCK = outputs.WALL_CLOCK_FIELDS   # differ run to run by nature; never compared


def run_config(data_dir, **overrides):
  c = reliability_config.get_config()
  c.dataset.data_dir = str(data_dir)
  c.num_epochs = 3                   # 30 steps
  for k, v in overrides.items():
    c[k] = v
  return c


def comparable(records):
  return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in records]


def assert_same_state(a, b):
  np.testing.assert_equal(jax.tree.structure(a), jax.tree.structure(b))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def finalized_steps(workdir):
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def launch(workdir, data_dir, *extra):
  return subprocess.Popen(
      [sys.executable, '-m', 'gmix_jax.main', f'--config={CONFIG}', f'--workdir={workdir}',
       f'--config.dataset.data_dir={data_dir}', '--config.num_epochs=3', *extra],
      cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(proc, condition, what, timeout=180):
  deadline = time.time() + timeout
  while not condition():
    if proc.poll() is not None:
      pytest.fail(f'the run ended (rc {proc.returncode}) before {what}:\n{proc.stdout.read()[-3000:]}')
    if time.time() > deadline:
      proc.kill()
      pytest.fail(f'timed out waiting for {what}')
    time.sleep(0.01)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  """digits, prepared once for this module (subprocesses only read it)."""
  return tmp_path_factory.mktemp('data')


@pytest.fixture(scope='module')
def reference(data, tmp_path_factory):
  """One uninterrupted run of the config the subprocess tests interrupt."""
  root = tmp_path_factory.mktemp('reference')
  train.train_and_evaluate(run_config(data), str(root / 'straight'))
  return {'data': data, 'records': read_metrics(root / 'straight'),
          'state': train.restore_state(str(root / 'straight'))}


def assert_same_run(workdir, reference):
  assert comparable(read_metrics(workdir)) == comparable(reference['records'])
  step, state = train.restore_state(str(workdir))
  assert step == reference['state'][0] == 30
  assert_same_state(state, reference['state'][1])


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_exact(reference, tmp_path):
  """Killed while two Grain workers read ahead; resumed (in process, no workers)
  from the step alone: the reference ran without workers too."""
  wd = tmp_path / 'killed'
  proc = launch(wd, reference['data'], '--config.dataset.workers=2')
  # A checkpoint past step 3 that is not at an epoch end (10 steps per epoch).
  wait_for(proc, lambda: any(s % 10 for s in finalized_steps(wd)), 'a mid-epoch checkpoint')
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  restored = finalized_steps(wd)[-1]
  assert 3 <= restored < 30, 'killed before the end'
  written = [r['step'] for r in read_metrics(wd)]
  print(f'killed: checkpoint {restored}, records up to step {max(written)}')
  train.train_and_evaluate(run_config(reference['data']), str(wd))
  assert_same_run(wd, reference)


@pytest.mark.slow
def test_sigterm_checkpoints_exits_zero_and_resumes_exactly(reference, tmp_path):
  wd = tmp_path / 'preempted'
  proc = launch(wd, reference['data'], '--config.dataset.workers=2')
  wait_for(proc, lambda: os.path.exists(wd / 'metrics.jsonl'), 'the first step')
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=180)
  assert proc.returncode == 0, out[-3000:]
  assert 'Exception ignored' not in out, out[-3000:]      # the workers were shut down
  stopped = finalized_steps(wd)[-1]
  assert 1 <= stopped < 30
  assert f'preempted at step {stopped}/30' in out and 'rerun the same command' in out, out[-2000:]
  assert not os.path.exists(wd / 'summary.json')
  train.train_and_evaluate(run_config(reference['data']), str(wd))
  assert_same_run(wd, reference)


def test_truncate_metrics_drops_records_after_the_checkpoint(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  lines = [json.dumps({'split': 'train', 'step': s}) for s in (1, 2, 3, 4)]
  path.write_text('\n'.join(lines) + '\n{"split": "tr')          # cut short by a kill
  kept = workdir_lib.truncate_metrics(str(path), 2)
  assert [r['step'] for r in kept] == [1, 2]
  assert path.read_text() == '\n'.join(lines[:2]) + '\n'


# -- Non-finite values ----------------------------------------------------------
def nan_config(data, policy, nan_step):
  c = tiny_config('gmix', 'digits', data)
  c.num_epochs = 2                         # 4 steps
  c.checkpoint_every_steps = 1
  c.keep_checkpoints = 10
  c.nan_policy = policy
  c.debug_nan_step = nan_step              # this step's batch is all NaN
  return c


@pytest.mark.slow
def test_nan_policy_skip_leaves_the_state_unchanged_and_counts(data, tmp_path):
  wd = str(tmp_path / 'wd')
  handler = signal.getsignal(signal.SIGTERM)
  summary = train.train_and_evaluate(nan_config(data, 'skip', 1), wd)
  assert signal.getsignal(signal.SIGTERM) is handler, 'the SIGTERM handler is put back'
  assert summary['nonfinite_skipped'] == 1
  train_records = [r for r in read_metrics(wd) if r['split'] == 'train']
  assert [r['nonfinite_skipped'] for r in train_records] == [0, 1, 1, 1]
  assert np.isnan(train_records[1]['loss']) and np.isfinite(train_records[2]['loss'])
  (_, before), (_, after), (_, last) = (train.restore_state(wd, s) for s in (1, 2, 4))
  assert int(after['step']) == 2 and int(after['skipped']) == 1
  for part in ('params', 'opt_state', 'model_state'):   # the NaN update was not applied
    assert_same_state(after[part], before[part])
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(last['params']))
  assert not all(np.array_equal(x, y) for x, y in
                 zip(jax.tree.leaves(last['params']), jax.tree.leaves(after['params'])))
  assert np.isfinite(summary['final_test_loss'])


@pytest.mark.slow
def test_nan_policy_stop_keeps_the_last_good_checkpoint(data, tmp_path):
  wd = str(tmp_path / 'wd')
  with pytest.raises(FloatingPointError, match=r'non-finite loss or gradient at step 2 .*'
                     r'last good checkpoint \(step 2\)'):
    train.train_and_evaluate(nan_config(data, 'stop', 2), wd)
  assert finalized_steps(wd) == [1, 2], 'no checkpoint of the NaN state'
  _, state = train.restore_state(wd)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state['params']))
  assert [r['step'] for r in read_metrics(wd)] == [1, 2, 2]    # train 1, 2, test 2


# -- Several processes ------------------------------------------------------------
def multiprocess_config(data_dir):
  c = tiny_config('gmix', 'digits', data_dir)    # per-device mixing: device order matters
  c.num_devices = 2                              # per process
  c.num_epochs = 2
  return c


def free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process_with_four_devices(data, tmp_path):
  one = multiprocess_config(data)
  one.num_devices = 4
  train.train_and_evaluate(one, str(tmp_path / 'one'))
  port, wd = free_port(), tmp_path / 'two'
  worker = os.path.join(REPO, 'tests', 'multiprocess_worker.py')
  procs = [subprocess.Popen([sys.executable, worker, str(i), '2', str(port), str(wd), str(data)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=240)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail('multi-process run timed out')
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  with open(wd / 'worker_summary.json') as f:
    assert json.load(f)['devices'] == 4
  (s1, a), (s2, b) = train.restore_state(str(tmp_path / 'one')), train.restore_state(str(wd))
  assert s1 == s2 == 4
  for x, y in zip(jax.tree.leaves(a['params']), jax.tree.leaves(b['params'])):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  losses = lambda w: [r['loss'] for r in read_metrics(w) if r['split'] == 'train']
  np.testing.assert_allclose(losses(tmp_path / 'one'), losses(wd), rtol=1e-5)


# -- Determinism ----------------------------------------------------------------------
@pytest.mark.slow
def test_same_seed_and_config_give_identical_runs(data, tmp_path):
  for name in ('a', 'b'):
    c = tiny_config('gmix', 'digits', data)
    c.num_epochs = 2                # 4 steps: the program of nan_config's runs, compiled once
    train.train_and_evaluate(c, str(tmp_path / name))
  assert comparable(read_metrics(tmp_path / 'a')) == comparable(read_metrics(tmp_path / 'b'))
  assert_same_state(train.restore_state(str(tmp_path / 'a'))[1],
                    train.restore_state(str(tmp_path / 'b'))[1])


@pytest.mark.slow
def test_global_m_sam_does_not_depend_on_the_device_count(data, tmp_path):
  params = {}
  for n in (1, 2, 4):
    c = tiny_config('sam', 'digits', data)
    c.method.sharpness.m = 'global'
    c.num_devices = n
    c.num_epochs = 2
    train.train_and_evaluate(c, str(tmp_path / str(n)))
    params[n] = train.restore_state(str(tmp_path / str(n)))[1]['params']
  for n in (2, 4):
    for x, y in zip(jax.tree.leaves(params[1]), jax.tree.leaves(params[n])):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
