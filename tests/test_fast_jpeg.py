"""The simplejpeg decoding path (`gmix_jax.data.fast_jpeg`) against PIL's.

Every transform must give the same pixels whichever decoder ran; the fast
path must really be taken for colour JPEGs (counted), and must hand to PIL
what it does not read (grayscale, CMYK, PNG, one-channel targets, damaged
or draft-mode JPEGs).
"""

import io

import numpy as np
import pytest
from PIL import Image

from gmix_jax.data import fast_jpeg
from gmix_jax.data import image_ops
from gmix_jax.data import ssl_ops

simplejpeg = pytest.importorskip('simplejpeg')


def _image(h, w, seed=0, mode='RGB'):
  """Smooth colour pattern plus noise (as the benchmark's JPEGs), in ``mode``."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w]
  base = np.stack([127 + 100 * np.sin(xx / (5 + c) + yy / (7 - c)) for c in range(3)], -1)
  x = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
  return Image.fromarray(x).convert(mode)


def _jpeg(im, **kw):
  buf = io.BytesIO()
  im.save(buf, format=kw.pop('format', 'JPEG'), quality=kw.pop('quality', 90), **kw)
  return buf.getvalue()


# Odd and even sizes, every chroma subsampling, baseline and progressive.
COLOUR = {
    '1x1': _jpeg(_image(1, 1)),
    '17x23_420': _jpeg(_image(17, 23, 1)),
    '37x53_444': _jpeg(_image(37, 53, 2), subsampling=0),
    '75x101_422': _jpeg(_image(75, 101, 3), subsampling=1),
    '375x500_420': _jpeg(_image(375, 500, 4)),
    '333x257_progressive': _jpeg(_image(333, 257, 5), progressive=True),
    '240x320_q75_optimize': _jpeg(_image(240, 320, 6), quality=75, optimize=True),
}


@pytest.fixture
def counted(monkeypatch):
  """Counts the images the fast path decodes."""
  calls = []
  open_rgb, decode_rgb = fast_jpeg.open_rgb, fast_jpeg.decode_rgb
  monkeypatch.setattr(fast_jpeg, 'open_rgb', lambda b: calls.append(b) or open_rgb(b))
  monkeypatch.setattr(fast_jpeg, 'decode_rgb', lambda b: calls.append(b) or decode_rgb(b))
  return calls


def _outputs(image, channels):
  """Every transform of one image under fixed seeds."""
  outs = []
  for augment, size in [('inception', 224), ('inception', 24), ('moco', 32), ('none', None),
                        ('none', 20), ('cifar', 16)]:
    for train in (True, False):
      f = image_ops.make_record_transform(augment, size, train, channels=channels)
      for seed in range(3):
        outs.append(f({'image': image, 'label': 0}, np.random.default_rng(seed))['image'])
  return outs


def _with_pil(monkeypatch, fn):
  with monkeypatch.context() as m:
    m.setattr(fast_jpeg, 'simplejpeg', None)
    return fn()


@pytest.mark.parametrize('name', sorted(COLOUR))
@pytest.mark.parametrize('channels', [None, 3])
def test_every_transform_is_identical_to_pil(name, channels, counted, monkeypatch):
  jpeg = COLOUR[name]
  fast = _outputs(jpeg, channels)
  assert counted, 'the fast path was not taken'
  n = len(counted)
  slow = _with_pil(monkeypatch, lambda: _outputs(jpeg, channels))
  assert len(counted) == n, 'the fast path ran with the decoder off'
  assert len(fast) == len(slow)
  for a, b in zip(fast, slow):
    assert a.dtype == np.uint8 and a.shape == b.shape and a.shape[-1] == 3
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('name', sorted(COLOUR))
def test_full_decode_is_pils_decode(name):
  jpeg = COLOUR[name]
  ref = np.asarray(Image.open(io.BytesIO(jpeg)).convert('RGB'))
  np.testing.assert_array_equal(fast_jpeg.decode_rgb(jpeg), ref)
  im = fast_jpeg.open_rgb(jpeg)
  assert im.mode == 'RGB', 'the three-band wrap (`_wrap_rgb`) was not taken'
  np.testing.assert_array_equal(np.asarray(im), ref)
  assert fast_jpeg.rgb_size(jpeg) == (ref.shape[1], ref.shape[0])


@pytest.mark.parametrize('name', sorted(COLOUR))
def test_inception_crops_and_flips_are_identical_to_pil(name, counted, monkeypatch):
  """The training crop under many seeds (both flips, many boxes), at an
  output smaller and larger than the image."""
  jpeg = COLOUR[name]
  run = lambda: [image_ops.make_record_transform('inception', size, True, channels=3)(
      {'image': jpeg, 'label': 0}, np.random.default_rng(seed))['image']
                 for size in (7, 224) for seed in range(12)]
  fast = run()
  assert counted
  slow = _with_pil(monkeypatch, run)
  for a, b in zip(fast, slow):
    np.testing.assert_array_equal(a, b)


def test_rgbx_wrap_fallback_is_identical(counted, monkeypatch):
  """Should Pillow refuse to map the buffer as ``RGB``, the ``RGBX`` image
  it falls back to gives the same outputs."""
  jpeg = COLOUR['375x500_420']
  with monkeypatch.context() as m:
    map_buffer = Image.core.map_buffer
    def refuse_rgb(data, size, decoder, offset, args):
      if args[0] == 'RGB':
        raise ValueError('unknown raw mode')
      return map_buffer(data, size, decoder, offset, args)
    m.setattr(Image.core, 'map_buffer', refuse_rgb)
    assert fast_jpeg.open_rgb(jpeg).mode == 'RGBX'
  fallback = []
  with monkeypatch.context() as m:
    real = Image.frombuffer
    m.setattr(fast_jpeg, '_wrap_rgb', lambda a, w, h: real('RGBX', (w, h), a, 'raw', 'RGBX', 0, 1))
    fallback = _outputs(jpeg, 3)
  assert counted
  rgb = _outputs(jpeg, 3)
  for a, b in zip(fallback, rgb):
    np.testing.assert_array_equal(a, b)


def test_a_pillow_that_maps_rgb_otherwise_gets_the_rgbx_image(monkeypatch):
  """The once-per-process pixel check of the private ``RGB`` mapping: a
  Pillow whose ``RGB`` mapping gives other pixels (here: the buffer read as
  packed 3-byte pixels) gets the ``RGBX`` image, never wrong pixels."""
  array = np.arange(5 * 7 * 4, dtype=np.uint8).reshape(5, 7, 4)
  assert fast_jpeg._map_rgb(array, 7, 5) is not None             # this Pillow: works
  fast_jpeg._rgb_mapping_works.cache_clear()
  try:
    monkeypatch.setattr(fast_jpeg, '_map_rgb', lambda a, w, h: Image.fromarray(
        np.ascontiguousarray(a.reshape(-1)[:h * w * 3].reshape(h, w, 3))))
    assert not fast_jpeg._rgb_mapping_works()
    im = fast_jpeg.open_rgb(COLOUR['375x500_420'])
    assert im.mode == 'RGBX'
  finally:
    monkeypatch.undo()
    fast_jpeg._rgb_mapping_works.cache_clear()
  assert fast_jpeg._rgb_mapping_works()


FALLBACK = {
    'grayscale': _jpeg(_image(30, 41, mode='L')),
    'cmyk': _jpeg(_image(30, 41, mode='CMYK')),
    'png': _jpeg(_image(30, 41), format='PNG'),
    'array': np.asarray(_image(30, 41)),
}


@pytest.mark.parametrize('name', sorted(FALLBACK))
def test_what_simplejpeg_does_not_read_goes_to_pil(name, counted, monkeypatch):
  image = FALLBACK[name]
  assert fast_jpeg.rgb_size(image) is None
  fast = _outputs(image, 3)
  assert not counted
  slow = _with_pil(monkeypatch, lambda: _outputs(image, 3))
  for a, b in zip(fast, slow):
    np.testing.assert_array_equal(a, b)


def test_one_channel_target_goes_to_pil(counted, monkeypatch):
  jpeg = COLOUR['75x101_422']
  fast = _outputs(jpeg, 1)
  assert not counted
  slow = _with_pil(monkeypatch, lambda: _outputs(jpeg, 1))
  for a, b in zip(fast, slow):
    assert a.shape[-1] == 1
    np.testing.assert_array_equal(a, b)


def test_damaged_jpegs_behave_as_with_pil(monkeypatch):
  jpeg = COLOUR['375x500_420']
  f = image_ops.make_record_transform('inception', 32, True, channels=3)
  run = lambda b: f({'image': b, 'label': 0}, np.random.default_rng(0))['image']
  # Cut short: PIL refuses it (an OSError, which the pipeline counts as a bad record).
  with pytest.raises(OSError):
    run(jpeg[:len(jpeg) // 2])
  # Junk between two markers: libjpeg-turbo warns (simplejpeg's strict mode
  # raises), PIL decodes; the output is PIL's.
  assert jpeg.endswith(b'\xff\xd9')
  junk = jpeg[:-2] + b'\x00\x00\x00' + jpeg[-2:]   # before the end-of-image marker
  with pytest.raises(ValueError):
    simplejpeg.decode_jpeg(junk, 'RGB')
  assert fast_jpeg.open_rgb(junk) is None
  np.testing.assert_array_equal(run(junk), _with_pil(monkeypatch, lambda: run(junk)))


def test_draft_reduces_is_pillows_rule():
  """`draft_reduces` (no decoder) against Pillow's own draft on a real JPEG."""
  jpeg = _jpeg(_image(300, 417, 7))
  rng = np.random.default_rng(0)
  reduced = 0
  for _ in range(300):
    size = int(rng.integers(8, 200))
    h, w = int(rng.integers(1, 301)), int(rng.integers(1, 418))
    box = (0, 0, h, w)
    im = image_ops.open_image(jpeg)
    pillow = image_ops.draft_for(im, 'RGB', (417 * size / w, 300 * size / h)) != 1.0
    assert image_ops.draft_reduces(417, 300, box, size) == pillow, (box, size)
    reduced += pillow
  assert 0 < reduced < 300


