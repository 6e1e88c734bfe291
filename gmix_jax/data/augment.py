"""Standard CIFAR augmentation as pure JAX, run on device inside the step.

Per-example random crop after padding, and per-example horizontal flip, for
NHWC batches. Shapes are static (the crop size equals the input size) and
the per-example work is vmapped, so it jit-compiles once and costs little
next to a forward pass. Keys: one split into a crop key and a flip key, so
``flip`` decisions do not depend on ``pad``.

Padding is with zeros by default (``padding_mode='constant'``). Inputs are
already standardised (`gmix_jax.data.dataset`), so zero is the dataset's
mean colour, not black; ``padding_mode='reflect'`` mirrors the border
instead.

Inputs of rank 2 (``[N, D]`` feature vectors) are returned unchanged, so a
config can keep augmentation on for every dataset; any other rank but 4 is
an error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check_rank(x: jax.Array) -> bool:
  """True for NHWC images, False for vectors (no-op); raises otherwise."""
  if x.ndim == 4:
    return True
  if x.ndim == 2:
    return False
  raise ValueError(
      f'Augmentation expects NHWC images or [N, D] vectors, got shape '
      f'{x.shape}.')


def random_flip(rng: jax.Array, x: jax.Array) -> jax.Array:
  """Flips each image left-right with probability 1/2.

  The same ``rng`` makes the same choices, so applying it twice with one key
  is the identity.
  """
  if not _check_rank(x):
    return x
  flip = jax.random.bernoulli(rng, 0.5, (x.shape[0],))
  return jnp.where(flip[:, None, None, None], x[:, :, ::-1, :], x)


def random_crop(rng: jax.Array, x: jax.Array, pad: int = 4,
                padding_mode: str = 'constant') -> jax.Array:
  """Pads each image by ``pad`` pixels and crops a random window of its size.

  Offsets are uniform in ``[0, 2 * pad]`` per axis and per example.
  ``pad=0`` is the identity.
  """
  if not _check_rank(x) or pad == 0:
    return x
  n, h, w, c = x.shape
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)),
                   mode=padding_mode)
  offsets = jax.random.randint(rng, (n, 2), 0, 2 * pad + 1)

  def crop_one(image, offset):
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

  return jax.vmap(crop_one)(padded, offsets)


def random_crop_flip(rng: jax.Array, x: jax.Array, pad: int = 4,
                     flip: bool = True,
                     padding_mode: str = 'constant') -> jax.Array:
  """Random crop (after padding) then random horizontal flip, per example.

  Args:
    rng: a PRNG key; use a fresh key per step (and per device).
    x: ``[N, H, W, C]`` images, or ``[N, D]`` vectors (returned unchanged).
    pad: padding on each side before cropping (static).
    flip: whether to flip (static).
    padding_mode: ``'constant'`` (zeros) or ``'reflect'`` (static).

  Returns:
    Augmented ``x``, same shape and dtype.

  Example:
    >>> aug = jax.jit(random_crop_flip,
    ...               static_argnames=('pad', 'flip', 'padding_mode'))
    >>> aug(jax.random.key(0), jnp.zeros((2, 32, 32, 3))).shape
    (2, 32, 32, 3)
  """
  crop_key, flip_key = jax.random.split(rng)
  x = random_crop(crop_key, x, pad, padding_mode)
  return random_flip(flip_key, x) if flip else x
