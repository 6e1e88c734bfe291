"""Default: Binary G-Mix, small CNN, mnist_subset (offline), 2-core CPU.

  python -m gmix_jax.main --config=configs/default.py --workdir=workdirs/default

Trains BG-Mix (mixup × SAM × binary split by per-example sharpness
sensitivity, METHODS.md § 4, reconstructed from the G-Mix abstract) on the
4000-image training split of `mnist_subset` for 10 epochs and evaluates on its
1000 test images. Expected: about 96-97 % test accuracy in a few minutes on a
2-core CPU (the README records the measured figure and wall time).
"""
from configs import common


def get_config():
  c = common.base()
  c.dataset.name = 'mnist_subset'
  c.model.name = 'cnn'
  c.model.kwargs = {'width': 32, 'norm': 'none'}
  c.method = common.method('bgmix')
  c.method.sensitivity.chunk = 32
  c.batch_size = 128
  c.num_epochs = 10
  c.optimizer.learning_rate = 0.1
  return c
