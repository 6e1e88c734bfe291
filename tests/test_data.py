"""Tests for gmix_jax.data: sources, subsets, the batch plan (the pipeline:
tests/test_pipeline.py; per-record transforms: tests/test_image_ops.py).

Nothing here downloads: tfds datasets are mocked (`tfds.testing.mock_data`),
the offline builders prepare from pip-package data into a temporary dir.
"""

import importlib.util
import os
import sys

import numpy as np
import pytest

from gmix_jax import data
from gmix_jax.data import sources
from gmix_jax.data import stats
from gmix_jax.data import subsets
from gmix_jax.data import tfds_source


# ----------------------------------------------------------------------------
# tfds random-access source (mocked), no TensorFlow
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('name,shape,num_classes', [
    ('cifar10', (32, 32, 3), 10),
    ('cifar100', (32, 32, 3), 100),
    ('svhn_cropped', (32, 32, 3), 10),
    ('fashion_mnist', (28, 28, 1), 10),
    ('mnist', (28, 28, 1), 10),
])
def test_mock_tfds_through_data_source(mock_tfds, tmp_path, name, shape,
                                       num_classes):
  src = tfds_source.open_split(name, 'train', str(tmp_path))
  x_raw, y_raw = tfds_source.read_arrays(src)
  ds = data.load_dataset(name, str(tmp_path))
  # Meaningful either way: without TensorFlow any use of it would have
  # raised; with it installed, it must still not have been imported.
  assert 'tensorflow' not in sys.modules
  # The raw read: uint8 HWC images, integer labels.
  assert x_raw.shape == (12, *shape) and x_raw.dtype == np.uint8
  assert y_raw.shape == (12,) and np.issubdtype(y_raw.dtype, np.integer)
  # The Dataset: float32 normalised, int32 labels.
  assert ds.name == name and ds.num_classes == num_classes
  assert ds.input_shape == shape
  assert ds.x_train.shape == (12, *shape) and ds.x_train.dtype == np.float32
  assert ds.x_test.shape == (12, *shape)
  assert ds.y_train.dtype == np.int32 and ds.y_test.dtype == np.int32
  assert ((ds.y_train >= 0) & (ds.y_train < num_classes)).all()
  np.testing.assert_allclose(ds.x_train.mean(axis=(0, 1, 2)), 0, atol=1e-4)
  np.testing.assert_allclose(
      ds.x_train * ds.std + ds.mean, x_raw / 255.0, atol=1e-5)


def _png(image):
  import io
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='PNG')
  return buf.getvalue()


