"""CIFAR-10, PreActResNet-18, Mixup (Zhang et al. 2018), α = 1. GPU/TPU.

  python -m gmix_jax.main --config=configs/cifar10_mixup.py --workdir=workdirs/cifar10_mixup \\
      --config.dataset.data_dir=/path/to/tensorflow_datasets

Expected: the mixup paper reports 4.24 % test error for PreActResNet-18 on CIFAR-10 (official README); not yet measured with this library.
Other models: --config.model.name=resnet18 | wrn28 (--config.model.kwargs.width=10).
"""
from configs import common


def get_config():
  return common.cifar('mixup')
