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


# --- integer labels (a [B] label broadcast against λ silently gave a [B, B] "label") ---
@pytest.mark.parametrize('policy,kw', [('mixup', {}), ('cutmix', {}), ('multimix', {}),
                                       ('manifold', {'layers': (0,)}), ('none', {})])
def test_integer_labels_are_refused_without_num_classes(policy, kw):
  x, _ = _batch()
  labels = jnp.arange(B) % C
  with pytest.raises(ValueError, match='one-hot or soft labels'):
    mixing.get_policy(policy, **kw)(jax.random.PRNGKey(0), x, labels)


@pytest.mark.parametrize('policy,kw', [('mixup', {}), ('cutmix', {}), ('multimix', {}),
                                       ('manifold', {'layers': (0,)})])
def test_integer_labels_with_num_classes_equal_one_hot(policy, kw):
  x, _ = _batch()
  labels = jnp.arange(B) % C
  one_hot = np.eye(C, dtype=np.float32)[np.asarray(labels)]
  fn = mixing.get_policy(policy, **kw)
  got = fn(jax.random.PRNGKey(4), x, labels, num_classes=C)
  want = fn(jax.random.PRNGKey(4), x, jnp.asarray(one_hot))
  assert got.y.shape == (want.y.shape[0], C)
  np.testing.assert_array_equal(got.y, want.y)
  np.testing.assert_array_equal(got.x, want.x)


def test_labels_of_the_wrong_rank_are_refused():
  x, y = _batch()
  with pytest.raises(ValueError, match=r'\[B, C\]'):
    mixing.mixup(jax.random.PRNGKey(0), x, y[:, :, None])
  with pytest.raises(ValueError, match='num_classes=4'):
    mixing.mixup(jax.random.PRNGKey(0), x, y, num_classes=4)


