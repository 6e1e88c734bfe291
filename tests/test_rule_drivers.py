"""The trainer drives a sharpness rule through its ``objectives.RuleDriver``
(phases chosen on the host, objective inputs), never by the rule's name."""
import ast
import os

import jax.numpy as jnp
import pytest

from gmix_jax import configure
from gmix_jax import objectives
from gmix_jax import samix
from gmix_jax import sharpness
from gmix_jax import tasks
from gmix_jax import train
from test_train import read_metrics, tiny_config

PHASES = ('first', 'second', 'third')


def toy_driver(rule):
  """Three programs, chosen by step % 3; the objective also reads the state's step."""
  del rule
  return objectives.RuleDriver(phases=PHASES, phase=lambda step: PHASES[(step * 2) % 3],
                               objective_inputs=lambda state: {'toy_step': state.step})


def test_a_toy_rule_with_phases_is_driven_by_the_trainer(tmp_path, monkeypatch):
  """The step at s runs the program ``phase(s)`` names, with the driver's
  objective inputs in its batch; the one-program objective never runs."""
  build = configure.build_objective

  def tagged(config, method, apply_fn, total_steps, looksam_phase=None):
    base = build(config, method, apply_fn, total_steps)
    tag = -1.0 if looksam_phase is None else float(PHASES.index(looksam_phase))

    def objective(params, model_state, batch, rng, *extra):
      grads, state, metrics = base(params, model_state, batch, rng, *extra)[:3]
      seen = batch.get('toy_step', jnp.asarray(-1))
      return grads, state, {**metrics, 'toy_phase': jnp.float32(tag),
                            'toy_step': seen.astype(jnp.float32)}
    return objective
  monkeypatch.setitem(objectives.RULE_DRIVERS, 'sam', toy_driver)
  monkeypatch.setattr(configure, 'build_objective', tagged)
  c = tiny_config('sam', 'digits', tmp_path / 'data')
  c.dataset.examples_per_class = 8             # 80 examples -> 4 steps of 20
  c.plots = False
  train.train_and_evaluate(c, str(tmp_path / 'wd'))
  records = [r for r in read_metrics(tmp_path / 'wd') if r['split'] == 'train']
  assert [r['step'] for r in records] == [1, 2, 3, 4]
  assert [r['toy_phase'] for r in records] == [PHASES.index(PHASES[(s * 2) % 3])
                                               for s in range(4)]
  assert [r['toy_step'] for r in records] == [0, 1, 2, 3]


def test_looksam_driver_is_the_host_side_period():
  rule = sharpness.SharpnessRule('looksam', looksam_k=3)
  d = objectives.rule_driver(rule)
  assert d.phases == ('full', 'cheap') and d.keeps_state and not d.plain
  assert [d.phase(s) for s in range(7)] == ['full', 'cheap', 'cheap'] * 2 + ['full']
  assert objectives.rule_driver(sharpness.SharpnessRule('msam')).objective_inputs is \
      objectives.msam_inputs
  assert objectives.rule_driver(sharpness.SharpnessRule('sam')).plain


def _literals(path):
  with open(path) as f:
    tree = ast.parse(f.read())
  return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


ROOT = os.path.join(os.path.dirname(__file__), '..', 'gmix_jax')


@pytest.mark.parametrize('module', ['train.py', 'parallel.py', 'evaluation.py', 'configure.py',
                                    'outputs.py', 'cli.py'])
def test_the_trainer_names_no_rule_task_or_method(module):
  """A cheap guard beside the behavioural test: no string literal of these
  modules is a sharpness rule, a task or a method preset. configure and cli
  also name the config section ``method.samix``, so there only rules and
  tasks are checked."""
  names = set(sharpness.RULES) - {'none'}
  names |= set(tasks.names())
  if module not in ('configure.py', 'cli.py'):
    names |= set(objectives.PRESETS) | set(samix.METHODS)
  assert not _literals(os.path.join(ROOT, module)) & names


@pytest.mark.parametrize('module', ['train.py', 'parallel.py', 'evaluation.py', 'configure.py',
                                    'outputs.py', 'cli.py'])
def test_the_trainer_names_no_mixing_policy(module):
  """Which knobs a policy reads and which policies need images come from the
  mixing module's tables (``mixing.policy_knobs``, ``mixing.image_policies``),
  so no string literal here is a mixing policy (``'none'``, every axis's
  off value, aside)."""
  names = set(objectives.mixing_policies()) - {'none'}
  assert not _literals(os.path.join(ROOT, module)) & names
