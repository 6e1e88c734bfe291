"""The efficient sharpness rules (docs/methods.md § 2): LookSAM, F-SAM, MSAM.

1. The Optax transforms against the papers' algorithms written out in numpy
   (float64, a non-quadratic loss, several steps); MSAM against the official
   code's form, which keeps the parameters at the perturbed point.
2. The trainer's objective, for every mixing × partition combination, against
   relations that hold by definition: LookSAM's full step is SAM's, its cheap
   step is g + α‖g‖/‖g_v‖ g_v with g the ρ = 0 gradient; F-SAM with σ = 0 is
   SAM; MSAM with v = 0 is the clean gradient; and, on one part, F-SAM and
   MSAM against the perturbed point computed by hand.
3. pmap == jit + shard_map for the three rules over several steps (their
   state included); LookSAM with m = global on 8 devices == 1 device.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import toy_models as toy
from gmix_jax import objectives, parallel, sharpness, transforms
from gmix_jax.objectives import MixingConfig, PartitionConfig
from gmix_jax.sensitivity import SensitivityConfig
from gmix_jax.sharpness import SharpnessRule

STEPS = 7
LR = 0.05
TARGET = np.array([1.0, -2.0, 0.5, 3.0])
SCALE = np.array([1.0, 3.0, 0.5, 2.0])


# ------------------------------------------------ 1. transforms vs numpy ----
def loss(w):
  """A non-quadratic bowl: Σ a_i (w_i − t_i)² + 0.1 Σ w_i⁴."""
  return jnp.sum(SCALE * (w - TARGET) ** 2) + 0.1 * jnp.sum(w ** 4)


def np_grad(w):
  return 2 * SCALE * (w - TARGET) + 0.4 * w ** 3


def grad_fn(w, _):
  return jax.grad(loss)(w)


def run_transform(opt, steps=STEPS):
  w = jnp.zeros(4, jnp.float64)
  state = opt.init(w)

  @jax.jit
  def step(w, state):
    g = jax.grad(loss)(w)
    u, state = opt.update(g, state, w, grad_fn=grad_fn)
    return optax.apply_updates(w, u), state
  for _ in range(steps):
    w, state = step(w, state)
  return np.asarray(w), state


def test_looksam_transform_matches_numpy_algorithm(x64):
  rho, k, alpha = 0.3, 3, 0.7
  w, g_v = np.zeros(4), np.zeros(4)
  for t in range(STEPS):
    g = np_grad(w)
    if t % k == 0:
      g_s = np_grad(w + rho * g / np.linalg.norm(g))
      g_v = g_s - (g_s @ g) / (g @ g) * g
      d = g_s
    else:
      d = g + alpha * np.linalg.norm(g) / np.linalg.norm(g_v) * g_v
    w = w - LR * d
  got, state = run_transform(optax.chain(transforms.looksam(rho, k, alpha), optax.sgd(LR)))
  np.testing.assert_allclose(got, w, rtol=1e-8, atol=1e-12)
  np.testing.assert_allclose(state[0].g_v, g_v, rtol=1e-8, atol=1e-12)
  assert int(state[0].count) == STEPS
  assert np.linalg.norm(g_v) > 1e-3          # the reused part is not trivially zero


def test_fsam_transform_matches_official_algorithm(x64):
  rho, sigma, lam = 0.3, 1.0, 0.8
  w, m = np.zeros(4), None
  for _ in range(STEPS):
    g = np_grad(w)
    if m is None:                     # the official code: m starts at the first gradient
      m, d = g, g
    else:
      d = g - sigma * m
      m = lam * m + (1 - lam) * g
    w = w - LR * np_grad(w + rho * d / np.linalg.norm(d))
  got, state = run_transform(optax.chain(transforms.fsam(rho, sigma, lam), optax.sgd(LR)))
  np.testing.assert_allclose(got, w, rtol=1e-8, atol=1e-12)
  np.testing.assert_allclose(state[0].m, m, rtol=1e-8, atol=1e-12)


def test_msam_transform_matches_official_perturbed_parameter_form(x64):
  """The official code stores w̃ = w − ρ v/‖v‖ and takes its one gradient
  there; the transform keeps w and evaluates at w + ε. Same trajectory."""
  rho, mu = 0.3, 0.9
  p, buf, inv = np.zeros(4), np.zeros(4), 0.0
  for _ in range(STEPS):
    g = np_grad(p)                    # at the stored (perturbed) point
    p = p + rho * inv * buf           # back to w
    buf = mu * buf + g
    p = p - LR * buf
    inv = 1.0 / (np.linalg.norm(buf) + 1e-12)
    p = p - rho * inv * buf           # to the next perturbed point
  w_official = p + rho * inv * buf
  got, state = run_transform(transforms.msam(optax.sgd(LR, momentum=mu), rho))
  np.testing.assert_allclose(got, w_official, rtol=1e-9)
  np.testing.assert_allclose(sharpness.optimizer_momentum(state), buf, rtol=1e-9)


def test_msam_needs_a_momentum_buffer():
  with pytest.raises(ValueError, match="optimizer's momentum"):
    transforms.msam(optax.sgd(0.1)).init(jnp.zeros(3))
  transforms.msam(optax.adamw(0.1)).init(jnp.zeros(3))       # Adam's first moment


def test_msam_takes_one_gradient_per_jitted_step():
  """The caller's gradient at w is dead code under jit: XLA's FLOP count of
  an MSAM step is that of a plain step (one gradient), not SAM's (two)."""
  x = jax.random.normal(jax.random.PRNGKey(0), (256, 64))
  big_loss = lambda w: jnp.sum(jnp.tanh(x @ w) ** 2)
  big_grad = lambda w, _: jax.grad(big_loss)(w)
  w = jax.random.normal(jax.random.PRNGKey(1), (64, 64))

  def flops(opt):
    state = opt.init(w)
    def step(w, state):
      u, state = opt.update(jax.grad(big_loss)(w), state, w, grad_fn=big_grad)
      return optax.apply_updates(w, u), state
    cost = jax.jit(step).lower(w, state).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return cost['flops']
  plain = flops(optax.with_extra_args_support(optax.sgd(0.1, momentum=0.9)))
  sam = flops(optax.chain(transforms.sam(), optax.sgd(0.1, momentum=0.9)))
  msam = flops(transforms.msam(optax.sgd(0.1, momentum=0.9)))
  assert sam > 1.8 * plain                  # the count sees a second gradient
  assert msam < 1.1 * plain, (msam, plain)