def test_png_image_feature_reads_without_tensorflow(tmp_path):
  """The real (unmocked) read path of cifar10-style PNG `Image` features.

  The stock builders cannot be prepared without TensorFlow, but a builder
  given PNG bytes can: that gives a real array_record dataset to read.
  """
  import tensorflow_datasets as tfds
  from etils import epath

  images = np.random.default_rng(0).integers(0, 256, (14, 8, 8, 3), np.uint8)

  class PngToy(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version('1.0.0')
    code_path = epath.Path(__file__)  # see builders.py: avoid a tfds bug

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, disable_shuffling=True,
          features=tfds.features.FeaturesDict({
              'image': tfds.features.Image(shape=(8, 8, 3)),
              'label': tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(range(10)),
              'test': self._generate_examples(range(10, 14))}

    def _generate_examples(self, rows):
      for i in rows:
        yield i, {'image': _png(images[i]), 'label': i % 3}

  PngToy(data_dir=str(tmp_path), file_format='array_record'
         ).download_and_prepare()
  # Found from its files (the class is unregistered); images stay PNG bytes
  # until the record transform decodes them.
  train = sources.open_split('tfds:png_toy', 'train', str(tmp_path))
  test = sources.open_split('tfds:png_toy', 'test', str(tmp_path))
  stored, _ = train.read(np.arange(2))
  assert all(isinstance(x, bytes) for x in stored)
  x_tr, y_tr = data.load.read_split(train)
  x_te, _ = data.load.read_split(test)
  assert 'tensorflow' not in sys.modules
  np.testing.assert_array_equal(x_tr, images[:10])  # PNG is lossless
  np.testing.assert_array_equal(x_te, images[10:])
  np.testing.assert_array_equal(y_tr, np.arange(10) % 3)
  assert train.num_classes == 3


def test_missing_tfds_data_raises_without_downloading(tmp_path):
  with pytest.raises(FileNotFoundError, match='download=True'):
    data.load_dataset('mnist', str(tmp_path))
  assert not list(tmp_path.rglob('*.array_record*'))


@pytest.mark.skipif(importlib.util.find_spec('tensorflow') is not None,
                    reason='TensorFlow installed: download would proceed')
def test_download_needs_tensorflow_and_fails_before_downloading(tmp_path):
  with pytest.raises(ImportError, match='needs TensorFlow'):
    data.load_dataset('cifar10', str(tmp_path), download=True)
  assert not [p for p in tmp_path.rglob('*') if p.is_file()]


def test_unknown_name_lists_valid_names(tmp_path):
  with pytest.raises(ValueError, match='dataset.name') as e:
    data.load_dataset('cifar11', str(tmp_path))
  for name in ('cifar10', 'svhn_cropped', 'digits', 'mnist_subset', 'npz:', 'tfds:'):
    assert name in str(e.value)


# ----------------------------------------------------------------------------
# Offline builders
# ----------------------------------------------------------------------------

# name -> (tfds name, example shape, train size, test size)
_OFFLINE = {
    'digits': ('gmix_digits', (8, 8, 1), 1347, 450),
    'mnist_subset': ('gmix_mnist_subset', (28, 28, 1), 4000, 1000),
}


@pytest.fixture(scope='module')
def offline_dir(tmp_path_factory):
  """One data dir where both offline datasets are prepared once."""
  d = str(tmp_path_factory.mktemp('tfds'))
  for name in _OFFLINE:
    data.load_dataset(name, d)
  return d


def _source_indices(tfds_name, split, data_dir):
  src = tfds_source.open_split(tfds_name, split, data_dir)
  return np.array([src[i]['source_index'] for i in range(len(src))])


@pytest.mark.slow
@pytest.mark.parametrize('name', list(_OFFLINE))
def test_offline_builder_shapes_and_fixed_split(offline_dir, name):
  tfds_name, shape, n_train, n_test = _OFFLINE[name]
  ds = data.load_dataset(name, offline_dir)
  assert 'tensorflow' not in sys.modules
  assert ds.x_train.shape == (n_train, *shape)
  assert ds.x_test.shape == (n_test, *shape)
  assert ds.input_shape == shape and ds.num_classes == 10
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32

  # Disjoint, covering the source, and in source order.
  train = _source_indices(tfds_name, 'train', offline_dir)
  test = _source_indices(tfds_name, 'test', offline_dir)
  assert not set(train) & set(test)
  np.testing.assert_array_equal(np.sort(np.concatenate([train, test])),
                                np.arange(n_train + n_test))
  np.testing.assert_array_equal(train, np.sort(train))

  # Stratified: every class's test count is floor or ceil of its quota.
  all_y = np.empty(n_train + n_test, np.int64)
  all_y[train], all_y[test] = ds.y_train, ds.y_test
  counts = np.bincount(all_y)
  quota = counts * n_test / len(all_y)
  test_counts = np.bincount(ds.y_test, minlength=10)
  assert (np.abs(test_counts - quota) < 1).all(), (test_counts, quota)
  if name == 'mnist_subset':
    assert test_counts.tolist() == [100] * 10


def test_digits_images_match_sklearn(offline_dir):
  from sklearn.datasets import load_digits
  src = load_digits()
  tr = sources.open_split('digits', 'train', offline_dir)
  assert isinstance(tr.records, sources.ArrayRecords)   # small raw split: held in memory
  x, y = tr.records.images, tr.records.labels
  idx = _source_indices('gmix_digits', 'train', offline_dir)
  np.testing.assert_array_equal(x[..., 0], src.images[idx])  # 0..16 kept
  np.testing.assert_array_equal(y, src.target[idx])


@pytest.mark.slow
def test_offline_builders_are_cached_and_reproducible(offline_dir, tmp_path):
  files = [os.path.join(r, f) for r, _, fs in os.walk(offline_dir)
           for f in fs]
  mtimes = {f: os.path.getmtime(f) for f in files}
  again = {n: data.load_dataset(n, offline_dir) for n in _OFFLINE}
  assert {f: os.path.getmtime(f) for f in files} == mtimes  # nothing rebuilt
  # Statistics are stored next to the tfds files, computed on the raw pixels.
  version_dir = os.path.join(offline_dir, 'gmix_digits', '1.0.0')
  assert os.path.exists(os.path.join(version_dir, stats.STATS_FILE))
  x, y = tfds_source.read_arrays(
      tfds_source.open_split('gmix_digits', 'train', offline_dir))
  np.testing.assert_array_equal(y, again['digits'].y_train)
  np.testing.assert_allclose(again['digits'].mean, [x.mean() / 16], rtol=1e-5)
  np.testing.assert_allclose(
      x / 16.0, again['digits'].x_train * again['digits'].std
      + again['digits'].mean, atol=1e-5)
  # A fresh build gives the same split (digits only: mnist_subset's CSV is
  # slow to parse; its split uses the same code path).
  fresh = data.load_dataset('digits', str(tmp_path))
  for key in ('x_train', 'y_train', 'x_test', 'y_test'):
    np.testing.assert_array_equal(getattr(fresh, key),
                                  getattr(again['digits'], key))


# ----------------------------------------------------------------------------
# npz source
# ----------------------------------------------------------------------------


def _write_npz(path, **arrays):
  np.savez(path, **arrays)
  return 'npz:' + str(path)


def test_npz_vectors(tmp_path):
  rng = np.random.default_rng(0)
  name = _write_npz(
      tmp_path / 'vec.npz', x_train=rng.normal(5, 3, (30, 7)),
      y_train=np.arange(30) % 3, x_test=rng.normal(5, 3, (9, 7)),
      y_test=np.arange(9) % 4)
  ds = data.load_dataset(name, str(tmp_path))
  assert ds.input_shape == (7,) and ds.num_classes == 4  # max label + 1
  assert ds.x_train.dtype == np.float32 and ds.y_test.dtype == np.int32
  np.testing.assert_allclose(ds.x_train.mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(ds.x_train.std(0), 1, atol=1e-4)


def test_npz_images(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (20, 6, 6, 3), dtype=np.uint8)
  name = _write_npz(tmp_path / 'img.npz', x_train=x, y_train=np.arange(20) % 2,
                    x_test=x[:5], y_test=np.zeros(5, np.int64))
  ds = data.load_dataset(name, str(tmp_path))
  assert ds.input_shape == (6, 6, 3) and ds.num_classes == 2
  np.testing.assert_allclose(ds.x_train * ds.std + ds.mean, x / 255.0,
                             atol=1e-5)


@pytest.mark.parametrize('arrays,message', [
    (dict(x_train=np.zeros((4, 2)), y_train=np.zeros(4, int),
          x_test=np.zeros((2, 2))),
     'missing key(s) y_test'),
    (dict(x_train=np.zeros((4, 2)), y_train=np.zeros(3, int),
          x_test=np.zeros((2, 2)), y_test=np.zeros(2, int)),
     'x_train has 4 rows but y_train has 3'),
    (dict(x_train=np.zeros((4, 2)), y_train=np.zeros(4),
          x_test=np.zeros((2, 2)), y_test=np.zeros(2, int)),
     'y_train must hold integer class labels'),
])
def test_npz_rejects_bad_files(tmp_path, arrays, message):
  path = tmp_path / 'bad.npz'
  with pytest.raises(ValueError) as e:
    data.load_dataset(_write_npz(path, **arrays), str(tmp_path))
  text = str(e.value)
  assert str(path) in text
  assert message in text
  assert 'expected keys: x_train, y_train, x_test, y_test' in text


# ----------------------------------------------------------------------------
# Limited-data subsets
# ----------------------------------------------------------------------------

_Y = np.repeat(np.arange(4), [10, 20, 30, 41])  # 101 labels, unbalanced
_X = np.arange(len(_Y))[:, None].astype(np.float32)


def test_examples_per_class_exact_and_deterministic():
  x, y = data.subsample(_X, _Y, examples_per_class=7, seed=3)
  assert np.bincount(y).tolist() == [7, 7, 7, 7]
  np.testing.assert_array_equal(_Y[x[:, 0].astype(int)], y)  # rows kept whole
  x2, _ = data.subsample(_X, _Y, examples_per_class=7, seed=3)
  np.testing.assert_array_equal(x, x2)
  x3, _ = data.subsample(_X, _Y, examples_per_class=7, seed=4)
  assert not np.array_equal(x, x3)


def test_train_fraction_total_and_stratified():
  idx = data.subsample_indices(_Y, train_fraction=0.25, seed=0)
  assert len(idx) == round(0.25 * len(_Y)) == 25
  assert len(np.unique(idx)) == len(idx)
  counts = np.bincount(_Y[idx])
  quota = 0.25 * np.bincount(_Y)
  assert (np.abs(counts - quota) < 1).all()
  np.testing.assert_array_equal(
      idx, data.subsample_indices(_Y, train_fraction=0.25, seed=0))
  assert not np.array_equal(
      idx, data.subsample_indices(_Y, train_fraction=0.25, seed=1))


def test_subsample_neither_is_identity():
  x, y = data.subsample(_X, _Y, seed=0)
  np.testing.assert_array_equal(y, _Y)


@pytest.mark.parametrize('kwargs,match', [
    (dict(examples_per_class=11), 'class 0 has 10'),
    (dict(examples_per_class=2, train_fraction=0.5), 'at most one'),
    (dict(train_fraction=0.0), r'\(0, 1\]'),
    (dict(train_fraction=0.001), 'keeps no example'),
])
def test_subsample_impossible_requests(kwargs, match):
  with pytest.raises(ValueError, match=match):
    data.subsample(_X, _Y, seed=0, **kwargs)


def test_largest_remainder_is_exact():
  counts = np.array([178, 182, 177, 183, 181, 182, 181, 179, 174, 180])
  alloc = subsets.largest_remainder(counts, 450)
  assert alloc.sum() == 450
  assert (np.abs(alloc - counts * 450 / counts.sum()) < 1).all()


# ----------------------------------------------------------------------------
# Batch plan
# ----------------------------------------------------------------------------


def test_epoch_permutation_deterministic_and_varies_by_epoch():
  p0 = data.epoch_permutation(50, seed=1, epoch=0)
  np.testing.assert_array_equal(p0, data.epoch_permutation(50, 1, 0))
  np.testing.assert_array_equal(np.sort(p0), np.arange(50))
  assert not np.array_equal(p0, data.epoch_permutation(50, 1, 1))
  assert not np.array_equal(p0, data.epoch_permutation(50, 2, 0))


def test_process_slices_are_disjoint_and_cover_global_batch():
  n, gb = 103, 24  # 4 steps per epoch, 7 examples dropped
  assert data.steps_per_epoch(n, gb) == 4
  for epoch in range(2):
    seen = []
    for step in range(4):
      full = data.batch_indices(n, gb, 5, epoch, step)
      parts = [data.batch_indices(n, gb, 5, epoch, step, p, 4)
               for p in range(4)]
      assert all(len(p) == 6 for p in parts)
      np.testing.assert_array_equal(np.concatenate(parts), full)
      seen.append(full)
    seen = np.concatenate(seen)
    assert len(np.unique(seen)) == 96  # no example twice within an epoch


def test_batch_plan_rejects_bad_shapes():
  with pytest.raises(ValueError, match='not divisible'):
    data.batch_indices(100, 10, 0, 0, 0, 0, 3)
  with pytest.raises(ValueError, match='larger than the training set'):
    data.steps_per_epoch(5, 8)
