"""CIFAR-10, PreActResNet-18, Binary G-Mix (reconstructed from the abstract; METHODS.md § 4). GPU/TPU.

  python -m gmix_jax.main --config=configs/cifar10_bgmix.py --workdir=workdirs/cifar10_bgmix \\
      --config.dataset.data_dir=/path/to/tensorflow_datasets

Expected: the G-Mix abstract claims BG-Mix beats G-Mix; reconstruction, not yet measured.
Other models: --config.model.name=resnet18 | wrn28 (--config.model.kwargs.width=10).
"""
from configs import common


def get_config():
  return common.cifar('bgmix')
