"""CIFAR-10, PreActResNet-18, SAM (Foret et al. 2021), ρ = 0.05. GPU/TPU.

  python -m gmix_jax.main --config=configs/cifar10_sam.py --workdir=workdirs/cifar10_sam \\
      --config.dataset.data_dir=/path/to/tensorflow_datasets

Expected: SAM reports roughly a 0.5-1 point error reduction over SGD on CIFAR-10 ResNets (paper); not yet measured with this library.
Other models: --config.model.name=resnet18 | wrn28 (--config.model.kwargs.width=10).
"""
from configs import common


def get_config():
  return common.cifar('sam')
