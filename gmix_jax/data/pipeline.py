"""The one input pipeline: a Grain ``MapDataset`` of host batches over a `Split`.

Training (``train_batches``), for global step ``s``::

  MapDataset.range(start_step, num_steps)        # s
    .map(TrainBatch)   # s -> epoch e = s // steps_per_epoch, shuffled positions of
                       #   epoch e (np.random.default_rng([seed, e])), this
                       #   process's contiguous slice of the global batch, the
                       #   records read in one __getitems__ call, each decoded and
                       #   augmented with np.random.default_rng([seed, record, e])
    .to_iter_dataset() # a thread prefetches the next batches
    .mp_prefetch(dataset.workers)                # 0: in this process

so the batch at step s is a pure function of (seed, s): resuming needs only the
step (the range starts there; nothing else is checkpointed), and a resumed run
replays what the uninterrupted one saw, for any number of workers. The remainder
of an epoch (``n % global_batch``) is dropped, so every batch has one static
shape. Process ``p`` of ``P`` reads only rows ``[p*b, (p+1)*b)`` of each global
batch (``b = global_batch / P``): the trainer assembles the global array from
the processes' rows (``jax.make_array_from_process_local_data``), so the global
batch, row order included, does not depend on ``P`` either; a run may resume on
a different number of processes (same global batch size) and sees the same data.

Each element of the dataset is one whole batch: the records of a batch are read
with one ``__getitems__`` call of the source (the JPEG sources read their
array_record files record by record there: array_record's own batched read costs
about 3x the CPU per record, `jpeg_sources.JpegRecordSource`) and, for raw-array
splits without augmentation, by a single fancy index. Batching happens
in the ``MapDataset``, before ``mp_prefetch`` (batching an ``IterDataset`` after
it has lost data), and positioning is by the range (``set_next_index`` is not
implemented under ``mp_prefetch``).

Two views (``views=2``, contrastive learning): each record is augmented twice,
independently, view v with ``np.random.default_rng([seed, record, e, v])``; the
batch holds view 0 as ``x`` and view 1 as ``x2`` (labels still in ``y``, for
evaluation only), still a pure function of (seed, s). One view keeps the
three-part key above, so single-view batches are unchanged.

Evaluation and the ``stale`` refresh (``ordered_batches``) read a list of records
in order, in padded batches with a ``mask``, each process its rows: every record
exactly once, none held beyond the batches in flight.

Images leave here as uint8 (features as float32) and are normalised on device
(`gmix_jax.data.normalize`).
"""

from __future__ import annotations

import os

import functools
import math
from typing import Any, Callable, Iterator

import numpy as np

from gmix_jax.data import batching
from gmix_jax.data import sources
from gmix_jax.data.image_ops import AUGMENT_NAMES

# Batches each worker (or the prefetch thread) keeps ready.
PREFETCH = 2
# ``dataset.bad_records``: a record that cannot be read or decoded stops the run
# ('error') or is replaced by the next good one and counted ('skip').
BAD_RECORDS = ('error', 'skip')

Transform = Callable[[dict, np.random.Generator], dict]


def augment_name(value) -> str:
  """``dataset.augment`` as a name; old configs' ``True``/``False`` are
  ``'cifar'``/``'none'`` (what they meant: pad-4 crop + flip, or nothing)."""
  if value is True or value is False:
    return 'cifar' if value else 'none'
  if value not in AUGMENT_NAMES:
    raise ValueError(f'dataset.augment must be one of {list(AUGMENT_NAMES)}, got {value!r}')
  return value


def record_transform(split: sources.Split, augment: str, image_size: int | None,
                     train: bool, fill=None, decode: str = 'exact') -> Transform | None:
  """The per-record transform for ``split`` (`image_ops.make_record_transform`),
  or None where there is nothing to do per record: feature vectors (never
  augmented), and raw arrays without augmentation (read as one array).
  ``fill``: the ``'cifar'`` padding colour (uint8 per channel; None = black);
  ``decode``: ``dataset.decode`` (``'exact'`` | ``'fast'``, `fast_resize`)."""
  if split.pixel_max is None:
    return None
  raw = isinstance(split.records, sources.ArrayRecords)
  if raw and image_size is None and (augment == 'none' or
                                     not train and augment in ('cifar', 'moco')):
    return None
  from gmix_jax.data import image_ops  # pylint: disable=g-import-not-at-top
  return image_ops.make_record_transform(augment, image_size, train, channels=split.channels,
                                         fill=fill, decode_mode=decode)


