"""On-device normalisation of uint8 images (or float features), inside the step.

Host batches carry images as uint8 (a quarter of float32's host -> device
traffic); the compiled step maps them to the model's inputs::

  x = (x / pixel_max - mean) / std        # per channel (the last axis)

with the dataset's stored statistics (`gmix_jax.data.stats`). Feature vectors
(``pixel_max=None``) arrive as float32 and are standardised the same way.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Normalizer:
  """``x -> (x / pixel_max - mean) / std`` (float32), a jit-friendly callable.

  Attributes:
    mean, std: per-channel, float32 ``[C]`` (in [0, 1] units for images).
    pixel_max: value of a white pixel, or None for features (no scaling).
  """
  mean: np.ndarray
  std: np.ndarray
  pixel_max: float | None

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.asarray(x).astype(jnp.float32)
    if self.pixel_max is not None:
      x = x * np.float32(1.0 / self.pixel_max)
    return (x - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)

  def invert(self, x: np.ndarray) -> np.ndarray:
    """Back to [0, 1] units (images) or feature units, on the host (plots)."""
    return np.asarray(x) * self.std + self.mean


def for_split(train_split, channels: int | None = None, bad_records: str = 'error'
              ) -> Normalizer:
  """The normaliser of a dataset, from its training split's stored statistics
  (``channels``: the examples' channel count, checked against a stored file;
  ``bad_records``: see `stats.channel_stats`)."""
  from gmix_jax.data import stats  # pylint: disable=g-import-not-at-top
  mean, std = stats.channel_stats(train_split, channels, bad_records)
  return Normalizer(mean, std, train_split.pixel_max)
