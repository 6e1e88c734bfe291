"""The ``supervised`` task: labelled examples, cross-entropy (docs/methods.md § 1-7).

Two kinds of method train under it:

  composed  a preset of ``objectives.PRESETS`` (mixing policy × sharpness
            rule × partition rule) (``objectives.make_objective``); no extra
            state but a stateful sharpness rule's (LookSAM's g_v, F-SAM's m)
            and the ``shared_prev`` estimator's ascent direction;
  own step  SAMix / SAMix^P (``samix.METHODS``): the mixblock, its optimizer
            and the EMA encoder ride in ``TrainState.extra``; only a
            sharpness rule composes with it (``samix.build``).

This file is the one place that tells the two apart.
"""
from __future__ import annotations

import json

import jax
import ml_collections

from gmix_jax import accumulation
from gmix_jax import checkpoints
from gmix_jax import cli
from gmix_jax import configure
from gmix_jax import data as data_lib
from gmix_jax import evaluation
from gmix_jax import objectives
from gmix_jax import samix
from gmix_jax import tasks


def own_step(config: ml_collections.ConfigDict) -> bool:
  """Whether ``config.method`` brings its own step (SAMix, SAMix^P)."""
  return config.method.name in samix.METHODS


def method_names() -> list[str]:
  return sorted([*objectives.PRESETS, *samix.METHODS])


def build_samix(config: ml_collections.ConfigDict) -> samix.SAMixConfig:
  """``config.method.samix`` (absent: defaults) -> ``samix.SAMixConfig``."""
  section = config.method.get('samix')
  return samix.get_config(config.method.name,
                          **(configure.set_fields(section) if section else {}))


class Supervised(tasks.Task):
  name = 'supervised'

  def check_config(self, config):
    """``method.name`` and every method knob; SAMix's source run (file level)."""
    if config.method.name not in method_names():
      raise ValueError(f'method.name must be one of {method_names()}, got {config.method.name!r}'
                       f'{cli.did_you_mean(config.method.name, method_names())}')
    method = self.build_method(config, num_classes=10)   # raises on any bad method knob
    if own_step(config):
      samix_cfg = build_samix(config)
      samix.feature_layer(samix_cfg, config.model.name)  # an encoder with a spatial map
      if samix_cfg.pretrained:                           # the source run, file-level
        samix.check_source(samix_cfg, json.loads(config.to_json()))
      k_acc = accumulation.check_steps(configure.opt(config, 'accumulation_steps'))
      if k_acc > 1:
        raise ValueError(f'accumulation_steps={k_acc} applies to the composed methods '
                         f'({sorted(objectives.PRESETS)}), not to method.name='
                         f'{config.method.name!r}; use accumulation_steps=1')
    return method

  def build_method(self, config, num_classes):
    """A composed method from its preset and overrides; SAMix: ERM's
    objective pieces with only the sharpness rule (its mixing is the mixblock)."""
    if not own_step(config):
      return configure.composed_method(config, num_classes)
    mc = config.method
    for section in ('mixing', 'partition', 'sensitivity'):
      if configure.set_fields(mc[section]):
        raise ValueError(f'method.{section} {configure.set_fields(mc[section])} cannot be '
                         f'combined with method.name={mc.name!r}: it mixes with its own mixblock '
                         '(knobs: method.samix.*); only method.sharpness composes with it')
    sharp = configure.sharpness_fields(mc)
    if isinstance(sharp.get('m'), int):
      raise ValueError(f"sharpness.m={sharp['m']} (groups) is not defined for method.name="
                       f"{mc.name!r}; use 'device' or 'global'")
    if sharp.get('rho_schedule', 'constant') != 'constant':
      raise ValueError(f"sharpness.rho_schedule={sharp['rho_schedule']!r} is not implemented for "
                       f"method.name={mc.name!r}; use 'constant'")
    if sharp.get('name') in ('looksam', 'fsam', 'msam'):
      raise ValueError(f"sharpness.rule={sharp['name']!r} is implemented for the composed "
                       f'methods, not for method.name={mc.name!r} (its step keeps its own '
                       'state); use sam, asam, gsam or esam')
    return objectives.get_method('erm', num_classes, sharpness=sharp)

  def drives_rules(self, config):
    return not own_step(config)       # the composed objective drives every rule

  def ignored_knobs(self, config, method):
    if own_step(config):
      return []                    # other sections are rejected; samix knobs are all read
    return configure.composed_ignored_knobs(config, method)

  def check_data(self, config, ds, module, method):
    if own_step(config):           # the mixblock's feature map exists and is spatial
      samix.feature_shape(module, samix.feature_layer(build_samix(config), config.model.name),
                          tuple(ds.input_shape))

  def step_parts(self, config, method, module, apply_fn, ds, total_steps, params, model_state):
    if not own_step(config):
      objective = configure.build_objective(config, method, apply_fn, total_steps)
      # LookSAM's g_v / F-SAM's m / shared_prev's ascent direction live in
      # TrainState.extra (checkpointed, digested, restored and placed with it).
      extra = objectives.step_state_init(method, params)
      update = objectives.step_state_update(method) if extra is not None else None
      driver = objectives.rule_driver(method.sharpness)
      phases = {p: configure.build_objective(config, method, apply_fn, total_steps, p)
                for p in driver.phases} or None
      return tasks.StepParts(objective, extra, update, objective_inputs=driver.objective_inputs,
                             phases=phases, phase=driver.phase)
    objective, extra, extra_update = samix.build(
        build_samix(config), config.model.name, module, apply_fn, tuple(ds.input_shape),
        ds.num_classes, total_steps, params, model_state,
        jax.random.fold_in(jax.random.PRNGKey(config.seed), 0x5A41),
        rule=method.sharpness, restore=checkpoints.restore_state)
    return tasks.StepParts(objective, extra, extra_update)


  def evaluate(self, s, placed, state):
    """Accuracy, loss and ECE over the whole test split, streamed (each
    process its rows; the sums cover all of them)."""
    with s.ds.ordered_batches('test', global_batch=s.eval_batch,
                              process_index=jax.process_index(),
                              process_count=jax.process_count()) as batches:
      metrics = evaluation.evaluate(placed.eval_fn, state.params, state.model_state, batches,
                                    placed.to_eval_device)
    if data_lib.inputs.dataset_field(s.config, 'bad_records') == 'skip':   # masked out
      metrics['bad_records'] = s.ds.num_test - int(metrics['num_examples'])
    del metrics['num_examples']    # == num_test (tests check it); not a per-epoch record field
    return metrics

  def summary_metrics(self, last_eval, history):
    return {'final_test_accuracy': last_eval['accuracy'], 'final_test_loss': last_eval['loss'],
            'final_test_ece': last_eval['ece'],
            'best_test_accuracy': max([h['accuracy'] for h in history],
                                      default=last_eval['accuracy'])}

  def progress(self, last_eval):
    return {'test_acc': f"{last_eval['accuracy']:.4f}", 'ece': f"{last_eval['ece']:.3f}"}


TASK = Supervised()
