"""Every dataset split as a random-access source: ``open_split(name, split, data_dir)``.

A `Split` is what the pipeline (`gmix_jax.data.pipeline`) reads: ``len(split)``
records, ``split.read(ids)`` -> ``(images, labels)`` for a batch of record ids,
its class count, its pixel maximum and where its metadata (`stats`) is stored.
Images come back as they are stored: encoded bytes (PNG/JPEG, decoded later by
the record transform, in the worker that reads them), or uint8 / float arrays.

Names (``dataset.name``):

* ``cifar10``, ``cifar100``, ``svhn_cropped``, ``fashion_mnist``, ``mnist``, and
  any other tfds image dataset prepared as array_record in ``data_dir``
  (`tfds_source`): read record by record; ``Image`` features stay encoded.
* ``digits``, ``mnist_subset``: offline, prepared into ``data_dir`` on first use
  (`builders`), then read like the tfds ones.
* ``tfds:NAME``: any other tfds image dataset (features ``image``, ``label``)
  prepared as array_record in ``data_dir``.
* ``npz:/path/file.npz``: a user's arrays (`npz_source`), held as given.
* names registered by `gmix_jax.data.jpeg_sources` (``mnist_jpeg``,
  ``imagenet2012``) when that module is present.

A training split may be a union of a tfds dataset's splits, ``'unlabelled+train'``
(`open_union`, ``dataset.train_split``): their records one after the other, in
the order written (`ConcatRecords`), so record ids, and with them every batch,
stay a function of the data and (seed, step).

Small splits of raw (not encoded) tensors, such as the offline sets, are read
into memory once (`IN_MEMORY_BYTES`): an array_record random read costs 20-40 µs
a record on a CPU, more than the rest of a small run's input work. They remain a
source like any other; only where the bytes sit differs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import sys
from typing import Any, Callable, Sequence

import numpy as np

from gmix_jax.data import tfds_source

NPZ_PREFIX = 'npz:'
TFDS_PREFIX = 'tfds:'     # any other tfds image dataset prepared as array_record
OFFLINE_DATASETS = ('digits', 'mnist_subset')
# Raw-tensor splits up to this size are read into memory once (see module doc).
IN_MEMORY_BYTES = 256 << 20


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """One split of a classification dataset, by random access.

  Attributes:
    name: the dataset's load name.
    split: ``'train'`` or ``'test'``.
    records: ``len(records)``; ``records[i]`` -> ``{'image', 'label'}``;
      ``records.__getitems__(ids)`` when batched reads exist.
    num_classes: number of classes.
    pixel_max: value of a white pixel (255, 16) for images; None for features.
    meta_dir: directory where this dataset's metadata (`stats`) is stored, or
      None when it cannot be stored (mocked data, in-memory arrays).
    fixed_stats: ``(mean, std)`` per channel in [0, 1] units when the dataset
      has standard constants (ImageNet); None = computed once (`stats`).
    channels: channels the record transform converts every image to (3 for
      sets mixing grayscale and colour JPEGs); None keeps each image's own.
  """
  name: str
  split: str
  records: Sequence[dict[str, Any]]
  num_classes: int
  pixel_max: float | None
  meta_dir: str | None = None
  fixed_stats: tuple[Sequence[float], Sequence[float]] | None = None
  channels: int | None = None

  def __len__(self) -> int:
    return len(self.records)

  def read(self, ids: np.ndarray) -> tuple[Any, np.ndarray]:
    """Records ``ids`` as ``(images, labels int32 [k])``.

    ``images`` is one array ``[k, ...]`` for array-backed splits (a single
    fancy index) and a list of stored images (bytes or arrays) otherwise.
    """
    records = self.records
    if isinstance(records, ArrayRecords):
      return records.images[ids], records.labels[ids]
    ids = [int(i) for i in ids]
    get_many = getattr(records, '__getitems__', None)
    examples = get_many(ids) if get_many is not None else [records[i] for i in ids]
    return ([ex['image'] for ex in examples],
            np.asarray([ex['label'] for ex in examples], np.int32))

  def labels(self, bad_records: str = 'error') -> np.ndarray:
    """Every label, int32 ``[len(self)]`` (cached by `stats.split_labels`,
    which says what ``bad_records`` does)."""
    if isinstance(self.records, ArrayRecords):
      return self.records.labels
    from gmix_jax.data import stats  # pylint: disable=g-import-not-at-top
    return stats.split_labels(self, bad_records)


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayRecords:
  """Records held as two arrays (npz files, small raw splits)."""
  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return {'image': self.images[i], 'label': int(self.labels[i])}


def _tfds_split(name: str, load_name: str, split: str, data_dir: str, *, download: bool,
                prepare_needs_tf: bool, pixel_max: float) -> Split:
  """A tfds array_record split; raw-tensor images of a small split go to memory."""
  src = tfds_source.open_split(load_name, split, data_dir, download=download,
                               prepare_needs_tf=prepare_needs_tf, skip_image_decoding=True)
  num_classes = tfds_source.num_classes_of(src)
  meta_dir = tfds_source.version_dir(src)
  records: Sequence[dict[str, Any]] = src
  feature = tfds_source.image_feature(src)
  shape = getattr(feature, 'shape', None)
  if (feature is not None and not tfds_source.is_encoded(feature) and shape
      and None not in shape and len(src) * int(np.prod(shape)) <= IN_MEMORY_BYTES):
    images, labels = tfds_source.read_arrays(src)
    records = ArrayRecords(images, labels.astype(np.int32))
  return Split(name, split, records, num_classes, pixel_max, meta_dir=meta_dir)


class ConcatRecords:
  """Several sources as one: ids ``[0, n0)`` are ``parts[0]``'s records, the
  next ``n1`` ``parts[1]``'s, and so on (order of ``parts``)."""

  def __init__(self, parts: Sequence[Sequence[dict[str, Any]]]):
    self.parts = list(parts)
    self.starts = np.cumsum([0] + [len(p) for p in self.parts])

  def __len__(self) -> int:
    return int(self.starts[-1])

  def _locate(self, i: int) -> tuple[int, int]:
    if not 0 <= i < len(self):
      raise IndexError(f'record {i} of a union of {len(self)}')
    part = int(np.searchsorted(self.starts, i, side='right')) - 1
    return part, i - int(self.starts[part])

  def __getitem__(self, i: int) -> dict[str, Any]:
    part, j = self._locate(int(i))
    return self.parts[part][j]

  def __getitems__(self, ids: Sequence[int]) -> list[dict[str, Any]]:
    """One batched read per part, results back in the order of ``ids``."""
    where = [self._locate(int(i)) for i in ids]
    out: list[Any] = [None] * len(where)
    for part, records in enumerate(self.parts):
      rows = [k for k, (p, _) in enumerate(where) if p == part]
      if not rows:
        continue
      local = [where[k][1] for k in rows]
      get_many = getattr(records, '__getitems__', None)
      got = get_many(local) if get_many is not None else [records[j] for j in local]
      for k, ex in zip(rows, got):
        out[k] = ex
    return out


