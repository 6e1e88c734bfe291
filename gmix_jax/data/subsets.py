"""Stratified, seeded subsets: limited-data regimes and fixed train/test splits.

Two ways to shrink a training set, both stratified so every class keeps its
share and both a pure function of ``seed``:

* ``examples_per_class=k``: exactly ``k`` examples of every class present
  (the few-shot regime); a class with fewer than ``k`` examples is an error.
* ``train_fraction=f``: ``round(f * n)`` examples overall (Python's ``round``,
  half to even), split across classes by the largest-remainder rule, so the
  total is exact and each class gets ``floor`` or ``ceil`` of ``f * n_c``.

Selected indices are returned sorted, so the subset keeps the original order;
shuffling is the batch plan's job (`gmix_jax.data.batching`).

The same largest-remainder rule gives the offline builders their fixed test
splits (`gmix_jax.data.builders`).
"""

from __future__ import annotations

import numpy as np


def largest_remainder(counts: np.ndarray, total: int) -> np.ndarray:
  """Splits ``total`` across groups proportionally to ``counts``, exactly.

  Integer arithmetic throughout, so a quota that is a whole number is never
  pushed to the wrong side by float rounding. Ties in the remainders go to the
  earlier group (stable sort), which keeps the result deterministic.

  Args:
    counts: non-negative group sizes, shape ``[G]``.
    total: how many to allocate, ``0 <= total <= counts.sum()``.

  Returns:
    int64 ``[G]`` allocations summing to ``total``, each ``<= counts``.
  """
  counts = np.asarray(counts, dtype=np.int64)
  n = int(counts.sum())
  if not 0 <= total <= n:
    raise ValueError(f'Cannot allocate {total} out of {n} examples.')
  base = counts * total // n
  remainder = counts * total % n
  extra = total - int(base.sum())
  order = np.argsort(-remainder, kind='stable')
  base[order[:extra]] += 1
  return base


def stratified_indices(y: np.ndarray, per_class: np.ndarray,
                       rng: np.random.Generator) -> np.ndarray:
  """Draws ``per_class[i]`` examples of the i-th class of ``np.unique(y)``.

  Returns the chosen positions in ``y``, sorted.
  """
  classes = np.unique(y)
  chosen = []
  for c, k in zip(classes, per_class):
    members = np.flatnonzero(y == c)
    chosen.append(rng.permutation(members)[:k])
  return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def subsample_indices(y: np.ndarray, *, examples_per_class: int | None = None,
                      train_fraction: float | None = None,
                      seed: int) -> np.ndarray:
  """Positions of a stratified, seeded subset of labels ``y`` (sorted).

  Pass exactly one of ``examples_per_class`` / ``train_fraction``, or neither
  (which returns every index).
  """
  y = np.asarray(y)
  if y.ndim != 1:
    raise ValueError(f'Labels must be 1-D, got shape {y.shape}.')
  if examples_per_class is not None and train_fraction is not None:
    raise ValueError(
        'Pass at most one of examples_per_class and train_fraction, got '
        f'examples_per_class={examples_per_class}, '
        f'train_fraction={train_fraction}.')
  if examples_per_class is None and train_fraction is None:
    return np.arange(len(y))

  classes, counts = np.unique(y, return_counts=True)
  if examples_per_class is not None:
    k = int(examples_per_class)
    if k != examples_per_class or k < 1:
      raise ValueError(
          f'examples_per_class must be a positive integer, got '
          f'{examples_per_class!r}.')
    short = [(int(c), int(n)) for c, n in zip(classes, counts) if n < k]
    if short:
      details = ', '.join(f'class {c} has {n}' for c, n in short)
      raise ValueError(
          f'examples_per_class={k} is impossible: {details} examples.')
    per_class = np.full(len(classes), k)
  else:
    f = float(train_fraction)
    if not 0.0 < f <= 1.0:
      raise ValueError(f'train_fraction must be in (0, 1], got {f}.')
    total = round(f * len(y))
    if total < 1:
      raise ValueError(
          f'train_fraction={f} of {len(y)} examples keeps no example.')
    per_class = largest_remainder(counts, total)

  return stratified_indices(y, per_class, np.random.default_rng(seed))


def subsample(x: np.ndarray, y: np.ndarray, *,
              examples_per_class: int | None = None,
              train_fraction: float | None = None,
              seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Stratified, seeded subset of ``(x, y)``; see the module docstring.

  Example:
    >>> x, y = np.arange(20.0)[:, None], np.repeat([0, 1], 10)
    >>> xs, ys = subsample(x, y, examples_per_class=3, seed=0)
    >>> np.bincount(ys).tolist()
    [3, 3]
  """
  idx = subsample_indices(y, examples_per_class=examples_per_class,
                          train_fraction=train_fraction, seed=seed)
  return x[idx], y[idx]
