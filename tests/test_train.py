"""End-to-end: train_and_evaluate for every method, resume, config errors."""
import json
import os
import shutil

import numpy as np
import pytest

from configs import common
from gmix_jax import data as data_lib
from gmix_jax import configure, train
from gmix_jax import workdir as workdir_lib

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
    c.dataset.augment = 'cifar'
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


@pytest.mark.slow
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


# On images the data path (mock TFDS, crop + flip, CNN) is the same for every
# method; G-Mix runs Mixup's mixing and SAM's ascent through the CNN, so the
# Mixup and SAM runs would repeat its code paths (both run on digits above).
@pytest.mark.slow
@pytest.mark.parametrize('method', [m for m in METHODS if m not in ('mixup', 'sam')])
def test_two_steps_on_mock_cifar10(method, tmp_path, mock_tfds):
  summary = train.train_and_evaluate(tiny_config(method, 'cifar10', tmp_path / 'data'), str(tmp_path / 'wd'))
  assert summary['steps'] == 2 and summary['num_test'] == 12


@pytest.mark.slow
def test_pmap_and_stale_estimator_run(tmp_path):
  c = tiny_config('bgmix', 'digits', tmp_path / 'data')
  c.parallel = 'pmap'
  c.method.sensitivity.estimator = 'stale'
  summary = train.train_and_evaluate(c, str(tmp_path / 'wd'))
  assert summary['parallel'] == 'pmap' and summary['steps'] == 2


@pytest.mark.slow
@pytest.mark.parametrize('rule', [None, 'looksam', 'fsam', 'shared_prev'])
def test_resume_continues_at_the_right_step_and_matches_uninterrupted(rule, tmp_path):
  """A launch stopped at step 2 and resumed equals the uninterrupted run. With
  LookSAM (g_v), F-SAM (m) and BG-Mix's shared_prev estimator (the previous
  step's ascent direction) the state lives in TrainState.extra: a resume that
  lost it (zeros) would take a different step 2."""
  def config(stop_at=None):
    c = tiny_config('bgmix' if rule == 'shared_prev' else 'gmix', 'digits', tmp_path / 'data')
    c.num_epochs = 2
    if rule == 'shared_prev':
      c.method.sensitivity.estimator = 'shared_prev'
    elif rule is not None:
      c.method.sharpness.rule = rule
    if rule == 'looksam':
      c.method.sharpness.looksam_k = 3        # full at steps 0 and 3; step 2 reuses g_v
    c.debug_nan_step = stop_at                 # a NaN batch at step 2 stops the first launch
    return c
  straight = train.train_and_evaluate(config(), str(tmp_path / 'straight'))
  with pytest.raises(FloatingPointError):
    train.train_and_evaluate(config(stop_at=2), str(tmp_path / 'resumed'))
  resumed = train.train_and_evaluate(config(), str(tmp_path / 'resumed'))
  steps = [r['step'] for r in read_metrics(tmp_path / 'resumed') if r['split'] == 'train']
  assert steps == [1, 2, 3, 4], 'the second launch starts at step 3'
  assert resumed['final_test_loss'] == straight['final_test_loss']
  assert resumed['final_test_accuracy'] == straight['final_test_accuracy']


def test_msam_without_momentum_and_samix_with_a_stateful_rule_fail_early(tmp_path):
  c = tiny_config('gmix', 'digits', tmp_path / 'data')
  c.method.sharpness.rule = 'msam'
  c.optimizer.momentum = 0.0
  with pytest.raises(ValueError, match="msam' perturbs along the optimizer's momentum"):
    configure.validate_config(c)
  c = tiny_config('samix', 'digits', tmp_path / 'data')
  c.method.sharpness.rule = 'looksam'
  with pytest.raises(ValueError, match="rule='looksam' is implemented for the composed .* not "
                                       "for method.name='samix'"):
    configure.validate_config(c)


@pytest.fixture(scope='module')
def erm_run(tmp_path_factory):
  """One finished tiny ERM run on digits; a test copies its workdir before changing it."""
  root = tmp_path_factory.mktemp('erm')
  train.train_and_evaluate(tiny_config('erm', 'digits', root / 'data'), str(root / 'wd'))
  return root


def copy_of(run, tmp_path):
  shutil.copytree(run / 'wd', tmp_path / 'wd')
  return run / 'data'


@pytest.mark.slow
def test_incompatible_checkpoint_is_never_overwritten(erm_run, tmp_path):
  data = copy_of(erm_run, tmp_path)
  before = sorted(os.listdir(tmp_path / 'wd' / 'checkpoints'))
  with pytest.raises(ValueError, match='different config .*method'):
    train.train_and_evaluate(tiny_config('sam', 'digits', data), str(tmp_path / 'wd'))
  assert sorted(os.listdir(tmp_path / 'wd' / 'checkpoints')) == before


@pytest.mark.slow
def test_knob_added_at_its_none_default_still_resumes(erm_run, tmp_path):
  """A workdir written before a knob existed resumes when the knob is None."""
  data = copy_of(erm_run, tmp_path)
  path = tmp_path / 'wd' / 'config.json'
  old = json.loads(path.read_text())
  del old['method']['mixing']['tau']          # as if written before `tau` was added
  path.write_text(json.dumps(old))
  workdir_lib.check_config(str(tmp_path / 'wd'), tiny_config('erm', 'digits', data))
  old['method']['mixing']['tau'] = 2.0        # a real change is still refused
  path.write_text(json.dumps(old))
  with pytest.raises(ValueError, match='different config .*method'):
    workdir_lib.check_config(str(tmp_path / 'wd'), tiny_config('erm', 'digits', data))


