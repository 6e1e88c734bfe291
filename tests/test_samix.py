"""SAMix / SAMix^P (gmix_jax.samix): every formula against an independent
computation, the two losses' gradient isolation, the extra state in the
data-parallel step, and end-to-end runs with exact resume."""
import functools
import importlib
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import fast_compile
from configs import digits
from gmix_jax import configure, models, outputs, parallel, samix, sharpness, train
from test_reliability import assert_same_state, finalized_steps
from test_train import read_metrics

C = 5

# The tests' own programs compare only within this run: compiled the fast way.
fast_jit = fast_compile.jit


def tiny_cnn(width=4):
  module = models.get_model('cnn', C, width=width)
  params, state = models.init_model(module, jax.random.PRNGKey(0), (8, 8, 1))
  return module, params, state


def batch(key, b=6):
  kx, ky = jax.random.split(key)
  return jax.random.normal(kx, (b, 8, 8, 1)), jax.random.randint(ky, (b,), 0, C)


# -- Pure pieces -------------------------------------------------------------------
@pytest.mark.parametrize('feat_hw,image_hw', [((4, 4), (8, 8)), ((2, 3), (7, 12))])
def test_mask_is_in_unit_interval_and_of_image_size(feat_hw, image_hw):
  b = 5
  kf, kp = jax.random.split(jax.random.PRNGKey(1))
  # Large features, so the sigmoid saturates and bilinear upsampling is the only
  # thing that could leave [0, 1].
  feats = 50.0 * jax.random.normal(kf, (b, *feat_hw, 3))
  block = samix.MixBlock(dim=8)
  lam = jnp.linspace(0.0, 1.0, b)
  # Compiled whole (op-by-op dispatch would compile every primitive on its own).
  init = fast_jit(lambda k, f, l: block.init(k, f, f[::-1], l, image_hw)['params'])
  phi = jax.tree.map(lambda p: 10.0 * p, init(kp, feats, lam))
  mask = fast_jit(lambda p, f, l: block.apply({'params': p}, f, f[::-1], l, image_hw))(
      phi, feats, lam)
  assert mask.shape == (b, *image_hw)
  assert float(mask.min()) >= 0.0 and float(mask.max()) <= 1.0
  assert float(mask.max() - mask.min()) > 0.1, 'a non-trivial mask'


@pytest.mark.parametrize('shape', [(3, 4, 5), (3, 4, 5, 2)])
def test_mix_images_formula(shape, x64):
  rng = np.random.default_rng(0)
  x, xp = rng.normal(size=shape), rng.normal(size=shape)
  s = rng.uniform(size=shape[:3])
  expected = np.empty(shape)
  for idx in np.ndindex(*shape):
    expected[idx] = x[idx] * (1 - s[idx[:3]]) + xp[idx] * s[idx[:3]]
  np.testing.assert_allclose(samix.mix_images(jnp.asarray(x), jnp.asarray(xp), jnp.asarray(s)),
                             expected, rtol=1e-6)


def test_eta_bce_against_a_loop(x64):
  rng = np.random.default_rng(0)
  b, c = 4, 6
  z = rng.normal(size=(b, c)) * 3
  a, p = np.array([0, 1, 2, 3]), np.array([1, 1, 5, 0])     # row 1: both parents class 1
  lam = rng.uniform(size=b)
  eta = 0.3
  expected = np.zeros(b)
  for i in range(b):
    for k in range(c):
      t = lam[i] * (k == a[i]) + (1 - lam[i]) * (k == p[i])
      sig = 1 / (1 + math.exp(-z[i, k]))
      w = 1.0 if k in (a[i], p[i]) else eta
      expected[i] -= w * (t * math.log(sig) + (1 - t) * math.log(1 - sig))
  got = samix.eta_bce(jnp.asarray(z), jax.nn.one_hot(a, c), jax.nn.one_hot(p, c),
                      jnp.asarray(lam), eta)
  np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_eta_acts_in_the_bce_form_and_is_inert_in_the_softmax_form(x64):
  """The docstring's claim: η-weighting the non-target classes of a softmax CE
  changes nothing (their label is 0); in the BCE form it does."""
  rng = np.random.default_rng(1)
  z = jnp.asarray(rng.normal(size=(3, 5)))
  ya, yb = jax.nn.one_hot(jnp.array([0, 2, 4]), 5), jax.nn.one_hot(jnp.array([1, 2, 3]), 5)
  lam = jnp.array([0.3, 0.5, 0.9])
  target = lam[:, None] * ya + (1 - lam[:, None]) * yb

  def softmax_form(logits, eta):
    w = jnp.where(ya + yb > 0, 1.0, eta)
    return jnp.sum(-w * target * jax.nn.log_softmax(logits), -1)
  for f in (softmax_form, lambda lg, eta: jax.grad(lambda q: jnp.sum(softmax_form(q, eta)))(lg)):
    np.testing.assert_array_equal(f(z, 0.0), f(z, 1.0))
  assert not np.allclose(samix.eta_bce(z, ya, yb, lam, 0.0), samix.eta_bce(z, ya, yb, lam, 1.0))


