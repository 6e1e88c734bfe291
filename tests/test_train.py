"""End-to-end: train_and_evaluate for every method, resume, config errors."""
import json
import os

import pytest

from configs import common
from gmix_jax import train

METHODS = ['erm', 'mixup', 'sam', 'gmix', 'bgmix', 'dgmix']


def tiny_config(method, dataset, data_dir):
  c = common.base()
  c.dataset.name = dataset
  c.dataset.data_dir = str(data_dir)
  if dataset == 'digits':
    c.dataset.examples_per_class = 4          # 40 examples -> 2 steps of 20
    c.batch_size = 20
    c.model.name = 'mlp'
    c.model.kwargs = {'hidden_sizes': (16,)}
  else:                                        # mock cifar10: 12 examples -> 2 steps of 6
    c.batch_size = 6
    c.model.name = 'cnn'
    c.model.kwargs = {'width': 4}
    c.dataset.augment = True
  c.method = common.method(method)
  c.num_epochs = 1
  c.num_devices = 2
  c.eval_batch_size = 64
  c.log_every_steps = 1
  c.progress = False
  return c


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.mark.parametrize('method', METHODS)
def test_two_steps_on_digits(method, tmp_path):
  summary = train.train_and_evaluate(tiny_config(method, 'digits', tmp_path / 'data'), str(tmp_path / 'wd'))
  records = read_metrics(tmp_path / 'wd')
  train_steps = [r['step'] for r in records if r['split'] == 'train']
  assert train_steps == [1, 2]
  assert all(r['loss'] == r['loss'] and r['loss'] > 0 for r in records)   # finite
  assert 0.0 <= summary['final_test_accuracy'] <= 1.0 and summary['steps'] == 2
  assert os.path.exists(tmp_path / 'wd' / 'summary.json')
  if method in ('bgmix', 'dgmix'):
    assert 'sensitivity' in records[0]


@pytest.mark.parametrize('method', METHODS)
def test_two_steps_on_mock_cifar10(method, tmp_path, mock_tfds):
  summary = train.train_and_evaluate(tiny_config(method, 'cifar10', tmp_path / 'data'), str(tmp_path / 'wd'))
  assert summary['steps'] == 2 and summary['num_test'] == 12


def test_pmap_and_stale_estimator_run(tmp_path):
  c = tiny_config('bgmix', 'digits', tmp_path / 'data')
  c.parallel = 'pmap'
  c.method.sensitivity.estimator = 'stale'
  summary = train.train_and_evaluate(c, str(tmp_path / 'wd'))
  assert summary['parallel'] == 'pmap' and summary['steps'] == 2


def test_resume_continues_at_the_right_step_and_matches_uninterrupted(tmp_path):
  def config(epochs):
    c = tiny_config('gmix', 'digits', tmp_path / 'data')
    c.optimizer.schedule = 'constant'          # the LR must not depend on num_epochs here
    c.num_epochs = epochs
    return c
  straight = train.train_and_evaluate(config(2), str(tmp_path / 'straight'))
  train.train_and_evaluate(config(1), str(tmp_path / 'resumed'))
  resumed = train.train_and_evaluate(config(2), str(tmp_path / 'resumed'))
  steps = [r['step'] for r in read_metrics(tmp_path / 'resumed') if r['split'] == 'train']
  assert steps == [1, 2, 3, 4], 'the second launch starts at step 3'
  assert resumed['final_test_loss'] == straight['final_test_loss']
  assert resumed['final_test_accuracy'] == straight['final_test_accuracy']


def test_incompatible_checkpoint_is_never_overwritten(tmp_path):
  train.train_and_evaluate(tiny_config('erm', 'digits', tmp_path / 'data'), str(tmp_path / 'wd'))
  before = sorted(os.listdir(tmp_path / 'wd' / 'checkpoints'))
  with pytest.raises(ValueError, match='different config .*method'):
    train.train_and_evaluate(tiny_config('sam', 'digits', tmp_path / 'data'), str(tmp_path / 'wd'))
  assert sorted(os.listdir(tmp_path / 'wd' / 'checkpoints')) == before


@pytest.mark.parametrize('field,value,message', [
    ('method.name', 'gmixx', 'method.name must be one of'),
    ('model.name', 'resnet7', 'model.name must be one of'),
    ('dataset.name', 'imagenet', 'dataset.name must be one of'),
    ('parallel', 'xmap', 'parallel must be one of'),
    ('batch_size', 7, 'must be divisible by the number of devices'),
    ('method.partition.gamma', 1.5, r'partition.gamma must be in \[0, 1\]'),
    ('method.sharpness.rho', -0.1, 'sharpness.rho must be >= 0'),
])
def test_bad_config_fails_before_any_work(field, value, message, tmp_path):
  c = tiny_config('bgmix', 'digits', tmp_path / 'data')
  *path, last = field.split('.')
  node = c
  for p in path:
    node = node[p]
  node[last] = value
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(c, str(tmp_path / 'wd'))
  assert not os.path.exists(tmp_path / 'data'), 'no data was prepared'
