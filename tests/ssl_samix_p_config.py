"""A tiny SAMix-SSL pretraining on digits (``get_config()``), or with
``get_config('samix_ssl_p')`` its SAMix^P form (tests/test_samix_ssl_p.py):
give ``--config.task.source_workdir=`` a finished tiny ``samix_ssl`` run.

``tiny(task_name, method)`` is the digits setup the SSL tests share
(tests/test_moco.py's ``tiny_config`` starts from it too)."""
from configs import common


def tiny(task_name: str, method: str = 'erm'):
  """40 digits (5 steps of 8) with MoCo's two views, a BatchNorm CNN of width 4,
  2 devices, one epoch, a record every step; the task's own fields at their
  defaults."""
  c = common.base()
  c.task = common.task(task_name)
  c.method = common.method(method)
  c.dataset.name = 'digits'
  c.dataset.examples_per_class = 4         # 40 examples -> 5 steps of 8
  c.dataset.augment = 'moco'
  c.model.name = 'cnn'
  c.model.kwargs = {'width': 4, 'norm': 'batch'}
  c.batch_size = 8
  c.num_epochs = 1
  c.num_devices = 2
  c.eval_batch_size = 64
  c.log_every_steps = 1
  c.progress = False
  c.plots = False
  return c


def get_config(name: str = 'samix_ssl'):
  c = tiny(name)
  c.task.queue_size = 16                   # < 40 - 8
  c.task.proj_hidden = 8
  c.task.proj_dim = 4
  c.task.feature_layer = 'conv0'
  c.task.mixblock_dim = 8
  c.task.knn_k = 5
  return c
