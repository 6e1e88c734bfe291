"""Per-dataset metadata, computed once and stored beside the prepared files.

* ``split_labels(split)``: every label of a split, int32, for the limited-data
  subsets (`subsets`) and the label-range check; stored as
  ``gmix_labels_<split>.npy``.
* ``channel_stats(split)``: the per-channel mean and std of the *training*
  split's pixels, in [0, 1] units (``pixel / pixel_max``), or of its features
  for feature vectors; stored as ``gmix_stats.json``. Statistics are over every
  pixel of every decoded image (images of different sizes weigh by their pixel
  count), before any augmentation and before any subset, so a limited-data run
  is normalised like the full-data one; a split of more than `MAX_RECORDS`
  images is measured on a fixed sample of that many. A constant channel gets
  std 1.

Both are written into the split's ``meta_dir`` (the tfds version directory,
which tfds replaces wholesale when the dataset is re-prepared, taking these
files with it). Where nothing can be stored (mocked data, in-memory npz arrays,
a read-only directory) they are computed again on each run. Datasets with
standard constants (ImageNet) carry them (``Split.fixed_stats``).

The step normalises on device: ``(x / pixel_max - mean) / std``
(`gmix_jax.data.normalize`).
"""

from __future__ import annotations

import io
import json
import os

import numpy as np

from gmix_jax.data import sources

STATS_FILE = 'gmix_stats.json'
STATS_VERSION = 1
# Images measured at most (a decode each, once per dataset): above this, a fixed
# random sample; the standard error of a channel mean is then far below 1e-3.
MAX_RECORDS = 20_000
_CHUNK = 1024


def _store(path: str | None, write) -> None:
  """Atomically writes ``path`` with ``write(file)``; a read-only dir is fine."""
  if path is None:
    return
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    with open(tmp, 'wb') as f:
      write(f)
    os.replace(tmp, path)           # concurrent readers never see half a file
  except OSError:
    if os.path.exists(tmp):
      os.remove(tmp)


def split_labels(split: sources.Split) -> np.ndarray:
  """Every label of ``split`` (int32 ``[len(split)]``), read once then stored."""
  path = (os.path.join(split.meta_dir, f'gmix_labels_{split.split}.npy')
          if split.meta_dir else None)
  if path and os.path.exists(path):
    labels = np.load(path)
    if len(labels) == len(split):
      return labels
  labels = np.empty(len(split), np.int32)
  for start in range(0, len(split), _CHUNK):
    ids = np.arange(start, min(start + _CHUNK, len(split)))
    labels[ids] = split.read(ids)[1]
  _store(path, lambda f: np.save(f, labels))
  return labels


def decode_pixels(image) -> np.ndarray:
  """Stored image (encoded bytes or array) -> its pixel array, as stored."""
  if isinstance(image, (bytes, bytearray, memoryview)):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    with Image.open(io.BytesIO(bytes(image))) as im:
      return np.asarray(im)
  return np.asarray(image)


def _accumulate(images, channels) -> tuple[np.ndarray, np.ndarray, int]:
  """(sum, sum of squares, count) per channel of a batch of images."""
  if isinstance(images, np.ndarray):          # one array: vectorised
    flat = images.reshape(-1, channels(images[0])).astype(np.float64)
    return flat.sum(0), np.square(flat).sum(0), len(flat)
  s = ss = 0.0
  n = 0
  for image in images:
    x = decode_pixels(image)
    flat = x.reshape(-1, channels(x)).astype(np.float64)
    s, ss, n = s + flat.sum(0), ss + np.square(flat).sum(0), n + len(flat)
  return s, ss, n


def _compute(split: sources.Split) -> tuple[np.ndarray, np.ndarray]:
  if split.pixel_max is None:                   # float features: shifted, chunked
    from gmix_jax.data import dataset  # pylint: disable=g-import-not-at-top
    return dataset.channel_stats(split.records.images)
  # Images [H, W] have one channel; [H, W, C] have C.
  channels = lambda x: 1 if x.ndim == 2 else x.shape[-1]
  ids = np.arange(len(split))
  if len(ids) > MAX_RECORDS:           # a fixed sample (seed 0): the estimate is ample
    ids = np.sort(np.random.default_rng(0).choice(len(ids), MAX_RECORDS, replace=False))
  s = ss = 0.0
  n = 0
  for start in range(0, len(ids), _CHUNK):
    images, _ = split.read(ids[start:start + _CHUNK])
    bs, bss, bn = _accumulate(images, channels)
    s, ss, n = s + bs, ss + bss, n + bn
  mean = s / n
  std = np.sqrt(np.maximum(ss / n - np.square(mean), 0.0))
  return mean / split.pixel_max, std / split.pixel_max


def channel_stats(split: sources.Split) -> tuple[np.ndarray, np.ndarray]:
  """``(mean, std)`` float32 per channel of the training ``split`` (see module doc)."""
  if split.fixed_stats is not None:
    mean, std = split.fixed_stats
  else:
    path = os.path.join(split.meta_dir, STATS_FILE) if split.meta_dir else None
    stored = None
    if path and os.path.exists(path):
      with open(path) as f:
        stored = json.load(f)
      if stored.get('version') != STATS_VERSION or stored.get('num_records') != len(split):
        stored = None
    if stored is None:
      if len(split) == 0:
        raise ValueError(f'dataset {split.name!r}: the {split.split} split is empty')
      mean, std = _compute(split)
      stored = {'version': STATS_VERSION, 'num_records': len(split),
                'pixel_max': split.pixel_max, 'mean': np.asarray(mean).tolist(),
                'std': np.asarray(std).tolist()}
      _store(path, lambda f: f.write(json.dumps(stored, indent=1).encode()))
    mean, std = stored['mean'], stored['std']
  mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
  std = np.where(std < 1e-8, 1.0, std)           # constant channel: leave unscaled
  return mean.astype(np.float32), std.astype(np.float32)
