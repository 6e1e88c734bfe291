"""TFDS datasets read by random access, without TensorFlow.

``tfds.data_source`` reads prepared ``array_record`` files and decodes
examples with numpy (PIL for PNG images), so reading never imports
TensorFlow. What does and does not work without TensorFlow in tfds 4.9.10:

* Reading a dataset already prepared in ``array_record`` format: works
  (``tfds.data_source``, this module).
* Preparing a builder whose features are `tfds.features.Tensor` from
  in-memory numpy data: works (`gmix_jax.data.builders`).
* Preparing the stock image builders (cifar10, mnist, ...) from the raw
  downloads: needs TensorFlow. Their generators read with ``tf.io.gfile``
  and ``tfds.features.Image`` encodes PNG with ``tf.image.encode_png``. So
  ``download=True`` is honoured only if TensorFlow is importable; otherwise
  a clear error says how to prepare the data elsewhere, *before* anything is
  downloaded. A dataset prepared in TFRecord format (the default of
  ``tfds.load``) cannot be read here; build it with
  ``tfds build cifar10 --file_format=array_record`` instead.
* ``tfds.load`` / ``tfds.as_numpy``: need TensorFlow; never used here.

``data_source`` only defaults to array_record when no ``data_dir`` is given,
so the format is always passed explicitly.

Decoding is per example in Python (tfds' example parser, then PIL for PNG),
about 0.3-0.7 ms per 32x32 image, so each split's decoded arrays are cached
once as an ``.npz`` next to the tfds files (`read_split`).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Sequence

import numpy as np

# Names served from tfds; each has an 'image' and a 'label' feature.
TFDS_DATASETS = ('cifar10', 'cifar100', 'svhn_cropped', 'fashion_mnist',
                 'mnist')

_ARRAY_RECORD = 'array_record'
_CHUNK = 1024  # records per batched read: bounds memory, amortises the call


def open_split(name: str, split: str, data_dir: str, *, download: bool = False,
               prepare_needs_tf: bool = True):
  """Random-access source of one split: ``len(src)``, ``src[i]`` -> dict.

  Args:
    name: a tfds dataset name (registered builder, or one prepared in
      ``data_dir``).
    split: split name, e.g. ``'train'``, ``'test'``, ``'train[:10%]'``.
    data_dir: directory holding ``<name>/<version>/``.
    download: prepare the dataset if it is missing. For the stock image
      datasets this downloads from the internet and needs TensorFlow.
    prepare_needs_tf: ``False`` skips the TensorFlow check, for
      builders that prepare from local data (`gmix_jax.data.builders`).

  Raises:
    FileNotFoundError: data missing and ``download=False``.
    ImportError: ``download=True`` for a dataset that needs TensorFlow to
      prepare, and TensorFlow is not installed.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  kwargs: dict[str, Any] = dict(
      split=split, data_dir=data_dir,
      builder_kwargs={'file_format': _ARRAY_RECORD})
  try:
    return tfds.data_source(name, download=False, **kwargs)
  except KeyError as e:
    if 'is empty' not in str(e):  # e.g. a split this dataset does not have
      raise
    # tfds: "`splits` is empty ... the dataset has not been generated yet".
    if not download:
      raise FileNotFoundError(
          f'Dataset {name!r} split {split!r} is not prepared in {data_dir} '
          f'(array_record format). Pass download=True (tfds datasets need '
          f'TensorFlow and internet to prepare), or prepare it elsewhere '
          f'with `tfds build {name} --file_format=array_record '
          f'--data_dir={data_dir}`. tfds said: {e}') from e

  if prepare_needs_tf and importlib.util.find_spec('tensorflow') is None:
    raise ImportError(
        f'Preparing {name!r} needs TensorFlow in tensorflow-datasets '
        f'(its generator uses tf.io.gfile and tf.image.encode_png), and '
        f'TensorFlow is not installed. Prepare it once where TensorFlow is '
        f'available: `tfds build {name} --file_format=array_record '
        f'--data_dir={data_dir}`, then copy {data_dir}/{name} here.')
  return tfds.data_source(
      name, download=True,
      download_and_prepare_kwargs={
          'download_config': tfds.download.DownloadConfig(
              try_download_gcs=False)},
      **kwargs)


