"""train_and_evaluate(config, workdir): the training loop.

Sections, in order: validate the config (before anything compiles), data,
model and method, optimizer, state (fresh or restored), the compiled step,
the loop (train, refresh stale scores, evaluate each epoch, checkpoint), the
summary. All the mathematics lives in the core (objectives and below); this
file only composes and records.

Outputs in ``workdir``: ``config.json``, ``metrics.jsonl`` (one JSON record
per log/eval event), ``checkpoints/`` (Orbax), ``curves.png`` and
``summary.json``.

Reliability (README "Running long jobs"): a rerun resumes exactly from the
latest checkpoint (state, data plan position, the open metrics window; records
written after that checkpoint are dropped from ``metrics.jsonl``); SIGTERM
stops after the current step with a checkpoint (all processes at the same
step); ``nan_policy`` skips or stops on a non-finite loss/gradient.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from gmix_jax import data as data_lib
from gmix_jax import losses
from gmix_jax import models
from gmix_jax import objectives
from gmix_jax import parallel
from gmix_jax import samix
from gmix_jax import sensitivity

PARALLEL_MODES = ('shard_map', 'pmap')
OPTIMIZERS = ('sgd', 'adam', 'adamw')
SCHEDULES = ('cosine', 'constant')
NAN_POLICIES = ('stop', 'skip')
# Fields newer than some config files (configs/common.py): read with these defaults.
OPTIONAL_FIELDS = {
    'nan_policy': 'stop',       # 'stop' | 'skip' on a non-finite loss or gradient norm
    'debug_nan_step': None,     # test hook: the batch of this global step is made NaN
    'eval_every_epochs': 1,     # test-set eval + epoch-end checkpoint every k epochs (and at the end)
    'plots': True,              # write curves.png at the end (sweeps turn it off)
}
# Models that read their inputs as images [H, W] or [H, W, C].
IMAGE_MODELS = ('cnn', 'resnet18', 'preact_resnet18', 'wrn28', 'wrn28_2', 'wrn28_10')
# Config fields whose change makes an existing checkpoint unusable.
INCOMPATIBLE_FIELDS = ('dataset.name', 'dataset.examples_per_class', 'dataset.train_fraction',
                       'model', 'method', 'optimizer.name', 'seed', 'batch_size')


# ----------------------------------------------------------------------------
# Config -> library objects (pure, checked before anything compiles).
# ----------------------------------------------------------------------------
def _set_fields(section: ml_collections.ConfigDict, rename=None) -> dict:
  """The knobs a config sets explicitly (None = keep the preset's default)."""
  rename = rename or {}
  return {rename.get(k, k): v for k, v in section.items() if v is not None}


def build_method(config: ml_collections.ConfigDict, num_classes: int) -> objectives.Method:
  """``config.method`` -> ``objectives.Method`` (preset + explicit overrides).

  A method with its own step (``samix.METHODS``) brings its own mixing; only
  a sharpness rule composes with it (its other knobs: ``build_samix``).
  """
  mc = config.method
  sharp = _set_fields(mc.sharpness, rename={'rule': 'name'})
  if 'm' in sharp and isinstance(sharp['m'], str) and sharp['m'].isdigit():
    sharp['m'] = int(sharp['m'])
  if mc.name in samix.METHODS:
    for section in ('mixing', 'partition', 'sensitivity'):
      if _set_fields(mc[section]):
        raise ValueError(f'method.{section} {_set_fields(mc[section])} cannot be combined with '
                         f'method.name={mc.name!r}: it mixes with its own mixblock (knobs: '
                         'method.samix.*); only method.sharpness composes with it')
    if isinstance(sharp.get('m'), int):
      raise ValueError(f"sharpness.m={sharp['m']} (groups) is not defined for method.name="
                       f"{mc.name!r}; use 'device' or 'global'")
    if sharp.get('rho_schedule', 'constant') != 'constant':
      raise ValueError(f"sharpness.rho_schedule={sharp['rho_schedule']!r} is not implemented for "
                       f"method.name={mc.name!r}; use 'constant'")
    return objectives.get_method('erm', num_classes, sharpness=sharp)
  return objectives.get_method(
      mc.name, num_classes,
      mixing=_set_fields(mc.mixing), sharpness=sharp,
      partition=_set_fields(mc.partition), sensitivity=_set_fields(mc.sensitivity))


def build_samix(config: ml_collections.ConfigDict) -> samix.SAMixConfig:
  """``config.method.samix`` (absent: defaults) -> ``samix.SAMixConfig``."""
  section = config.method.get('samix')
  return samix.get_config(config.method.name, **(_set_fields(section) if section else {}))


def build_lr_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int):
  """The learning rate: an optax schedule ``step -> lr``, or a float."""
  oc = config.optimizer
  total = config.num_epochs * steps_per_epoch
  warmup = int(oc.warmup_epochs * steps_per_epoch)
  if oc.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0 if warmup else oc.learning_rate, oc.learning_rate,
                                              max(warmup, 1) if warmup else 1, max(total, warmup + 1))
  return optax.linear_schedule(0.0, oc.learning_rate, warmup) if warmup else oc.learning_rate


