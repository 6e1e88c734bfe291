"""train_and_evaluate(config, workdir): the training loop.

Sections, in order: validate the config (before anything compiles), data,
model and method, optimizer, state (fresh or restored), the compiled step,
the loop (train, refresh stale scores, evaluate each epoch, checkpoint), the
summary. All the mathematics lives in the core (objectives and below); this
file only composes and records.

Outputs in ``workdir``: ``config.json``, ``metrics.jsonl`` (one JSON record
per log/eval event), ``checkpoints/`` (Orbax), ``curves.png`` and
``summary.json``.
"""
from __future__ import annotations

import json
import os
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
from gmix_jax import sensitivity

PARALLEL_MODES = ('shard_map', 'pmap')
OPTIMIZERS = ('sgd', 'adam', 'adamw')
SCHEDULES = ('cosine', 'constant')
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
  """``config.method`` -> ``objectives.Method`` (preset + explicit overrides)."""
  mc = config.method
  sharp = _set_fields(mc.sharpness, rename={'rule': 'name'})
  if 'm' in sharp and isinstance(sharp['m'], str) and sharp['m'].isdigit():
    sharp['m'] = int(sharp['m'])
  return objectives.get_method(
      mc.name, num_classes,
      mixing=_set_fields(mc.mixing), sharpness=sharp,
      partition=_set_fields(mc.partition), sensitivity=_set_fields(mc.sensitivity))


