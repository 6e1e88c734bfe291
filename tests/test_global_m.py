"""Global m-sharpness never depends on the device count (docs/methods.md § 2).

With ``sharpness.m='global'`` (objectives) or ``global_ascent=True`` (the
Optax transforms) every quantity of the rule is the global one, so a few
steps on the same global batch give the same parameters on 8 devices as on
1 device, for SAM, ASAM, GSAM and ESAM, in float64 (tolerance 1e-10; the
per-device decomposition of GSAM and per-device ESAM masks differed by
~1e-3). Also: the transforms under shard_map need device-varying params
(the documented way gives the per-device answer; replicated params raise).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import toy_models as toy
from gmix_jax import objectives, parallel, transforms
from gmix_jax.sharpness import SharpnessRule

AXIS = 'batch'
N_DEV, B = 8, 4
G = N_DEV * B
STEPS = 3
# Large radii, so that a per-device ε or mask would move the result clearly;
# ESAM β < 1 so that the mask matters.
RULES = {'sam': dict(rho=0.5), 'asam': dict(rho=2.0), 'gsam': dict(rho=0.5, gsam_alpha=0.5),
         'esam': dict(rho=0.5, esam_beta=0.5)}
TOL = dict(rtol=1e-10, atol=1e-12)


def batches(dtype):
  out = []
  for i in range(STEPS):
    x, y = toy.data(jax.random.PRNGKey(10 + i), G, dtype)
    out.append({'x': np.asarray(x), 'y': np.asarray(y)})
  return out


def loss(params, x, y):
  logits, _ = toy.mlp_apply(params, {}, x, True)
  return jnp.mean(-jnp.sum(jax.nn.one_hot(y, toy.C, dtype=logits.dtype)
                           * jax.nn.log_softmax(logits), -1))


def assert_close(a, b):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, **TOL), a, b)


# ------------------------------------------------- objectives path ----------
def train(rule_name, wrapper, n_dev):
  method = objectives.get_method(rule_name, toy.C, sharpness=SharpnessRule(
      rule_name, m='global', **RULES[rule_name]))
  opt = optax.sgd(0.1, momentum=0.9)
  step_fn = parallel.make_per_device_step(
      objectives.make_objective(method, toy.mlp_apply, axis_name=AXIS), opt, axis_name=AXIS)
  state = parallel.create_train_state(toy.init_mlp(jax.random.PRNGKey(0), jnp.float64), {},
                                      opt, rng_seed=0)
  if wrapper == 'shard_map':
    mesh = parallel.make_mesh(n_dev, AXIS)
    step, state = parallel.shard_map_step(step_fn, mesh, AXIS), parallel.replicate_on_mesh(state, mesh)
    for batch in batches(jnp.float64):
      state, _ = step(state, batch)
    return jax.device_get(state.params)
  step, state = parallel.pmap_step(step_fn, AXIS), parallel.replicate(state, n_dev, AXIS)
  for batch in batches(jnp.float64):
    state, _ = step(state, parallel.shard_batch(batch, n_dev))
  return jax.device_get(parallel.unreplicate(state).params)


# pmap only for the two rules that used per-device quantities (its wrapper
# shares the per-device step, proven equal to shard_map in test_parallel).
@pytest.mark.slow
@pytest.mark.parametrize('rule_name,wrapper', [
    ('sam', 'shard_map'), ('asam', 'shard_map'), ('gsam', 'shard_map'), ('esam', 'shard_map'),
    ('gsam', 'pmap'), ('esam', 'pmap')])
def test_objective_global_m_8_devices_equal_1(x64, rule_name, wrapper):
  eight, one = train(rule_name, wrapper, N_DEV), train(rule_name, wrapper, 1)
  assert eight['w1'].dtype == np.float64
  assert_close(eight, one)


# ------------------------------------------------- transforms path ----------
FACTORIES = {'sam': lambda **kw: transforms.sam(0.5, **kw),
             'asam': lambda **kw: transforms.asam(2.0, **kw),
             'gsam': lambda **kw: transforms.gsam(0.5, alpha=0.5, **kw),
             'esam': lambda **kw: transforms.esam(0.5, beta=0.5, **kw)}


def transform_step(opt, axis_name=None):
  """One update of ``opt`` on the rows (x, y); under shard_map the documented way:
  differentiate with respect to params marked device-varying."""
  def step(params, state, x, y):
    p = params if axis_name is None else jax.lax.pcast(params, axis_name, to='varying')
    gfn = lambda q, _=None: jax.grad(loss)(q, x, y)
    updates, state = opt.update(gfn(p), state, p, grad_fn=gfn)
    return optax.apply_updates(params, updates), state
  return step


def run_sharded(opt, data, params):
  mesh = parallel.make_mesh(N_DEV, AXIS)
  step = jax.jit(jax.shard_map(transform_step(opt, AXIS), mesh=mesh,
                               in_specs=(jax.P(), jax.P(), jax.P(AXIS), jax.P(AXIS)),
                               out_specs=(jax.P(), jax.P())))
  state = opt.init(params)
  for batch in data:
    params, state = step(params, state, batch['x'], batch['y'])
  return jax.device_get(params)


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(FACTORIES))
def test_transform_global_ascent_8_devices_equal_1(x64, name):
  data = batches(jnp.float64)
  params = toy.init_mlp(jax.random.PRNGKey(0), jnp.float64)
  inner = optax.sgd(0.1, momentum=0.9)
  got = run_sharded(optax.chain(FACTORIES[name](batch_axis_name=AXIS, global_ascent=True), inner),
                    data, params)
  # One device on the whole batch: the plain transform.
  opt = optax.chain(FACTORIES[name](), inner)
  step, p, state = jax.jit(transform_step(opt)), params, opt.init(params)
  for batch in data:
    p, state = step(p, state, batch['x'], batch['y'])
  assert_close(got, p)


@pytest.mark.slow
def test_transform_per_device_under_shard_map_is_per_device(x64):
  name = 'gsam'
  """The documented way (pcast) gives the mean of the per-device directions,
  checked against a Python loop over the shards with the one-device transform."""
  batch = batches(jnp.float64)[0]
  params = toy.init_mlp(jax.random.PRNGKey(0), jnp.float64)
  got = run_sharded(optax.chain(FACTORIES[name](batch_axis_name=AXIS), optax.sgd(1.0)),
                    [batch], params)
  single = optax.chain(FACTORIES[name](), optax.sgd(1.0))
  deltas = []
  for d in range(N_DEV):
    rows = slice(d * B, (d + 1) * B)
    new, _ = transform_step(single)(params, single.init(params), batch['x'][rows], batch['y'][rows])
    deltas.append(jax.tree.map(lambda a, b: a - b, new, params))
  expected = jax.tree.map(lambda p, *ds: p + sum(ds) / N_DEV, params, *deltas)
  assert_close(got, expected)
  # ... and it is not the global-m answer (so the comparison can tell them apart).
  glob = run_sharded(optax.chain(FACTORIES[name](batch_axis_name=AXIS, global_ascent=True),
                                 optax.sgd(1.0)), [batch], params)
  assert not np.allclose(glob['w1'], got['w1'], rtol=1e-6)


@pytest.mark.slow
def test_transform_rejects_replicated_params_under_shard_map():
  opt = transforms.sam(0.05, batch_axis_name=AXIS)
  params = toy.init_mlp(jax.random.PRNGKey(0))
  x, y = toy.data(jax.random.PRNGKey(1), G)

  def wrong(params, x, y):       # differentiates w.r.t. the replicated params
    gfn = lambda q, _=None: jax.grad(loss)(q, x, y)
    updates, _ = opt.update(gfn(params), opt.init(params), params, grad_fn=gfn)
    return updates

  mesh = parallel.make_mesh(N_DEV, AXIS)
  sharded = jax.shard_map(wrong, mesh=mesh, in_specs=(jax.P(), jax.P(AXIS), jax.P(AXIS)),
                          out_specs=jax.P())
  with pytest.raises(ValueError, match=r"replicated over 'batch'.*pcast"):
    jax.jit(sharded)(params, x, y)
  # Under pmap (no varying/invariant typing) the same function is fine.
  out = jax.pmap(wrong, AXIS, in_axes=(None, 0, 0))(
      params, x.reshape(N_DEV, B, toy.D_IN), y.reshape(N_DEV, B))
  assert out['w1'].shape == (N_DEV,) + params['w1'].shape
