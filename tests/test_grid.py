"""Every composition mixing × sharpness × partition trains, or is rejected with a reason."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fast_compile
import toy_models as toy
from gmix_jax import objectives
from gmix_jax.sharpness import SharpnessRule

# 'mixupe_v1' is mixupe with mixupe_version=1; manifold mixes the toy MLP's
# hidden layer or its input (toy_models.mlp_apply has both points).
MIXING = ['none', 'mixup', 'cutmix', 'multimix', 'mixupe', 'mixupe_v1', 'manifold']
SHARPNESS = ['none', 'sam', 'asam', 'gsam', 'esam']
PARTITION = ['none', 'binary', 'decomposed']
B = 8

# (mixing, sharpness, partition) -> the reason it is rejected.
REJECTED = {}
for mix, sharp in itertools.product(MIXING, SHARPNESS):
  if mix in ('mixupe', 'mixupe_v1'):
    for part in ('binary', 'decomposed'):
      REJECTED[(mix, sharp, part)] = "'mixupe' cannot be combined with partition"
  if sharp == 'none' and mix not in ('mixupe', 'mixupe_v1'):
    REJECTED[(mix, sharp, 'decomposed')] = "'decomposed' needs a sharpness rule"


def build(mix, sharp, part):
  mixing = (objectives.MixingConfig('mixupe', k=2, mixupe_version=1) if mix == 'mixupe_v1'
            else objectives.MixingConfig(mix, k=2))
  return objectives.get_method(
      'erm', toy.C, mixing=mixing,
      sharpness=SharpnessRule(sharp), partition=objectives.PartitionConfig(part))


@pytest.mark.slow
@pytest.mark.parametrize('mix,sharp,part', list(itertools.product(MIXING, SHARPNESS, PARTITION)))
def test_two_training_steps_or_a_clear_rejection(mix, sharp, part):
  if (mix, sharp, part) in REJECTED:
    with pytest.raises(ValueError, match=REJECTED[(mix, sharp, part)]):
      build(mix, sharp, part)
    return
  method = build(mix, sharp, part)
  objective = objectives.make_objective(method, toy.mlp_apply)
  optimizer = optax.sgd(0.1)

  # Compiled with fast_compile's options: 75 tiny programs compile several
  # times faster, and what is checked here does not depend on them.
  @jax.jit
  def step(params, opt_state, batch, key):
    grads, _, metrics = objective(params, {}, batch, key)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  rng = np.random.default_rng(0)
  batch0 = {'x': jnp.zeros((B, 2, 3, 1), jnp.float32), 'y': jnp.zeros((B,), jnp.int32)}
  params = toy.init_mlp(jax.random.PRNGKey(0))
  start = params
  opt_state = optimizer.init(params)
  fast = step.lower(params, opt_state, batch0, jax.random.PRNGKey(0)).compile(
      fast_compile.options())
  for i in range(2):
    batch = {'x': jnp.asarray(rng.normal(size=(B, 2, 3, 1)), jnp.float32),   # images, 6 features
             'y': jnp.asarray(rng.integers(0, toy.C, B), jnp.int32)}
    params, opt_state, metrics = fast(params, opt_state, batch, jax.random.PRNGKey(i))
    assert np.isfinite(float(metrics['loss']))
  moved = sum(float(jnp.sum(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(start)))
  assert moved > 0