def test_draft_mode_jpeg_goes_to_pil(counted, monkeypatch):
  """A crop that PIL decodes at a reduced DCT scale keeps PIL's pixels."""
  jpeg = _jpeg(_image(400, 600, 8))
  box = lambda h, w: (0, 0, h, w)
  fast = image_ops.as_array(image_ops.decode_crop_resize(jpeg, box, 48))
  assert not counted
  slow = _with_pil(monkeypatch, lambda: image_ops.as_array(
      image_ops.decode_crop_resize(jpeg, box, 48)))
  np.testing.assert_array_equal(fast, slow)
  # Without draft the fast path runs, and gives PIL's full-scale pixels.
  full = image_ops.as_array(image_ops.decode_crop_resize(jpeg, box, 48, draft=False))
  assert len(counted) == 1
  np.testing.assert_array_equal(full, image_ops.crop_resize(
      image_ops.open_image(jpeg), None, 48, draft=False))


def test_moco_view_is_identical_to_pil(counted, monkeypatch):
  jpeg = COLOUR['375x500_420']
  fast = [ssl_ops.moco_train(jpeg, np.random.default_rng(s), 224, 3) for s in range(4)]
  assert len(counted) == 4
  slow = _with_pil(monkeypatch, lambda: [
      ssl_ops.moco_train(jpeg, np.random.default_rng(s), 224, 3) for s in range(4)])
  for a, b in zip(fast, slow):
    np.testing.assert_array_equal(a, b)