SPLIT_NAME = r'[A-Za-z][A-Za-z0-9_]*'


def union_parts(spec: str) -> tuple[str, ...]:
  """``'unlabelled+train'`` -> ``('unlabelled', 'train')``; ValueError naming
  ``dataset.train_split`` for anything but split names joined by ``+`` (no
  slices, no repeats)."""
  if not (isinstance(spec, str) and re.fullmatch(f'{SPLIT_NAME}(\\+{SPLIT_NAME})*', spec)):
    raise ValueError(f"dataset.train_split must be a split name or names joined by '+' "
                     f"(e.g. 'train', 'unlabelled+train'), got {spec!r}")
  parts = tuple(spec.split('+'))
  if len(set(parts)) != len(parts):
    raise ValueError(f'dataset.train_split={spec!r} names a split twice')
  return parts


def supports_union(name: str) -> bool:
  """Whether ``dataset.train_split`` may name other splits than 'train':
  the tfds datasets (their splits are tfds's)."""
  return name in tfds_source.TFDS_DATASETS or (name.startswith(TFDS_PREFIX) and len(name) > 5)


def open_union(name: str, spec: str, data_dir: str, *, download: bool = False) -> Split:
  """The tfds splits ``spec`` (`union_parts`) of dataset ``name`` as one
  `Split` named ``spec``: `ConcatRecords` over each split's records."""
  parts = union_parts(spec)
  if not supports_union(name):
    raise ValueError(f'dataset.train_split={spec!r} needs a tfds dataset (one of '
                     f'{list(tfds_source.TFDS_DATASETS)} or tfds:NAME); dataset {name!r} has '
                     "the splits 'train' and 'test' only")
  splits = [open_split(name, part, data_dir, download=download) for part in parts]
  if len(splits) == 1:
    return splits[0]
  first = splits[0]
  return Split(name, spec, ConcatRecords([s.records for s in splits]), first.num_classes,
               first.pixel_max, meta_dir=None, fixed_stats=first.fixed_stats,
               channels=first.channels)


