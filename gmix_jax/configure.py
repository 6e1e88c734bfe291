"""Config -> library objects, and every check that needs no compilation.

``validate_config`` catches what a user can get wrong in the config alone
(names, ranges, divisibility) before any data is read; ``validate_data``
what needs the data (labels, shapes), before the model is initialised or a
step compiled. The ``build_*`` functions turn config sections into the
core's objects (``objectives.Method``, an optax chain, a schedule); they are
pure, so a test or a notebook can call them without a trainer.
"""
from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from gmix_jax import accumulation
from gmix_jax import cli
from gmix_jax import data as data_lib
from gmix_jax import extras
from gmix_jax import mixing
from gmix_jax import models
from gmix_jax import objectives
from gmix_jax import precision
from gmix_jax import sharpness
from gmix_jax import tasks

PARALLEL_MODES = ('shard_map', 'pmap')
OPTIMIZERS = ('sgd', 'adam', 'adamw')
SCHEDULES = ('cosine', 'constant')
NAN_POLICIES = ('stop', 'skip')
# Fields newer than some config files (configs/common.py): read with these defaults.
OPTIONAL_FIELDS = {
    'nan_policy': 'stop',       # 'stop' | 'skip' on a non-finite loss or gradient norm
    'debug_nan_step': None,     # test hook: the batch of this global step is made NaN
    'eval_every_epochs': 1,     # test-set evaluation every k epochs (and at the end)
    'plots': True,              # write curves.png at the end (sweeps turn it off)
    'accumulation_steps': 1,    # micro-batches per device batch (objectives.make_objective)
    'tensorboard': False,       # TensorBoard events beside metrics.jsonl (gmix_jax.tb_events)
}
# Models that read their inputs as images [H, W] or [H, W, C].
IMAGE_MODELS = ('cnn', 'resnet18', 'preact_resnet18', 'wrn28', 'wrn28_2', 'wrn28_10',
                'resnet50', 'vit_ti16', 'vit_s16', 'vit_b16', 'vit_b32')


def model_precision(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """``(model.dtype, model.param_rounding)``; absent fields (older configs)
  read as ('float32', 'nearest'). See gmix_jax/precision.py."""
  # None (a placeholder left unset) reads as the default too.
  return config.model.get('dtype') or 'float32', config.model.get('param_rounding') or 'nearest'


def build_model(config: ml_collections.ConfigDict, num_classes: int):
  """``(module, apply_fn)`` for ``config.model`` (compute dtype, rounding of
  the float32 parameters into it)."""
  dtype, rounding = model_precision(config)
  module = models.get_model(config.model.name, num_classes, dtype=dtype, **config.model.kwargs)
  apply_fn = precision.make_apply_fn(models.make_apply_fn(module), rounding,
                                     models.compute_dtype(dtype))
  return module, apply_fn


# ----------------------------------------------------------------------------
# Config -> library objects (pure, checked before anything compiles).
# ----------------------------------------------------------------------------
def set_fields(section: ml_collections.ConfigDict, rename=None) -> dict:
  """The knobs a config sets explicitly (None = keep the preset's default)."""
  rename = rename or {}
  return {rename.get(k, k): v for k, v in section.items() if v is not None}


def sharpness_fields(mc: ml_collections.ConfigDict) -> dict:
  """``method.sharpness``'s set knobs as ``objectives.get_method`` reads them."""
  sharp = set_fields(mc.sharpness, rename={'rule': 'name'})
  if 'm' in sharp and isinstance(sharp['m'], str) and sharp['m'].isdigit():
    sharp['m'] = int(sharp['m'])
  return sharp


def build_method(config: ml_collections.ConfigDict, num_classes: int) -> objectives.Method:
  """``config.method`` -> ``objectives.Method``, as the config's task reads it
  (``tasks``; supervised composed methods: ``composed_method``)."""
  return tasks.get(config).build_method(config, num_classes)


def composed_method(config: ml_collections.ConfigDict, num_classes: int) -> objectives.Method:
  """A composed method (``objectives.PRESETS``): the preset + explicit overrides."""
  mc = config.method
  return objectives.get_method(
      mc.name, num_classes,
      mixing=set_fields(mc.mixing), sharpness=sharpness_fields(mc),
      partition=set_fields(mc.partition), sensitivity=set_fields(mc.sensitivity))


def build_lr_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int):
  """The learning rate: an optax schedule ``step -> lr``, or a float."""
  oc = config.optimizer
  total = config.num_epochs * steps_per_epoch
  warmup = int(oc.warmup_epochs * steps_per_epoch)
  if oc.schedule == 'cosine':
    # decay_steps > warmup_steps, also for a one-step run (optax rejects an
    # empty decay); for two or more steps this is max(total, warmup + 1).
    return optax.warmup_cosine_decay_schedule(0.0 if warmup else oc.learning_rate, oc.learning_rate,
                                              max(warmup, 1), max(total, max(warmup, 1) + 1))
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


