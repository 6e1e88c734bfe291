"""MoCo v2 pretraining on mnist_jpeg (offline JPEGs), small BN CNN, 32 px. CPU, minutes.

  python -m gmix_jax.main --config=configs/ssl_mnist_jpeg.py:moco --workdir=workdirs/ssl_moco

The part after ``:`` is the SSL method (configs/common.py ``SSL_METHODS``):
moco (MoCo v2), moco_mixup, moco_cutmix (the query view mixed, λ-weighted
InfoNCE), moco_gmix (mixup + SAM on the contrastive loss), samix_ssl (SAMix
on MoCo v2, task ``samix_ssl``: the same backbone, data, head, queue, m and
schedule as moco, plus the mixblock). Labels are not
used for training; the kNN monitor (k = 200, τ = 0.1) reports the backbone's
top-1 on the test split at every evaluation. The 4000 training JPEGs of
``mnist_jpeg`` get the MoCo v2 augmentation at 32 px (crop scale 0.2-1,
colour jitter, grayscale, flip; no blur at this size), two views per record.

Sizes for 2 CPU cores: CNN width 32 with BatchNorm (shuffled BN in the key
encoder), head 512 → 128, a queue of 3840 keys (30 batches: below the 4000
images, MoCo's false-negative caution), m = 0.99 (MoCo's CIFAR demo value
for short runs; 0.999 is the ImageNet value), SGD lr 0.06 (MoCo's CIFAR demo:
0.06 for batch 512, weight decay 5e-4, cosine), 8 epochs of batch 128, the
kNN monitor every 4 epochs. Sized for the table of docs/ssl.md (5 methods x
3 seeds, their probes, the floor and the ceiling: experiments/ssl_table.py)
on a shared 2-core CPU: one epoch of ``moco`` took about 40 s there at load
average 3-5, ``moco_gmix`` (two passes) about 2.5 min and ``samix_ssl``
(mixblock, three encoder passes) about 3 min at load average 10-12
(compilation and one kNN monitor included); at load 9-17 the 8-epoch runs
took 5-8 min (``moco``) to 12 min (``samix_ssl``), a probe 2-6 min, and
every row's seed 0 plus the cheaper rows' seeds 1-2 took 68 min, two runs
at a time; at load 2.5-7.8 an 8-epoch ``moco_gmix`` run took 3 min,
``samix_ssl`` 4.5 min and a probe 1-2.5 min (the load, not the method,
decides most of these times). The published recipes train for hundreds of epochs
(configs/ssl.py); this one is a demo of the code path at toy scale.

Then the linear probe on the frozen backbone (gmix_jax/tasks/linear_probe.py):

  python -m gmix_jax.main --config=configs/ssl_mnist_jpeg.py:linear_probe \
      --workdir=workdirs/ssl_moco_probe --config.task.pretrained=workdirs/ssl_moco

SGD momentum 0.9, no weight decay, cosine, 10 epochs of batch 128, the
Inception crop at 32 px (the supervised mnist_jpeg recipe's augmentation); lr
3.0 (MoCo's protocol uses 30 for batch 256 on ImageNet features; lower here:
a small CNN's features are larger). ``--config.task.pretrained=random``
probes the untrained encoder of the seed (the floor).

``:supervised`` is the ceiling: the same backbone (CNN width 32, BatchNorm)
trained end to end with labels on the same data, crops, batch and epochs as
the probe (ERM, SGD Nesterov momentum 0.9, lr 0.1, weight decay 5e-4,
cosine: configs/mnist_subset.py's optimizer).
"""
from configs import common


def get_config(method: str = 'moco'):
  if method == 'samix_ssl_p':
    return samix_ssl_p()
  if method == 'linear_probe':
    return linear_probe()
  if method == 'supervised':
    return supervised()
  c = common.ssl(method)
  c.dataset.name = 'mnist_jpeg'
  c.dataset.image_size = 32
  c.dataset.workers = 1                   # one decoding process beside the trainer (2 cores)
  c.model.name = 'cnn'
  c.model.kwargs = {'width': 32, 'norm': 'batch'}
  c.task.queue_size = 3840
  c.task.momentum = 0.99
  c.task.proj_hidden = 512
  c.task.proj_dim = 128
  c.batch_size = 128
  c.num_epochs = 8
  c.eval_every_epochs = 4                 # the kNN monitor (train + test features) at 4 and 8
  c.optimizer.learning_rate = 0.06
  c.optimizer.weight_decay = 5e-4
  c.eval_batch_size = 500
  if method == 'samix_ssl':
    # The mixblock reads the momentum encoder at conv1, the CNN's middle
    # stage: 8x8 maps at 32 px, the resolution of OpenMixup's choice
    # (stage 2, 0-based, of a CIFAR ResNet-18: 8x8 at 32 px). conv0 (16x16)
    # is nearly pixels, conv2 (4x4) too coarse for a mask.
    c.task.feature_layer = 'conv1'
  return c


def _labelled():
  """The data, crops, model and length shared by the probe and the ceiling."""
  c = common.base()
  c.method = common.method('erm')
  c.dataset.name = 'mnist_jpeg'
  c.dataset.augment = 'inception'
  c.dataset.image_size = 32
  c.dataset.workers = 1
  c.model.name = 'cnn'                    # the probe: must be the pretraining run's (checked)
  c.model.kwargs = {'width': 32, 'norm': 'batch'}
  c.batch_size = 128
  c.num_epochs = 10
  c.eval_every_epochs = 5
  c.eval_batch_size = 500
  return c


def supervised():
  c = _labelled()
  c.optimizer.learning_rate = 0.1
  c.optimizer.weight_decay = 5e-4
  return c


def linear_probe():
  c = _labelled()
  c.task = common.task('linear_probe')
  c.optimizer.learning_rate = 3.0
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 0.0
  c.eval_batch_size = 500
  return c


def samix_ssl_p():
  """SAMix^P-SSL (task ``samix_ssl_p``): the ``moco`` recipe above, the query
  view mixed by the frozen mixblock of a finished ``:samix_ssl`` run:

    python -m gmix_jax.main --config=configs/ssl_mnist_jpeg.py:samix_ssl_p \
        --workdir=workdirs/ssl_samix_p --config.task.source_workdir=workdirs/ssl_samix

  The source must share the data, model, head and mixblock input (checked)."""
  c = get_config('moco')
  moco_task = c.task
  c.task = common.task('samix_ssl_p')
  for field in ('queue_size', 'momentum', 'proj_hidden', 'proj_dim'):
    c.task[field] = moco_task[field]
  c.task.feature_layer = 'conv1'          # the CNN's middle stage (8x8 maps at 32 px)
  return c