class BadRecordError(ValueError):
  """A record that cannot be read or decoded (``dataset.bad_records='error'``);
  the message names the dataset, the split and the record's index."""


# What a broken record raises: array_record's "Corrupted Riegeli/records file"
# (RuntimeError), PIL on bytes that are not an image or are cut short (OSError,
# its UnidentifiedImageError included), a record shorter than its header
# (struct.error), a proto that does not parse (ValueError, protobuf's DecodeError).
def _record_errors() -> tuple[type[BaseException], ...]:
  import struct  # pylint: disable=g-import-not-at-top
  errors = [RuntimeError, OSError, ValueError, EOFError, struct.error]
  try:
    from google.protobuf import message  # pylint: disable=g-import-not-at-top
    errors.append(message.DecodeError)
  except ImportError:
    pass
  return tuple(errors)


RECORD_ERRORS = _record_errors()
# Consecutive bad records 'skip' looks past for a substitute before giving up
# (a dataset, or a transform, where nothing decodes is not a few bad records).
MAX_CONSECUTIVE_BAD = 64


def _load(split: sources.Split, records: np.ndarray, transform: Transform | None, seed: int,
          epoch: int, views: int = 1) -> tuple[list, np.ndarray, dict[int, BaseException]]:
  """``(per-view images, labels, bad)``: records read (in one batched call when
  all are readable) and transformed ``views`` times, record r's view v with rng
  ``[seed, r, epoch]`` (one view) or ``[seed, r, epoch, v]`` (several); ``bad``
  maps a row to the error of a record that could not be read or decoded (its
  images are None)."""
  bad = {}
  try:
    images, labels = split.read(records)
  except RECORD_ERRORS:               # one by one: which record is it?
    images, labels = [], np.zeros(len(records), np.int32)
    for i, r in enumerate(records):
      try:
        image, label = split.read(np.asarray([r]))
        images.append(image[0])
        labels[i] = label[0]
      except RECORD_ERRORS as e:
        bad[i] = e
        images.append(None)
  if transform is None:                # arrays as read (one fancy index for raw arrays)
    return [images] * views, labels, bad
  key = lambda r, v: [seed, int(r), epoch] + ([] if views == 1 else [v])
  out = [[] for _ in range(views)]
  for i, (image, label, r) in enumerate(zip(images, labels, records)):
    for v in range(views):
      view = None
      if i not in bad:
        try:
          view = transform({'image': image, 'label': int(label)},
                           np.random.default_rng(key(r, v)))['image']
        except RECORD_ERRORS as e:
          bad[i] = e
      out[v].append(view)
  return out, labels, bad


def bad_record_error(split: sources.Split, records: np.ndarray, bad: dict) -> BadRecordError:
  first = min(bad)
  e = bad[first]
  more = sorted(int(records[i]) for i in bad if i != first)
  also = f' (and {len(more)} more in this batch: {", ".join(map(str, more[:5]))}' + (
      ', ...)' if len(more) > 5 else ')') if more else ''
  text = ' '.join(str(e).split())
  text = text if len(text) <= 200 else text[:200] + '...'
  return BadRecordError(
      f'dataset {split.name!r}: {split.split} record {int(records[first])}{also} cannot be read '
      f'or decoded ({type(e).__name__}: {text}). Rebuild the dataset, or set '
      '--config.dataset.bad_records=skip to replace such records by the next good one (counted '
      'in metrics.jsonl)')


