"""GSAM's ρ following the learning rate (Zhuang et al. 2022):
ρ_t = ρ_min + (ρ_max − ρ_min)(lr_t − lr_min)/(lr_max − lr_min)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import toy_models as toy
from gmix_jax import configure, objectives, parallel, sharpness, transforms
from gmix_jax.sharpness import SharpnessRule

STEPS = 100
LR = optax.warmup_cosine_decay_schedule(0.0, 0.1, 10, STEPS, end_value=0.002)
RHO_MAX, RHO_MIN = 0.08, 0.01


def rho_by_hand(t):
  """The formula, with lr_min/lr_max from a Python loop over the run's steps."""
  lrs = [float(LR(s)) for s in range(STEPS)]
  return RHO_MIN + (RHO_MAX - RHO_MIN) * (float(LR(t)) - min(lrs)) / (max(lrs) - min(lrs))


def gsam(rho=RHO_MAX, schedule='constant'):
  return objectives.get_method('gsam', toy.C, sharpness=SharpnessRule(
      'gsam', rho=rho, gsam_alpha=0.3, rho_schedule=schedule, rho_min=RHO_MIN))


def run(method, step, lr=LR):
  x, y = toy.data(jax.random.PRNGKey(0), 8)
  objective = objectives.make_objective(method, toy.mlp_apply, lr_schedule=lr, num_steps=STEPS)
  return jax.jit(objective)(toy.init_mlp(jax.random.PRNGKey(1)), {},
                            {'x': x, 'y': y, 'step': jnp.int32(step)}, jax.random.PRNGKey(2))


@pytest.mark.parametrize('t', [0, 5, 10, 37, 99])
def test_rho_schedule_is_the_formula(t):
  rho = sharpness.rho_following_lr(RHO_MAX, RHO_MIN, LR, STEPS)
  np.testing.assert_allclose(float(rho(jnp.int32(t))), rho_by_hand(t), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('t', [0, 37, 99])
def test_objective_at_step_t_is_gsam_with_rho_t(t):
  g, _, metrics = run(gsam(schedule='lr'), t)
  np.testing.assert_allclose(metrics['rho'], rho_by_hand(t), rtol=1e-5, atol=1e-7)
  g_ref, _, _ = run(gsam(rho=rho_by_hand(t)), t)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  if t == 0:                      # warm-up from 0: lr_0 = lr_min, so ρ_0 = ρ_min
    np.testing.assert_allclose(metrics['rho'], RHO_MIN, rtol=1e-6)


@pytest.mark.parametrize('lr', [0.05, optax.constant_schedule(0.05)])
def test_constant_lr_is_plain_gsam(lr):
  g, _, metrics = run(gsam(schedule='lr'), 42, lr)
  g_ref, _, _ = run(gsam(), 42, lr)
  assert float(metrics['rho']) == np.float32(RHO_MAX)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_array_equal(a, b)


def test_the_train_step_feeds_the_step_count():
  """Through parallel.make_per_device_step: metrics['rho'] at steps 0, 1, 2."""
  lr = optax.linear_schedule(0.1, 0.0, 4)
  method = gsam(schedule='lr')
  optimizer = optax.sgd(lr)
  objective = objectives.make_objective(method, toy.mlp_apply, lr_schedule=lr, num_steps=4)
  mesh = parallel.make_mesh(1)
  step = parallel.shard_map_step(parallel.make_per_device_step(objective, optimizer), mesh)
  state = parallel.replicate_on_mesh(
      parallel.create_train_state(toy.init_mlp(jax.random.PRNGKey(0)), {}, optimizer, 0), mesh)
  x, y = toy.data(jax.random.PRNGKey(1), 8)
  for t in range(3):
    state, metrics = step(state, {'x': x, 'y': y})
    # lr over steps 0..3: 0.1, 0.075, 0.05, 0.025 → (lr_t − 0.025)/0.075.
    u = (0.1 - 0.025 * t - 0.025) / 0.075
    np.testing.assert_allclose(metrics['rho'], RHO_MIN + (RHO_MAX - RHO_MIN) * u, rtol=1e-5)


def test_the_optax_transform_takes_the_same_schedule():
  rho = sharpness.rho_following_lr(RHO_MAX, RHO_MIN, LR, STEPS)
  loss = lambda w: jnp.sum(jnp.sin(w) * jnp.arange(1.0, 4.0)) + jnp.sum(w ** 4)
  w = jnp.array([0.3, -0.2, 0.5])
  scheduled, fixed = transforms.gsam(rho, alpha=0.3), transforms.gsam(rho_by_hand(37), alpha=0.3)
  state = scheduled.init(w)._replace(count=jnp.int32(37))
  grad_fn = lambda p, _: jax.grad(loss)(p)
  a, _ = scheduled.update(jax.grad(loss)(w), state, w, grad_fn=grad_fn)
  b, _ = fixed.update(jax.grad(loss)(w), fixed.init(w), w, grad_fn=grad_fn)
  np.testing.assert_allclose(a, b, rtol=1e-5)


def test_config_knobs_and_bad_values():
  from configs import mnist_subset
  config = mnist_subset.get_config('gsam')
  config.method.sharpness.rho_schedule = 'lr'
  config.method.sharpness.rho_min = 0.01
  rule = configure.build_method(config, 10).sharpness
  assert (rule.name, rule.rho_schedule, rule.rho_min) == ('gsam', 'lr', 0.01)
  with pytest.raises(ValueError, match=r"sharpness.rho_schedule must be one of \('constant', 'lr'\)"):
    SharpnessRule('gsam', rho_schedule='cosine')
  with pytest.raises(ValueError, match=r'sharpness.rho_min must be in \[0, rho=0.05\]'):
    SharpnessRule('gsam', rho_min=0.1)
  with pytest.raises(ValueError, match="rho_schedule='lr' needs a sharpness rule"):
    SharpnessRule('none', rho_schedule='lr')
  with pytest.raises(ValueError, match="needs make_objective"):
    objectives.make_objective(gsam(schedule='lr'), toy.mlp_apply)