def build_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
  """One optax chain from the config (big_vision style)."""
  oc = config.optimizer
  lr = build_lr_schedule(config, steps_per_epoch)
  chain = []
  if oc.grad_clip:
    chain.append(optax.clip_by_global_norm(oc.grad_clip))
  if oc.name == 'sgd':
    if oc.weight_decay:
      chain.append(optax.add_decayed_weights(oc.weight_decay))
    chain.append(optax.sgd(lr, momentum=oc.momentum or None, nesterov=oc.nesterov))
  elif oc.name == 'adam':
    if oc.weight_decay:
      chain.append(optax.add_decayed_weights(oc.weight_decay))
    chain.append(optax.adam(lr))
  else:
    chain.append(optax.adamw(lr, weight_decay=oc.weight_decay))
  return optax.chain(*chain)


def _opt(config: ml_collections.ConfigDict, field: str):
  """An optional config field (see ``OPTIONAL_FIELDS``)."""
  return config.get(field, OPTIONAL_FIELDS[field])


def _num_devices(config: ml_collections.ConfigDict) -> int:
  """Devices used on each process."""
  return config.num_devices or jax.local_device_count()


def validate_config(config: ml_collections.ConfigDict) -> objectives.Method:
  """Every error a user can make in the config, before any data or compile.

  Call after ``parallel.maybe_initialize_distributed`` (the device and
  process counts enter the batch checks). Returns the method (built for 10
  classes: the knobs' checks do not depend on the class count).
  """
  def one_of(field, value, allowed):
    if value not in allowed:
      raise ValueError(f'{field} must be one of {list(allowed)}, got {value!r}')
  one_of('parallel', config.parallel, PARALLEL_MODES)
  one_of('optimizer.name', config.optimizer.name, OPTIMIZERS)
  one_of('optimizer.schedule', config.optimizer.schedule, SCHEDULES)
  one_of('model.name', config.model.name, sorted(models.MODELS))
  one_of('method.name', config.method.name, sorted([*objectives.PRESETS, *samix.METHODS]))
  one_of('nan_policy', _opt(config, 'nan_policy'), NAN_POLICIES)
  name = config.dataset.name
  if not (name in data_lib.DATASET_NAMES or name.startswith('npz:')):
    one_of('dataset.name', name, data_lib.DATASET_NAMES)
  for field in ('batch_size', 'num_epochs', 'eval_batch_size', 'log_every_steps',
                'checkpoint_every_steps', 'keep_checkpoints'):
    if not config[field] >= 1:
      raise ValueError(f'{field} must be >= 1, got {config[field]}')
  if not (isinstance(_opt(config, 'eval_every_epochs'), int) and _opt(config, 'eval_every_epochs') >= 1):
    raise ValueError(f"eval_every_epochs must be an int >= 1, got {_opt(config, 'eval_every_epochs')!r}")
  debug_nan = _opt(config, 'debug_nan_step')
  if debug_nan is not None and not (isinstance(debug_nan, int) and debug_nan >= 0):
    raise ValueError(f'debug_nan_step must be None or a step >= 0, got {debug_nan!r}')
  try:                                                # the constructor checks its kwargs
    models.get_model(config.model.name, 10, **config.model.kwargs)
  except TypeError as e:
    raise ValueError(f'model.kwargs {dict(config.model.kwargs)} do not fit '
                     f'model.name={config.model.name!r}: {e}') from e
  method = build_method(config, num_classes=10)       # raises on any bad method knob
  if config.method.name in samix.METHODS:
    samix_cfg = build_samix(config)
    samix.feature_layer(samix_cfg, config.model.name)  # an encoder with a spatial map
    if samix_cfg.pretrained:                           # the source run, file-level
      samix.check_source(samix_cfg, json.loads(config.to_json()))
  local = jax.local_device_count()
  n_dev = _num_devices(config)
  if not 1 <= n_dev <= local:
    raise ValueError(f'num_devices must be in [1, {local}] (the local devices), got {n_dev}')
  if config.parallel == 'pmap' and jax.process_count() > 1:
    raise ValueError("parallel='pmap' runs on one process only; use 'shard_map' on several hosts")
  if config.batch_size % (n_dev * jax.process_count()):
    raise ValueError(f'batch_size={config.batch_size} must be divisible by the number of devices '
                     f'({n_dev * jax.process_count()})')
  method.check_batch(config.batch_size // (n_dev * jax.process_count()))
  return method


def validate_data(config: ml_collections.ConfigDict, ds: data_lib.Dataset,
                  y_train: np.ndarray, module, method: objectives.Method) -> None:
  """What needs the data: labels in [0, C) and features the model can take.

  Runs after loading, before the model is initialised or the step compiled.
  The model check traces ``module.init`` abstractly (``jax.eval_shape``:
  nothing is compiled or allocated).
  """
  c = ds.num_classes
  for split, y in (('train', y_train), ('test', ds.y_test)):
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
      raise ValueError(f'dataset {ds.name!r}: y_{split} must be 1-D integer labels, got '
                       f'{y.dtype} {y.shape}')
    if y.size and (y.min() < 0 or y.max() >= c):
      raise ValueError(f'dataset {ds.name!r}: {split} labels must lie in [0, {c}) '
                       f'(num_classes={c}), got range [{y.min()}, {y.max()}]')
  shape = tuple(ds.input_shape)
  if config.model.name in IMAGE_MODELS and len(shape) not in (2, 3):
    raise ValueError(f'model.name={config.model.name!r} takes images [H, W] or [H, W, C], but '
                     f'dataset {ds.name!r} has examples of shape {shape}; use model.name=\'mlp\' '
                     'for feature vectors')
  if method.mixing.policy == 'cutmix' and len(shape) not in (2, 3):
    raise ValueError(f"mixing.policy='cutmix' needs images [H, W(, C)], but dataset {ds.name!r} "
                     f'has examples of shape {shape}')
  try:
    jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x, train=False),
                   jax.ShapeDtypeStruct((1, *shape), jnp.float32))
  except Exception as e:  # any trace-time shape error of the model
    raise ValueError(f'model.name={config.model.name!r} (kwargs {dict(config.model.kwargs)}) '
                     f'cannot take examples of shape {shape} from dataset {ds.name!r}: {e}') from e
  if config.method.name in samix.METHODS:     # the mixblock's feature map exists and is spatial
    samix.feature_shape(module, samix.feature_layer(build_samix(config), config.model.name), shape)