class _Records:
  """Reads rows of ``ids`` under a ``bad_records`` policy: 'error' raises
  `BadRecordError`; 'skip' replaces a bad record at position p by the first
  good one at p+1, p+2, ... (cyclically) in ``ids``, so a batch stays a
  function of the data and (seed, step), of the same static shape."""

  def __init__(self, split: sources.Split, ids: np.ndarray, transform: Transform | None,
               seed: int, bad_records: str, views: int = 1):
    if bad_records not in BAD_RECORDS:
      raise ValueError(f'dataset.bad_records must be one of {list(BAD_RECORDS)}, '
                       f'got {bad_records!r}')
    self.split, self.ids, self.transform = split, ids, transform
    self.seed, self.bad_records, self.views = seed, bad_records, views

  def __call__(self, pos: np.ndarray, epoch: int):
    """``(per-view x [k, ...], labels, pos, bad rows)`` for positions ``pos`` in
    ``ids``; ``pos`` comes back with each bad row's substitute."""
    records = self.ids[pos]
    views, labels, bad = _load(self.split, records, self.transform, self.seed, epoch, self.views)
    if bad:
      if self.bad_records == 'error':
        raise bad_record_error(self.split, records, bad)
      pos, labels, views = pos.copy(), labels.copy(), [list(v) for v in views]
      for i in sorted(bad):
        pos[i], substitute, labels[i] = self._substitute(int(pos[i]), epoch)
        for v, image in enumerate(substitute):
          views[v][i] = image
    xs = [v if isinstance(v, np.ndarray) else np.stack(v) for v in views]
    return xs, labels, pos, sorted(bad)

  def _substitute(self, p: int, epoch: int):
    n = len(self.ids)
    tries = min(n - 1, MAX_CONSECUTIVE_BAD)
    for k in range(1, tries + 1):
      q = (p + k) % n
      views, labels, bad = _load(self.split, self.ids[q:q + 1], self.transform, self.seed, epoch,
                                 self.views)
      if not bad:
        return q, [v[0] for v in views], labels[0]
    raise BadRecordError(
        f'dataset {self.split.name!r}: {self.split.split} record {int(self.ids[p])} and the '
        f'{tries} after it cannot be read or decoded; this is not a few bad records: check the '
        'dataset files (and dataset.augment)')


def _check_split(split: sources.Split, ids: np.ndarray | None) -> np.ndarray:
  ids = np.arange(len(split)) if ids is None else np.asarray(ids, np.int64)
  if len(ids) == 0:
    raise ValueError(f'dataset {split.name!r}: the {split.split} split is empty')
  return ids


