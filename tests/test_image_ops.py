"""Tests for gmix_jax.data.image_ops: host-side per-record transforms.

Each property is checked against an independent computation: the exact
bounds implied by rounding for the crop box, a hand-placed pad-and-slice for
the CIFAR crop, PIL's whole-image resize plus slicing for the evaluation
crop, a full decode for draft mode, and a binomial bound for flips.
"""

import io
import math

import numpy as np
import pytest
from PIL import Image

from gmix_jax.data import image_ops


def _gradient(h, w, channels=3, seed=0, noise=20.0):
  """uint8 image increasing left to right (plus a little noise)."""
  rng = np.random.default_rng(seed)
  x = np.linspace(0, 220, w)[None, :, None] * np.ones((h, 1, channels))
  x = x + rng.normal(0, noise, (h, w, channels))
  return np.clip(x, 0, 255).astype(np.uint8)


def _encode(image, fmt='JPEG', quality=90):
  buf = io.BytesIO()
  array = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
  Image.fromarray(array).save(buf, format=fmt, quality=quality)
  return buf.getvalue()


def _psnr(a, b):
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  if mse == 0:
    return math.inf
  return 10 * math.log10(255.0 ** 2 / mse)


# ----------------------------------------------------------------------------
# Crop geometry
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('height,width', [(375, 500), (500, 375), (40, 96),
                                          (224, 224), (33, 57)])
def test_crop_box_within_image_scale_and_ratio(height, width):
  rng = np.random.default_rng(0)
  lo, hi = image_ops.CROP_SCALE
  r_lo, r_hi = image_ops.CROP_RATIO
  area = height * width
  fractions = []
  for _ in range(2000):
    top, left, h, w = image_ops.random_resized_crop_box(rng, height, width)
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
    assert h >= 1 and w >= 1
    if (h, w) == (height, width):  # the fallback (or a full-size draw)
      continue
    # w = round(sqrt(a A r)), h = round(sqrt(a A / r)) with a in scale and
    # r in ratio: each side is within 1/2 of its exact value, so
    assert (h + 0.5) * (w + 0.5) >= lo * area
    assert (h - 0.5) * (w - 0.5) <= hi * area
    assert (w + 0.5) / (h - 0.5) >= r_lo and (w - 0.5) / (h + 0.5) <= r_hi
    fractions.append(h * w / area)
  # Not degenerate: the draws cover the scale range, up to the largest box
  # of an allowed ratio (the fallback box; a 40 x 96 image allows 40 x 53).
  _, _, fh, fw = image_ops.random_resized_crop_box(rng, height, width,
                                                   attempts=0)
  assert min(fractions) < 0.15 and max(fractions) > 0.85 * fh * fw / area


def test_crop_box_positions_cover_the_image():
  rng = np.random.default_rng(1)
  tops = [image_ops.random_resized_crop_box(rng, 375, 500)[0]
          for _ in range(500)]
  assert min(tops) == 0 and max(tops) > 200


@pytest.mark.parametrize('height,width,expected', [
    # own ratio 10/100 < 3/4: full width, h = round(10 / 0.75) = 13, centred.
    (100, 10, (43, 0, 13, 10)),
    # own ratio 100/10 > 4/3: full height, w = round(10 * 4/3) = 13.
    (10, 100, (0, 43, 10, 13)),
    # ratio inside the bounds: the whole image.
    (30, 35, (0, 0, 30, 35)),
])
def test_crop_box_fallback_is_the_centred_crop(height, width, expected):
  rng = np.random.default_rng(0)
  assert image_ops.random_resized_crop_box(
      rng, height, width, attempts=0) == expected


def test_crop_box_same_rng_same_box():
  a = image_ops.random_resized_crop_box(np.random.default_rng(5), 375, 500)
  b = image_ops.random_resized_crop_box(np.random.default_rng(5), 375, 500)
  c = image_ops.random_resized_crop_box(np.random.default_rng(6), 375, 500)
  assert a == b and a != c


# ----------------------------------------------------------------------------
# Transforms: shapes, dtypes, determinism
# ----------------------------------------------------------------------------


_RGB = _gradient(48, 64)
_INPUTS = {
    'jpeg': _encode(_RGB),
    'png': _encode(_RGB, 'PNG'),
    'array': _RGB,
}


@pytest.mark.parametrize('kind', sorted(_INPUTS))
@pytest.mark.parametrize('augment,size,train,shape', [
    ('inception', 32, True, (32, 32, 3)),
    ('inception', 32, False, (32, 32, 3)),
    ('cifar', None, True, (48, 64, 3)),
    ('cifar', None, False, (48, 64, 3)),
    ('cifar', 24, True, (24, 24, 3)),
    ('none', None, True, (48, 64, 3)),
    ('none', 20, False, (20, 20, 3)),
])
def test_output_shape_and_dtype(kind, augment, size, train, shape):
  f = image_ops.make_record_transform(augment, size, train)
  out = f({'image': _INPUTS[kind], 'label': 7, 'extra': 1},
          np.random.default_rng(0))
  assert set(out) == {'image', 'label'}
  assert out['image'].shape == shape and out['image'].dtype == np.uint8
  assert out['image'].flags.c_contiguous
  assert out['label'] == 7 and out['label'].dtype == np.int32


