"""MoCo v2's augmentation (``dataset.augment='moco'``), per record on the host.

Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning"
(the official ``moco/main_moco.py --aug-plus``), in this order:

1. random resized crop, area scale (0.2, 1), aspect (3/4, 4/3)
   (`image_ops.random_resized_crop_box`), to ``image_size`` (None: the
   stored size);
2. with probability 0.8, colour jitter (brightness, contrast, saturation 0.4,
   hue 0.1), the four adjustments in a random order (as torchvision's
   ``ColorJitter``): factors b, c, s ~ U(0.6, 1.4), hue shift h ~ U(−0.1, 0.1);
3. with probability 0.2, grayscale (ITU-R 601-2 luma, PIL's 'L' weights,
   copied to every channel);
4. with probability 0.5, Gaussian blur with σ ~ U(0.1, 2.0) (PIL's
   ``GaussianBlur(radius=σ)``, as the reference) — only for outputs larger
   than 64 px (the ImageNet recipe; CIFAR-sized SSL recipes leave it out);
5. horizontal flip with probability 1/2.

uint8 in, uint8 out. The colour adjustments work in float32 on [0, 255],
each clipped to that range (torchvision's ``_blend``), rounded once at the
end. One-channel images: saturation, hue and grayscale change nothing.
Every random draw comes from the generator passed in, in a fixed order.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from gmix_jax.data import image_ops

CROP_SCALE = (0.2, 1.0)
JITTER = (0.4, 0.4, 0.4, 0.1)   # brightness, contrast, saturation, hue
JITTER_P = 0.8
GRAYSCALE_P = 0.2
BLUR_P = 0.5
BLUR_SIGMA = (0.1, 2.0)
BLUR_MIN_SIZE = 65              # blur only for images larger than 64 px
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def luma(x: np.ndarray) -> np.ndarray:
  """Grayscale ``[H, W, 1]`` of a float ``[H, W, C]`` image (C = 1 or 3)."""
  if x.shape[-1] == 1:
    return x
  return (x @ LUMA)[..., None]


_SEXTANT = np.array([5.0, 3.0, 1.0], np.float32)   # R, G, B in the HSV -> RGB formula


def shift_hue(x: np.ndarray, turns: float) -> np.ndarray:
  """Rotates the HSV hue of a float ``[H, W, 3]`` image (any scale) by
  ``turns``, keeping saturation and value: x -> HSV, h += turns, -> RGB
  (``colorsys``'s convention), in float32 without an HSV array.

  With v = max, c = max − min and h in sextants (0..6), channel n of the
  result is v − c · clip(min(k, 4 − k), 0, 1), k = (n + h) mod 6, n = 5, 3, 1
  for R, G, B.
  """
  x = x.astype(np.float32, copy=False)
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  v = np.maximum(np.maximum(r, g), b)      # not x.max(-1): a reduction over 3 is slow
  c = v - np.minimum(np.minimum(r, g), b)
  inv = 1.0 / np.maximum(c, np.float32(1e-12))   # c = 0: gray, any hue gives v
  h = np.where(v == r, (g - b) * inv, np.where(v == g, (b - r) * inv + 2.0, (r - g) * inv + 4.0))
  h += np.float32(6.0 * (turns % 1.0) + 6.0)       # positive, so floor is mod
  k = _SEXTANT + h[..., None]
  k -= 6.0 * np.floor(k * np.float32(1 / 6))
  t = np.minimum(k, 4.0 - k)
  np.clip(t, 0.0, 1.0, out=t)
  t *= c[..., None]
  return v[..., None] - t


def adjust(x: np.ndarray, op: int, factor: float) -> np.ndarray:
  """One jitter adjustment of a float ``[H, W, C]`` image on [0, 255]:
  0 brightness (x·b), 1 contrast (blend with the mean luma), 2 saturation
  (blend with the luma image), 3 hue (shift h by ``factor`` turns)."""
  if op == 0:
    out = x * factor
  elif op == 1:
    out = factor * x + (1 - factor) * luma(x).mean()
  elif x.shape[-1] == 1:          # no colour to saturate or rotate
    return x
  elif op == 2:
    out = factor * x + (1 - factor) * luma(x)
  else:
    out = shift_hue(x, factor)
  return np.clip(out, 0.0, 255.0)


def jitter_params(rng: np.random.Generator):
  """``[(op, factor)]`` in application order (torchvision ``ColorJitter``)."""
  b, c, s, h = JITTER
  factors = (rng.uniform(1 - b, 1 + b), rng.uniform(1 - c, 1 + c), rng.uniform(1 - s, 1 + s),
             rng.uniform(-h, h))
  return [(int(op), float(factors[op])) for op in rng.permutation(4)]


def colour_jitter(x: np.ndarray, params) -> np.ndarray:
  """uint8 -> uint8: the adjustments ``params`` (`jitter_params`) in order."""
  y = x.astype(np.float32)
  for op, factor in params:
    y = adjust(y, op, factor)
  return np.rint(y).astype(np.uint8)


def grayscale(x: np.ndarray) -> np.ndarray:
  """uint8 -> uint8, the luma in every channel."""
  return np.rint(np.broadcast_to(luma(x.astype(np.float32)), x.shape)).astype(np.uint8)


def blur(x: np.ndarray, sigma: float) -> np.ndarray:
  """PIL's Gaussian blur of standard deviation ``sigma`` (uint8 -> uint8)."""
  im = Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x)
  out = np.asarray(im.filter(ImageFilter.GaussianBlur(radius=sigma)))
  return out.reshape(x.shape)


def moco_train(image, rng: np.random.Generator, size: int | None,
               channels: int | None = None) -> np.ndarray:
  """One MoCo v2 view of ``image`` (module docstring); uint8 ``[S, S, C]``
  (``size`` None: the stored ``[H, W]``)."""
  if size is not None:
    out = image_ops.decode_crop_resize(
        image, lambda h, w: image_ops.random_resized_crop_box(rng, h, w, scale=CROP_SCALE),
        size, channels)
    x = image_ops.as_array(out, channels)
  else:
    im = image_ops.open_image(image)
    width, height = im.size
    box = image_ops.random_resized_crop_box(rng, height, width, scale=CROP_SCALE)
    mode = image_ops._target_mode(im.mode, channels)  # pylint: disable=protected-access
    top, left, h, w = box
    resample = image_ops._RESAMPLE  # pylint: disable=protected-access
    out = im.convert(mode).resize((width, height), resample, box=(left, top, left + w, top + h))
    x = image_ops._to_array(out, mode)  # pylint: disable=protected-access
  if rng.random() < JITTER_P:
    x = colour_jitter(x, jitter_params(rng))
  if rng.random() < GRAYSCALE_P:
    x = grayscale(x)
  if min(x.shape[:2]) >= BLUR_MIN_SIZE and rng.random() < BLUR_P:
    x = blur(x, rng.uniform(*BLUR_SIGMA))
  return image_ops.flip(rng, x)