# ------------------------------------ 2. the trainer's objective, composed ---
B = 8
MIXINGS = ('none', 'mixup')
PARTITIONS = {
    'none': PartitionConfig(),
    'binary': PartitionConfig('binary'),
    'sam_on_sensitive': PartitionConfig('binary', bgmix_rule='sam_on_sensitive'),
    'decomposed': PartitionConfig('decomposed'),
}


def method(policy, part, rule):
  # The split's probe radius is fixed, so the ρ = 0 reference splits the same way.
  return objectives.Method(toy.C, mixing=MixingConfig(policy), sharpness=rule,
                           partition=PARTITIONS[part],
                           sensitivity=SensitivityConfig(rho=0.05))


def toy_setup():
  params = toy.init_mlp(jax.random.PRNGKey(0), jnp.float64)
  x, labels = toy.data(jax.random.PRNGKey(1), B, jnp.float64)
  return params, {'x': x, 'y': labels}


def call(m, params, batch, step, extra=None, phase=None, **inputs):
  obj = objectives.make_objective(m, toy.mlp_apply, looksam_phase=phase)
  batch = {**batch, 'step': jnp.asarray(step, jnp.int32), **inputs}
  if extra is None:
    return obj(params, {}, batch, jax.random.PRNGKey(7))
  return obj(params, {}, batch, jax.random.PRNGKey(7), extra)


def close(a, b, rtol=1e-9, atol=1e-12):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=atol), a, b)


def rand_like(params, seed):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return tree.unflatten([jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)])


@pytest.mark.parametrize('policy', MIXINGS)
@pytest.mark.parametrize('part', list(PARTITIONS))
@pytest.mark.parametrize('host', [False, True], ids=['cond', 'host_phase'])
def test_looksam_objective_full_and_cheap_steps(policy, part, host, x64):
  """``host``: the phase chosen outside (``looksam_phase``), as the trainer does."""
  params, batch = toy_setup()
  rule = SharpnessRule('looksam', looksam_k=2, looksam_alpha=0.7)
  sam_g, _, _ = call(method(policy, part, SharpnessRule('sam')), params, batch, 0)
  clean, _, _ = call(method(policy, part, SharpnessRule('sam', rho=0.0)), params, batch, 0)
  zeros = objectives.rule_state_init(rule, params)
  # Full step (step % k == 0): SAM's direction; g_v ⟂ clean g.
  g, _, metrics, out = call(method(policy, part, rule), params, batch, 4, zeros,
                            phase='full' if host else None)
  close(g, sam_g)
  close(out['g_v'], sharpness.orthogonal_component(sam_g, clean))
  assert abs(float(sharpness.tree_dot(out['g_v'], clean))) < 1e-10
  # Cheap step: clean g + α‖g‖/‖g_v‖ g_v with the stored g_v; nothing to store.
  g_v = rand_like(params, 3)
  g, _, m2, out = call(method(policy, part, rule), params, batch, 5, {'g_v': g_v},
                       phase='cheap' if host else None)
  scale = 0.7 * sharpness.global_norm(clean) / sharpness.global_norm(g_v)
  close(g, jax.tree.map(lambda c, v: c + scale * v, clean, g_v))
  assert all(float(jnp.max(jnp.abs(v))) == 0 for v in jax.tree.leaves(out['g_v']))
  assert float(m2['perturbed_loss']) == float(m2['loss'])


