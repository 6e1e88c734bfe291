"""gmix_jax.analysis against independent computations: numpy eigensolvers on
quadratics, the trust-region closed form for ρ-sharpness, synthetic
predictors with a known calibration error, and explicit filter norms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmix_jax import analysis


def _spd(n, seed=0):
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  # A clear gap between the two largest eigenvalues, so 100 iterations converge.
  lam = np.concatenate([rng.uniform(0.1, 2.0, n - 1), [4.0]])
  return (q * lam) @ q.T


def _quadratic(a):
  a = jnp.asarray(a)
  return lambda p: 0.5 * p['w'] @ a @ p['w'] + 0.0 * jnp.sum(p['b'])


def test_hvp_equals_matrix_vector_product(x64):
  a = _spd(6)
  rng = np.random.default_rng(1)
  w, v = rng.normal(size=6), rng.normal(size=6)
  out = analysis.hvp(_quadratic(a), {'w': jnp.asarray(w), 'b': jnp.zeros(2)},
                     {'w': jnp.asarray(v), 'b': jnp.zeros(2)})
  np.testing.assert_allclose(out['w'], a @ v, rtol=1e-12)
  np.testing.assert_allclose(out['b'], 0.0)


def test_power_iteration_finds_largest_eigenvalue(x64):
  a = _spd(8, seed=2)
  params = {'w': jnp.asarray(np.random.default_rng(3).normal(size=8)), 'b': jnp.zeros(2)}
  res = jax.jit(lambda p, k: analysis.hessian_top_eigenvalue(_quadratic(a), p, k, 100))(
      params, jax.random.PRNGKey(0))
  assert res.trace.shape == (101,)
  np.testing.assert_allclose(float(res.eigenvalue), np.linalg.eigvalsh(a).max(), rtol=1e-8)
  unrolled = analysis.hessian_top_eigenvalue(_quadratic(a), params, jax.random.PRNGKey(0), 100,
                                             unroll=True)
  np.testing.assert_allclose(np.asarray(unrolled.trace), np.asarray(res.trace), rtol=1e-10)
  top = np.linalg.eigh(a)[1][:, -1]
  np.testing.assert_allclose(abs(float(np.dot(res.vector['w'], top))), 1.0, rtol=1e-6)


def _trust_region_max(a, w, rho):
  """max_{‖ε‖≤ρ} εᵀAw + ½εᵀAε (A SPD): ε = (μI − A)⁻¹Aw with μ > λ_max
  chosen by bisection so that ‖ε‖ = ρ (the maximum of a convex function on a
  ball lies on its boundary)."""
  lam, q = np.linalg.eigh(a)
  b = q.T @ (a @ w)
  lo, hi = lam[-1] + 1e-15, lam[-1] + np.linalg.norm(b) / rho + 1.0
  for _ in range(200):
    mu = 0.5 * (lo + hi)
    c = b / (mu - lam)
    lo, hi = (mu, hi) if np.dot(c, c) > rho ** 2 else (lo, mu)
  c = b / (0.5 * (lo + hi) - lam)
  return float(b @ c + 0.5 * c @ (lam * c))


def test_rho_sharpness_on_quadratic_matches_trust_region(x64):
  a = _spd(6, seed=4)
  w = np.random.default_rng(5).normal(size=6)
  params = {'w': jnp.asarray(w), 'b': jnp.zeros(2)}
  rho = 0.3
  exact = _trust_region_max(a, w, rho)
  res = analysis.rho_sharpness(_quadratic(a), params, rho, num_steps=200)
  one_step = analysis.rho_sharpness(_quadratic(a), params, rho, num_steps=0)
  assert float(res.sharpness) <= exact + 1e-10          # a lower bound ...
  np.testing.assert_allclose(float(res.sharpness), exact, rtol=1e-6)   # ... that is tight here
  assert float(one_step.sharpness) <= float(res.sharpness) + 1e-12
  g = a @ w                                               # SAM's one step, by hand
  eps = rho * g / np.linalg.norm(g)
  np.testing.assert_allclose(float(one_step.sharpness), eps @ g + 0.5 * eps @ a @ eps, rtol=1e-10)
  assert float(np.linalg.norm(res.epsilon['w'])) <= rho * (1 + 1e-9)


def test_ece_of_calibrated_predictor_is_near_zero():
  rng = np.random.default_rng(0)
  n, c = 200_000, 4
  logits = rng.normal(size=(n, c)) * 2.0
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  labels = (p.cumsum(1) > rng.uniform(size=(n, 1))).argmax(1)   # y ~ Categorical(p)
  ece = float(analysis.expected_calibration_error(jnp.asarray(logits, jnp.float32),
                                                  jnp.asarray(labels)))
  assert ece < 0.01


def test_ece_of_overconfident_predictor():
  # Confidence 0.9 on every example, right 60 % of the time: ECE = |0.6 − 0.9|.
  n = 1000
  logits = np.zeros((n, 2), np.float32)
  logits[:, 0] = np.log(9.0)                          # softmax = (0.9, 0.1)
  labels = np.where(np.arange(n) < 600, 0, 1)
  ece = float(analysis.expected_calibration_error(jnp.asarray(logits), jnp.asarray(labels)))
  np.testing.assert_allclose(ece, 0.3, atol=1e-5)


def test_filter_normalized_direction_has_weight_filter_norms():
  rng = np.random.default_rng(0)
  params = {'conv': {'kernel': jnp.asarray(rng.normal(size=(3, 3, 2, 5)), jnp.float32),
                     'bias': jnp.ones(5)},
            'dense': {'kernel': jnp.asarray(rng.normal(size=(7, 4)), jnp.float32)},
            'bn': {'scale': jnp.ones(4)}}
  d = analysis.filter_normalized_direction(jax.random.PRNGKey(0), params)
  for name in ('conv', 'dense'):
    k, dk = np.asarray(params[name]['kernel']), np.asarray(d[name]['kernel'])
    for f in range(k.shape[-1]):                       # a filter = one output unit
      np.testing.assert_allclose(np.linalg.norm(dk[..., f]), np.linalg.norm(k[..., f]), rtol=1e-5)
  assert not np.any(np.asarray(d['conv']['bias'])) and not np.any(np.asarray(d['bn']['scale']))
  d1 = analysis.filter_normalized_direction(jax.random.PRNGKey(0), params, ignore_1d=False)
  np.testing.assert_allclose(np.linalg.norm(d1['conv']['bias']), np.linalg.norm(params['conv']['bias']),
                             rtol=1e-5)


def _toy_model():
  def apply_fn(params, model_state, x, train):
    del train
    return jnp.tanh(x @ params['w1']) @ params['w2'] + params['b'], model_state
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  params = {'w1': jax.random.normal(k[0], (5, 8)), 'w2': jax.random.normal(k[1], (8, 3)),
            'b': jnp.zeros(3)}
  x = np.asarray(jax.random.normal(k[2], (50, 5)))
  y = np.asarray(jax.random.randint(k[3], (50,), 0, 3))
  return apply_fn, params, x, y


def test_landscape_at_origin_equals_loss_and_batching_is_exact():
  apply_fn, params, x, y = _toy_model()
  logits, _ = apply_fn(params, {}, x, False)
  ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(y)[:, None], 1).mean()
  data = analysis.make_eval_set(x, y, 3, batch_size=16)      # 50 rows -> 4 batches, 14 padded
  loss_fn = analysis.make_loss_fn(apply_fn, {}, data)
  np.testing.assert_allclose(float(loss_fn(params)), float(ce), rtol=1e-6)
  d1 = analysis.filter_normalized_direction(jax.random.PRNGKey(1), params)
  d2 = analysis.filter_normalized_direction(jax.random.PRNGKey(2), params)
  line = analysis.landscape_1d(loss_fn, params, d1, jnp.array([-0.5, 0.0, 0.5]))
  grid = analysis.landscape_2d(loss_fn, params, d1, d2, jnp.array([0.0, 0.5]),
                               jnp.array([-0.5, 0.0]))
  np.testing.assert_allclose(float(line[1]), float(ce), rtol=1e-6)
  np.testing.assert_allclose(float(grid[0, 1]), float(ce), rtol=1e-6)
  np.testing.assert_allclose(float(grid[1, 1]), float(line[2]), rtol=1e-6)   # β = 0 is the 1-D cut
  moved = jax.tree.map(lambda w, d: w + 0.5 * d, params, d1)
  np.testing.assert_allclose(float(line[2]), float(loss_fn(moved)), rtol=1e-6)


def test_analyse_reports_consistent_numbers():
  apply_fn, params, x, y = _toy_model()
  out = analysis.analyse(apply_fn, params, {}, x, y, 3, batch_size=16, power_iters=5,
                         ascent_steps=2)
  logits, _ = apply_fn(params, {}, x, False)
  np.testing.assert_allclose(out['accuracy'], float(np.mean(np.argmax(logits, 1) == y)), rtol=1e-6)
  assert len(out['lambda_trace']) == 6 and out['lambda_trace'][-1] == pytest.approx(out['lambda_max'])
  assert out['rho_sharpness'] >= 0.0 and out['lambda_max'] > 0.0
