"""JPEG decoding for the input workers: libjpeg-turbo through simplejpeg.

PIL decodes a JPEG with libjpeg-turbo's accurate integer IDCT and its
"fancy" (smooth) chroma upsampling; ``simplejpeg.decode_jpeg`` with its
defaults (``fastdct=False``, ``fastupsample=False``) runs the same library
with the same settings, so both give the same pixels (tested in
tests/test_fast_jpeg.py), and simplejpeg skips PIL's file-object reads and
per-row unpacking. It decodes straight into 4-byte ``RGBX`` pixels, PIL's own
memory layout for ``RGB`` images, which `open_rgb` wraps without a copy as a
mode ``RGB`` image (three bands: PIL's resize then filters three channels, as
on an image PIL decoded, not the four of an ``RGBX`` image, which cost 20 %
more); the crop + resize of `image_ops` runs on that image as it would on PIL's.

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

import functools

import numpy as np
from PIL import Image

from gmix_jax import decoder_env

ENV = decoder_env.ENV
DECODERS = decoder_env.DECODERS
_SOI = b'\xff\xd8'


def _load_simplejpeg():
  """The simplejpeg module, or None for PIL (`decoder_env.jpeg_decoder`: an
  invalid ``GMIX_JAX_JPEG_DECODER`` raises ValueError naming it)."""
  if decoder_env.jpeg_decoder() == 'pil':
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


def _map_rgb(array, width: int, height: int) -> Image.Image | None:
  """``array`` mapped as a mode ``RGB`` image through PIL's core, or None."""
  try:
    core = Image.core.map_buffer(array, (width, height), 'raw', 0, ('RGB', 0, 1))
    im = Image.new('RGB', (0, 0))._new(core)  # pylint: disable=protected-access
  except (AttributeError, TypeError, ValueError):
    return None
  if im.mode != 'RGB' or im.size != (width, height):
    return None
  im.readonly = 1
  return im


@functools.lru_cache(maxsize=None)
def _rgb_mapping_works() -> bool:
  """Whether this Pillow maps an RGBX buffer as ``RGB`` with the right pixels
  (checked once on a small buffer of distinct values: `_map_rgb` goes through a
  private call, and a Pillow release that stored ``RGB`` differently must not
  give wrong pixels silently)."""
  array = np.arange(5 * 7 * 4, dtype=np.uint8).reshape(5, 7, 4)
  im = _map_rgb(array, 7, 5)
  return im is not None and np.array_equal(np.asarray(im), array[..., :3])


def _wrap_rgb(array, width: int, height: int) -> Image.Image:
  """A mode ``RGB`` PIL image over ``array`` (uint8 ``[H, W, 4]``, RGBX), no copy.

  ``Image.frombuffer`` maps a buffer only under its raw mode, so this maps it
  through PIL's core (`Image.core.map_buffer`, what ``frombuffer`` calls) with
  mode ``RGB``, whose pixels PIL stores in the same 4 bytes. Should a Pillow
  release refuse that or store ``RGB`` otherwise (`_rgb_mapping_works`), the
  buffer is mapped as ``RGBX`` (the same pixels; a slower resize)."""
  im = _map_rgb(array, width, height) if _rgb_mapping_works() else None
  if im is not None:
    return im
  return Image.frombuffer('RGBX', (width, height), array, 'raw', 'RGBX', 0, 1)


def open_rgb(image: bytes) -> Image.Image | None:
  """The decoded image as a PIL ``RGB`` image over simplejpeg's ``RGBX``
  buffer (`_wrap_rgb`), or None if libjpeg-turbo reports the data damaged.
  Call `rgb_size` first."""
  try:
    array = simplejpeg.decode_jpeg(image, 'RGBX')
  except ValueError:
    return None
  height, width = array.shape[:2]
  return _wrap_rgb(array, width, height)


def decode_rgb(image: bytes):
  """uint8 ``[H, W, 3]`` straight from simplejpeg, or None as `open_rgb`."""
  try:
    return simplejpeg.decode_jpeg(image, 'RGB')
  except ValueError:
    return None
