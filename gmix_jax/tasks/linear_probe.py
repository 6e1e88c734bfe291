"""The ``linear_probe`` task: a linear classifier on a frozen pretrained backbone.

The usual protocol of self-supervised papers (MoCo, He et al. 2020 § 4.1;
the official ``main_lincls.py``): the encoder of a finished pretraining run
(``task.pretrained``: a ``moco``, ``samix_ssl`` or ``samix_ssl_p`` workdir;
its query encoder)
is frozen, BatchNorm included (inference mode, its running statistics, kept
with the frozen parameters in ``params['frozen_state']``), and
one Dense layer on the backbone's pooled features (the input of its
``head``, as the kNN monitor reads them) is trained with cross-entropy on
the labels. Only the probe's parameters move: the optimizer is masked
(``optax.multi_transform`` with ``set_to_zero`` on the encoder) and the
features are ``stop_gradient``. Evaluation and summary are the supervised
task's (test accuracy, loss, ECE).

Protocol defaults (configs, not enforced): SGD momentum 0.9, weight decay 0,
lr 30 for batch 256, 100 epochs (``main_lincls.py``: lr 30, momentum 0.9, wd
0, 100 epochs, steps at 60 and 80; a cosine schedule here), the training
augmentation as configured (``cifar`` / ``inception``). The method must be
``erm`` (the protocol is plain cross-entropy).

``task.pretrained='random'`` probes an untrained encoder instead (the
"random init" row of SSL papers' tables, the floor of the probe): the MoCo
encoder (backbone + projection head of ``moco.DEFAULTS``' sizes; the head is
unused, the features are its input) freshly initialised from
``PRNGKey(seed)``, as a ``moco`` run of that seed starts, BatchNorm with its
initial statistics (mean 0, variance 1).

At the last evaluation the summary also reports the frozen encoder's kNN
monitor (``final_knn_accuracy``: k = 200, τ = 0.1 as the pretraining run's,
``moco.feature_stream``): for a pretrained encoder the pretraining run's own
final kNN accuracy, for ``'random'`` the untrained backbone's.

The pretrained workdir is checked like a checkpoint before anything trains:
it exists, holds a ``config.json`` of an SSL task, is finished (its
``summary.json`` exists and its newest checkpoint is its last step), and
that checkpoint verifies against its digest (``tasks.source_run``);
otherwise one error names ``task.pretrained`` and what is wrong.
"""
from __future__ import annotations

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from gmix_jax import configure
from gmix_jax import knn
from gmix_jax import models
from gmix_jax import objectives
from gmix_jax import precision
from gmix_jax import tasks
from gmix_jax.tasks import moco
from gmix_jax.tasks import source_run
from gmix_jax.tasks import supervised

SSL_TASKS = ('moco', 'samix_ssl', 'samix_ssl_p')
RANDOM = 'random'          # task.pretrained: an untrained encoder (the floor)


class Probe(nn.Module):
  """Dense(num_classes) on the frozen encoder's backbone features."""
  encoder: nn.Module          # the pretraining run's ``moco.Projected``
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = False, mix=None):
    del train, mix            # the encoder is frozen: inference mode always
    got = []

    def grab(next_fun, args, kwargs, context):
      if context.method_name == '__call__' and context.module.path == ('encoder', 'backbone',
                                                                        'head'):
        got.append(args[0])
      return next_fun(*args, **kwargs)
    with nn.intercept_methods(grab):
      self.encoder(x, train=False)
    f = jax.lax.stop_gradient(got[0].astype(jnp.float32))
    return nn.Dense(self.num_classes, name='probe')(f)


def _where(config) -> str:
  return f'task.pretrained={config.task.get("pretrained")!r}'


def pretrained_config(config: ml_collections.ConfigDict) -> dict:
  """The pretraining run's ``config.json``, after the file-level checks
  (exists, an SSL task, finished)."""
  path = config.task.get('pretrained')
  if not path:
    raise ValueError("task.pretrained must name the workdir of a finished pretraining run "
                     "(task.name='moco' or 'samix_ssl'), e.g. --config.task.pretrained=workdirs/ssl, "
                     f"or be {RANDOM!r} (an untrained encoder)")
  if path == RANDOM:       # the MoCo encoder of this config's model, default head sizes
    return {'model': {'name': config.model.name, 'kwargs': dict(config.model.kwargs)},
            'task': {'name': 'moco'}}
  return source_run.finished_config(path, _where(config), SSL_TASKS, 'the probe')


def load_encoder(config: ml_collections.ConfigDict):
  """``(params, model_state)`` of the pretrained query encoder, verified."""
  state = source_run.restore(config.task.pretrained, _where(config))
  return state['params'], state['model_state']


