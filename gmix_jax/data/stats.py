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


def split_labels(split: sources.Split, bad_records: str = 'error') -> np.ndarray:
  """Every label of ``split`` (int32 ``[len(split)]``), read once then stored.

  A record that cannot be read raises `pipeline.BadRecordError`
  (``bad_records='error'``) or takes the label of the record that replaces it
  in training, the next readable one (``'skip'``; nothing is stored then).
  """
  from gmix_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  path = (os.path.join(split.meta_dir, f'gmix_labels_{split.split}.npy')
          if split.meta_dir else None)
  if path and os.path.exists(path):
    labels = np.load(path)
    if len(labels) == len(split):
      return labels
  labels = np.empty(len(split), np.int32)
  bad = []
  for start in range(0, len(split), _CHUNK):
    ids = np.arange(start, min(start + _CHUNK, len(split)))
    try:
      labels[ids] = split.read(ids)[1]
    except pipeline.RECORD_ERRORS:
      for r in ids:                          # one by one: which record is it?
        try:
          labels[r] = split.read(np.asarray([r]))[1][0]
        except pipeline.RECORD_ERRORS as e:
          if bad_records != 'skip':
            raise pipeline.bad_record_error(split, np.asarray([r]), {0: e}) from None
          bad.append(int(r))
  if len(bad) == len(split):
    raise pipeline.BadRecordError(f'dataset {split.name!r}: no {split.split} record can be read')
  good = np.setdiff1d(np.arange(len(split)), bad)
  for r in bad:                              # the next readable record, cyclically
    labels[r] = labels[good[np.searchsorted(good, r) % len(good)]]
  if not bad:
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


def _decoded(split: sources.Split, ids: np.ndarray, bad_records: str) -> list | np.ndarray:
  """The images of records ``ids``, decoded; a record that cannot be read or
  decoded raises `pipeline.BadRecordError` (``'error'``) or is left out of the
  statistics (``'skip'``)."""
  from gmix_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  try:
    images, _ = split.read(ids)
    return images if isinstance(images, np.ndarray) else [decode_pixels(x) for x in images]
  except pipeline.RECORD_ERRORS:
    pass
  out = []
  for r in ids:                            # one by one: which record is it?
    try:
      out.append(decode_pixels(split.read(np.asarray([r]))[0][0]))
    except pipeline.RECORD_ERRORS as e:
      if bad_records != 'skip':
        raise pipeline.bad_record_error(split, np.asarray([r]), {0: e}) from None
  return out


def _compute(split: sources.Split, bad_records: str = 'error') -> tuple[np.ndarray, np.ndarray]:
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
    bs, bss, bn = _accumulate(_decoded(split, ids[start:start + _CHUNK], bad_records), channels)
    s, ss, n = s + bs, ss + bss, n + bn
  mean = s / n
  std = np.sqrt(np.maximum(ss / n - np.square(mean), 0.0))
  return mean / split.pixel_max, std / split.pixel_max


def _bad_file(path: str, problem: str) -> ValueError:
  return ValueError(f'statistics file {path}: {problem}. It is computed from the training split '
                    'when missing: delete it and rerun to rebuild it')


def read_stored(path: str, split: sources.Split, channels: int | None = None) -> dict | None:
  """The statistics stored at ``path``, checked; None when they are for another
  version of the file or of the split (then they are computed again).

  Raises:
    ValueError: naming the file, when it is not JSON, or its ``mean``/``std``
      are not finite per-channel numbers in range (images: mean in [0, 1], std
      in [0, 0.5], the largest std of values in [0, 1]; features: std >= 0),
      its ``pixel_max`` is not the split's, or it has another number of
      channels than ``channels`` (when given). A NaN or absurd std would
      otherwise surface as a non-finite loss, a wrong channel count as a
      broadcasting error, far from the file.
  """
  try:
    with open(path, 'rb') as f:
      stored = json.loads(f.read().decode())
  except (ValueError, UnicodeDecodeError) as e:    # JSONDecodeError is a ValueError
    raise _bad_file(path, f'not valid JSON ({" ".join(str(e).split())})') from None
  if not isinstance(stored, dict):
    raise _bad_file(path, f'expected a JSON object, got {type(stored).__name__}')
  if stored.get('version') != STATS_VERSION or stored.get('num_records') != len(split):
    return None
  arrays = {}
  for key in ('mean', 'std'):
    try:
      value = np.asarray(stored.get(key), np.float64)
    except (TypeError, ValueError):
      value = np.zeros(0)
    if value.ndim != 1 or not value.size:
      raise _bad_file(path, f'{key!r} must be a list of numbers (one per channel), got '
                      f'{stored.get(key)!r}')
    if not np.isfinite(value).all():
      raise _bad_file(path, f'{key!r} holds non-finite values {value.tolist()}')
    arrays[key] = value
  mean, std = arrays['mean'], arrays['std']
  if len(mean) != len(std):
    raise _bad_file(path, f"'mean' has {len(mean)} channels but 'std' has {len(std)}")
  if stored.get('pixel_max') != split.pixel_max:
    raise _bad_file(path, f"pixel_max {stored.get('pixel_max')!r} is not the dataset's "
                    f'{split.pixel_max!r}')
  if split.pixel_max is not None and not ((0 <= mean) & (mean <= 1 + 1e-6)).all():
    raise _bad_file(path, f"'mean' {mean.tolist()} is outside [0, 1] (pixel / pixel_max)")
  high = 0.5 if split.pixel_max is not None else np.inf
  if not ((0 <= std) & (std <= high + 1e-6)).all():
    raise _bad_file(path, f"'std' {std.tolist()} is outside [0, {high:g}]")
  if channels is not None and len(mean) != channels:
    raise _bad_file(path, f'it has statistics of {len(mean)} channel(s), the dataset\'s '
                    f'examples have {channels}')
  return stored


def channel_stats(split: sources.Split, channels: int | None = None, bad_records: str = 'error'
                  ) -> tuple[np.ndarray, np.ndarray]:
  """``(mean, std)`` float32 per channel of the training ``split`` (see module
  doc); a stored file is checked (`read_stored`; ``channels``: the count the
  examples have, when known). Computing them reads every record: one that
  cannot be read stops it (``bad_records='error'``) or is left out (``'skip'``)."""
  if split.fixed_stats is not None:
    mean, std = split.fixed_stats
  else:
    path = os.path.join(split.meta_dir, STATS_FILE) if split.meta_dir else None
    stored = None
    if path and os.path.exists(path):
      stored = read_stored(path, split, channels)
    if stored is None:
      if len(split) == 0:
        raise ValueError(f'dataset {split.name!r}: the {split.split} split is empty')
      mean, std = _compute(split, bad_records)
      stored = {'version': STATS_VERSION, 'num_records': len(split),
                'pixel_max': split.pixel_max, 'mean': np.asarray(mean).tolist(),
                'std': np.asarray(std).tolist()}
      _store(path, lambda f: f.write(json.dumps(stored, indent=1).encode()))
    mean, std = stored['mean'], stored['std']
  mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
  std = np.where(std < 1e-8, 1.0, std)           # constant channel: leave unscaled
  return mean.astype(np.float32), std.astype(np.float32)