def build_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
  """One optax chain from the config (big_vision style)."""
  oc = config.optimizer
  total = config.num_epochs * steps_per_epoch
  warmup = int(oc.warmup_epochs * steps_per_epoch)
  if oc.schedule == 'cosine':
    lr = optax.warmup_cosine_decay_schedule(0.0 if warmup else oc.learning_rate, oc.learning_rate,
                                            max(warmup, 1) if warmup else 1, max(total, warmup + 1))
  else:
    lr = optax.linear_schedule(0.0, oc.learning_rate, warmup) if warmup else oc.learning_rate
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


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Every error a user can make in the config, before any data or compile."""
  def one_of(field, value, allowed):
    if value not in allowed:
      raise ValueError(f'{field} must be one of {list(allowed)}, got {value!r}')
  one_of('parallel', config.parallel, PARALLEL_MODES)
  one_of('optimizer.name', config.optimizer.name, OPTIMIZERS)
  one_of('optimizer.schedule', config.optimizer.schedule, SCHEDULES)
  one_of('model.name', config.model.name, sorted(models.MODELS))
  one_of('method.name', config.method.name, sorted(objectives.PRESETS))
  name = config.dataset.name
  if not (name in data_lib.DATASET_NAMES or name.startswith('npz:')):
    one_of('dataset.name', name, data_lib.DATASET_NAMES)
  for field in ('batch_size', 'num_epochs', 'eval_batch_size', 'log_every_steps',
                'checkpoint_every_steps'):
    if not config[field] >= 1:
      raise ValueError(f'{field} must be >= 1, got {config[field]}')
  build_method(config, num_classes=10)       # raises on any bad method knob
  n_dev = config.num_devices or jax.local_device_count()
  if config.batch_size % (n_dev * jax.process_count()):
    raise ValueError(f'batch_size={config.batch_size} must be divisible by the number of devices '
                     f'({n_dev * jax.process_count()})')


# ----------------------------------------------------------------------------
# Small pieces of the loop.
# ----------------------------------------------------------------------------
def _augmented(objective, augment: bool):
  """Wrap the objective so random crop + flip happen on device, in the step."""
  if not augment:
    return objective
  def wrapped(params, model_state, batch, rng):
    x = data_lib.random_crop_flip(jax.random.fold_in(rng, 0x5EED), batch['x'])
    return objective(params, model_state, {**batch, 'x': x}, rng)
  return wrapped


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
    return d
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
  """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint)."""
  t_start = time.time()
  validate_config(config)
  parallel.maybe_initialize_distributed()
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  _check_workdir_config(workdir, config)
  lead = jax.process_index() == 0

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
  n_dev = config.num_devices or jax.local_device_count()
  per_device_batch = config.batch_size // (n_dev * jax.process_count())

  # -- Model, method, optimizer ------------------------------------------------
  module = models.get_model(config.model.name, ds.num_classes, **config.model.kwargs)
  apply_fn = models.make_apply_fn(module)
  method = build_method(config, ds.num_classes)
  method.check_batch(per_device_batch)
  use_stale = method.partition.rule != 'none' and method.sensitivity.estimator == 'stale'
  optimizer = build_optimizer(config, steps_per_epoch)
  objective = _augmented(objectives.make_objective(method, apply_fn, axis_name='batch'),
                         config.dataset.augment)

  # -- State: fresh, or the latest checkpoint -----------------------------------
  params, model_state = models.init_model(module, jax.random.PRNGKey(config.seed), ds.input_shape)
  state = parallel.create_train_state(params, model_state, optimizer, config.seed,
                                      num_train=x_train.shape[0] if use_stale else 0)
  import orbax.checkpoint as ocp
  ckpt = ocp.CheckpointManager(
      os.path.join(workdir, 'checkpoints'),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True))
  if ckpt.latest_step() is not None:
    state = ckpt.restore(ckpt.latest_step(), args=ocp.args.StandardRestore(state))
  elif lead:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json(indent=2))
  start_step = int(state.step)

  # -- The compiled step ---------------------------------------------------------
  per_device_step = parallel.make_per_device_step(objective, optimizer, axis_name='batch',
                                                  use_stale_scores=use_stale)
  devices = jax.local_devices()[:n_dev]
  if config.parallel == 'shard_map':
    mesh = parallel.make_mesh(n_dev * jax.process_count() if jax.process_count() > 1 else n_dev)
    step_fn = parallel.shard_map_step(per_device_step, mesh)
    state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    to_device = lambda b: parallel.global_batch_to_device(b, mesh, 'batch')
    host_state = lambda s: s
  else:
    step_fn = parallel.pmap_step(per_device_step, devices=devices)
    state = parallel.replicate(state, devices)
    to_device = lambda b: parallel.shard_batch(b, n_dev)
    host_state = parallel.unreplicate

  predict = jax.jit(lambda p, s, x: apply_fn(p, s, x, False)[0])
  score_fn = jax.jit(lambda p, s, x, y: sensitivity.scores(
      method.sensitivity if method.sensitivity.estimator != 'stale'
      else sensitivity.SensitivityConfig('per_example', chunk=method.sensitivity.chunk),
      apply_fn, p, s, x, jax.nn.one_hot(y, ds.num_classes), method.sensitivity_rho))

  # -- Loop ---------------------------------------------------------------------
  writer = _Writer(workdir, lead)
  batches = data_lib.BatchIterator((x_train, y_train), config.batch_size, config.seed,
                                   jax.process_index(), jax.process_count(), start_step=start_step)
  bar = None
  if config.progress and lead:
    from tqdm import tqdm
    bar = tqdm(total=total_steps, initial=start_step, unit='step', dynamic_ncols=True)
  history, pending, last_eval = [], [], {}
  t_window, window_steps = time.time(), 0
  refresh_every = method.sensitivity.refresh_every
  for step in range(start_step, total_steps):
    epoch = step // steps_per_epoch
    if use_stale and step % (refresh_every * steps_per_epoch) == 0:
      s = host_state(state)
      table = _refresh_scores(score_fn, s.params, s.model_state, x_train, y_train,
                              per_device_batch)
      state = parallel.set_scores(state, table)
    batch = next(batches)
    state, metrics = step_fn(state, to_device(batch))
    pending.append(metrics)
    window_steps += 1
    if (step + 1) % config.log_every_steps == 0 or step + 1 == total_steps:
      values = jax.device_get(pending)
      rec = {k: float(np.mean([np.mean(m[k]) for m in values])) for k in values[0]}
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
    end_of_epoch = (step + 1) % steps_per_epoch == 0
    if end_of_epoch:
      jax.block_until_ready(state)  # finish the epoch's steps: they count as training time
      dt, steps_done = time.time() - t_window, window_steps
      s = host_state(state)
      last_eval = _evaluate(predict, s.params, s.model_state, ds.x_test, ds.y_test,
                            config.eval_batch_size)
      last_eval.update(split='test', step=step + 1, epoch=(step + 1) // steps_per_epoch)
      writer.write(last_eval)
      history.append(last_eval)
      # Evaluation time is not training throughput: restart the window after it,
      # crediting the steps finished before it.
      t_window, window_steps = time.time() - dt, steps_done
    if end_of_epoch or (step + 1) % config.checkpoint_every_steps == 0 or step + 1 == total_steps:
      ckpt.save(step + 1, args=ocp.args.StandardSave(host_state(state)))
  ckpt.wait_until_finished()
  if bar is not None:
    bar.close()

  # -- Summary -------------------------------------------------------------------
  if not last_eval:                # resumed after the last step: evaluate once
    s = host_state(state)
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
      'wall_time_sec': time.time() - t_start,
  }
  if lead:
    plot = _plot(workdir)
    if plot:
      summary['curves'] = plot
    summary['metrics'] = writer.path
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=2)
  return summary
