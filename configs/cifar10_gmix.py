"""CIFAR-10, PreActResNet-18, G-Mix = SAM on the mixup loss (Li & Tang). GPU/TPU.

  python -m gmix_jax.main --config=configs/cifar10_gmix.py --workdir=workdirs/cifar10_gmix \\
      --config.dataset.data_dir=/path/to/tensorflow_datasets

Expected: the G-Mix abstract claims it beats Mixup and SAM; no figure is available to us and none is measured yet.
Other models: --config.model.name=resnet18 | wrn28 (--config.model.kwargs.width=10).
"""
from configs import common


def get_config():
  return common.cifar('gmix')
