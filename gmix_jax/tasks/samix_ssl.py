"""The ``samix_ssl`` task: SAMix on MoCo v2 (docs/methods.md § 9).

Everything of the ``moco`` task (projection head, momentum key encoder with
shuffled BN, the all-gathered FIFO queue, the kNN monitor), plus SAMix's
mixblock φ (``samix.MixBlock``) in the extra state, with its own Adam. Each
step (``gmix_jax.samix_ssl``):

  mixblock  the momentum encoder's feature maps of the query views x_i and
            x_π(i) at ``task.feature_layer`` and λ ~ Beta(α, α) -> mask s;
            L_φ through the frozen momentum encoder (inference mode: its
            running BatchNorm statistics), the instance η-BCE (or the
            λ-weighted InfoNCE) plus β |mean(s) − (1 − λ)|;
  backbone  κ · InfoNCE of the clean query view + the λ-weighted InfoNCE of
            the stop-gradient mask's mixed query, through ``method``'s
            sharpness rule (``method.name`` = ``erm``, ``sam``, ``asam``, …:
            the mixblock is the mixing policy, so presets that mix are refused).

Config: ``task.name='samix_ssl'`` with the ``moco`` fields plus ``alpha``,
``eta``, ``mask_weight``, ``clean_weight``, ``mixblock_loss``,
``mixblock_lr``, ``mixblock_dim``, ``feature_layer`` (``SAMixSSLConfig``).
Extra state: the ``moco`` task's plus ``'mixblock'`` and ``'mixblock_opt'``.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gmix_jax import accumulation
from gmix_jax import configure
from gmix_jax import contrastive
from gmix_jax import knn
from gmix_jax import models
from gmix_jax import precision
from gmix_jax import samix
from gmix_jax import samix_ssl
from gmix_jax import tasks
from gmix_jax.tasks import moco

SAMIX_FIELDS = tuple(f.name for f in dataclasses.fields(samix_ssl.SAMixSSLConfig))
MIXBLOCK_SALT = 0x5A53


def get_configs(config, own: tuple[str, ...] = ()):
  """``config.task`` -> ``(MocoConfig, SAMixSSLConfig)`` (None keeps defaults);
  ``own``: the fields a derived task reads itself (not passed on)."""
  fields = {k: v for k, v in config.task.items()
            if k != 'name' and k not in own and v is not None}
  known = set(moco.DEFAULTS) | set(SAMIX_FIELDS)
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f'task.{unknown[0]} is not a field of task.name={config.task.name!r}; its '
                     f'fields: {sorted(known | set(own))}')
  mcfg = moco.MocoConfig(**{k: v for k, v in fields.items() if k in moco.DEFAULTS})
  try:
    scfg = samix_ssl.SAMixSSLConfig(**{k: v for k, v in fields.items() if k in SAMIX_FIELDS})
  except ValueError as e:   # its messages name method.samix.*; here the knobs live in task.*
    raise ValueError(str(e).replace('method.samix.', 'task.')) from None
  return mcfg, scfg


def feature_path(scfg: samix_ssl.SAMixSSLConfig, model_name: str) -> str:
  """The mixblock's input layer inside ``moco.Projected`` (``backbone/...``)."""
  if scfg.feature_layer is None and model_name not in samix.DEFAULT_FEATURE_LAYER:
    raise ValueError(f"task.name='samix_ssl' needs an encoder with a spatial feature map: "
                     f'model.name must be one of {sorted(samix.DEFAULT_FEATURE_LAYER)} or '
                     f'task.feature_layer set, got model.name={model_name!r}')
  return 'backbone/' + (scfg.feature_layer or samix.DEFAULT_FEATURE_LAYER[model_name])


