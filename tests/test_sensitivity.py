"""Per-example sharpness-sensitivity against python loops in float64."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import toy_models as toy
from gmix_jax import losses, sensitivity, sharpness

B = 8


def _setup(dtype=jnp.float32, model='mlp'):
  params = toy.init_mlp(jax.random.PRNGKey(0), dtype)
  x, y = toy.data(jax.random.PRNGKey(1), B, dtype)
  y = losses.as_soft_labels(y, toy.C).astype(dtype)
  if model == 'mlp':
    return toy.mlp_apply, params, {}, x, y
  return toy.bn_apply, params, toy.bn_state(dtype), x, y


def _loop_per_example(apply_fn, params, state, x, y, rho):
  """One example at a time, no vmap: s_i = ℓ_i(w + ρ∇ℓ_i/‖∇ℓ_i‖) − ℓ_i(w)."""
  out = []
  for i in range(x.shape[0]):
    def li(p):
      logits, _ = apply_fn(p, state, x[i:i + 1], False)
      return -jnp.sum(y[i] * jax.nn.log_softmax(logits[0]))
    g = jax.grad(li)(params)
    norm = np.sqrt(sum(float(jnp.sum(v ** 2)) for v in jax.tree.leaves(g)))
    shifted = jax.tree.map(lambda p, gi: p + rho * gi / norm, params, g)
    out.append(float(li(shifted) - li(params)))
  return np.array(out)


@pytest.mark.parametrize('model', ['mlp', 'bn'])
def test_per_example_vmapped_equals_python_loop_float64(x64, model):
  apply_fn, params, state, x, y = _setup(jnp.float64, model)
  s = sensitivity.per_example(apply_fn, params, state, x, y, rho=0.05)
  assert s.dtype == jnp.float64
  np.testing.assert_allclose(s, _loop_per_example(apply_fn, params, state, x, y, 0.05), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('estimator', ['per_example', 'first_order'])
@pytest.mark.parametrize('chunk', [1, 2, 4])
def test_chunked_equals_unchunked(estimator, chunk):
  apply_fn, params, state, x, y = _setup(model='bn')
  fn = getattr(sensitivity, estimator)
  full = jax.jit(lambda p: fn(apply_fn, p, state, x, y, 0.05, 0))(params)
  chunked = jax.jit(lambda p: fn(apply_fn, p, state, x, y, 0.05, chunk))(params)
  np.testing.assert_allclose(chunked, full, rtol=1e-5, atol=1e-7)


def test_chunk_must_divide_batch():
  apply_fn, params, state, x, y = _setup()
  with pytest.raises(ValueError, match='sensitivity.chunk=3 must divide'):
    sensitivity.per_example(apply_fn, params, state, x, y, 0.05, chunk=3)


@pytest.mark.parametrize('estimator', ['per_example', 'first_order'])
def test_score_does_not_depend_on_other_examples(estimator):
  # BatchNorm-like model: train-mode batch statistics would couple the
  # examples; the estimators must use the running statistics.
  apply_fn, params, state, x, y = _setup(model='bn')
  cfg = sensitivity.SensitivityConfig(estimator=estimator)
  s1 = sensitivity.scores(cfg, apply_fn, params, state, x, y, 0.05)
  x2 = x.at[1:].set(jax.random.normal(jax.random.PRNGKey(9), x[1:].shape) * 3.0)
  y2 = y.at[1:].set(jnp.roll(y[1:], 1, axis=-1))
  s2 = sensitivity.scores(cfg, apply_fn, params, state, x2, y2, 0.05)
  np.testing.assert_allclose(s1[0], s2[0], rtol=1e-6)
  assert not np.allclose(s1[1:], s2[1:])


def test_first_order_over_per_example_tends_to_one(x64):
  apply_fn, params, state, x, y = _setup(jnp.float64)
  ratios = []
  for rho in (1e-1, 1e-2, 1e-3, 1e-4):
    ratios.append(np.asarray(sensitivity.first_order(apply_fn, params, state, x, y, rho) /
                             sensitivity.per_example(apply_fn, params, state, x, y, rho)))
  errors = [np.max(np.abs(r - 1)) for r in ratios]
  assert errors[-1] < 1e-3
  assert all(a > b for a, b in zip(errors, errors[1:])), f'error must shrink with ρ: {errors}'


def test_first_order_is_rho_times_gradient_norm_loop(x64):
  apply_fn, params, state, x, y = _setup(jnp.float64)
  s = sensitivity.first_order(apply_fn, params, state, x, y, 0.3)
  for i in range(B):
    g = jax.grad(lambda p: losses.soft_cross_entropy(apply_fn(p, state, x[i:i + 1], False)[0], y[i:i + 1])[0])(params)
    np.testing.assert_allclose(s[i], 0.3 * np.sqrt(sum(float(jnp.sum(v ** 2)) for v in jax.tree.leaves(g))), rtol=1e-10)


def test_shared_uses_one_batch_perturbation(x64):
  apply_fn, params, state, x, y = _setup(jnp.float64)
  rho = 0.1
  per_ex = lambda p: -jnp.sum(y * jax.nn.log_softmax(apply_fn(p, state, x, False)[0]), -1)
  g = jax.grad(lambda p: jnp.mean(per_ex(p)))(params)
  norm = np.sqrt(sum(float(jnp.sum(v ** 2)) for v in jax.tree.leaves(g)))
  shifted = jax.tree.map(lambda p, gi: p + rho * gi / norm, params, g)
  np.testing.assert_allclose(sensitivity.shared(apply_fn, params, state, x, y, rho),
                             per_ex(shifted) - per_ex(params), rtol=1e-10)


def test_scores_are_stop_gradient_and_stale_lookup():
  apply_fn, params, state, x, y = _setup()
  cfg = sensitivity.SensitivityConfig()
  g = jax.grad(lambda p: jnp.sum(sensitivity.scores(cfg, apply_fn, p, state, x, y, 0.05)))(params)
  assert all(float(jnp.max(jnp.abs(v))) == 0.0 for v in jax.tree.leaves(g))
  table = jnp.zeros(20)
  idx = jnp.array([3, 7, 11])
  table = sensitivity.refresh(table, idx, jnp.array([1.0, 2.0, 3.0]))
  np.testing.assert_array_equal(sensitivity.lookup(table, jnp.array([11, 3, 0])), [3.0, 1.0, 0.0])
  stale = sensitivity.scores(sensitivity.SensitivityConfig('stale'), apply_fn, params, state, x, y, 0.05,
                             stale_scores=jnp.arange(B, dtype=jnp.float32))
  np.testing.assert_array_equal(stale, np.arange(B))
  with pytest.raises(ValueError, match="batch\\['score'\\]"):
    sensitivity.scores(sensitivity.SensitivityConfig('stale'), apply_fn, params, state, x, y, 0.05)


def test_config_validation_names_field():
  with pytest.raises(ValueError, match='sensitivity.estimator must be one of'):
    sensitivity.SensitivityConfig('hessian')
  with pytest.raises(ValueError, match='sensitivity.chunk'):
    sensitivity.SensitivityConfig(chunk=-1)