@pytest.mark.parametrize('policy', MIXINGS)
@pytest.mark.parametrize('part', list(PARTITIONS))
def test_fsam_objective_composes(policy, part, x64):
  params, batch = toy_setup()
  sam_g, _, _ = call(method(policy, part, SharpnessRule('sam')), params, batch, 0)
  clean, _, _ = call(method(policy, part, SharpnessRule('sam', rho=0.0)), params, batch, 0)
  m = rand_like(params, 4)
  # First step: d = g, F-SAM is SAM; later steps with σ = 0 too.
  g, _, _, out = call(method(policy, part, SharpnessRule('fsam')), params, batch, 0, {'m': m})
  close(g, sam_g)
  close(out['g'], clean)               # the clean gradient m will follow
  g, _, _, _ = call(method(policy, part, SharpnessRule('fsam', fsam_sigma=0.0)), params, batch,
                    3, {'m': m})
  close(g, sam_g)
  g, _, _, _ = call(method(policy, part, SharpnessRule('fsam')), params, batch, 3, {'m': m})
  assert sharpness.global_norm(sharpness.add(g, sharpness.scale(sam_g, -1.0))) > 1e-6


@pytest.mark.parametrize('policy', MIXINGS)
@pytest.mark.parametrize('part', list(PARTITIONS))
def test_msam_objective_composes(policy, part, x64):
  params, batch = toy_setup()
  clean, _, _ = call(method(policy, part, SharpnessRule('sam', rho=0.0)), params, batch, 0)
  zero_v = jax.tree.map(jnp.zeros_like, params)
  g, _, metrics = call(method(policy, part, SharpnessRule('msam')), params, batch, 0,
                       momentum=zero_v)
  close(g, clean)                      # v = 0 (the first step): ε = 0
  g, _, _ = call(method(policy, part, SharpnessRule('msam')), params, batch, 1,
                 momentum=rand_like(params, 5))
  assert sharpness.global_norm(sharpness.add(g, sharpness.scale(clean, -1.0))) > 1e-6


def hand_loss(params, x, y):
  logits, _ = toy.mlp_apply(params, {}, x, True)
  return jnp.mean(-jnp.sum(y * jax.nn.log_softmax(logits), -1))


def test_fsam_and_msam_objectives_perturb_by_hand(x64):
  """One part, no mixing: the perturbed point written out."""
  params, batch = toy_setup()
  y = jax.nn.one_hot(batch['y'], toy.C, dtype=jnp.float64)
  g = jax.grad(hand_loss)(params, batch['x'], y)
  m, v = rand_like(params, 6), rand_like(params, 8)
  rho, sigma = 0.05, 1.0
  d = jax.tree.map(lambda a, b: a - sigma * b, g, m)
  want = jax.grad(hand_loss)(jax.tree.map(lambda p, di: p + rho * di / sharpness.global_norm(d),
                                          params, d), batch['x'], y)
  got, _, _, _ = call(method('none', 'none', SharpnessRule('fsam')), params, batch, 2, {'m': m})
  close(got, want)
  rho = 0.3
  want = jax.grad(hand_loss)(jax.tree.map(lambda p, vi: p - rho * vi / sharpness.global_norm(v),
                                          params, v), batch['x'], y)
  got, _, _ = call(method('none', 'none', SharpnessRule('msam')), params, batch, 2, momentum=v)
  close(got, want)


def test_rule_state_update():
  rule = SharpnessRule('looksam', looksam_k=3)
  upd = objectives.rule_state_update(rule)
  old, new = {'g_v': jnp.ones(2)}, {'g_v': jnp.full(2, 5.0)}
  np.testing.assert_array_equal(upd(old, new, None, None, jnp.int32(3))['g_v'], 5.0)
  np.testing.assert_array_equal(upd(old, new, None, None, jnp.int32(4))['g_v'], 1.0)
  upd = objectives.rule_state_update(SharpnessRule('fsam', fsam_lambda=0.75))
  np.testing.assert_allclose(upd({'m': jnp.ones(2)}, {'g': jnp.full(2, 5.0)}, None, None,
                                 jnp.int32(0))['m'], 5.0)
  np.testing.assert_allclose(upd({'m': jnp.ones(2)}, {'g': jnp.full(2, 5.0)}, None, None,
                                 jnp.int32(1))['m'], 0.75 + 0.25 * 5.0)


