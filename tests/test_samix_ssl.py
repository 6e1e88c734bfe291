"""SAMix-SSL (gmix_jax.samix_ssl): each loss's gradient reaches only its own
parameters, the gradients equal those of the joint function, the losses
against their formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fast_compile
import ssl_steps
from gmix_jax import contrastive, models, parallel, samix, samix_ssl

C = 6      # the toy "embedding" width: the CNN's logits, L2-normalised

# The tests' own programs compare only within this run: compiled the fast way.
fast_jit = fast_compile.jit


def setup(mixblock_loss='eta_bce'):
  module = models.get_model('cnn', C, width=4)
  params, state = models.init_model(module, jax.random.PRNGKey(0), (8, 8, 1))
  apply_fn = models.make_apply_fn(module)
  features = samix.make_features_fn(module, 'conv0')

  def query_fn(p, s, x):
    z, new_state = apply_fn(p, s, x, True)
    return contrastive.l2_normalize(z), new_state

  def momentum_fn(kv, x):
    return contrastive.l2_normalize(apply_fn(kv['params'], kv['model_state'], x, False)[0])

  features_fn = lambda kv, x: features(kv['params'], kv['model_state'], x)
  kx, kx2, kq = jax.random.split(jax.random.PRNGKey(1), 3)
  x = jax.random.normal(kx, (6, 8, 8, 1))
  x2 = x + 0.3 * jax.random.normal(kx2, x.shape)
  # A momentum encoder that differs from the online one.
  key_vars = {'params': jax.tree.map(lambda p: 0.8 * p, params), 'model_state': state}
  keys = momentum_fn(key_vars, x2)
  queue = contrastive.l2_normalize(jax.random.normal(kq, (10, C)))
  lam, perm = jnp.full((6,), 0.35), jnp.array([3, 0, 5, 1, 2, 4])
  block = samix.MixBlock(dim=8)
  feats = features_fn(key_vars, x)
  phi = block.init(jax.random.PRNGKey(3), feats, feats, lam, (8, 8))['params']
  cfg = samix_ssl.SAMixSSLConfig(mixblock_loss=mixblock_loss)
  fns = dict(mixblock=block, query_fn=query_fn, momentum_fn=momentum_fn, features_fn=features_fn)
  return cfg, params, state, phi, key_vars, fns, dict(x=x, keys=keys, queue=queue), lam, perm


def norm(tree):
  return float(sum(jnp.sum(jnp.abs(l)) for l in jax.tree.leaves(tree)))


def test_each_loss_reaches_only_its_own_parameters():
  # The stop-gradients sit in code both mixblock losses share; eta_bce suffices.
  cfg, params, state, phi, key_vars, fns, data, lam, perm = setup()

  @jax.jit                     # nested in the fast_jit gradients below, alone after them
  def losses(p, f, kv):
    return samix_ssl.step_losses(cfg, p, state, f, kv, **fns, **data, lam=lam, perm=perm,
                                 temperature=0.2)[0]
  g_bb = fast_jit(jax.grad(lambda *a: losses(*a)[0], argnums=(0, 1, 2)))(params, phi, key_vars)
  g_mb = fast_jit(jax.grad(lambda *a: losses(*a)[1], argnums=(0, 1, 2)))(params, phi, key_vars)
  assert norm(g_bb[0]) > 0 and norm(g_mb[1]) > 0
  for zero in (g_bb[1], g_bb[2], g_mb[0], g_mb[2]):
    for leaf in jax.tree.leaves(zero):
      assert not np.any(np.asarray(leaf)), 'a loss reached parameters that are not its own'
  # The zeros are the stop-gradients' doing: the backbone loss does depend on
  # φ (through the mask), and the mixblock loss on the momentum encoder.
  phi2 = jax.tree.map(lambda a: a + 0.5, phi)
  kv2 = jax.tree.map(lambda a: a + 0.05 * jnp.cos(jnp.arange(a.size).reshape(a.shape)), key_vars)
  assert float(losses(params, phi2, key_vars)[0]) != float(losses(params, phi, key_vars)[0])
  assert float(losses(params, phi, kv2)[1]) != float(losses(params, phi, key_vars)[1])


def test_losses_and_grads_equal_the_joint_gradients():
  cfg, params, state, phi, key_vars, fns, data, _, _ = setup()
  rng = jax.random.PRNGKey(7)
  grads, phi_grads, _, metrics = fast_jit(lambda: samix_ssl.losses_and_grads(
      cfg, params, state, phi, key_vars, **fns, **data, rng=rng, temperature=0.2))()
  lam, perm = samix_ssl.draw(cfg, jax.random.split(rng)[0], 6)
  assert lam.shape == (6,) and float(lam[0]) == float(lam[5])
  assert sorted(np.asarray(perm).tolist()) == list(range(6))

  def losses(p, f):
    return samix_ssl.step_losses(cfg, p, state, f, key_vars, **fns, **data, lam=lam, perm=perm,
                                 temperature=0.2)[0]
  want = fast_jit(jax.grad(lambda p: losses(p, phi)[0]))(params)
  want_phi = fast_jit(jax.grad(lambda f: losses(params, f)[1]))(phi)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, want)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               phi_grads, want_phi)
  l_bb, l_mb = losses(params, phi)
  np.testing.assert_allclose(float(metrics['loss']), float(l_bb), rtol=1e-6)
  np.testing.assert_allclose(float(metrics['mixblock_loss']), float(l_mb), rtol=1e-6)


@pytest.mark.parametrize('mixblock_loss', samix_ssl.MIXBLOCK_LOSSES)
def test_losses_equal_their_formulas(mixblock_loss):
  cfg, params, state, phi, key_vars, fns, data, lam, perm = setup(mixblock_loss)
  (l_bb, l_mb), (mask, *_) = fast_jit(lambda: samix_ssl.step_losses(
      cfg, params, state, phi, key_vars, **fns, **data, lam=lam, perm=perm, temperature=0.2))()
  x, k, queue = data['x'], data['keys'], data['queue']
  x_mix = x * (1 - mask[..., None]) + x[perm] * mask[..., None]
  q, q_mix = fns['query_fn'](params, state, x)[0], fns['query_fn'](params, state, x_mix)[0]
  nce = lambda q, k: np.mean(contrastive.info_nce(q, k, queue, 0.2))
  want_bb = cfg.clean_weight * nce(q, k) + 0.35 * nce(q_mix, k) + 0.65 * nce(q_mix, k[perm])
  np.testing.assert_allclose(float(l_bb), want_bb, rtol=1e-5)
  qm = fns['momentum_fn'](key_vars, x_mix)
  reg = np.mean(np.abs(np.asarray(mask).mean(axis=(1, 2)) - 0.65))
  if mixblock_loss == 'eta_bce':
    main = np.mean(contrastive.instance_eta_bce(qm, k, k[perm], queue, 0.35, 0.2, cfg.eta))
  else:
    main = 0.35 * nce(qm, k) + 0.65 * nce(qm, k[perm])
  np.testing.assert_allclose(float(l_mb), main + cfg.mask_weight * reg, rtol=1e-5)


@pytest.mark.parametrize('field,value', [('alpha', 0.0), ('eta', -1.0), ('mixblock_loss', 'ce'),
                                         ('mixblock_dim', 0)])
def test_bad_config_names_the_field(field, value):
  with pytest.raises(ValueError, match=f'method.samix.{field}'):
    samix_ssl.SAMixSSLConfig(**{field: value})


# -- The task: validation, the data-parallel step, end to end ---------------------------
def task_config(method='erm', **task_fields):
  from configs import common
  c = common.base()
  c.model.name = 'cnn'
  c.model.kwargs = {'width': 4}
  c.method = common.method(method)
  c.task = common.task('samix_ssl')
  for k, v in dict(queue_size=16, proj_hidden=8, proj_dim=4, feature_layer='conv0',
                   mixblock_dim=8, **task_fields).items():
    c.task[k] = v
  c.batch_size = 8
  c.num_epochs = 1
  return c


@pytest.mark.parametrize('method,fields,message', [
    ('mixup', {}, "method.name='mixup' mixes or splits"),
    ('gmix', {}, "method.name='gmix' mixes or splits"),
    ('erm', {'mixblock_loss': 'ce'}, 'task.mixblock_loss must be one of'),
    ('erm', {'alpha': -1.0}, 'task.alpha must be > 0'),
])
def test_task_refuses_bad_configs(method, fields, message):
  from gmix_jax import tasks
  c = task_config(method, **fields)
  with pytest.raises(ValueError, match=message):
    tasks.get(c).check_config(c)


def test_task_refuses_an_unknown_field():
  from gmix_jax import tasks
  c = task_config()
  c.task.unlock()
  c.task.colour = 3
  with pytest.raises(ValueError, match='task.colour is not a field'):
    tasks.get(c).check_config(c)


def test_task_step_pmap_equals_shard_map_and_fills_the_queue():
  pair = ssl_steps.task_step_pair(task_config('sam'), num_train=64)
  sm, pm, a, b, before, data = pair.sm, pair.pm, pair.a, pair.b, pair.before, pair.data
  a, metrics = sm(a, data)
  assert int(a.extra['ptr']) == 8                       # one global batch of keys enqueued
  queue = np.asarray(a.extra['queue'])
  np.testing.assert_array_equal(queue[8:], before['queue'][8:])
  np.testing.assert_allclose(np.linalg.norm(queue[:8], axis=1), 1.0, rtol=1e-5)
  assert int(a.extra['mixblock_opt'][0].count) == 1
  for name in ('loss', 'clean_loss', 'mix_loss', 'mixblock_loss', 'perturbed_loss'):
    assert np.isfinite(float(metrics[name])), name
  b, _ = pm(b, pair.pm_data)
  a, _ = sm(a, data)
  b, _ = pm(b, pair.pm_data)
  for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(parallel.unreplicate(b))):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_task_end_to_end_on_digits(tmp_path):
  """40 digits, 5 steps of 8, queue 16 < 40 − 8: the config of
  tests/test_samix_ssl_p.py's source run (one program for both modules, so
  the suite's compilation cache compiles it once)."""
  import json
  import os
  import ssl_samix_p_config
  from gmix_jax import train
  c = ssl_samix_p_config.get_config()
  c.dataset.data_dir = str(tmp_path / 'data')
  c.plots = True                         # the curves of an SSL run are drawn too
  summary = train.train_and_evaluate(c, str(tmp_path / 'wd'))
  assert summary['task'] == 'samix_ssl' and summary['steps'] == 5
  assert 0.0 <= summary['final_knn_accuracy'] <= 1.0
  with open(os.path.join(str(tmp_path / 'wd'), 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  train_records = [r for r in records if r.get('split') == 'train']
  assert train_records and all(np.isfinite(r['mixblock_loss']) for r in train_records)
