"""Each objective's gradient against the objective written out by hand.

The hand versions below do not use ``gmix_jax.objectives``: they write the
loss of each method (docs/methods.md § 1-4) as plain JAX on a toy MLP in float64,
take ``jax.grad`` of it, and do the SAM step by hand. Only λ and the partner
permutation are borrowed from ``gmix_jax.mixing`` (tested on its own), so
that both sides see the same random draw.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import toy_models as toy
from gmix_jax import mixing, objectives, sensitivity
from gmix_jax.objectives import MixingConfig, PartitionConfig
from gmix_jax.sharpness import SharpnessRule

B = 8
RNG = jax.random.PRNGKey(42)


@pytest.fixture
def setup(x64):
  params = toy.init_mlp(jax.random.PRNGKey(0), jnp.float64)
  x, labels = toy.data(jax.random.PRNGKey(1), B, jnp.float64)
  y = jax.nn.one_hot(labels, toy.C, dtype=jnp.float64)
  return params, x, labels, y


# ---------------------------------------------------------------- by hand ---
def ce(params, x, y):
  logits, _ = toy.mlp_apply(params, {}, x, True)
  return -jnp.sum(y * jax.nn.log_softmax(logits), axis=-1)


def norm(t):
  return jnp.sqrt(sum(jnp.sum(v ** 2) for v in jax.tree.leaves(t)))


def sam_grad(loss, params, rho):
  g = jax.grad(loss)(params)
  return jax.grad(loss)(jax.tree.map(lambda p, gi: p + rho * gi / norm(g), params, g))


def mixup_rows(key, x, y):
  """λ and π from the library's sampler; the interpolation written here."""
  m = mixing.mixup(key, x, y)
  lam, perm = m.lam[:, None].astype(x.dtype), m.index_b
  return lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]


def split_by_hand(scores, gamma):
  k = int(np.floor(gamma * len(scores) + 0.5))
  order = np.argsort(-np.asarray(scores), kind='stable')
  return np.sort(order[:k]), np.sort(order[k:])


def keys():
  return jax.random.split(RNG)          # (k_mix, k_sharp), as the objective splits


def run(method, params, x, labels, apply_fn=toy.mlp_apply, state=None, **batch):
  obj = objectives.make_objective(method, apply_fn)
  return obj(params, {} if state is None else state, {'x': x, 'y': labels, **batch}, RNG)


def assert_tree_close(a, b, rtol=1e-9, atol=1e-12):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(u, v, rtol=rtol, atol=atol)


# The hand-written versions rank by the per-example estimator (the bgmix preset's is `shared`).
PER_EXAMPLE = sensitivity.SensitivityConfig('per_example')


def scores_of(params, x, y, rho=0.05):
  return sensitivity.per_example(toy.mlp_apply, params, {}, x, y, rho)


# ------------------------------------------------------------------ tests ---
def test_erm(setup):
  params, x, labels, y = setup
  g, _, metrics = run(objectives.get_method('erm', toy.C), params, x, labels)
  assert_tree_close(g, jax.grad(lambda p: jnp.mean(ce(p, x, y)))(params))
  np.testing.assert_allclose(metrics['loss'], jnp.mean(ce(params, x, y)), rtol=1e-12)


def test_mixup(setup):
  params, x, labels, y = setup
  g, _, _ = run(objectives.get_method('mixup', toy.C), params, x, labels)
  xm, ym = mixup_rows(keys()[0], x, y)
  assert_tree_close(g, jax.grad(lambda p: jnp.mean(ce(p, xm, ym)))(params))


def test_sam(setup):
  params, x, labels, y = setup
  g, _, _ = run(objectives.get_method('sam', toy.C), params, x, labels)
  assert_tree_close(g, sam_grad(lambda p: jnp.mean(ce(p, x, y)), params, 0.05))


def test_gmix(setup):
  params, x, labels, y = setup
  method = objectives.get_method('gmix', toy.C, sharpness=SharpnessRule('sam', rho=0.2))
  g, _, metrics = run(method, params, x, labels)
  xm, ym = mixup_rows(keys()[0], x, y)
  loss = lambda p: jnp.mean(ce(p, xm, ym))
  assert_tree_close(g, sam_grad(loss, params, 0.2))
  np.testing.assert_allclose(metrics['loss'], loss(params), rtol=1e-12)
  assert metrics['perturbed_loss'] > metrics['loss']


def test_multimix_is_uniform_mean_over_all_rows(setup):
  params, x, labels, y = setup
  g, _, _ = run(objectives.get_method('multimix', toy.C), params, x, labels)
  m = mixing.multimix(keys()[0], x, y, k=5)
  assert m.x.shape[0] == 5 * B
  lam = m.lam[:, None].astype(x.dtype)
  xm = lam * x[m.index_a] + (1 - lam) * x[m.index_b]
  ym = lam * y[m.index_a] + (1 - lam) * y[m.index_b]
  assert_tree_close(g, jax.grad(lambda p: jnp.mean(ce(p, xm, ym)))(params))


