"""The ``samix_ssl_p`` task: SAMix^P in self-supervised learning (docs/methods.md § 9.5).

As supervised SAMix^P (``method.name='samix_p'``) takes a finished SAMix
run's mixblock and EMA encoder, frozen, this task takes a finished
``samix_ssl`` run's (``task.source_workdir``): its mixblock φ and its
momentum encoder (the one whose features φ was trained on, here the
*mixer*) ride frozen in the extra state, and a fresh MoCo v2 pretraining
(query encoder, momentum key encoder, queue, as ``samix_ssl``) trains on

  L_θ = κ mean_i ℓ_NCE(q_θ(x_i), k_i)
        + mean_i [λ ℓ_NCE(q_θ(x̃_i), k_i) + (1 − λ) ℓ_NCE(q_θ(x̃_i), k_π(i))],
  x̃_i = x_i ⊙ (1 − s_i) + x_π(i) ⊙ s_i,   s = φ(f̄(x_i), f̄(x_π(i)), λ),

f̄ the mixer's features at ``task.feature_layer`` (``samix_ssl.frozen_mask_grads``).
No mixblock loss, no mixblock update: φ and the mixer are bit-for-bit the
source run's for the whole run.

Config: ``task.name='samix_ssl_p'``, ``task.source_workdir=WORKDIR`` and the
``samix_ssl`` fields; the mixblock's training knobs (``eta``,
``mask_weight``, ``mixblock_loss``, ``mixblock_lr``) are not read. The
source is checked before anything compiles (``check_source``): it exists, is
a finished ``samix_ssl`` run, has this config's model, projection head and
mixblock input/width; its checkpoint verifies when it is loaded
(``tasks.source_run``). Extra state: the ``moco`` task's plus ``'mixer'``
(``{'params', 'model_state'}``) and ``'mixblock'``.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from gmix_jax import samix
from gmix_jax import tasks
from gmix_jax.tasks import moco
from gmix_jax.tasks import samix_ssl as samix_ssl_task
from gmix_jax.tasks import source_run

SOURCE_TASKS = ('samix_ssl',)
OWN_FIELDS = ('source_workdir',)
# The mixblock's training knobs: a frozen mixblock reads none of them.
UNREAD = ('eta', 'mask_weight', 'mixblock_loss', 'mixblock_lr')
# What the source must share with this run as written (the encoder and the
# dataset the mixblock learned on); the head's widths and the mixblock's
# input and width are compared as each run resolves them.
COMPATIBLE_FIELDS = ('dataset.name', 'model')


def _where(config) -> str:
  return f'task.source_workdir={config.task.get("source_workdir")!r}'


def check_source(config) -> None:
  """The source workdir, file level: set, exists, a finished ``samix_ssl``
  run, with the same model, head, dataset and mixblock input/width."""
  path = config.task.get('source_workdir')
  if not path:
    raise ValueError("task.source_workdir must name the workdir of a finished samix_ssl run "
                     "(task.name='samix_ssl'), whose mixblock is loaded and frozen, e.g. "
                     '--config.task.source_workdir=workdirs/ssl_samix')
  old = source_run.finished_config(path, _where(config), SOURCE_TASKS, "task.name='samix_ssl_p'")
  new = json.loads(config.to_json())
  resolved = samix.mixblock_resolvers(new, 'task')
  # The head's widths as each run resolves them (None = the moco default).
  for field in ('proj_hidden', 'proj_dim'):
    resolved[f'task.{field}'] = lambda v, f=field: v or moco.DEFAULTS[f]
  changed = samix.changed_fields(old, new, COMPATIBLE_FIELDS, resolved)
  if changed:
    raise ValueError(f'{_where(config)}: that run differs in {", ".join(changed)}; its mixblock '
                     'and momentum encoder cannot be used with this config')


def load_source(config, template):
  """``{'mixer', 'mixblock'}`` from the source's verified last checkpoint,
  cast to ``template``'s dtypes; shapes must match."""
  state = source_run.restore(config.task.source_workdir, _where(config))
  extra = state.get('extra')
  if not isinstance(extra, dict) or not {'key', 'mixblock'} <= set(extra):
    raise ValueError(f'{_where(config)}: its checkpoint holds no SAMix-SSL state (key, mixblock)')
  loaded = {'mixer': extra['key'], 'mixblock': extra['mixblock']}
  shapes = lambda t: jax.tree.map(lambda a: tuple(np.shape(a)), t)
  if (jax.tree.structure(loaded) != jax.tree.structure(template) or
      shapes(loaded) != shapes(template)):
    raise ValueError(f'{_where(config)}: its momentum encoder or mixblock has other shapes than '
                     'this config builds (model, feature layer, mixblock_dim or input size differ)')
  return jax.tree.map(lambda a, t: jnp.asarray(a, t.dtype), loaded, template)


def make_extra_update(mcfg, total_steps: int):
  """The ``moco`` update (momentum, key BatchNorm statistics, queue); the
  mixer and the mixblock pass through unchanged."""
  moco_update = moco.make_extra_update(mcfg, total_steps)

  def update(extra, extra_grads, params, model_state, step, keys):
    base = moco_update({k: extra[k] for k in ('key', 'queue', 'ptr')}, extra_grads, params,
                       model_state, step, keys)
    return {**base, 'mixer': extra['mixer'], 'mixblock': extra['mixblock']}
  return update


class SAMixSSLP(samix_ssl_task.SAMixSSL):
  name = 'samix_ssl_p'
  own_fields = OWN_FIELDS

  def check_config(self, config):
    method = super().check_config(config)      # the moco and samix_ssl fields
    check_source(config)
    return method

  def ignored_knobs(self, config, method):
    return super().ignored_knobs(config, method) + [
        f'task.{k}={config.task[k]!r} has no effect: task.name={self.name!r} trains no mixblock'
        for k in UNREAD if config.task.get(k) is not None]

  def step_parts(self, config, method, module, apply_fn, ds, total_steps, params, model_state):
    mcfg, scfg = samix_ssl_task.get_configs(config, self.own_fields)
    k = moco.queue_size(mcfg, ds.num_train, config.batch_size)
    path = samix_ssl_task.feature_path(scfg, config.model.name)
    mixblock, phi = samix_ssl_task.new_mixblock(config, scfg, module, ds.input_shape)
    frozen = load_source(config, {'mixer': {'params': params, 'model_state': model_state},
                                  'mixblock': phi})
    extra = {**moco.init_extra(params, model_state, k, mcfg.proj_dim, config.seed), **frozen}
    objective = samix_ssl_task.make_objective(
        mcfg, scfg, method, apply_fn, samix_ssl_task.key_features_fn(module, path), mixblock,
        seed=config.seed, num_steps=total_steps, frozen=True)
    return tasks.StepParts(objective, extra, make_extra_update(mcfg, total_steps))


TASK = SAMixSSLP()
