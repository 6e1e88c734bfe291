"""image_ops' fast JPEG decoding (simplejpeg) gives exactly PIL's pixels.

Every transform is run twice on the same record and generator: with the fast
decoder, and with it switched off (``image_ops.simplejpeg = None``: PIL
decodes everything, the path tests/test_image_ops.py checks). The outputs
must be equal to the bit. The fallbacks (PNG, CMYK, a draft-reduced decode,
RGB wanted as L under draft mode, truncated data) must not go through the
fast decoder.
"""
import io

import numpy as np
import pytest
from PIL import Image

from gmix_jax.data import image_ops

simplejpeg = pytest.importorskip('simplejpeg')


def _image(h, w, channels=3, seed=0):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w]
  base = np.stack([127 + 100 * np.sin((xx * (c + 1) + yy * (3 - c)) / 9.0)
                   for c in range(channels)], -1)
  return np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)


def _encode(array, mode=None, **kw):
  buf = io.BytesIO()
  im = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
  (im.convert(mode) if mode else im).save(buf, format=kw.pop('format', 'JPEG'), **kw)
  return buf.getvalue()


CASES = {
    'rgb 500x375 q90 4:2:0': _encode(_image(375, 500), quality=90),
    'rgb odd 37x61 q75 4:2:2': _encode(_image(37, 61, seed=1), quality=75, subsampling=1),
    'rgb odd 229x301 q95 4:4:4': _encode(_image(229, 301, seed=2), quality=95, subsampling=0),
    'rgb progressive 123x97': _encode(_image(123, 97, seed=3), quality=85, progressive=True),
    'gray 83x131': _encode(_image(83, 131, 1, seed=4), quality=90),
    'rgb 1x1': _encode(_image(1, 1, seed=5)),
}
FALLBACKS = {
    'cmyk jpeg': _encode(_image(40, 60, seed=6), mode='CMYK', quality=95),
    'png': _encode(_image(45, 70, seed=7), format='PNG'),
    'gray png': _encode(_image(45, 70, 1, seed=8), format='PNG'),
}


def _transforms():
  for augment, size in (('inception', 24), ('inception', 224), ('none', None), ('none', 32),
                        ('cifar', 32), ('moco', 24), ('moco', None)):
    for train in (True, False):
      for channels in (None, 1, 3):
        yield augment, size, train, channels


def _run(image, augment, size, train, channels, fast, monkeypatch):
  with monkeypatch.context() as m:
    if not fast:
      m.setattr(image_ops, 'simplejpeg', None)
    f = image_ops.make_record_transform(augment, size, train, channels=channels)
    return [f({'image': image, 'label': 0}, np.random.default_rng(seed))['image']
            for seed in range(3)]


@pytest.mark.parametrize('name', [*CASES, *FALLBACKS])
def test_fast_decoder_output_equals_pil(name, monkeypatch):
  image = {**CASES, **FALLBACKS}[name]
  for args in _transforms():
    fast = _run(image, *args, True, monkeypatch)
    slow = _run(image, *args, False, monkeypatch)
    for a, b in zip(fast, slow):
      assert a.dtype == b.dtype == np.uint8
      np.testing.assert_array_equal(a, b, err_msg=f'{name} {args}')


@pytest.mark.parametrize('name', list(CASES))
def test_fast_decoder_is_used_for_rgb_and_gray_jpegs(name):
  im = image_ops.open_image(CASES[name])
  out = image_ops.fast_decode(im, im.mode)
  assert out is not im and out.mode == im.mode and out.size == im.size
  np.testing.assert_array_equal(np.asarray(out), np.asarray(Image.open(io.BytesIO(CASES[name]))))


@pytest.mark.parametrize('name', list(FALLBACKS))
def test_pil_decodes_the_fallbacks(name):
  im = image_ops.open_image(FALLBACKS[name])
  assert image_ops.fast_decode(im, 'RGB') is im


def test_pil_keeps_draft_reduced_and_rgb_to_gray_decodes():
  im = image_ops.open_image(_encode(_image(600, 800, seed=9), quality=90))
  assert image_ops.fast_decode(im, 'RGB', (224, 224)) is im      # draft would decode at 1/2
  assert image_ops.fast_decode(im, 'RGB', (500, 300)) is not im  # no reduction possible
  assert image_ops.fast_decode(im, 'L', (500, 300)) is im        # libjpeg's Y, not PIL's luma
  assert image_ops.fast_decode(im, 'L') is not im                # no draft: decode, then convert


def test_truncated_jpeg_is_left_to_pil():
  data = CASES['rgb 500x375 q90 4:2:0']
  cut = data[:len(data) // 2]
  im = image_ops.open_image(cut)
  assert image_ops.fast_decode(im, 'RGB') is im
  f = image_ops.make_record_transform('none', None, False)
  with pytest.raises(OSError, match='truncated'):
    f({'image': cut, 'label': 0}, None)
