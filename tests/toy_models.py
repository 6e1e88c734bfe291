"""Tiny pure-JAX models with the library's apply_fn contract, for core tests.

The core never imports Flax, so its tests use models written here by hand:
an MLP without state (with Manifold Mixup points: 0 = input, 1 = hidden), and
a model with a BatchNorm-like running mean that couples examples in train
mode (to test the model-state rules; it has no mixing points).
"""
import jax
import jax.numpy as jnp

D_IN, HIDDEN, C = 6, 7, 4


def init_mlp(key, dtype=jnp.float32):
  k1, k2 = jax.random.split(key)
  return {'w1': (jax.random.normal(k1, (D_IN, HIDDEN)) / jnp.sqrt(D_IN)).astype(dtype),
          'b1': jnp.zeros((HIDDEN,), dtype),
          'w2': (jax.random.normal(k2, (HIDDEN, C)) / jnp.sqrt(HIDDEN)).astype(dtype),
          'b2': jnp.zeros((C,), dtype)}


def mlp_apply(params, model_state, x, train, mix=None):
  del train
  mix = mix or (lambda j, h: h)
  h = jnp.tanh(mix(0, x.reshape(x.shape[0], -1)) @ params['w1'] + params['b1'])
  return mix(1, h) @ params['w2'] + params['b2'], model_state


mlp_apply.mix_points = 2


MOMENTUM = 0.9


def bn_apply(params, model_state, x, train):
  """MLP whose hidden layer is centred by the batch mean (train) or the running mean."""
  h = x.reshape(x.shape[0], -1) @ params['w1'] + params['b1']
  if train:
    mean = jnp.mean(h, axis=0)
    new_state = {'mean': MOMENTUM * model_state['mean'] + (1 - MOMENTUM) * mean}
  else:
    mean, new_state = model_state['mean'], model_state
  return jnp.tanh(h - mean) @ params['w2'] + params['b2'], new_state


def bn_state(dtype=jnp.float32):
  return {'mean': jnp.full((HIDDEN,), 0.1, dtype)}


def data(key, b, dtype=jnp.float32):
  kx, ky = jax.random.split(key)
  x = jax.random.normal(kx, (b, D_IN)).astype(dtype)
  y = jax.random.randint(ky, (b,), 0, C)
  return x, y
