"""The opt-in fast crop + resize (``dataset.decode='fast'``), through OpenCV.

PIL's antialiased bilinear resize (`image_ops`) is, per axis, a triangle
filter of half-width ``s = max(1, in / out)`` input pixels, centred on each
output pixel and normalised. This module approximates it, per axis, with
OpenCV's cheaper filters:

* an axis that is enlarged (``s <= 1``): ``INTER_LINEAR``, bilinear with
  half-pixel centres as PIL's (PIL's filter is the same triangle there;
  OpenCV rounds the weights to 11 bits, PIL to 22);
* an axis that is reduced (``s > 1``): ``INTER_AREA`` (the mean over each
  output pixel's footprint: a box of width ``s``), then the 3-tap filter
  ``[1/24, 22/24, 1/24]`` along that axis at output resolution. The box has
  variance ``s^2 / 12`` and PIL's triangle ``s^2 / 6``; the taps at spacing
  ``s`` add ``2 * (1/24) * s^2 = s^2 / 12``, so the sum matches the
  triangle's variance for every ``s``, which is why the taps are fixed.

Axes reduced both ways or enlarged both ways take one ``cv2.resize``; a crop
reduced along one axis and enlarged along the other takes two, each with
its own filter. The output is not PIL's: its PSNR against the exact path
(``dataset.decode='exact'``) is at least `PSNR_BOUND_DB` (38 dB) on every
crop of tests/test_fast_resize.py's generated JPEGs; measured on 224-px
Inception crops (docs/data.md, "Input throughput"): worst 44.0 dB, median
46.7 dB over 400 crops of the benchmark's noisy 500 x 375 JPEGs; over 300
crops each of two photographs (scikit-learn's ``china.jpg`` and
``flower.jpg``, 427 x 640), worst 36.2 / 44.9 dB, median 42.9 / 48.2 dB (the
worst crops reduce the width by exactly 2). Treating that as the same
augmentation is an assumption, not tested on what a network learns: an RMS
difference of about 1-4 grey levels of 255 is small beside the changes the augmentation itself makes (random
crop, scale and flip).

OpenCV runs one thread here (`cv2.setNumThreads(1)` on first use): an input
worker is one process on one core, and the pipeline parallelises across
workers.
"""

from __future__ import annotations

import importlib.util

import numpy as np

DECODES = ('exact', 'fast')
PSNR_BOUND_DB = 38.0
EXTRA = 'fast-decode'
_TAPS = np.array([1 / 24, 22 / 24, 1 / 24], np.float32)
_ONE = np.ones(1, np.float32)
_cv2 = None


def check_decode(value) -> str:
  """``dataset.decode`` checked: one of `DECODES`; 'fast' needs OpenCV."""
  if value not in DECODES:
    raise ValueError(f'dataset.decode must be one of {list(DECODES)}, got {value!r}')
  if value == 'fast' and importlib.util.find_spec('cv2') is None:
    raise ValueError(f"dataset.decode='fast' needs OpenCV (opencv-python-headless): "
                     f"pip install 'gmix_jax[{EXTRA}]'; or set dataset.decode='exact'")
  return value


def cv2_module():
  """OpenCV, imported once and set to one thread."""
  global _cv2
  if _cv2 is None:
    import cv2  # pylint: disable=g-import-not-at-top
    cv2.setNumThreads(1)
    _cv2 = cv2
  return _cv2


def crop_resize(array: np.ndarray, box, size: int) -> np.ndarray:
  """``array[top:top+h, left:left+w]`` (uint8 ``[H, W, C]``, ``box`` =
  ``(top, left, h, w)`` in whole pixels) resized to ``size`` x ``size`` with
  the filters of the module docstring."""
  cv2 = cv2_module()
  top, left, h, w = box
  crop = array[top:top + h, left:left + w]
  down_x, down_y = w > size, h > size
  area, linear = cv2.INTER_AREA, cv2.INTER_LINEAR
  if down_x == down_y:
    out = cv2.resize(crop, (size, size), interpolation=area if down_x else linear)
  elif down_x:   # reduce the width first (less data), then enlarge the height
    out = cv2.resize(cv2.resize(crop, (size, h), interpolation=area), (size, size),
                     interpolation=linear)
  else:
    out = cv2.resize(cv2.resize(crop, (w, size), interpolation=area), (size, size),
                     interpolation=linear)
  if down_x or down_y:
    out = cv2.sepFilter2D(out, -1, _TAPS if down_x else _ONE, _TAPS if down_y else _ONE,
                          borderType=cv2.BORDER_REPLICATE)
  return out.reshape(size, size, -1)
