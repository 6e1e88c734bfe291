"""`load_dataset(name, data_dir)`: the one entry point from a config name.

Names (``dataset.name`` in configs):

* ``cifar10``, ``cifar100``, ``svhn_cropped``, ``fashion_mnist``, ``mnist``:
  tfds, read from array_record files in ``data_dir`` without TensorFlow
  (`gmix_jax.data.tfds_source`). Nothing is downloaded unless
  ``download=True``.
* ``digits``, ``mnist_subset``: offline, prepared into ``data_dir`` on first
  use from pip packages (`gmix_jax.data.builders`); never downloads.
* ``npz:/path/to/file.npz``: a user's arrays (`gmix_jax.data.npz_source`).

Every dataset comes back normalised as described in `gmix_jax.data.dataset`.
"""

from __future__ import annotations

import contextlib
import io
import os

from gmix_jax.data import dataset as dataset_lib
from gmix_jax.data import tfds_source

OFFLINE_DATASETS = ('digits', 'mnist_subset')
NPZ_PREFIX = 'npz:'
DATASET_NAMES = (*tfds_source.TFDS_DATASETS, *OFFLINE_DATASETS,
                 NPZ_PREFIX + '/path/to/file.npz')


def load_dataset(name: str, data_dir: str, *,
                 download: bool = False) -> dataset_lib.Dataset:
  """Loads a dataset by name; see the module docstring for the names.

  Args:
    name: dataset name.
    data_dir: tfds data directory (also where offline builders are
      prepared). Unused for ``npz:`` names.
    download: let tfds download and prepare a missing tfds dataset (needs
      internet and TensorFlow). Offline datasets are prepared regardless.

  Returns:
    A `Dataset` with float32 normalised features and int32 labels.

  Raises:
    ValueError: unknown name (the message lists the valid ones), or a bad npz.
    FileNotFoundError: a tfds dataset is not prepared and download is off.
  """
  if name.startswith(NPZ_PREFIX):
    from gmix_jax.data import npz_source  # pylint: disable=g-import-not-at-top
    *arrays, num_classes, pixel_max = npz_source.read_npz(
        name[len(NPZ_PREFIX):])
    return dataset_lib.make_dataset(name, *arrays, num_classes=num_classes,
                                    pixel_max=pixel_max)

  data_dir = os.fspath(data_dir)
  if name in tfds_source.TFDS_DATASETS:
    *arrays, num_classes = tfds_source.load_tfds_arrays(
        name, data_dir, download=download)
    return dataset_lib.make_dataset(name, *arrays, num_classes=num_classes,
                                    pixel_max=255)

  if name in OFFLINE_DATASETS:
    # Imported here: defining the builders registers them with tfds.
    from gmix_jax.data import builders  # pylint: disable=g-import-not-at-top
    cls = builders.OFFLINE_BUILDERS[name]
    with _quiet_first_build(name, os.path.join(data_dir, cls.name)):
      *arrays, num_classes = tfds_source.load_tfds_arrays(
          cls.name, data_dir, download=True, prepare_needs_tf=False)
    return dataset_lib.make_dataset(name, *arrays, num_classes=num_classes,
                                    pixel_max=cls.PIXEL_MAX)

  raise ValueError(
      f'Unknown dataset.name {name!r}. Valid names: '
      f'{", ".join(DATASET_NAMES)}.')


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
  import sys
  import tensorflow_datasets as tfds
  from absl import logging as absl_logging
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
