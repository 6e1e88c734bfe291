"""MixupE (Zou et al. 2023, version 3) against a hand-written linear model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmix_jax import losses, mixing, objectives
from gmix_jax.sharpness import SharpnessRule

B, D, C = 8, 5, 3
RNG = jax.random.PRNGKey(7)


def linear_apply(params, model_state, x, train):
  del train
  return x @ params['w'] + params['b'], model_state


@pytest.fixture
def setup(x64):
  rng = np.random.default_rng(0)
  params = {'w': jnp.asarray(rng.normal(size=(D, C))), 'b': jnp.asarray(rng.normal(size=C) * 0.1)}
  x = jnp.asarray(rng.normal(size=(B, D)))
  labels = jnp.asarray(rng.integers(0, C, B))
  return params, x, labels


def term_by_hand(params, x, y, alpha, tau):
  """R = (1−λ̄)/B Σ_{r_i<τ} r_i, r_i = ⟨f(x_i), y_i − softmax f(x_i)⟩, one example at a time."""
  lam_bar = (alpha + 1) / (2 * alpha + 1)
  total = 0.0
  for i in range(x.shape[0]):
    f = x[i] @ params['w'] + params['b']
    p = jnp.exp(f - jnp.max(f)) / jnp.sum(jnp.exp(f - jnp.max(f)))
    r = jnp.dot(f, y[i] - p)
    total = total + jnp.where(r < tau, r, 0.0)
  return (1 - lam_bar) / x.shape[0] * total


@pytest.mark.parametrize('tau', [1.0, -0.5, 100.0])
def test_term_matches_hand_loop(setup, tau):
  params, x, labels = setup
  y = jax.nn.one_hot(labels, C, dtype=jnp.float64)
  logits, _ = linear_apply(params, {}, x, False)
  np.testing.assert_allclose(losses.mixupe_term(logits, y, 2.0, tau),
                             term_by_hand(params, x, y, 2.0, tau), rtol=1e-12)


def test_threshold_excludes_large_residual_products(setup):
  params, x, labels = setup
  y = jax.nn.one_hot(labels, C, dtype=jnp.float64)
  logits, _ = linear_apply(params, {}, x, False)
  assert losses.mixupe_term(logits, y, 2.0, tau=-1e9) == 0.0


def test_objective_value_is_the_mixup_loss_and_gradient_is_rescaled(setup):
  params, x, labels = setup
  eta, alpha, tau = 0.3, 2.0, 1.0       # a large η so the term visibly moves the gradient
  method = objectives.get_method('mixupe', C, mixing={'eta': eta})
  grads, _, metrics = objectives.make_objective(method, linear_apply)(
      params, {}, {'x': x, 'y': labels}, RNG)
  y = jax.nn.one_hot(labels, C, dtype=jnp.float64)
  m = mixing.mixup(jax.random.split(RNG)[0], x, y, alpha=alpha)
  lam = m.lam[:, None].astype(x.dtype)
  xm, ym = lam * x + (1 - lam) * x[m.index_b], lam * y + (1 - lam) * y[m.index_b]

  def l_mix(p):
    f = xm @ p['w'] + p['b']
    return jnp.mean(-jnp.sum(ym * jax.nn.log_softmax(f), -1))

  total = lambda p: l_mix(p) - eta * term_by_hand(p, x, y, alpha, tau)
  scale = jnp.abs(l_mix(params)) / jnp.abs(total(params))
  expected = jax.tree.map(lambda g: scale * g, jax.grad(total)(params))
  np.testing.assert_allclose(metrics['loss'], l_mix(params), rtol=1e-12)
  for key in ('w', 'b'):
    np.testing.assert_allclose(grads[key], expected[key], rtol=1e-10)
  plain, _, _ = objectives.make_objective(objectives.get_method('mixup', C, mixing={'alpha': alpha}),
                                          linear_apply)(params, {}, {'x': x, 'y': labels}, RNG)
  assert not np.allclose(grads['w'], plain['w'])


def test_eta_zero_is_mixup_with_the_same_alpha(setup):
  params, x, labels = setup
  run = lambda name, **o: objectives.make_objective(objectives.get_method(name, C, **o), linear_apply)(
      params, {}, {'x': x, 'y': labels}, RNG)[0]
  a = run('mixupe', mixing={'eta': 0.0})
  b = run('mixup', mixing={'alpha': 2.0})
  for key in ('w', 'b'):
    np.testing.assert_allclose(a[key], b[key], rtol=1e-12)


def test_mixupe_composes_with_sam_and_rejects_a_split():
  method = objectives.get_method('mixupe', C, sharpness=SharpnessRule('sam'))
  assert method.mixing.policy == 'mixupe' and method.sharpness.name == 'sam'
  with pytest.raises(ValueError, match="'mixupe' cannot be combined with partition"):
    objectives.get_method('mixupe', C, partition={'rule': 'binary'})
  with pytest.raises(ValueError, match='mixing.eta must be >= 0'):
    objectives.MixingConfig('mixupe', eta=-1.0)
