"""Optax conformance of the sharpness transforms, in the manner of optax's
own contrib suite (jit, dtype/shape stability, chain, inject_hyperparams,
convergence, lax.cond), plus step-for-step agreement with optax.contrib.sam."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gmix_jax import transforms

FACTORIES = {
    'sam': transforms.sam,
    'asam': transforms.asam,
    'gsam': transforms.gsam,
    'esam': transforms.esam,
    'looksam': transforms.looksam,
    'fsam': transforms.fsam,
    'msam': transforms.msam,
}


def make(name, inner, factory=None, **kwargs):
  """The rule in front of ``inner``; MSAM wraps it instead (it reads the
  inner state's momentum), so its plain SGD gets momentum 0.9."""
  factory = factory or FACTORIES[name]
  if name != 'msam':
    return optax.chain(factory(**kwargs), inner)
  lr = 0.1
  inner = optax.sgd(lr, momentum=0.9) if inner == 'sgd' else optax.adam(lr)
  return optax.chain(factory(optimizer=inner, **kwargs))
TARGET = jnp.array([1.0, -2.0, 3.0])


def parabola(params):
  return jnp.sum(jnp.square(params['w'] - TARGET)) + jnp.square(params['b'] - 0.5)


def grad_fn(params, _):
  return jax.grad(parabola)(params)


def init_params(dtype=jnp.float32):
  return {'w': jnp.zeros(3, dtype), 'b': jnp.zeros((), dtype)}


@pytest.mark.parametrize('name', sorted(FACTORIES))
def test_init_update_under_jit_and_dtype_shape_stable(name):
  for dtype in (jnp.float32, jnp.bfloat16):
    params = init_params(dtype)
    opt = make(name, 'sgd') if name == 'msam' else make(name, optax.sgd(0.1))
    state = jax.jit(opt.init)(params)

    @jax.jit
    def step(params, state):
      grads = jax.grad(parabola)(params)
      updates, state = opt.update(grads, state, params, grad_fn=grad_fn)
      return optax.apply_updates(params, updates), state

    new_params, new_state = step(params, state)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new_params)):
      assert a.dtype == b.dtype and a.shape == b.shape
    assert jax.tree.structure(state) == jax.tree.structure(new_state)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(new_state)):
      assert a.dtype == b.dtype and a.shape == b.shape


@pytest.mark.parametrize('name', sorted(FACTORIES))
@pytest.mark.parametrize('inner', ['sgd', 'adam'])
def test_converges_on_parabola_in_chain(name, inner):
  inner_opt = optax.sgd(0.1, momentum=0.9) if inner == 'sgd' else optax.adam(0.1)
  opt = make(name, inner if name == 'msam' else inner_opt, rho=0.01)
  params = init_params()
  state = opt.init(params)

  @jax.jit
  def step(carry, _):
    params, state = carry
    grads = jax.grad(parabola)(params)
    updates, state = opt.update(grads, state, params, grad_fn=grad_fn)
    return (optax.apply_updates(params, updates), state), None

  (params, _), _ = jax.lax.scan(step, (params, state), None, length=300)
  np.testing.assert_allclose(params['w'], TARGET, atol=2e-2)
  np.testing.assert_allclose(params['b'], 0.5, atol=2e-2)


@pytest.mark.parametrize('name', sorted(FACTORIES))
def test_inject_hyperparams(name):
  opt = make(name, 'sgd' if name == 'msam' else optax.sgd(0.1),
             factory=optax.inject_hyperparams(FACTORIES[name]), rho=0.05)
  params = init_params()
  state = opt.init(params)
  grads = jax.grad(parabola)(params)
  updates, state = jax.jit(functools.partial(opt.update, grad_fn=grad_fn))(grads, state, params)
  assert float(state[0].hyperparams['rho']) == pytest.approx(0.05)
  # Changing the injected ρ changes the update: ρ really flows through the state.
  state0 = opt.init(params)
  state0[0].hyperparams['rho'] = jnp.asarray(0.0)
  updates0, state0 = opt.update(grads, state0, params, grad_fn=grad_fn)
  np.testing.assert_allclose(updates0['w'], -0.1 * grads['w'], rtol=1e-6)
  if name == 'msam':
    # ε = −ρ v/‖v‖ needs a momentum: the first step has none, so compare the second.
    state1 = opt.init(params)
    _, state1 = opt.update(grads, state1, params, grad_fn=grad_fn)
    updates, _ = opt.update(grads, state1, params, grad_fn=grad_fn)
    updates0, _ = opt.update(grads, state0, params, grad_fn=grad_fn)
  assert not np.allclose(updates['w'], updates0['w'])


