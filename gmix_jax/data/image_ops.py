"""Per-record image transforms on the host (numpy + PIL), for input workers.

`make_record_transform(augment, image_size, train)` returns a function
``(record, rng) -> record`` that turns ``{'image': ..., 'label': ...}`` into
``{'image': uint8 [H, W, C], 'label': int32}`` with a static output shape.
The input image is encoded bytes (JPEG, PNG, anything PIL reads) or a uint8
array ``[H, W, C]`` / ``[H, W]``. Pixels stay uint8: they are normalised on
device, so host -> device traffic is one byte per pixel.

``augment`` names (``dataset.augment``):

* ``'inception'``: training takes an Inception random-resized crop
  (`random_resized_crop_box`, Szegedy et al. 2015, "Going deeper with
  convolutions", sec. 6) resized to ``image_size`` x ``image_size``, then a
  horizontal flip with probability 1/2. Evaluation resizes the shorter side
  to ``int(image_size / 0.875)`` (256 for 224) and takes the centre
  ``image_size`` x ``image_size`` crop. JPEGs are opened in PIL's draft mode
  at the smallest DCT scale (1, 1/2, 1/4, 1/8) that still gives the crop at
  least ``image_size`` pixels a side, so the decoder does not produce pixels
  the resize would throw away.
* ``'cifar'``: training pads 4 pixels a side and takes a random crop of the
  original size (offsets uniform in [0, 8]), then flips with probability
  1/2; evaluation is the identity. Padding colour: ``fill`` (see
  `make_record_transform`), black when not given.
* ``'moco'``: MoCo v2's augmentation for contrastive learning
  (`gmix_jax.data.ssl_ops`): random resized crop with scale (0.2, 1),
  colour jitter, grayscale, Gaussian blur above 64 px, flip. Evaluation as
  ``'inception'`` when ``image_size`` is given, else decode only.
* ``'none'``: decode only (arrays pass through).

For ``'cifar'``, ``'moco'`` and ``'none'``, ``image_size`` (if given) first resizes
every image to ``image_size`` x ``image_size``; otherwise every record of the
dataset must already have the same shape (as cifar10 and mnist do).

Channels: ``channels=None`` keeps what the image has (grayscale -> 1, RGB ->
3; palette, RGBA, CMYK, ... -> RGB); ``channels=1`` or ``3`` converts. Pass
3 for datasets that mix grayscale and colour JPEGs (ImageNet) so the shape
is static.

Decoding: a colour JPEG read as RGB is decoded by libjpeg-turbo through
simplejpeg (`fast_jpeg`, `decode_crop_resize`), the same pixels as PIL's
decoder at less CPU; PIL decodes everything else and is the fallback.

Resampling is bilinear with PIL's antialiasing (its filter widens when
downscaling), the same filter in training and evaluation; opt-in
(``decode_mode='fast'``, ``dataset.decode``), the Inception training crop is
resized by OpenCV instead (`fast_resize`: faster, not the same pixels). EXIF
orientation is not applied (nor is it by tfds or the usual ImageNet pipelines).

Randomness comes only from the ``np.random.Generator`` passed per record, so
the same generator state gives the same output.
"""

from __future__ import annotations

import io
import math
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from gmix_jax.data import fast_jpeg
from gmix_jax.data import fast_resize

AUGMENT_NAMES = ('none', 'cifar', 'inception', 'moco')
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
EVAL_CROP_FRACTION = 0.875
CIFAR_PAD = 4

Record = dict[str, Any]
Box = tuple[int, int, int, int]  # (top, left, height, width)
_RESAMPLE = Image.Resampling.BILINEAR


# ----------------------------------------------------------------------------
# Crop geometry: pure functions of (rng, sizes)
# ----------------------------------------------------------------------------


def random_resized_crop_box(
    rng: np.random.Generator, height: int, width: int,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
    attempts: int = CROP_ATTEMPTS) -> Box:
  """The Inception crop box ``(top, left, h, w)`` for an image of this size.

  Szegedy et al. 2015 ("Going deeper with convolutions", sec. 6); the same
  algorithm as torchvision's ``RandomResizedCrop``. Up to ``attempts``
  times: draw the area fraction ``a ~ U(scale)`` and the aspect ratio
  ``r = exp(U(log ratio))``, set ``w = round(sqrt(a * H * W * r))``,
  ``h = round(sqrt(a * H * W / r))``; if the box fits, place it uniformly at
  random. If no draw fits, fall back to the largest centred box whose
  aspect ratio lies in ``ratio`` (the whole image when its own ratio does).

  Rounding moves the area fraction and the ratio by at most about
  ``1 / min(h, w)`` relative to the draw.
  """
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(attempts):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  own = width / height
  if own < ratio[0]:    # too tall: full width, height from the lowest ratio
    w, h = width, min(height, int(round(width / ratio[0])))
  elif own > ratio[1]:  # too wide: full height, width from the highest ratio
    w, h = min(width, int(round(height * ratio[1]))), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def resize_shorter(height: int, width: int, size: int) -> tuple[int, int]:
  """``(h, w)`` with the shorter side ``size`` and the aspect ratio kept."""
  if height <= width:
    return size, max(size, int(round(width * size / height)))
  return max(size, int(round(height * size / width))), size