# --- CutMix's box: the reference arithmetic (clovaai/CutMix-PyTorch rand_bbox, timm) ---
def _reference_box(h, w, lam, cy, cx):
  """rand_bbox transcribed: cut = int(side·√(1−λ)); edges clip(c ∓ cut // 2)."""
  cut_rat = np.sqrt(1.0 - lam)
  cut_h, cut_w = int(h * cut_rat), int(w * cut_rat)
  y0, y1 = np.clip(cy - cut_h // 2, 0, h), np.clip(cy + cut_h // 2, 0, h)
  x0, x1 = np.clip(cx - cut_w // 2, 0, w), np.clip(cx + cut_w // 2, 0, w)
  mask = np.zeros((h, w), np.float32)
  mask[y0:y1, x0:x1] = 1
  return mask


@pytest.mark.parametrize('h,w', [(8, 8), (7, 9), (32, 32), (5, 3), (1, 6)])
def test_cutmix_box_equals_reference_arithmetic(h, w):
  keys = jax.random.split(jax.random.PRNGKey(h * 100 + w), 80)
  lams = jax.vmap(lambda k: mixing.sample_lam(k, 1.0))(keys)
  got = np.asarray(jax.vmap(lambda k, lam: mixing.box_mask(k, lam, h, w))(keys, lams))

  def centre(k):                     # the draws box_mask makes from its key
    k_y, k_x = jax.random.split(k)
    return jax.random.randint(k_y, (), 0, h), jax.random.randint(k_x, (), 0, w)
  cys, cxs = map(np.asarray, jax.vmap(centre)(keys))
  odd = 0
  for i, lam in enumerate(np.asarray(lams)):
    want = _reference_box(h, w, lam, int(cys[i]), int(cxs[i]))
    np.testing.assert_array_equal(got[i], want, err_msg=f'draw {i}, λ {lam}, centre {cys[i], cxs[i]}')
    odd += bool(int(h * np.sqrt(1 - lam)) % 2 or int(w * np.sqrt(1 - lam)) % 2)
  assert odd > 0, 'odd cut sides (where the old box differed) were drawn'


# --- one registry: a policy registered once is valid everywhere ---
def _reverse_pairs(rng, x, y, *, alpha=1.0, num_classes=None):
  """Toy policy: row i mixes with row B−1−i at λ = 0.5 (alpha is ignored)."""
  del rng, alpha
  y = mixing.soft_labels(y, num_classes)
  b = x.shape[0]
  return mixing.interpolate(x, y, jnp.full((b,), 0.5), jnp.arange(b), jnp.arange(b)[::-1])


@pytest.fixture
def toy_policy():
  mixing.register('reverse', _reverse_pairs, knobs=('alpha',), doc='toy: reversed partners')
  yield 'reverse'
  del mixing.POLICIES['reverse']


def test_registered_policy_validates_is_listed_and_trains(toy_policy):
  from gmix_jax import cli, objectives
  from gmix_jax.models import get_model, make_apply_fn
  method = objectives.get_method('gmix', C, mixing={'policy': toy_policy})
  policy = method.mixing.make_policy()
  x, y = _batch((B, 6))
  m = policy(jax.random.PRNGKey(0), x, y)
  np.testing.assert_allclose(m.x[0], 0.5 * x[0] + 0.5 * x[B - 1], rtol=1e-6)
  assert toy_policy in cli.help_text() and 'toy: reversed partners' in cli.help_text()
  # The whole objective (mixing × SAM) builds and runs with it.
  module = get_model('mlp', num_classes=C, hidden_sizes=(8,))
  variables = module.init(jax.random.PRNGKey(0), x, train=False)
  objective = objectives.make_objective(method, make_apply_fn(module))
  batch = {'x': x, 'y': y}
  grads, _, metrics = objective(variables['params'], variables.get('batch_stats', {}), batch,
                                jax.random.PRNGKey(1))
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_register_refuses_unknown_knobs():
  with pytest.raises(ValueError, match='unknown knobs'):
    mixing.register('bad', _reverse_pairs, knobs=('strength',))
  assert 'bad' not in mixing.POLICIES


# --- the policies' own tables: which knobs each reads, which need images ---
def test_policy_tables_follow_the_registry_and_the_variants(toy_policy):
  """``policy_knobs``: a registered policy's knobs; a variant (MixupE) reads
  its base's and its own. ``image_policies``: the ``needs_image`` ones, and a
  variant of one. Both are read at call time."""
  assert mixing.policy_knobs()['mixupe'] == ('alpha', 'lam_mode', 'eta', 'tau', 'mixupe_version')
  assert mixing.policy_knobs()[toy_policy] == ('alpha',)
  assert mixing.image_policies() == {'cutmix'}
  mixing.register('boxes', _reverse_pairs, knobs=('alpha',), needs_image=True)
  try:
    assert mixing.image_policies() == {'cutmix', 'boxes'}
    mixing.VARIANTS['boxes_plus'] = mixing.Variant('boxes', (), 'boxes plus a term')
    assert mixing.image_policies() == {'cutmix', 'boxes', 'boxes_plus'}
    assert mixing.policy_knobs()['boxes_plus'] == ('alpha',)
  finally:
    mixing.VARIANTS.pop('boxes_plus', None)
    del mixing.POLICIES['boxes']


def test_configure_reads_the_tables_not_policy_names(toy_policy):
  """A registered ``needs_image`` policy is refused on feature vectors before
  compiling, as cutmix is; a knob's readers list the registered policy."""
  import types
  import ml_collections
  from gmix_jax import configure, objectives
  assert configure._knob_owners()['mixing', 'alpha'][1][-2:] == (toy_policy, 'mixupe')
  assert configure._knob_owners()['mixing', 'eta'] == ('mixing.policy', ('mixupe',))
  mixing.register('boxes', _reverse_pairs, knobs=('alpha',), needs_image=True)
  try:
    config = ml_collections.ConfigDict({'model': {'name': 'mlp', 'kwargs': {}}})
    ds = types.SimpleNamespace(name='vec', num_classes=C, input_shape=(6,),
                               train_labels=lambda: np.arange(4) % C,
                               test_labels=lambda: np.arange(4) % C)
    method = objectives.get_method('mixup', C, mixing={'policy': 'boxes'})
    with pytest.raises(ValueError, match=r"^mixing.policy='boxes' needs images \[H, W\(, C\)\], "
                                         r"but dataset 'vec' has examples of shape \(6,\)$"):
      configure.validate_data(config, ds, None, method)
  finally:
    del mixing.POLICIES['boxes']