def read_arrays(source: Sequence[dict[str, Any]], image_key: str = 'image',
                label_key: str = 'label') -> tuple[np.ndarray, np.ndarray]:
  """Reads every example of a random-access source into two arrays.

  Uses batched reads (``__getitems__``: array_record fetches a batch of
  records in one call) when the source has them, else item by item.
  Decoding is per example in tfds either way.

  Returns:
    ``(images, labels)``: images stacked with the source's dtype and shape
    (uint8 HWC for the image datasets), labels int64.
  """
  n = len(source)
  if n == 0:
    raise ValueError(f'Source {source!r} is empty.')
  first = source[0]
  first_x = np.asarray(first[image_key])
  images = np.empty((n, *first_x.shape), first_x.dtype)
  labels = np.empty((n,), np.int64)
  get_many = getattr(source, '__getitems__', None)
  for start in range(0, n, _CHUNK):
    keys = list(range(start, min(start + _CHUNK, n)))
    batch = (get_many(keys) if get_many is not None
             else [source[k] for k in keys])
    for k, ex in zip(keys, batch):
      images[k] = ex[image_key]
      labels[k] = ex[label_key]
  return images, labels


def num_classes_of(source, label_key: str = 'label') -> int:
  """Number of classes from the source's ``ClassLabel`` feature."""
  return int(source.dataset_info.features[label_key].num_classes)


def _cache_file(source, split: str) -> str | None:
  """Where decoded arrays of ``split`` are cached: the dataset's version dir.

  None when that dir does not exist (mocked datasets) or the split name is
  not a plain name (slices such as ``train[:10%]`` are not cached).
  """
  version_dir = getattr(source.dataset_info, 'data_dir', None)
  if not split.isidentifier() or not version_dir or not os.path.isdir(
      version_dir):
    return None
  return os.path.join(version_dir, f'gmix_arrays_{split}.npz')


def read_split(name: str, split: str, data_dir: str, *, download: bool = False,
               prepare_needs_tf: bool = True, cache: bool = True):
  """One split as ``(images, labels, num_classes)``, decoded once then cached.

  Decoding goes through tfds per example (PNG via PIL for the stock image
  datasets: 0.3-0.7 ms per 32x32 image on one core, 20-40 s for CIFAR-10).
  The decoded arrays are therefore saved as an uncompressed
  ``gmix_arrays_<split>.npz`` inside the dataset's version directory, which
  tfds replaces wholesale when the dataset is re-prepared, taking the cache
  with it. A cache whose length disagrees with the source is ignored; a
  read-only data dir just means no cache.
  """
  src = open_split(name, split, data_dir, download=download,
                   prepare_needs_tf=prepare_needs_tf)
  num_classes = num_classes_of(src)
  path = _cache_file(src, split) if cache else None
  if path and os.path.exists(path):
    with np.load(path) as f:
      if len(f['labels']) == len(src):
        return f['images'], f['labels'], num_classes
  images, labels = read_arrays(src)
  if path:
    tmp = f'{path}.tmp{os.getpid()}'
    try:
      with open(tmp, 'wb') as f:
        np.savez(f, images=images, labels=labels)
      os.replace(tmp, path)  # atomic: concurrent readers never see half
    except OSError:
      if os.path.exists(tmp):
        os.remove(tmp)
  return images, labels, num_classes


def load_tfds_arrays(name: str, data_dir: str, *, download: bool = False,
                     prepare_needs_tf: bool = True, cache: bool = True):
  """Train and test arrays of a tfds dataset plus its number of classes.

  Returns:
    ``(x_train, y_train, x_test, y_test, num_classes)``, images as stored
    (uint8 HWC), labels int64.
  """
  x_train, y_train, num_classes = read_split(
      name, 'train', data_dir, download=download,
      prepare_needs_tf=prepare_needs_tf, cache=cache)
  x_test, y_test, _ = read_split(name, 'test', data_dir, download=download,
                                 prepare_needs_tf=prepare_needs_tf,
                                 cache=cache)
  return x_train, y_train, x_test, y_test, num_classes
