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
          'rule': s(),              # none | sam | asam | gsam | esam
          'rho': f(),               # ρ, the perturbation radius
          'asam_eta': f(),          # asam: η_a in T = |w| + η_a
          'asam_biases': s(),       # asam: 'unscaled' (T = 1 on biases, the authors' code) | 'scaled'
          'gsam_alpha': f(),        # gsam: α, weight of the removed orthogonal component
          'esam_beta': f(),         # esam: β, probability of keeping a tensor in the ascent
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
          'estimator': s(),         # per_example | first_order | shared | stale
          'rho': f(),               # ρ of the sensitivity probe (None = the sharpness ρ)
          'chunk': i(),             # examples per vmapped chunk (0 = whole batch); memory ∝ chunk
          'refresh_every': i(),     # stale: epochs between refreshes of the score table
      },
      # SAMix / SAMix^P only (gmix_jax.samix.SAMixConfig documents each knob);
      # the other methods' configs stay as they were, so their workdirs resume.
      **({'samix': samix()} if name in SAMIX_METHODS else {}),
  })


SAMIX_METHODS = ('samix', 'samix_p')


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
  c.dataset.image_size = placeholder(int)  # crop size (needed by 'inception'); None = the stored size
  c.dataset.workers = 0                    # Grain worker processes (0: read in this process)

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
  c.progress = True                        # tqdm bar with throughput and ETA
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
