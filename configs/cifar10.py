"""CIFAR-10 (or -100), PreActResNet-18, any method. GPU/TPU.

  python -m gmix_jax.main --config=configs/cifar10.py:gmix --workdir=workdirs/cifar10_gmix \\
      --config.dataset.data_dir=/path/to/tensorflow_datasets

The part after ``:`` is the method (gmix_jax.objectives.PRESETS): erm, mixup,
cutmix, multimix, mixupe, mixupe_v1, manifold_mixup, sam, asam, gsam, esam,
gmix, manifold_gmix, bgmix, dgmix, and
samix / samix_p (gmix_jax.samix; samix_p needs
``--config.method.samix.source_workdir=`` a finished samix run's workdir).
CIFAR-100: ``--config.dataset.name=cifar100``. Other models:
``--config.model.name=resnet18``, or ``--config.model.name=wrn28
--config.model.kwargs.width=10`` (a model change drops the file's model.kwargs).

Expected results, for orientation only — papers' figures, not measured with
this library yet (no CIFAR training run has been made; step costs on an
H100 are in the README):
  erm     5.53 % test error, PreActResNet-18 (mixup paper, official README)
  mixup   4.24 % test error, PreActResNet-18, α = 1 (mixup paper, official README)
  sam     SAM reports 0.5-1 point lower error than SGD on CIFAR-10 ResNets
  manifold_mixup  Verma et al. 2019 report about 3 % test error, PreActResNet-18,
          α = 2, points {0, 1, 2} (``--config.method.mixing.layers=0,1,2``), on a
          much longer schedule than 200 epochs (paper, from memory)
  gmix, bgmix, dgmix: the G-Mix abstract claims gains over Mixup and SAM but
          gives no figure available to us; BG-/DG-Mix are reconstructions.
  samix   CIFAR-100, ResNet-18, 800 epochs: 82.30 % (vs mixup 79.12 %), OpenMixup
          docs; not a CIFAR-10 figure.
"""
from configs import common


def get_config(method: str = 'gmix'):
  return common.cifar(method)