@pytest.mark.parametrize('kwargs, message', [
    (dict(looksam_k=0), 'looksam_k must be an int >= 1'),
    (dict(looksam_alpha=-1.0), 'looksam_alpha must be >= 0'),
    (dict(fsam_lambda=1.0), r'fsam_lambda must be in \[0, 1\)'),
    (dict(fsam_sigma=-0.5), 'fsam_sigma must be >= 0'),
])
def test_bad_knobs_are_clear_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    SharpnessRule('looksam', **kwargs)


def test_msam_rejects_m():
  with pytest.raises(ValueError, match="no meaning for sharpness.rule='msam'"):
    SharpnessRule('msam', m='global')


# ------------------------------------------------ 3. data parallel ----------
N_DEV, PER_DEV, AXIS = 8, 4, 'batch'


def batches(steps):
  out = []
  for i in range(steps):
    x, y = toy.data(jax.random.PRNGKey(10 + i), N_DEV * PER_DEV)
    out.append({'x': np.asarray(x), 'y': np.asarray(y)})
  return out


def build(rule, opt, policy='mixup'):
  m = objectives.Method(toy.C, mixing=MixingConfig(policy), sharpness=rule)
  obj = objectives.make_objective(m, toy.mlp_apply, axis_name=AXIS)
  extra = objectives.rule_state_init(rule, toy.init_mlp(jax.random.PRNGKey(0)))
  step = parallel.make_per_device_step(
      obj, opt, axis_name=AXIS,
      extra_update=objectives.rule_state_update(rule) if extra is not None else None,
      objective_inputs=objectives.msam_inputs if rule.name == 'msam' else None)
  return step, extra


def fresh(opt, extra):
  params = toy.init_mlp(jax.random.PRNGKey(0))
  extra = None if extra is None else jax.tree.map(jnp.array, extra)   # the steps donate
  return parallel.create_train_state(params, {}, opt, rng_seed=0, extra=extra)


def run_sm(step_fn, state, bs, n_dev=N_DEV):
  mesh = parallel.make_mesh(n_dev, AXIS)
  step = parallel.shard_map_step(step_fn, mesh, AXIS)
  state = parallel.replicate_on_mesh(state, mesh)
  for b in bs:
    state, _ = step(state, b)
  return jax.device_get(state)


def run_pm(step_fn, state, bs):
  step = parallel.pmap_step(step_fn, AXIS)
  state = parallel.replicate(state, N_DEV, AXIS)
  for b in bs:
    state, _ = step(state, parallel.shard_batch(b, N_DEV))
  return jax.device_get(parallel.unreplicate(state))


@pytest.mark.parametrize('rule', [SharpnessRule('looksam', looksam_k=2),
                                  SharpnessRule('fsam'), SharpnessRule('msam')],
                         ids=lambda r: r.name)
def test_pmap_equals_shard_map(rule):
  opt = optax.sgd(0.1, momentum=0.9)
  step_fn, extra = build(rule, opt)
  bs = batches(4)                       # LookSAM k=2: full, cheap, full, cheap
  s_sm = run_sm(step_fn, fresh(opt, extra), bs)
  s_pm = run_pm(step_fn, fresh(opt, extra), bs)
  assert int(s_sm.step) == int(s_pm.step) == 4
  close(s_sm.params, s_pm.params, rtol=1e-5, atol=1e-6)
  close(s_sm.opt_state, s_pm.opt_state, rtol=1e-5, atol=1e-6)
  close(s_sm.extra, s_pm.extra, rtol=1e-5, atol=1e-6)
  if extra is not None:                 # the rule's state moved
    assert sharpness.global_norm(s_sm.extra) > 1e-6


def test_looksam_global_m_does_not_depend_on_the_device_count():
  rule = SharpnessRule('looksam', looksam_k=2, m='global')
  opt = optax.sgd(0.1)
  step_fn, extra = build(rule, opt, policy='none')
  bs = batches(3)
  s8 = run_sm(step_fn, fresh(opt, extra), bs)
  s1 = run_sm(step_fn, fresh(opt, extra), bs, n_dev=1)
  close(s8.params, s1.params, rtol=1e-4, atol=1e-6)
  close(s8.extra, s1.extra, rtol=1e-4, atol=1e-6)


def test_msam_split_probe_keeps_sams_radius():
  m = objectives.get_method('bgmix', toy.C, sharpness=SharpnessRule('msam'))
  assert m.sensitivity_rho == sharpness.DEFAULT_RHO['sam'] != m.sharpness.radius