def test_momentum_schedule_formula():
  m0, total = 0.99, 200
  for t in (0, 17, 50, 100, 150, 200, 250):
    expected = 1 - (1 - m0) * (1 + math.cos(math.pi * min(t / total, 1.0))) / 2
    assert float(samix.momentum(t, total, m0)) == pytest.approx(expected, abs=1e-7)
  assert float(samix.momentum(0, total, m0)) == pytest.approx(m0)
  assert float(samix.momentum(total, total, m0)) == 1.0


def test_ema_update_formula():
  rng = np.random.default_rng(0)
  ema = {'w': rng.normal(size=(3, 2)).astype(np.float32), 'n': np.int32(4)}
  online = {'w': rng.normal(size=(3, 2)).astype(np.float32), 'n': np.int32(9)}
  out = samix.ema_update(jax.tree.map(jnp.asarray, ema), jax.tree.map(jnp.asarray, online), 0.75)
  np.testing.assert_allclose(out['w'], 0.75 * ema['w'] + 0.25 * online['w'], rtol=1e-6)
  assert int(out['n']) == 9, 'counters follow the online copy'


# -- The two losses' gradients -------------------------------------------------------
@functools.lru_cache(maxsize=None)          # built once for the tests below (nothing mutates it)
def setup_losses():
  module, params, state = tiny_cnn()
  apply_fn = models.make_apply_fn(module)
  features_fn = samix.make_features_fn(module, 'conv0')
  x, y = batch(jax.random.PRNGKey(2))
  y = jax.nn.one_hot(y, C)
  perm = jnp.array([3, 0, 5, 1, 2, 4])
  lam = jnp.full((6,), 0.3)
  block = samix.MixBlock(dim=8)
  features_fn = fast_jit(features_fn)        # each piece compiled whole, not op by op
  feats = features_fn(params, state, x)
  phi = fast_jit(lambda k, f, l: block.init(k, f, f, l, (8, 8))['params'])(
      jax.random.PRNGKey(3), feats, lam)
  ema = {'params': jax.tree.map(lambda p: p * 0.9, params), 'model_state': state}
  return module, apply_fn, features_fn, params, state, x, y, perm, lam, block, phi, ema


def test_backbone_gets_no_gradient_through_the_mask():
  (module, apply_fn, features_fn, params, state, x, y, perm, lam, block, phi,
   ema) = setup_losses()
  feats = features_fn(ema['params'], state, x)
  mask_of = lambda p: block.apply({'params': p}, feats, feats[perm], lam, (8, 8))

  def through_mask(p):
    return samix.backbone_loss(params, state, apply_fn, x, y, perm, lam, mask_of(p), 1.0)[0]
  g_phi = fast_jit(jax.grad(through_mask))(phi)
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(g_phi))

  # The backbone's gradient is that of a hand-written loss on a constant mask.
  mask = np.asarray(fast_jit(mask_of)(phi))
  x_np, y_np, p_np = np.asarray(x), np.asarray(y), np.asarray(perm)
  x_mix = x_np * (1 - mask[..., None]) + x_np[p_np] * mask[..., None]
  y_mix = 0.3 * y_np + 0.7 * y_np[p_np]

  def hand(p):
    ce = lambda z, t: -jnp.mean(jnp.sum(t * (z - jax.scipy.special.logsumexp(z, -1, keepdims=True)), -1))
    return (ce(module.apply({'params': p}, x_mix), y_mix) +
            0.5 * ce(module.apply({'params': p}, x_np), y_np))
  g = fast_jit(jax.grad(lambda p: samix.backbone_loss(p, state, apply_fn, x, y, perm, lam,
                                                     jnp.asarray(mask), 0.5)[0]))(params)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(fast_jit(jax.grad(hand))(params))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_mixblock_loss_gives_no_gradient_into_the_ema_network():
  (_, apply_fn, features_fn, params, state, x, y, perm, lam, block, phi,
   ema) = setup_losses()
  feats = features_fn(ema['params'], state, x)

  def loss(phi, ema, feats):
    return samix.mixblock_loss(phi, ema, block, apply_fn, feats, x, y, perm, lam, 0.1, 0.1)[0]
  g_phi, g_ema, g_feats = fast_jit(jax.grad(loss, argnums=(0, 1, 2)))(phi, ema, feats)
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves((g_ema, g_feats)))
  assert sum(float(jnp.sum(jnp.abs(g))) for g in jax.tree.leaves(g_phi)) > 0
  # And the value: η-BCE of the EMA network on the mixed image + β·|mean(s) − (1−λ)|.
  @fast_jit
  def expected(phi, ema, feats):
    mask = block.apply({'params': phi}, feats, feats[perm], lam, (8, 8))
    logits = apply_fn(ema['params'], state, samix.mix_images(x, x[perm], mask), False)[0]
    return (jnp.mean(samix.eta_bce(logits, y, y[perm], lam, 0.1)) +
            0.1 * jnp.mean(jnp.abs(jnp.mean(mask, (1, 2)) - 0.7)))
  np.testing.assert_allclose(fast_jit(loss)(phi, ema, feats), expected(phi, ema, feats), rtol=1e-6)


