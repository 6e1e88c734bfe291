"""Per-example sharpness-sensitivity s_i (docs/methods.md § 3).

s_i measures how much example i's loss rises when the weights move a
distance ρ in the direction that hurts that example most — the "vmapped SAM
perturbations" of the G-Mix design. BG-Mix and DG-Mix split the batch by it.

Estimators (``SensitivityConfig.estimator``):
  * ``per_example``: ε_i = ρ ∇ℓ_i / (‖∇ℓ_i‖ + eps_norm),  s_i = ℓ_i(w+ε_i) − ℓ_i(w),
    vmapped over the examples of a chunk, ``lax.map`` over chunks, so peak
    memory grows with ``chunk`` and not with the batch.
  * ``first_order``: s_i = ρ ‖∇ℓ_i(w)‖, the first-order value of the above
    (ℓ_i(w+ε_i) − ℓ_i(w) = ρ‖∇ℓ_i‖ + O(ρ²)), the norms by the ghost-norm
    identity in one backward pass (``ghost_norm``).
  * ``shared`` (ESAM's selection rule): s_i = ℓ_i(w+ε) − ℓ_i(w) with ε the
    SAM perturbation of the clean batch's mean loss: no per-example gradients.
  * ``shared_prev``: ``shared`` with ε = ρ u/‖u‖, u the direction of the
    previous step's clean gradient of the objective (the direction SAM
    ascended along), kept by the train step (``objectives.step_state_init``):
    two forward passes, no backward pass (docs/methods.md § 3.2).
  * ``stale``: the last s_i computed for that training example, looked up by
    example index from a table the trainer refreshes every
    ``refresh_every`` epochs (``refresh``/``lookup`` below).

All passes run on the clean examples with ``train=False`` (BatchNorm uses its
running statistics, so s_i does not depend on the other examples), under
``stop_gradient``, and never update the model state.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from gmix_jax import accumulation
from gmix_jax import losses
from gmix_jax import sharpness

PyTree = Any
ApplyFn = Callable[..., tuple[jax.Array, PyTree]]
ESTIMATORS = ('per_example', 'first_order', 'shared', 'shared_prev', 'stale')


@dataclasses.dataclass(frozen=True)
class SensitivityConfig:
  """Knobs of the sensitivity estimators.

  Attributes:
    estimator: one of ``ESTIMATORS`` (default ``per_example``).
    rho: radius of the per-example perturbation; ``None`` uses the method's
      sharpness ρ.
    chunk: examples per vmapped chunk for ``per_example``/``first_order``;
      0 = the whole per-device batch in one chunk. Must divide the batch.
      Results do not depend on it, only peak memory does.
    refresh_every: epochs between refreshes of the ``stale`` table.
  """
  estimator: str = 'per_example'
  rho: Optional[float] = None
  chunk: int = 0
  refresh_every: int = 1

  def __post_init__(self):
    if self.estimator not in ESTIMATORS:
      raise ValueError(f'sensitivity.estimator must be one of {ESTIMATORS}, '
                       f'got {self.estimator!r}')
    if self.rho is not None and not self.rho >= 0:
      raise ValueError(f'sensitivity.rho must be >= 0, got {self.rho}')
    if self.chunk < 0:
      raise ValueError(f'sensitivity.chunk must be >= 0 (0 = whole batch), got {self.chunk}')
    if self.refresh_every < 1:
      raise ValueError(f'sensitivity.refresh_every must be >= 1, got {self.refresh_every}')


def _example_loss(apply_fn: ApplyFn, model_state: PyTree):
  """ℓ_i(w) for one example (no batch axis), evaluated with running stats."""
  def loss(params, x, y):
    logits, _ = apply_fn(params, model_state, x[None], False)
    return losses.soft_cross_entropy(logits, y[None])[0]
  return loss


def _chunked_vmap(fn, chunk: int, *arrays):
  """``vmap(fn)`` over the leading axis, evaluated ``chunk`` rows at a time."""
  n = arrays[0].shape[0]
  if chunk == 0 or chunk >= n:
    return jax.vmap(fn)(*arrays)
  if n % chunk:
    raise ValueError(f'sensitivity.chunk={chunk} must divide the per-device batch {n}')
  split = [a.reshape((n // chunk, chunk) + a.shape[1:]) for a in arrays]
  out = jax.lax.map(lambda xs: jax.vmap(fn)(*xs), split)
  return out.reshape((n,) + out.shape[2:])


def _chunked(fn, chunk: int, *arrays):
  """``fn`` of a batch, evaluated ``chunk`` rows at a time (``lax.map``)."""
  n = arrays[0].shape[0]
  if chunk == 0 or chunk >= n:
    return fn(*arrays)
  if n % chunk:
    raise ValueError(f'sensitivity.chunk={chunk} must divide the per-device batch {n}')
  split = [a.reshape((n // chunk, chunk) + a.shape[1:]) for a in arrays]
  return jax.lax.map(lambda xs: fn(*xs), split).reshape(n)


def per_example(apply_fn: ApplyFn, params: PyTree, model_state: PyTree,
                x: jax.Array, y: jax.Array, rho, chunk: int = 0) -> jax.Array:
  """s_i = ℓ_i(w + ε_i) − ℓ_i(w) with ε_i the SAM perturbation of ℓ_i alone."""
  loss = _example_loss(apply_fn, model_state)
  params = jax.lax.stop_gradient(params)

  def one(xi, yi):
    value, grad = jax.value_and_grad(loss)(params, xi, yi)
    eps = sharpness.sam_perturbation(grad, rho)
    return loss(sharpness.add(params, eps), xi, yi) - value

  return _chunked_vmap(one, chunk, x, y)


def _ghost_norm():
  """The ``ghost_norm`` module, or None without Flax: it finds the layers
  through Flax linen, and the core (this module) installs without Flax. A
  model that is not Flax linen is vmapped by ``ghost_norm`` anyway."""
  try:
    from gmix_jax import ghost_norm  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return ghost_norm


def first_order(apply_fn: ApplyFn, params: PyTree, model_state: PyTree,
                x: jax.Array, y: jax.Array, rho, chunk: int = 0,
                ghost: bool = True) -> jax.Array:
  """s_i = ρ ‖∇ℓ_i(w)‖.

  ``ghost=True``: the norms from one batched backward pass by the ghost-norm
  identity (``ghost_norm``, docs/methods.md § 3.1), ``chunk`` rows at a time;
  ``ghost=False``: vmapped per-example gradients (the reference).
  """
  params = jax.lax.stop_gradient(params)
  ghost_norm = _ghost_norm() if ghost else None
  if ghost_norm is not None:
    sq = lambda xs, ys: ghost_norm.squared_norms(apply_fn, params, model_state, xs, ys,
                                                 losses.soft_cross_entropy)
    return rho * jnp.sqrt(_chunked(sq, chunk, x, y))
  loss = _example_loss(apply_fn, model_state)
  one = lambda xi, yi: rho * sharpness.global_norm(jax.grad(loss)(params, xi, yi))
  return _chunked_vmap(one, chunk, x, y)


def shared(apply_fn: ApplyFn, params: PyTree, model_state: PyTree,
           x: jax.Array, y: jax.Array, rho, micro_batches: int = 1,
           direction: Optional[PyTree] = None) -> jax.Array:
  """s_i = ℓ_i(w + ε) − ℓ_i(w), ε = ρ g/(‖g‖ + eps_norm).

  ``direction=None`` (``shared``): g = ∇ of the clean batch's mean loss at
  w, one forward and backward pass; ``direction`` = u (``shared_prev``):
  g = u, a direction given from outside (the previous step's), and only the
  two forward passes remain. With ``micro_batches`` = K the batch gradient
  is accumulated over K micro-batches (one ε from the whole batch, as with
  K = 1) and the losses are evaluated micro-batch by micro-batch.
  """
  params = jax.lax.stop_gradient(params)
  n = x.shape[0]

  def batch_losses(p, rows):
    logits, _ = apply_fn(p, model_state, rows[0], False)
    per_ex = losses.soft_cross_entropy(logits, rows[1])
    return jnp.sum(per_ex) / n, per_ex          # the whole batch's mean, summed over micro-batches

  def losses_at(p):
    return accumulation.accumulate(lambda rows: ((), batch_losses(p, rows)[1]), (x, y),
                                   micro_batches, like=p)[1]

  if direction is None:
    grad, clean = accumulation.accumulate(
        lambda rows: jax.grad(batch_losses, has_aux=True)(params, rows), (x, y), micro_batches,
        like=params)
  else:
    grad, clean = jax.lax.stop_gradient(direction), losses_at(params)
  perturbed = losses_at(sharpness.add(params, sharpness.sam_perturbation(grad, rho)))
  return (perturbed - clean).reshape(n)


def scores(config: SensitivityConfig, apply_fn: ApplyFn, params: PyTree,
           model_state: PyTree, x: jax.Array, y: jax.Array, rho,
           stale_scores: Optional[jax.Array] = None, micro_batches: int = 1,
           direction: Optional[PyTree] = None) -> jax.Array:
  """s ``[B]`` by ``config.estimator``; ``stale`` returns ``stale_scores``,
  ``shared_prev`` perturbs along ``direction`` (a pytree like ``params``).

  ``micro_batches`` = K (gradient accumulation) evaluates the estimators K
  micro-batches at a time: the per-example ones in chunks of at most B/K
  rows, ``shared`` with its batch gradient accumulated. Scores do not change.
  """
  chunk = config.chunk
  if micro_batches > 1 and (chunk == 0 or chunk > x.shape[0] // micro_batches):
    chunk = x.shape[0] // micro_batches
  if config.estimator == 'stale':
    if stale_scores is None:
      raise ValueError("sensitivity.estimator='stale' needs the batch's looked-up "
                       "scores (batch['score'])")
    s = stale_scores
  elif config.estimator == 'per_example':
    s = per_example(apply_fn, params, model_state, x, y, rho, chunk)
  elif config.estimator == 'first_order':
    s = first_order(apply_fn, params, model_state, x, y, rho, chunk)
  elif config.estimator == 'shared_prev':
    if direction is None:
      raise ValueError("sensitivity.estimator='shared_prev' needs the previous step's ascent "
                       "direction (the train state's extra['ascent'], "
                       'objectives.step_state_init)')
    s = shared(apply_fn, params, model_state, x, y, rho, micro_batches, direction)
  else:
    s = shared(apply_fn, params, model_state, x, y, rho, micro_batches)
  return jax.lax.stop_gradient(s.astype(jnp.promote_types(s.dtype, jnp.float32)))


def keeps_table(config: SensitivityConfig) -> bool:
  """Whether the estimator reads a score table kept in the train state
  (``stale``: refreshed every ``refresh_every`` epochs by the trainer)."""
  return config.estimator == 'stale'


def refresh_config(config: SensitivityConfig) -> SensitivityConfig:
  """The estimator that scores the training set for a refresh: ``stale``'s
  table is filled with exact per-example scores; others score as configured."""
  if not keeps_table(config):
    return config
  return SensitivityConfig('per_example', chunk=config.chunk)


def lookup(table: jax.Array, index: jax.Array) -> jax.Array:
  """Stale scores of the batch's examples: ``table[index]``."""
  return table[index]


def refresh(table: jax.Array, index: jax.Array, new_scores: jax.Array) -> jax.Array:
  """Write fresh scores of the examples ``index`` into the stale table."""
  return table.at[index].set(new_scores.astype(table.dtype))
