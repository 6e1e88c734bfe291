"""`Dataset`: a small dataset's two splits as normalised float32 arrays.

The trainer streams (`gmix_jax.data.pipeline`); analysis tools on small sets
(experiments/sweep.py, landscape.py) want whole arrays: `load.load_dataset`
reads them through the same sources and record transforms and normalises them
as the step does on device: ``(x / pixel_max - mean) / std`` with the
training split's stored statistics (`gmix_jax.data.stats`), so images map back
to [0, 1] by ``x * std + mean``. float32 is 4x the uint8 size: for small sets
only (CIFAR-10 would take 0.74 GB).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A classification dataset held as numpy arrays.

  Attributes:
    name: the name it was loaded by (``dataset.name`` in configs).
    x_train: float32 ``[N_train, *input_shape]``, normalised.
    y_train: int32 ``[N_train]`` in ``[0, num_classes)``.
    x_test: float32 ``[N_test, *input_shape]``, normalised with train stats.
    y_test: int32 ``[N_test]``.
    num_classes: number of classes.
    input_shape: shape of one example, e.g. ``(32, 32, 3)`` or ``(64,)``.
    mean: per-channel mean subtracted (in [0, 1] units for images).
    std: per-channel std divided by.
  """
  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  input_shape: tuple[int, ...]
  mean: np.ndarray
  std: np.ndarray

  @property
  def num_train(self) -> int:
    return len(self.y_train)

  @property
  def num_test(self) -> int:
    return len(self.y_test)


def channel_stats(x: np.ndarray, chunk_rows: int = 1 << 20):
  """Mean and std over every axis but the last, in float64.

  Accumulated in chunks so that no float64 copy of the whole array is made,
  and shifted by the first row so E[x^2] - E[x]^2 does not cancel for
  features with a large offset.
  """
  flat = x.reshape(-1, x.shape[-1])
  shift = flat[0].astype(np.float64)
  s = np.zeros_like(shift)
  ss = np.zeros_like(shift)
  for start in range(0, len(flat), chunk_rows):
    b = flat[start:start + chunk_rows].astype(np.float64) - shift
    s += b.sum(axis=0)
    ss += np.square(b).sum(axis=0)
  n = len(flat)
  mean_shifted = s / n
  var = np.maximum(ss / n - np.square(mean_shifted), 0.0)
  return mean_shifted + shift, np.sqrt(var)
