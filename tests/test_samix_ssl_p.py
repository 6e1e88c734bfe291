"""SAMix^P in SSL (``task.name='samix_ssl_p'``): a finished samix_ssl run's
mixblock and momentum encoder, frozen, mix the query view of a new MoCo
pretraining; a bad source workdir is one error line before anything compiles."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssl_samix_p_config
import ssl_steps
from gmix_jax import checkpoints, configure, contrastive, main, models, parallel, samix
from gmix_jax import samix_ssl, tasks
from gmix_jax import train
from gmix_jax.tasks import samix_ssl as samix_ssl_task
from test_linear_probe import _damage

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, 'ssl_samix_p_config.py')


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """A finished samix_ssl run (the source) and a samix_ssl_p run from it."""
  root = tmp_path_factory.mktemp('samix_p')
  c = ssl_samix_p_config.get_config()
  c.dataset.data_dir = str(root / 'data')
  train.train_and_evaluate(c, str(root / 'source'))
  p = p_config(root, root / 'source')
  summary = train.train_and_evaluate(p, str(root / 'p'))
  return root, summary


def p_config(root, source):
  c = ssl_samix_p_config.get_config('samix_ssl_p')
  c.dataset.data_dir = str(root / 'data')
  c.task.source_workdir = str(source)
  return c


def leaves_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_the_frozen_mixblock_and_mixer_are_the_sources_bit_for_bit(runs):
  root, summary = runs
  assert summary['task'] == 'samix_ssl_p' and summary['steps'] == 5
  _, src = checkpoints.restore_state(str(root / 'source'))
  _, p = checkpoints.restore_state(str(root / 'p'))
  leaves_equal(p['extra']['mixblock'], src['extra']['mixblock'])
  leaves_equal(p['extra']['mixer'], src['extra']['key'])
  assert 'mixblock_opt' not in p['extra']
  with open(root / 'p' / 'metrics.jsonl') as f:
    train_records = [json.loads(line) for line in f if '"train"' in line]
  assert len(train_records) == 5
  assert all('mixblock_loss' not in r and np.isfinite(r['mix_loss']) for r in train_records)


@pytest.mark.slow
def test_the_backbone_trains_on_the_source_runs_masks(runs):
  """On the same inputs, λ and π: the mask the source run's own mixblock loss
  makes (its momentum encoder, its mixblock) is the mask SAMix^P-SSL trains
  the backbone on: the backbone gradients with that mask are equal."""
  root, _ = runs
  c = p_config(root, root / 'source')
  task = tasks.get(c)
  method = task.check_config(c)
  mcfg, scfg = samix_ssl_task.get_configs(c, task.own_fields)
  module, apply_fn = task.build_model(c, 10)
  params, state = models.init_model(module, jax.random.PRNGKey(3), (8, 8, 1))
  _, src = checkpoints.restore_state(str(root / 'source'))
  _, p = checkpoints.restore_state(str(root / 'p'))
  path = samix_ssl_task.feature_path(scfg, c.model.name)
  mixblock = samix.MixBlock(scfg.mixblock_dim)
  features_fn = samix_ssl_task.key_features_fn(module, path)
  x = jax.random.uniform(jax.random.PRNGKey(4), (8, 8, 8, 1))
  keys = contrastive.l2_normalize(jax.random.normal(jax.random.PRNGKey(5), (8, 4)))
  queue = jnp.asarray(src['extra']['queue'])
  rng = jax.random.PRNGKey(6)
  lam, perm = samix_ssl.draw(scfg, jax.random.split(rng)[0], 8)

  def momentum_fn(kv, x):
    return contrastive.l2_normalize(apply_fn(kv['params'], kv['model_state'], x, False)[0])

  def query_fn(pp, s, x):
    z, s = apply_fn(pp, s, x, True)
    return contrastive.l2_normalize(z), s
  src_key = jax.tree.map(jnp.asarray, src['extra']['key'])
  src_mask = samix_ssl.mixblock_loss(
      scfg, jax.tree.map(jnp.asarray, src['extra']['mixblock']), mixblock, momentum_fn, src_key,
      features_fn(src_key, x), x, perm, lam, keys, queue, mcfg.temperature)[1][0]
  assert 0 < float(jnp.std(src_mask))          # a mask, not a constant
  p_extra = jax.tree.map(jnp.asarray, p['extra'])
  p_mask = samix_ssl.mask_of(mixblock, p_extra['mixblock'], features_fn(p_extra['mixer'], x),
                             perm, lam, x.shape[1:3])
  np.testing.assert_array_equal(np.asarray(p_mask), np.asarray(src_mask))
  grads, _, metrics = samix_ssl.frozen_mask_grads(
      scfg, params, state, p_extra['mixblock'], p_extra['mixer'], mixblock=mixblock,
      query_fn=query_fn, features_fn=features_fn, x=x, keys=keys, queue=queue, rng=rng,
      temperature=mcfg.temperature, rule=method.sharpness)
  by_hand = jax.grad(lambda pp: samix_ssl.backbone_loss(
      scfg, pp, state, query_fn, x, perm, lam, src_mask, keys, queue, mcfg.temperature)[0])(params)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(by_hand)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(float(metrics['mask_mean']), float(jnp.mean(src_mask)), rtol=1e-6)


@pytest.mark.slow
def test_pmap_equals_shard_map_and_the_mixblock_stays(runs):
  root, _ = runs
  pair = ssl_steps.task_step_pair(p_config(root, root / 'source'), num_train=40)
  sm, pm, a, b, before, data = pair.sm, pair.pm, pair.a, pair.b, pair.before, pair.data
  for _ in range(2):
    a, metrics = sm(a, data)
    b, _ = pm(b, pair.pm_data)
    assert np.isfinite(float(metrics['loss'])) and float(metrics['mask_mean']) > 0
  assert int(a.extra['ptr']) == 0                      # two global batches of 8 in a queue of 16
  for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(parallel.unreplicate(b))):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  leaves_equal(jax.device_get(a.extra['mixblock']), before['mixblock'])
  leaves_equal(jax.device_get(a.extra['mixer']), before['mixer'])


@pytest.mark.slow
@pytest.mark.parametrize('case,message', [
    ('missing', 'no such directory'),
    ('not_samix_ssl', "that run's task.name is 'moco'; task.name='samix_ssl_p' needs one of"),
    ('unfinished', 'the run is not finished'),
    ('damaged', 'its last checkpoint does not read back or verify'),
    ('other_model', 'that run differs in model'),
])
def test_a_bad_source_workdir_is_one_error_line(case, message, runs, tmp_path, capsys):
  root, _ = runs
  wd = tmp_path / 'source'
  if case != 'missing':
    shutil.copytree(root / 'source', wd)
  cfg_path = wd / 'config.json'
  if case in ('not_samix_ssl', 'other_model'):
    cfg = json.loads(cfg_path.read_text())
    if case == 'not_samix_ssl':
      cfg['task']['name'] = 'moco'
    else:
      cfg['model']['kwargs']['width'] = 8
    cfg_path.write_text(json.dumps(cfg))
  elif case == 'unfinished':
    os.remove(wd / 'summary.json')
  elif case == 'damaged':
    _damage(wd)
  code = main.main([f'--config={CONFIG}:samix_ssl_p', f'--workdir={tmp_path / "p"}',
                    f'--config.dataset.data_dir={root / "data"}',
                    f'--config.task.source_workdir={wd}'])
  err = capsys.readouterr().err
  assert code == 2, err
  assert err.startswith(f"error: task.source_workdir='{wd}'") and message in err, err
  assert err.count('\n') == 1, err
  assert not os.path.exists(tmp_path / 'p' / 'checkpoints')   # nothing trained


def test_source_workdir_unset_is_a_clear_error():
  c = ssl_samix_p_config.get_config('samix_ssl_p')
  with pytest.raises(ValueError, match='task.source_workdir must name the workdir of a finished '
                                       'samix_ssl run'):
    tasks.get(c).check_config(c)


def test_the_cpu_config_validates_and_asks_for_its_source():
  from configs import ssl_mnist_jpeg
  c = ssl_mnist_jpeg.get_config('samix_ssl_p')
  assert c.task.name == 'samix_ssl_p' and c.task.proj_dim == ssl_mnist_jpeg.get_config().task.proj_dim
  with pytest.raises(ValueError, match='task.source_workdir must name'):
    configure.validate_config(c)


def test_the_mixblock_training_knobs_are_reported_unread():
  c = ssl_samix_p_config.get_config('samix_ssl_p')
  c.task.eta = 0.5
  c.task.mixblock_lr = 0.01
  task = tasks.get(c)
  unread = task.ignored_knobs(c, configure.composed_method(c, 10))
  assert [m.split('=')[0] for m in unread] == ['task.eta', 'task.mixblock_lr'], unread