def centre_box(height: int, width: int, size: int) -> Box:
  """The centred ``size`` x ``size`` box; offsets ``(H - size) // 2``."""
  return (height - size) // 2, (width - size) // 2, size, size


# ----------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------


def _target_mode(mode: str, channels: int | None) -> str:
  if channels == 1:
    return 'L'
  if channels == 3:
    return 'RGB'
  return mode if mode in ('L', 'RGB') else 'RGB'


def open_image(image: bytes | np.ndarray) -> Image.Image:
  """A PIL image, lazily decoded for bytes (the header is read, not pixels)."""
  if isinstance(image, (bytes, bytearray, memoryview)):
    return Image.open(io.BytesIO(image))
  array = np.asarray(image)
  if array.dtype != np.uint8 or array.ndim not in (2, 3):
    raise ValueError(
        f'record image must be encoded bytes or a uint8 [H, W] / [H, W, C] '
        f'array, got dtype {array.dtype} shape {array.shape}.')
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  return Image.fromarray(array)


def draft_for(im: Image.Image, mode: str, needed: tuple[float, float]):
  """Puts a JPEG in draft mode so its decode is at least ``needed`` (w, h).

  Returns the factor from original to drafted pixel coordinates (1 when
  the image is not a JPEG or no reduction is possible). Pillow picks the
  largest DCT scale 1/s (s in 8, 4, 2, 1) with ``W // s >= needed_w`` and
  ``H // s >= needed_h`` (rounded up here).
  """
  if im.format != 'JPEG':
    return 1.0
  width, height = im.size
  req = (min(width, max(1, math.ceil(needed[0]))),
         min(height, max(1, math.ceil(needed[1]))))
  result = im.draft(mode, req)
  if not result:
    return 1.0
  return result[1][2] / width  # box = (0, 0, W / s, H / s)


def _to_array(im: Image.Image, mode: str) -> np.ndarray:
  if im.mode != mode:
    im = im.convert(mode)
  array = np.asarray(im)
  return array[..., None] if array.ndim == 2 else array


def as_array(im: Image.Image, channels: int | None = None) -> np.ndarray:
  """uint8 ``[H, W, C]`` of ``im`` in the mode ``channels`` asks for
  (`_target_mode`: ``RGBX`` becomes ``RGB``)."""
  return _to_array(im, _target_mode(im.mode, channels))


def _crop_resize_image(im: Image.Image, box: Box | None, size: int,
                       channels: int | None, draft: bool) -> Image.Image:
  mode = _target_mode(im.mode, channels)
  width, height = im.size
  top, left, h, w = box if box is not None else (0, 0, height, width)
  k = (draft_for(im, mode, (width * size / w, height * size / h))
       if draft else 1.0)
  if im.mode != mode:
    im = im.convert(mode)
  return im.resize((size, size), _RESAMPLE,
                   box=(left * k, top * k, (left + w) * k, (top + h) * k))


def crop_resize(im: Image.Image, box: Box | None, size: int,
                channels: int | None = None, draft: bool = True
                ) -> np.ndarray:
  """Crops ``box`` (original pixels; None = whole) of ``im``, to size x size.

  With ``draft``, a JPEG is decoded at the smallest DCT scale that keeps at
  least ``size`` pixels across the box, and the box is scaled to match.
  """
  out = _crop_resize_image(im, box, size, channels, draft)
  return _to_array(out, out.mode)


