"""CIFAR-10 (or -100), PreActResNet-18, any method. GPU/TPU.

  python -m gmix_jax.main --config=configs/cifar10.py:gmix --workdir=workdirs/cifar10_gmix \\
      --config.dataset.data_dir=/path/to/tensorflow_datasets

The part after ``:`` is the method (gmix_jax.objectives.PRESETS): erm, mixup,
cutmix, multimix, mixupe, sam, asam, gsam, esam, gmix, bgmix, dgmix.
CIFAR-100: ``--config.dataset.name=cifar100``. Other models:
``--config.model.name=resnet18`` or ``wrn28`` (``--config.model.kwargs.width=10``).

Expected results, for orientation only — papers' figures, not measured with
this library yet (no GPU run has been made):
  erm     5.53 % test error, PreActResNet-18 (mixup paper, official README)
  mixup   4.24 % test error, PreActResNet-18, α = 1 (mixup paper, official README)
  sam     SAM reports 0.5-1 point lower error than SGD on CIFAR-10 ResNets
  gmix, bgmix, dgmix: the G-Mix abstract claims gains over Mixup and SAM but
          gives no figure available to us; BG-/DG-Mix are reconstructions.
"""
from configs import common


def get_config(method: str = 'gmix'):
  return common.cifar(method)
