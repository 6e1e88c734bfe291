"""The opt-in fast Inception crop (``dataset.decode='fast'``, `fast_resize`).

Its filters against a float64 reference built from the module docstring's
definition; its output against the exact (PIL) path within the stated PSNR
bound, the fast path really taken (counted); what it does not read handed to
the exact path unchanged; the knob's validation. Tests needing OpenCV skip
without it.
"""

import importlib.util
import io

import numpy as np
import pytest
from PIL import Image

from gmix_jax import main
from gmix_jax.data import fast_resize
from gmix_jax.data import image_ops

HAS_CV2 = importlib.util.find_spec('cv2') is not None
needs_cv2 = pytest.mark.skipif(not HAS_CV2, reason="OpenCV not installed (the 'fast-decode' extra)")
pytest.importorskip('simplejpeg')


def _image(h, w, seed=0, mode='RGB'):
  """Smooth colour pattern, sharp edges and noise, in ``mode``."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w]
  base = np.stack([127 + 90 * np.sin(xx / (4 + c) + yy / (9 - c)) for c in range(3)], -1)
  base += 60 * (((xx // 13) + (yy // 11)) % 2)[..., None] - 30     # checker edges
  x = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
  return Image.fromarray(x).convert(mode)


def _encode(im, fmt='JPEG'):
  buf = io.BytesIO()
  im.save(buf, format=fmt, **({'quality': 90} if fmt == 'JPEG' else {}))
  return buf.getvalue()


def _psnr(a, b):
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return np.inf if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@pytest.fixture
def counted(monkeypatch):
  """Counts the crops `fast_resize` resizes."""
  calls = []
  crop_resize = fast_resize.crop_resize
  monkeypatch.setattr(fast_resize, 'crop_resize',
                      lambda *a: calls.append(a[1]) or crop_resize(*a))
  return calls


# ----------------------------------------------------------------------------
# The filters against their definition
# ----------------------------------------------------------------------------


def _axis_matrix(n, m):
  """[m, n] float64 weights resizing an axis of n pixels to m (docstring):
  bilinear with half-pixel centres (edge pixels repeated) when m >= n; else
  the box average over each output pixel's footprint, then the taps
  [1/24, 22/24, 1/24] at output resolution (edge outputs repeated)."""
  s = n / m
  a = np.zeros((m, n))
  if s <= 1:
    for j in range(m):
      x = min(max((j + 0.5) * s - 0.5, 0.0), n - 1.0)
      i0 = int(np.floor(x))
      i1, f = min(i0 + 1, n - 1), x - i0
      a[j, i0] += 1 - f
      a[j, i1] += f
    return a
  for j in range(m):
    lo, hi = j * s, (j + 1) * s
    for i in range(int(np.floor(lo)), min(n, int(np.ceil(hi)))):
      a[j, i] = (min(hi, i + 1) - max(lo, i)) / s
  taps = np.zeros((m, m))
  for j in range(m):
    for k, w in ((j - 1, 1 / 24), (j, 22 / 24), (j + 1, 1 / 24)):
      taps[j, min(max(k, 0), m - 1)] += w
  return taps @ a


@needs_cv2
@pytest.mark.parametrize('box', [(5, 7, 61, 83),    # reduced both ways
                                 (0, 0, 17, 29),    # enlarged both ways
                                 (3, 1, 57, 19),    # height reduced, width enlarged
                                 (2, 4, 23, 90),    # width reduced, height enlarged
                                 (0, 0, 40, 90),    # one axis unchanged
                                 (9, 11, 40, 40)])  # the same size: identity
def test_crop_resize_is_the_documented_filter_per_axis(box):
  x = np.asarray(_image(70, 97, 1))
  top, left, h, w = box
  crop = x[top:top + h, left:left + w].astype(np.float64)
  want = np.einsum('yh,hwc,xw->yxc', _axis_matrix(h, 40), crop, _axis_matrix(w, 40))
  got = fast_resize.crop_resize(x, box, 40)
  assert got.shape == (40, 40, 3) and got.dtype == np.uint8
  # OpenCV rounds its weights to 11 bits and each pass to uint8
  assert np.max(np.abs(got - want)) <= 2.0, np.max(np.abs(got - want))
  assert np.mean(np.abs(got - want)) < 0.6


def test_taps_match_the_triangle_variance():
  """Box of width s (variance s^2/12) + taps at spacing s = PIL's triangle
  of half-width s (variance s^2/6), for any s."""
  s = 1.7
  taps_var = 2 * (1 / 24) * s ** 2
  x = np.linspace(-s, s, 200001)
  tri = np.maximum(0, 1 - np.abs(x) / s)
  assert s ** 2 / 12 + taps_var == pytest.approx(np.sum(tri * x ** 2) / np.sum(tri), rel=1e-6)


# ----------------------------------------------------------------------------
# Against the exact path
# ----------------------------------------------------------------------------


# Odd and even image sizes; the output about 0.5-0.65 of the shorter side, so
# crops are reduced, enlarged and mixed (Inception crops: 8-100 % of the area).
SIZES = [(375, 500, 224), (333, 257, 160), (201, 150, 96), (67, 91, 41), (480, 640, 224)]


@needs_cv2
@pytest.mark.parametrize('h,w,size', SIZES)
def test_fast_inception_crop_is_within_the_psnr_bound(h, w, size, counted):
  data = _encode(_image(h, w, seed=h))
  psnrs = []
  for seed in range(24):
    fast = image_ops.inception_train(data, np.random.default_rng(seed), size, 3, 'fast')
    exact = image_ops.inception_train(data, np.random.default_rng(seed), size, 3, 'exact')
    assert fast.shape == exact.shape == (size, size, 3) and fast.dtype == np.uint8
    box = image_ops.random_resized_crop_box(np.random.default_rng(seed), h, w)
    if not image_ops.draft_reduces(w, h, box, size):    # else PIL's draft decode, exact
      psnrs.append(_psnr(fast, exact))
  assert len(counted) == len(psnrs) >= 12         # the fast path ran where it should
  assert min(psnrs) >= fast_resize.PSNR_BOUND_DB, sorted(psnrs)[:3]
  assert max(psnrs) < np.inf                      # and it is not PIL's resize


@needs_cv2
def test_fast_transform_keeps_the_crop_and_the_flip(counted):
  """Same generator: the same box and the same flip as the exact path (a
  mirrored output would be far below the bound)."""
  data = _encode(_image(120, 160, 3))
  fast = image_ops.make_record_transform('inception', 72, True, channels=3, decode_mode='fast')
  exact = image_ops.make_record_transform('inception', 72, True, channels=3)
  for seed in range(16):
    a = fast({'image': data, 'label': 1}, np.random.default_rng(seed))
    b = exact({'image': data, 'label': 1}, np.random.default_rng(seed))
    assert a['image'].flags.c_contiguous and a['label'] == 1
    assert _psnr(a['image'], b['image']) >= fast_resize.PSNR_BOUND_DB
  assert len(counted) == 16
  # evaluation stays exact
  ev = image_ops.make_record_transform('inception', 48, False, channels=3, decode_mode='fast')
  ex = image_ops.make_record_transform('inception', 48, False, channels=3)
  np.testing.assert_array_equal(ev({'image': data, 'label': 0}, None)['image'],
                                ex({'image': data, 'label': 0}, None)['image'])
  assert len(counted) == 16


@needs_cv2
@pytest.mark.parametrize('kind', ['gray_jpeg', 'cmyk_jpeg', 'png', 'array', 'one_channel',
                                  'draft'])
def test_what_fast_does_not_read_takes_the_exact_path(kind, counted):
  im, channels, size = _image(90, 110, 5), 3, 40
  data = {'gray_jpeg': lambda: _encode(im.convert('L')),
          'cmyk_jpeg': lambda: _encode(im.convert('CMYK')),
          'png': lambda: _encode(im, 'PNG'),
          'array': lambda: np.asarray(im),
          'one_channel': lambda: _encode(im),
          'draft': lambda: _encode(_image(400, 480, 6))}[kind]()
  if kind == 'one_channel':
    channels = 1
  if kind == 'draft':
    size = 16    # every crop of 400x480 px twice 16 px both ways: PIL's draft decode
  for seed in range(6):
    fast = image_ops.inception_train(data, np.random.default_rng(seed), size, channels, 'fast')
    exact = image_ops.inception_train(data, np.random.default_rng(seed), size, channels)
    np.testing.assert_array_equal(fast, exact)
  assert not counted


# ----------------------------------------------------------------------------
# The knob
# ----------------------------------------------------------------------------


def test_decode_values_are_checked():
  assert fast_resize.check_decode('exact') == 'exact'
  for bad in ('turbo', None, 'FAST', 1):
    with pytest.raises(ValueError, match=r"dataset\.decode must be one of \['exact', 'fast'\]"):
      fast_resize.check_decode(bad)
  with pytest.raises(ValueError, match='dataset.decode must be one of'):
    image_ops.make_record_transform('inception', 32, True, decode_mode='pil')


def test_fast_without_opencv_names_the_extra(monkeypatch):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'cv2' else find_spec(name, *a))
  with pytest.raises(ValueError, match=r"dataset.decode='fast' needs OpenCV .*gmix_jax\[fast-decode\]"):
    fast_resize.check_decode('fast')
  assert fast_resize.check_decode('exact') == 'exact'


def test_cli_rejects_a_bad_decode_before_training(capsys, tmp_path):
  code = main.main(['--config=configs/mnist_subset.py:erm', f'--workdir={tmp_path / "w"}',
                    '--config.dataset.decode=turbo'])
  err = capsys.readouterr().err
  assert code == 2
  assert err.startswith("error: dataset.decode must be one of ['exact', 'fast'], got 'turbo'")
  assert not (tmp_path / 'w').exists()


@needs_cv2
def test_the_training_stream_takes_the_knob(counted):
  """``TrainData.decode`` (``dataset.decode``) reaches the per-record
  transform of the training stream; the evaluation stream stays exact."""
  from gmix_jax.data import inputs, normalize, sources
  records = [{'image': _encode(_image(90 + i, 120, i)), 'label': i % 2} for i in range(6)]
  split = sources.Split('jpegs', 'train', records, 2, 255, channels=3)
  batch, data = {}, {}
  for decode in ('fast', 'exact'):
    data[decode] = inputs.TrainData(
        name='jpegs', train=split, test=split, train_ids=np.arange(6), input_shape=(56, 56, 3),
        normalizer=normalize.Normalizer(np.full(3, 0.5), np.full(3, 0.25), 255),
        augment='inception', image_size=56, workers=0, decode=decode)
    with data[decode].train_batches(global_batch=6, seed=0, num_steps=1, start_step=0,
                            process_index=0, process_count=1) as it:
      batch[decode] = next(iter(it))['x']
  assert len(counted) == 6
  assert batch['fast'].shape == batch['exact'].shape == (6, 56, 56, 3)
  for a, b in zip(batch['fast'], batch['exact']):
    assert fast_resize.PSNR_BOUND_DB <= _psnr(a, b) < np.inf
  with data['fast'].ordered_batches('test', global_batch=6, process_index=0, process_count=1) as it:
    next(iter(it))
  assert len(counted) == 6