def opt(config: ml_collections.ConfigDict, field: str):
  """An optional config field (see ``OPTIONAL_FIELDS``)."""
  return config.get(field, OPTIONAL_FIELDS[field])


def num_devices(config: ml_collections.ConfigDict) -> int:
  """Devices used on each process."""
  n = config.num_devices
  return jax.local_device_count() if n is None else n


def _kwarg_kind(hint):
  """``(test, description)`` for a model field's annotation, or None when it
  is not one checked here (``Any``, callables, modules)."""
  import collections.abc  # pylint: disable=g-import-not-at-top
  import typing  # pylint: disable=g-import-not-at-top
  number = lambda v, t: isinstance(v, t) and not isinstance(v, bool)
  if hint is bool:
    return (lambda v: isinstance(v, bool)), 'true or false'
  if hint is int:
    return (lambda v: number(v, int)), 'an int'
  if hint is float:
    return (lambda v: number(v, (int, float))), 'a number'
  if hint is str:
    return (lambda v: isinstance(v, str)), 'a string'
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin in (collections.abc.Sequence, tuple, list) and args and args[0] in (int, float):
    item = args[0]
    return ((lambda v: isinstance(v, (tuple, list)) and all(number(x, item) for x in v)),
            f'a sequence of {item.__name__}s such as (64, 64)')
  return None


def check_model_kwargs(config: ml_collections.ConfigDict) -> None:
  """Each ``model.kwargs`` value has its constructor field's type (a string
  where a tuple of ints belongs would only fail inside the model's trace)."""
  import functools  # pylint: disable=g-import-not-at-top
  import typing  # pylint: disable=g-import-not-at-top
  constructor = models.MODELS[config.model.name]
  while isinstance(constructor, functools.partial):
    constructor = constructor.func
  try:
    hints = typing.get_type_hints(constructor)
  except Exception:  # pylint: disable=broad-except  (unresolvable annotations: not checked)
    return
  for key, value in dict(config.model.kwargs).items():
    kind = _kwarg_kind(hints.get(key))
    if kind is not None and not kind[0](value):
      raise ValueError(f'model.kwargs.{key}={value!r}: expected {kind[1]} '
                       f'(model.name={config.model.name!r})')


