"""ImageNet (ILSVRC-2012), ResNet-50, any method: the standard 90-epoch SGD recipe, bfloat16.

  python -m gmix_jax.main --config=configs/imagenet.py:sam --workdir=workdirs/imagenet_sam \\
      --config.dataset.data_dir=/path/to/tensorflow_datasets

The part after ``:`` is a method preset (gmix_jax.objectives.PRESETS): erm, mixup,
cutmix, multimix, mixupe, mixupe_v1, manifold_mixup, sam, asam, gsam, esam, gmix,
manifold_gmix, bgmix, dgmix. (SAMix needs a model with a registered feature layer;
ResNet-50 has none yet.)

Recipe (Goyal et al. 2017, "Accurate, Large Minibatch SGD"; the Flax ImageNet
example's): 90 epochs, global batch 1024, SGD with Nesterov momentum 0.9,
learning rate 0.1 x B/256 = 0.4, 5 linear warmup epochs then cosine decay,
weight decay 1e-4 on every parameter (the trainer has no mask yet, so the
"no decay on BN and biases" variant of He et al. 2019 cannot be expressed),
each block's last BatchNorm scale initialised to 0, Inception-style random
crop to 224 px + flip (``dataset.augment='inception'``, served by the streaming
data path), bfloat16 compute with float32 parameters, optimizer state, losses
and SAM arithmetic (``model.dtype``; see gmix_jax/precision.py and docs/scaling.md,
"Mixed precision and large models"). Mixing presets use α = 0.2, the mixup
paper's ImageNet value. Micro-batching, when a device cannot hold its share of
the batch: ``--config.accumulation_steps=K`` (same update, less memory).

Expected results, for orientation only — published figures, not measured with
this library (no ImageNet run has been made):
  erm   76.3-76.7 % top-1, ResNet-50, 90 epochs (Flax examples/imagenet README)
  sam, mixup: the SAM (Foret et al. 2021) and mixup (Zhang et al. 2018) papers report
        ResNet-50 ImageNet gains over this baseline; their tables are the reference
        (not quoted here: not re-checked against the papers in this repository)
"""
from configs import common


MIXING_ALPHA = 0.2   # mixup on ImageNet (Zhang et al. 2018)
MIXING_PRESETS = ('mixup', 'gmix', 'bgmix', 'dgmix', 'multimix')


def get_config(method: str = 'sam'):
  c = common.base()
  common.imagenet_data(c)
  c.model.name = 'resnet50'
  c.model.dtype = 'bfloat16'
  c.model.kwargs.zero_init_residual = True
  c.method = common.method(method)
  if method in MIXING_PRESETS:
    c.method.mixing.alpha = MIXING_ALPHA
  if method in ('bgmix', 'dgmix'):
    c.method.sensitivity.chunk = 16        # 1024 / 8 devices = 128 rows per device
  c.batch_size = 1024
  c.num_epochs = 90
  c.optimizer.name = 'sgd'
  c.optimizer.learning_rate = 0.1 * c.batch_size / 256
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 1e-4
  c.optimizer.schedule = 'cosine'
  c.optimizer.warmup_epochs = 5.0
  c.eval_batch_size = 1000
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  return c
