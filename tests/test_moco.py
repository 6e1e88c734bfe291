"""The ``moco`` task: queue, momentum, shuffled BN, the contrastive loss under
mixing and sharpness, parallel modes, end to end."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ssl_samix_p_config
from gmix_jax import contrastive, models, objectives, parallel, train
from gmix_jax.tasks import moco

B, K, D, HID = 8, 20, 4, 16          # K does not divide by B: the queue wraps mid-batch


def encoder(norm=False):
  """A tiny MLP encoder (no BatchNorm: a key is a function of its row alone) or a CNN with BN."""
  if norm:
    backbone = models.get_model('cnn', HID, width=4, norm='batch')
    shape = (8, 8, 1)
  else:
    backbone = models.get_model('mlp', HID, hidden_sizes=(8,))
    shape = (6,)
  module = moco.Projected(backbone, D)
  return module, models.make_apply_fn(module), shape


def build(method='erm', norm=False, momentum=0.9, schedule='constant', steps=4, seed=0):
  module, apply_fn, shape = encoder(norm)
  params, ms = models.init_model(module, jax.random.PRNGKey(seed), shape)
  cfg = moco.MocoConfig(queue_size=K, proj_hidden=HID, proj_dim=D, momentum=momentum,
                        momentum_schedule=schedule)
  m = objectives.get_method(method, 10)
  obj = moco.make_objective(cfg, m, apply_fn, seed=seed, num_steps=steps)
  opt = optax.sgd(0.1)
  step = parallel.make_per_device_step(obj, opt, extra_update=moco.make_extra_update(cfg, steps))
  state = parallel.create_train_state(params, ms, opt, seed,
                                      extra=moco.init_extra(params, ms, K, D, seed))
  rng = np.random.default_rng(seed)
  batches = [{'x': rng.normal(size=(B, *shape)).astype(np.float32),
              'x2': rng.normal(size=(B, *shape)).astype(np.float32),
              'y': np.zeros(B, np.int32)} for _ in range(steps)]
  return state, step, batches, apply_fn


def run_shard_map(state, step, batches, n):
  mesh = parallel.make_mesh(n)
  fn = parallel.shard_map_step(step, mesh)
  state = parallel.replicate_on_mesh(state, mesh)
  states = [jax.device_get(state)]
  for b in batches:
    state, _ = fn(state, b)
    states.append(jax.device_get(state))
  return states


@pytest.mark.parametrize('n', [1, 8])
def test_queue_is_a_fifo_of_the_keys_and_the_key_encoder_moves_by_its_formula(n):
  state, step, batches, apply_fn = build()
  states = run_shard_map(state, step, batches, n)
  queue, ptr = np.array(states[0].extra['queue']), 0
  for before, after, b in zip(states, states[1:], batches):
    # This step's keys: the key encoder as it was before the step, rows L2-normalised.
    z, _ = apply_fn(before.extra['key']['params'], before.extra['key']['model_state'], b['x2'],
                    False)
    keys = np.asarray(z) / np.linalg.norm(np.asarray(z), axis=1, keepdims=True)
    for row in keys:                                    # numpy FIFO, one key at a time
      queue[ptr] = row
      ptr = (ptr + 1) % K
    np.testing.assert_allclose(after.extra['queue'], queue, rtol=1e-5, atol=1e-6)
    assert int(after.extra['ptr']) == ptr
    # θ_k ← m θ_k + (1 − m) θ_q with the updated θ_q (m = 0.9, constant).
    for k0, q1, k1 in zip(jax.tree.leaves(before.extra['key']['params']),
                          jax.tree.leaves(after.params), jax.tree.leaves(after.extra['key']['params'])):
      np.testing.assert_allclose(k1, 0.9 * k0 + 0.1 * q1, rtol=1e-6, atol=1e-7)


def test_queue_is_the_same_on_1_and_8_devices():
  state, step, batches, _ = build()
  one = run_shard_map(state, step, batches, 1)[-1]
  eight = run_shard_map(state, step, batches, 8)[-1]
  np.testing.assert_allclose(one.extra['queue'], eight.extra['queue'], rtol=1e-5, atol=1e-6)
  assert int(one.extra['ptr']) == int(eight.extra['ptr']) == (len(batches) * B) % K


def test_cosine_momentum_schedule_in_the_step():
  state, step, batches, _ = build(schedule='cosine', steps=4)
  states = run_shard_map(state, step, batches[:2], 2)
  before, after = states[1], states[2]                 # the update after step 1 uses m at step 2
  m = 1 - (1 - 0.9) * (np.cos(np.pi * 2 / 4) + 1) / 2
  for k0, q1, k1 in zip(jax.tree.leaves(before.extra['key']['params']),
                        jax.tree.leaves(after.params), jax.tree.leaves(after.extra['key']['params'])):
    np.testing.assert_allclose(k1, m * k0 + (1 - m) * q1, rtol=1e-6, atol=1e-7)


def test_shuffled_bn_key_statistics_come_from_the_permuted_group_not_the_device():
  """With BatchNorm, row i's key equals the key encoder (train mode) applied to
  the rows that the step's permutation puts on one device with i: a group
  drawn from the whole global batch, not the rows its query shares a device with."""
  module, apply_fn, shape = encoder(norm=True)
  params, ms = models.init_model(module, jax.random.PRNGKey(0), shape)
  n, b = 4, 4
  x = np.random.default_rng(1).normal(size=(n * b, *shape)).astype(np.float32)
  perm = jax.random.permutation(jax.random.PRNGKey(3), n * b)

  def keys_of(xk):
    z, _ = apply_fn(params, ms, contrastive.shuffle_rows(xk, perm, 'batch'), True)
    return contrastive.unshuffle_rows(z, perm, 'batch')
  mesh = parallel.make_mesh(n)
  got = np.asarray(jax.jit(jax.shard_map(keys_of, mesh=mesh, in_specs=jax.P('batch'),
                                         out_specs=jax.P('batch'), check_vma=False))(x))
  perm = np.asarray(perm)
  want = np.zeros_like(got)
  for d in range(n):                                   # each permuted group on its own
    rows = perm[d * b:(d + 1) * b]
    want[rows] = np.asarray(apply_fn(params, ms, x[rows], True)[0])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  groups = {frozenset(perm[d * b:(d + 1) * b]) for d in range(n)}
  devices = {frozenset(range(d * b, (d + 1) * b)) for d in range(n)}
  assert groups != devices                             # the permutation regroups the rows
  # Unshuffled, the device's own rows would give other keys (the leak MoCo avoids).
  plain = np.concatenate([np.asarray(apply_fn(params, ms, x[d * b:(d + 1) * b], True)[0])
                          for d in range(n)])
  assert not np.allclose(plain, got, atol=1e-4)


def test_instance_loss_is_the_lambda_weighted_info_nce():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(B, D))
  k = contrastive.l2_normalize(jnp.asarray(rng.normal(size=(B, D))))
  queue = contrastive.l2_normalize(jnp.asarray(rng.normal(size=(K, D))))
  perm, lam = rng.permutation(B), 0.3
  y = lam * np.eye(B) + (1 - lam) * np.eye(B)[perm]
  w = np.full(B, 1 / B)
  got = moco.instance_loss(jnp.asarray(q), jnp.asarray(y), jnp.asarray(w), keys=k, queue=queue,
                           temperature=0.2)
  qn = contrastive.l2_normalize(jnp.asarray(q))
  want = jnp.mean(contrastive.mixed_info_nce(qn, k, k[perm], queue, lam, 0.2))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  clean = moco.instance_loss(jnp.asarray(q), jnp.eye(B), jnp.asarray(w), keys=k, queue=queue,
                             temperature=0.2)
  np.testing.assert_allclose(clean, jnp.mean(contrastive.info_nce(qn, k, queue, 0.2)), rtol=1e-5)


def test_sam_on_the_contrastive_loss_is_two_pass_sam(x64):
  """The SAM gradient of the MoCo objective equals ∇L(w + ρ g/‖g‖) written by hand (float64)."""
  module, apply_fn, shape = encoder()
  params, ms = models.init_model(module, jax.random.PRNGKey(0), shape)
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
  rng = np.random.default_rng(0)
  xq = jnp.asarray(rng.normal(size=(B, *shape)))
  keys = contrastive.l2_normalize(jnp.asarray(rng.normal(size=(B, D))))
  queue = contrastive.l2_normalize(jnp.asarray(rng.normal(size=(K, D))))
  loss_fn = functools.partial(moco.instance_loss, keys=keys, queue=queue, temperature=0.2)
  rho = 0.05
  method = objectives.get_method('sam', 10, sharpness={'rho': rho})
  obj = objectives.make_objective(method, apply_fn, loss_fn=loss_fn)
  got, _, metrics = obj(params, ms, {'x': xq, 'y': jnp.eye(B)}, jax.random.PRNGKey(0))

  def loss(p):
    z, _ = apply_fn(p, ms, xq, True)
    return moco.instance_loss(z, jnp.eye(B), jnp.full(B, 1 / B), keys=keys, queue=queue,
                              temperature=0.2)
  g = jax.grad(loss)(params)
  norm = jnp.sqrt(sum(jnp.sum(a ** 2) for a in jax.tree.leaves(g)))
  want = jax.grad(loss)(jax.tree.map(lambda p, gg: p + rho * gg / norm, params, g))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(metrics['loss'], loss(params), rtol=1e-12)


@pytest.mark.parametrize('method', ['erm', 'gmix'])
def test_pmap_and_shard_map_give_the_same_state(method):
  state, step, batches, _ = build(method=method, norm=False)
  a = run_shard_map(state, step, batches[:2], 2)[-1]
  pm = parallel.pmap_step(step, devices=jax.devices()[:2])
  st = parallel.replicate(state, 2)
  for b in batches[:2]:
    st, _ = pm(st, parallel.shard_batch(b, 2))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(parallel.unreplicate(st))):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_labels_never_reach_the_loss():
  state, step, batches, _ = build(method='gmix')
  state = jax.device_get(state)                  # host copy: each run donates its own
  mesh = parallel.make_mesh(2)
  fn = parallel.shard_map_step(step, mesh)
  out = []
  for y in (np.zeros(B, np.int32), np.arange(B, dtype=np.int32) % 3):
    s, m = fn(parallel.replicate_on_mesh(state, mesh), {**batches[0], 'y': y})
    out.append(jax.device_get((s, m)))
  for x, y in zip(jax.tree.leaves(out[0]), jax.tree.leaves(out[1])):
    np.testing.assert_array_equal(x, y)


def tiny_config(data_dir, method='erm'):
  c = ssl_samix_p_config.tiny('moco', method)    # 40 examples -> 5 steps of 8
  c.dataset.data_dir = str(data_dir)
  c.task.queue_size = 64                         # capped to 40 - 8 = 32
  c.task.proj_hidden = 16
  c.task.proj_dim = 8
  return c


@pytest.mark.slow
def test_moco_end_to_end_reports_knn_and_names_the_task(tmp_path):
  with pytest.warns(UserWarning, match='queue_size=64 capped to 32'):
    summary = train.train_and_evaluate(tiny_config(tmp_path / 'data', 'mixup'),
                                       str(tmp_path / 'wd'))
  assert summary['task'] == 'moco' and summary['steps'] == 5
  assert 0.0 <= summary['final_knn_accuracy'] <= 1.0
  from test_train import read_metrics
  records = read_metrics(tmp_path / 'wd')
  assert [r['knn_accuracy'] for r in records if r['split'] == 'test'] == [
      summary['final_knn_accuracy']]
  assert all(np.isfinite(r['loss']) and 'momentum' in r for r in records if r['split'] == 'train')


@pytest.mark.parametrize('edit,message', [
    (lambda c: setattr(c.method, 'name', 'bgmix'), 'splits the batch by per-example'),
    (lambda c: setattr(c.method.mixing, 'policy', 'mixupe'), "mixing.policy='mixupe'"),
    (lambda c: setattr(c.task, 'temperature', 0.0), 'task.temperature must be a finite number > 0'),
    (lambda c: setattr(c.task, 'momentum_schedule', 'linear'), 'task.momentum_schedule must be'),
    (lambda c: setattr(c.task, 'name', 'simclr'), r"task.name must be one of \[.*'moco'"),
    (lambda c: setattr(c.task, 'queue_size', 4), 'must hold at least one global batch'),
    (lambda c: (setattr(c.model, 'name', 'vit_ti16'), setattr(c.model, 'kwargs', {})),
     'needs a convolutional or MLP backbone'),
])
def test_bad_moco_config_fails_before_any_work(edit, message, tmp_path):
  c = tiny_config(tmp_path / 'data')
  edit(c)
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(c, str(tmp_path / 'wd'))


def test_ssl_curves_show_the_knn_accuracy_and_the_momentum():
  from gmix_jax import outputs
  train_records = [{'step': s, 'loss': 5.0 - s, 'learning_rate': 0.1, 'momentum': 0.99}
                   for s in (1, 2)]
  test_records = [{'step': 2, 'knn_accuracy': 0.5}]
  info = {'task': 'moco', 'method': 'mixup', 'dataset': 'digits', 'model': 'cnn',
          'final_knn_accuracy': 0.5}
  assert outputs.curves_title(info) == 'moco · mixup · digits · cnn — kNN accuracy 50.0 %'
  assert outputs.curves_title({**info, 'task': 'supervised'}).startswith('mixup · digits')
  fig = outputs.curves_figure(train_records, test_records, info)
  labels = [line.get_label() for ax in fig.axes for line in ax.get_lines()]
  assert 'kNN accuracy (test)' in labels and 'momentum m' in labels
  assert fig.axes[0].get_ylabel() == 'InfoNCE'


def test_the_command_line_result_of_a_pretraining_run_is_its_knn_accuracy():
  from gmix_jax import main   # a moco summary has no test accuracy: this line raised KeyError
  summary = {'final_knn_accuracy': 0.414, 'best_knn_accuracy': 0.5, 'epochs': 1,
             'wall_time_sec': 37.0}
  assert main.result_line(summary, 'wd') == ('final kNN accuracy 0.4140 (best 0.5000) after 1 '
                                             'epochs, 37 s')