def validate_config(config: ml_collections.ConfigDict) -> objectives.Method:
  """Every error a user can make in the config, before any data or compile.

  Call after ``parallel.maybe_initialize_distributed`` (the device and
  process counts enter the batch checks). Returns the method (built for 10
  classes: the knobs' checks do not depend on the class count).
  """
  def one_of(field, value, allowed):
    if value not in allowed:
      raise ValueError(f'{field} must be one of {list(allowed)}, got {value!r}'
                       f'{cli.did_you_mean(value, allowed)}')
  one_of('parallel', config.parallel, PARALLEL_MODES)
  one_of('optimizer.name', config.optimizer.name, OPTIMIZERS)
  one_of('optimizer.schedule', config.optimizer.schedule, SCHEDULES)
  one_of('model.name', config.model.name, sorted(models.MODELS))
  dtype, rounding = model_precision(config)
  one_of('model.dtype', dtype, list(models.DTYPES))
  one_of('model.param_rounding', rounding, precision.ROUNDINGS)
  if rounding == 'dither' and dtype != 'bfloat16':
    raise ValueError(f"model.param_rounding='dither' needs model.dtype='bfloat16', got {dtype!r}")
  task = tasks.get(config)                           # task.name
  one_of('nan_policy', opt(config, 'nan_policy'), NAN_POLICIES)
  if opt(config, 'tensorboard'):
    extras.require('tensorboard', '--config.tensorboard=True')
  data_lib.inputs.check_fields(config)               # name, augment, image_size, workers
  for field in ('batch_size', 'num_epochs', 'eval_batch_size', 'log_every_steps',
                'checkpoint_every_steps', 'keep_checkpoints'):
    if not config[field] >= 1:
      raise ValueError(f'{field} must be >= 1, got {config[field]}')
  if not (isinstance(opt(config, 'eval_every_epochs'), int) and opt(config, 'eval_every_epochs') >= 1):
    raise ValueError(f"eval_every_epochs must be an int >= 1, got {opt(config, 'eval_every_epochs')!r}")
  debug_nan = opt(config, 'debug_nan_step')
  if debug_nan is not None and not (isinstance(debug_nan, int) and debug_nan >= 0):
    raise ValueError(f'debug_nan_step must be None or a step >= 0, got {debug_nan!r}')
  check_numbers(config)
  check_model_kwargs(config)
  try:                                                # the constructor checks its kwargs
    models.get_model(config.model.name, 10, dtype=dtype, **config.model.kwargs)
  except TypeError as e:
    raise ValueError(f'model.kwargs {dict(config.model.kwargs)} do not fit '
                     f'model.name={config.model.name!r}: {e}') from e
  method = task.check_config(config)                 # method.name and every method knob
  split = data_lib.inputs.train_split(config)
  if split != 'train' and not task.label_free:
    raise ValueError(f'dataset.train_split={split!r} is for the self-supervised tasks, whose loss '
                     f'reads no labels (task.name in {tasks.label_free_names()}); '
                     f"task.name={task.name!r} trains on the labelled 'train' split")
  check_rule_driven(config, task, method.sharpness)
  local = jax.local_device_count()
  n_dev = num_devices(config)
  if isinstance(n_dev, bool) or not isinstance(n_dev, int) or not 1 <= n_dev <= local:
    raise ValueError(f'num_devices must be None (all) or an int in [1, {local}] (the local '
                     f'devices), got {n_dev!r}')
  if config.parallel == 'pmap' and jax.process_count() > 1:
    raise ValueError("parallel='pmap' runs on one process only; use 'shard_map' on several hosts")
  if config.batch_size % (n_dev * jax.process_count()):
    raise ValueError(f'batch_size={config.batch_size} must be divisible by the number of devices '
                     f'({n_dev * jax.process_count()})')
  k_acc = accumulation.check_steps(opt(config, 'accumulation_steps'))
  method.check_batch(config.batch_size // (n_dev * jax.process_count()), k_acc)
  for message in task.ignored_knobs(config, method):
    warnings.warn(message, IgnoredKnobWarning, stacklevel=2)
  return method


def _finite(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_rule_driven(config, task, rule) -> None:
  """A rule that needs more than its objective (``objectives.RuleDriver``:
  state, phases, objective inputs) only where the task's step drives it;
  one that reads the optimizer's momentum only with an optimizer that keeps one."""
  driver = objectives.rule_driver(rule)
  if not driver.plain and not task.drives_rules(config):
    raise ValueError(f'sharpness.rule={rule.name!r} is implemented for the composed supervised '
                     f'methods ({sorted(objectives.PRESETS)}), not for method.name='
                     f'{config.method.name!r} with task.name={task.name!r} (its step keeps its '
                     f'own state); use {", ".join(objectives.plain_rules())}')
  if driver.needs_momentum and config.optimizer.name == 'sgd' and not config.optimizer.momentum:
    raise ValueError(f"sharpness.rule={rule.name!r} perturbs along the optimizer's momentum: set "
                     'optimizer.momentum > 0 (e.g. 0.9) or use optimizer.name=adam/adamw')


def check_numbers(config: ml_collections.ConfigDict) -> None:
  """Seeds, optimizer numbers and every float knob of the method: finite and
  in range (a NaN or negative learning rate would compile and diverge)."""
  if not (isinstance(config.seed, int) and not isinstance(config.seed, bool) and config.seed >= 0):
    raise ValueError(f'seed must be an int >= 0, got {config.seed!r}')
  oc = config.optimizer
  for field, low, allow_none in (('learning_rate', 0.0, False), ('momentum', 0.0, True),
                                 ('weight_decay', 0.0, True), ('warmup_epochs', 0.0, False)):
    value = oc[field]
    if value is None and allow_none:
      continue
    if not (_finite(value) and value >= low):
      raise ValueError(f'optimizer.{field} must be a finite number >= {low:g}, got {value!r}')
  if oc.grad_clip is not None and not (_finite(oc.grad_clip) and oc.grad_clip > 0):
    raise ValueError(f'optimizer.grad_clip must be None or a finite number > 0, got {oc.grad_clip!r}')
  for section in ('mixing', 'sharpness', 'partition', 'sensitivity', 'samix'):
    for key, value in (config.method.get(section) or {}).items():
      if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f'method.{section}.{key} must be finite, got {value!r}')


class IgnoredKnobWarning(UserWarning):
  """A config knob the chosen method does not read (it has no effect)."""


# Which resolved choice a knob belongs to: (section, knob) -> (choice, values that read it).
# The mixing policies' and sharpness rules' own knobs come from their modules
# (``_knob_owners``: ``mixing.policy_knobs``, ``sharpness.RULE_KNOBS``).
_KNOB_OWNERS = {
    ('partition', 'bgmix_rule'): ('partition.rule', ('binary',)),
    ('partition', 'mix_subset'): ('partition.rule', ('binary', 'decomposed')),
    ('partition', 'partners'): ('partition.rule', ('binary', 'decomposed')),
    ('partition', 'rho_plus'): ('partition.rule', ('decomposed',)),
    ('partition', 'rho_minus'): ('partition.rule', ('decomposed',)),
    ('partition', 'gamma'): ('partition.rule', ('binary', 'decomposed')),
    ('sensitivity', 'refresh_every'): ('sensitivity.estimator', ('stale',)),
}


def _knob_owners() -> dict:
  """``_KNOB_OWNERS`` plus each mixing policy's knobs (a variant reads its base's)."""
  owners = dict(_KNOB_OWNERS)
  policy_knobs = mixing.policy_knobs()
  for knob in dict.fromkeys(k for knobs in policy_knobs.values() for k in knobs):
    readers = tuple(name for name, knobs in policy_knobs.items() if knob in knobs)
    owners['mixing', knob] = ('mixing.policy', readers)
  for rule, knobs in sharpness.RULE_KNOBS.items():
    for knob in knobs:
      owners['sharpness', knob] = ('sharpness.rule', (rule,))
  return owners


def ignored_knobs(config: ml_collections.ConfigDict, method: objectives.Method) -> list[str]:
  """Messages for the knobs set in ``config`` that its task never reads
  (``tasks``; a composed method: ``composed_ignored_knobs``)."""
  return tasks.get(config).ignored_knobs(config, method)


def composed_ignored_knobs(config: ml_collections.ConfigDict,
                           method: objectives.Method) -> list[str]:
  """Messages for the knobs set in ``config.method`` that a composed
  ``method`` never reads: a sharpness knob without a sharpness rule (ρ on ERM
  or Mixup), a partition or sensitivity knob without a split (γ or
  ``sensitivity.chunk`` on G-Mix), a rule's own knob under another rule
  (``asam_eta`` on SAM)."""
  chosen = {'mixing.policy': method.mixing.policy, 'sharpness.rule': method.sharpness.name,
            'partition.rule': method.partition.rule,
            'sensitivity.estimator': method.sensitivity.estimator}
  split = method.partition.rule != 'none'
  messages, owners = [], _knob_owners()
  for section in ('mixing', 'sharpness', 'partition', 'sensitivity'):
    for key, value in set_fields(config.method[section]).items():
      field = f'method.{section}.{key}'
      where = f'method.name={config.method.name!r}'
      if section == 'sharpness' and not method.sharpness.active and key != 'rule':
        messages.append(f'{field}={value!r} has no effect: {where} has no sharpness rule')
      elif section == 'sensitivity' and not split:
        messages.append(f'{field}={value!r} has no effect: {where} does not split the batch '
                        '(the sensitivity scores are not computed)')
      elif section == 'sharpness' and key == 'rho_min' and method.sharpness.rho_schedule != 'lr':
        messages.append(f"{field}={value!r} has no effect: sharpness.rho_schedule is "
                        f"{method.sharpness.rho_schedule!r}, not 'lr'")
      elif (section, key) in owners:
        choice, readers = owners[section, key]
        if chosen[choice] not in readers:
          messages.append(f'{field}={value!r} has no effect: {where} has {choice}='
                          f'{chosen[choice]!r} (read only by {", ".join(readers)})')
  return messages


def validate_data(config: ml_collections.ConfigDict, ds: data_lib.TrainData, module,
                  method: objectives.Method) -> None:
  """What needs the data: labels in [0, C) and features the model can take.

  Runs after loading, before the model is initialised or the step compiled.
  The model check traces ``module.init`` abstractly (``jax.eval_shape``:
  nothing is compiled or allocated).
  """
  c = ds.num_classes
  for split, y in (('train', ds.train_labels()), ('test', ds.test_labels())):
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
  if method.mixing.policy in mixing.image_policies() and len(shape) not in (2, 3):
    raise ValueError(f'mixing.policy={method.mixing.policy!r} needs images [H, W(, C)], but '
                     f'dataset {ds.name!r} has examples of shape {shape}')
  try:
    jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x, train=False),
                   jax.ShapeDtypeStruct((1, *shape), jnp.float32))
  except Exception as e:  # any trace-time shape error of the model
    raise ValueError(f'model.name={config.model.name!r} (kwargs {dict(config.model.kwargs)}) '
                     f'cannot take examples of shape {shape} from dataset {ds.name!r}: {e}') from e
  tasks.get(config).check_data(config, ds, module, method)