def make_objective(mcfg, scfg, method, apply_fn, features_fn, mixblock, *, seed: int,
                   axis_name: str = 'batch', num_steps=None, frozen: bool = False):
  """``objective(params, model_state, batch, rng, extra) -> (grads,
  model_state, metrics, extra_grads, keys)`` as ``moco.make_objective``;
  ``extra_grads`` adds the mixblock's gradient. ``frozen`` (SAMix^P-SSL):
  the mask comes from ``extra['mixblock']`` on ``extra['mixer']``'s
  features, both frozen; no mixblock loss, no mixblock gradient."""
  shuffle_key = jax.random.fold_in(jax.random.PRNGKey(seed), moco.SHUFFLE_SALT)

  def query_fn(p, s, x):
    z, new_state = apply_fn(p, s, x, True)
    return contrastive.l2_normalize(z.astype(jnp.float32)), new_state

  def momentum_fn(kv, x):
    z, _ = apply_fn(kv['params'], kv['model_state'], x, False)
    return contrastive.l2_normalize(z.astype(jnp.float32))

  def objective(params, model_state, batch, rng, extra):
    xq, xk = batch['x'], batch['x2']
    n, b = jax.lax.axis_size(axis_name), xq.shape[0]
    perm = jax.random.permutation(jax.random.fold_in(shuffle_key, batch['step']), n * b)
    key_vars = jax.lax.stop_gradient(extra['key'])
    kz, key_state = apply_fn(key_vars['params'], key_vars['model_state'],
                             contrastive.shuffle_rows(xk, perm, axis_name), True)
    keys = jax.lax.stop_gradient(contrastive.unshuffle_rows(
        contrastive.l2_normalize(kz.astype(jnp.float32)), perm, axis_name))
    queue = jax.lax.stop_gradient(extra['queue'].astype(jnp.float32))
    if frozen:
      grads, new_state, metrics = samix_ssl.frozen_mask_grads(
          scfg, params, model_state, extra['mixblock'], extra['mixer'], mixblock=mixblock,
          query_fn=query_fn, features_fn=features_fn, x=xq, keys=keys, queue=queue, rng=rng,
          temperature=mcfg.temperature, rule=method.sharpness, axis_name=axis_name)
      extra_grads = {'key_state': key_state}
    else:
      grads, phi_grads, new_state, metrics = samix_ssl.losses_and_grads(
          scfg, params, model_state, extra['mixblock'], key_vars, mixblock=mixblock,
          query_fn=query_fn, momentum_fn=momentum_fn, features_fn=features_fn, x=xq, keys=keys,
          queue=queue, rng=rng, temperature=mcfg.temperature, rule=method.sharpness,
          axis_name=axis_name)
      extra_grads = {'key_state': key_state, 'mixblock': phi_grads}
    metrics['momentum'] = contrastive.momentum_at(mcfg.momentum, batch['step'] + 1, num_steps,
                                                  mcfg.momentum_schedule)
    gathered = jax.lax.all_gather(keys, axis_name, axis=0, tiled=True)
    return grads, new_state, metrics, extra_grads, gathered

  return objective


def make_extra_update(mcfg, mixblock_opt, total_steps: int):
  """The ``moco`` update (momentum, key BatchNorm statistics, queue) and one
  Adam step of the mixblock with its device-averaged gradient."""
  moco_update = moco.make_extra_update(mcfg, total_steps)

  def update(extra, extra_grads, params, model_state, step, keys):
    base = moco_update({k: extra[k] for k in ('key', 'queue', 'ptr')},
                       {'key_state': extra_grads['key_state']}, params, model_state, step, keys)
    updates, opt_state = mixblock_opt.update(extra_grads['mixblock'], extra['mixblock_opt'],
                                             extra['mixblock'])
    return {**base, 'mixblock': optax.apply_updates(extra['mixblock'], updates),
            'mixblock_opt': opt_state}
  return update


def new_mixblock(config, scfg, module, input_shape):
  """``(MixBlock, φ)``: a fresh mixblock for the encoder's feature map."""
  mixblock = samix.MixBlock(scfg.mixblock_dim)
  feat_shape = samix.feature_shape(module, feature_path(scfg, config.model.name),
                                   tuple(input_shape))
  f = jnp.zeros((1, *feat_shape), jnp.float32)
  phi = mixblock.init(jax.random.fold_in(jax.random.PRNGKey(config.seed), MIXBLOCK_SALT), f, f,
                      jnp.full((1,), 0.5), tuple(input_shape)[:2])['params']
  return mixblock, phi


def key_features_fn(module, path: str):
  """``features_fn(key_vars, x) -> [B, h, w, c]``: an encoder's feature map at
  ``path``, inference mode, from its ``{'params', 'model_state'}``."""
  features = samix.make_features_fn(module, path)
  return lambda kv, x: features(kv['params'], kv['model_state'], x)


