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

`gmix_jax.data.pipeline.TrainBatch` reads the plan's records, one Grain
element per step.
"""

from __future__ import annotations

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
