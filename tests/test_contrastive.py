"""gmix_jax.contrastive: every formula against an independent numpy computation
(loops over rows, a simulated FIFO, closed forms, finite differences), and the
shuffled batch on 8 fake devices under shard_map and pmap."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from gmix_jax import contrastive as cl


def unit_rows(rng, n, d):
  x = rng.normal(size=(n, d))
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def np_nce(q, k, queue, tau):
  """−log softmax of the positive, one row at a time."""
  out = []
  for i in range(q.shape[0]):
    logits = [q[i] @ k[i]] + [q[i] @ n for n in queue]
    logits = np.array(logits) / tau
    m = logits.max()
    out.append(-(logits[0] - m - math.log(np.exp(logits - m).sum())))
  return np.array(out)


def np_eta_bce(q, k, kp, queue, lam, tau, eta):
  out = []
  for i in range(q.shape[0]):
    lam_i = lam[i] if np.ndim(lam) else lam
    keys = [k[i], kp[i]] + list(queue)
    targets = [lam_i, 1 - lam_i] + [0.0] * len(queue)
    weights = [1.0, 1.0] + [eta] * len(queue)
    total = 0.0
    for key, t, w in zip(keys, targets, weights):
      z = q[i] @ key / tau
      p = 1 / (1 + math.exp(-z))
      total -= w * (t * math.log(p) + (1 - t) * math.log(1 - p))
    out.append(total)
  return np.array(out)


@pytest.fixture
def feats():
  rng = np.random.default_rng(0)
  return unit_rows(rng, 6, 5), unit_rows(rng, 6, 5), unit_rows(rng, 11, 5)


def test_info_nce_matches_loop(feats, x64):
  q, k, queue = feats
  got = cl.info_nce(jnp.asarray(q), jnp.asarray(k), jnp.asarray(queue), 0.2)
  np.testing.assert_allclose(np.asarray(got), np_nce(q, k, queue, 0.2), rtol=1e-12)
  assert got.shape == (6,)


def test_info_nce_float32_inputs_bfloat16(feats):
  q, k, queue = feats
  got = cl.info_nce(jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16),
                    jnp.asarray(queue, jnp.bfloat16), 0.2)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), np_nce(q, k, queue, 0.2), rtol=0.05)


@pytest.mark.parametrize('per_row', [False, True])
def test_mixed_info_nce_matches_loop(feats, per_row, x64):
  q, k, queue = feats
  perm = np.array([3, 0, 5, 1, 2, 4])
  lam = np.linspace(0.1, 0.9, 6) if per_row else 0.3
  got = cl.mixed_info_nce(jnp.asarray(q), jnp.asarray(k), jnp.asarray(k[perm]),
                          jnp.asarray(queue), lam, 0.2)
  want = []
  for i in range(6):
    lam_i = lam[i] if per_row else lam
    a = np_nce(q[i:i + 1], k[i:i + 1], queue, 0.2)[0]
    b = np_nce(q[i:i + 1], k[perm[i]:perm[i] + 1], queue, 0.2)[0]
    want.append(lam_i * a + (1 - lam_i) * b)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12)


def test_mixed_info_nce_lam_one_is_info_nce(feats, x64):
  q, k, queue = feats
  args = jnp.asarray(q), jnp.asarray(k)
  np.testing.assert_allclose(cl.mixed_info_nce(*args, jnp.asarray(k[::-1]), queue, 1.0, 0.2),
                             cl.info_nce(*args, queue, 0.2), rtol=1e-12)


@pytest.mark.parametrize('size,n', [(12, 4), (10, 4), (5, 5), (7, 3)])
def test_enqueue_matches_numpy_fifo(size, n):
  rng = np.random.default_rng(1)
  queue = np.zeros((size, 3), np.float32)
  sim = [tuple(r) for r in queue]   # a deque: append new keys, drop the oldest
  jq, ptr = jnp.asarray(queue), jnp.int32(0)
  step = jax.jit(cl.enqueue)
  for _ in range(7):                 # several wraps
    keys = rng.normal(size=(n, 3)).astype(np.float32)
    jq, ptr = step(jq, ptr, jnp.asarray(keys))
    sim = sim[n:] + [tuple(r) for r in keys]
  # The device queue is a ring: row ptr holds the oldest key.
  ring = np.roll(np.asarray(jq), -int(ptr), axis=0)
  np.testing.assert_array_equal(ring, np.array(sim, np.float32))
  assert int(ptr) == (7 * n) % size


def test_enqueue_refuses_a_batch_larger_than_the_queue():
  with pytest.raises(ValueError, match='queue size 3'):
    cl.enqueue(jnp.zeros((3, 2)), 0, jnp.ones((4, 2)))


def test_momentum_update_closed_form(x64):
  online = {'w': jnp.array([1.0, -2.0]), 'count': jnp.int32(5)}
  target = {'w': jnp.array([3.0, 0.5]), 'count': jnp.int32(0)}
  m = 0.9
  t = target
  for _ in range(6):
    t = cl.momentum_update(online, t, m)
  # θ̄_n = m^n θ̄_0 + (1 − m^n) θ  for constant θ.
  want = m ** 6 * np.array([3.0, 0.5]) + (1 - m ** 6) * np.array([1.0, -2.0])
  np.testing.assert_allclose(np.asarray(t['w']), want, rtol=1e-12)
  assert int(t['count']) == 5


def test_momentum_schedules():
  assert float(cl.momentum_at(0.99, 123, 1000, 'constant')) == pytest.approx(0.99)
  assert float(cl.momentum_at(0.99, 0, 1000, 'cosine')) == pytest.approx(0.99)
  assert float(cl.momentum_at(0.99, 1000, 1000, 'cosine')) == pytest.approx(1.0)
  assert float(cl.momentum_at(0.99, 5000, 1000, 'cosine')) == pytest.approx(1.0)
  # Half way: 1 − (1 − m₀)/2.
  assert float(cl.momentum_at(0.99, 500, 1000, 'cosine')) == pytest.approx(0.995, abs=1e-7)
  k = 250
  want = 1 - (1 - 0.99) * (math.cos(math.pi * k / 1000) + 1) / 2
  assert float(cl.momentum_at(0.99, k, 1000, 'cosine')) == pytest.approx(want, abs=1e-7)
  with pytest.raises(ValueError, match='cosine'):
    cl.momentum_at(0.99, 0, 10, 'linear')


# -- Shuffling BN ------------------------------------------------------------------
N_DEV, B = 8, 3


def global_case():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(N_DEV * B, 4)).astype(np.float32)
  perm = rng.permutation(N_DEV * B).astype(np.int32)
  return x, perm


def per_device(x, perm):
  """What each device sees after shuffling, a rowwise f (×2 + its own device
  index, to show where the row was computed) and unshuffling."""
  shuffled = cl.shuffle_rows(x, perm, 'batch')
  here = jax.lax.axis_index('batch').astype(x.dtype)
  return shuffled, cl.unshuffle_rows(2 * shuffled + here, perm, 'batch')


def check(shuffled, restored, x, perm):
  shuffled, restored = np.asarray(shuffled), np.asarray(restored)
  np.testing.assert_array_equal(shuffled.reshape(N_DEV * B, -1), x[perm])
  # Row r came back to its own place; it was computed on the device that held
  # position inverse[r] of the shuffled batch.
  inverse = np.argsort(perm)
  where = (inverse // B).astype(np.float32)[:, None]
  np.testing.assert_array_equal(restored.reshape(N_DEV * B, -1), 2 * x + where)


def test_shuffle_rows_shard_map():
  x, perm = global_case()
  mesh = Mesh(np.asarray(jax.devices()[:N_DEV]), ('batch',))
  fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P('batch'), P()),
                             out_specs=(P('batch'), P('batch'))))
  check(*fn(jnp.asarray(x), jnp.asarray(perm)), x, perm)


def test_shuffle_rows_pmap():
  x, perm = global_case()
  fn = jax.pmap(per_device, axis_name='batch', in_axes=(0, None))
  check(*fn(jnp.asarray(x.reshape(N_DEV, B, -1)), jnp.asarray(perm)), x, perm)


def test_shuffle_rows_one_device():
  x, perm = global_case()
  shuffled = cl.shuffle_rows(jnp.asarray(x), jnp.asarray(perm))
  np.testing.assert_array_equal(np.asarray(shuffled), x[perm])
  np.testing.assert_array_equal(np.asarray(cl.unshuffle_rows(shuffled, jnp.asarray(perm))), x)


# -- SAMix-SSL's mixblock loss ---------------------------------------------------------
@pytest.mark.parametrize('per_row', [False, True])
def test_samix_ssl_mixblock_loss_matches_numpy(feats, per_row, x64):
  q, k, queue = feats
  perm = np.array([3, 0, 5, 1, 2, 4])
  lam = np.linspace(0.1, 0.9, 6) if per_row else 0.3
  mask = np.random.default_rng(3).uniform(size=(6, 4, 5))
  loss, (bce, reg) = cl.samix_ssl_mixblock_loss(
      jnp.asarray(q), jnp.asarray(k), jnp.asarray(k[perm]), jnp.asarray(queue), lam,
      jnp.asarray(mask), temperature=0.2, eta=0.1, mask_weight=0.5)
  want_bce = np_eta_bce(q, k, k[perm], queue, lam, 0.2, 0.1).mean()
  want_reg = np.mean([abs(mask[i].mean() - (1 - (lam[i] if per_row else lam)))
                      for i in range(6)])
  np.testing.assert_allclose(float(bce), want_bce, rtol=1e-12)
  np.testing.assert_allclose(float(reg), want_reg, rtol=1e-12)
  np.testing.assert_allclose(float(loss), want_bce + 0.5 * want_reg, rtol=1e-12)


def test_eta_weighs_only_the_queue(feats, x64):
  q, k, queue = feats
  args = jnp.asarray(q), jnp.asarray(k), jnp.asarray(k[::-1])
  no_queue = cl.instance_eta_bce(*args, jnp.zeros((0, 5)), 0.4, 0.2, eta=0.3)
  a = cl.instance_eta_bce(*args, jnp.asarray(queue), 0.4, 0.2, eta=0.3)
  b = cl.instance_eta_bce(*args, jnp.asarray(queue), 0.4, 0.2, eta=0.6)
  np.testing.assert_allclose(2 * (a - no_queue), b - no_queue, rtol=1e-10)


def finite_difference_check(f, x, eps=1e-6):
  g = np.asarray(jax.grad(f)(x))
  rng = np.random.default_rng(4)
  for _ in range(3):
    v = rng.normal(size=x.shape)
    fd = (f(x + eps * v) - f(x - eps * v)) / (2 * eps)
    np.testing.assert_allclose(float(fd), float(np.sum(g * v)), rtol=1e-6, atol=1e-9)


def test_gradients_match_finite_differences(feats, x64):
  q, k, queue = feats
  k, queue = jnp.asarray(k), jnp.asarray(queue)
  mask = jnp.asarray(np.random.default_rng(5).uniform(0.2, 0.8, size=(6, 3, 3)))
  finite_difference_check(lambda q: jnp.sum(cl.info_nce(q, k, queue, 0.2)), jnp.asarray(q))
  finite_difference_check(lambda q: jnp.sum(cl.mixed_info_nce(q, k, k[::-1], queue, 0.35, 0.2)),
                          jnp.asarray(q))
  finite_difference_check(
      lambda q: cl.samix_ssl_mixblock_loss(q, k, k[::-1], queue, 0.35, mask, temperature=0.2,
                                           eta=0.1, mask_weight=0.1)[0], jnp.asarray(q))
  finite_difference_check(
      lambda s: cl.samix_ssl_mixblock_loss(jnp.asarray(q), k, k[::-1], queue, 0.35, s,
                                           temperature=0.2, eta=0.1, mask_weight=0.1)[0], mask)
