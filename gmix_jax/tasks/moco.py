"""The ``moco`` task: MoCo v2 contrastive pretraining (docs/methods.md § 8, § 9).

He et al. 2020 ("Momentum Contrast for Unsupervised Visual Representation
Learning"), Chen et al. 2020 ("Improved Baselines with Momentum Contrastive
Learning", v2: MLP head, τ = 0.2, stronger augmentation).

  query encoder  f_q = backbone (``model.name``, its ``head`` resized to
                 ``proj_hidden``: the MLP's first layer) → ReLU → Dense(``proj_dim``),
                 L2-normalised (``Projected``);
  key encoder    f_k, a momentum copy: θ_k ← m θ_k + (1 − m) θ_q after every
                 update (``contrastive.momentum_update``; m constant or BYOL's
                 cosine schedule, ``contrastive.momentum_at`` at the step the
                 keys are used for). Reference order: MoCo updates θ_k *before*
                 the step's keys with the not yet updated θ_q; updating after
                 the update with the new θ_q gives the same sequence of θ_k;
  queue          the last K keys of all devices (FIFO, ``contrastive.enqueue``),
                 all-gathered before they are enqueued, so the queue is the same
                 for any device count; initialised with random unit vectors;
  loss           InfoNCE with temperature τ of the query view's embeddings
                 against their keys and the queue.

Shuffled BN (MoCo § 3.3): the key view's global batch is permuted across
devices before the key encoder (``contrastive.shuffle_rows``; one permutation
per step, the same on every device) and unpermuted after it, so the key
encoder's BatchNorm statistics of a row come from a random subset of the
global batch, not from the rows its query shares a device with. (On one
device the permutation changes nothing: BatchNorm then sees the whole batch,
as MoCo on one GPU.)

Mixing and sharpness. The query view is trained by the composed objective of
``objectives.make_objective`` with a contrastive ``loss_fn``: row i's target
is the one-hot of its own key among the device's keys, e_i, so any mixing
policy's target λ e_i + (1 − λ) e_π(i) gives the λ-weighted InfoNCE
λ ℓ(q̃_i, k_i) + (1 − λ) ℓ(q̃_i, k_π(i)) (the loss is linear in the target,
``instance_loss``), and any sharpness rule perturbs the weights of this loss
as it does a supervised one: G-Mix-SSL is ``method.name='gmix'``. The
BG-/DG-Mix splits and MixupE are refused (they are defined on labels).
Labels never reach the loss: the objective does not read ``batch['y']``.

Extra state (``TrainState.extra``): ``{'key': {'params', 'model_state'},
'queue': [K, proj_dim], 'ptr': int32}``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gmix_jax import cli
from gmix_jax import configure
from gmix_jax import contrastive
from gmix_jax import knn
from gmix_jax import models
from gmix_jax import objectives
from gmix_jax import precision
from gmix_jax import tasks

# The queue's default size and the other defaults (MoCo v2 unless said).
DEFAULTS = {
    'queue_size': 65536,          # K (MoCo: 65536), capped below the training-set size
    'temperature': 0.2,           # τ (MoCo v2)
    'momentum': 0.999,            # m (MoCo)
    'momentum_schedule': 'constant',   # 'constant' (MoCo) | 'cosine' (BYOL, m -> 1)
    'proj_hidden': 2048,          # MLP head hidden width (MoCo v2: 2048 on ResNet-50)
    'proj_dim': 128,              # embedding width (MoCo: 128)
    'knn_k': 200,                 # kNN monitor: neighbours (Wu et al. 2018)
    'knn_temperature': 0.1,       # kNN monitor: vote temperature (Wu et al. 2018)
}
SHUFFLE_SALT = 0x5348  # the shuffled-BN permutation's key: fold_in(seed key, salt), then step


@dataclasses.dataclass(frozen=True)
class MocoConfig:
  queue_size: int = DEFAULTS['queue_size']
  temperature: float = DEFAULTS['temperature']
  momentum: float = DEFAULTS['momentum']
  momentum_schedule: str = DEFAULTS['momentum_schedule']
  proj_hidden: int = DEFAULTS['proj_hidden']
  proj_dim: int = DEFAULTS['proj_dim']
  knn_k: int = DEFAULTS['knn_k']
  knn_temperature: float = DEFAULTS['knn_temperature']

  def __post_init__(self):
    for f in ('queue_size', 'proj_hidden', 'proj_dim', 'knn_k'):
      v = getattr(self, f)
      if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        raise ValueError(f'task.{f} must be an int >= 1, got {v!r}')
    for f in ('temperature', 'knn_temperature'):
      v = getattr(self, f)
      if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
        raise ValueError(f'task.{f} must be a finite number > 0, got {v!r}')
    if not (isinstance(self.momentum, (int, float)) and 0 <= self.momentum <= 1):
      raise ValueError(f'task.momentum must be in [0, 1], got {self.momentum!r}')
    if self.momentum_schedule not in contrastive.SCHEDULES:
      raise ValueError(f'task.momentum_schedule must be one of {list(contrastive.SCHEDULES)}, '
                       f'got {self.momentum_schedule!r}')


def get_config(config: ml_collections.ConfigDict) -> MocoConfig:
  """``config.task`` -> ``MocoConfig`` (None fields keep the defaults)."""
  fields = {k: v for k, v in config.task.items() if k != 'name' and v is not None}
  unknown = sorted(set(fields) - set(DEFAULTS))
  if unknown:
    raise ValueError(f'task.{unknown[0]} is not a field of task.name=\'moco\'; its fields: '
                     f'{sorted(DEFAULTS)}')
  return MocoConfig(**fields)


def queue_size(cfg: MocoConfig, num_train: int, global_batch: int) -> int:
  """K, capped at ``num_train − global_batch``: a queue as large as the
  training set would hold an older key of every query's own image (a false
  negative). Raises when not even one global batch fits."""
  cap = num_train - global_batch
  k = min(cfg.queue_size, cap)
  if k < global_batch:
    raise ValueError(f'task.queue_size: the queue must hold at least one global batch '
                     f'({global_batch} keys) and stay below the training-set size minus a batch '
                     f'({cap}); got queue_size={cfg.queue_size} with {num_train} training '
                     'examples: use a smaller batch_size or more data')
  return k


# ----------------------------------------------------------------------------
# The encoder and its features.
# ----------------------------------------------------------------------------
class Projected(nn.Module):
  """backbone (head width = the MLP's hidden width) → ReLU → Dense(out_dim).

  The backbone's ``head`` is MoCo v2's first MLP layer (Linear(d, hidden));
  the representation (kNN, linear probe) is that layer's input, the
  backbone's pooled features (``make_features_fn``).
  """
  backbone: nn.Module
  out_dim: int

  @nn.compact
  def __call__(self, x, train: bool = False, mix=None):
    h = self.backbone(x, train=train, **({} if mix is None else {'mix': mix}))
    z = nn.Dense(self.out_dim, dtype=self.backbone.dtype, name='proj')(nn.relu(h))
    return z.astype(jnp.float32)

  @property
  def mix_points(self):
    return self.backbone.mix_points


def make_features_fn(module: nn.Module) -> Callable:
  """``features(params, model_state, x) -> [B, d]``: the input of the
  backbone's ``head`` (inference mode), read by intercepting that call, so
  every model of ``gmix_jax.models`` works unchanged."""
  def features(params, model_state, x):
    got = []

    def grab(next_fun, args, kwargs, context):
      if context.method_name == '__call__' and context.module.path == ('backbone', 'head'):
        got.append(args[0])
      return next_fun(*args, **kwargs)
    with nn.intercept_methods(grab):
      module.apply({'params': params, **model_state}, x, train=False)
    return got[0].astype(jnp.float32)
  return features


# ----------------------------------------------------------------------------
# The loss and the step.
# ----------------------------------------------------------------------------
def instance_loss(outputs, targets, weights, *, keys, queue, temperature):
  """Σ_r w_r Σ_j t_rj ℓ(q_r, k_j), ℓ(q, k) = −log e^{q·k/τ} / (e^{q·k/τ} + Σ_n e^{q·n/τ}).

  ``outputs`` ``[R, D]`` (unnormalised query embeddings), ``targets``
  ``[R, B]`` weights over the device's ``keys`` ``[B, D]`` (one-hot e_i for
  a clean row, λ e_i + (1 − λ) e_π(i) for a mixed one), ``queue`` ``[K, D]``.
  Equals ``contrastive.info_nce`` / ``mixed_info_nce`` row by row.
  """
  q = contrastive.l2_normalize(outputs.astype(jnp.float32))
  pos = q @ keys.T / temperature                              # [R, B]
  neg = jax.nn.logsumexp(q @ queue.T / temperature, axis=-1)  # [R]
  nce = jnp.logaddexp(pos, neg[:, None]) - pos                # ℓ(q_r, k_j)
  return jnp.sum(weights * jnp.sum(targets * nce, axis=-1))


def make_objective(cfg: MocoConfig, method: objectives.Method, apply_fn, *, seed: int,
                   axis_name: str = 'batch', lr_schedule=None, num_steps: Optional[int] = None,
                   accumulation_steps: int = 1):
  """``objective(params, model_state, batch, rng, extra) -> (grads,
  model_state, metrics, extra_grads, keys)``: ``batch['x']`` is the query
  view, ``batch['x2']`` the key view; ``extra_grads`` carries the key
  encoder's new BatchNorm statistics (averaged over devices by the step),
  ``keys`` the global batch's keys (all-gathered) for the queue."""
  shuffle_key = jax.random.fold_in(jax.random.PRNGKey(seed), SHUFFLE_SALT)

  def objective(params, model_state, batch, rng, extra):
    xq, xk = batch['x'], batch['x2']
    b = xq.shape[0]
    n = jax.lax.axis_size(axis_name)
    # One permutation of the global batch per step, the same on every device.
    perm = jax.random.permutation(jax.random.fold_in(shuffle_key, batch['step']), n * b)
    kz, key_state = apply_fn(extra['key']['params'], extra['key']['model_state'],
                             contrastive.shuffle_rows(xk, perm, axis_name), True)
    keys = contrastive.unshuffle_rows(contrastive.l2_normalize(kz.astype(jnp.float32)), perm,
                                      axis_name)
    keys = jax.lax.stop_gradient(keys)
    queue = jax.lax.stop_gradient(extra['queue'].astype(jnp.float32))
    loss_fn = functools.partial(instance_loss, keys=keys, queue=queue,
                                temperature=cfg.temperature)
    inner = objectives.make_objective(method, apply_fn, axis_name=axis_name,
                                      lr_schedule=lr_schedule, num_steps=num_steps,
                                      accumulation_steps=accumulation_steps, loss_fn=loss_fn)
    # Row i's target: its own key, e_i (labels never enter).
    grads, model_state, metrics = inner(
        params, model_state, {'x': xq, 'y': jnp.eye(b, dtype=jnp.float32), 'step': batch['step']},
        rng)
    metrics = dict(metrics)
    metrics['momentum'] = contrastive.momentum_at(cfg.momentum, batch['step'] + 1, num_steps,
                                                  cfg.momentum_schedule)
    gathered = jax.lax.all_gather(keys, axis_name, axis=0, tiled=True)
    return grads, model_state, metrics, {'key_state': key_state}, gathered

  return objective