def test_decoder_choice_from_the_environment(monkeypatch):
  monkeypatch.setenv(fast_jpeg.ENV, 'pil')
  assert fast_jpeg._load_simplejpeg() is None
  monkeypatch.setenv(fast_jpeg.ENV, 'simplejpeg')
  assert fast_jpeg._load_simplejpeg() is simplejpeg
  monkeypatch.setenv(fast_jpeg.ENV, 'turbo')
  with pytest.raises(ValueError, match=f"{fast_jpeg.ENV} must be one of"):
    fast_jpeg._load_simplejpeg()
  monkeypatch.delenv(fast_jpeg.ENV)
  assert fast_jpeg._load_simplejpeg() is simplejpeg
  assert fast_jpeg.decoder() == 'simplejpeg'


def test_importing_with_an_invalid_decoder_raises_a_clear_error(monkeypatch):
  """A library user (no command line) gets a ValueError naming the variable
  and the allowed values when the module is imported (a fresh copy of it is
  executed here, so the module in use stays as it is)."""
  import importlib.util
  monkeypatch.setenv(fast_jpeg.ENV, 'turbo')
  spec = importlib.util.spec_from_file_location('fast_jpeg_copy', fast_jpeg.__file__)
  with pytest.raises(ValueError, match=r"environment variable GMIX_JAX_JPEG_DECODER must be "
                     r"one of simplejpeg, pil \(unset: simplejpeg\), got 'turbo'"):
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
