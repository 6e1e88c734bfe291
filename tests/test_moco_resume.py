"""MoCo: SIGKILL mid-epoch with two input workers, then resume, is bitwise
equal to an uninterrupted run (queue, pointer, key encoder and its BatchNorm
statistics included)."""
import os
import signal
import subprocess
import sys

import pytest

import ssl_reliability_config
from gmix_jax import train
from test_reliability import assert_same_state, comparable, finalized_steps, wait_for
from test_train import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, 'tests', 'ssl_reliability_config.py')


def config(data_dir):
  c = ssl_reliability_config.get_config()
  c.dataset.data_dir = str(data_dir)
  return c


@pytest.mark.slow
def test_moco_sigkill_mid_epoch_then_resume_is_exact(tmp_path):
  data = tmp_path / 'data'
  train.train_and_evaluate(config(data), str(tmp_path / 'straight'))
  ref_records = read_metrics(tmp_path / 'straight')
  ref_step, ref_state = train.restore_state(str(tmp_path / 'straight'))
  assert {'queue', 'ptr', 'key'} <= set(ref_state['extra'])

  wd = tmp_path / 'killed'
  proc = subprocess.Popen(
      [sys.executable, '-m', 'gmix_jax.main', f'--config={CONFIG}', f'--workdir={wd}',
       f'--config.dataset.data_dir={data}', '--config.dataset.workers=2'],
      cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  wait_for(proc, lambda: any(s % 10 for s in finalized_steps(wd)), 'a mid-epoch checkpoint',
           timeout=600)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  restored = finalized_steps(wd)[-1]
  if restored >= 30:
    pytest.skip('the run finished before it could be killed (machine too fast for this test)')
  train.train_and_evaluate(config(data), str(wd))
  assert comparable(read_metrics(wd)) == comparable(ref_records)
  step, state = train.restore_state(str(wd))
  assert step == ref_step == 30
  assert_same_state(state, ref_state)