@pytest.mark.parametrize('partners', ['within_subset', 'whole_batch'])
@pytest.mark.parametrize('mix_subset', ['sensitive', 'insensitive'])
def test_bgmix_mix_one_subset(setup, partners, mix_subset):
  params, x, labels, y = setup
  method = objectives.get_method(
      'bgmix', toy.C, partition=PartitionConfig('binary', gamma=0.375, mix_subset=mix_subset, partners=partners),
      sensitivity=PER_EXAMPLE)
  g, _, metrics = run(method, params, x, labels)
  plus, minus = split_by_hand(scores_of(params, x, y), 0.375)
  a, c = (plus, minus) if mix_subset == 'sensitive' else (minus, plus)
  if partners == 'within_subset':
    xa, ya = mixup_rows(keys()[0], x[a], y[a])
  else:
    order = np.concatenate([a, c])
    xo, yo = mixup_rows(keys()[0], x[order], y[order])
    xa, ya = xo[:len(a)], yo[:len(a)]
  # L_BG = (1/B) [Σ_{i∈A} ℓ(x̃_i, ỹ_i) + Σ_{i∈C} ℓ_i]
  loss = lambda p: (jnp.sum(ce(p, xa, ya)) + jnp.sum(ce(p, x[c], y[c]))) / B
  assert_tree_close(g, sam_grad(loss, params, 0.05))
  np.testing.assert_allclose(metrics['loss'], loss(params), rtol=1e-12)


def test_bgmix_pair_within_subsets(setup):
  params, x, labels, y = setup
  method = objectives.get_method('bgmix', toy.C, partition=PartitionConfig('binary', bgmix_rule='pair_within_subsets'),
                                 sensitivity=PER_EXAMPLE)
  g, _, _ = run(method, params, x, labels)
  plus, minus = split_by_hand(scores_of(params, x, y), 0.5)
  xp, yp = mixup_rows(keys()[0], x[plus], y[plus])
  xq, yq = mixup_rows(jax.random.fold_in(keys()[0], 1), x[minus], y[minus])
  loss = lambda p: (jnp.sum(ce(p, xp, yp)) + jnp.sum(ce(p, xq, yq))) / B
  assert_tree_close(g, sam_grad(loss, params, 0.05))


def test_bgmix_sam_on_sensitive(setup):
  params, x, labels, y = setup
  method = objectives.get_method('bgmix', toy.C, partition=PartitionConfig('binary', gamma=0.25, bgmix_rule='sam_on_sensitive'),
                                 sensitivity=PER_EXAMPLE)
  g, _, _ = run(method, params, x, labels)
  plus, minus = split_by_hand(scores_of(params, x, y), 0.25)
  order = np.concatenate([plus, minus])
  xo, yo = mixup_rows(keys()[0], x[order], y[order])
  k = len(plus)
  # Rows with a sensitive first parent at w+ε (ε from their own gradient), the rest at w.
  g_plus = sam_grad(lambda p: jnp.mean(ce(p, xo[:k], yo[:k])), params, 0.05)
  g_minus = jax.grad(lambda p: jnp.mean(ce(p, xo[k:], yo[k:])))(params)
  assert_tree_close(g, jax.tree.map(lambda u, v: k / B * u + (B - k) / B * v, g_plus, g_minus))


def test_dgmix_two_perturbations(setup):
  params, x, labels, y = setup
  method = objectives.get_method('dgmix', toy.C,
                                 partition=PartitionConfig('decomposed', gamma=0.625, rho_plus=0.2, rho_minus=0.01))
  g, _, _ = run(method, params, x, labels)
  plus, minus = split_by_hand(scores_of(params, x, y), 0.625)
  k = len(plus)
  xp, yp = mixup_rows(keys()[0], x[plus], y[plus])
  g_plus = sam_grad(lambda p: jnp.mean(ce(p, xp, yp)), params, 0.2)
  g_minus = sam_grad(lambda p: jnp.mean(ce(p, x[minus], y[minus])), params, 0.01)
  assert_tree_close(g, jax.tree.map(lambda u, v: k / B * u + (B - k) / B * v, g_plus, g_minus))


def test_m_sharpness_groups_each_get_their_own_perturbation(setup):
  params, x, labels, y = setup
  method = objectives.get_method('gmix', toy.C, sharpness=SharpnessRule('sam', m=2))
  g, _, _ = run(method, params, x, labels)
  xm, ym = mixup_rows(keys()[0], x, y)
  per_group = [sam_grad(lambda p, j=j: jnp.mean(ce(p, xm[j:j + 2], ym[j:j + 2])), params, 0.05)
               for j in range(0, B, 2)]
  assert_tree_close(g, jax.tree.map(lambda *gs: sum(gs) / len(gs), *per_group))