def make_extra_update(cfg: MocoConfig, total_steps: int):
  """Momentum update of the key encoder (with the updated query params),
  its averaged BatchNorm statistics, and the keys enqueued."""
  def update(extra, extra_grads, params, model_state, step, keys):
    del model_state
    m = contrastive.momentum_at(cfg.momentum, step + 1, total_steps, cfg.momentum_schedule)
    queue, ptr = contrastive.enqueue(extra['queue'], extra['ptr'], keys)
    return {'key': {'params': contrastive.momentum_update(params, extra['key']['params'], m),
                    'model_state': extra_grads['key_state']},
            'queue': queue, 'ptr': ptr}
  return update


def init_extra(params, model_state, k: int, dim: int, seed: int):
  """Key encoder = a copy of the query encoder; the queue random unit vectors."""
  copy = lambda t: jax.tree.map(lambda a: jnp.array(a, copy=True), t)
  queue = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), 0x5155), (k, dim))
  return {'key': {'params': copy(params), 'model_state': copy(model_state)},
          'queue': contrastive.l2_normalize(queue).astype(jnp.float32),
          'ptr': jnp.zeros((), jnp.int32)}


# ----------------------------------------------------------------------------
# The task.
# ----------------------------------------------------------------------------
def check_queue(config, queue_size: int) -> None:
  """The queue holds at least one global batch of keys."""
  if config.batch_size > queue_size:
    raise ValueError(f'task.queue_size={queue_size} must hold at least one global batch '
                     f'(batch_size={config.batch_size})')