@pytest.mark.parametrize('augment,size', [('inception', 32), ('cifar', None)])
def test_same_rng_same_output(augment, size):
  f = image_ops.make_record_transform(augment, size, train=True)
  rec = {'image': _INPUTS['jpeg'], 'label': 0}
  runs = [f(rec, np.random.default_rng(s))['image'] for s in (3, 3, 4)]
  np.testing.assert_array_equal(runs[0], runs[1])
  assert not np.array_equal(runs[0], runs[2])


def test_none_passes_arrays_through():
  f = image_ops.make_record_transform('none', None, train=True)
  np.testing.assert_array_equal(
      f({'image': _RGB, 'label': 0}, None)['image'], _RGB)
  png = f({'image': _INPUTS['png'], 'label': 0}, None)['image']
  np.testing.assert_array_equal(png, _RGB)  # PNG is lossless


# ----------------------------------------------------------------------------
# Flip
# ----------------------------------------------------------------------------


def _binomial_ok(k, n, p=0.5, sds=5.0):
  return abs(k - n * p) <= sds * math.sqrt(n * p * (1 - p))


def test_inception_flip_probability_is_half():
  """The gradient rises left to right in every crop unless flipped."""
  f = image_ops.make_record_transform('inception', 16, train=True)
  image = _gradient(40, 60, noise=0.0)
  n = 1000
  flipped = 0
  for seed in range(n):
    out = f({'image': image, 'label': 0},
            np.random.default_rng(seed))['image'].astype(int)
    left, right = out[:, 0].mean(), out[:, -1].mean()
    assert left != right
    flipped += left > right
  assert _binomial_ok(flipped, n), flipped


def test_cifar_flip_probability_is_half():
  """Left half dark, right half bright: a shift of at most 4 pixels keeps
  output columns 11 and 20 on their sides, so only a flip swaps them."""
  image = np.zeros((32, 32, 3), np.uint8)
  image[:, 16:] = 255
  f = image_ops.make_record_transform('cifar', None, train=True)
  n = 2000
  flipped = 0
  for seed in range(n):
    out = f({'image': image, 'label': 0}, np.random.default_rng(seed))
    col11, col20 = out['image'][:, 11].mean(), out['image'][:, 20].mean()
    assert {col11 > 128, col20 > 128} == {True, False}
    flipped += col11 > col20
  assert _binomial_ok(flipped, n), flipped


# ----------------------------------------------------------------------------
# CIFAR pad-crop, evaluation crop, draft mode, channels
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('fill', [None, (10, 20, 30)])
def test_pad_crop_equals_pad_then_slice(fill):
  image = np.random.default_rng(0).integers(0, 256, (12, 10, 3), np.uint8)
  for seed in range(50):
    out = image_ops.pad_crop(np.random.default_rng(seed), image, 4, fill)
    top, left = np.random.default_rng(seed).integers(0, 9, size=2)
    padded = np.empty((20, 18, 3), np.uint8)
    padded[...] = np.asarray(fill or (0, 0, 0), np.uint8)
    padded[4:16, 4:14] = image
    np.testing.assert_array_equal(out, padded[top:top + 12, left:left + 10])


def test_cifar_eval_is_identity():
  f = image_ops.make_record_transform('cifar', None, train=False)
  np.testing.assert_array_equal(
      f({'image': _RGB, 'label': 0}, np.random.default_rng(0))['image'], _RGB)


def test_eval_centre_crop_without_resize_is_a_slice():
  # size 28: the shorter side is resized to int(28 / 0.875) = 32, which it
  # already is; offsets (32 - 28) // 2 = 2 and (48 - 28) // 2 = 10.
  image = np.random.default_rng(0).integers(0, 256, (32, 48, 3), np.uint8)
  f = image_ops.make_record_transform('inception', 28, train=False)
  out = f({'image': image, 'label': 0}, None)['image']
  np.testing.assert_array_equal(out, image[2:30, 10:38])
  out_t = f({'image': image.transpose(1, 0, 2).copy(), 'label': 0},
            None)['image']
  np.testing.assert_array_equal(out_t, image.transpose(1, 0, 2)[10:38, 2:30])


