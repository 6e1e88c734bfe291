"""Shared defaults for every experiment config (not an experiment itself).

Each field is documented where it is set. Experiment files start from
``base()`` and change what their experiment needs; any field can be changed
on the command line: ``--config.method.partition.gamma=0.25``.
"""
import ml_collections
from ml_collections.config_dict import placeholder


def method(name: str) -> ml_collections.ConfigDict:
  """A method preset (gmix_jax.objectives.PRESETS) and its overridable knobs.

  Knobs left at None keep the preset's default (docs/methods.md).
  """
  # A fresh placeholder per field: a shared FieldReference would tie fields together.
  s, f, i = (lambda: placeholder(str)), (lambda: placeholder(float)), (lambda: placeholder(int))
  return ml_collections.ConfigDict({
      'name': name,                 # the preset: gmix_jax.objectives.PRESETS, or samix / samix_p
      'mixing': {                   # docs/methods.md § 1
          'policy': s(),            # a registered policy (gmix_jax.mixing.POLICIES) or mixupe
          'alpha': f(),             # λ ~ Beta(α, α)
          'lam_mode': s(),          # mixup: 'batch' (one λ) | 'example' (one λ per example)
          'k': i(),                 # multimix: interpolations per pair
          'budget': s(),            # multimix: 'expand' (K·B examples) | 'fixed' (B examples)
          'eta': f(),               # mixupe: weight η of the MixupE term
          'tau': f(),               # mixupe: threshold τ on r_i
          'mixupe_version': i(),    # mixupe: 3 (⟨f(x), y − p⟩) | 1 (directional derivative)
          'layers': s(),            # manifold: mixing points to draw from, e.g. '0,1,2'
      },
      'sharpness': {                # docs/methods.md § 2
          'rule': s(),              # none | sam | asam | gsam | esam | looksam | fsam | msam
          'rho': f(),               # ρ, the perturbation radius
          'asam_eta': f(),          # asam: η_a in T = |w| + η_a
          'asam_biases': s(),       # asam: 'unscaled' (T = 1 on biases, the authors' code) | 'scaled'
          'gsam_alpha': f(),        # gsam: α, weight of the removed orthogonal component
          'esam_beta': f(),         # esam: β, probability of keeping a tensor in the ascent
          'looksam_k': i(),         # looksam: a full SAM step every k steps (default 5)
          'looksam_alpha': f(),     # looksam: α, weight of the reused orthogonal g_v (0.7)
          'fsam_sigma': f(),        # fsam: σ in d = g − σ m (default 1)
          'fsam_lambda': f(),       # fsam: λ of the gradient EMA m (default 0.95)
          'm': s(),                 # 'device' | 'global' | a group size such as '32'
          'rho_schedule': s(),      # 'constant' | 'lr' (GSAM: ρ follows the LR)
          'rho_min': f(),           # rho_schedule='lr': ρ at the end of the schedule
      },
      'partition': {                # BG-/DG-Mix, docs/methods.md § 4 (reconstruction)
          'rule': s(),              # none | binary (BG-Mix) | decomposed (DG-Mix)
          'gamma': f(),             # γ: fraction of the batch in the sensitive subset
          'bgmix_rule': s(),        # binary: mix_one_subset | pair_within_subsets | sam_on_sensitive
          'mix_subset': s(),        # mix_one_subset: 'sensitive' | 'insensitive' subset is mixed
          'partners': s(),          # 'within_subset' | 'whole_batch': where mixing partners come from
          'rho_plus': f(),          # decomposed: ρ⁺ of the sensitive subset (None = ρ)
          'rho_minus': f(),         # decomposed: ρ⁻ of the other subset (None = ρ)
      },
      'sensitivity': {              # per-example s_i for the split, docs/methods.md § 3
          'estimator': s(),         # per_example | first_order | shared | shared_prev | stale
          'rho': f(),               # ρ of the sensitivity probe (None = the sharpness ρ)
          'chunk': i(),             # examples per vmapped chunk (0 = whole batch); memory ∝ chunk
          'refresh_every': i(),     # stale: epochs between refreshes of the score table
      },
      # SAMix / SAMix^P only (gmix_jax.samix.SAMixConfig documents each knob);
      # the other methods' configs stay as they were, so their workdirs resume.
      **({'samix': samix()} if name in SAMIX_METHODS else {}),
  })


SAMIX_METHODS = ('samix', 'samix_p')


# Self-supervised methods (configs/ssl*.py): name -> the composed method that
# trains the MoCo query view (docs/methods.md § 8); samix_ssl is its own task
# (§ 9: the mixblock mixes, so its method is a sharpness rule, here none).
SSL_METHODS = {'moco': 'erm', 'moco_mixup': 'mixup', 'moco_cutmix': 'cutmix', 'moco_gmix': 'gmix',
               'samix_ssl': 'erm'}


