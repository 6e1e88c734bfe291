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


def _reference_asam_eps(named_params, named_grads, rho, eta):
  """Transcription of the authors' ASAM ascent step (SamsungLabs/ASAM, asam.py) in numpy.

  For each parameter n: if 'weight' in n, T = |p| + η and grad ← grad·T; the norm is
  ‖(‖grad_n‖)_n‖ + 1e-16; then for 'weight' params grad ← grad·T again; ε = ρ·grad/norm.
  """
  t = {n: np.abs(p) + eta for n, p in named_params.items() if 'weight' in n}
  g = {n: named_grads[n] * t[n] if n in t else named_grads[n].copy() for n in named_grads}
  norm = np.linalg.norm([np.linalg.norm(v) for v in g.values()]) + 1e-16
  g = {n: v * t[n] if n in t else v for n, v in g.items()}
  return {n: rho * v / norm for n, v in g.items()}


def _torch_names(tree):
  """{'Conv_0/kernel': …} -> {'Conv_0.weight': …}: Flax kernel/scale are PyTorch's weight."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  out = {}
  for path, leaf in flat:
    keys = [k.key for k in path]
    name = {'kernel': 'weight', 'scale': 'weight'}.get(keys[-1], keys[-1])
    out['.'.join(keys[:-1] + [name])] = np.asarray(leaf, np.float64)
  return out


def test_asam_default_leaves_biases_unscaled_as_the_reference(x64):
  from gmix_jax import models
  module = models.get_model('cnn', num_classes=3)
  x = jnp.asarray(RNG.normal(size=(4, 8, 8, 1)))
  variables = module.init(jax.random.PRNGKey(0), x, train=False)
  params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), variables["params"])
  # Biases at exactly 0 (as at init) are where the two rules differ most.
  grads = jax.tree.map(lambda v: jnp.asarray(RNG.normal(size=v.shape)), params)
  rho, eta = 0.5, 0.01
  eps = sharpness.asam_perturbation(grads, params, rho, eta)
  want = _reference_asam_eps(_torch_names(params), _torch_names(grads), rho, eta)
  got = _torch_names(eps)
  assert any(n.endswith('bias') for n in got) and any(n.endswith('weight') for n in got)
  for n in want:
    np.testing.assert_allclose(got[n], want[n], rtol=1e-9, atol=1e-15, err_msg=n)
  # The rule object and the transform default to the same reading.
  rule = SharpnessRule('asam', rho=rho, asam_eta=eta)
  for a, b in zip(jax.tree.leaves(sharpness.perturbation(rule, grads, params)),
                  jax.tree.leaves(eps)):
    np.testing.assert_allclose(a, b, rtol=1e-12)


def test_asam_scaled_biases_knob_scales_every_leaf(x64):
  params = {'dense': {'kernel': jnp.asarray(RNG.normal(size=(3, 2))), 'bias': jnp.zeros(2)}}
  grads = jax.tree.map(lambda v: jnp.asarray(RNG.normal(size=v.shape)), params)
  eps = sharpness.asam_perturbation(grads, params, 0.5, 0.01, biases='scaled')
  t = jax.tree.map(lambda w: np.abs(np.asarray(w)) + 0.01, params)
  tg = jax.tree.map(lambda ti, g: ti * np.asarray(g), t, grads)
  norm = np.sqrt(sum(np.sum(v ** 2) for v in jax.tree.leaves(tg)))
  for got, ti, g in zip(jax.tree.leaves(eps), jax.tree.leaves(t), jax.tree.leaves(grads)):
    np.testing.assert_allclose(got, 0.5 * ti * ti * np.asarray(g) / norm, rtol=1e-10)
  with pytest.raises(ValueError, match='asam_biases must be one of'):
    SharpnessRule('asam', asam_biases='some')