class TrainBatch:
  """Global step -> this process's training batch ``{'x', 'y', 'index'}``.

  ``index`` is the examples' positions in ``ids`` (the training set, possibly a
  subset), which the ``stale`` estimator's table is indexed by. With
  ``views=2`` the batch also holds ``x2``, a second view of the same records
  (module docstring). A picklable callable (workers receive a copy); each copy
  keeps its epoch's permutation. With ``bad_records='skip'`` the batch also
  holds ``bad_records``, the number of its (this process's) records replaced
  (`_Records`), a scalar that the trainer takes out before the batch goes to
  the devices.
  """

  def __init__(self, split: sources.Split, ids: np.ndarray | None, global_batch: int,
               seed: int, transform: Transform | None, process_index: int = 0,
               process_count: int = 1, bad_records: str = 'error', views: int = 1):
    if views not in (1, 2):
      raise ValueError(f'views must be 1 or 2, got {views!r}')
    self.split, self.ids, self.views = split, _check_split(split, ids), views
    self.global_batch, self.seed, self.transform = global_batch, seed, transform
    self.read = _Records(split, self.ids, transform, seed, bad_records, views)
    self.steps_per_epoch = batching.steps_per_epoch(len(self.ids), global_batch)
    self.process_index, self.process_count = process_index, process_count
    batching.batch_indices(len(self.ids), global_batch, seed, 0, 0, process_index,
                           process_count)      # checks the shapes now, not in a worker
    self._epoch, self._perm = None, None

  def positions(self, step: int) -> np.ndarray:
    """This process's positions in ``ids`` at ``step`` (batching.batch_indices)."""
    epoch, pos = divmod(int(step), self.steps_per_epoch)
    if self._epoch != epoch:               # one permutation per epoch, not per step
      self._perm = batching.epoch_permutation(len(self.ids), self.seed, epoch)
      self._epoch = epoch
    b = self.global_batch // self.process_count
    start = pos * self.global_batch + self.process_index * b
    return self._perm[start:start + b]

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    xs, labels, local, bad = self.read(self.positions(step), int(step) // self.steps_per_epoch)
    batch = {'x': xs[0], 'y': labels, 'index': local.astype(np.int32)}
    if self.views == 2:
      batch['x2'] = xs[1]
    if self.read.bad_records == 'skip':       # this process's replaced records (not a row)
      batch['bad_records'] = np.int32(len(bad))
    return batch


class OrderedBatch:
  """Batch k -> this process's rows of records ``ids[k*G:(k+1)*G]``, padded.

  Returns ``{'x', 'y', 'mask', 'index'}``: ``mask`` is False on padding rows
  (which repeat the first record) and, with ``bad_records='skip'``, on rows
  whose record could not be read (replaced as in training), ``index`` the
  rows' positions in ``ids``.
  """

  def __init__(self, split: sources.Split, ids: np.ndarray | None, global_batch: int,
               transform: Transform | None, process_index: int = 0, process_count: int = 1,
               seed: int = 0, bad_records: str = 'error'):
    self.split, self.ids = split, _check_split(split, ids)
    self.read = _Records(split, self.ids, transform, seed, bad_records)
    if global_batch % process_count:
      raise ValueError(f'batch {global_batch} is not divisible by process_count={process_count}')
    self.global_batch, self.transform, self.seed = global_batch, transform, seed
    self.local_batch = global_batch // process_count
    self.offset = process_index * self.local_batch
    self.num_batches = math.ceil(len(self.ids) / global_batch)

  def __call__(self, k: int) -> dict[str, np.ndarray]:
    pos = int(k) * self.global_batch + self.offset + np.arange(self.local_batch)
    mask = pos < len(self.ids)
    xs, labels, pos, bad = self.read(np.where(mask, pos, 0), 0)
    mask[bad] = False                          # 'skip': a replaced record is not evaluated
    return {'x': xs[0], 'y': labels, 'mask': mask, 'index': pos.astype(np.int32)}


def _parse_absl_flags() -> None:
  """``mp_prefetch`` reads grain's absl flags, which raise if unparsed (outside
  ``absl.app.run``, e.g. under pytest): take their defaults then."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _die_with_parent(worker_index: int, worker_count: int, *, parent: int) -> None:
  """In each worker: exit when the training process dies. Without it a
  SIGKILLed trainer (preemption, OOM killer) leaves its workers running,
  holding memory and blocked on a queue nobody reads. Linux only
  (``prctl(PR_SET_PDEATHSIG, SIGKILL)``); elsewhere a no-op."""
  del worker_index, worker_count
  import ctypes  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass
  if os.getppid() != parent:  # the trainer died before prctl took effect
    os._exit(1)


class Batches(Iterator[dict]):
  """Iterator over ``fn(i)`` for ``i`` in ``[start, stop)`` through Grain.

  Close it (or use it as a context manager): that stops the prefetch thread and
  the worker processes. ``workers=0`` reads in this process.
  """

  def __init__(self, fn: Callable[[int], Any], start: int, stop: int, workers: int = 0,
               prefetch: int = PREFETCH):
    import grain  # pylint: disable=g-import-not-at-top
    self._it = None
    if isinstance(workers, bool) or not (isinstance(workers, int) and workers >= 0):
      raise ValueError(f'dataset.workers must be an int >= 0, got {workers!r}')
    ds = grain.MapDataset.range(start, stop).map(fn).to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
    if workers:
      _parse_absl_flags()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                       per_worker_buffer_size=prefetch),
                          worker_init_fn=functools.partial(_die_with_parent,
                                                           parent=os.getpid()))
    self._it = iter(ds)
    self.step = start

  def __next__(self) -> dict:
    if self._it is None:
      raise StopIteration
    batch = next(self._it)
    self.step += 1
    return batch

  def close(self) -> None:
    it, self._it = self._it, None
    if it is not None and hasattr(it, 'close'):
      it.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
    return False

  def __del__(self):
    self.close()


def train_batches(split: sources.Split, ids: np.ndarray | None, *, global_batch: int, seed: int,
                  num_steps: int, start_step: int = 0, augment: str = 'none',
                  image_size: int | None = None, workers: int = 0, process_index: int = 0,
                  process_count: int = 1, fill=None, bad_records: str = 'error',
                  views: int = 1, decode: str = 'exact') -> Batches:
  """Host batches of global steps ``[start_step, num_steps)`` (module docstring);
  ``views=2``: two augmented views per record (``x``, ``x2``); ``decode``:
  ``dataset.decode`` (`record_transform`)."""
  fn = TrainBatch(split, ids, global_batch, seed,
                  record_transform(split, augment, image_size, train=True, fill=fill,
                                   decode=decode),
                  process_index, process_count, bad_records, views)
  return Batches(fn, start_step, num_steps, workers)


def ordered_batches(split: sources.Split, ids: np.ndarray | None = None, *, global_batch: int,
                    augment: str = 'none', image_size: int | None = None, workers: int = 0,
                    process_index: int = 0, process_count: int = 1,
                    bad_records: str = 'error') -> Batches:
  """Every record of ``ids`` (default all) once, in order, unaugmented
  (evaluation transform), in padded masked batches."""
  fn = OrderedBatch(split, ids, global_batch,
                    record_transform(split, augment, image_size, train=False),
                    process_index, process_count, bad_records=bad_records)
  return Batches(fn, 0, fn.num_batches, workers)