def test_eval_centre_crop_equals_resize_then_slice():
  image = _gradient(375, 500, noise=30.0)
  f = image_ops.make_record_transform('inception', 224, train=False)
  out = f({'image': image, 'label': 0}, None)['image']
  # Shorter side 375 -> 256, longer 500 -> round(500 * 256 / 375) = 341.
  full = np.asarray(Image.fromarray(image).resize((341, 256),
                                                  Image.Resampling.BILINEAR))
  ref = full[16:240, 58:282]  # (256 - 224) // 2, (341 - 224) // 2
  # PIL rounds to uint8 between its two resampling passes: off by <= 1.
  assert np.abs(out.astype(int) - ref).max() <= 1


def test_draft_mode_decodes_fewer_pixels_and_matches_full_decode():
  jpeg = _encode(_gradient(375, 500, noise=10.0), quality=95)
  im = image_ops.open_image(jpeg)
  assert image_ops.draft_for(im, 'RGB', (100, 75)) == 0.25
  assert im.size == (125, 94)  # ceil(500 / 4), ceil(375 / 4)
  psnrs = []
  for box, size in [((0, 0, 375, 500), 64), ((50, 100, 300, 240), 56),
                    ((10, 20, 200, 300), 224)]:
    fast = image_ops.crop_resize(image_ops.open_image(jpeg), box, size)
    slow = image_ops.crop_resize(image_ops.open_image(jpeg), box, size,
                                 draft=False)
    assert fast.shape == slow.shape == (size, size, 3)
    assert _psnr(fast, slow) > 40, box  # measured: about 49-52 dB
    psnrs.append(_psnr(fast, slow))
  assert psnrs[-1] == math.inf  # a 200 x 300 box to 224 px: no reduction


def test_grayscale_inputs():
  gray = _gradient(40, 50, channels=1)
  for image in (gray, gray[..., 0], _encode(gray), _encode(gray, 'PNG')):
    for augment, size in (('inception', 16), ('none', None)):
      f = image_ops.make_record_transform(augment, size, train=True)
      out = f({'image': image, 'label': 0}, np.random.default_rng(0))['image']
      assert out.shape[-1] == 1 and out.ndim == 3
      g = image_ops.make_record_transform(augment, size, train=True,
                                          channels=3)
      rgb = g({'image': image, 'label': 0}, np.random.default_rng(0))['image']
      assert rgb.shape == (*out.shape[:2], 3)
      np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
      assert np.abs(rgb[..., :1].astype(int) - out).max() <= 1
  # Colour to one channel, on request.
  f = image_ops.make_record_transform('none', None, train=False, channels=1)
  assert f({'image': _INPUTS['jpeg'], 'label': 0}, None)['image'].shape == (
      48, 64, 1)


# ----------------------------------------------------------------------------
# Bad configuration
# ----------------------------------------------------------------------------


def test_unknown_augment_names_field_and_values():
  with pytest.raises(ValueError, match='dataset.augment') as e:
    image_ops.make_record_transform('randaugment', 32, True)
  for name in image_ops.AUGMENT_NAMES:
    assert name in str(e.value)


@pytest.mark.parametrize('size', [None, 0, 2.5, True])
def test_inception_needs_a_valid_image_size(size):
  with pytest.raises(ValueError, match='dataset.image_size'):
    image_ops.make_record_transform('inception', size, True)


def test_bad_array_is_rejected():
  f = image_ops.make_record_transform('none', 8, True)
  with pytest.raises(ValueError, match='uint8'):
    f({'image': np.zeros((8, 8, 3), np.float32), 'label': 0}, None)


def test_cmyk_jpeg_becomes_rgb():
  """ImageNet holds a few CMYK JPEGs; they convert like PIL's own convert."""
  cmyk = Image.fromarray(_gradient(40, 60)).convert('CMYK')
  buf = io.BytesIO()
  cmyk.save(buf, format='JPEG', quality=95)
  f = image_ops.make_record_transform('none', None, train=False, channels=3)
  out = f({'image': buf.getvalue(), 'label': 0}, None)['image']
  ref = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert('RGB'))
  assert out.shape == (40, 60, 3)
  np.testing.assert_array_equal(out, ref)
  # channels=None: modes other than L and RGB also become RGB.
  g = image_ops.make_record_transform('inception', 16, train=True)
  assert g({'image': buf.getvalue(), 'label': 0},
           np.random.default_rng(0))['image'].shape == (16, 16, 3)


def test_inception_train_is_box_then_crop_resize_then_flip():
  """The transform composes the pieces, drawing box then flip from one rng."""
  jpeg = _INPUTS['jpeg']
  f = image_ops.make_record_transform('inception', 24, train=True)
  flips = 0
  for seed in range(40):
    out = f({'image': jpeg, 'label': 0}, np.random.default_rng(seed))['image']
    rng = np.random.default_rng(seed)
    box = image_ops.random_resized_crop_box(rng, 48, 64)
    crop = image_ops.crop_resize(image_ops.open_image(jpeg), box, 24)
    flipped = rng.random() < 0.5
    flips += flipped
    np.testing.assert_array_equal(out, crop[:, ::-1] if flipped else crop)
  assert 0 < flips < 40
