"""Logs a pod can keep: plain progress lines when the output is not a terminal,
and the records' scalars as TensorBoard events (read back here without
TensorFlow)."""
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from configs import common
from gmix_jax import extras, main, progress, tb_events, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_overrides(tmp_path):
  return [f'--config.dataset.data_dir={tmp_path / "data"}', '--config.dataset.examples_per_class=4',
          '--config.model.kwargs.hidden_sizes=(8,)', '--config.batch_size=20',
          '--config.num_epochs=2', '--config.num_devices=1', '--config.log_every_steps=1',
          '--config.plots=False']


@pytest.mark.slow
def test_piped_progress_is_one_plain_line_per_record(tmp_path):
  """progress=True with stdout and stderr piped (a pod's log): no carriage
  return, and one line per metrics.jsonl record, at that record's step."""
  workdir = tmp_path / 'wd'
  result = subprocess.run(
      [sys.executable, '-m', 'gmix_jax.main', '--config=configs/digits.py:gmix',
       f'--workdir={workdir}', '--config.progress=True', *_tiny_overrides(tmp_path)],
      capture_output=True, text=True, cwd=REPO, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert '\r' not in result.stdout + result.stderr
  with open(workdir / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  lines = [l for l in result.stderr.splitlines() if l.startswith('step ')]
  assert [int(re.match(r'step (\d+)/4 ', l).group(1)) for l in lines] == [r['step'] for r in records]
  train_line = lines[0]
  assert f"loss={records[0]['loss']:.3f}" in train_line and 'step/s' in train_line
  test_line = lines[[r['split'] for r in records].index('test')]
  assert 'test_acc=' in test_line and 'ece=' in test_line


def test_a_terminal_gets_the_tqdm_bar():
  from tqdm import tqdm

  class Terminal(io.StringIO):
    def isatty(self):
      return True
  bar = progress.make_bar(10, 1, Terminal())
  assert isinstance(bar, tqdm)
  bar.close()
  assert isinstance(progress.make_bar(10, 1, io.StringIO()), progress.PlainProgress)


@pytest.mark.slow
def test_tensorboard_events_hold_every_scalar_of_metrics_jsonl(tmp_path):
  c = common.base()
  c.dataset.name, c.dataset.data_dir, c.dataset.examples_per_class = 'digits', str(tmp_path / 'd'), 4
  c.model.name, c.model.kwargs = 'mlp', {'hidden_sizes': (8,)}
  c.method = common.method('gmix')
  c.batch_size, c.num_epochs, c.num_devices, c.log_every_steps = 20, 2, 1, 1
  c.progress, c.plots, c.tensorboard = False, False, True
  workdir = tmp_path / 'wd'
  train.train_and_evaluate(c, str(workdir))
  with open(workdir / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  expected = {}
  for r in records:
    for key, value in r.items():
      if key not in ('split', 'step', 'timestamp') and isinstance(value, (int, float)):
        expected.setdefault(f"{r['split']}/{key}", []).append((r['step'], value))
  scalars = tb_events.read_scalars(str(workdir / 'tensorboard'))
  assert {'train/loss', 'train/perturbed_loss', 'test/accuracy', 'test/ece'} <= set(scalars)
  assert set(scalars) == set(expected)
  for tag, points in expected.items():
    assert [s for s, _ in scalars[tag]] == [s for s, _ in points], tag
    np.testing.assert_allclose([v for _, v in scalars[tag]], [v for _, v in points], rtol=1e-6,
                               err_msg=tag)


def test_a_resumed_run_purges_the_events_past_its_checkpoint(tmp_path):
  """What a killed run wrote after its checkpoint (step 2 here) is dropped,
  as from metrics.jsonl; the rerun's values count."""
  first = tb_events.EventWriter(str(tmp_path))
  for step, loss in ((1, 1.5), (2, 1.2), (3, 1.0)):
    first.write({'split': 'train', 'step': step, 'loss': loss, 'examples_per_sec': None})
  first.close()
  resumed = tb_events.EventWriter(str(tmp_path), purge_step=3)
  resumed.write({'split': 'train', 'step': 3, 'loss': 0.9})
  resumed.close()
  scalars = tb_events.read_scalars(str(tmp_path / 'tensorboard'))
  assert list(scalars) == ['train/loss']                 # None is not a scalar
  np.testing.assert_allclose(scalars['train/loss'], [(1, 1.5), (2, 1.2), (3, 0.9)], rtol=1e-6)


@pytest.mark.slow
def test_tensorboard_without_its_extra_is_one_error_line(capsys, tmp_path, monkeypatch):
  monkeypatch.setitem(extras.EXTRAS, 'tensorboard', {'no_such_module_tbx': 'tensorboardX'})
  code = main.main(['--config=configs/digits.py:gmix', f'--workdir={tmp_path / "wd"}',
                    '--config.tensorboard=True'])
  err = capsys.readouterr().err
  assert code == 2 and err.count('\n') == 1
  assert err.startswith("error: --config.tensorboard=True needs the 'tensorboard' extra")
  assert "pip install 'gmix_jax[tensorboard]'" in err and not (tmp_path / 'wd').exists()
