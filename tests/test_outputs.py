"""What a run leaves behind: metrics records with the schedule and clocks,
curves.png with its title and panels, absolute paths."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from configs import common
from gmix_jax import configure, outputs, train


def records(sensitivity: bool, sharp: bool = True):
  train_records, test_records = [], []
  for step in (10, 20, 30):
    r = {'split': 'train', 'step': step, 'loss': 1.0 / step, 'learning_rate': 0.1 - step / 1000}
    if sharp:
      r.update(perturbed_loss=1.1 / step, rho=0.05)
    if sensitivity:
      r.update(sensitivity=0.1, sensitive_minus_rest=0.05)
    train_records.append(r)
    test_records.append({'split': 'test', 'step': step, 'loss': 0.5, 'accuracy': 0.8, 'ece': 0.05})
  return train_records, test_records


INFO = {'method': 'bgmix', 'dataset': 'digits', 'model': 'mlp', 'seed': 3,
        'final_test_accuracy': 0.9578, 'final_test_ece': 0.0671}


def test_title_names_the_run_and_its_result():
  assert outputs.curves_title(INFO) == ('bgmix · digits · mlp · seed 3 — test accuracy 95.8 %, '
                                        'ECE 0.067')
  assert outputs.curves_title({'method': 'erm', 'dataset': 'npz:/a/b/mine.npz', 'model': 'mlp'}) == (
      'erm · npz:mine.npz · mlp')


@pytest.mark.parametrize('sensitivity,sharp,panels', [(True, True, 4), (False, True, 3),
                                                     (False, False, 3)])
def test_figure_panels_are_labelled(sensitivity, sharp, panels):
  import matplotlib.pyplot as plt
  fig = outputs.curves_figure(*records(sensitivity, sharp), INFO)
  axes = [a for a in fig.axes if a.get_title()]          # the twin ρ axis has no title
  assert [a.get_title() for a in axes] == ['loss', 'test accuracy and calibration', 'schedule',
                                           'per-example sensitivity'][:panels]
  assert all(a.get_xlabel() == 'step' and a.get_ylabel() for a in axes)
  assert fig._suptitle.get_text() == outputs.curves_title(INFO)
  labels = [l for a in fig.axes for l in a.get_legend_handles_labels()[1]]
  assert 'test ECE' in labels and 'test accuracy' in labels and 'learning rate' in labels
  assert ('train loss at w + ε' in labels) == sharp and ('ρ (SAM radius)' in labels) == sharp
  assert ('mean s_i: S⁺ − S⁻' in labels) == sensitivity
  plt.close(fig)


@pytest.mark.slow
def test_a_tiny_run_records_schedule_clocks_and_writes_the_plot(tmp_path):
  c = common.base()
  c.dataset.name, c.dataset.data_dir, c.dataset.examples_per_class = 'digits', str(tmp_path / 'd'), 4
  c.model.name, c.model.kwargs = 'mlp', {'hidden_sizes': (8,)}
  c.method = common.method('bgmix')
  c.batch_size, c.num_epochs, c.num_devices, c.log_every_steps = 20, 2, 1, 1
  c.progress = False
  workdir = tmp_path / 'wd'
  summary = train.train_and_evaluate(c, str(workdir))
  with open(workdir / 'metrics.jsonl') as f:
    recs = [json.loads(line) for line in f]
  train_recs = [r for r in recs if r['split'] == 'train']
  schedule = configure.build_lr_schedule(c, steps_per_epoch=2)
  np.testing.assert_allclose([r['learning_rate'] for r in train_recs],
                             [float(schedule(r['step'] - 1)) for r in train_recs], rtol=1e-6)
  assert all(r['rho'] == 0.05 for r in train_recs)       # the sam preset's default ρ
  assert {'sensitivity', 'sensitive_minus_rest'} <= set(train_recs[0])
  assert train_recs[0]['examples_per_sec'] is None       # the first window is the compiling step
  stamps = [r['timestamp'] for r in recs]
  assert stamps == sorted(stamps) and all(r['wall_time_sec'] >= 0 for r in recs)
  for key in ('metrics', 'curves'):
    assert os.path.isabs(summary[key]) and os.path.exists(summary[key])
  title = Image.open(summary['curves']).info['Title']
  assert title == outputs.curves_title({**summary, 'seed': 0})
  assert title.startswith('bgmix · digits · mlp · seed 0 — test accuracy ')
