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

Encoded images (``tfds.features.Image``: PNG for cifar10 and the like, JPEG for
imagenet2012) are read *undecoded* (``SkipDecoding``): the record transform
decodes them in the worker that reads them (`gmix_jax.data.pipeline`). Raw
uint8 ``Tensor`` features (the offline builders) are decoded by tfds with numpy.
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
               prepare_needs_tf: bool = True, skip_image_decoding: bool = False):
  """`_open` (below), reopened with the image left encoded when it is an
  encoded ``Image`` feature and ``skip_image_decoding``. (Not for a mocked
  dataset, which has no files: ``tfds.testing.mock_data`` would encode its
  generated images to skip their decoding, with TensorFlow.)"""
  src = _open(name, split, data_dir, download=download, prepare_needs_tf=prepare_needs_tf)
  feature = image_feature(src)
  if (skip_image_decoding and feature is not None and is_encoded(feature)
      and version_dir(src) is not None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    src = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                           builder_kwargs={'file_format': _ARRAY_RECORD},
                           decoders={'image': tfds.decode.SkipDecoding()})
  return src


def image_feature(source):
  """The source's ``'image'`` feature, or None (e.g. a mocked source)."""
  info = getattr(source, 'dataset_info', None)
  try:
    return info.features['image']
  except (AttributeError, KeyError, TypeError):
    return None


def is_encoded(feature) -> bool:
  """True for a ``tfds.features.Image`` (stored as PNG/JPEG bytes)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return isinstance(feature, tfds.features.Image)


def version_dir(source) -> str | None:
  """The dataset's prepared version directory (where its files are), or None
  when it does not exist on disk (mocked datasets)."""
  path = getattr(getattr(source, 'dataset_info', None), 'data_dir', None)
  return os.fspath(path) if isinstance(path, (str, os.PathLike)) and os.path.isdir(path) else None


def _open(name: str, split: str, data_dir: str, *, download: bool = False,
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
  from gmix_jax import lock  # pylint: disable=g-import-not-at-top
  with lock.preparing(data_dir, name):   # one builder at a time; the others then read it
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
