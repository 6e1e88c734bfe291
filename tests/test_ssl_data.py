"""MoCo v2 augmentation (gmix_jax.data.ssl_ops) and two views per record
(gmix_jax.data.pipeline): each colour op against a plain numpy / colorsys
reference, and the views' independence and reproducibility from (seed, step)."""
import colorsys

import numpy as np
import pytest

from gmix_jax.data import image_ops
from gmix_jax.data import pipeline
from gmix_jax.data import sources
from gmix_jax.data import ssl_ops


def image(h=16, w=16, c=3, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


# -- The colour ops --------------------------------------------------------------------
def test_grayscale_is_the_luma_in_every_channel():
  x = image()
  want = np.rint(0.299 * x[..., 0].astype(float) + 0.587 * x[..., 1] + 0.114 * x[..., 2])
  got = ssl_ops.grayscale(x)
  assert got.dtype == np.uint8 and got.shape == x.shape
  for ch in range(3):
    np.testing.assert_allclose(got[..., ch], want, atol=1)   # float32 vs float64 rounding
  one = image(c=1)
  np.testing.assert_array_equal(ssl_ops.grayscale(one), one)


def test_hue_shift_against_colorsys():
  rgb = np.random.default_rng(1).uniform(size=(300, 3))
  rgb[:4] = [[0.5, 0.5, 0.5], [0, 0, 0], [1, 0, 0], [0.2, 0.9, 0.9]]   # gray, black, pure, ties
  for turns in (0.0, 0.07, -0.1, 0.5):
    got = ssl_ops.shift_hue(rgb[None], turns)[0]
    want = []
    for p in rgb:
      h, s, v = colorsys.rgb_to_hsv(*p)
      want.append(colorsys.hsv_to_rgb((h + turns) % 1.0, s, v))
    np.testing.assert_allclose(got, np.array(want), atol=2e-6)


def test_each_adjustment_against_numpy():
  x = image().astype(np.float32)
  gray = (x @ np.array([0.299, 0.587, 0.114]))[..., None]
  clip = lambda a: np.clip(a, 0, 255)
  np.testing.assert_allclose(ssl_ops.adjust(x, 0, 1.3), clip(1.3 * x), rtol=1e-6)
  np.testing.assert_allclose(ssl_ops.adjust(x, 1, 0.7), clip(0.7 * x + 0.3 * gray.mean()),
                             rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(ssl_ops.adjust(x, 2, 1.4), clip(1.4 * x - 0.4 * gray),
                             rtol=1e-5, atol=1e-3)
  # Hue: one pixel at a time through colorsys.
  shifted = ssl_ops.adjust(x, 3, 0.07)
  for (i, j) in [(0, 0), (3, 5), (15, 15)]:
    h, s, v = colorsys.rgb_to_hsv(*(x[i, j] / 255.0))
    want = np.array(colorsys.hsv_to_rgb((h + 0.07) % 1.0, s, v)) * 255
    np.testing.assert_allclose(shifted[i, j], want, atol=1e-3)
  np.testing.assert_allclose(ssl_ops.adjust(x, 3, 0.0), x, atol=1e-3)
  # One channel: saturation and hue change nothing.
  one = image(c=1).astype(np.float32)
  np.testing.assert_array_equal(ssl_ops.adjust(one, 2, 1.4), one)
  np.testing.assert_array_equal(ssl_ops.adjust(one, 3, 0.1), one)


def test_jitter_params_ranges_and_random_order():
  rng = np.random.default_rng(2)
  orders = set()
  for _ in range(200):
    params = ssl_ops.jitter_params(rng)
    assert sorted(op for op, _ in params) == [0, 1, 2, 3]
    orders.add(tuple(op for op, _ in params))
    for op, f in params:
      lo, hi = (-0.1, 0.1) if op == 3 else (0.6, 1.4)
      assert lo <= f <= hi
  assert len(orders) > 12    # the order is drawn, not fixed


def test_blur_preserves_constant_images_and_spreads_an_impulse():
  const = np.full((80, 80, 3), 77, np.uint8)
  np.testing.assert_array_equal(ssl_ops.blur(const, 1.5), const)
  x = np.zeros((81, 81, 1), np.uint8)
  x[40, 40] = 255
  y = ssl_ops.blur(x, 2.0)[..., 0].astype(float)
  assert y[40, 40] < 255 and y[40, 41] > 0
  # The spread (standard deviation along a row) is about σ (PIL's box approximation).
  w = y / y.sum()
  var = (w.sum(0) * (np.arange(81) - 40) ** 2).sum()
  assert 1.6 < np.sqrt(var) < 2.4


# -- The whole view --------------------------------------------------------------------
@pytest.mark.parametrize('size,channels', [(None, 3), (24, 3), (None, 1)])
def test_moco_view_shape_dtype_and_determinism(size, channels):
  x = image(32, 32, channels)
  f = image_ops.make_record_transform('moco', size, True)
  a = f({'image': x, 'label': 3}, np.random.default_rng([0, 5]))
  b = f({'image': x, 'label': 3}, np.random.default_rng([0, 5]))
  c = f({'image': x, 'label': 3}, np.random.default_rng([0, 6]))
  side = size or 32
  assert a['image'].shape == (side, side, channels) and a['image'].dtype == np.uint8
  np.testing.assert_array_equal(a['image'], b['image'])
  assert not np.array_equal(a['image'], c['image'])
  assert a['label'] == 3


@pytest.mark.parametrize('size,blurs', [(64, False), (96, True)])
def test_blur_only_above_64_pixels(monkeypatch, size, blurs):
  calls = []
  real = ssl_ops.blur
  monkeypatch.setattr(ssl_ops, 'blur', lambda x, s: calls.append(s) or real(x, s))
  x = image(100, 100)
  for seed in range(40):
    ssl_ops.moco_train(x, np.random.default_rng(seed), size)
  if blurs:
    assert 8 < len(calls) < 32 and all(0.1 <= s <= 2.0 for s in calls)   # p = 0.5
  else:
    assert not calls


def test_moco_eval_is_deterministic():
  x = image(40, 30)
  f = image_ops.make_record_transform('moco', 24, False)
  np.testing.assert_array_equal(f({'image': x, 'label': 0}, None)['image'],
                                image_ops.inception_eval(x, 24))
  g = image_ops.make_record_transform('moco', None, False)
  np.testing.assert_array_equal(g({'image': x, 'label': 0}, None)['image'], x)


# -- Two views from the pipeline -------------------------------------------------------
def split(n=20):
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (n, 12, 12, 3), dtype=np.uint8)
  labels = (np.arange(n) % 4).astype(np.int32)
  return sources.Split('toy', 'train', sources.ArrayRecords(images, labels), 4, 255)


def two_view_fn(seed, process_index=0, process_count=1):
  s = split()
  return pipeline.TrainBatch(s, None, 8, seed, pipeline.record_transform(s, 'moco', None, True),
                             process_index, process_count, views=2)


def test_two_views_differ_and_follow_their_per_view_rng():
  s = split()
  fn = two_view_fn(seed=7)
  transform = pipeline.record_transform(s, 'moco', None, True)
  for step in (0, 3, 5):                    # across an epoch boundary (2 steps per epoch)
    b = fn(step)
    assert set(b) == {'x', 'x2', 'y', 'index'}
    assert b['x'].shape == b['x2'].shape == (8, 12, 12, 3)
    np.testing.assert_array_equal(b['y'], s.records.labels[b['index']])
    epoch = step // fn.steps_per_epoch
    for row, r in enumerate(b['index']):
      assert not np.array_equal(b['x'][row], b['x2'][row])
      for v, key in enumerate(('x', 'x2')):
        want = transform({'image': s.records.images[r], 'label': 0},
                         np.random.default_rng([7, int(r), epoch, v]))['image']
        np.testing.assert_array_equal(b[key][row], want)


def test_two_views_reproducible_from_seed_and_step():
  a, b, other = two_view_fn(seed=7), two_view_fn(seed=7), two_view_fn(seed=8)
  for step in (4, 1, 4):                    # out of order, repeated
    x, y = a(step), b(step)
    for key in ('x', 'x2', 'y', 'index'):
      np.testing.assert_array_equal(x[key], y[key])
  assert not np.array_equal(a(1)['x'], other(1)['x'])
  # Processes partition the global batch, views included.
  parts = [two_view_fn(7, p, 2)(3) for p in range(2)]
  for key in ('x', 'x2'):
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), a(3)[key])


def test_one_view_batches_unchanged():
  s = split()
  t = pipeline.record_transform(s, 'moco', None, True)
  one = pipeline.TrainBatch(s, None, 8, 7, t)(2)
  assert 'x2' not in one
  r = int(one['index'][0])
  want = t({'image': s.records.images[r], 'label': 0}, np.random.default_rng([7, r, 1]))['image']
  np.testing.assert_array_equal(one['x'][0], want)
  with pytest.raises(ValueError, match='views'):
    pipeline.TrainBatch(s, None, 8, 7, t, views=3)


def test_two_views_through_train_batches_and_resume():
  s = split()
  full = pipeline.train_batches(s, None, global_batch=8, seed=1, num_steps=5, augment='moco',
                                views=2)
  with full:
    straight = list(full)
  resumed = pipeline.train_batches(s, None, global_batch=8, seed=1, num_steps=5, start_step=3,
                                   augment='moco', views=2)
  with resumed:
    tail = list(resumed)
  for a, b in zip(straight[3:], tail):
    np.testing.assert_array_equal(a['x2'], b['x2'])