# ----------------------------------------------------------------------------
# Small pieces of the loop.
# ----------------------------------------------------------------------------
def _augmented(objective, augment: bool):
  """Wrap the objective so random crop + flip happen on device, in the step."""
  if not augment:
    return objective
  def wrapped(params, model_state, batch, rng, *extra):
    x = data_lib.random_crop_flip(jax.random.fold_in(rng, 0x5EED), batch['x'])
    return objective(params, model_state, {**batch, 'x': x}, rng, *extra)
  return wrapped


def build_step_parts(config, method, module, apply_fn, ds, total_steps, params, model_state):
  """``(objective, extra, extra_update)`` for ``parallel.make_per_device_step``.

  A composed method (``objectives``) has no extra state; a method that owns
  its step's extra state (``samix.METHODS``) builds all three.
  """
  if config.method.name not in samix.METHODS:
    # The LR schedule is for sharpness.rho_schedule='lr' (GSAM's ρ_t).
    lr = build_lr_schedule(config, total_steps // config.num_epochs)
    return objectives.make_objective(method, apply_fn, axis_name='batch', lr_schedule=lr,
                                     num_steps=total_steps), None, None
  return samix.build(build_samix(config), config.model.name, module, apply_fn,
                     tuple(ds.input_shape), ds.num_classes, total_steps, params, model_state,
                     jax.random.fold_in(jax.random.PRNGKey(config.seed), 0x5A41),
                     rule=method.sharpness, restore=restore_state)


def _evaluate(predict, params, model_state, x, y, batch_size: int) -> dict:
  """Accuracy, mean loss and ECE over a split (padded to whole batches)."""
  n = x.shape[0]
  logits = []
  for start in range(0, n, batch_size):
    xb = x[start:start + batch_size]
    pad = batch_size - xb.shape[0]
    if pad:                       # one compiled shape for every batch
      xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)])
    logits.append(np.asarray(predict(params, model_state, xb))[:batch_size - pad])
  logits = jnp.asarray(np.concatenate(logits))
  labels = jnp.asarray(y)
  ce = losses.soft_cross_entropy(logits, jax.nn.one_hot(labels, logits.shape[-1]))
  return {'accuracy': float(losses.accuracy(logits, labels)), 'loss': float(jnp.mean(ce)),
          'ece': float(losses.expected_calibration_error(logits, labels))}


