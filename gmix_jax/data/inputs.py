"""What a trainer reads from ``config.dataset``: `TrainData`, the two splits
of a dataset, the training subset, the normaliser and the batch streams.

Config fields (configs/common.py): ``name``, ``data_dir``, ``download``,
``examples_per_class`` / ``train_fraction`` (an index selection over the
training split, `subsets`), ``augment`` (``'none'`` | ``'cifar'`` |
``'inception'`` | ``'moco'``; old configs' ``True``/``False`` mean ``'cifar'``/``'none'``),
``image_size`` (crop size; None = the stored size), ``workers`` (Grain
worker processes; 0 = read in the training process) and ``bad_records``
(``'error'`` | ``'skip'``: a record that cannot be read stops the run, naming
it, or is replaced by the next good one and counted, `pipeline`), ``train_split`` (None or
``'train'``: the labelled training split; a tfds split spec such as ``'unlabelled+train'``:
the training stream reads that union instead (`sources.open_union`), for the
self-supervised tasks, while evaluation, labels and statistics keep the labelled
``train``), ``decode`` (``'exact'``: PIL's pixels; ``'fast'``: the Inception
training crop resized by OpenCV, `fast_resize`). Fields missing from an older config take these defaults.
"""

from __future__ import annotations

import dataclasses
import os
import re

import ml_collections
import numpy as np

from gmix_jax.data import fast_resize
from gmix_jax.data import normalize as normalize_lib
from gmix_jax.data import pipeline
from gmix_jax.data import sources
from gmix_jax.data import subsets
from gmix_jax.data import validate

DEFAULTS = {'augment': 'none', 'image_size': None, 'workers': 0, 'bad_records': 'error',
            'train_split': 'train', 'decode': 'exact'}


def dataset_field(config: ml_collections.ConfigDict, field: str):
  """``config.dataset.<field>``, or its default for configs older than it."""
  return config.dataset.get(field, DEFAULTS.get(field))


def train_split(config: ml_collections.ConfigDict) -> str:
  """``dataset.train_split``; None (an unset placeholder) reads as 'train'."""
  value = dataset_field(config, 'train_split')
  return 'train' if value is None else value


def check_fields(config: ml_collections.ConfigDict) -> None:
  """The dataset fields' values, checked before any data is read."""
  name = config.dataset.name
  if not (isinstance(name, str) and sources.is_known(name)):
    raise sources.unknown_name_error(name)
  data_dir = str(config.dataset.data_dir)
  # The array_record reader and the stats/labels cache beside the files read
  # local paths only; a URL would fail later, deep inside a reader.
  if re.match(r'[A-Za-z][A-Za-z0-9+.-]*://', data_dir):
    raise ValueError(f'dataset.data_dir={data_dir!r}: URLs are not supported, only paths of the '
                     'local file system; mount the bucket (e.g. gcsfuse for gs://) and give the '
                     'mount path')
  augment = pipeline.augment_name(dataset_field(config, 'augment'))
  size = dataset_field(config, 'image_size')
  if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
    raise ValueError(f'dataset.image_size must be None or an int >= 1, got {size!r}')
  if augment == 'inception' and size is None:
    raise ValueError("dataset.augment='inception' needs dataset.image_size (e.g. 224)")
  workers = dataset_field(config, 'workers')
  if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
    raise ValueError(f'dataset.workers must be an int >= 0, got {workers!r}')
  check_subset_fields(config.dataset.get('examples_per_class'),
                      config.dataset.get('train_fraction'))
  bad = dataset_field(config, 'bad_records')
  if bad not in pipeline.BAD_RECORDS:
    raise ValueError(f'dataset.bad_records must be one of {list(pipeline.BAD_RECORDS)}, '
                     f'got {bad!r}')
  fast_resize.check_decode(dataset_field(config, 'decode'))
  spec = train_split(config)
  sources.union_parts(spec)
  if spec != 'train':
    if not sources.supports_union(name):
      raise ValueError(f'dataset.train_split={spec!r} needs a tfds dataset (one of '
                       f'{list(sources.tfds_source.TFDS_DATASETS)} or tfds:NAME); dataset '
                       f"{name!r} has the splits 'train' and 'test' only")
    if (config.dataset.get('examples_per_class') is not None
        or config.dataset.get('train_fraction') is not None):
      raise ValueError(f'dataset.examples_per_class / train_fraction select labelled examples '
                       f"of 'train'; they do not apply to dataset.train_split={spec!r}")


def check_subset_fields(examples_per_class, train_fraction) -> None:
  """``examples_per_class``: None or an int >= 1; ``train_fraction``: None or
  a number in (0, 1]; at most one of them (0 would otherwise read as "unset"
  and train on everything)."""
  k, f = examples_per_class, train_fraction
  if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
    raise ValueError(f'dataset.examples_per_class must be None (every example) or an int >= 1, '
                     f'got {k!r}')
  if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float))
                        or not 0.0 < f <= 1.0):
    raise ValueError(f'dataset.train_fraction must be None (every example) or a number in '
                     f'(0, 1], got {f!r}')
  if k is not None and f is not None:
    raise ValueError(f'set at most one of dataset.examples_per_class ({k}) and '
                     f'dataset.train_fraction ({f})')


