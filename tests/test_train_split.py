"""``dataset.train_split``: a union of tfds splits as the training stream
(``'unlabelled+train'``, stl10's SSL protocol), with the labelled ``train``
kept for evaluation. tfds is mocked (`tfds.testing.mock_data`, 12 records per
split)."""

import numpy as np
import pytest

from configs import common, ssl
from gmix_jax import configure, tasks
from gmix_jax.data import inputs
from gmix_jax.data import sources
from gmix_jax.data import tfds_source


class _Part:
  """A list source with batched reads that records each call."""

  def __init__(self, tag, n):
    self.tag, self.n, self.calls = tag, n, []

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if not 0 <= i < self.n:
      raise IndexError(i)
    return {'image': f'{self.tag}{i}', 'label': -1 if self.tag == 'u' else i}

  def __getitems__(self, ids):
    self.calls.append(list(ids))
    return [self[i] for i in ids]


def test_concat_records_is_the_parts_one_after_the_other():
  u, t, e = _Part('u', 5), _Part('t', 3), _Part('e', 0)
  union = sources.ConcatRecords([u, e, t])
  expected = [f'u{i}' for i in range(5)] + [f't{i}' for i in range(3)]
  assert len(union) == 8
  assert [union[i]['image'] for i in range(8)] == expected
  ids = [7, 0, 4, 5, 1, 6]
  assert [r['image'] for r in union.__getitems__(ids)] == [expected[i] for i in ids]
  assert u.calls == [[0, 4, 1]] and t.calls == [[2, 0, 1]]   # one batched read per part
  with pytest.raises(IndexError):
    union[8]


@pytest.mark.parametrize('spec', ['', 'train+', '+train', 'train[:10%]', 'train+train',
                                  'un labelled', 3])
def test_bad_split_specs_name_the_field(spec):
  with pytest.raises(ValueError, match='dataset.train_split'):
    sources.union_parts(spec)


def test_union_under_mock_data(mock_tfds, tmp_path):
  union = sources.open_union('tfds:stl10', 'unlabelled+train', str(tmp_path))
  parts = [tfds_source.open_split('stl10', s, str(tmp_path)) for s in ('unlabelled', 'train')]
  assert union.split == 'unlabelled+train' and len(union) == 24
  assert union.num_classes == 10 and union.pixel_max == 255
  images, labels = union.read(np.arange(24))
  for i in range(24):
    ex = parts[i // 12][i % 12]
    np.testing.assert_array_equal(images[i], ex['image'])
    assert labels[i] == ex['label']
  assert sources.open_union('tfds:stl10', 'train', str(tmp_path)).split == 'train'
  with pytest.raises(ValueError, match="splits 'train' and 'test' only"):
    sources.open_union('mnist_subset', 'unlabelled+train', str(tmp_path))


def _stl10(tmp_path, method='moco'):
  c = ssl.get_config(f'stl10,{method}')
  c.dataset.data_dir = str(tmp_path)
  c.dataset.workers = 0
  return c


def test_stl10_trains_on_the_union_and_evaluates_on_labelled_train(mock_tfds, tmp_path):
  c = _stl10(tmp_path)
  assert c.dataset.train_split == 'unlabelled+train'
  ds = inputs.open_train_data(c)
  assert ds.stream.split == 'unlabelled+train' and len(ds.stream) == 24
  assert ds.num_train == 24 and len(ds.train) == 12 and ds.train.split == 'train'
  np.testing.assert_array_equal(ds.train_labels(), ds.train.labels())
  kw = dict(global_batch=8, seed=3, num_steps=6, process_index=0, process_count=1, views=2)
  with ds.train_batches(start_step=0, **kw) as it:
    run = [next(it) for _ in range(6)]
  with ds.train_batches(start_step=4, **kw) as it:        # resumed: the same batches
    resumed = [next(it) for _ in range(2)]
  for a, b in zip(run[4:], resumed):
    for k in ('x', 'x2', 'y', 'index'):
      np.testing.assert_array_equal(a[k], b[k])
  # Three steps of 8 are one epoch of the 24 records of the union, each once.
  assert sorted(np.concatenate([b['index'] for b in run[:3]])) == list(range(24))
  assert run[0]['x'].shape == (8, 96, 96, 3)
  # The kNN monitor's memory bank: the labelled train split, every record once.
  with ds.ordered_batches('train', global_batch=8, process_index=0, process_count=1) as it:
    rows = [b['index'][b['mask']] for b in it]
  assert sorted(np.concatenate(rows)) == list(range(12))


def test_train_split_checks(tmp_path):
  configure.validate_config(_stl10(tmp_path))
  configure.validate_config(_stl10(tmp_path, 'moco_mixup'))
  free = tasks.label_free_names()
  assert {'moco', 'samix_ssl'} <= set(free) and not {'supervised', 'linear_probe'} & set(free)
  # A supervised task reads labels: the union (labels -1) is refused.
  sup = common.cifar('mixup', 'tfds:stl10', 'resnet18')
  configure.validate_config(sup)
  sup.dataset.train_split = 'unlabelled+train'
  with pytest.raises(ValueError, match="dataset.train_split='unlabelled\\+train' is for the "
                                       'self-supervised tasks'):
    configure.validate_config(sup)
  c = _stl10(tmp_path)
  c.dataset.train_fraction = 0.5
  with pytest.raises(ValueError, match='do not apply to dataset.train_split'):
    configure.validate_config(c)
  c = _stl10(tmp_path)
  c.dataset.name = 'mnist_jpeg'
  with pytest.raises(ValueError, match="dataset.train_split='unlabelled\\+train' needs a tfds"):
    configure.validate_config(c)
  c = _stl10(tmp_path)
  c.dataset.train_split = 'train[:50%]'
  with pytest.raises(ValueError, match='dataset.train_split must be a split name'):
    configure.validate_config(c)


@pytest.mark.slow
def test_moco_pretrains_on_the_union(mock_tfds, tmp_path):
  """Three steps over the 24 records of 'unlabelled+train', then the kNN
  monitor on the labelled train (12) and test (12) splits."""
  import json
  from gmix_jax import train
  c = _stl10(tmp_path / 'data')
  c.dataset.image_size = 16
  c.model.name, c.model.kwargs = 'mlp', {'hidden_sizes': (16,)}
  c.task.queue_size, c.task.proj_hidden, c.task.proj_dim, c.task.knn_k = 8, 16, 8, 5
  c.batch_size, c.num_epochs, c.num_devices, c.eval_batch_size = 8, 1, 2, 8
  c.log_every_steps, c.progress, c.plots = 1, False, False
  summary = train.train_and_evaluate(c, str(tmp_path / 'wd'))
  with open(tmp_path / 'wd' / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  assert [r['step'] for r in records if r['split'] == 'train'] == [1, 2, 3]
  assert summary['steps'] == 3 and summary['num_train'] == 24
  assert 0.0 <= summary['final_knn_accuracy'] <= 1.0