def ssl(method_name: str) -> ml_collections.ConfigDict:
  """``base()`` for MoCo v2 pretraining with ``method_name`` (``SSL_METHODS``):
  the ``moco`` task (``samix_ssl``: that task), two MoCo v2 views per record,
  the composed method."""
  if method_name not in SSL_METHODS:
    raise ValueError(f'SSL method must be one of {sorted(SSL_METHODS)}, got {method_name!r}')
  c = base()
  c.task = task('samix_ssl' if method_name == 'samix_ssl' else 'moco')
  c.method = method(SSL_METHODS[method_name])
  c.dataset.augment = 'moco'
  c.optimizer.nesterov = False             # MoCo: plain SGD momentum 0.9
  return c


def task(name: str = 'supervised') -> ml_collections.ConfigDict:
  """``config.task``: what is learned (gmix_jax/tasks; docs/methods.md § 8).

  A config without this section is ``supervised``. None keeps the task's
  default (gmix_jax.tasks.moco.DEFAULTS).
  """
  s, f, i = (lambda: placeholder(str)), (lambda: placeholder(float)), (lambda: placeholder(int))
  if name == 'linear_probe':
    return ml_collections.ConfigDict({
        'name': name,
        'pretrained': s(),          # linear_probe: workdir of a finished moco / samix_ssl run
    })
  if name not in ('moco', 'samix_ssl', 'samix_ssl_p'):
    return ml_collections.ConfigDict({'name': name})
  samix_ssl = {} if name == 'moco' else {   # gmix_jax.samix_ssl.SAMixSSLConfig
      'alpha': f(),                 # λ ~ Beta(α, α) (2)
      'eta': f(),                   # η: the queue's weight in the mixblock's BCE (0.1)
      'mask_weight': f(),           # β: mask-area regulariser (0.1)
      'clean_weight': f(),          # κ: the clean MoCo loss in the backbone's loss (1)
      'mixblock_loss': s(),         # 'eta_bce' | 'infonce'
      'mixblock_lr': f(),           # the mixblock's Adam learning rate (1e-3)
      'mixblock_dim': i(),          # the mixblock's attention width (32)
      'feature_layer': s(),         # the momentum encoder's layer feeding the mixblock
  }
  if name == 'samix_ssl_p':         # SAMix^P-SSL: the finished samix_ssl run whose mixblock is frozen
    samix_ssl['source_workdir'] = s()
  return ml_collections.ConfigDict({
      'name': name,                 # supervised | moco | samix_ssl | samix_ssl_p
      'queue_size': i(),            # K negatives (65536), capped below the training-set size
      'temperature': f(),           # InfoNCE τ (0.2, MoCo v2)
      'momentum': f(),              # key encoder momentum m (0.999)
      'momentum_schedule': s(),     # 'constant' | 'cosine' (BYOL: m -> 1)
      'proj_hidden': i(),           # projection MLP hidden width (2048)
      'proj_dim': i(),              # embedding width (128)
      'knn_k': i(),                 # kNN monitor neighbours (200)
      'knn_temperature': f(),       # kNN monitor vote temperature (0.1)
      **samix_ssl,
  })


def splits_batch(name: str) -> bool:
  """Whether preset ``name`` splits the batch by sensitivity (BG-/DG-Mix):
  only then are the ``method.sensitivity`` knobs read."""
  from gmix_jax import objectives
  return name in objectives.PRESETS and objectives.get_method(name, 10).partition.rule != 'none'