@pytest.mark.parametrize('name', sorted(FACTORIES))
def test_state_stable_under_lax_cond(name):
  opt = make(name, 'sgd') if name == 'msam' else make(name, optax.sgd(0.1))
  params = init_params()
  state = opt.init(params)
  grads = jax.grad(parabola)(params)

  @jax.jit
  def maybe_update(pred, state):
    return jax.lax.cond(pred, lambda s: opt.update(grads, s, params, grad_fn=grad_fn)[1],
                        lambda s: s, state)

  s1 = maybe_update(True, state)
  s0 = maybe_update(False, state)
  assert jax.tree.structure(s1) == jax.tree.structure(s0) == jax.tree.structure(state)
  if name == 'msam':                  # its state is the inner one: the momentum moved
    assert float(optax.tree.norm(optax.tree.get(s1, 'trace'))) > 0
    assert float(optax.tree.norm(optax.tree.get(s0, 'trace'))) == 0
  else:
    assert int(s1[0].count) == 1 and int(s0[0].count) == 0


def test_sam_matches_optax_contrib_sam_opaque_step_for_step():
  lr, rho = 0.05, 0.1
  x = jax.random.normal(jax.random.PRNGKey(0), (32, 4))
  y = x @ jnp.array([1.0, -1.0, 0.5, 2.0]) + 0.3 * jnp.sin(x[:, 0])
  loss = lambda p: jnp.mean(jnp.square(jnp.tanh(x @ p['w1']) @ p['w2'] - y))
  params = {'w1': jax.random.normal(jax.random.PRNGKey(1), (4, 8)) * 0.5,
            'w2': jax.random.normal(jax.random.PRNGKey(2), (8,)) * 0.5}
  gfn = lambda p, _: jax.grad(loss)(p)

  ours = optax.chain(transforms.sam(rho=rho), optax.sgd(lr))
  ref = optax.contrib.sam(optax.sgd(lr), optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
                          sync_period=2, opaque_mode=True)
  p_ours, p_ref = params, params
  s_ours, s_ref = ours.init(params), ref.init(params)
  for _ in range(10):
    u, s_ours = ours.update(jax.grad(loss)(p_ours), s_ours, p_ours, grad_fn=gfn)
    p_ours = optax.apply_updates(p_ours, u)
    u, s_ref = ref.update(jax.grad(loss)(p_ref), s_ref, p_ref, grad_fn=gfn)
    p_ref = optax.apply_updates(p_ref, u)
    for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_ref)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_gsam_rho_schedule_follows_count():
  seen = []
  params = init_params()
  sched = lambda count: 0.1 / (1.0 + count)
  opt = transforms.gsam(rho=sched, alpha=0.0)
  state = opt.init(params)
  grads = jax.grad(parabola)(params)
  for t in range(3):
    u, state = opt.update(grads, state, params, grad_fn=grad_fn)
    # On the parabola ∇L(w+ε) = g + 2ε, and ‖ε‖ = ρ_t.
    eps_norm = float(optax.tree.norm(jax.tree.map(lambda a, b: (a - b) / 2, u, grads)))
    seen.append(eps_norm)
  np.testing.assert_allclose(seen, [0.1, 0.05, 0.1 / 3], rtol=1e-5)


def test_batch_axis_name_averages_perturbed_gradient():
  n = 4
  opt = transforms.sam(rho=0.1, batch_axis_name='d')
  shifts = jnp.arange(n, dtype=jnp.float32)[:, None] * jnp.ones((n, 3))

  def per_device(shift):
    params = {'w': jnp.zeros(3)}
    loss = lambda p: jnp.sum(jnp.square(p['w'] - shift))
    g = jax.grad(loss)(params)
    u, _ = opt.update(g, opt.init(params), params, grad_fn=lambda p, _: jax.grad(loss)(p))
    return u['w']

  out = jax.pmap(per_device, axis_name='d', devices=jax.devices()[:n])(shifts)
  # Per device: g_d = −2 s_d, ε_d = 0.1 g_d/‖g_d‖ (0 for s=0), g_p = 2(ε_d − s_d); then averaged.
  expected = []
  for d in range(n):
    s = np.asarray(shifts[d])
    g = -2 * s
    eps = 0.1 * g / (np.linalg.norm(g) + 1e-12)
    expected.append(2 * (eps - s))
  np.testing.assert_allclose(out, np.broadcast_to(np.mean(expected, 0), (n, 3)), rtol=1e-5, atol=1e-6)


def test_missing_grad_fn_is_a_clear_error():
  opt = transforms.sam()
  params = init_params()
  with pytest.raises(ValueError, match='grad_fn'):
    opt.update(params, opt.init(params), params)


def test_module_docstring_example_runs():
  import doctest
  result = doctest.testmod(transforms, verbose=False)
  assert result.attempted > 0 and result.failed == 0
