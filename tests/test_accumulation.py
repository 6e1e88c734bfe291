"""Gradient accumulation (docs/methods.md § 6): K micro-batches give K = 1's update.

For the toy MLP (no BatchNorm) in float64, the objective's gradient, loss
and one optimizer step with K = 4 equal K = 1 (rtol 1e-10) for every
method family. The comparison can tell a wrong sweep apart: one ε per
micro-batch (what a naive per-micro-batch SAM does) is m-sharpness with
m = B/K, and it differs from K = 1 by far more than the tolerance.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fast_compile
import toy_models as toy
from gmix_jax import accumulation, objectives, partition
from gmix_jax.sensitivity import SensitivityConfig
from gmix_jax.sharpness import SharpnessRule

B, K = 16, 4
TOL = dict(rtol=1e-10, atol=1e-12)

CASES = {
    'erm': ('erm', {}),
    'mixup': ('mixup', {}),
    'sam': ('sam', dict(sharpness={'rho': 0.5})),
    'gsam': ('gsam', dict(sharpness={'rho': 0.5, 'gsam_alpha': 0.5})),
    'gmix': ('gmix', dict(sharpness={'rho': 0.5})),
    'bgmix_shared': ('bgmix', dict(sharpness={'rho': 0.5})),
    'bgmix_per_example': ('bgmix', dict(sensitivity=SensitivityConfig('per_example'))),
    'dgmix': ('dgmix', dict(sharpness={'rho': 0.5})),
    # MixupE with SAM: the whole-batch rescaling inside both sweeps.
    'mixupe_sam': ('mixupe', dict(mixing={'eta': 0.5}, sharpness=SharpnessRule('sam', 0.5))),
    # m-sharpness groups of 4 rows inside micro-batches of 4.
    'sam_m4': ('sam', dict(sharpness={'rho': 0.5, 'm': B // K})),
}
# (ASAM and ESAM share SAM's sweep; each further case costs two compilations.)


def inputs():
  params = toy.init_mlp(jax.random.PRNGKey(0), jnp.float64)
  x, y = toy.data(jax.random.PRNGKey(1), B, jnp.float64)
  return params, {'x': x, 'y': y}


@functools.lru_cache(maxsize=None)
def compiled(method, k):
  """The objective with K = ``k``, compiled once for ``inputs()`` with
  ``fast_compile.options()`` (K = 4 and K = 1 are compared with each other, at
  the same options; the 1e-10 agreement does not depend on them)."""
  params, batch = inputs()
  fn = jax.jit(objectives.make_objective(method, toy.mlp_apply, accumulation_steps=k))
  return fn.lower(params, {}, batch, jax.random.PRNGKey(2)).compile(
      fast_compile.options())


def run(method, k, batch=None):
  params, default = inputs()
  if batch is None:
    return compiled(method, k)(params, {}, default, jax.random.PRNGKey(2))
  fn = jax.jit(objectives.make_objective(method, toy.mlp_apply, accumulation_steps=k))
  return fn(params, {}, batch, jax.random.PRNGKey(2))


@jax.jit
def sgd_step(params, grads):
  opt = optax.sgd(0.1, momentum=0.9)
  return optax.apply_updates(params, opt.update(grads, opt.init(params), params)[0])


def rel_diff(a, b):
  a, b = (np.concatenate([np.ravel(l) for l in jax.tree.leaves(t)]) for t in (a, b))
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def assert_close(a, b):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, **TOL), a, b)


def method_of(name):
  preset, overrides = CASES[name]
  return objectives.get_method(preset, toy.C, **overrides)


@pytest.mark.slow
@pytest.mark.parametrize('name', list(CASES))
def test_k4_equals_k1(x64, name):
  g1, _, m1 = run(method_of(name), 1)
  g4, _, m4 = run(method_of(name), K)
  assert g1['w1'].dtype == np.float64
  assert_close(g4, g1)
  assert_close(m4, m1)
  params, _ = inputs()
  assert_close(sgd_step(params, g4), sgd_step(params, g1))


def test_one_eps_per_micro_batch_would_fail(x64):
  """ε per micro-batch of B/K rows is m-sharpness with m = B/K (both compiled
  above): it differs from K = 1 by far more than the tolerance."""
  g1, _, _ = run(method_of('sam'), 1)
  g_bad, _, _ = run(method_of('sam_m4'), 1)
  assert rel_diff(g_bad, g1) > 1e-3


@pytest.mark.slow
def test_batchnorm_state_averages_the_micro_batches(x64):
  """Documented exception: batch statistics per micro-batch, running ones averaged."""
  method = objectives.get_method('erm', toy.C)
  x, y = toy.data(jax.random.PRNGKey(1), B, jnp.float64)
  params = toy.init_mlp(jax.random.PRNGKey(0), jnp.float64)
  state = toy.bn_state(jnp.float64)
  _, new_state, _ = objectives.make_objective(method, toy.bn_apply, accumulation_steps=2)(
      params, state, {'x': x, 'y': y}, jax.random.PRNGKey(2))
  halves = [toy.bn_apply(params, state, x[i * B // 2:(i + 1) * B // 2], True)[1]['mean']
            for i in range(2)]
  np.testing.assert_allclose(new_state['mean'], (halves[0] + halves[1]) / 2, **TOL)


@pytest.mark.parametrize('preset,overrides', [
    ('gmix', {}), ('multimix', {}), ('bgmix', {}), ('bgmix', dict(partition={'gamma': 0.25})),
    ('bgmix', dict(partition={'bgmix_rule': 'sam_on_sensitive', 'gamma': 0.25})),
    ('bgmix', dict(partition={'bgmix_rule': 'pair_within_subsets'})),
    ('dgmix', dict(partition={'gamma': 0.25, 'mix_subset': 'insensitive'})),
    ('dgmix', dict(partition={'gamma': 0.0})),
])
def test_part_rows_match_the_built_parts(preset, overrides):
  method = objectives.get_method(preset, toy.C, **overrides)
  x, y = toy.data(jax.random.PRNGKey(1), B)
  scores = jax.random.normal(jax.random.PRNGKey(3), (B,))
  split = (None if method.partition.rule == 'none' else
           partition.top_k_split(scores, partition.num_sensitive(method.partition.gamma, B)))
  parts = objectives._build_parts(method, method.mixing.make_policy(), x,
                                  jax.nn.one_hot(y, toy.C), split, jax.random.PRNGKey(4))
  assert tuple(p.x.shape[0] for p in parts) == method.part_rows(B)


def test_validation_errors():
  with pytest.raises(ValueError, match=r'accumulation_steps=3 must divide the per-device batch 16; '
                                       r'allowed: \[1, 2, 4, 8, 16\]'):
    objectives.get_method('sam', toy.C).check_batch(16, 3)
  dg = objectives.get_method('dgmix', toy.C, partition={'gamma': 0.25})
  dg.check_batch(16, 4)
  with pytest.raises(ValueError, match=r'accumulation_steps=8 must divide the rows of each part '
                                       r'\[4, 12\].*allowed: \[1, 2, 4\]'):
    dg.check_batch(16, 8)
  objectives.get_method('sam', toy.C, sharpness={'m': 4}).check_batch(16, 4)
  with pytest.raises(ValueError, match=r'sharpness.m=8 must divide the rows per micro-batch \(4'):
    objectives.get_method('sam', toy.C, sharpness={'m': 8}).check_batch(16, 4)
  with pytest.raises(ValueError, match=r"accumulation_steps=2 cannot be combined with "
                                       r"mixing.policy='manifold'"):
    objectives.get_method('manifold_mixup', toy.C).check_batch(16, 2)
  for bad in (0, -1, 1.5, True, '2'):
    with pytest.raises(ValueError, match='accumulation_steps must be an int >= 1'):
      objectives.make_objective(objectives.get_method('erm', toy.C), toy.mlp_apply,
                                accumulation_steps=bad)
  # The objective checks before tracing anything else.
  with pytest.raises(ValueError, match='accumulation_steps=4 must divide'):
    run(objectives.get_method('erm', toy.C), K, {'x': jnp.zeros((6, toy.D_IN)),
                                                'y': jnp.zeros((6,), jnp.int32)})


def test_accumulate_sums_and_stacks():
  rows = jnp.arange(12.0).reshape(6, 2)
  total, kept = accumulation.accumulate(lambda r: (jnp.sum(r), r[:, 0]), rows, 3)
  np.testing.assert_allclose(total, jnp.sum(rows))
  np.testing.assert_allclose(kept, rows[:, 0].reshape(3, 2))


def test_config_field_is_validated():
  from configs import mnist_subset
  from gmix_jax import configure
  config = mnist_subset.get_config('gmix')
  assert config.accumulation_steps == 1
  config.accumulation_steps = 4
  configure.validate_config(config)
  for bad, match in ((0, 'accumulation_steps must be an int >= 1'),
                     (3, r'accumulation_steps=3 must divide the per-device batch')):
    config.accumulation_steps = bad
    with pytest.raises(ValueError, match=match):
      configure.validate_config(config)
  samix_config = mnist_subset.get_config('samix')
  samix_config.accumulation_steps = 2
  with pytest.raises(ValueError, match="accumulation_steps=2 applies to the composed methods"):
    configure.validate_config(samix_config)


@pytest.mark.slow
def test_k2_equals_k1_under_shard_map(x64):
  """On 8 devices (the scan carry is device-varying there), with global m."""
  from gmix_jax import parallel
  method = objectives.get_method('bgmix', toy.C, sharpness={'rho': 0.5, 'm': 'global'})
  x, y = toy.data(jax.random.PRNGKey(1), 8 * B, jnp.float64)
  opt = optax.sgd(0.1)
  mesh = parallel.make_mesh(8, 'batch')
  out = []
  for k in (1, 2):
    objective = objectives.make_objective(method, toy.mlp_apply, axis_name='batch',
                                          accumulation_steps=k)
    step = parallel.shard_map_step(parallel.make_per_device_step(objective, opt), mesh)
    state = parallel.create_train_state(toy.init_mlp(jax.random.PRNGKey(0), jnp.float64), {},
                                        opt, rng_seed=0)
    out.append(step(parallel.replicate_on_mesh(state, mesh), {'x': x, 'y': y})[0].params)
  assert_close(out[1], out[0])


def test_fallback_without_vma_typing(x64, monkeypatch):
  """Where JAX does not expose the varying type, the first micro-batch starts the sums."""
  from gmix_jax import vma
  g1, _, _ = run(method_of('sam'), 1)
  monkeypatch.setattr(vma, 'union', lambda tree: None)
  params, batch = inputs()
  objective = objectives.make_objective(method_of('sam'), toy.mlp_apply, accumulation_steps=K)
  g4, _, _ = jax.jit(objective)(params, {}, batch, jax.random.PRNGKey(2))
  assert_close(g4, g1)