def samix() -> ml_collections.ConfigDict:
  """``method.samix``: None keeps gmix_jax.samix.SAMixConfig's default."""
  s, f, i = (lambda: placeholder(str)), (lambda: placeholder(float)), (lambda: placeholder(int))
  return ml_collections.ConfigDict({
      'source_workdir': s(),   # samix_p: workdir of a finished samix run (same model + dataset)
      'alpha': f(),            # λ ~ Beta(α, α)
      'eta': f(),              # η: weight of the non-target classes in the mixblock's loss
      'mask_weight': f(),      # β: weight of the mask-area regulariser
      'clean_weight': f(),     # κ: weight of the backbone's clean-image loss
      'momentum': f(),         # m₀: EMA momentum at step 0 (cosine to 1)
      'mixblock_lr': f(),      # the mixblock's Adam learning rate
      'mixblock_dim': i(),     # the mixblock's query/key width
      'feature_layer': s(),    # encoder layer feeding the mixblock, e.g. 'conv1', 'stage3_block2'
  })


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0                               # data order, init, mixing draws: the run is a function of it

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = 'mnist_subset'          # see gmix_jax.data.dataset_names()
  c.dataset.data_dir = 'data'              # tfds data dir; offline sets are prepared here
  c.dataset.download = False               # let tfds download (needs internet + TensorFlow)
  c.dataset.examples_per_class = placeholder(int)  # limited-data regime: int, or None for all
  c.dataset.train_fraction = placeholder(float)   # or a fraction of the training set
  c.dataset.augment = 'none'               # 'none' | 'cifar' (pad-4 crop + flip) | 'inception' (host)
  #                                          | 'moco' (MoCo v2 views, self-supervised)
  c.dataset.image_size = placeholder(int)  # crop size (needed by 'inception'); None = the stored size
  c.dataset.workers = 0                    # Grain worker processes (0: read in this process)
  c.dataset.bad_records = 'error'          # unreadable record: 'error' (stop, name it) | 'skip' (replace, count)
  c.dataset.train_split = placeholder(str)  # None = 'train'; a tfds union, e.g. 'unlabelled+train' (SSL)
  c.dataset.decode = 'exact'               # 'exact' (PIL's pixels) | 'fast' (Inception crop via OpenCV, docs/data.md)

  c.model = ml_collections.ConfigDict()
  c.model.name = 'cnn'                     # see gmix_jax.models.MODELS
  c.model.kwargs = ml_collections.ConfigDict()   # the model's constructor arguments (dropped when model.name changes)
  c.model.dtype = 'float32'                # compute dtype: float32 | bfloat16 | float16 (params stay f32)
  c.model.param_rounding = placeholder(str)  # bfloat16: 'nearest' (None) | 'dither' (gmix_jax/precision.py)

  c.method = method('gmix')

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'sgd'                 # 'sgd' (momentum, nesterov) | 'adam' | 'adamw'
  c.optimizer.learning_rate = 0.05         # peak learning rate (finite, >= 0)
  c.optimizer.momentum = 0.9               # sgd: momentum (0 = none)
  c.optimizer.nesterov = True              # sgd: Nesterov momentum
  c.optimizer.weight_decay = 5e-4          # decoupled: added to the update before the LR
  c.optimizer.schedule = 'cosine'          # 'cosine' | 'constant'
  c.optimizer.warmup_epochs = 0.0          # linear warmup from 0, in epochs
  c.optimizer.grad_clip = placeholder(float)  # global-norm clip, or None

  c.batch_size = 128                       # global batch; divided over all devices
  c.num_epochs = 10                        # epochs over the training set
  c.eval_batch_size = 500                  # test-set evaluation batch
  c.accumulation_steps = 1                 # K micro-batches per device batch: less memory, same update
  c.parallel = 'shard_map'                 # 'shard_map' (jit + shard_map) | 'pmap'
  c.num_devices = placeholder(int)         # None = all local devices
  c.log_every_steps = 20                   # a train record in metrics.jsonl every k steps
  c.checkpoint_every_steps = 500           # also at every evaluated epoch end and at the end
  c.keep_checkpoints = 2                   # checkpoints kept in workdir/checkpoints
  c.progress = True                        # tqdm bar with throughput and ETA (plain lines when not a terminal)
  c.tensorboard = False                    # also write the records' scalars as TensorBoard events in workdir/tensorboard (the [tensorboard] extra)
  c.eval_every_epochs = 1                  # test-set evaluation every k epochs (and at the end)
  c.plots = True                           # write curves.png at the end
  c.nan_policy = 'stop'                    # non-finite loss/grad: 'stop' (keep last good ckpt) | 'skip'
  c.debug_nan_step = placeholder(int)      # test hook: make this global step's batch NaN
  return c


def cifar(method_name: str, dataset: str = 'cifar10', model: str = 'preact_resnet18') -> ml_collections.ConfigDict:
  """The CIFAR recipe shared by the GPU/TPU configs.

  200 epochs of SGD (momentum 0.9, nesterov, lr 0.1 for batch 128 scaled
  linearly with the batch, cosine decay, weight decay 5e-4), random crop +
  flip (``augment='cifar'``, per record in 4 Grain workers). Data: tfds ``cifar10``/``cifar100`` prepared as array_record in
  ``dataset.data_dir`` (see docs/data.md).
  """
  c = base()
  c.dataset.name = dataset
  c.dataset.data_dir = '~/tensorflow_datasets'
  c.dataset.augment = 'cifar'
  c.dataset.workers = 4                    # PNG decode + crop + flip ahead of the accelerator
  c.model.name = model
  c.method = method(method_name)
  if splits_batch(method_name):            # the other methods compute no sensitivity
    c.method.sensitivity.chunk = 16        # peak memory grows with the chunk; divides 128/8
  c.batch_size = 128
  c.num_epochs = 200
  c.optimizer.learning_rate = 0.1
  c.optimizer.weight_decay = 5e-4
  c.eval_batch_size = 1000
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  return c


def imagenet_data(c: ml_collections.ConfigDict) -> None:
  """The ImageNet input of configs/imagenet*.py: tfds ``imagenet2012`` prepared
  as array_record (docs/data.md), JPEG bytes decoded by the input workers with
  the Inception crop at 224 px (resize 256 + centre crop in evaluation)."""
  c.dataset.name = 'imagenet2012'
  c.dataset.data_dir = '~/tensorflow_datasets'
  c.dataset.augment = 'inception'        # Inception random-resized crop + flip, per record
  c.dataset.image_size = 224
  c.dataset.workers = 16                 # JPEG decoding: ~200-250 images/s per worker core
