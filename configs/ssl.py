"""MoCo v2 pretraining presets: cifar10, cifar100, stl10, imagenet2012. GPU/TPU.

  python -m gmix_jax.main --config=configs/ssl.py:cifar10 --workdir=workdirs/ssl_cifar10 \\
      --config.dataset.data_dir=/path/to/tensorflow_datasets
  python -m gmix_jax.main --config=configs/ssl.py:imagenet2012,moco_mixup --workdir=...

The part after ``:`` is ``DATASET[,METHOD]``, METHOD one of configs/common.py
``SSL_METHODS`` (default moco). Recipes:

  imagenet2012  ResNet-50, 224 px, batch 256, SGD lr 0.03 momentum 0.9, weight
                decay 1e-4, cosine, 200 epochs, K = 65536, m = 0.999, τ = 0.2,
                MLP 2048 → 128 (MoCo v2, Chen et al. 2020, Table 1 / official
                code ``main_moco.py --mlp --moco-t 0.2 --aug-plus --cos``).
  cifar10/100   ResNet-18 (CIFAR stem), 32 px, batch 256, lr 0.03, weight decay
                5e-4, cosine, 800 epochs, K = 4096, head 512 → 128. These are
                the values common to public CIFAR MoCo v2 reproductions (e.g.
                the MoCo authors' CIFAR-10 demo: K = 4096, weight decay 5e-4);
                no single published CIFAR recipe of the MoCo v2 paper exists,
                so they cannot be confirmed against one source.
  stl10         ResNet-18, 96 px, otherwise as CIFAR. Pretrains on tfds ``stl10``'s
                ``unlabelled`` + ``train`` (100,000 + 5,000 images, the SSL papers'
                protocol; ``dataset.train_split='unlabelled+train'``); the kNN
                monitor's memory bank is the labelled ``train``, its queries ``test``.
"""
from configs import common

PRESETS = ('cifar10', 'cifar100', 'stl10', 'imagenet2012')


def get_config(arg: str = 'cifar10'):
  dataset, _, method = arg.partition(',')
  if dataset not in PRESETS:
    raise ValueError(f'configs/ssl.py:DATASET[,METHOD]: DATASET must be one of {list(PRESETS)}, '
                     f'got {dataset!r}')
  c = common.ssl(method or 'moco')
  c.dataset.data_dir = '~/tensorflow_datasets'
  c.batch_size = 256
  c.optimizer.learning_rate = 0.03
  c.optimizer.momentum = 0.9
  c.optimizer.schedule = 'cosine'
  c.eval_batch_size = 1000
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  if dataset == 'imagenet2012':
    common.imagenet_data(c)
    c.dataset.augment = 'moco'             # imagenet_data sets 'inception'; MoCo v2's views
    c.model.name = 'resnet50'
    c.optimizer.weight_decay = 1e-4
    c.num_epochs = 200
    c.task.queue_size = 65536
    c.task.proj_hidden = 2048
    if method == 'samix_ssl':            # stage 2 (0-based) as OpenMixup's MoCoSAMix: its last block
      c.task.feature_layer = 'stage3_block6'
  else:
    c.dataset.name = 'tfds:stl10' if dataset == 'stl10' else dataset
    c.dataset.image_size = 96 if dataset == 'stl10' else 32
    if dataset == 'stl10':
      c.dataset.train_split = 'unlabelled+train'
    c.dataset.workers = 4
    c.model.name = 'resnet18'
    c.optimizer.weight_decay = 5e-4
    c.num_epochs = 800
    c.task.queue_size = 4096
    c.task.proj_hidden = 512
  c.task.proj_dim = 128
  return c