def draft_reduces(width: int, height: int, box: Box | None, size: int) -> bool:
  """Whether `crop_resize` with ``draft`` decodes this JPEG at a reduced DCT
  scale (Pillow's rule in `draft_for`: a scale 1/s, s >= 2, when both
  ``W // need_w`` and ``H // need_h`` are at least 2)."""
  top, left, h, w = box if box is not None else (0, 0, height, width)
  need_w = min(width, max(1, math.ceil(width * size / w)))
  need_h = min(height, max(1, math.ceil(height * size / h)))
  return min(width // need_w, height // need_h) >= 2


def decode_crop_resize(image, box_of: Callable[[int, int], Box | None],
                       size: int, channels: int | None = None,
                       draft: bool = True) -> Image.Image:
  """`crop_resize` of encoded (or array) ``image`` at the box
  ``box_of(height, width)``, as a PIL image (mode ``RGB``, ``RGBX`` or ``L``).

  A colour JPEG read as RGB is decoded by `fast_jpeg` (libjpeg-turbo through
  simplejpeg, the same pixels as PIL's decoder, no copy into PIL) unless
  ``draft`` would decode it at a reduced scale; everything else, and a JPEG
  libjpeg-turbo calls damaged, is decoded by PIL as in `crop_resize`. The
  output is the same either way. ``box_of`` is called once.
  """
  dims = fast_jpeg.rgb_size(image) if channels != 1 else None
  if dims is None:
    im = open_image(image)
    return _crop_resize_image(im, box_of(im.height, im.width), size, channels,
                              draft)
  width, height = dims
  box = box_of(height, width)
  if not (draft and draft_reduces(width, height, box, size)):
    im = fast_jpeg.open_rgb(image)
    if im is not None:
      top, left, h, w = box if box is not None else (0, 0, height, width)
      return im.resize((size, size), _RESAMPLE,
                       box=(left, top, left + w, top + h))
  return _crop_resize_image(open_image(image), box, size, channels, draft)


def decode(image: bytes | np.ndarray, channels: int | None = None,
           size: int | None = None) -> np.ndarray:
  """Decodes to uint8 ``[H, W, C]``; ``size`` resizes to size x size."""
  if size is not None:
    out = decode_crop_resize(image, lambda h, w: None, size, channels)
    return as_array(out, channels)
  if channels != 1 and fast_jpeg.rgb_size(image) is not None:
    array = fast_jpeg.decode_rgb(image)
    if array is not None:
      return array
  if not isinstance(image, (bytes, bytearray, memoryview)):
    array = np.asarray(image)
    if array.dtype == np.uint8 and (channels is None or (
        array.ndim == 3 and array.shape[-1] == channels)):
      return array[..., None] if array.ndim == 2 else array
  im = open_image(image)
  return _to_array(im, _target_mode(im.mode, channels))


# ----------------------------------------------------------------------------
# Training / evaluation transforms
# ----------------------------------------------------------------------------


def flip(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
  """Left-right flip with probability 1/2 (one uniform draw)."""
  return image[:, ::-1] if rng.random() < 0.5 else image


def inception_train(image, rng: np.random.Generator, size: int,
                    channels: int | None = None, decode_mode: str = 'exact'
                    ) -> np.ndarray:
  """Random-resized crop (`random_resized_crop_box`) to size, then flip.

  ``decode_mode='fast'`` (``dataset.decode``): a colour JPEG read as RGB
  that `decode_crop_resize` would decode in full (no draft) is resized by
  `fast_resize` instead of PIL (the same crop box and flip from ``rng``;
  pixels within its PSNR bound of the exact path); anything else takes the
  exact path.
  """
  box_of = lambda h, w: random_resized_crop_box(rng, h, w)
  fast = decode_mode == 'fast' and channels != 1
  dims = fast_jpeg.rgb_size(image) if fast else None
  if dims is not None:
    width, height = dims
    box = box_of(height, width)
    box_of = lambda h, w: box
    if not draft_reduces(width, height, box, size):   # else the draft decode is cheaper
      array = fast_jpeg.decode_rgb(image)     # None: damaged, PIL decides
      if array is not None:
        out = fast_resize.crop_resize(array, box, size)
        return out[:, ::-1] if rng.random() < 0.5 else out
  out = decode_crop_resize(image, box_of, size, channels)
  if rng.random() < 0.5:  # as `flip`; in PIL: 10x cheaper than a numpy copy
    out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return as_array(out, channels)


def inception_eval(image, size: int, channels: int | None = None
                   ) -> np.ndarray:
  """Shorter side to ``int(size / 0.875)``, then the centre size x size.

  Done as one resize of the centre box (PIL samples the box in the
  coordinates of the whole resized image, so this equals resizing the
  whole image and slicing).
  """
  def box_of(height, width):
    rh, rw = resize_shorter(height, width, int(size / EVAL_CROP_FRACTION))
    top, left, _, _ = centre_box(rh, rw, size)
    sy, sx = height / rh, width / rw
    return top * sy, left * sx, size * sy, size * sx
  out = decode_crop_resize(image, box_of, size, channels)
  return as_array(out, channels)


def pad_crop(rng: np.random.Generator, image: np.ndarray, pad: int,
             fill: Sequence[int] | None = None) -> np.ndarray:
  """Pads ``pad`` pixels a side with ``fill``, crops a random H x W window.

  Offsets are uniform in ``[0, 2 * pad]`` per axis (as `augment.random_crop`
  on device). ``fill``: one value per channel (default 0, black).
  """
  h, w = image.shape[:2]
  top, left = rng.integers(0, 2 * pad + 1, size=2)
  out = np.empty_like(image)
  out[...] = np.asarray(fill if fill is not None else 0, np.uint8)
  # The window [top, top + h) of the padded image overlaps the image at
  # rows [top - pad, top - pad + h) clipped to [0, h).
  y0, x0 = max(0, top - pad), max(0, left - pad)
  y1, x1 = min(h, top - pad + h), min(w, left - pad + w)
  out[y0 - top + pad:y1 - top + pad, x0 - left + pad:x1 - left + pad] = (
      image[y0:y1, x0:x1])
  return out


def make_record_transform(
    augment: str, image_size: int | None, train: bool, *,
    channels: int | None = None, fill: Sequence[int] | None = None,
    decode_mode: str = 'exact',
) -> Callable[[Record, np.random.Generator], Record]:
  """The per-record transform for ``dataset.augment`` (module docstring).

  Args:
    augment: ``'none'``, ``'cifar'``, ``'inception'`` or ``'moco'``.
    image_size: output side in pixels; required for ``'inception'``,
      optional for the others (None keeps the stored size).
    train: training (random) or evaluation (deterministic) transform.
    channels: None (keep), 1 or 3; see the module docstring.
    fill: ``'cifar'`` padding colour, one uint8 value per channel. Before
      this transform ran on the host, padding happened after
      standardisation, so zeros meant the dataset's mean colour; pass the
      per-channel mean (in 0..255) to keep that behaviour. None pads black,
      as the usual uint8 CIFAR recipe (torchvision ``RandomCrop(32, 4)``).
    decode_mode: ``dataset.decode``: ``'exact'`` (PIL's pixels) or
      ``'fast'`` (the ``'inception'`` training crop of a colour JPEG resized
      by `fast_resize`: faster, pixels within its PSNR bound; needs OpenCV).

  Returns:
    ``f(record, rng) -> {'image': uint8 [S, S, C] (or the stored shape),
    'label': np.int32}``; other keys of the record are dropped.

  Raises:
    ValueError: unknown ``augment``, or a bad ``image_size`` / ``channels``
      / ``decode_mode`` (or 'fast' without OpenCV).
  """
  fast_resize.check_decode(decode_mode)
  if augment not in AUGMENT_NAMES:
    raise ValueError(f'dataset.augment must be one of {AUGMENT_NAMES}, got '
                     f'{augment!r}.')
  if image_size is not None and (not isinstance(image_size, int) or
                                 isinstance(image_size, bool) or
                                 image_size < 1):
    raise ValueError(f'dataset.image_size must be a positive int or None, '
                     f'got {image_size!r}.')
  if augment == 'inception' and image_size is None:
    raise ValueError("dataset.image_size is required with dataset.augment="
                     "'inception' (e.g. 224).")
  if channels not in (None, 1, 3):
    raise ValueError(f'channels must be None, 1 or 3, got {channels!r}.')

  if augment == 'inception':
    def image_fn(image, rng):
      if train:
        return inception_train(image, rng, image_size, channels, decode_mode)
      return inception_eval(image, image_size, channels)
  elif augment == 'moco':
    from gmix_jax.data import ssl_ops  # pylint: disable=g-import-not-at-top

    def image_fn(image, rng):
      if train:
        return ssl_ops.moco_train(image, rng, image_size, channels)
      if image_size is None:
        return decode(image, channels)
      return inception_eval(image, image_size, channels)
  elif augment == 'cifar' and train:
    def image_fn(image, rng):
      x = decode(image, channels, image_size)
      return flip(rng, pad_crop(rng, x, CIFAR_PAD, fill))
  else:
    def image_fn(image, rng):
      del rng
      return decode(image, channels, image_size)

  def transform(record: Record, rng: np.random.Generator) -> Record:
    image = np.ascontiguousarray(image_fn(record['image'], rng))
    return {'image': image, 'label': np.int32(record['label'])}

  return transform