REFUSED_MODELS = ('vit',)   # their head is zero-initialised: ReLU(0) gives no gradient to the MLP


class Moco(tasks.Task):
  name = 'moco'
  views = 2
  label_free = True

  def check_config(self, config):
    cfg = get_config(config)
    if config.model.name.startswith(REFUSED_MODELS):
      raise ValueError(f"task.name='moco' needs a convolutional or MLP backbone, got "
                       f"model.name={config.model.name!r} (a ViT's zero-initialised head would "
                       'leave the projection MLP without gradient; MoCo v3 is another recipe)')
    if config.method.name not in objectives.PRESETS:
      raise ValueError(f"method.name must be one of {sorted(objectives.PRESETS)} for "
                       f"task.name='moco', got {config.method.name!r}"
                       f'{cli.did_you_mean(config.method.name, objectives.PRESETS)}')
    method = self.build_method(config, num_classes=10)
    check_queue(config, cfg.queue_size)
    return method

  def build_method(self, config, num_classes):
    method = configure.composed_method(config, num_classes)
    if method.partition.rule != 'none':
      raise ValueError(f"method.name={config.method.name!r} splits the batch by per-example "
                       'sharpness-sensitivity of the labelled loss (BG-/DG-Mix), which '
                       "task.name='moco' does not have: use a method without partition rule")
    if method.mixing.policy == 'mixupe':
      raise ValueError("mixing.policy='mixupe' is defined on class predictions (⟨f(x), y − p⟩) "
                       "and has no contrastive form; task.name='moco' takes none, mixup, cutmix, "
                       'multimix or manifold')
    return method

  def ignored_knobs(self, config, method):
    return configure.composed_ignored_knobs(config, method)

  def check_data(self, config, ds, module, method):
    queue_size(get_config(config), ds.num_train, config.batch_size)

  def build_model(self, config, num_classes):
    cfg = get_config(config)
    dtype, rounding = configure.model_precision(config)
    backbone = models.get_model(config.model.name, cfg.proj_hidden, dtype=dtype,
                                **config.model.kwargs)
    module = Projected(backbone, cfg.proj_dim)
    apply_fn = precision.make_apply_fn(models.make_apply_fn(module), rounding,
                                       models.compute_dtype(dtype))
    return module, apply_fn

  def step_parts(self, config, method, module, apply_fn, ds, total_steps, params, model_state):
    cfg = get_config(config)
    k = queue_size(cfg, ds.num_train, config.batch_size)
    if k < cfg.queue_size:
      warnings.warn(f'task.queue_size={cfg.queue_size} capped to {k} (the {ds.num_train} '
                    f'training examples minus one batch of {config.batch_size}): a larger queue '
                    "would hold older keys of a query's own image", UserWarning, stacklevel=2)
    lr = configure.build_lr_schedule(config, total_steps // config.num_epochs)
    objective = make_objective(cfg, method, apply_fn, seed=config.seed, lr_schedule=lr,
                               num_steps=total_steps,
                               accumulation_steps=configure.opt(config, 'accumulation_steps'))
    extra = init_extra(params, model_state, k, cfg.proj_dim, config.seed)
    return tasks.StepParts(objective, extra, make_extra_update(cfg, total_steps))

  def evaluate(self, s, placed, state):
    """kNN top-1 of the backbone's features (unaugmented train split as the
    memory bank, test split as queries), streamed through the pipeline."""
    cfg = get_config(s.config)
    features = feature_stream(s, state.params, state.model_state)
    test_f, test_y = map(np.concatenate, zip(*features('test')))
    acc = knn.knn_accuracy(features('train'), test_f, test_y, num_classes=s.ds.num_classes,
                           k=cfg.knn_k, temperature=cfg.knn_temperature)
    return {'knn_accuracy': acc}

  def summary_metrics(self, last_eval, history):
    return {'final_knn_accuracy': last_eval['knn_accuracy'],
            'best_knn_accuracy': max([h['knn_accuracy'] for h in history],
                                     default=last_eval['knn_accuracy'])}

  def progress(self, last_eval):
    return {'knn_acc': f"{last_eval['knn_accuracy']:.4f}"}


def feature_stream(s, params, model_state):
  """``features(split)``: an iterator of ``(features, labels)`` of a split,
  in order, padding dropped (one process: its rows are every row)."""
  fn = jax.jit(lambda p, ms, x: make_features_fn(s.module)(p, ms, s.ds.normalizer(x)))

  def features(split):
    with s.ds.ordered_batches(split, global_batch=s.eval_batch, process_index=jax.process_index(),
                              process_count=jax.process_count()) as batches:
      for b in batches:
        keep = np.asarray(b['mask']).astype(bool)
        yield np.asarray(fn(params, model_state, b['x']))[keep], np.asarray(b['y'])[keep]
  return features


TASK = Moco()
