"""Every config file builds, for every method, and passes validation without a
warning; bad numbers are refused and ignored knobs warned about, before any work."""
import importlib
import math
import os
import warnings

import optax
import pytest

from gmix_jax import configure, main, objectives

PARAMETRISED = ['cifar10', 'mnist_subset', 'digits', 'mnist_jpeg']


@pytest.mark.parametrize('name', PARAMETRISED)
@pytest.mark.parametrize('method', sorted(objectives.PRESETS))
def test_config_validates_for_every_method(name, method):
  config = importlib.import_module(f'configs.{name}').get_config(method)
  assert config.method.name == method
  with warnings.catch_warnings():
    warnings.simplefilter('error')          # a shipped config sets no ignored knob
    configure.validate_config(config)
  configure.build_method(config, num_classes=10)


def test_default_is_bgmix_on_mnist_subset():
  config = importlib.import_module('configs.default').get_config()
  configure.validate_config(config)
  assert (config.method.name, config.dataset.name, config.model.name) == ('bgmix', 'mnist_subset', 'cnn')


def digits(method, **fields):
  config = importlib.import_module('configs.digits').get_config(method)
  for dotted, value in fields.items():
    *path, last = dotted.split('__')
    node = config
    for p in path:
      node = node[p]
    node[last] = value
  return config


@pytest.mark.parametrize('method,field,value,reason', [
    ('erm', 'method__sharpness__rho', 0.1, "method.name='erm' has no sharpness rule"),
    ('mixup', 'method__sharpness__rho', 0.1, "method.name='mixup' has no sharpness rule"),
    ('gmix', 'method__partition__gamma', 0.25, "partition.rule='none'"),
    ('gmix', 'method__sensitivity__chunk', 4, 'does not split the batch'),
    ('sam', 'method__sharpness__asam_eta', 0.1, "sharpness.rule='sam' (read only by asam)"),
    ('gmix', 'method__mixing__k', 3, "mixing.policy='mixup' (read only by multimix)"),
    ('bgmix', 'method__sensitivity__refresh_every', 2, "sensitivity.estimator='shared'"),
    ('bgmix', 'method__partition__rho_plus', 0.1, "partition.rule='binary'"),
    ('gsam', 'method__sharpness__rho_min', 0.01, "sharpness.rho_schedule is 'constant'"),
])
def test_a_knob_the_method_ignores_is_a_warning(method, field, value, reason):
  with pytest.warns(configure.IgnoredKnobWarning) as record:
    configure.validate_config(digits(method, **{field: value}))
  assert len(record) == 1
  message = str(record[0].message)
  assert message.startswith(f"{field.replace('__', '.')}={value!r} has no effect") and reason in message


@pytest.mark.parametrize('method,field,value', [
    ('gmix', 'method__sharpness__rho', 0.1), ('bgmix', 'method__partition__gamma', 0.25),
    ('dgmix', 'method__partition__rho_plus', 0.1), ('multimix', 'method__mixing__k', 3),
    ('gsam', 'method__sharpness__rho_min', 0.01),
])
def test_a_knob_the_method_reads_is_silent(method, field, value):
  config = digits(method, **{field: value})
  if method == 'gsam':
    config.method.sharpness.rho_schedule = 'lr'
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    configure.validate_config(config)


@pytest.mark.parametrize('field,value,message', [
    ('seed', -1, r'seed must be an int >= 0, got -1'),
    ('optimizer__learning_rate', -0.1, r'optimizer.learning_rate must be a finite number >= 0'),
    ('optimizer__learning_rate', math.nan, r'optimizer.learning_rate must be a finite number >= 0, got nan'),
    ('optimizer__learning_rate', math.inf, r'optimizer.learning_rate must be a finite number >= 0, got inf'),
    ('optimizer__momentum', math.nan, r'optimizer.momentum must be a finite number'),
    ('optimizer__weight_decay', -1e-4, r'optimizer.weight_decay must be a finite number >= 0'),
    ('optimizer__warmup_epochs', -1.0, r'optimizer.warmup_epochs must be a finite number >= 0'),
    ('optimizer__grad_clip', 0.0, r'optimizer.grad_clip must be None or a finite number > 0'),
    ('method__sharpness__rho', math.inf, r'method.sharpness.rho must be finite, got inf'),
    ('num_epochs', 0, r'num_epochs must be >= 1'),
])
def test_bad_numbers_are_refused(field, value, message):
  with pytest.raises(ValueError, match=message):
    configure.validate_config(digits('gmix', **{field: value}))


def test_cli_refuses_a_bad_number_before_creating_the_workdir(tmp_path, capsys):
  workdir = tmp_path / 'wd'
  code = main.main(['--config=configs/digits.py:gmix', f'--workdir={workdir}',
                    '--config.optimizer.learning_rate=-0.1'])
  err = capsys.readouterr().err
  assert code == 2 and err.startswith('error: optimizer.learning_rate must be a finite number')
  assert err.count('\n') == 1 and not os.path.exists(workdir)


@pytest.mark.parametrize('total', [1, 2, 3, 10])
def test_cosine_schedule_works_for_any_step_count(total):
  """One step is valid (optax refuses an empty decay); from two steps on, the
  schedule is unchanged: lr at step 0, cosine to 0 at the last step."""
  config = digits('gmix', optimizer__learning_rate=0.1, num_epochs=total)
  schedule = configure.build_lr_schedule(config, steps_per_epoch=1)
  assert math.isclose(float(schedule(0)), 0.1, rel_tol=1e-6)
  if total >= 2:
    reference = optax.warmup_cosine_decay_schedule(0.1, 0.1, 1, total)
    for step in range(total + 1):
      assert math.isclose(float(schedule(step)), float(reference(step)), rel_tol=1e-6, abs_tol=1e-9)
