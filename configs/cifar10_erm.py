"""CIFAR-10, PreActResNet-18, ERM (no mixing, no sharpness rule). GPU/TPU.

  python -m gmix_jax.main --config=configs/cifar10_erm.py --workdir=workdirs/cifar10_erm \\
      --config.dataset.data_dir=/path/to/tensorflow_datasets

Expected: the mixup paper reports 5.53 % test error for PreActResNet-18 ERM on CIFAR-10 (official README); not yet measured with this library.
Other models: --config.model.name=resnet18 | wrn28 (--config.model.kwargs.width=10).
"""
from configs import common


def get_config():
  return common.cifar('erm')