def _refresh_scores(score_fn, params, model_state, x, y, batch_size: int) -> np.ndarray:
  """Fresh s_i for every training example (the ``stale`` estimator's table)."""
  out = []
  for start in range(0, x.shape[0] - batch_size + 1, batch_size):
    out.append(np.asarray(score_fn(params, model_state, x[start:start + batch_size],
                                   y[start:start + batch_size])))
  rest = x.shape[0] % batch_size
  if rest:
    out.append(np.asarray(score_fn(params, model_state, x[-rest:], y[-rest:])))
  return np.concatenate(out)


class _Writer:
  """metrics.jsonl, appended (a resumed run continues the same file)."""

  def __init__(self, workdir: str, enabled: bool):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.enabled = enabled

  def write(self, record: dict) -> None:
    if self.enabled:
      with open(self.path, 'a') as f:
        f.write(json.dumps(record) + '\n')


def truncate_metrics(path: str, max_step: int, rewrite: bool = True) -> list[dict]:
  """The records of ``path`` up to ``max_step``; with ``rewrite``, the file
  is replaced (atomically) by exactly those.

  A run killed after its last checkpoint has already appended records for
  steps it will redo; the resumed run drops them, so the file ends up as an
  uninterrupted run's. A line cut short by the kill is dropped too.
  """
  if not os.path.exists(path):
    return []
  kept, dropped = [], False
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:                       # a partial last line
        dropped = True
        continue
      if record.get('step', 0) <= max_step:
        kept.append(record)
      else:
        dropped = True
  if rewrite and dropped:
    tmp = f'{path}.tmp.{os.getpid()}'
    with open(tmp, 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in kept)
    os.replace(tmp, path)
  return kept


