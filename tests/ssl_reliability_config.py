"""The small MoCo run the SSL resume test kills and resumes (tests/test_moco_resume.py).

  python -m gmix_jax.main --config=tests/ssl_reliability_config.py --workdir=/tmp/wd \
      --config.dataset.data_dir=/tmp/data

MoCo v2 + mixup on 200 digits with the MoCo augmentation (two views per
record), a BatchNorm CNN (the key encoder's running statistics are state
too), a queue of 60 keys (it wraps every 3 steps), 10 steps per epoch, a
checkpoint every 3 steps (most are mid-epoch).
"""
from configs import common


def get_config():
  c = common.base()
  c.dataset.name = 'digits'
  c.dataset.examples_per_class = 20        # 200 examples -> 10 steps of 20
  c.dataset.augment = 'moco'
  c.model.name = 'cnn'
  c.model.kwargs = {'width': 4, 'norm': 'batch'}
  c.method = common.method('mixup')
  c.task = common.task('moco')
  c.task.queue_size = 60
  c.task.proj_hidden = 16
  c.task.proj_dim = 8
  c.batch_size = 20
  c.num_epochs = 3
  c.num_devices = 2
  c.eval_batch_size = 500
  c.log_every_steps = 2
  c.checkpoint_every_steps = 3
  c.keep_checkpoints = 3
  c.progress = False
  c.plots = False
  return c
