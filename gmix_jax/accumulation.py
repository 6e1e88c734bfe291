"""Gradient accumulation: sweep rows in K micro-batches (METHODS.md § 6).

``accumulation_steps = K`` is a property of how a gradient is computed, not
of a method: a part's gradient function splits its R rows into K
micro-batches of R/K rows and runs them one after another (``lax.scan``),
summing what is additive over rows (gradients of Σ_r w_r ℓ_r, loss values).
Every sharpness rule only calls that function at w and at w + ε, so it
composes unchanged: the SAM family makes two sweeps (accumulate g, form one
ε from the whole g, accumulate g_p), and the update equals K = 1's to float
tolerance. Peak activation memory follows R/K rows instead of R.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from gmix_jax import vma

PyTree = Any


def check_steps(accumulation_steps) -> int:
  """``accumulation_steps`` as a Python int >= 1, or a clear error."""
  if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) \
      or accumulation_steps < 1:
    raise ValueError(f'accumulation_steps must be an int >= 1 (1 = no accumulation), '
                     f'got {accumulation_steps!r}')
  return accumulation_steps


def divisors(n: int) -> list[int]:
  """The values of ``accumulation_steps`` that split n rows evenly."""
  return [d for d in range(1, n + 1) if n % d == 0]


def micro_batches(rows: PyTree, k: int) -> PyTree:
  """Each leaf ``[R, ...]`` as ``[k, R/k, ...]``: micro-batch j = rows j·R/k … ."""
  def split(a):
    if a.shape[0] % k:
      raise ValueError(f'accumulation_steps={k} must divide the rows of each part '
                       f'({a.shape[0]}); allowed: {divisors(a.shape[0])}')
    return a.reshape((k, a.shape[0] // k) + a.shape[1:])
  return jax.tree.map(split, rows)


def accumulate(fn: Callable[[PyTree], tuple[PyTree, PyTree]], rows: PyTree,
               k: int, like: PyTree = ()) -> tuple[PyTree, PyTree]:
  """Σ_j fn(rows_j)[0] and the stacked fn(rows_j)[1] over k micro-batches.

  ``fn(rows_j) -> (summed, kept)``: ``summed`` (gradients, loss values) is
  added up in a ``lax.scan`` carry, ``kept`` (e.g. BatchNorm state, per-row
  values) comes back with a leading axis of k. With k = 1 this is
  ``fn(rows)`` (``kept`` with a leading axis of 1).

  ``like``: the other arrays ``fn`` reads (its params). Under ``shard_map``
  the zero carry must vary over the mesh axes its body's sums vary over; it
  is made to vary over every axis ``rows`` or ``like`` vary over (a sum of
  a varying term is varying). Where this JAX does not expose that typing,
  the first micro-batch is run before the scan to initialise the carry.
  """
  if k == 1:
    summed, kept = fn(rows)
    return summed, jax.tree.map(lambda a: a[None], kept)
  split = micro_batches(rows, k)

  def body(total, rows_j):
    s, kept = fn(rows_j)
    return jax.tree.map(jnp.add, total, s), kept

  axes = vma.union((rows, like))
  if axes is None:                     # no typing info: peel the first micro-batch
    summed, first = fn(jax.tree.map(lambda a: a[0], split))
    summed, rest = jax.lax.scan(body, summed, jax.tree.map(lambda a: a[1:], split))
    return summed, jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, rest)
  shapes = jax.eval_shape(fn, jax.tree.map(lambda a: a[0], split))[0]
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  if axes and jax.tree.leaves(zeros):
    zeros = jax.lax.pcast(zeros, tuple(sorted(axes)), to='varying')
  return jax.lax.scan(body, zeros, split)


def mean_state(states: PyTree) -> PyTree:
  """Model states of the micro-batches ``[k, ...]`` → one state.

  Float leaves (running statistics) are averaged: each micro-batch's update
  m·old + (1−m)·stat_j averages to m·old + (1−m)·mean_j stat_j, the update
  with the micro-batches' mean statistic (BatchNorm's batch statistics are
  still per micro-batch, the documented exception to K = 1 equality).
  Other leaves (counters) are equal across micro-batches: the first is kept.
  """
  def reduce(s):
    return jnp.mean(s, 0).astype(s.dtype) if jnp.issubdtype(s.dtype, jnp.floating) else s[0]
  return jax.tree.map(reduce, states)
