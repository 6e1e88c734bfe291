"""Tests for gmix_jax.precision: the cast-survival measure, dithered rounding,
and a bfloat16 SAM step that must not silently equal the ERM step."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from gmix_jax import models, objectives, precision

D, H, C, B = 32, 128, 10, 64
FAST = {'xla_backend_optimization_level': 0}   # tiny programs: compile fast


def bf16_neighbours(v: np.ndarray):
  """The bfloat16 values just below and above |v| (NumPy + ml_dtypes, float64)."""
  a = np.abs(v).astype(np.float64)
  down = a.astype(np.float32).view(np.uint32) & np.uint32(0xFFFF0000)
  down = down.view(np.float32).astype(np.float64)
  up = np.nextafter(down.astype(ml_dtypes.bfloat16), ml_dtypes.bfloat16(np.inf)).astype(np.float64)
  return np.sign(v) * down, np.sign(v) * up


def test_dither_cast_picks_a_neighbour_and_is_unbiased_over_elements():
  rng = np.random.default_rng(0)
  for value in (1.0 + 0.3 * 2**-7, -0.02 - 0.7 * 2**-13, 3.0 + 2**-6 * 0.9):
    v = np.full(200_000, value, np.float32)
    q = np.asarray(precision.dither_cast(jnp.asarray(v)).astype(jnp.float32), np.float64)
    down, up = bf16_neighbours(v)
    assert np.all((q == down) | (q == up))
    frac = (abs(value) - abs(down[0])) / (abs(up[0]) - abs(down[0]))
    # Binomial: the share rounded up is frac ± 4σ, σ = √(f(1-f)/n) ≈ 1e-3.
    np.testing.assert_allclose(np.mean(q == up), frac, atol=5e-3)
  x = rng.normal(size=100_000).astype(np.float32)
  q = np.asarray(precision.dither_cast(jnp.asarray(x)).astype(jnp.float32))
  err, nearest = q - x, x.astype(ml_dtypes.bfloat16).astype(np.float32) - x
  assert abs(err.mean()) < 0.02 * np.sqrt(np.mean(err**2))        # unbiased
  assert np.all(np.abs(err) <= 2 * np.abs(nearest).max())          # within one ulp
  # On the grid it is the identity, like round-to-nearest.
  grid = x.astype(ml_dtypes.bfloat16).astype(np.float32)
  np.testing.assert_array_equal(precision.dither_cast(jnp.asarray(grid)).astype(jnp.float32), grid)


def test_cast_survival_against_a_numpy_computation():
  rng = np.random.default_rng(1)
  params = {'a': rng.normal(size=(40, 30)).astype(np.float32) * 0.05,
            'b': np.ones(30, np.float32)}                       # on the grid: loses ε
  eps = {k: rng.normal(size=v.shape).astype(np.float32) * 1e-4 for k, v in params.items()}
  out = jax.jit(precision.cast_survival)(params, eps)
  cast = lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float64)
  delta = {k: cast(params[k] + eps[k]) - cast(params[k]) for k in params}
  flat = lambda t: np.concatenate([t[k].ravel().astype(np.float64) for k in sorted(t)])
  d, e = flat(delta), flat(eps)
  np.testing.assert_allclose(out['ratio'], np.linalg.norm(d) / np.linalg.norm(e), rtol=1e-5)
  np.testing.assert_allclose(out['aligned'], d @ e / (e @ e), rtol=1e-5)
  np.testing.assert_allclose(out['moved'], np.mean(d != 0), rtol=1e-6)
  np.testing.assert_allclose(out['leaf_ratio'][1], 0.0)
  assert 0 < out['leaf_ratio'][0]


def on_grid_params():
  """Weights in ±(1, 2) exactly representable in bfloat16 (ulp 2^-7; not ±1,
  below which the ulp halves)."""
  rng = np.random.default_rng(2)
  grid = lambda shape: (np.sign(rng.normal(size=shape)) *
                        (1 + rng.integers(1, 128, shape) / 128)).astype(np.float32)
  return {'w1': grid((D, H)), 'w2': grid((H, C))}


def toy_apply(dtype):
  """tanh MLP computing in `dtype`; like a Flax layer, it casts its float32
  params with round-to-nearest."""
  def apply_fn(params, model_state, x, train):
    del train
    w1, w2 = (params[k].astype(dtype) for k in ('w1', 'w2'))
    h = jnp.tanh(x.astype(dtype) @ w1 / np.sqrt(D).astype(dtype))
    return (h @ w2 / np.sqrt(H).astype(dtype)).astype(jnp.float32), model_state
  return apply_fn


def loss_grad(apply_fn, batch):
  """One compiled ∇L for `apply_fn` (so w and w + ε run the same program)."""
  y = jax.nn.one_hot(batch['y'], C)
  def loss(params):
    logits, _ = apply_fn(params, {}, batch['x'], True)
    return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(logits), axis=-1))
  return jax.jit(jax.grad(loss), compiler_options=FAST)


def flat(tree):
  return np.concatenate([np.ravel(v) for v in jax.tree.leaves(tree)]).astype(np.float64)


def cos(a, b):
  return a @ b / np.linalg.norm(a) / np.linalg.norm(b)


def test_bf16_sam_step_differs_from_erm_with_dither_and_tracks_float32():
  """SAM by hand, ∇L(w + ρ g/‖g‖) with g = ∇L(w), for three models: float32,
  bfloat16 with round-to-nearest casts, bfloat16 with dithered casts."""
  params = on_grid_params()
  rng = np.random.default_rng(3)
  batch = {'x': jnp.asarray(rng.normal(size=(B, D)), jnp.float32),
           'y': jnp.asarray(rng.integers(0, C, B))}
  dither_fn = precision.make_apply_fn(toy_apply(jnp.bfloat16), 'dither', jnp.bfloat16)
  fns = {'f32': toy_apply(jnp.float32), 'nearest': toy_apply(jnp.bfloat16), 'dither': dither_fn}
  grads = {k: loss_grad(fn, batch) for k, fn in fns.items()}
  g = {k: grad(params) for k, grad in grads.items()}
  # The largest ρ whose ε stays under half an ulp (2^-8) in every element.
  rho = 0.9 * 2**-8 * min(np.linalg.norm(flat(v)) / np.abs(flat(v)).max() for v in g.values())
  eps = {k: jax.tree.map(lambda u: rho * u / np.linalg.norm(flat(v)), v) for k, v in g.items()}
  g_sam = {k: grads[k](jax.tree.map(jnp.add, params, eps[k])) for k in grads}
  correction = {k: flat(g_sam[k]) - flat(g[k]) for k in grads}
  # Round-to-nearest drops ε entirely: the bf16 SAM step IS the ERM step.
  np.testing.assert_array_equal(flat(g_sam['nearest']), flat(g['nearest']))
  assert float(precision.cast_survival(params, eps['nearest'])['ratio']) == 0.0
  # Dithered rounding keeps it: the correction ∇L(w+ε) − ∇L(w) points where
  # float32's does. A lost ε gives no correction at all; an unrelated vector
  # has cosine ±1/√5376 ≈ ±0.014; bf16 rounding of the gradients (the
  # correction is ~1% of them) and of ε itself keep it from 1.
  assert np.linalg.norm(correction['f32']) > 1e-3 * np.linalg.norm(flat(g['f32']))
  assert cos(correction['dither'], correction['f32']) > 0.3
  assert cos(flat(g_sam['dither']), flat(g_sam['f32'])) > 0.99
  dithered = precision.cast_survival(
      params, eps['dither'], cast=lambda x: precision.dither_params({'x': x})['x'])
  assert abs(float(dithered['aligned']) - 1) < 0.25   # ε survives along itself on average
  # The library's SAM objective through the wrapper takes the same step.
  method = objectives.get_method('sam', C, sharpness={'rho': float(rho)})
  g_obj, _, _ = jax.jit(objectives.make_objective(method, dither_fn), compiler_options=FAST)(
      params, {}, batch, jax.random.key(0))
  assert cos(flat(g_obj) - flat(g['dither']), correction['dither']) > 0.9


def test_wrapper_keeps_mix_points_and_straight_through_gradient():
  module = models.get_model('mlp', 3, dtype='bfloat16', hidden_sizes=(4,))
  apply_fn = models.make_apply_fn(module)
  wrapped = precision.make_apply_fn(apply_fn, 'dither', jnp.bfloat16)
  assert wrapped.mix_points == apply_fn.mix_points
  assert precision.make_apply_fn(apply_fn, 'nearest') is apply_fn
  w = jnp.linspace(-2, 2, 7, dtype=jnp.float32)
  grad = jax.grad(lambda w: jnp.sum(precision.dither_params({'w': w})['w'] * 3.0))(w)
  np.testing.assert_array_equal(grad, np.full(7, 3.0, np.float32))


def test_bad_rounding_and_dtype_are_named():
  with pytest.raises(ValueError, match='model.param_rounding must be one of nearest, dither'):
    precision.make_apply_fn(lambda *a: a, 'stochastic')
  with pytest.raises(ValueError, match="needs model.dtype='bfloat16'"):
    precision.make_apply_fn(lambda *a: a, 'dither', jnp.float32)


def test_config_fields_reach_the_model_and_bad_values_are_named():
  import importlib
  from gmix_jax import configure
  config = importlib.import_module('configs.digits').get_config('sam')
  config.model.dtype = 'bfloat16'
  config.model.param_rounding = 'dither'
  configure.validate_config(config)
  module, apply_fn = configure.build_model(config, num_classes=10)
  assert module.dtype == jnp.bfloat16 and apply_fn.__name__ == 'wrapped'
  assert apply_fn.mix_points == module.mix_points
  config.model.dtype = 'bf16'
  with pytest.raises(ValueError, match=r"model.dtype must be one of \['float32', 'bfloat16', 'float16'\]"):
    configure.validate_config(config)
  config.model.dtype = 'float32'
  with pytest.raises(ValueError, match="model.param_rounding='dither' needs model.dtype='bfloat16'"):
    configure.validate_config(config)
