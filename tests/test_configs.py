"""Every config file builds, for every method, and passes validation."""
import importlib

import pytest

from gmix_jax import configure, objectives

PARAMETRISED = ['cifar10', 'mnist_subset', 'digits', 'mnist_jpeg']


@pytest.mark.parametrize('name', PARAMETRISED)
@pytest.mark.parametrize('method', sorted(objectives.PRESETS))
def test_config_validates_for_every_method(name, method):
  config = importlib.import_module(f'configs.{name}').get_config(method)
  assert config.method.name == method
  configure.validate_config(config)
  configure.build_method(config, num_classes=10)


def test_default_is_bgmix_on_mnist_subset():
  config = importlib.import_module('configs.default').get_config()
  configure.validate_config(config)
  assert (config.method.name, config.dataset.name, config.model.name) == ('bgmix', 'mnist_subset', 'cnn')