# -- The extra state in the data-parallel step -----------------------------------------
def build_step(pretrained=False, total=10, n_dev=2, source_extra=None):
  module, params, state = tiny_cnn()
  apply_fn = models.make_apply_fn(module)
  cfg = samix.SAMixConfig(pretrained=pretrained, source_workdir='x' if pretrained else None,
                          momentum=0.9, feature_layer='conv0', mixblock_dim=8)
  restore = lambda wd: (0, {'extra': source_extra})
  objective, extra, update = samix.build(cfg, 'cnn', module, apply_fn, (8, 8, 1), C, total,
                                         params, state, jax.random.PRNGKey(4), restore=restore)
  optimizer = optax.sgd(0.1)
  ts = parallel.create_train_state(params, state, optimizer, 0, extra=extra)
  step = parallel.make_per_device_step(objective, optimizer, extra_update=update)
  x, y = batch(jax.random.PRNGKey(5), 4 * n_dev)
  return ts, step, {'x': np.asarray(x), 'y': np.asarray(y)}


@functools.lru_cache(maxsize=None)
def default_step():
  """``build_step()`` and its shard_map program on 2 devices, built and compiled
  once for the tests that use it; the state is a host copy, so the donating
  step never consumes it."""
  ts, step, data = build_step()
  mesh = parallel.make_mesh(2)
  return jax.device_get(ts), step, data, mesh, parallel.shard_map_step(step, mesh)


def test_step_updates_the_ema_by_its_formula_and_the_mixblock_by_its_optimizer():
  ts, step, data, mesh, fn = default_step()
  before = ts
  after = jax.device_get(fn(parallel.replicate_on_mesh(ts, mesh), data)[0])
  m = 1 - (1 - 0.9) * (1 + math.cos(0.0)) / 2                 # step 0: m = m0
  for e0, w1, e1 in zip(jax.tree.leaves(before.extra['ema']['params']),
                        jax.tree.leaves(after.params), jax.tree.leaves(after.extra['ema']['params'])):
    np.testing.assert_allclose(e1, m * e0 + (1 - m) * w1, rtol=1e-6, atol=1e-7)
  assert int(after.extra['mixblock_opt'][0].count) == 1
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before.extra['mixblock']),
                                                      jax.tree.leaves(after.extra['mixblock'])))


def test_pmap_and_shard_map_give_the_same_state():
  ts, step, data, mesh, sm = default_step()
  a, b = parallel.replicate_on_mesh(ts, mesh), parallel.replicate(ts, 2)
  pm = parallel.pmap_step(step, devices=jax.devices()[:2])
  for _ in range(2):
    a, _ = sm(a, data)
    b, _ = pm(b, parallel.shard_batch(data, 2))
  for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(parallel.unreplicate(b))):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_pretrained_step_keeps_mixblock_and_ema_frozen():
  src = default_step()[0]
  source = {'ema': src.extra['ema'], 'mixblock': src.extra['mixblock']}
  source = jax.tree.map(lambda a: a + 0.01, source)        # not what a fresh init gives
  ts, step, data = build_step(pretrained=True, source_extra=source)
  mesh = parallel.make_mesh(2)
  after, metrics = parallel.shard_map_step(step, mesh)(parallel.replicate_on_mesh(ts, mesh), data)
  assert_same_state(jax.device_get(after.extra), source)
  assert 'mixblock_loss' not in metrics and np.isfinite(float(metrics['loss']))


