"""sklearn's digits (8x8, offline), MLP, any method. CPU, under a minute.

  python -m gmix_jax.main --config=configs/digits.py:bgmix --workdir=workdirs/digits_bgmix

A limited-data check: 1347 training images, 450 test images (fixed
stratified split). Expected for bgmix: 97.3 % test accuracy (ECE 0.052) after
20 epochs, 5 s of training on a 2-core CPU (measured, one seed). Every method
at 10/30/all per class, 5 seeds, small CNN: experiments/RESULTS.md.

``:samix`` and ``:samix_p`` use the small CNN instead of the MLP (the
mixblock needs a spatial feature map); SAMix^P needs
``--config.method.samix.source_workdir=workdirs/digits_samix`` (a finished
``:samix`` run).
"""
from configs import common


def get_config(method: str = 'bgmix'):
  c = common.base()
  c.dataset.name = 'digits'
  c.model.name = 'mlp'
  c.model.kwargs = {'hidden_sizes': (256, 256)}
  c.method = common.method(method)
  if method in common.SAMIX_METHODS:
    # The mixblock reads a spatial feature map, which an MLP does not have:
    # the small CNN, its first layer's 4x4 map of the 8x8 digits.
    c.model.name = 'cnn'
    c.model.kwargs = {'width': 16, 'norm': 'none'}
    c.method.samix.feature_layer = 'conv0'
  c.batch_size = 64
  c.num_epochs = 20
  c.optimizer.learning_rate = 0.05
  return c
