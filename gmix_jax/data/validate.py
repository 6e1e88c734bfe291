"""Checks that a dataset can train before anything compiles.

A bad value found at step 0 is far from its cause: one NaN feature poisons
the standardisation of every example (so every step is non-finite), a
label above the others silently adds a class, an empty test split fails at
the first evaluation after a whole epoch of training. These functions find
such data when it is loaded, and say which split, which examples and why.

In-memory sources (npz, the tfds arrays) call ``check_split`` once per split
(and ``missing_classes`` on the train labels); streamed sources call
``check_record`` on each record they decode, so the error names the record's
index. Every error is a ``ValueError`` whose message starts with the dataset
name and the split.

Non-finite checks run in row chunks so a large split needs no second
full-size boolean array; integer features (uint8 pixels) are finite by
construction and are not scanned.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from typing import Any, Mapping

import numpy as np

FIRST = 5            # how many offending indices a message lists
_CHUNK_BYTES = 64 << 20


def _first(indices: np.ndarray) -> str:
  shown = ', '.join(str(int(i)) for i in indices[:FIRST])
  return shown + (', ...' if len(indices) > FIRST else '')


def nonfinite_rows(x: np.ndarray) -> tuple[int, np.ndarray]:
  """``(count, rows)``: the number of non-finite values in ``x`` and the
  (sorted) indices along axis 0 of the examples holding any."""
  x = np.asarray(x)
  if not np.issubdtype(x.dtype, np.inexact) or x.size == 0:
    return 0, np.zeros(0, np.int64)
  row_bytes = max(x[:1].nbytes, 1)
  step = max(1, _CHUNK_BYTES // row_bytes)
  count, rows = 0, []
  for start in range(0, x.shape[0], step):
    bad = ~np.isfinite(x[start:start + step].reshape(min(step, x.shape[0] - start), -1))
    count += int(bad.sum())
    rows.append(start + np.flatnonzero(bad.any(axis=1)))
  return count, np.concatenate(rows)


def check_features(name: str, split: str, x: np.ndarray) -> None:
  """Raises if ``x`` (``[N, ...]``) holds a NaN or an infinity."""
  count, rows = nonfinite_rows(x)
  if count:
    raise ValueError(
        f'dataset {name!r}: x_{split} holds {count} non-finite value(s) (NaN or Inf) in '
        f'{len(rows)} example(s); first example indices: [{_first(rows)}]. Fix or drop those '
        'examples: one non-finite feature makes the standardisation, and so every step, NaN.')


def check_labels(name: str, split: str, y: np.ndarray, num_classes: int) -> None:
  """Raises unless ``y`` is 1-D integer with every value in ``[0, num_classes)``."""
  y = np.asarray(y)
  if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f'dataset {name!r}: y_{split} must be 1-D integer class labels, got '
                     f'{y.dtype} {y.shape}')
  bad = np.flatnonzero((y < 0) | (y >= num_classes))
  if len(bad):
    raise ValueError(
        f'dataset {name!r}: y_{split} has {len(bad)} label(s) outside [0, {num_classes}) '
        f'(num_classes={num_classes}); first indices: [{_first(bad)}], values: '
        f'[{", ".join(str(int(v)) for v in y[bad[:FIRST]])}]')


def check_nonempty(name: str, split: str, n: int) -> None:
  """Raises on an empty split (training needs examples, evaluation too)."""
  if n == 0:
    use = 'training' if split == 'train' else 'the evaluation after each epoch'
    raise ValueError(f'dataset {name!r}: the {split} split is empty; {use} needs at least '
                     'one example')


def check_split(name: str, split: str, x: np.ndarray, y: np.ndarray, num_classes: int) -> None:
  """All checks of one in-memory split: non-empty, same length, finite
  features, labels in ``[0, num_classes)``."""
  check_nonempty(name, split, len(y))
  if len(x) != len(y):
    raise ValueError(f'dataset {name!r}: x_{split} has {len(x)} rows but y_{split} has {len(y)}')
  check_labels(name, split, y, num_classes)
  check_features(name, split, x)


def missing_classes(name: str, y_train: np.ndarray, num_classes: int) -> list[int]:
  """The classes with no training example, with a warning when there are any
  (often a label that is off, e.g. 1-based labels or one stray value)."""
  counts = np.bincount(np.asarray(y_train), minlength=num_classes)[:num_classes]
  missing = [int(c) for c in np.flatnonzero(counts == 0)]
  if missing:
    warnings.warn(f'dataset {name!r}: {len(missing)} of {num_classes} classes have no training '
                  f'example: [{_first(np.asarray(missing))}]', stacklevel=2)
  return missing


def check_record(name: str, split: str, index: int, record: Any, num_classes: int) -> None:
  """Checks one streamed record: finite features and a label in range.

  Args:
    name: the dataset name (for the message).
    split: ``'train'`` or ``'test'``.
    index: the record's index in its split (named in the error).
    record: a mapping with the features under ``'x'`` (or ``'image'``) and
      the integer label under ``'y'`` (or ``'label'``), or a pair ``(x, y)``.
    num_classes: labels must lie in ``[0, num_classes)``.

  Raises:
    ValueError: naming the dataset, split and record index.
  """
  if isinstance(record, Mapping):
    x = record['x'] if 'x' in record else record['image']
    y = record['y'] if 'y' in record else record['label']
  else:
    x, y = record
  x, y = np.asarray(x), np.asarray(y)
  where = f'dataset {name!r}: {split} record {index}'
  if y.ndim != 0 or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f'{where}: the label must be one integer, got {y.dtype} {y.shape}')
  if not 0 <= int(y) < num_classes:
    raise ValueError(f'{where}: label {int(y)} outside [0, {num_classes}) '
                     f'(num_classes={num_classes})')
  if np.issubdtype(x.dtype, np.inexact) and not np.isfinite(x).all():
    raise ValueError(f'{where}: {int((~np.isfinite(x)).sum())} non-finite feature value(s) '
                     '(NaN or Inf)')


def read_npz_arrays(path: str) -> dict[str, np.ndarray]:
  """Every array of the ``.npz`` archive at ``path``, read once.

  Says what the file is instead of numpy's advice about ``allow_pickle``:
  a lone ``.npy`` array, an archive holding pickled object arrays, or not
  an npz at all.
  """
  path = os.fspath(path)
  if not zipfile.is_zipfile(path):
    with open(path, 'rb') as f:
      head = f.read(6)
    what = 'a single .npy array' if head == b'\x93NUMPY' else 'not a zip archive'
    raise ValueError(f'{path}: not an .npz file ({what}); write one with '
                     'np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)')
  arrays = {}
  with np.load(path, allow_pickle=False) as f:
    for key in f.files:
      try:
        arrays[key] = f[key]
      except ValueError as e:      # object arrays need pickle: refused, unpickling runs code
        raise ValueError(f'{path}: array {key!r} holds Python objects (pickled), not numbers; '
                         'save numeric arrays (e.g. y.astype(np.int64))') from e
  return arrays