# -- End to end: train_and_evaluate, save / resume ------------------------------------------
@pytest.fixture(scope='module')
def data(tmp_path_factory):
  return tmp_path_factory.mktemp('data')


def e2e_config(method, data_dir, **samix_fields):
  c = digits.get_config(method)
  c.dataset.data_dir = str(data_dir)
  c.dataset.examples_per_class = 4          # 40 examples -> 2 steps of 20 per epoch
  c.model.kwargs = {'width': 4, 'norm': 'none'}
  c.batch_size = 20
  c.num_epochs = 3                          # 6 steps
  c.num_devices = 2
  c.log_every_steps = 1
  c.checkpoint_every_steps = 1
  c.keep_checkpoints = 10
  c.progress = False
  c.method.samix.momentum = 0.9             # the EMA moves visibly in 6 steps
  for k, v in samix_fields.items():
    c.method.samix[k] = v
  return c


def run_interrupted(config, workdir, stop_at=3):
  """Stops after ``stop_at`` steps (a NaN batch with nan_policy=stop keeps the
  checkpoint of step ``stop_at``, mid-epoch), then resumes with the same config."""
  config.debug_nan_step = stop_at
  with pytest.raises(FloatingPointError):
    train.train_and_evaluate(config, workdir)
  assert finalized_steps(workdir)[-1] == stop_at
  config.debug_nan_step = None
  return train.train_and_evaluate(config, workdir)


def comparable(records):
  return [{k: v for k, v in r.items() if k not in outputs.WALL_CLOCK_FIELDS} for r in records]


@pytest.fixture(scope='module')
def samix_run(data, tmp_path_factory):
  root = tmp_path_factory.mktemp('samix')
  train.train_and_evaluate(e2e_config('samix', data), str(root / 'straight'))
  return root


@pytest.mark.slow
def test_samix_end_to_end_resume_is_exact(samix_run, data, tmp_path):
  straight = str(samix_run / 'straight')
  records = read_metrics(straight)
  assert [r['step'] for r in records if r['split'] == 'train'] == [1, 2, 3, 4, 5, 6]
  assert all(np.isfinite(r['mixblock_loss']) and 0 <= r['mask_mean'] <= 1
             for r in records if r['split'] == 'train')
  step, state = train.restore_state(straight)
  assert step == 6 and set(state['extra']) == {'ema', 'mixblock', 'mixblock_opt'}
  run_interrupted(e2e_config('samix', data), str(tmp_path / 'resumed'))
  assert comparable(read_metrics(tmp_path / 'resumed')) == comparable(records)
  assert_same_state(train.restore_state(str(tmp_path / 'resumed'))[1], state)


@pytest.mark.slow
def test_samix_p_loads_freezes_and_resumes_exactly(samix_run, data, tmp_path):
  source = str(samix_run / 'straight')
  config = lambda: e2e_config('samix_p', data, source_workdir=source)
  train.train_and_evaluate(config(), str(tmp_path / 'straight'))
  run_interrupted(config(), str(tmp_path / 'resumed'))
  _, src = train.restore_state(source)
  _, straight = train.restore_state(str(tmp_path / 'straight'))
  _, resumed = train.restore_state(str(tmp_path / 'resumed'))
  assert_same_state(resumed, straight)
  assert_same_state(straight['extra'], {'ema': src['extra']['ema'],
                                        'mixblock': src['extra']['mixblock']})
  assert comparable(read_metrics(tmp_path / 'resumed')) == comparable(
      read_metrics(tmp_path / 'straight'))