def _npz_splits(path: str) -> dict[str, Split]:
  from gmix_jax.data import npz_source  # pylint: disable=g-import-not-at-top
  x_train, y_train, x_test, y_test, num_classes, pixel_max = npz_source.read_npz(path)
  out = {}
  for split, x, y in (('train', x_train, y_train), ('test', x_test, y_test)):
    if pixel_max is None:
      x = x.astype(np.float32)         # features travel as float32
    elif x.ndim == 3:
      x = x[..., None]                 # grayscale [N, H, W] -> one channel, as decoded JPEGs
    records = ArrayRecords(x, np.asarray(y, np.int32))
    out[split] = Split(NPZ_PREFIX + path, split, records, num_classes, pixel_max)
  return out


def _registered() -> dict[str, Callable[..., Split]]:
  """Extra names from `gmix_jax.data.jpeg_sources`, when that module exists."""
  try:
    from gmix_jax.data import jpeg_sources  # pylint: disable=g-import-not-at-top
  except ImportError:
    return {}
  return getattr(jpeg_sources, 'SPLITS', {})


def dataset_names() -> tuple[str, ...]:
  """Every valid ``dataset.name`` (the npz form as a pattern)."""
  return (*tfds_source.TFDS_DATASETS, *OFFLINE_DATASETS, *_registered(),
          TFDS_PREFIX + 'NAME', NPZ_PREFIX + '/path/to/file.npz')


def is_known(name: str) -> bool:
  return (name.startswith(NPZ_PREFIX) or name.startswith(TFDS_PREFIX) and len(name) > 5
          or name in dataset_names())


def unknown_name_error(name: str) -> ValueError:
  return ValueError(f'dataset.name must be one of {list(dataset_names())}, got {name!r}')


def open_split(name: str, split: str, data_dir: str, *, download: bool = False) -> Split:
  """The ``split`` (``'train'`` / ``'test'``) of dataset ``name``.

  Raises:
    ValueError: unknown name (listing the valid ones), or a bad npz file.
    FileNotFoundError: a tfds dataset is not prepared and download is off.
    ImportError: download=True for a dataset that needs TensorFlow to prepare.
  """
  if name.startswith(NPZ_PREFIX):
    return _npz_splits(name[len(NPZ_PREFIX):])[split]
  data_dir = os.path.expanduser(os.fspath(data_dir))
  if name in tfds_source.TFDS_DATASETS or name.startswith(TFDS_PREFIX):
    tfds_name = name[len(TFDS_PREFIX):] if name.startswith(TFDS_PREFIX) else name
    return _tfds_split(name, tfds_name, split, data_dir, download=download,
                       prepare_needs_tf=True, pixel_max=255)
  if name in OFFLINE_DATASETS:
    # Imported here: defining the builders registers them with tfds.
    from gmix_jax.data import builders  # pylint: disable=g-import-not-at-top
    cls = builders.OFFLINE_BUILDERS[name]
    with _quiet_first_build(name, os.path.join(data_dir, cls.name)):
      return _tfds_split(name, cls.name, split, data_dir, download=True, prepare_needs_tf=False,
                         pixel_max=cls.PIXEL_MAX)
  registered = _registered()
  if name in registered:
    return registered[name](split, data_dir, download=download)
  raise unknown_name_error(name)


def open_splits(name: str, data_dir: str, *, download: bool = False) -> tuple[Split, Split]:
  """``(train, test)`` of dataset ``name``; see `open_split`."""
  if name.startswith(NPZ_PREFIX):              # one read of the file for both
    splits = _npz_splits(name[len(NPZ_PREFIX):])
    return splits['train'], splits['test']
  return (open_split(name, 'train', data_dir, download=download),
          open_split(name, 'test', data_dir, download=download))


@contextlib.contextmanager
def _quiet_first_build(name: str, dataset_dir: str):
  """Builds an offline set without tfds's console output.

  tfds prints "Downloading and preparing dataset ..." (nothing downloads
  here: the files ship inside pip packages), progress bars and warnings
  about a dataset_info.json that does not exist yet. One line says what
  happens instead; an error still propagates.
  """
  if os.path.isdir(dataset_dir):          # prepared before: nothing to say
    yield
    return
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  print(f'preparing the offline dataset {name!r} in {os.path.abspath(dataset_dir)} '
        '(first use only; nothing is downloaded)', file=sys.stderr, flush=True)
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  tfds.disable_progress_bar()
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    tfds.enable_progress_bar()
    absl_logging.set_verbosity(verbosity)
