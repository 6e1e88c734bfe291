"""JPEG decoding for the input workers: libjpeg-turbo through simplejpeg.

PIL decodes a JPEG with libjpeg-turbo's accurate integer IDCT and its
"fancy" (smooth) chroma upsampling; ``simplejpeg.decode_jpeg`` with its
defaults (``fastdct=False``, ``fastupsample=False``) runs the same library
with the same settings, so both give the same pixels (tested in
tests/test_fast_jpeg.py), and simplejpeg skips PIL's file-object reads and
per-row unpacking. It decodes straight into 4-byte ``RGBX`` pixels, PIL's own
layout for ``RGB`` images, which `Image.frombuffer` then wraps without a copy;
the crop + resize of `image_ops` runs on that image as it would on PIL's.

Only the common case takes this path: encoded bytes of a 3-component
(YCbCr) JPEG to be read as RGB, baseline or progressive. Everything else goes
to PIL as before: PNG and other formats, grayscale, CMYK/YCCK and Adobe RGB
JPEGs, single-channel targets, images above PIL's ``MAX_IMAGE_PIXELS``
(its decompression-bomb check), a JPEG that `image_ops` decodes in PIL's
draft mode (a reduced DCT scale), and a JPEG that libjpeg-turbo reports damaged
(``strict`` decoding raises where PIL may still return pixels, so PIL
decides, as it did before). Without the simplejpeg package, or with the
environment variable ``GMIX_JAX_JPEG_DECODER=pil`` (read when this module is
imported, so set it before starting the trainer: the input workers inherit
it), PIL decodes everything.
"""

from __future__ import annotations

import os

from PIL import Image

ENV = 'GMIX_JAX_JPEG_DECODER'
DECODERS = ('simplejpeg', 'pil')
_SOI = b'\xff\xd8'


def _load_simplejpeg():
  choice = os.environ.get(ENV, 'simplejpeg')
  if choice not in DECODERS:
    raise ValueError(f'{ENV} must be one of {DECODERS}, got {choice!r}.')
  if choice == 'pil':
    return None
  try:
    import simplejpeg  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return simplejpeg


simplejpeg = _load_simplejpeg()


def decoder() -> str:
  """The decoder in use for the common case: 'simplejpeg' or 'pil'."""
  return 'pil' if simplejpeg is None else 'simplejpeg'


def rgb_size(image) -> tuple[int, int] | None:
  """``(width, height)`` when this module decodes ``image`` (see the module
  docstring), else None (PIL's turn). Reads the header only."""
  if simplejpeg is None or not isinstance(image, bytes) or image[:2] != _SOI:
    return None
  try:
    height, width, colourspace, _ = simplejpeg.decode_jpeg_header(image)
  except ValueError:
    return None
  if colourspace != 'YCbCr' or (Image.MAX_IMAGE_PIXELS and width * height >
                                Image.MAX_IMAGE_PIXELS):
    return None   # PIL's decompression-bomb check applies to huge images
  return width, height


def open_rgb(image: bytes) -> Image.Image | None:
  """The decoded image as a PIL ``RGBX`` image over simplejpeg's buffer (its
  ``X`` bytes are 255; PIL treats ``RGBX`` as ``RGB`` plus padding), or None
  if libjpeg-turbo reports the data damaged. Call `rgb_size` first."""
  try:
    array = simplejpeg.decode_jpeg(image, 'RGBX')
  except ValueError:
    return None
  height, width = array.shape[:2]
  return Image.frombuffer('RGBX', (width, height), array, 'raw', 'RGBX', 0, 1)


def decode_rgb(image: bytes):
  """uint8 ``[H, W, 3]`` straight from simplejpeg, or None as `open_rgb`."""
  try:
    return simplejpeg.decode_jpeg(image, 'RGB')
  except ValueError:
    return None
