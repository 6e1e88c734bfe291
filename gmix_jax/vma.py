"""Which manual mesh axes a value varies over, under ``jax.shard_map``.

With ``check_vma=True`` (the default) JAX types every value inside a
``shard_map`` as varying over some manual axes (different on each device)
or invariant (replicated). Two things in this library depend on it: a
``lax.scan`` carry must start with the type its body returns (gradient
accumulation), and a gradient with respect to invariant params is summed
over devices (the Optax transforms refuse that). JAX 0.10+ spells the type
``jax.typeof(x).manual_axis_type.varying``; earlier releases ``.vma``.
"""
from __future__ import annotations

from typing import Any, Optional

import jax

PyTree = Any


def varying_axes(x) -> Optional[frozenset]:
  """The axes ``x`` varies over (empty outside shard_map or under pmap), or
  ``None`` where this JAX does not say."""
  aval = jax.typeof(x)
  mat = getattr(aval, 'manual_axis_type', None)
  if mat is not None and hasattr(mat, 'varying'):
    return frozenset(mat.varying)
  vma = getattr(aval, 'vma', None)
  return None if vma is None else frozenset(vma)


def union(tree: PyTree) -> Optional[frozenset]:
  """The axes any leaf of ``tree`` varies over; ``None`` if any is unknown."""
  axes = frozenset()
  for leaf in jax.tree.leaves(tree):
    v = varying_axes(leaf)
    if v is None:
      return None
    axes |= v
  return axes


def typed(axis_name: str) -> bool:
  """Whether values are typed varying/invariant over ``axis_name`` here
  (shard_map with ``check_vma``: the device index itself varies)."""
  v = varying_axes(jax.lax.axis_index(axis_name))
  return bool(v) and axis_name in v


def cast_to(tree: PyTree, axes) -> PyTree:
  """Each leaf of ``tree`` made varying over every axis in ``axes`` (a
  ``jax.lax.pcast``); a no-op where values are not typed (pmap, outside
  shard_map). The two branches of a ``lax.cond`` must return equal types."""
  def one(x):
    have = varying_axes(x)
    if have is None:
      return x
    missing = tuple(a for a in axes if a not in have)
    return jax.lax.pcast(x, missing, to='varying') if missing else x
  return jax.tree.map(one, tree)