@dataclasses.dataclass(frozen=True, eq=False)
class TrainData:
  """A dataset as the trainer uses it.

  Attributes:
    train, test: the labelled splits (`sources.Split`).
    train_ids: the training set's records in the training stream's split,
      ``stream`` if set, else ``train`` (sorted; all of them unless
      ``examples_per_class`` / ``train_fraction`` select a subset).
    stream: the split the training stream reads when ``dataset.train_split``
      is not ``'train'`` (e.g. ``'unlabelled+train'``); None: ``train``.
    input_shape: one example's shape as the model sees it.
    normalizer: on-device ``uint8 -> float32`` (`normalize.Normalizer`).
  """
  name: str
  train: sources.Split
  test: sources.Split
  train_ids: np.ndarray
  input_shape: tuple[int, ...]
  normalizer: normalize_lib.Normalizer
  augment: str
  image_size: int | None
  workers: int
  bad_records: str = 'error'   # a record that cannot be read: 'error' | 'skip' (`pipeline`)
  stream: sources.Split | None = None
  decode: str = 'exact'   # the training crop's resize: 'exact' | 'fast' (`fast_resize`)

  @property
  def num_classes(self) -> int:
    return self.train.num_classes

  @property
  def num_train(self) -> int:
    return len(self.train_ids)

  @property
  def num_test(self) -> int:
    return len(self.test)

  def train_labels(self) -> np.ndarray:
    """Labels of the labelled training examples (all of ``train`` when the
    stream reads another split: its labels may be -1, unlabelled)."""
    if self.stream is not None:
      return self.train.labels(self.bad_records)
    return self.train.labels(self.bad_records)[self.train_ids]

  def test_labels(self) -> np.ndarray:
    return self.test.labels(self.bad_records)

  def train_batches(self, *, global_batch: int, seed: int, num_steps: int, start_step: int,
                    process_index: int, process_count: int, views: int = 1) -> pipeline.Batches:
    """The training stream from ``start_step`` (`pipeline.train_batches`);
    ``views=2``: two independently augmented views per record (``x``, ``x2``)."""
    return pipeline.train_batches(
        self.train if self.stream is None else self.stream, self.train_ids, global_batch=global_batch, seed=seed, num_steps=num_steps,
        start_step=start_step, augment=self.augment, image_size=self.image_size,
        workers=self.workers, process_index=process_index, process_count=process_count,
        fill=self.pad_fill(), bad_records=self.bad_records, views=views, decode=self.decode)

  def pad_fill(self) -> tuple[int, ...] | None:
    """The ``'cifar'`` crop's padding colour: the training set's mean pixel, so
    padding normalises to 0, as zero-padding the normalised image did before
    augmentation moved to the host."""
    pixel_max = self.train.pixel_max
    if pixel_max is None:
      return None
    return tuple(int(v) for v in np.clip(np.round(self.normalizer.mean * pixel_max), 0, 255))

  def ordered_batches(self, split: str, *, global_batch: int, process_index: int,
                      process_count: int) -> pipeline.Batches:
    """``'test'``: the test split; ``'train'``: the training set (for the
    ``stale`` refresh and the kNN monitor's memory bank; the whole labelled
    ``train`` split when the stream reads another), unaugmented, in order,
    padded and masked.

    Splits held in memory as raw arrays are read in this process whatever
    ``workers`` says: there is nothing to decode, and starting workers for each
    pass (they are spawned afresh) would cost more than the pass.
    """
    if split == 'test' or self.stream is not None:
      src, ids = (self.test if split == 'test' else self.train), None
    else:
      src, ids = self.train, self.train_ids
    in_memory = isinstance(src.records, sources.ArrayRecords)
    return pipeline.ordered_batches(
        src, ids, global_batch=global_batch, augment=self.augment, image_size=self.image_size,
        workers=0 if in_memory else self.workers, process_index=process_index,
        process_count=process_count, bad_records=self.bad_records)


def open_train_data(config: ml_collections.ConfigDict) -> TrainData:
  """Opens ``config.dataset`` (see the module docstring); reads no images but
  the first (for the input shape) and, once per dataset, the statistics."""
  check_fields(config)
  dc = config.dataset
  train, test = sources.open_splits(dc.name, os.path.expanduser(dc.data_dir),
                                    download=dc.download)
  spec = train_split(config)
  stream = (None if spec == 'train' else
            sources.open_union(dc.name, spec, os.path.expanduser(dc.data_dir),
                               download=dc.download))
  for split in (train, test) + ((stream,) if stream is not None else ()):
    validate.check_nonempty(dc.name, split.split, len(split))   # before any record is read
  ids = np.arange(len(train if stream is None else stream))
  bad_records = dataset_field(config, 'bad_records')
  if dc.examples_per_class is not None or dc.train_fraction is not None:
    ids = subsets.subsample_indices(train.labels(bad_records),
                                    examples_per_class=dc.examples_per_class,
                                    train_fraction=dc.train_fraction, seed=config.seed)
  augment = pipeline.augment_name(dataset_field(config, 'augment'))
  size = dataset_field(config, 'image_size')
  first = pipeline.OrderedBatch(train, ids[:1], 1,
                                pipeline.record_transform(train, augment, size, train=False),
                                bad_records=bad_records)(0)
  shape = tuple(first['x'].shape[1:])
  # Normalised per channel, the last axis; a grayscale image [H, W] has one.
  channels = 1 if train.pixel_max is not None and len(shape) == 2 else shape[-1]
  return TrainData(name=dc.name, train=train, test=test, train_ids=ids, input_shape=shape,
                   normalizer=normalize_lib.for_split(train, channels, bad_records),
                   augment=augment, image_size=size,
                   workers=dataset_field(config, 'workers'),
                   bad_records=bad_records, stream=stream,
                   decode=dataset_field(config, 'decode'))