def normalized(objective, normalizer: data_lib.Normalizer):
  """Wrap the objective so the batch's uint8 images (or float features) are
  normalised on device, in the step (`gmix_jax.data.normalize`): ``x`` and,
  for a two-view task, ``x2``."""
  def wrapped(params, model_state, batch, rng, *extra):
    views = {k: normalizer(batch[k]) for k in ('x', 'x2') if k in batch}
    return objective(params, model_state, {**batch, **views}, rng, *extra)
  return wrapped


def build_objective(config, method, apply_fn, total_steps, looksam_phase=None):
  """The per-device objective of a composed method (``objectives.make_objective``)."""
  # The LR schedule is for sharpness.rho_schedule='lr' (GSAM's ρ_t).
  lr = build_lr_schedule(config, total_steps // config.num_epochs)
  return objectives.make_objective(
      method, apply_fn, axis_name='batch', lr_schedule=lr, num_steps=total_steps,
      accumulation_steps=opt(config, 'accumulation_steps'), looksam_phase=looksam_phase)


def build_step_parts(config, method, module, apply_fn, ds, total_steps, params, model_state):
  """``(objective, extra, extra_update)`` for ``parallel.make_per_device_step``:
  the config's task builds them (``tasks.Task.step_parts``)."""
  parts = tasks.get(config).step_parts(config, method, module, apply_fn, ds, total_steps, params,
                                       model_state)
  return parts.objective, parts.extra, parts.extra_update