class _Preemption:
  """SIGTERM -> ``requested`` (a flag the loop reads), for the ``with`` body
  only: the previous handler is put back on exit. A no-op outside the main
  thread (Python delivers signals there only)."""

  def __init__(self):
    self.requested = False
    self._previous, self._installed = None, False

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.getsignal(signal.SIGTERM)
      signal.signal(signal.SIGTERM, self._handle)
      self._installed = True
    return self

  def __exit__(self, *exc):
    if self._installed:
      # None: the old handler was not installed from Python and cannot be restored.
      signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
    return False


def _checkpoint_manager(workdir: str, keep: int = 2):
  import orbax.checkpoint as ocp
  return ocp.CheckpointManager(
      os.path.join(workdir, 'checkpoints'),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def restore_state(workdir: str, step: int | None = None) -> tuple[int, dict]:
  """``(step, state)`` of a workdir's checkpoint (the latest by default).

  ``state`` is the saved ``TrainState`` as a nested dict of numpy arrays
  (``params``, ``opt_state``, ``model_state``, ``step``, ``rng``,
  ``scores``, ``skipped``, ``extra``); no config is needed, and the checkpoint may come
  from any device count or number of processes. For tests and analysis; the
  trainer restores into its own typed state.
  """
  import orbax.checkpoint as ocp
  ckpt = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                               item_handlers={'state': ocp.StandardCheckpointHandler()})
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {workdir!r}')
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          ckpt.item_metadata(step)['state'])
  restored = ckpt.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
  ckpt.close()
  return step, jax.device_get(restored['state'])


def _without_none(d):
  """``d`` without None-valued entries: a knob left at None (its default)
  means the same as a knob an older version of the config did not have."""
  if isinstance(d, dict):
    return {k: _without_none(v) for k, v in d.items() if v is not None}
  return d


def _check_workdir_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Refuse to resume a checkpoint written by an incompatible config."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f)
  new = json.loads(config.to_json())
  def get(d, dotted):
    for k in dotted.split('.'):
      d = d.get(k) if isinstance(d, dict) else None
    return _without_none(d)
  changed = [k for k in INCOMPATIBLE_FIELDS if get(old, k) != get(new, k)]
  if changed and os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise ValueError(
        f'workdir {workdir!r} holds a checkpoint from a different config (changed: '
        f'{", ".join(changed)}). Nothing was overwritten: use a new --workdir, or restore the '
        'old values to resume.')


