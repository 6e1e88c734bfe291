"""A tiny SAMix-SSL pretraining on digits (``get_config()``), or with
``get_config('samix_ssl_p')`` its SAMix^P form (tests/test_samix_ssl_p.py):
give ``--config.task.source_workdir=`` a finished tiny ``samix_ssl`` run."""
from configs import common


def get_config(name: str = 'samix_ssl'):
  c = common.base()
  c.task = common.task(name)
  c.method = common.method('erm')
  c.dataset.name = 'digits'
  c.dataset.examples_per_class = 4         # 40 examples -> 5 steps of 8
  c.dataset.augment = 'moco'
  c.model.name = 'cnn'
  c.model.kwargs = {'width': 4, 'norm': 'batch'}
  c.task.queue_size = 16                   # < 40 - 8
  c.task.proj_hidden = 8
  c.task.proj_dim = 4
  c.task.feature_layer = 'conv0'
  c.task.mixblock_dim = 8
  c.task.knn_k = 5
  c.batch_size = 8
  c.num_epochs = 1
  c.num_devices = 2
  c.eval_batch_size = 64
  c.log_every_steps = 1
  c.progress = False
  c.plots = False
  return c
