"""The data-parallel train step under pmap and jit + shard_map, on 8 CPU devices.

What is proven here (ARCHITECTURE.md "Contracts worth keeping"):
  * pmap and shard_map give the same parameters after several steps;
  * the per-device SAM ascent is per device (the shard_map summed-gradient
    pitfall, docs/methods.md § 2), checked against a Python loop over the shards;
  * (global m-sharpness is device-count independent: tests/test_global_m.py);
  * one compilation for the whole run, under both wrappers;
  * each device draws its own randomness;
  * the stale sensitivity table reaches the objective.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import toy_models as toy
from gmix_jax import objectives, parallel
from gmix_jax.sensitivity import SensitivityConfig
from gmix_jax.sharpness import SharpnessRule

N_DEV = 8
B = 4                       # per device
G = N_DEV * B               # global batch
AXIS = 'batch'


def global_batches(steps, seed=1):
  out = []
  for i in range(steps):
    x, y = toy.data(jax.random.PRNGKey(seed + i), G)
    out.append({'x': np.asarray(x), 'y': np.asarray(y)})
  return out


def fresh_state(optimizer, model_state=None, num_train=0):
  # Fresh arrays every time: the steps donate their state.
  params = toy.init_mlp(jax.random.PRNGKey(0))
  return parallel.create_train_state(params, {} if model_state is None else model_state,
                                     optimizer, rng_seed=0, num_train=num_train)


def per_device_step(method, optimizer, apply_fn=toy.mlp_apply, **kwargs):
  objective = objectives.make_objective(method, apply_fn, axis_name=AXIS)
  return parallel.make_per_device_step(objective, optimizer, axis_name=AXIS, **kwargs)


def run_shard_map(step_fn, state, batches, n_dev=N_DEV):
  mesh = parallel.make_mesh(n_dev, AXIS)
  step = parallel.shard_map_step(step_fn, mesh, AXIS)
  state = parallel.replicate_on_mesh(state, mesh)
  metrics = []
  for batch in batches:
    state, m = step(state, batch)
    metrics.append(m)
  return jax.device_get(state), jax.device_get(metrics)


def run_pmap(step_fn, state, batches, n_dev=N_DEV):
  step = parallel.pmap_step(step_fn, AXIS)
  state = parallel.replicate(state, n_dev, AXIS)
  metrics = []
  for batch in batches:
    state, m = step(state, parallel.shard_batch(batch, n_dev))
    metrics.append(parallel.unreplicate(m))
  return jax.device_get(parallel.unreplicate(state)), jax.device_get(metrics)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=atol), a, b)


def rel_diff(a, b):
  a, b = (np.concatenate([np.ravel(l) for l in jax.tree.leaves(t)]) for t in (a, b))
  return np.linalg.norm(a - b) / np.linalg.norm(b)


# ------------------------------------------------------ state and batch -------
def test_state_and_batch_utilities():
  state = fresh_state(optax.sgd(0.1), num_train=10)
  assert state.step.dtype == jnp.int32 and state.step.shape == ()
  assert state.rng.dtype == jnp.uint32 and state.scores.shape == (10,)
  assert fresh_state(optax.sgd(0.1)).scores.shape == (1,)

  rep = parallel.replicate(state, N_DEV, AXIS)
  assert rep.params['w1'].shape == (N_DEV,) + state.params['w1'].shape
  assert_trees_close(parallel.unreplicate(rep), state, rtol=0, atol=0)
  assert parallel.replicate(state, jax.local_devices()[:2]).step.shape == (2,)

  # A refreshed stale table keeps the layout of the old one, under both wrappers.
  table = np.arange(10, dtype=np.float32)
  for placed in (rep, parallel.replicate_on_mesh(state, parallel.make_mesh(N_DEV, AXIS))):
    new = parallel.set_scores(placed, table)
    assert new.scores.sharding == placed.scores.sharding
    np.testing.assert_array_equal(np.reshape(new.scores, (-1, 10))[-1], table)

  batch = global_batches(1)[0]
  sharded = parallel.shard_batch(batch, N_DEV)
  assert sharded['x'].shape == (N_DEV, B, toy.D_IN)
  np.testing.assert_array_equal(sharded['x'][3], batch['x'][3 * B:4 * B])
  with pytest.raises(ValueError, match='does not divide'):
    parallel.shard_batch(batch, 5)

  mesh = parallel.make_mesh(None, AXIS)
  assert mesh.devices.size == N_DEV
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
  placed = parallel.global_batch_to_device(batch, mesh, AXIS)
  assert placed['x'].sharding.is_equivalent_to(
      jax.sharding.NamedSharding(mesh, jax.P(AXIS)), 2)
  np.testing.assert_array_equal(placed['x'], batch['x'])


# --------------------------------------------------- 1. pmap == shard_map ---
CASES = {
    'erm': dict(method=objectives.get_method('erm', toy.C)),
    'sam': dict(method=objectives.get_method('sam', toy.C)),
    'gmix': dict(method=objectives.get_method('gmix', toy.C)),
    'bgmix': dict(method=objectives.get_method('bgmix', toy.C)),
    # BatchNorm-like state: its running mean is averaged over devices too.
    'sam_bn': dict(method=objectives.get_method('sam', toy.C),
                    apply_fn=toy.bn_apply, model_state=toy.bn_state()),
}


@pytest.mark.parametrize('name', list(CASES))
def test_pmap_equals_shard_map(name):
  case = CASES[name]
  opt = optax.sgd(0.1, momentum=0.9)
  step_fn = per_device_step(case['method'], opt, case.get('apply_fn', toy.mlp_apply))
  batches = global_batches(3)
  init = jax.device_get(fresh_state(opt, case.get('model_state')))
  s_sm, m_sm = run_shard_map(step_fn, fresh_state(opt, case.get('model_state')), batches)
  s_pm, m_pm = run_pmap(step_fn, fresh_state(opt, case.get('model_state')), batches)

  assert int(s_sm.step) == int(s_pm.step) == 3
  assert_trees_close(s_sm.params, s_pm.params)
  assert_trees_close(s_sm.opt_state, s_pm.opt_state)
  assert_trees_close(s_sm.model_state, s_pm.model_state)
  assert_trees_close(m_sm, m_pm)
  assert rel_diff(s_sm.params, init.params) > 1e-3          # it did train
  if 'model_state' in case:
    assert rel_diff(s_sm.model_state, init.model_state) > 1e-3


# ------------------------------------- 2. per-device SAM is per device ------
RHO = 0.5   # large, so per-device and global ascents differ clearly


def shard_loss(params, x, y):
  logits, _ = toy.mlp_apply(params, {}, x, True)
  return jnp.mean(-jnp.sum(jax.nn.one_hot(y, toy.C) * jax.nn.log_softmax(logits), -1))


def hand_sam_grad(params, x, y, ascent_grad):
  """∇L(w + ρ ĝ) on (x, y), with ĝ the normalised ``ascent_grad``."""
  norm = optax.tree.norm(ascent_grad)
  eps = jax.tree.map(lambda g: RHO * g / norm, ascent_grad)
  return jax.grad(shard_loss)(optax.apply_updates(params, eps), x, y)


def one_sgd1_update():
  """Parameter change of one shard_map step with sgd(1.0): −(averaged gradient)."""
  opt = optax.sgd(1.0)
  method = objectives.get_method('sam', toy.C, sharpness=SharpnessRule('sam', rho=RHO))
  state = fresh_state(opt)
  w0 = jax.device_get(state.params)
  new, _ = run_shard_map(per_device_step(method, opt), state, global_batches(1))
  return w0, jax.tree.map(lambda a, b: b - a, w0, new.params)


def test_per_device_sam_is_per_device(monkeypatch):
  w0, delta = one_sgd1_update()
  batch = global_batches(1)[0]
  shards = [(batch['x'][d * B:(d + 1) * B], batch['y'][d * B:(d + 1) * B])
            for d in range(N_DEV)]
  mean = lambda trees: jax.tree.map(lambda *l: sum(l) / len(l), *trees)

  # Right: each device ascends along its own gradient g_d.
  per_device = mean([hand_sam_grad(w0, x, y, jax.grad(shard_loss)(w0, x, y)) for x, y in shards])
  # Wrong (the pitfall): g_d comes back summed over devices, in both passes.
  g_sum = jax.tree.map(lambda *l: sum(l), *[jax.grad(shard_loss)(w0, x, y) for x, y in shards])
  summed = jax.tree.map(lambda *l: sum(l),
                        *[hand_sam_grad(w0, x, y, g_sum) for x, y in shards])
  # Global m (for scale): one ε from the mean gradient, no summing.
  global_m = jax.tree.map(lambda g: g / N_DEV, summed)

  got = jax.tree.map(jnp.negative, delta)
  assert_trees_close(got, per_device)
  assert rel_diff(got, summed) > 0.5
  assert rel_diff(got, global_m) > 1e-2

  # The test catches the bug: without the pcast the step *is* the summed version.
  monkeypatch.setattr(jax.lax, 'pcast', lambda x, axis_name, *, to: x)
  _, delta_bug = one_sgd1_update()
  assert_trees_close(jax.tree.map(jnp.negative, delta_bug), summed)


# ------------------------------ 3. global m: 8 devices == 1 device ----------
# tests/test_global_m.py (SAM, ASAM, GSAM, ESAM; objectives and transforms).


# ------------------------------------------- 4. one compilation per run -----
@pytest.mark.parametrize('wrapper', ['shard_map', 'pmap'])
def test_no_recompilation(wrapper):
  opt = optax.sgd(0.1, momentum=0.9)
  inner = per_device_step(objectives.get_method('gmix', toy.C), opt)
  traces = []

  def counted(state, batch):
    traces.append(1)           # runs only when JAX traces the function
    return inner(state, batch)

  batches = global_batches(4)
  if wrapper == 'shard_map':
    mesh = parallel.make_mesh(N_DEV, AXIS)
    step = parallel.shard_map_step(counted, mesh, AXIS)
    state = parallel.replicate_on_mesh(fresh_state(opt), mesh)
  else:
    step = parallel.pmap_step(counted, AXIS)
    state = parallel.replicate(fresh_state(opt), N_DEV, AXIS)
    batches = [parallel.shard_batch(b, N_DEV) for b in batches]

  state, _ = step(state, batches[0])                   # trace + compile once
  assert len(traces) == 1
  compiles = []
  listener = lambda event, duration, **kw: compiles.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for batch in batches[1:]:
      state, _ = step(state, batch)
    jax.block_until_ready(state)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert len(traces) == 1
  assert '/jax/core/compile/backend_compile_duration' not in compiles
  if wrapper == 'shard_map':
    assert step._cache_size() == 1


# ----------------------------------------- 5. per-device randomness ---------
def test_step_key_differs_per_device_and_step():
  rng = jax.random.key_data(jax.random.key(0))

  def keys(rng, step, _):
    return jax.random.key_data(parallel.step_key(rng, step, AXIS))[None]

  mesh = parallel.make_mesh(N_DEV, AXIS)
  sm = jax.jit(jax.shard_map(keys, mesh=mesh, in_specs=(jax.P(), jax.P(), jax.P(AXIS)),
                             out_specs=jax.P(AXIS)))
  pm = jax.pmap(keys, AXIS, in_axes=(None, None, 0))
  dummy = jnp.zeros(N_DEV)       # pmap needs one mapped argument
  for step in (0, 1):
    k_sm = np.asarray(sm(rng, jnp.int32(step), dummy))
    k_pm = np.asarray(pm(rng, jnp.int32(step), dummy))[:, 0]
    hand = np.stack([jax.random.key_data(jax.random.fold_in(jax.random.fold_in(
        jax.random.wrap_key_data(rng), step), d)) for d in range(N_DEV)])
    np.testing.assert_array_equal(k_sm, hand)
    np.testing.assert_array_equal(k_pm, hand)
    assert len({tuple(k) for k in hand}) == N_DEV
  assert not np.array_equal(sm(rng, jnp.int32(0), dummy), sm(rng, jnp.int32(1), dummy))


def test_devices_draw_different_mixing():
  """Through the real step: every device mixes the *same* shard; if the keys
  were shared, the per-device losses would be equal, i.e. E[ℓ²] = E[ℓ]²."""
  method = objectives.get_method('mixup', toy.C)
  objective = objectives.make_objective(method, toy.mlp_apply, axis_name=AXIS)

  def with_square(params, model_state, batch, key):
    grads, state, metrics = objective(params, model_state, batch, key)
    return grads, state, {**metrics, 'loss_sq': metrics['loss'] ** 2}

  opt = optax.sgd(0.1)
  step_fn = parallel.make_per_device_step(with_square, opt, axis_name=AXIS)
  shard = global_batches(1)[0]
  same = {k: np.concatenate([v[:B]] * N_DEV) for k, v in shard.items()}
  _, (m,) = run_shard_map(step_fn, fresh_state(opt), [same])
  assert m['loss_sq'] - m['loss'] ** 2 > 1e-6


# ------------------------------------------------- 6. stale scores ----------
def test_stale_scores_reach_the_objective():
  num_train = 3 * G
  method = objectives.get_method('bgmix', toy.C, sensitivity=SensitivityConfig('stale'))
  opt = optax.sgd(0.1)
  table = np.asarray(jax.random.normal(jax.random.PRNGKey(7), (num_train,)), np.float32)
  batch = global_batches(1)[0]
  batch['index'] = np.asarray(jax.random.permutation(jax.random.PRNGKey(8), num_train)[:G])

  mesh = parallel.make_mesh(N_DEV, AXIS)
  stale_step = parallel.shard_map_step(per_device_step(method, opt, use_stale_scores=True), mesh)
  plain_step = parallel.shard_map_step(per_device_step(method, opt), mesh)

  def run_stale(table_):
    state = fresh_state(opt, num_train=num_train).replace(scores=jnp.asarray(table_))
    return stale_step(parallel.replicate_on_mesh(state, mesh), batch)[0].params

  looked_up = run_stale(table)
  by_hand = plain_step(parallel.replicate_on_mesh(fresh_state(opt), mesh),
                       {**batch, 'score': table[batch['index']]})[0].params
  assert_trees_close(looked_up, by_hand)
  # ... and the table matters: reversed scores split the batch the other way.
  assert rel_diff(run_stale(-table), looked_up) > 1e-4


# ------------------------------------------------------ multi-host ----------
def test_maybe_initialize_distributed(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: False)
  for var in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID',
              'GMIX_DISTRIBUTED', 'MEGASCALE_COORDINATOR_ADDRESS', 'TPU_WORKER_HOSTNAMES',
              'SLURM_STEP_NUM_TASKS', 'OMPI_COMM_WORLD_SIZE'):
    monkeypatch.delenv(var, raising=False)

  parallel.maybe_initialize_distributed()                 # one host: nothing
  monkeypatch.setenv('SLURM_STEP_NUM_TASKS', '1')
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'localhost')
  parallel.maybe_initialize_distributed()
  assert calls == []

  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', '10.0.0.1:1234')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '4')
  monkeypatch.setenv('JAX_PROCESS_ID', '2')
  parallel.maybe_initialize_distributed()
  assert calls == [dict(coordinator_address='10.0.0.1:1234', num_processes=4, process_id=2)]

  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: True)
  parallel.maybe_initialize_distributed()                 # idempotent
  assert len(calls) == 1

  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: False)
  for var in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    monkeypatch.delenv(var)
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'host-0,host-1')   # TPU pod: auto-detect
  parallel.maybe_initialize_distributed()
  assert calls[-1] == dict(coordinator_address=None, num_processes=None, process_id=None)
