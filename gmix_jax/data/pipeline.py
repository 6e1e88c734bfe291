"""The one input pipeline: a Grain ``MapDataset`` of host batches over a `Split`.

Training (``train_batches``), for global step ``s``::

  MapDataset.range(start_step, num_steps)        # s
    .map(TrainBatch)   # s -> epoch e = s // steps_per_epoch, shuffled positions of
                       #   epoch e (np.random.default_rng([seed, e])), this
                       #   process's contiguous slice of the global batch, the
                       #   records read in one batched call, each decoded and
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
with one ``__getitems__`` call (array_record fetches them together) and, for
raw-array splits without augmentation, by a single fancy index. Batching happens
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
                     train: bool, fill=None) -> Transform | None:
  """The per-record transform for ``split`` (`image_ops.make_record_transform`),
  or None where there is nothing to do per record: feature vectors (never
  augmented), and raw arrays without augmentation (read as one array).
  ``fill``: the ``'cifar'`` padding colour (uint8 per channel; None = black)."""
  if split.pixel_max is None:
    return None
  raw = isinstance(split.records, sources.ArrayRecords)
  if raw and image_size is None and (augment == 'none' or
                                     not train and augment in ('cifar', 'moco')):
    return None
  from gmix_jax.data import image_ops  # pylint: disable=g-import-not-at-top
  return image_ops.make_record_transform(augment, image_size, train, channels=split.channels,
                                         fill=fill)


def _apply(transform: Transform | None, images, labels: np.ndarray, records: np.ndarray,
           seed: int, epoch: int, view: int | None = None) -> np.ndarray:
  """Stacks the transformed images; record r's rng is ``[seed, r, epoch]``,
  or ``[seed, r, epoch, view]`` for one of several views."""
  if transform is None:
    return np.asarray(images)
  key = lambda r: [seed, int(r), epoch] + ([] if view is None else [view])
  return np.stack([
      transform({'image': image, 'label': int(label)}, np.random.default_rng(key(r)))['image']
      for image, label, r in zip(images, labels, records)])


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
  keeps its epoch's permutation.
  """

  def __init__(self, split: sources.Split, ids: np.ndarray | None, global_batch: int,
               seed: int, transform: Transform | None, process_index: int = 0,
               process_count: int = 1, views: int = 1):
    if views not in (1, 2):
      raise ValueError(f'views must be 1 or 2, got {views!r}')
    self.split, self.ids, self.views = split, _check_split(split, ids), views
    self.global_batch, self.seed, self.transform = global_batch, seed, transform
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
    local = self.positions(step)
    records = self.ids[local]
    images, labels = self.split.read(records)
    epoch = int(step) // self.steps_per_epoch
    if self.views == 1:
      return {'x': _apply(self.transform, images, labels, records, self.seed, epoch),
              'y': labels, 'index': local.astype(np.int32)}
    x, x2 = (_apply(self.transform, images, labels, records, self.seed, epoch, v)
             for v in range(2))
    return {'x': x, 'x2': x2, 'y': labels, 'index': local.astype(np.int32)}


class OrderedBatch:
  """Batch k -> this process's rows of records ``ids[k*G:(k+1)*G]``, padded.

  Returns ``{'x', 'y', 'mask', 'index'}``: ``mask`` is False on padding rows
  (which repeat the first record), ``index`` the rows' positions in ``ids``.
  """

  def __init__(self, split: sources.Split, ids: np.ndarray | None, global_batch: int,
               transform: Transform | None, process_index: int = 0, process_count: int = 1,
               seed: int = 0):
    self.split, self.ids = split, _check_split(split, ids)
    if global_batch % process_count:
      raise ValueError(f'batch {global_batch} is not divisible by process_count={process_count}')
    self.global_batch, self.transform, self.seed = global_batch, transform, seed
    self.local_batch = global_batch // process_count
    self.offset = process_index * self.local_batch
    self.num_batches = math.ceil(len(self.ids) / global_batch)

  def __call__(self, k: int) -> dict[str, np.ndarray]:
    pos = int(k) * self.global_batch + self.offset + np.arange(self.local_batch)
    mask = pos < len(self.ids)
    pos = np.where(mask, pos, 0)
    records = self.ids[pos]
    images, labels = self.split.read(records)
    x = _apply(self.transform, images, labels, records, self.seed, 0)
    return {'x': x, 'y': labels, 'mask': mask, 'index': pos.astype(np.int32)}


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
                  process_count: int = 1, fill=None, views: int = 1) -> Batches:
  """Host batches of global steps ``[start_step, num_steps)`` (module docstring);
  ``views=2``: two augmented views per record (``x``, ``x2``)."""
  fn = TrainBatch(split, ids, global_batch, seed,
                  record_transform(split, augment, image_size, train=True, fill=fill),
                  process_index, process_count, views)
  return Batches(fn, start_step, num_steps, workers)


def ordered_batches(split: sources.Split, ids: np.ndarray | None = None, *, global_batch: int,
                    augment: str = 'none', image_size: int | None = None, workers: int = 0,
                    process_index: int = 0, process_count: int = 1) -> Batches:
  """Every record of ``ids`` (default all) once, in order, unaugmented
  (evaluation transform), in padded masked batches."""
  fn = OrderedBatch(split, ids, global_batch,
                    record_transform(split, augment, image_size, train=False),
                    process_index, process_count)
  return Batches(fn, 0, fn.num_batches, workers)
