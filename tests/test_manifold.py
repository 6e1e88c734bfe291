"""Manifold Mixup (Verma et al. 2019) against hand-written forwards and input mixup."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fast_compile
import toy_models as toy
from gmix_jax import losses, mixing, models, objectives, parallel, partition, sensitivity
from gmix_jax.sharpness import SharpnessRule

B = 8
RNG = jax.random.PRNGKey(3)


def manifold(layers, **overrides):
  return objectives.get_method('manifold_mixup', toy.C, mixing={'layers': layers, 'alpha': 1.0},
                               **overrides)


def toy_batch(dtype=jnp.float32):
  x, y = toy.data(jax.random.PRNGKey(0), B, dtype)
  return toy.init_mlp(jax.random.PRNGKey(1), dtype), x, y


def draws(key, b, alpha=1.0):
  """λ [B] and partners π of mixup for ``key`` (what manifold uses too)."""
  m = mixing.mixup(key, jnp.zeros((b, 1)), jnp.zeros((b, 2)), alpha=alpha)
  return m.lam, m.index_b


def fast(fn, *args):
  """fn(*args), compiled with ``fast_compile.options()`` (tiny programs compile
  several times faster; what is checked does not depend on it)."""
  return jax.jit(fn).lower(*args).compile(fast_compile.options())(*args)


def close(a, b, rtol):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(u, v, rtol=rtol, atol=rtol * 1e-2)


# -- The sampled point ----------------------------------------------------------
def test_point_is_uniform_over_the_eligible_set_and_lam_pi_are_mixups():
  x, y = jnp.zeros((B, 3)), jax.nn.one_hot(jnp.arange(B) % 2, 2)
  keys = jax.random.split(jax.random.PRNGKey(0), 6000)
  layers = jax.jit(jax.vmap(lambda k: mixing.manifold(k, x, y, layers=(0, 2, 3)).layer))(keys)
  counts = np.bincount(np.asarray(layers), minlength=5)
  assert counts[1] == counts[4] == 0 and counts.sum() == 6000
  # Each of 3 points: 2000 ± 3σ (σ = √(6000·1/3·2/3) ≈ 36.5).
  np.testing.assert_allclose(counts[[0, 2, 3]], 2000, atol=110)
  m, ref = mixing.manifold(keys[0], x, y, layers=(1,)), mixing.mixup(keys[0], x, y, alpha=2.0)
  np.testing.assert_array_equal(m.lam, ref.lam)
  np.testing.assert_array_equal(m.index_b, ref.index_b)
  np.testing.assert_array_equal(m.x, x)                      # inputs left unmixed
  np.testing.assert_allclose(m.y, ref.y)


# -- Input point = input mixup ---------------------------------------------------------
@pytest.mark.parametrize('name,kwargs,shape', [('cnn', {'width': 4}, (8, 8, 1)),
                                               ('mlp', {'hidden_sizes': (6, 5)}, (8, 8, 1))])
def test_input_point_is_input_mixup(name, kwargs, shape):
  module = models.get_model(name, 3, **kwargs)
  params, state = models.init_model(module, jax.random.PRNGKey(0), shape)
  apply_fn = models.make_apply_fn(module)
  assert apply_fn.mix_points == module.mix_points
  rng = np.random.default_rng(0)
  batch = {'x': jnp.asarray(rng.normal(size=(B, *shape)), jnp.float32),
           'y': jnp.asarray(rng.integers(0, 3, B))}
  run = lambda method: jax.jit(objectives.make_objective(method, apply_fn))(params, state, batch, RNG)
  g_man, _, m_man = run(objectives.get_method('manifold_mixup', 3, mixing={'layers': (0,), 'alpha': 1.0}))
  g_mix, _, m_mix = run(objectives.get_method('mixup', 3))
  np.testing.assert_allclose(m_man['loss'], m_mix['loss'], rtol=1e-6)
  close(g_man, g_mix, 1e-5)


# -- Hidden points = hand-written two-stage forwards ------------------------------------
def test_toy_hidden_point_equals_two_stage_forward_plain_and_with_sam(x64):
  params, x, labels = toy_batch(jnp.float64)
  y = jax.nn.one_hot(labels, toy.C, dtype=jnp.float64)
  k_mix, k_sharp = jax.random.split(RNG)
  lam, perm = draws(k_mix, B)
  lam = lam[:, None].astype(jnp.float64)

  def loss(p):                         # first part, mix by hand, the rest
    h = jnp.tanh(x @ p['w1'] + p['b1'])
    logits = (lam * h + (1 - lam) * h[perm]) @ p['w2'] + p['b2']
    return jnp.mean(losses.soft_cross_entropy(logits, lam * y + (1 - lam) * y[perm]))

  g, _, metrics = fast(objectives.make_objective(manifold((1,)), toy.mlp_apply),
      params, {}, {'x': x, 'y': labels}, RNG)
  value, grad = fast(jax.value_and_grad(loss), params)
  np.testing.assert_allclose(metrics['loss'], value, rtol=1e-12)
  close(g, grad, 1e-10)

  rho = 0.2                            # G-Mix with manifold mixing: SAM by hand
  expected = fast(lambda p: sam_by_hand(loss, p, rho), params)
  g_sam, _, _ = fast(objectives.make_objective(
      manifold((1,), sharpness=SharpnessRule('sam', rho=rho)), toy.mlp_apply),
      params, {}, {'x': x, 'y': labels}, RNG)
  close(g_sam, expected, 1e-9)


def sam_by_hand(loss, params, rho):
  """∇L(w + ρ g/‖g‖), g = ∇L(w)."""
  g = jax.grad(loss)(params)
  norm = jnp.sqrt(sum(jnp.sum(v ** 2) for v in jax.tree.leaves(g)))
  return jax.grad(loss)(jax.tree.map(lambda w, d: w + rho * d / norm, params, g))


def hidden_mix(layer, lam, perm):
  return mixing.HiddenMix(jnp.int32(layer), jnp.asarray(lam, jnp.float32), perm)


@pytest.mark.parametrize('layer', [1, 2])
def test_flax_mlp_hidden_point_equals_two_stage_forward(layer):
  module = models.MLP(3, hidden_sizes=(6, 5))
  x = jax.random.normal(jax.random.PRNGKey(0), (B, 4))
  params, _ = models.init_model(module, jax.random.PRNGKey(1), (4,))
  lam, perm = jnp.linspace(0.1, 0.9, B), jax.random.permutation(jax.random.PRNGKey(2), B)
  dense = lambda name, h: h @ params[name]['kernel'] + params[name]['bias']
  mix = lambda h: lam[:, None] * h + (1 - lam[:, None]) * h[perm]
  h = jax.nn.relu(dense('dense0', x))
  h = mix(h) if layer == 1 else h
  h = jax.nn.relu(dense('dense1', h))
  h = mix(h) if layer == 2 else h
  logits, _ = models.make_apply_fn(module)(params, {}, x, True, mix=hidden_mix(layer, lam, perm))
  np.testing.assert_allclose(logits, dense('head', h), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('layer', [1, 2, 3])
def test_cnn_hidden_point_equals_two_stage_forward(layer):
  module = models.CNN(3, width=4)
  x = jax.random.normal(jax.random.PRNGKey(0), (B, 8, 8, 1))
  params, _ = models.init_model(module, jax.random.PRNGKey(1), (8, 8, 1))
  lam, perm = jnp.linspace(0.1, 0.9, B), jax.random.permutation(jax.random.PRNGKey(2), B)
  mix = lambda h: lam[:, None, None, None] * h + (1 - lam[:, None, None, None]) * h[perm]
  h = x
  for i, width in enumerate((4, 8, 16)):   # each stride-2 conv layer, applied on its own
    h = jax.nn.relu(nn.Conv(width, (3, 3), strides=(2, 2)).apply({'params': params[f'conv{i}']}, h))
    h = mix(h) if layer == i + 1 else h
  expected = jnp.mean(h, axis=(1, 2)) @ params['head']['kernel'] + params['head']['bias']
  logits, _ = models.make_apply_fn(module)(params, {}, x, True, mix=hidden_mix(layer, lam, perm))
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name,module', [
    ('resnet', models.ResNet(3, stage_sizes=(1, 1), width=4)),
    ('preact', models.PreActResNet(3, stage_sizes=(1, 1), width=4)),
    ('wrn', models.WideResNet(3, depth=10, width=1))])
def test_every_point_of_the_resnets_mixes(name, module):
  """With running statistics (per-example forward), λ = 0 at any point j makes
  row r the forward of its partner: f(x)[π]; λ = 1 leaves f(x) unchanged."""
  del name
  x = jax.random.normal(jax.random.PRNGKey(0), (B, 8, 8, 3))
  params, state = models.init_model(module, jax.random.PRNGKey(1), (8, 8, 3))
  apply_fn = models.make_apply_fn(module)
  perm = jax.random.permutation(jax.random.PRNGKey(2), B)
  forward = jax.jit(lambda layer, lam: apply_fn(params, state, x, False,
                                                mix=mixing.HiddenMix(layer, lam, perm))[0])
  plain = apply_fn(params, state, x, False)[0]
  assert module.mix_points == 1 + (3 if isinstance(module, models.WideResNet) else 2)
  for j in range(module.mix_points):
    np.testing.assert_allclose(forward(j, jnp.zeros(B)), plain[perm], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(forward(j, jnp.ones(B)), plain, rtol=1e-6, atol=1e-6)


# -- Composition with the split ---------------------------------------------------------
def test_bgmix_mixes_hidden_states_of_the_sensitive_subset_only(x64):
  """BG-Mix (mix_one_subset, within_subset) with manifold mixing at the hidden
  layer and SAM, against the hand-written L_BG with the same split."""
  params, x, labels = toy_batch(jnp.float64)
  y = jax.nn.one_hot(labels, toy.C, dtype=jnp.float64)
  rho = 0.1
  method = manifold((1,), sharpness=SharpnessRule('sam', rho=rho), partition={'rule': 'binary'})
  s = sensitivity.scores(method.sensitivity, toy.mlp_apply, params, {}, x, y, method.sensitivity_rho)
  split = partition.top_k_split(s, partition.num_sensitive(0.5, B))
  a, c = split.sensitive, split.insensitive
  k_mix, _ = jax.random.split(RNG)
  lam, perm = draws(k_mix, a.shape[0])          # partners within S⁺
  lam = lam[:, None].astype(jnp.float64)

  def loss(p):
    h = jnp.tanh(x[a] @ p['w1'] + p['b1'])
    logits_a = (lam * h + (1 - lam) * h[perm]) @ p['w2'] + p['b2']
    ya = lam * y[a] + (1 - lam) * y[a][perm]
    logits_c = jnp.tanh(x[c] @ p['w1'] + p['b1']) @ p['w2'] + p['b2']
    return (jnp.sum(losses.soft_cross_entropy(logits_a, ya)) +
            jnp.sum(losses.soft_cross_entropy(logits_c, y[c]))) / B

  expected = fast(lambda p: sam_by_hand(loss, p, rho), params)
  g, _, metrics = fast(objectives.make_objective(method, toy.mlp_apply),
                       params, {}, {'x': x, 'y': labels}, RNG)
  np.testing.assert_allclose(metrics['loss'], fast(loss, params), rtol=1e-12)
  close(g, expected, 1e-9)


@pytest.mark.parametrize('overrides', [
    dict(partition={'rule': 'binary', 'partners': 'whole_batch'}),
    dict(partition={'rule': 'decomposed'}, sharpness={'name': 'gsam', 'm': 'global'})])
def test_cnn_gradients_are_finite_with_sam_and_the_splits(overrides):
  module = models.CNN(3, width=4, norm='batch')
  params, state = models.init_model(module, jax.random.PRNGKey(0), (8, 8, 1))
  batch = {'x': jax.random.normal(jax.random.PRNGKey(1), (B, 8, 8, 1)), 'y': jnp.arange(B) % 3}
  method = objectives.get_method('manifold_gmix', 3, sensitivity={'estimator': 'shared'},
                                 **overrides)
  objective = objectives.make_objective(method, models.make_apply_fn(module), axis_name='batch')
  g, new_state, metrics = jax.jit(jax.vmap(objective, in_axes=(None, None, None, None), axis_name='batch',
                                   axis_size=1))(params, state, batch, RNG)
  assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves((g, metrics)))
  assert sum(float(jnp.sum(jnp.abs(v))) for v in jax.tree.leaves(g)) > 0
  # BatchNorm statistics come from the clean (unperturbed) pass and moved.
  assert not np.allclose(new_state['batch_stats']['bn0']['mean'],
                         state['batch_stats']['bn0']['mean'])


def test_runs_under_shard_map_with_per_device_points():
  method = objectives.get_method('manifold_gmix', toy.C)
  optimizer = optax.sgd(0.1)
  params = toy.init_mlp(jax.random.PRNGKey(0))
  start = np.asarray(params['w1'])                 # the step donates its state
  state = parallel.create_train_state(params, {}, optimizer, 0)
  mesh = parallel.make_mesh(2)
  step = parallel.shard_map_step(parallel.make_per_device_step(
      objectives.make_objective(method, toy.mlp_apply), optimizer), mesh)
  state = parallel.replicate_on_mesh(state, mesh)
  x, y = toy.data(jax.random.PRNGKey(1), 2 * B)
  for _ in range(2):
    state, metrics = step(state, {'x': x, 'y': y})
  assert np.isfinite(float(metrics['loss'])) and int(state.step) == 2
  assert not np.allclose(jax.device_get(state.params['w1']), start)


# -- Bad input ---------------------------------------------------------------------
def test_a_model_without_mixing_points_is_rejected_with_how_to_opt_in():
  with pytest.raises(ValueError, match='apply_fn.mix_points'):
    objectives.make_objective(manifold(None), toy.bn_apply)
  # The contract without the hook still holds for every other policy.
  objectives.make_objective(objectives.get_method('mixup', toy.C), toy.bn_apply)


def test_bad_layers_and_undefined_compositions_are_rejected():
  with pytest.raises(ValueError, match=r'mixing.layers=\(0, 2\) must lie in \[0, 2\)'):
    objectives.make_objective(manifold((0, 2)), toy.mlp_apply)
  with pytest.raises(ValueError, match='mixing.layers must be None'):
    objectives.MixingConfig('manifold', layers=(-1,))
  with pytest.raises(ValueError, match="mixing.layers must be mixing points such as '0,1,2'"):
    objectives.MixingConfig('manifold', layers='0,a')
  assert objectives.MixingConfig('manifold', layers='0, 1,2').layers == (0, 1, 2)
  with pytest.raises(ValueError, match="'sam_on_sensitive'"):
    manifold(None, partition={'rule': 'binary', 'bgmix_rule': 'sam_on_sensitive'})
  with pytest.raises(ValueError, match="partners='whole_batch'"):
    manifold(None, sharpness=SharpnessRule('sam'),
             partition={'rule': 'decomposed', 'partners': 'whole_batch'})
  with pytest.raises(ValueError, match=r"sharpness.m=4 \(groups\) is not defined for mixing.policy='manifold'"):
    manifold(None, sharpness=SharpnessRule('sam', m=4))


def test_default_points_are_all_of_the_models():
  method = manifold(None)
  policy = method.mixing.make_policy(toy.mlp_apply.mix_points)
  x, y = jnp.zeros((B, 3)), jnp.zeros((B, 2))
  seen = {int(policy(jax.random.PRNGKey(i), x, y).layer) for i in range(40)}
  assert seen == {0, 1}


@pytest.mark.parametrize('name,kwargs,points', [
    ('resnet50', dict(stage_sizes=(1, 1), width=4), 3),
    ('vit_ti16', dict(patch=8, width=16, depth=2, mlp_dim=32, num_heads=2, pool='gap'), 3)])
def test_every_point_of_the_imagenet_models_mixes(name, kwargs, points):
  """As above for ResNet-50 and ViT (random weights: ViT's head starts at 0):
  λ = 0 at point j gives the partner's logits, λ = 1 the unmixed ones."""
  module = models.get_model(name, 3, **kwargs)
  shape = (2, 16, 16, 3)
  variables = jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x),
                             jax.ShapeDtypeStruct(shape, jnp.float32))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda v: jnp.asarray(0.2 * rng.normal(size=v.shape), jnp.float32),
                        variables['params'])
  state = {k: jax.tree.map(lambda v: jnp.ones(v.shape), v) for k, v in variables.items()
           if k != 'params'}
  x = jax.random.normal(jax.random.PRNGKey(0), (B, *shape[1:]))
  apply_fn = models.make_apply_fn(module)
  assert apply_fn.mix_points == module.mix_points == points
  perm = jax.random.permutation(jax.random.PRNGKey(2), B)
  forward = jax.jit(lambda layer, lam: apply_fn(params, state, x, False,
                                                mix=mixing.HiddenMix(layer, lam, perm))[0],
                    compiler_options={'xla_backend_optimization_level': 0})
  plain = forward(-1, jnp.zeros(B))          # no point is -1: the unmixed forward
  assert np.std(np.asarray(plain)) > 1e-2
  for j in range(points):
    np.testing.assert_allclose(forward(j, jnp.zeros(B)), plain[perm], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(forward(j, jnp.ones(B)), plain, rtol=1e-6, atol=1e-6)
    lam = jnp.full(B, 0.5)                   # a real mix differs from both
    assert not np.allclose(forward(j, lam), plain, atol=1e-3)
