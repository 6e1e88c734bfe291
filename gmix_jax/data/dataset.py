"""The in-memory `Dataset` every source returns, and its normalisation.

All sources (tfds, offline builders, npz) end in `make_dataset`, so every
dataset is normalised by one rule:

1. Pixels are divided by the dataset's pixel maximum (255 for uint8 images,
   16 for sklearn's digits), giving values in [0, 1]. Non-pixel features
   (float npz arrays) are kept as they are.
2. They are standardised with a mean and std computed on the *full* train
   split (before any `subsample`), over every axis but the last: per channel
   for NHWC images, per feature for ``[N, D]`` vectors. A constant channel
   (std 0) is left unscaled rather than divided by zero.

The statistics are kept on the `Dataset` (``mean``, ``std``) so images can be
mapped back to [0, 1] for plots: ``x * std + mean``. Note that zero-padding in
`augment.random_crop` therefore pads with the mean colour, not black.

Memory: float32 is 4x the uint8 size (CIFAR-10: about 0.74 GB on the host).
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


def standardize(x_train: np.ndarray, x_test: np.ndarray, scale: float = 1.0):
  """Scales by ``1/scale`` then standardises with train statistics.

  Returns ``(x_train, x_test, mean, std)``, all float32; ``mean``/``std`` are
  in the scaled units.
  """
  mean, std = channel_stats(x_train)
  mean, std = mean / scale, std / scale
  std = np.where(std < 1e-8, 1.0, std)  # constant channel: leave unscaled
  mean, std = mean.astype(np.float32), std.astype(np.float32)

  def apply(x):
    x = x.astype(np.float32)
    x /= np.float32(scale)  # in place: avoid another full-size temporary
    x -= mean
    x /= std
    return x

  return apply(x_train), apply(x_test), mean, std


def make_dataset(name: str, x_train, y_train, x_test, y_test, *,
                 num_classes: int, pixel_max: float | None) -> Dataset:
  """Normalises raw arrays (see module docstring) into a `Dataset`.

  Args:
    name: the dataset's load name.
    x_train, y_train, x_test, y_test: raw arrays, labels integer.
    num_classes: number of classes; labels must lie in ``[0, num_classes)``.
    pixel_max: the value of a white pixel (255, 16, ...) for images, or
      ``None`` for features that are not pixels.
  """
  for split, y in (('train', y_train), ('test', y_test)):
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
      raise ValueError(
          f'{name}: {split} labels must lie in [0, {num_classes}), got range '
          f'[{y.min()}, {y.max()}].')
  xtr, xte, mean, std = standardize(x_train, x_test, pixel_max or 1.0)
  return Dataset(
      name=name, x_train=xtr, y_train=np.asarray(y_train, np.int32),
      x_test=xte, y_test=np.asarray(y_test, np.int32),
      num_classes=int(num_classes), input_shape=tuple(x_train.shape[1:]),
      mean=mean, std=std)