def test_stale_estimator_uses_the_batch_scores(setup):
  params, x, labels, y = setup
  method = objectives.get_method('bgmix', toy.C, sensitivity=sensitivity.SensitivityConfig('stale'))
  stale = jnp.arange(B, dtype=jnp.float64)          # the last examples are the most sensitive
  g, _, _ = run(method, params, x, labels, score=stale)
  plus, minus = np.arange(B // 2, B), np.arange(B // 2)
  xa, ya = mixup_rows(keys()[0], x[plus], y[plus])
  loss = lambda p: (jnp.sum(ce(p, xa, ya)) + jnp.sum(ce(p, x[minus], y[minus]))) / B
  assert_tree_close(g, sam_grad(loss, params, 0.05))


# ------------------------------------------------------------ reductions ---
def _grads(name, params, x, labels, **overrides):
  return run(objectives.get_method(name, toy.C, **overrides), params, x, labels)[0]


def test_gmix_with_rho_zero_is_mixup(setup):
  params, x, labels, _ = setup
  assert_tree_close(_grads('gmix', params, x, labels, sharpness=SharpnessRule('sam', rho=0.0)),
                    _grads('mixup', params, x, labels))


@pytest.mark.parametrize('partners', ['within_subset', 'whole_batch'])
def test_bgmix_gamma_one_is_gmix(setup, partners):
  params, x, labels, _ = setup
  assert_tree_close(_grads('bgmix', params, x, labels, partition=PartitionConfig('binary', gamma=1.0, partners=partners)),
                    _grads('gmix', params, x, labels))


def test_bgmix_gamma_zero_is_sam(setup):
  params, x, labels, _ = setup
  assert_tree_close(_grads('bgmix', params, x, labels, partition=PartitionConfig('binary', gamma=0.0)),
                    _grads('sam', params, x, labels))


def test_dgmix_gamma_one_is_gmix(setup):
  params, x, labels, _ = setup
  assert_tree_close(_grads('dgmix', params, x, labels, partition=PartitionConfig('decomposed', gamma=1.0)),
                    _grads('gmix', params, x, labels))


# -------------------------------------------------------- model state -----
def test_batchnorm_state_comes_from_the_clean_pass_only():
  params = toy.init_mlp(jax.random.PRNGKey(0))
  x, labels = toy.data(jax.random.PRNGKey(1), B)
  y = jax.nn.one_hot(labels, toy.C)
  state = toy.bn_state()
  _, new_state, _ = run(objectives.get_method('gmix', toy.C), params, x, labels, toy.bn_apply, state)
  xm, _ = mixup_rows(keys()[0], x, y)
  _, expected = toy.bn_apply(params, state, xm, True)        # the first, unperturbed pass
  np.testing.assert_allclose(new_state['mean'], expected['mean'], rtol=1e-6)


def test_dgmix_state_is_the_share_weighted_average_of_subset_passes():
  params = toy.init_mlp(jax.random.PRNGKey(0))
  x, labels = toy.data(jax.random.PRNGKey(1), B)
  y = jax.nn.one_hot(labels, toy.C)
  state = toy.bn_state()
  method = objectives.get_method('dgmix', toy.C, partition=PartitionConfig('decomposed', gamma=0.25))
  _, new_state, _ = run(method, params, x, labels, toy.bn_apply, state)
  s = sensitivity.per_example(toy.bn_apply, params, state, x, y, 0.05)
  plus, minus = split_by_hand(s, 0.25)
  xp, _ = mixup_rows(keys()[0], x[plus], y[plus])
  _, s_plus = toy.bn_apply(params, state, xp, True)
  _, s_minus = toy.bn_apply(params, state, x[minus], True)
  np.testing.assert_allclose(new_state['mean'], 0.25 * s_plus['mean'] + 0.75 * s_minus['mean'], rtol=1e-6)


# ------------------------------------------------------------ validation ---
def test_invalid_compositions_are_rejected_with_reasons():
  with pytest.raises(ValueError, match="budget='fixed' cannot be combined"):
    objectives.get_method('bgmix', toy.C, mixing=MixingConfig('multimix', budget='fixed'))
  with pytest.raises(ValueError, match='not defined for methods with one perturbation per subset'):
    objectives.get_method('dgmix', toy.C, sharpness=SharpnessRule('sam', m=4))
  with pytest.raises(ValueError, match="'decomposed' needs a sharpness rule"):
    objectives.get_method('dgmix', toy.C, sharpness=SharpnessRule('none'))
  with pytest.raises(ValueError, match='method.name must be one of'):
    objectives.get_method('gmixx', toy.C)
  with pytest.raises(ValueError, match='mixing.alpha must be > 0'):
    MixingConfig('mixup', alpha=0.0)
  with pytest.raises(ValueError, match='partition.gamma'):
    PartitionConfig('binary', gamma=1.2)
  with pytest.raises(ValueError, match='partition.bgmix_rule must be one of'):
    PartitionConfig('binary', bgmix_rule='mix_all')


def test_batch_dependent_checks_happen_before_compilation():
  method = objectives.get_method('gmix', toy.C, sharpness=SharpnessRule('sam', m=3))
  with pytest.raises(ValueError, match=r'sharpness.m=3 must divide the rows per device \(8\)'):
    method.check_batch(8)
  method = objectives.get_method('bgmix', toy.C, sensitivity=sensitivity.SensitivityConfig(chunk=3))
  with pytest.raises(ValueError, match='sensitivity.chunk=3 must divide the per-device batch 8'):
    method.check_batch(8)
