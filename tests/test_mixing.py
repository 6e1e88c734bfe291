"""Mixing policies against independent computations (numpy, explicit loops)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmix_jax import mixing

B, C = 8, 5


def _batch(shape=(B, 6, 6, 3), seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape).astype(np.float32)
  y = np.eye(C, dtype=np.float32)[rng.integers(0, C, shape[0])]
  return jnp.asarray(x), jnp.asarray(y)


@pytest.mark.parametrize('shape', [(B, 4), (B, 6, 6, 3), (B, 2, 3, 4, 5)])
@pytest.mark.parametrize('lam_mode', ['batch', 'example'])
def test_mixup_matches_numpy_formula_any_rank(shape, lam_mode):
  x, y = _batch(shape)
  m = mixing.mixup(jax.random.PRNGKey(1), x, y, alpha=1.0, lam_mode=lam_mode)
  xn, yn, lam, perm = map(np.asarray, (x, y, m.lam, m.index_b))
  for i in range(B):  # explicit per-example loop
    np.testing.assert_allclose(m.x[i], lam[i] * xn[i] + (1 - lam[i]) * xn[perm[i]], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m.y[i], lam[i] * yn[i] + (1 - lam[i]) * yn[perm[i]], rtol=1e-5, atol=1e-6)
  assert sorted(perm.tolist()) == list(range(B)), 'partners must be a permutation'
  np.testing.assert_array_equal(m.index_a, np.arange(B))
  assert lam.shape == (B,)
  if lam_mode == 'batch':
    assert np.unique(lam).size == 1
  else:
    assert np.unique(lam).size == B, 'one λ per example'


def test_mixup_lambda_one_returns_batch():
  x, y = _batch()
  perm = jax.random.permutation(jax.random.PRNGKey(0), B)
  m = mixing.interpolate(x, y, jnp.ones((B,)), jnp.arange(B), perm)
  np.testing.assert_array_equal(m.x, x)
  np.testing.assert_array_equal(m.y, y)


def test_mixup_labels_stay_distributions():
  x, y = _batch()
  for seed in range(5):
    m = mixing.mixup(jax.random.PRNGKey(seed), x, y, lam_mode='example')
    np.testing.assert_allclose(jnp.sum(m.y, -1), 1.0, rtol=1e-6)
    assert bool(jnp.all(m.y >= 0))


def test_mixup_lambda_distribution_is_beta():
  # Beta(α, α) has mean 1/2 and variance 1 / (4(2α + 1)).
  alpha = 0.4
  lam = mixing.sample_lam(jax.random.PRNGKey(0), alpha, (20000,))
  assert abs(float(jnp.mean(lam)) - 0.5) < 0.01
  assert abs(float(jnp.var(lam)) - 1 / (4 * (2 * alpha + 1))) < 0.01


@pytest.mark.parametrize('policy', ['mixup', 'cutmix', 'multimix'])
def test_jit_equals_eager(policy):
  x, y = _batch()
  fn = mixing.get_policy(policy)
  eager = fn(jax.random.PRNGKey(3), x, y)
  jitted = jax.jit(fn)(jax.random.PRNGKey(3), x, y)
  for a, b in zip(eager, jitted):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('seed', range(6))
def test_cutmix_lambda_equals_fraction_of_pixels_kept(seed):
  b, h, w = 4, 10, 7
  # Each image is constant and distinct, so every pixel tells its origin.
  x = jnp.broadcast_to(jnp.arange(b, dtype=jnp.float32)[:, None, None, None] * 10.0, (b, h, w, 2))
  y = jax.nn.one_hot(jnp.arange(b) % C, C)
  m = mixing.cutmix(jax.random.PRNGKey(seed), x, y, alpha=1.0)
  checked = 0
  for i in range(b):
    if int(m.index_b[i]) == i:  # self-partner: pixels cannot tell the origin
      continue
    kept = np.mean(np.asarray(m.x[i, ..., 0]) == float(i) * 10.0)
    np.testing.assert_allclose(m.lam[i], kept, atol=1e-6)
    np.testing.assert_allclose(m.y[i], m.lam[i] * y[i] + (1 - m.lam[i]) * y[m.index_b[i]], atol=1e-6)
    checked += 1
  assert checked > 0


def test_cutmix_box_is_a_rectangle_clipped_at_border():
  for seed in range(20):
    mask = np.asarray(mixing.box_mask(jax.random.PRNGKey(seed), jnp.float32(0.3), 9, 9))
    rows, cols = np.nonzero(mask)
    if rows.size:
      box = np.zeros_like(mask)
      box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = 1
      np.testing.assert_array_equal(mask, box)
      assert rows.max() < 9 and cols.max() < 9


def test_cutmix_rejects_vectors():
  x, y = _batch((B, 4))
  with pytest.raises(ValueError, match='image'):
    mixing.cutmix(jax.random.PRNGKey(0), x, y)


@pytest.mark.parametrize('budget,rows', [('expand', B * 4), ('fixed', B)])
def test_multimix_k_sorted_interpolations_per_pair(budget, rows):
  k = 4
  x, y = _batch((B, 3))
  m = mixing.multimix(jax.random.PRNGKey(5), x, y, k=k, alpha=1.0, budget=budget)
  assert m.x.shape == (rows, 3) and m.y.shape == (rows, C) and m.lam.shape == (rows,)
  lam = np.asarray(m.lam).reshape(-1, k)
  assert np.all(np.diff(lam, axis=1) >= 0), 'λ sorted within each pair'
  a = np.asarray(m.index_a).reshape(-1, k)
  bb = np.asarray(m.index_b).reshape(-1, k)
  assert np.all(a == a[:, :1]) and np.all(bb == bb[:, :1]), 'K rows share one pair'
  np.testing.assert_array_equal(a[:, 0], np.arange(rows // k))
  xn = np.asarray(x)
  for r in range(rows):
    np.testing.assert_allclose(
        m.x[r], m.lam[r] * xn[m.index_a[r]] + (1 - m.lam[r]) * xn[m.index_b[r]], rtol=1e-5, atol=1e-6)


def test_multimix_k1_expand_is_mixup_with_example_lambda():
  x, y = _batch((B, 3))
  mm = mixing.multimix(jax.random.PRNGKey(2), x, y, k=1)
  m = mixing.interpolate(x, y, mm.lam, jnp.arange(B), mm.index_b)
  np.testing.assert_allclose(mm.x, m.x)
  assert sorted(np.asarray(mm.index_b).tolist()) == list(range(B))


def test_bad_knobs_name_the_field():
  x, y = _batch((B, 3))
  with pytest.raises(ValueError, match='lam_mode'):
    mixing.mixup(jax.random.PRNGKey(0), x, y, lam_mode='pair')
  with pytest.raises(ValueError, match='budget'):
    mixing.multimix(jax.random.PRNGKey(0), x, y, budget='half')
  with pytest.raises(ValueError, match="mixing.policy must be one of"):
    mixing.get_policy('mixdown')