@pytest.mark.parametrize('method,edit,message', [
    ('samix_p', lambda c: None, r'method.samix.source_workdir must be set for samix_p'),
    ('samix_p', lambda c: c.method.samix.update(source_workdir='/nonexistent/wd'),
     r"source_workdir='/nonexistent/wd': no checkpoint found"),
    ('samix', lambda c: setattr(c, 'model', ml_collections.ConfigDict(
        {'name': 'mlp', 'kwargs': {'hidden_sizes': (8,)}})),
     r"SAMix needs an encoder with a spatial feature map: model.name must be one of \[.*'cnn'"),
    ('samix', lambda c: c.method.mixing.update(policy='cutmix'),
     r"method.mixing \{'policy': 'cutmix'\} cannot be combined with method.name='samix'"),
    ('samix', lambda c: c.method.samix.update(eta=-1.0), r'method.samix.eta must be >= 0'),
    ('samix', lambda c: c.method.sharpness.update(rule='gsam', rho_schedule='lr'),
     r"sharpness.rho_schedule='lr' is not implemented for method.name='samix'"),
    ('samix', lambda c: c.method.samix.update(momentum=1.5),
     r'method.samix.momentum must be in \[0, 1\]'),
])
def test_bad_samix_config_fails_before_any_work(method, edit, message, tmp_path):
  c = e2e_config(method, tmp_path / 'data')
  edit(c)
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(c, str(tmp_path / 'wd'))
  assert not os.path.exists(tmp_path / 'data'), 'no data was prepared'


@pytest.mark.slow
def test_samix_p_refuses_an_incompatible_source(samix_run, data, tmp_path):
  other = e2e_config('samix_p', data, source_workdir=str(samix_run / 'straight'))
  other.model.kwargs = {'width': 8, 'norm': 'none'}
  with pytest.raises(ValueError, match=r'that run differs in model'):
    train.train_and_evaluate(other, str(tmp_path / 'wd'))
  # A workdir of another method.
  c = e2e_config('samix_p', data, source_workdir=str(tmp_path / 'erm'))
  os.makedirs(tmp_path / 'erm' / 'checkpoints' / '1')
  with open(tmp_path / 'erm' / 'config.json', 'w') as f:
    f.write('{"method": {"name": "erm"}}')
  with pytest.raises(ValueError, match=r"that run's method.name is 'erm'; samix_p needs"):
    train.train_and_evaluate(c, str(tmp_path / 'wd2'))


def test_bad_feature_layer_fails_before_compiling(data, tmp_path):
  c = e2e_config('samix', data, feature_layer='head')
  with pytest.raises(ValueError, match=r"feature_layer='head' outputs shape \(10,\)"):
    train.train_and_evaluate(c, str(tmp_path / 'wd'))
  c = e2e_config('samix', data, feature_layer='conv9')
  with pytest.raises(ValueError, match=r"feature_layer='conv9' is not a layer of this model"):
    train.train_and_evaluate(c, str(tmp_path / 'wd'))
  assert not os.path.exists(tmp_path / 'wd' / 'checkpoints')


def test_sam_on_the_backbone_loss_composes():
  """ρ = 0 SAM is the plain gradient (ε = 0); ρ > 0 changes it and reports L(w + ε)."""
  module, params, state = tiny_cnn()
  apply_fn = models.make_apply_fn(module)
  cfg = samix.SAMixConfig(feature_layer='conv0', mixblock_dim=8)
  x, y = batch(jax.random.PRNGKey(6))
  out = {}
  for name, rule in (('plain', sharpness.SharpnessRule('none')),
                     ('rho0', sharpness.SharpnessRule('sam', rho=0.0)),
                     ('sam', sharpness.SharpnessRule('sam', rho=0.5))):
    objective, extra, _ = samix.build(cfg, 'cnn', module, apply_fn, (8, 8, 1), C, 10, params,
                                      state, jax.random.PRNGKey(4), rule=rule)
    args = (params, state, {'x': x, 'y': y}, jax.random.PRNGKey(7), extra)
    out[name] = fast_jit(objective)(*args)
  for a, b in zip(jax.tree.leaves(out['plain'][0]), jax.tree.leaves(out['rho0'][0])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(out['plain'][0]),
                                                   jax.tree.leaves(out['sam'][0])))
  assert float(out['sam'][2]['perturbed_loss']) > float(out['sam'][2]['loss'])
  for a, b in zip(jax.tree.leaves(out['plain'][3]), jax.tree.leaves(out['sam'][3])):
    np.testing.assert_array_equal(a, b)            # the mixblock's gradient is untouched


@pytest.mark.parametrize('name', ['cifar10', 'mnist_subset', 'digits'])
def test_every_config_file_builds_samix_and_samix_p(name):
  module = importlib.import_module(f'configs.{name}')
  config = module.get_config('samix')
  assert config.method.name == 'samix'
  configure.validate_config(config)
  with pytest.raises(ValueError, match='source_workdir must be set for samix_p'):
    configure.validate_config(module.get_config('samix_p'))
