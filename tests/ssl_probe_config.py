"""A tiny linear probe on digits (tests/test_linear_probe.py); give
``--config.task.pretrained=`` a finished tiny moco run (tests/test_moco.py's
``tiny_config``)."""
from configs import common


def get_config():
  c = common.base()
  c.task = common.task('linear_probe')
  c.method = common.method('erm')
  c.dataset.name = 'digits'
  c.dataset.examples_per_class = 4         # 40 examples -> 5 steps of 8
  c.model.name = 'cnn'
  c.model.kwargs = {'width': 4, 'norm': 'batch'}
  c.batch_size = 8
  c.num_epochs = 1
  c.num_devices = 2
  c.optimizer.learning_rate = 0.5
  c.optimizer.weight_decay = 0.0
  c.eval_batch_size = 64
  c.log_every_steps = 1
  c.progress = False
  c.plots = False
  return c
