"""A stateless batch plan: the batch at step s is a function of (seed, s).

Nothing about iteration is stored except the step counter, so resuming from
a checkpoint at step s, or running on a different number of hosts, replays
exactly the same global batches:

* ``epoch_permutation(n, seed, epoch)``: a fresh shuffle per epoch, drawn
  from ``np.random.default_rng([seed, epoch])``.
* Global step ``s`` lies in epoch ``s // steps_per_epoch`` at position
  ``s % steps_per_epoch``; the remainder ``n % global_batch`` of each epoch
  is dropped so every batch has the same (static) shape.
* Process ``p`` of ``P`` takes the contiguous slice ``[p * b, (p + 1) * b)``
  of the global batch, ``b = global_batch // P``: slices are disjoint, their
  union (in process order) is the global batch, and each process only
  gathers its own examples.

``BatchIterator`` wraps the plan for a trainer: it yields host-local numpy
batches and exposes ``.step``; build it with ``start_step=state.step`` to
resume.
"""

from __future__ import annotations

from typing import Iterator, Mapping

import numpy as np


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
  """Full global batches per epoch (the remainder is dropped)."""
  if global_batch < 1:
    raise ValueError(f'global_batch must be positive, got {global_batch}.')
  steps = num_examples // global_batch
  if steps < 1:
    raise ValueError(
        f'global_batch={global_batch} is larger than the training set '
        f'({num_examples} examples): no full batch.')
  return steps


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The order of examples in ``epoch``: a permutation of ``num_examples``."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def _local_slice(global_batch: int, process_index: int,
                 process_count: int) -> slice:
  if global_batch % process_count:
    raise ValueError(
        f'global_batch={global_batch} is not divisible by '
        f'process_count={process_count}.')
  if not 0 <= process_index < process_count:
    raise ValueError(
        f'process_index={process_index} not in [0, {process_count}).')
  b = global_batch // process_count
  return slice(process_index * b, (process_index + 1) * b)


def batch_indices(num_examples: int, global_batch: int, seed: int, epoch: int,
                  step_in_epoch: int, process_index: int = 0,
                  process_count: int = 1) -> np.ndarray:
  """This process's example indices for one step of the plan.

  Returns:
    int64 ``[global_batch // process_count]`` positions in the training set.
  """
  spe = steps_per_epoch(num_examples, global_batch)
  if not 0 <= step_in_epoch < spe:
    raise ValueError(f'step_in_epoch={step_in_epoch} not in [0, {spe}).')
  local = _local_slice(global_batch, process_index, process_count)
  start = step_in_epoch * global_batch
  perm = epoch_permutation(num_examples, seed, epoch)
  return perm[start:start + global_batch][local]


class BatchIterator(Iterator[dict]):
  """Infinite iterator over host-local batches of the plan.

  Example:
    >>> x, y = np.zeros((10, 3)), np.arange(10) % 2
    >>> it = BatchIterator((x, y), global_batch=4, seed=0)
    >>> batch = next(it)
    >>> batch['x'].shape, batch['y'].dtype, it.step
    ((4, 3), dtype('int32'), 1)

  Attributes:
    step: global step of the *next* batch to be yielded.
    steps_per_epoch: full global batches per epoch.
    local_batch: ``global_batch // process_count``.
  """

  def __init__(self, dataset_arrays, global_batch: int, seed: int,
               process_index: int = 0, process_count: int = 1,
               start_step: int = 0):
    """Creates the iterator.

    Args:
      dataset_arrays: ``(x, y)`` or a mapping with keys ``'x'`` and ``'y'``:
        the (possibly subsampled) training set.
      global_batch: examples per step over all processes.
      seed: the plan's seed.
      process_index: this process (``jax.process_index()``).
      process_count: number of processes (``jax.process_count()``).
      start_step: global step to start from (to resume).
    """
    if isinstance(dataset_arrays, Mapping):
      x, y = dataset_arrays['x'], dataset_arrays['y']
    else:
      x, y = dataset_arrays
    if len(x) != len(y):
      raise ValueError(f'x has {len(x)} rows but y has {len(y)}.')
    if start_step < 0:
      raise ValueError(f'start_step must be >= 0, got {start_step}.')
    self._x, self._y = x, y
    self.num_examples = len(y)
    self.global_batch = global_batch
    self.seed = seed
    self.steps_per_epoch = steps_per_epoch(self.num_examples, global_batch)
    self._local = _local_slice(global_batch, process_index, process_count)
    self.local_batch = global_batch // process_count
    self.step = start_step
    self._perm_epoch, self._perm = None, None

  @property
  def epoch(self) -> int:
    """Epoch of the next batch."""
    return self.step // self.steps_per_epoch

  def indices(self, step: int) -> np.ndarray:
    """This process's example indices at global ``step`` (pure in step)."""
    epoch, pos = divmod(step, self.steps_per_epoch)
    if self._perm_epoch != epoch:  # one permutation per epoch, not per step
      self._perm = epoch_permutation(self.num_examples, self.seed, epoch)
      self._perm_epoch = epoch
    start = pos * self.global_batch
    return self._perm[start:start + self.global_batch][self._local]

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    idx = self.indices(self.step)
    self.step += 1
    return {'x': np.asarray(self._x[idx], np.float32),
            'y': np.asarray(self._y[idx], np.int32),
            'index': idx.astype(np.int32)}
