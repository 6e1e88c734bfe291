"""The small run the reliability tests kill, preempt and resume (tests/test_reliability.py).

  python -m gmix_jax.main --config=tests/reliability_config.py --workdir=/tmp/wd \
      --config.dataset.data_dir=/tmp/data

BG-Mix with the `stale` estimator (a sensitivity table in the state), Mixup
and crop + flip (per record, rng from (seed, record, epoch)) on 200 digits, 10 steps per
epoch, a checkpoint every 3 steps (so most checkpoints are mid-epoch), a
train record every 2 steps (so the checkpoints at odd steps hold an
unlogged step). Fields newer than configs/common.py (`nan_policy`,
`debug_nan_step`) are set here so the command line can override them.
"""
from ml_collections.config_dict import placeholder

from configs import common


def get_config():
  c = common.base()
  c.dataset.name = 'digits'
  c.dataset.examples_per_class = 20        # 200 examples -> 10 steps of 20
  c.dataset.augment = 'cifar'
  c.model.name = 'mlp'
  c.model.kwargs = {'hidden_sizes': (16,)}
  c.method = common.method('bgmix')
  c.method.sensitivity.estimator = 'stale'
  c.optimizer.schedule = 'cosine'
  c.batch_size = 20
  c.num_epochs = 6
  c.num_devices = 2
  c.eval_batch_size = 500
  c.log_every_steps = 2                     # odd checkpoints carry an open metrics window
  c.checkpoint_every_steps = 3
  c.keep_checkpoints = 3
  c.progress = False
  c.nan_policy = 'stop'
  c.debug_nan_step = placeholder(int)
  return c
