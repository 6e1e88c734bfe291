"""Shared defaults for every experiment config (not an experiment itself).

Each field is documented where it is set. Experiment files start from
``base()`` and change what their experiment needs; any field can be changed
on the command line: ``--config.method.partition.gamma=0.25``.
"""
import ml_collections
from ml_collections.config_dict import placeholder


def method(name: str) -> ml_collections.ConfigDict:
  """A method preset (gmix_jax.objectives.PRESETS) and its overridable knobs.

  Knobs left at None keep the preset's / METHODS.md's default.
  """
  # A fresh placeholder per field: a shared FieldReference would tie fields together.
  s, f, i = (lambda: placeholder(str)), (lambda: placeholder(float)), (lambda: placeholder(int))
  return ml_collections.ConfigDict({
      'name': name,
      'mixing': {'policy': s(), 'alpha': f(), 'lam_mode': s(), 'k': i(), 'budget': s(),
                 'eta': f(), 'tau': f(), 'mixupe_version': i(),
                 'layers': s()},          # manifold's mixing points, e.g. '0,1,2'
      'sharpness': {'rule': s(), 'rho': f(), 'asam_eta': f(), 'gsam_alpha': f(), 'esam_beta': f(),
                    'm': s(),              # 'device' | 'global' | a group size such as '32'
                    'rho_schedule': s(),   # 'constant' | 'lr' (GSAM: rho follows the LR)
                    'rho_min': f()},
      'partition': {'rule': s(), 'gamma': f(), 'bgmix_rule': s(), 'mix_subset': s(),
                    'partners': s(), 'rho_plus': f(), 'rho_minus': f()},
      'sensitivity': {'estimator': s(), 'rho': f(), 'chunk': i(), 'refresh_every': i()},
      # SAMix / SAMix^P only (gmix_jax.samix.SAMixConfig documents each knob);
      # the other methods' configs stay as they were, so their workdirs resume.
      **({'samix': samix()} if name in SAMIX_METHODS else {}),
  })


SAMIX_METHODS = ('samix', 'samix_p')


def samix() -> ml_collections.ConfigDict:
  """``method.samix``: None keeps gmix_jax.samix.SAMixConfig's default."""
  s, f, i = (lambda: placeholder(str)), (lambda: placeholder(float)), (lambda: placeholder(int))
  return ml_collections.ConfigDict({
      'source_workdir': s(),   # samix_p: workdir of a finished samix run (same model + dataset)
      'alpha': f(), 'eta': f(), 'mask_weight': f(), 'clean_weight': f(), 'momentum': f(),
      'mixblock_lr': f(), 'mixblock_dim': i(),
      'feature_layer': s(),    # encoder layer feeding the mixblock, e.g. 'conv1', 'stage3_block2'
  })


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = 'mnist_subset'          # see gmix_jax.data.dataset_names()
  c.dataset.data_dir = 'data'              # tfds data dir; offline sets are prepared here
  c.dataset.download = False               # let tfds download (needs internet + TensorFlow)
  c.dataset.examples_per_class = placeholder(int)  # limited-data regime: int, or None for all
  c.dataset.train_fraction = placeholder(float)   # or a fraction of the training set
  c.dataset.augment = 'none'               # 'none' | 'cifar' (pad-4 crop + flip) | 'inception' (host)
  c.dataset.image_size = placeholder(int)  # crop size (needed by 'inception'); None = the stored size
  c.dataset.workers = 0                    # Grain worker processes (0: read in this process)

  c.model = ml_collections.ConfigDict()
  c.model.name = 'cnn'                     # see gmix_jax.models.MODELS
  c.model.kwargs = ml_collections.ConfigDict()   # passed to the model constructor

  c.method = method('gmix')

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'sgd'                 # 'sgd' (momentum, nesterov) | 'adam' | 'adamw'
  c.optimizer.learning_rate = 0.05
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 5e-4          # decoupled: added to the update before the LR
  c.optimizer.schedule = 'cosine'          # 'cosine' | 'constant'
  c.optimizer.warmup_epochs = 0.0
  c.optimizer.grad_clip = placeholder(float)  # global-norm clip, or None

  c.batch_size = 128                       # global batch; divided over all devices
  c.num_epochs = 10
  c.eval_batch_size = 500
  c.accumulation_steps = 1                 # K micro-batches per device batch: less memory, same update
  c.parallel = 'shard_map'                 # 'shard_map' (jit + shard_map) | 'pmap'
  c.num_devices = placeholder(int)         # None = all local devices
  c.log_every_steps = 20
  c.checkpoint_every_steps = 500           # also at the end of every epoch
  c.keep_checkpoints = 2
  c.progress = True                        # tqdm bar with throughput and ETA
  c.eval_every_epochs = 1                  # test eval + epoch-end checkpoint every k epochs (and at the end)
  c.plots = True                           # write curves.png at the end
  c.nan_policy = 'stop'                    # non-finite loss/grad: 'stop' (keep last good ckpt) | 'skip'
  c.debug_nan_step = placeholder(int)      # test hook: make this global step's batch NaN
  return c


def cifar(method_name: str, dataset: str = 'cifar10', model: str = 'preact_resnet18') -> ml_collections.ConfigDict:
  """The CIFAR recipe shared by the GPU/TPU configs.

  200 epochs of SGD (momentum 0.9, nesterov, lr 0.1 for batch 128 scaled
  linearly with the batch, cosine decay, weight decay 5e-4), random crop +
  flip (``augment='cifar'``, per record in 4 Grain workers). Data: tfds ``cifar10``/``cifar100`` prepared as array_record in
  ``dataset.data_dir`` (see README, "Data").
  """
  c = base()
  c.dataset.name = dataset
  c.dataset.data_dir = '~/tensorflow_datasets'
  c.dataset.augment = 'cifar'
  c.dataset.workers = 4                    # PNG decode + crop + flip ahead of the accelerator
  c.model.name = model
  c.method = method(method_name)
  if method_name not in SAMIX_METHODS:     # SAMix has no sensitivity pass
    c.method.sensitivity.chunk = 16        # peak memory grows with the chunk; divides 128/8
  c.batch_size = 128
  c.num_epochs = 200
  c.optimizer.learning_rate = 0.1
  c.optimizer.weight_decay = 5e-4
  c.eval_batch_size = 1000
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  return c