class LinearProbe(supervised.Supervised):
  name = 'linear_probe'

  def check_config(self, config):
    """The fields; the pretraining workdir itself is checked when the model
    is built (``build_model``: after the data are opened, before anything
    compiles), so a config can be validated before that run exists."""
    if not config.task.get('pretrained'):
      pretrained_config(config)                          # its error: task.pretrained unset
    if config.method.name != 'erm':
      raise ValueError(f"method.name must be 'erm' for task.name='linear_probe' (the protocol "
                       f'is plain cross-entropy), got {config.method.name!r}')
    return self.build_method(config, num_classes=10)

  def build_method(self, config, num_classes):
    return configure.composed_method(config, num_classes)

  def drives_rules(self, config):
    return False                      # its step keeps no rule state

  def build_model(self, config, num_classes):
    old = pretrained_config(config)
    if old.get('model', {}).get('name') != config.model.name:
      raise ValueError(f"{_where(config)}: that run's model.name is "
                       f"{old.get('model', {}).get('name')!r}, this config's {config.model.name!r}")
    old = ml_collections.ConfigDict(old)
    mcfg = moco.MocoConfig(**{k: v for k, v in old.task.items()
                              if k in moco.DEFAULTS and v is not None})
    dtype, rounding = configure.model_precision(config)
    backbone = models.get_model(old.model.name, mcfg.proj_hidden, dtype=dtype,
                                **old.model.kwargs)
    module = Probe(moco.Projected(backbone, mcfg.proj_dim), num_classes)
    base = models.make_apply_fn(module)

    def apply_fn(params, model_state, x, train, rng=None, mix=None):
      """Inference mode always; the encoder's BatchNorm statistics ride in
      ``params['frozen_state']`` (no model state to average or update)."""
      del train, rng, mix
      net = {k: v for k, v in params.items() if k != 'frozen_state'}
      return base(net, params['frozen_state'], x, False)[0], model_state
    return module, precision.make_apply_fn(apply_fn, rounding, models.compute_dtype(dtype))

  def build_optimizer(self, config, steps_per_epoch):
    """The configured optimizer on the probe; the encoder never moves."""
    base = configure.build_optimizer(config, steps_per_epoch)
    labels = lambda params: {k: ('probe' if k == 'probe' else 'frozen') for k in params}
    return optax.multi_transform({'probe': base, 'frozen': optax.set_to_zero()}, labels)

  def step_parts(self, config, method, module, apply_fn, ds, total_steps, params, model_state):
    if config.task.pretrained == RANDOM:   # a moco run's initial encoder for this seed
      enc_params, enc_state = models.init_model(module.encoder.clone(parent=None),
                                                jax.random.PRNGKey(config.seed), ds.input_shape)
    else:
      enc_params, enc_state = load_encoder(config)
    shapes = lambda t: jax.tree.map(jnp.shape, t)
    if shapes(enc_params) != shapes(params['encoder']):
      raise ValueError(f'{_where(config)}: its encoder has other shapes than this config builds '
                       '(model, model.kwargs or input size differ)')
    params = {'encoder': jax.tree.map(jnp.asarray, enc_params), 'probe': params['probe'],
              'frozen_state': {k: {'encoder': jax.tree.map(jnp.asarray, enc_state[k])}
                               for k in model_state}}
    lr = configure.build_lr_schedule(config, total_steps // config.num_epochs)
    objective = objectives.make_objective(method, apply_fn, axis_name='batch', lr_schedule=lr,
                                          num_steps=total_steps)
    return tasks.StepParts(objective, params=params, model_state={})

  def evaluate(self, s, placed, state):
    """The supervised evaluation; at the last one, also the frozen encoder's
    kNN monitor (``knn_accuracy``)."""
    metrics = super().evaluate(s, placed, state)
    if int(jax.device_get(state.step)) >= s.total_steps:
      metrics['knn_accuracy'] = encoder_knn(s, state.params)
    return metrics

  def summary_metrics(self, last_eval, history):
    out = super().summary_metrics(last_eval, history)
    if 'knn_accuracy' in last_eval:
      out['final_knn_accuracy'] = last_eval['knn_accuracy']
    return out


def encoder_knn(s, params) -> float:
  """kNN top-1 of the frozen encoder's backbone features, with the
  pretraining run's ``knn_k`` / ``knn_temperature`` (as its monitor)."""
  old = ml_collections.ConfigDict(pretrained_config(s.config))
  cfg = moco.MocoConfig(**{k: v for k, v in old.task.items()
                           if k in moco.DEFAULTS and v is not None})
  enc = types.SimpleNamespace(module=s.module.encoder.clone(parent=None), ds=s.ds,
                              eval_batch=s.eval_batch)
  state = {k: v['encoder'] for k, v in params['frozen_state'].items()}
  features = moco.feature_stream(enc, params['encoder'], state)
  test_f, test_y = map(np.concatenate, zip(*features('test')))
  return knn.knn_accuracy(features('train'), test_f, test_y, num_classes=s.ds.num_classes,
                          k=cfg.knn_k, temperature=cfg.knn_temperature)


TASK = LinearProbe()