class SAMixSSL(moco.Moco):
  name = 'samix_ssl'
  views = 2
  label_free = True
  own_fields: tuple[str, ...] = ()     # task fields a derived task reads itself

  def check_config(self, config):
    mcfg, scfg = get_configs(config, self.own_fields)
    feature_path(scfg, config.model.name)
    if config.model.name.startswith(moco.REFUSED_MODELS):
      raise ValueError(f"task.name='samix_ssl' needs a convolutional backbone, got "
                       f'model.name={config.model.name!r}')
    k_acc = accumulation.check_steps(configure.opt(config, 'accumulation_steps'))
    if k_acc > 1:
      raise ValueError(f"accumulation_steps={k_acc} is not implemented for task.name="
                       "'samix_ssl'; use accumulation_steps=1")
    method = self.build_method(config, num_classes=10)
    moco.check_queue(config, mcfg.queue_size)
    return method

  def build_method(self, config, num_classes):
    method = configure.composed_method(config, num_classes)
    if method.mixing.policy != 'none' or method.partition.rule != 'none':
      raise ValueError(f"method.name={config.method.name!r} mixes or splits the batch; "
                       "task.name='samix_ssl' mixes with its mixblock, so its method is a "
                       "sharpness rule only (method.name='erm', 'sam', 'asam', 'gsam', 'esam')")
    sharp = method.sharpness
    if isinstance(sharp.m, int):
      raise ValueError(f"sharpness.m={sharp.m} (groups) is not defined for task.name="
                       "'samix_ssl'; use 'device' or 'global'")
    if sharp.rho_schedule != 'constant':
      raise ValueError(f'sharpness.rho_schedule={sharp.rho_schedule!r} is not implemented for '
                       "task.name='samix_ssl'; use 'constant'")
    return method

  def check_data(self, config, ds, module, method):
    mcfg, scfg = get_configs(config, self.own_fields)
    moco.queue_size(mcfg, ds.num_train, config.batch_size)
    samix.feature_shape(module, feature_path(scfg, config.model.name), tuple(ds.input_shape))

  def step_parts(self, config, method, module, apply_fn, ds, total_steps, params, model_state):
    mcfg, scfg = get_configs(config, self.own_fields)
    k = moco.queue_size(mcfg, ds.num_train, config.batch_size)
    path = feature_path(scfg, config.model.name)
    mixblock, phi = new_mixblock(config, scfg, module, ds.input_shape)
    mixblock_opt = optax.adam(scfg.mixblock_lr)
    extra = {**moco.init_extra(params, model_state, k, mcfg.proj_dim, config.seed),
             'mixblock': phi, 'mixblock_opt': mixblock_opt.init(phi)}
    features_fn = key_features_fn(module, path)
    objective = make_objective(mcfg, scfg, method, apply_fn, features_fn, mixblock,
                               seed=config.seed, num_steps=total_steps)
    return tasks.StepParts(objective, extra, make_extra_update(mcfg, mixblock_opt, total_steps))

  # As the moco task's, with this task's config (its task section has more fields).
  def build_model(self, config, num_classes):
    mcfg, _ = get_configs(config, self.own_fields)
    dtype, rounding = configure.model_precision(config)
    backbone = models.get_model(config.model.name, mcfg.proj_hidden, dtype=dtype,
                                **config.model.kwargs)
    module = moco.Projected(backbone, mcfg.proj_dim)
    apply_fn = precision.make_apply_fn(models.make_apply_fn(module), rounding,
                                       models.compute_dtype(dtype))
    return module, apply_fn

  def evaluate(self, s, placed, state):
    mcfg, _ = get_configs(s.config, self.own_fields)
    features = moco.feature_stream(s, state.params, state.model_state)
    test_f, test_y = map(np.concatenate, zip(*features('test')))
    acc = knn.knn_accuracy(features('train'), test_f, test_y, num_classes=s.ds.num_classes,
                           k=mcfg.knn_k, temperature=mcfg.knn_temperature)
    return {'knn_accuracy': acc}


TASK = SAMixSSL()
