"""Contrastive self-supervised learning: pure pieces (docs/methods.md § 9).

MoCo (He et al. 2020, "Momentum Contrast for Unsupervised Visual
Representation Learning"; v2: Chen et al. 2020, "Improved Baselines with
Momentum Contrastive Learning"), its mixup form (the MoCo + mixup baseline of
SAMix; Lee et al. 2021, "i-Mix") and the label-free mixblock loss of SAMix
(Li et al., "Boosting Discriminative Visual Representation Learning with
Scenario-Agnostic Mixup"). Plain JAX, no model code:

  info_nce            ℓ_i = −log e^{q_i·k_i/τ} / (e^{q_i·k_i/τ} + Σ_j e^{q_i·n_j/τ})
  mixed_info_nce      λ ℓ(q̃_i, k_i) + (1 − λ) ℓ(q̃_i, k_π(i))
  enqueue             the FIFO queue of negatives n_j (static shapes)
  momentum_update     θ̄ ← m θ̄ + (1 − m) θ
  momentum_at         m constant, or BYOL's cosine 1 − (1 − m₀)(cos(πk/K) + 1)/2
  shuffle_rows /      MoCo's shuffling BN: a permutation of the rows of the
  unshuffle_rows        global batch across devices, and its inverse
  samix_ssl_mixblock_loss   SAMix's η-balanced BCE with instances for classes

q, k and the queue are L2-normalised rows; every loss is computed in float32
(or float64 under x64) whatever the features' dtype.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

PyTree = Any
SCHEDULES = ('constant', 'cosine')


def _float(*xs):
  dtype = jnp.promote_types(jnp.result_type(*xs), jnp.float32)
  return [jnp.asarray(x, dtype) for x in xs]


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(‖x‖, eps) along the last axis (as torch's F.normalize)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def contrastive_logits(q: jax.Array, positives: jax.Array, queue: jax.Array,
                       temperature: float) -> jax.Array:
  """``[B, P + K]`` logits [q·p_1, …, q·p_P, q·n_1, …, q·n_K] / τ.

  ``positives`` ``[B, P, D]`` (row i's candidate keys), ``queue`` ``[K, D]``.
  """
  q, positives, queue = _float(q, positives, queue)
  pos = jnp.einsum('bd,bpd->bp', q, positives)
  neg = q @ queue.T
  return jnp.concatenate([pos, neg], axis=-1) / temperature


def info_nce(q: jax.Array, k: jax.Array, queue: jax.Array, temperature: float) -> jax.Array:
  """Per-row InfoNCE ``[B]`` (van den Oord et al. 2018; MoCo's loss).

  ℓ_i = logsumexp_j z_ij − z_i0, z_i = [q_i·k_i, q_i·n_1, …, q_i·n_K] / τ:
  the cross-entropy of a (K+1)-way classification with the positive at 0.
  """
  z = contrastive_logits(q, k[:, None, :], queue, temperature)
  return jax.nn.logsumexp(z, axis=-1) - z[:, 0]


def mixed_info_nce(q_mixed: jax.Array, k: jax.Array, k_partner: jax.Array, queue: jax.Array,
                   lam, temperature: float) -> jax.Array:
  """Per-row λ ℓ(q̃_i, k_i) + (1 − λ) ℓ(q̃_i, k_π(i)) ``[B]``.

  ``q_mixed`` are the queries of the mixed images x̃_i (mixing x_i with
  x_π(i)); ``k_partner = k[π]``; ``lam`` a scalar or ``[B]``. Both terms share
  the one logsumexp over [q̃·k_i, q̃·n_1..K] resp. [q̃·k_π(i), q̃·n_1..K].
  """
  lam = jnp.asarray(lam)
  return (lam * info_nce(q_mixed, k, queue, temperature) +
          (1 - lam) * info_nce(q_mixed, k_partner, queue, temperature))


def enqueue(queue: jax.Array, ptr: jax.Array, keys: jax.Array):
  """``(queue, ptr)`` after writing ``keys`` ``[N, D]`` into the FIFO at ``ptr``.

  Rows ptr, ptr+1, … (mod K) are overwritten, so the oldest keys leave first;
  a batch that crosses the end wraps to the start (K need not divide by N).
  Static shapes: one scatter. Needs N ≤ K.
  """
  size, n = queue.shape[0], keys.shape[0]
  if n > size:
    raise ValueError(f'queue size {size} is smaller than the batch of keys {n}; '
                     'the queue must hold at least one global batch')
  ptr = jnp.asarray(ptr, jnp.int32)
  rows = (ptr + jnp.arange(n, dtype=jnp.int32)) % size
  queue = queue.at[rows].set(keys.astype(queue.dtype), unique_indices=True)
  return queue, (ptr + n) % size


def momentum_update(online: PyTree, target: PyTree, m) -> PyTree:
  """θ̄ ← m θ̄ + (1 − m) θ leafwise (MoCo's key encoder, BYOL's target).

  ``target`` has the structure of ``online``; non-float leaves (counters)
  are taken from ``online``.
  """
  def one(o, t):
    if not jnp.issubdtype(t.dtype, jnp.floating):
      return o
    return (m * t + (1.0 - m) * o).astype(t.dtype)
  return jax.tree.map(one, online, target)


def momentum_at(m0: float, step, total_steps: int, schedule: str = 'constant') -> jax.Array:
  """The momentum at ``step``: m₀ (``constant``, MoCo) or
  1 − (1 − m₀)(cos(π k/K) + 1)/2 (``cosine``, BYOL, Grill et al. 2020):
  m₀ at k = 0, 1 at k = K, held at 1 beyond."""
  if schedule not in SCHEDULES:
    raise ValueError(f'momentum schedule must be one of {list(SCHEDULES)}, got {schedule!r}')
  if schedule == 'constant':
    return jnp.asarray(m0, jnp.float32)
  k = jnp.minimum(jnp.asarray(step, jnp.float32) / max(int(total_steps), 1), 1.0)
  return 1.0 - (1.0 - m0) * (jnp.cos(jnp.pi * k) + 1.0) / 2.0


# ----------------------------------------------------------------------------
# Shuffling BN: a permutation of the global batch across devices.
# ----------------------------------------------------------------------------
def _gather(x: jax.Array, axis_name: Optional[str]) -> jax.Array:
  if axis_name is None:
    return x
  return jax.lax.all_gather(x, axis_name, axis=0, tiled=True)


def _my_rows(global_x: jax.Array, index: jax.Array, b: int, axis_name: Optional[str]):
  """This device's ``b`` rows of ``global_x[index]``."""
  if axis_name is not None:
    index = jax.lax.dynamic_slice_in_dim(index, jax.lax.axis_index(axis_name) * b, b)
  return jnp.take(global_x, index, axis=0)


def shuffle_rows(x: jax.Array, perm: jax.Array, axis_name: Optional[str] = None) -> jax.Array:
  """This device's slice of the permuted global batch.

  With G = the global batch (the devices' ``x`` ``[b, ...]`` concatenated in
  axis order, ``[n·b, ...]``), device d receives G[perm][d·b:(d+1)·b].
  ``perm`` ``[n·b]`` must be the same on every device (drawn from a key that
  is not folded with the device index). MoCo's shuffling BN (He et al. 2020,
  § 3.3): the key encoder's BatchNorm then sees a random subset of the global
  batch, not the rows its query came from. ``axis_name=None``: one device.
  """
  return _my_rows(_gather(x, axis_name), perm, x.shape[0], axis_name)


def unshuffle_rows(x: jax.Array, perm: jax.Array, axis_name: Optional[str] = None) -> jax.Array:
  """The inverse of ``shuffle_rows``: rows back on the device (and position)
  of their source row; ``unshuffle_rows(f(shuffle_rows(x)))`` = f(x) row by row
  for any rowwise f."""
  inverse = jnp.argsort(perm)
  return _my_rows(_gather(x, axis_name), inverse, x.shape[0], axis_name)


# ----------------------------------------------------------------------------
# SAMix-SSL: the mixblock's loss.
# ----------------------------------------------------------------------------
def instance_eta_bce(q_mixed: jax.Array, k: jax.Array, k_partner: jax.Array, queue: jax.Array,
                     lam, temperature: float, eta: float) -> jax.Array:
  """Per-row η-balanced sigmoid-BCE over instances ``[B]`` (docs/methods.md § 9).

  z_i = [q̃_i·k_i, q̃_i·k_π(i), q̃_i·n_1, …, q̃_i·n_K] / τ, targets t = (λ, 1 − λ, 0, …),
  weights w = (1, 1, η, …):
  ℓ_i = −Σ_c w_c [t_c log σ(z_ic) + (1 − t_c) log(1 − σ(z_ic))].
  The label-free form of SAMix's ℓ_η (§ 1): instances in place of classes.
  """
  z = contrastive_logits(q_mixed, jnp.stack([k, k_partner], axis=1), queue, temperature)
  lam = jnp.broadcast_to(jnp.asarray(lam, z.dtype), z.shape[:1])[:, None]
  target = jnp.concatenate([lam, 1 - lam, jnp.zeros_like(z[:, 2:])], axis=-1)
  weight = jnp.concatenate([jnp.ones_like(z[:, :2]), jnp.full_like(z[:, 2:], eta)], axis=-1)
  bce = -(target * jax.nn.log_sigmoid(z) + (1 - target) * jax.nn.log_sigmoid(-z))
  return jnp.sum(weight * bce, axis=-1)


def samix_ssl_mixblock_loss(q_mixed: jax.Array, k: jax.Array, k_partner: jax.Array,
                            queue: jax.Array, lam, mask: jax.Array, *, temperature: float,
                            eta: float, mask_weight: float):
  """SAMix-SSL's mixblock loss and its parts ``(loss, (bce, reg))``:

  L_φ = mean_i ℓ_η(q̃_i) + β mean_i |mean_hw(s_i) − (1 − λ_i)|

  ``q_mixed`` are the *frozen momentum encoder's* embeddings of the images
  mixed with ``mask`` s ``[B, H, W]`` (the gradient reaches φ through them
  and through s); ℓ_η is ``instance_eta_bce``; the regulariser keeps the
  mask's area near 1 − λ, as in supervised SAMix.
  """
  bce = jnp.mean(instance_eta_bce(q_mixed, k, k_partner, queue, lam, temperature, eta))
  lam = jnp.broadcast_to(jnp.asarray(lam, bce.dtype), mask.shape[:1])
  area = jnp.mean(mask.reshape(mask.shape[0], -1).astype(bce.dtype), axis=-1)
  reg = jnp.mean(jnp.abs(area - (1 - lam)))
  return bce + mask_weight * reg, (bce, reg)