@pytest.mark.parametrize('field,value,message', [
    # Unknown names: the message lists the valid ones.
    ('method.name', 'gmixx', r"method.name must be one of \[.*'bgmix'.*'gmix'"),
    ('model.name', 'resnet7', r"model.name must be one of \[.*'cnn'.*'resnet18'"),
    ('dataset.name', 'imagenet', r"dataset.name must be one of \[.*'cifar10'.*'digits'"),
    ('parallel', 'xmap', r"parallel must be one of \['shard_map', 'pmap'\]"),
    ('dataset.augment', 'flip', r"dataset.augment must be one of \['none', 'cifar', 'inception', 'moco'\]"),
    ('dataset.augment', 'inception', r"dataset.augment='inception' needs dataset.image_size"),
    ('dataset.workers', -1, 'dataset.workers must be an int >= 0, got -1'),
    ('dataset.image_size', 0, 'dataset.image_size must be None or an int >= 1, got 0'),
    ('nan_policy', 'ignore', r"nan_policy must be one of \['stop', 'skip'\]"),
    ('method.mixing.policy', 'mixdown', r"mixing.policy must be one of \[.*'mixup'"),
    # Out-of-range knobs.
    ('method.sharpness.rho', -0.1, 'sharpness.rho must be >= 0'),
    ('method.partition.gamma', 1.5, r'partition.gamma must be in \[0, 1\]'),
    ('method.partition.gamma', -0.1, r'partition.gamma must be in \[0, 1\]'),
    ('method.mixing.alpha', 0.0, 'mixing.alpha must be > 0'),
    ('method.mixing.k', 0, 'mixing.k must be >= 1'),
    ('method.sharpness.looksam_k', 0, 'sharpness.looksam_k must be an int >= 1, got 0'),
    ('method.sharpness.looksam_alpha', -0.5, 'sharpness.looksam_alpha must be >= 0'),
    ('method.sharpness.fsam_lambda', 1.0, r'sharpness.fsam_lambda must be in \[0, 1\)'),
    ('method.sharpness.fsam_sigma', -1.0, 'sharpness.fsam_sigma must be >= 0'),
    ('checkpoint_every_steps', 0, 'checkpoint_every_steps must be >= 1'),
    ('debug_nan_step', -1, 'debug_nan_step must be None or a step >= 0'),
    # Sizes: the per-device batch is 20 / 2 devices = 10.
    ('batch_size', 7, r'batch_size=7 must be divisible by the number of devices \(2\)'),
    ('method.sensitivity.chunk', 3, 'sensitivity.chunk=3 must divide the per-device batch 10'),
    ('num_devices', 64, r'num_devices must be None \(all\) or an int in \[1, 8\]'),
    ('model.kwargs', {'depth': 3}, r"model.kwargs \{'depth': 3\} do not fit model.name='mlp'"),
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


def write_npz(path, case):
  rng = np.random.default_rng(0)
  arrays = {'x_train': rng.normal(size=(40, 6)).astype(np.float32), 'y_train': np.arange(40) % 3,
            'x_test': rng.normal(size=(9, 6)).astype(np.float32), 'y_test': np.arange(9) % 3}
  if case == 'missing':
    del arrays['y_test']
  elif case == 'rows':
    arrays['y_train'] = arrays['y_train'][:39]
  elif case == 'negative_label':
    arrays['y_train'][5] = -1
  np.savez(path, **arrays)
  return f'npz:{path}'


@pytest.mark.parametrize('case,method,model,message', [
    ('missing', 'erm', 'mlp', r'missing key\(s\) y_test'),
    ('rows', 'erm', 'mlp', 'x_train has 40 rows but y_train has 39'),
    ('negative_label', 'erm', 'mlp', 'y_train has negative label -1'),
    ('vectors', 'erm', 'cnn', r"model.name='cnn' takes images \[H, W\] or \[H, W, C\], but "
                              r"dataset .* has examples of shape \(6,\)"),
    ('vectors', 'cutmix', 'mlp', r"mixing.policy='cutmix' needs images"),
])
def test_bad_data_fails_before_compiling(case, method, model, message, tmp_path):
  c = tiny_config(method, 'digits', tmp_path / 'data')
  c.dataset.name = write_npz(tmp_path / 'd.npz', case)
  c.dataset.examples_per_class = None
  c.model.name = model
  c.model.kwargs = {'width': 4} if model == 'cnn' else {'hidden_sizes': (16,)}
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(c, str(tmp_path / 'wd'))
  assert not os.path.exists(tmp_path / 'wd' / 'checkpoints'), 'no state was built'


def test_labels_outside_the_classes_fail_before_compiling(tmp_path, monkeypatch):
  from gmix_jax.data import normalize, sources
  records = sources.ArrayRecords(np.zeros((40, 6), np.float32), (np.arange(40) % 4).astype(np.int32))
  split = lambda name: sources.Split('fake', name, records, 3, None)   # labels 0..3, 3 classes
  bad = data_lib.TrainData(name='fake', train=split('train'), test=split('test'),
                           train_ids=np.arange(40), input_shape=(6,),
                           normalizer=normalize.Normalizer(np.zeros(6), np.ones(6), None),
                           augment='none', image_size=None, workers=0)
  monkeypatch.setattr(train.data_lib, 'open_train_data', lambda *a, **k: bad)
  c = tiny_config('erm', 'digits', tmp_path / 'data')
  c.dataset.examples_per_class = None
  with pytest.raises(ValueError, match=r"'fake': train labels must lie in \[0, 3\) .*got range \[0, 3\]"):
    train.train_and_evaluate(c, str(tmp_path / 'wd'))
  assert not os.path.exists(tmp_path / 'wd' / 'checkpoints'), 'no state was built'