def _plot(workdir: str) -> str | None:
  try:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
  except ImportError:
    return None
  train, test = [], []
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      r = json.loads(line)
      (train if r['split'] == 'train' else test).append(r)
  fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
  ax[0].plot([r['step'] for r in train], [r['loss'] for r in train], label='train (mixed) loss')
  ax[0].plot([r['step'] for r in test], [r['loss'] for r in test], 'o-', label='test loss')
  ax[0].set_xlabel('step'); ax[0].legend()
  ax[1].plot([r['epoch'] for r in test], [r['accuracy'] for r in test], 'o-')
  ax[1].set_xlabel('epoch'); ax[1].set_ylabel('test accuracy')
  fig.tight_layout()
  path = os.path.join(workdir, 'curves.png')
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint).

  Returns the summary (also written to ``summary.json``); after a SIGTERM,
  ``{'preempted': True, 'step': s, ...}`` instead, with a checkpoint at
  ``s`` (nothing else written): the next call with the same arguments
  resumes from it.

  Raises:
    ValueError: a bad config or dataset (before anything compiles), or a
      workdir holding an incompatible checkpoint.
    FloatingPointError: ``nan_policy='stop'`` and a non-finite loss or
      gradient norm; the last good checkpoint is kept.
  """
  with _Preemption() as preemption:
    return _train_and_evaluate(config, workdir, preemption)


def _train_and_evaluate(config, workdir, preemption: _Preemption) -> dict[str, Any]:
  t_start = time.time()
  parallel.maybe_initialize_distributed()  # before anything asks JAX for devices
  method = validate_config(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  _check_workdir_config(workdir, config)
  lead = jax.process_index() == 0
  nan_policy = _opt(config, 'nan_policy')
  debug_nan_step = _opt(config, 'debug_nan_step')

  # -- Data ------------------------------------------------------------------
  ds = data_lib.load_dataset(config.dataset.name, os.path.expanduser(config.dataset.data_dir),
                             download=config.dataset.download)
  x_train, y_train = ds.x_train, ds.y_train
  if config.dataset.examples_per_class or config.dataset.train_fraction:
    x_train, y_train = data_lib.subsample(
        x_train, y_train, examples_per_class=config.dataset.examples_per_class,
        train_fraction=config.dataset.train_fraction, seed=config.seed)
  steps_per_epoch = data_lib.steps_per_epoch(x_train.shape[0], config.batch_size)
  total_steps = config.num_epochs * steps_per_epoch
  n_dev = _num_devices(config)
  per_device_batch = config.batch_size // (n_dev * jax.process_count())

  # -- Model, method, optimizer ------------------------------------------------
  module = models.get_model(config.model.name, ds.num_classes, **config.model.kwargs)
  method = build_method(config, ds.num_classes)
  validate_data(config, ds, y_train, module, method)
  apply_fn = models.make_apply_fn(module)
  use_stale = method.partition.rule != 'none' and method.sensitivity.estimator == 'stale'
  optimizer = build_optimizer(config, steps_per_epoch)

  # -- State: fresh, or the latest checkpoint -----------------------------------
  # A checkpoint holds the TrainState (everything the step reads, including the
  # stale scores; the step's rng is derived from state.step) and the open
  # metrics window, so a resumed run logs what an uninterrupted one would.
  import orbax.checkpoint as ocp
  params, model_state = models.init_model(module, jax.random.PRNGKey(config.seed), ds.input_shape)
  objective, extra, extra_update = build_step_parts(config, method, module, apply_fn, ds,
                                                    total_steps, params, model_state)
  objective = _augmented(objective, config.dataset.augment)
  state = parallel.create_train_state(params, model_state, optimizer, config.seed,
                                      num_train=x_train.shape[0] if use_stale else 0, extra=extra)
  ckpt = _checkpoint_manager(workdir, config.keep_checkpoints)
  pending = []              # per-step metrics (host) since the last train record
  if ckpt.latest_step() is not None:
    restored = ckpt.restore(ckpt.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state), loop=ocp.args.JsonRestore()))
    state = restored['state']
    pending = [{k: np.float32(v) for k, v in m.items()} for m in restored['loop']['pending']]
  elif lead:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json(indent=2))
  start_step = int(state.step)
  writer = _Writer(workdir, lead)
  # Records past the restored step were written by a run killed before its next
  # checkpoint: this run writes them again.
  kept = truncate_metrics(writer.path, start_step, rewrite=lead)

  # -- The compiled step ---------------------------------------------------------
  per_device_step = parallel.make_per_device_step(objective, optimizer, axis_name='batch',
                                                  use_stale_scores=use_stale,
                                                  skip_nonfinite=nan_policy == 'skip',
                                                  extra_update=extra_update)
  devices = jax.local_devices()[:n_dev]
  if config.parallel == 'shard_map':
    if jax.process_count() > 1:     # the first n_dev devices of every process, by process
      mesh = parallel.make_mesh(devices=[
          d for p in range(jax.process_count())
          for d in [d for d in jax.devices() if d.process_index == p][:n_dev]])
    else:
      mesh = parallel.make_mesh(n_dev)
    step_fn = parallel.shard_map_step(per_device_step, mesh)
    state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    to_device = lambda b: parallel.global_batch_to_device(b, mesh, 'batch')
    host_state = lambda s: s                 # what is checkpointed: the global state
    # For evaluation: this process's copy (replicated, so every copy is the same).
    local_state = lambda s: jax.tree.map(lambda a: a.addressable_data(0), s)
  else:
    step_fn = parallel.pmap_step(per_device_step, devices=devices)
    state = parallel.replicate(state, devices)
    to_device = lambda b: parallel.shard_batch(b, n_dev)
    host_state = local_state = parallel.unreplicate

  predict = jax.jit(lambda p, s, x: apply_fn(p, s, x, False)[0])
  score_fn = jax.jit(lambda p, s, x, y: sensitivity.scores(
      method.sensitivity if method.sensitivity.estimator != 'stale'
      else sensitivity.SensitivityConfig('per_example', chunk=method.sensitivity.chunk),
      apply_fn, p, s, x, jax.nn.one_hot(y, ds.num_classes), method.sensitivity_rho))

  # -- Loop ---------------------------------------------------------------------
  batches = data_lib.BatchIterator((x_train, y_train), config.batch_size, config.seed,
                                   jax.process_index(), jax.process_count(), start_step=start_step)
  bar = None
  if config.progress and lead:
    from tqdm import tqdm
    bar = tqdm(total=total_steps, initial=start_step, unit='step', dynamic_ncols=True)
  history = [r for r in kept if r.get('split') == 'test']
  last_eval = dict(history[-1]) if history else {}
  t_window, window_steps = time.time(), 0
  refresh_every = method.sensitivity.refresh_every
  # Metrics of dispatched steps not yet read back. Each step's are read (a few
  # scalars) once the next step is dispatched, so the host stays one step ahead
  # while the flags they carry (non-finite, stop) are seen within a step.
  in_flight: list[tuple[int, dict]] = []
  stop = False

  def drain(keep: int) -> bool:
    """Reads all but the newest ``keep`` in-flight steps' metrics into
    ``pending``; True when some process asked to stop."""
    asked = False
    while len(in_flight) > keep:
      s, m = in_flight.pop(0)
      m = {k: np.float32(np.mean(v)) for k, v in jax.device_get(m).items()}
      if m['nonfinite'] and nan_policy == 'stop':
        ckpt.wait_until_finished()
        raise FloatingPointError(
            f'non-finite loss or gradient at step {s} (loss={m.get("loss")}, '
            f'grad_norm={m["grad_norm"]}); stopped (nan_policy=stop). The last good checkpoint '
            f'(step {ckpt.latest_step()}) in {workdir}/checkpoints was kept. Lower the learning '
            'rate or set optimizer.grad_clip and use a new workdir, or rerun the same command '
            'with --config.nan_policy=skip to resume from it and skip such steps.')
      asked |= bool(m.pop('stop', 0.0))
      pending.append(m)
    return asked

  for step in range(start_step, total_steps):
    if use_stale and step % (refresh_every * steps_per_epoch) == 0:
      s = local_state(state)
      table = _refresh_scores(score_fn, s.params, s.model_state, x_train, y_train,
                              per_device_batch)
      state = parallel.set_scores(state, table)
    batch = next(batches)
    if step == debug_nan_step:                 # test hook: a batch that makes the loss NaN
      batch['x'] = np.full_like(batch['x'], np.nan)
    # This process's stop request travels with its batch; the step returns the
    # max over all devices, so every process stops after the same step.
    batch['stop'] = np.full(batch['y'].shape, preemption.requested, np.int32)
    state, metrics = step_fn(state, to_device(batch))
    in_flight.append((step, metrics))
    window_steps += 1
    log_now = (step + 1) % config.log_every_steps == 0 or step + 1 == total_steps
    # An evaluated epoch end (every eval_every_epochs-th, and the last step).
    end_of_epoch = ((step + 1) % (steps_per_epoch * _opt(config, 'eval_every_epochs')) == 0
                    or step + 1 == total_steps)
    ckpt_now = (end_of_epoch or (step + 1) % config.checkpoint_every_steps == 0
                or step + 1 == total_steps)
    stop = drain(0 if (log_now or end_of_epoch or ckpt_now) else 1) or stop
    # One process needs no agreement: stop after this step.
    stop = stop or (preemption.requested and jax.process_count() == 1)
    if stop:
      drain(0)                                 # check the last step before saving it
      ckpt_now = True
    if log_now:
      rec = _train_record(pending)
      dt = time.time() - t_window
      rec.update(split='train', step=step + 1, epoch=(step + 1) / steps_per_epoch,
                 examples_per_sec=window_steps * config.batch_size / max(dt, 1e-9))
      writer.write(rec)
      if bar is not None:
        bar.set_postfix(loss=f"{rec['loss']:.3f}", ex_s=f"{rec['examples_per_sec']:.0f}",
                        **({'test_acc': f"{last_eval['accuracy']:.4f}"} if last_eval else {}))
      pending, t_window, window_steps = [], time.time(), 0
    if bar is not None:
      bar.update(1)
    if end_of_epoch:
      jax.block_until_ready(state)  # finish the epoch's steps: they count as training time
      dt, steps_done = time.time() - t_window, window_steps
      s = local_state(state)
      last_eval = _evaluate(predict, s.params, s.model_state, ds.x_test, ds.y_test,
                            config.eval_batch_size)
      last_eval.update(split='test', step=step + 1, epoch=(step + 1) // steps_per_epoch)
      writer.write(last_eval)
      history.append(last_eval)
      # Evaluation time is not training throughput: restart the window after it,
      # crediting the steps finished before it.
      t_window, window_steps = time.time() - dt, steps_done
    if ckpt_now:
      ckpt.save(step + 1, args=ocp.args.Composite(
          state=ocp.args.StandardSave(host_state(state)),
          loop=ocp.args.JsonSave({'pending': [{k: float(v) for k, v in m.items()}
                                              for m in pending]})))
    if stop:
      break
  ckpt.wait_until_finished()
  if bar is not None:
    bar.close()
  if stop and step + 1 < total_steps:
    return {'preempted': True, 'step': step + 1, 'steps': total_steps, 'workdir': workdir,
            'checkpoint': os.path.join(workdir, 'checkpoints', str(step + 1)),
            'wall_time_sec': time.time() - t_start}

  # -- Summary -------------------------------------------------------------------
  if not last_eval:                # resumed after the last step: evaluate once
    s = local_state(state)
    last_eval = _evaluate(predict, s.params, s.model_state, ds.x_test, ds.y_test,
                          config.eval_batch_size)
  summary = {
      'final_test_accuracy': last_eval['accuracy'], 'final_test_loss': last_eval['loss'],
      'final_test_ece': last_eval['ece'],
      'best_test_accuracy': max([h['accuracy'] for h in history], default=last_eval['accuracy']),
      'steps': total_steps, 'epochs': config.num_epochs, 'num_train': int(x_train.shape[0]),
      'num_test': int(ds.x_test.shape[0]), 'method': config.method.name,
      'model': config.model.name, 'dataset': config.dataset.name,
      'devices': n_dev * jax.process_count(), 'parallel': config.parallel,
      'nonfinite_skipped': int(jax.device_get(local_state(state).skipped)),
      'wall_time_sec': time.time() - t_start,
  }
  if lead:
    plot = _plot(workdir) if _opt(config, 'plots') else None
    if plot:
      summary['curves'] = plot
    summary['metrics'] = writer.path
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=2)
  return summary


def _train_record(pending: list[dict]) -> dict:
  """One train record: each metric's mean over the window's steps, skipped
  (non-finite) steps left out; ``nonfinite_skipped`` is the running count."""
  used = [m for m in pending if not m['nonfinite']]
  keys = [k for k in pending[0] if k not in ('nonfinite', 'nonfinite_skipped')]
  rec = {k: float(np.mean([m[k] for m in used])) if used else float('nan') for k in keys}
  rec['nonfinite_skipped'] = float(pending[-1]['nonfinite_skipped'])
  return rec
