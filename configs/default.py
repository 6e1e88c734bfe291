"""Default: Binary G-Mix, small CNN, mnist_subset (offline), 2-core CPU.

  python -m gmix_jax.main --config=configs/default.py --workdir=workdirs/default

Trains BG-Mix (mixup × SAM × binary split by per-example sharpness
sensitivity, METHODS.md § 4, reconstructed from the G-Mix abstract) on the
4000-image training split of `mnist_subset` for 10 epochs and evaluates on its
1000 test images. Expected: 93.2 % test accuracy (ECE 0.067) after about
100 s of training on a 2-core CPU (measured; the README gives the details).
"""
from configs import common


def get_config():
  c = common.base()
  c.dataset.name = 'mnist_subset'
  c.model.name = 'cnn'
  c.model.kwargs = {'width': 32, 'norm': 'none'}
  c.method = common.method('bgmix')
  # On a CPU, one example at a time (lax.map) is the fastest way to take
  # per-example gradients of a conv net: 187 ms/step vs 389 (whole batch
  # vmapped) and 419 (chunks of 32); see README, "Cost per step".
  c.method.sensitivity.chunk = 1
  c.batch_size = 128
  c.num_epochs = 10
  c.optimizer.learning_rate = 0.1
  return c
