"""The binary split by sharpness-sensitivity (docs/methods.md § 4, reconstruction).

S⁺ = the k = ⌊γB⌉ examples with the largest s_i, S⁻ = the rest. k comes from
the config and the batch shape, never from the data, so both subsets have
static sizes inside jit and can be *gathered*: BG-/DG-Mix then run their
passes on k and B−k examples instead of masking a full batch (compute saved,
not masked away).

Ties are broken by example index (the lower index is more sensitive), so the
split is a deterministic function of the scores. NaN scores count as least
sensitive. Both index sets are returned in increasing example order, so
γ = 1 gathers the batch unchanged (BG-/DG-Mix then reproduce G-Mix exactly).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Split(NamedTuple):
  """Index sets into the batch, each sorted increasingly.

  Attributes:
    sensitive: S⁺, shape ``[k]``.
    insensitive: S⁻, shape ``[B − k]``.
  """
  sensitive: jax.Array
  insensitive: jax.Array


def num_sensitive(gamma: float, batch_size: int) -> int:
  """k = ⌊γB⌉ (round half up), a Python int."""
  if not 0.0 <= gamma <= 1.0:
    raise ValueError(f'partition.gamma must be in [0, 1], got {gamma}')
  return int(math.floor(gamma * batch_size + 0.5))


def top_k_split(scores: jax.Array, k: int) -> Split:
  """Split ``scores [B]`` into the top-k (S⁺) and the rest (S⁻)."""
  scores = jnp.where(jnp.isnan(scores), -jnp.inf, scores)
  # A stable sort of −s orders by (−s, index): ties go to the lower index.
  order = jnp.argsort(-scores, stable=True)
  return Split(jnp.sort(order[:k]), jnp.sort(order[k:]))


def membership(split: Split, batch_size: int) -> jax.Array:
  """Boolean ``[B]`` that is True on S⁺ (for metrics and tests)."""
  return jnp.zeros((batch_size,), bool).at[split.sensitive].set(True)
