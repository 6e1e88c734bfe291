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


def mixed_by_hand(x, labels, alpha):
  """The objective's mixup draw (same key split), mixed by hand: (y, x̃, ỹ)."""
  y = jax.nn.one_hot(labels, C, dtype=jnp.float64)
  m = mixing.mixup(jax.random.split(RNG)[0], x, y, alpha=alpha)
  lam = m.lam[:, None].astype(x.dtype)
  return y, lam * x + (1 - lam) * x[m.index_b], lam * y + (1 - lam) * y[m.index_b]


def test_objective_value_is_the_mixup_loss_and_gradient_is_rescaled(setup):
  params, x, labels = setup
  eta, alpha, tau = 0.3, 2.0, 1.0       # a large η so the term visibly moves the gradient
  method = objectives.get_method('mixupe', C, mixing={'eta': eta})
  grads, _, metrics = objectives.make_objective(method, linear_apply)(
      params, {}, {'x': x, 'y': labels}, RNG)
  y, xm, ym = mixed_by_hand(x, labels, alpha)

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


# -- Version 1: the directional-derivative term ------------------------------------------
def tanh_apply(params, model_state, x, train):
  """A non-linear model, so finite differences test more than linearity."""
  del train
  return jnp.tanh(x @ params['w']) @ params['v'] + params['b'], model_state


def term_v1_by_finite_differences(apply_fn, params, x, y, alpha, tau, h=1e-5):
  """R₁ = (1−λ̄)/B Σ_{r_i<τ} r_i with r_i = ⟨(f(x_i+hδ_i) − f(x_i−hδ_i))/2h, p_i − y_i⟩,
  δ_i = x̄ − x_i: central differences, one example at a time."""
  lam_bar = (alpha + 1) / (2 * alpha + 1)
  x_bar = np.mean(np.asarray(x), axis=0)
  total = 0.0
  for i in range(x.shape[0]):
    xi, delta = x[i:i + 1], x_bar[None] - x[i:i + 1]
    f = apply_fn(params, {}, xi, False)[0][0]
    df = (apply_fn(params, {}, xi + h * delta, False)[0][0] -
          apply_fn(params, {}, xi - h * delta, False)[0][0]) / (2 * h)
    r = float(jnp.dot(df, jax.nn.softmax(f) - y[i]))
    total += r if r < tau else 0.0
  return (1 - lam_bar) / x.shape[0] * total


def v1_objective_term(apply_fn, params, x, y, alpha, tau):
  """The library's R₁ exactly as the objective forms it (jvp along x̄ − x)."""
  delta = jnp.mean(x, axis=0, keepdims=True) - x
  logits, jd = jax.jvp(lambda v: apply_fn(params, {}, v, True)[0], (x,), (delta,))
  return losses.mixupe_term_v1(logits, jd, y, alpha, tau)


@pytest.mark.parametrize('model', ['linear', 'tanh'])
@pytest.mark.parametrize('tau', [1.0, 0.0, 100.0])
def test_v1_term_matches_finite_differences(setup, model, tau):
  params, x, labels = setup
  y = jax.nn.one_hot(labels, C, dtype=jnp.float64)
  apply_fn = linear_apply
  if model == 'tanh':
    rng = np.random.default_rng(1)
    params = {'w': jnp.asarray(rng.normal(size=(D, 6))), 'v': jnp.asarray(rng.normal(size=(6, C))),
              'b': params['b']}
    apply_fn = tanh_apply
  expected = term_v1_by_finite_differences(apply_fn, params, x, y, 2.0, tau)
  got = v1_objective_term(apply_fn, params, x, y, 2.0, tau)
  np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-12)
  if tau == 100.0:
    assert got != 0.0


def test_v1_term_equals_the_official_double_backprop(setup):
  """Official form: r_i = ⟨∇_x Σ_c f_c(x_i) b_ic, δ_i⟩, b = sg(p − y), by jax.grad."""
  params, x, labels = setup
  rng = np.random.default_rng(1)
  params = {'w': jnp.asarray(rng.normal(size=(D, 6))), 'v': jnp.asarray(rng.normal(size=(6, C))),
            'b': params['b']}
  y = jax.nn.one_hot(labels, C, dtype=jnp.float64)
  f = tanh_apply(params, {}, x, False)[0]
  b = jax.nn.softmax(f) - y
  grad_x = jax.grad(lambda v: jnp.sum(tanh_apply(params, {}, v, False)[0] * b))(x)
  r = jnp.sum(grad_x * (jnp.mean(x, 0) - x), axis=1)
  expected = (1 - 3 / 5) / B * jnp.sum(jnp.where(r < 1.0, r, 0.0))
  np.testing.assert_allclose(v1_objective_term(tanh_apply, params, x, y, 2.0, 1.0), expected,
                             rtol=1e-12)


def test_v1_objective_against_the_closed_form_on_a_linear_model(setup):
  """f = xW + b: J_f δ = δW, so L = L_mix + η(1−λ̄)/B Σ_{r<τ} (δ_i W)·sg(p_i − y_i), rescaled."""
  params, x, labels = setup
  eta, alpha, tau = 0.3, 2.0, 100.0
  method = objectives.get_method('mixupe_v1', C, mixing={'eta': eta, 'tau': tau})
  grads, _, metrics = objectives.make_objective(method, linear_apply)(
      params, {}, {'x': x, 'y': labels}, RNG)
  y, xm, ym = mixed_by_hand(x, labels, alpha)
  delta = jnp.mean(x, 0) - x

  def l_mix(p):
    return jnp.mean(-jnp.sum(ym * jax.nn.log_softmax(xm @ p['w'] + p['b']), -1))

  def r1(p):
    resid = jax.lax.stop_gradient(jax.nn.softmax(x @ p['w'] + p['b']) - y)
    r = jnp.sum((delta @ p['w']) * resid, axis=1)
    return (1 - 3 / 5) / B * jnp.sum(jnp.where(r < tau, r, 0.0))

  total = lambda p: l_mix(p) + eta * r1(p)
  scale = jnp.abs(l_mix(params)) / jnp.abs(total(params))
  expected = jax.tree.map(lambda g: scale * g, jax.grad(total)(params))
  np.testing.assert_allclose(metrics['loss'], l_mix(params), rtol=1e-12)
  for key in ('w', 'b'):
    np.testing.assert_allclose(grads[key], expected[key], rtol=1e-10, atol=1e-14)
  assert np.all(expected['b'] == scale * jax.grad(l_mix)(params)['b'])   # δW has no b
  assert not np.allclose(grads['w'], scale * jax.grad(l_mix)(params)['w'])


def test_v1_composes_with_sam_and_bad_versions_are_rejected():
  assert objectives.get_method('mixupe_v1', C, sharpness=SharpnessRule('sam')).mixing.mixupe_version == 1
  with pytest.raises(ValueError, match=r'mixing.mixupe_version must be one of \(1, 3\)'):
    objectives.MixingConfig('mixupe', mixupe_version=2)
  with pytest.raises(ValueError, match="mixing.mixupe_version=1 needs mixing.policy='mixupe'"):
    objectives.get_method('mixup', C, mixing={'mixupe_version': 1})
