"""Sharpness math against closed forms on a quadratic, in float64 numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmix_jax import sharpness
from gmix_jax.sharpness import SharpnessRule

RNG = np.random.default_rng(0)
M = RNG.normal(size=(5, 5))
A = M @ M.T + np.eye(5)          # symmetric positive definite
BVEC = RNG.normal(size=5)
W0 = RNG.normal(size=5)


def quad_loss(params):
  """L(w) = ½ wᵀAw + bᵀw on a pytree {'a': w[:2], 'b': w[2:]}."""
  w = jnp.concatenate([params['a'], params['b']])
  return 0.5 * w @ jnp.asarray(A) @ w + jnp.asarray(BVEC) @ w


def tree(w):
  return {'a': jnp.asarray(w[:2]), 'b': jnp.asarray(w[2:])}


def flat(t):
  return np.concatenate([np.asarray(t['a']), np.asarray(t['b'])])


def run_rule(rule, w=W0, rho=None, rng=None):
  params = tree(w)
  grads = jax.grad(quad_loss)(params)
  grad_fn = lambda p: (jax.grad(quad_loss)(p), None)
  out, _ = sharpness.sharpness_gradient(rule, grad_fn, params, grads, rng=rng, rho=rho)
  return flat(out)


def test_global_norm_and_normalize(x64):
  t = tree(W0)
  np.testing.assert_allclose(sharpness.global_norm(t), np.linalg.norm(W0), rtol=1e-12)
  np.testing.assert_allclose(flat(sharpness.normalize(t)), W0 / np.linalg.norm(W0), rtol=1e-12)
  zero = sharpness.normalize(tree(np.zeros(5)))
  assert np.all(flat(zero) == 0.0), 'a zero vector normalises to zero, not NaN'


@pytest.mark.parametrize('name', ['sam', 'asam', 'gsam', 'esam'])
def test_rho_zero_gives_plain_gradient(x64, name):
  g = A @ W0 + BVEC
  out = run_rule(SharpnessRule(name, rho=0.0, esam_beta=1.0), rng=jax.random.PRNGKey(0))
  np.testing.assert_allclose(out, g, rtol=1e-12)


def test_sam_on_quadratic_matches_closed_form(x64):
  rho = 0.3
  g = A @ W0 + BVEC
  expected = A @ (W0 + rho * g / np.linalg.norm(g)) + BVEC   # ∇L(w + ρ g/‖g‖)
  np.testing.assert_allclose(run_rule(SharpnessRule('sam', rho=rho)), expected, rtol=1e-10)


def test_asam_on_quadratic_matches_closed_form(x64):
  rho, eta = 0.5, 0.01
  g = A @ W0 + BVEC
  t = np.abs(W0) + eta
  eps = rho * t * t * g / np.linalg.norm(t * g)
  expected = A @ (W0 + eps) + BVEC
  np.testing.assert_allclose(run_rule(SharpnessRule('asam', rho=rho, asam_eta=eta)), expected, rtol=1e-10)


def test_asam_with_unit_t_is_sam(x64):
  # T = |w| + η ≡ 1 when w = 0 and η = 1.
  w = np.zeros(5)
  np.testing.assert_allclose(run_rule(SharpnessRule('asam', rho=0.2, asam_eta=1.0), w=w),
                             run_rule(SharpnessRule('sam', rho=0.2), w=w), rtol=1e-12)


def test_gsam_matches_projection_and_alpha_zero_is_sam(x64):
  rho, alpha = 0.3, 0.4
  g = A @ W0 + BVEC
  gp = A @ (W0 + rho * g / np.linalg.norm(g)) + BVEC
  g_perp = g - (g @ gp) / (gp @ gp) * gp
  assert abs(g_perp @ gp) < 1e-9
  np.testing.assert_allclose(run_rule(SharpnessRule('gsam', rho=rho, gsam_alpha=alpha)),
                             gp - alpha * g_perp, rtol=1e-10)
  np.testing.assert_allclose(run_rule(SharpnessRule('gsam', rho=rho, gsam_alpha=0.0)),
                             run_rule(SharpnessRule('sam', rho=rho)), rtol=1e-12)


def test_esam_beta_one_is_sam_and_mask_is_per_tensor(x64):
  rho = 0.3
  np.testing.assert_allclose(run_rule(SharpnessRule('esam', rho=rho, esam_beta=1.0), rng=jax.random.PRNGKey(1)),
                             run_rule(SharpnessRule('sam', rho=rho)), rtol=1e-12)
  g = tree(A @ W0 + BVEC)
  beta = 0.5
  seen = set()
  for seed in range(16):
    eps = sharpness.esam_swp_perturbation(jax.random.PRNGKey(seed), g, rho, beta)
    kept = {k: bool(np.any(np.asarray(eps[k]) != 0)) for k in ('a', 'b')}
    seen.add(tuple(kept.values()))
    gk = np.concatenate([np.asarray(g[k]) * kept[k] for k in ('a', 'b')])
    expected = rho / beta * gk / (np.linalg.norm(gk) + sharpness.EPS_NORM)
    np.testing.assert_allclose(flat(eps), expected, rtol=1e-10, atol=1e-15)
  assert len(seen) >= 3, 'different seeds keep different tensors'


@pytest.mark.parametrize('name', ['sam', 'asam', 'gsam', 'esam'])
def test_zero_gradient_gives_finite_results(name):
  # At the minimiser w* = −A⁻¹b the gradient is exactly zero.
  params = {'a': jnp.zeros(2), 'b': jnp.zeros(3)}
  zero = jax.tree.map(jnp.zeros_like, params)
  out, _ = sharpness.sharpness_gradient(SharpnessRule(name), lambda p: (zero, None), params, zero,
                                        rng=jax.random.PRNGKey(0))
  assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(out))
  eps = sharpness.perturbation(SharpnessRule(name), zero, params, jax.random.PRNGKey(0))
  assert all(bool(jnp.all(v == 0)) for v in jax.tree.leaves(eps))


def test_global_ascent_averages_before_perturbing(x64):
  # Under pmap with 'global' m, every device perturbs with the mean gradient
  # and returns the mean perturbed gradient (every quantity global).
  n = 4
  ws = np.stack([W0 + 0.1 * i for i in range(n)])       # per-device "data" shifts the gradient
  def per_device(shift):
    params = tree(W0)
    loss = lambda p: quad_loss(p) + jnp.concatenate([p['a'], p['b']]) @ shift
    grads = jax.grad(loss)(params)
    out, _ = sharpness.sharpness_gradient(SharpnessRule('sam', rho=0.2, m='global'),
                                          lambda p: (jax.grad(loss)(p), None), params, grads,
                                          axis_name='d')
    return jnp.concatenate([out['a'], out['b']])
  out = jax.pmap(per_device, axis_name='d', devices=jax.devices()[:n])(jnp.asarray(ws))
  g_mean = A @ W0 + BVEC + ws.mean(0)
  eps = 0.2 * g_mean / np.linalg.norm(g_mean)
  for i in range(n):
    np.testing.assert_allclose(out[i], A @ (W0 + eps) + BVEC + ws.mean(0), rtol=1e-10)


def test_rule_validation_names_field():
  with pytest.raises(ValueError, match='sharpness.rule must be one of'):
    SharpnessRule('adam')
  with pytest.raises(ValueError, match='sharpness.rho'):
    SharpnessRule('sam', rho=-0.1)
  with pytest.raises(ValueError, match='sharpness.m'):
    SharpnessRule('sam', m=0)
  with pytest.raises(ValueError, match='esam_beta'):
    SharpnessRule('esam', esam_beta=0.0)
  assert SharpnessRule('asam').radius == 0.5 and SharpnessRule('sam').radius == 0.05
