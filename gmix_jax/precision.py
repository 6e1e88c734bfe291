"""Mixed precision and SAM's perturbation: measuring what survives the cast,
and a rounding that keeps it.

With ``model.dtype=bfloat16`` the parameters w, the optimizer state, SAM's ε,
losses and every Optax transform stay float32; each layer casts its float32
parameters to bfloat16 (round to nearest) before it computes. SAM's perturbed
pass therefore evaluates the loss at

  q(w + ε)   instead of   w + ε,      q = round-to-nearest bfloat16,

and the perturbation the model actually sees is Δ = q(w + ε) − q(w). A
bfloat16 number has 8 significant bits, so an element of ε smaller than half
a unit in the last place (ulp) of its weight is rounded away — for |w| ≈ 0.02
half an ulp is 6e-5, and ρ/√P ≈ 1e-5 for ResNet-50 at ρ = 0.05.

Whether that loses the perturbation depends on where w sits inside its
rounding cell. If the fractional positions u_i = (w_i − floor(w_i)) / ulp_i
are spread uniformly (weights after f32 training steps), element i crosses a
rounding threshold with probability |ε_i| / ulp_i, so E[Δ_i] = ε_i: the
perturbation survives *on average* over elements, buried in rounding noise
(E Δ_i² = |ε_i| ulp_i ≫ ε_i²). If w sits *on* the bfloat16 grid (LayerNorm
and BatchNorm scales at their initial 1.0, parameters loaded from a bfloat16
checkpoint, any weight initialised to a representable value), no element
crosses: Δ = 0 and the SAM step is bit-for-bit the ERM step.

``cast_survival`` measures both readings (the ratio ‖Δ‖/‖ε‖ and the share of
ε that survives in its own direction, ⟨Δ, ε⟩/‖ε‖²) per model and per layer;
``experiments/bench_precision.py`` reports them for ResNet-50 and ViT-B/16.

The remedy, ``dither`` rounding (``model.param_rounding='dither'``): round
each parameter element with its own fixed threshold t_i ∈ [0, 1) ulp instead
of ½,

  q_t(v) = truncate_to_bfloat16(v + t_i · ulp(v)),

with t_i a hash of (leaf, element index), uniform over elements and
independent of the values. For every element and any position of w_i on or
off the grid, P[q_t(w+ε) − q_t(w) = ±ulp] = |ε_i| / ulp (over the thresholds),
so E[Δ] = ε exactly and a SAM step can no longer silently collapse to ERM.
Nothing random is drawn at run time (the same thresholds in the clean and
the perturbed pass, so their difference carries only ε), the cost is a few
integer ops per parameter fused into the cast, and gradients pass straight
through (∂q/∂w = 1, as for the plain cast). Price: the clean pass's rounding
error has variance ulp²/6 on average instead of ulp²/12, still unbiased.
Alternatives considered: random stochastic rounding needs an rng in
``apply_fn`` and uses different noise in the two passes (their difference
then carries ~ulp noise on every element, not just on crossing ones); exact
two-term layers x·q(w) + x·q(ε) double the matmuls of the perturbed pass.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROUNDINGS = ('nearest', 'dither')


def _global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def cast_survival(params, eps, dtype=jnp.bfloat16, cast: Callable | None = None) -> dict:
  """How much of the perturbation ε reaches a model that computes in `dtype`.

  Δ = cast(w + ε) − cast(w) (in float32); `cast` defaults to round-to-nearest.

  Returns float32 scalars: ``ratio`` = ‖Δ‖/‖ε‖ (the size that survives, noise
  included); ``aligned`` = ⟨Δ, ε⟩/‖ε‖² (the share of ε along itself: 1 when
  unbiased, 0 when lost); ``cosine`` = cos(Δ, ε); ``moved`` = fraction of
  elements with Δ ≠ 0; and per leaf (leaves with ε ≠ 0) ``leaf_ratio`` and
  ``leaf_aligned`` as 1-d arrays (for min / median).
  """
  cast = cast or (lambda x: x.astype(dtype))
  delta = jax.tree.map(
      lambda w, e: cast(w + e).astype(jnp.float32) - cast(w).astype(jnp.float32), params, eps)
  e_norm, d_norm = _global_norm(eps), _global_norm(delta)
  dot = sum(jnp.vdot(d, e) for d, e in zip(jax.tree.leaves(delta), jax.tree.leaves(eps)))
  moved = sum(jnp.sum(d != 0) for d in jax.tree.leaves(delta))
  size = sum(d.size for d in jax.tree.leaves(delta))
  leaf_e = jnp.stack([jnp.linalg.norm(e.ravel()) for e in jax.tree.leaves(eps)])
  leaf_d = jnp.stack([jnp.linalg.norm(d.ravel()) for d in jax.tree.leaves(delta)])
  leaf_dot = jnp.stack([jnp.vdot(d, e) for d, e in zip(jax.tree.leaves(delta),
                                                      jax.tree.leaves(eps))])
  safe = jnp.maximum(leaf_e, 1e-30)
  return {'ratio': d_norm / e_norm, 'aligned': dot / e_norm**2,
          'cosine': dot / (d_norm * e_norm + 1e-30), 'moved': moved / size,
          'leaf_ratio': leaf_d / safe, 'leaf_aligned': leaf_dot / safe**2,
          'leaf_has_eps': leaf_e > 0}


def _thresholds(shape: tuple[int, ...], salt: int) -> jax.Array:
  """Per-element integers in [0, 2^16), a hash of (salt, flat index)
  (murmur3's 32-bit finaliser): the dither thresholds in units of 2^-16 ulp."""
  h = jnp.arange(int(np.prod(shape)), dtype=jnp.uint32).reshape(shape)
  h = h * jnp.uint32(0x9E3779B1) + jnp.uint32((salt * 0x85EBCA77 + 0x165667B1) % 2**32)
  h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
  h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
  return (h ^ (h >> 16)) & jnp.uint32(0xFFFF)


def dither_cast(x: jax.Array, salt: int = 0) -> jax.Array:
  """float32 -> bfloat16 with a fixed per-element threshold (see module doc).

  bfloat16 is the upper 16 bits of a float32, so adding t ∈ [0, 2^16) to the
  bit pattern and truncating rounds the magnitude up exactly when the dropped
  fraction exceeds 1 − t/2^16 (a carry into the exponent is the correct next
  value). Sign-magnitude makes it symmetric for negative numbers.
  """
  if x.dtype != jnp.float32:
    raise ValueError(f'dither_cast rounds float32 to bfloat16; got {x.dtype}.')
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32) + _thresholds(x.shape, salt)
  bits = bits & jnp.uint32(0xFFFF0000)
  return jax.lax.bitcast_convert_type(bits, jnp.float32).astype(jnp.bfloat16)


def dither_params(params):
  """Every float32 leaf rounded by `dither_cast` (leaf i uses salt i), kept
  in float32 (exactly representable, so the model's own cast is exact) with
  a straight-through gradient: w + stop_gradient(q_t(w) − w)."""
  leaves, treedef = jax.tree.flatten(params)

  def one(i, w):
    if w.dtype != jnp.float32:
      return w
    q = dither_cast(w, salt=i).astype(jnp.float32)
    return w + jax.lax.stop_gradient(q - w)

  return treedef.unflatten([one(i, w) for i, w in enumerate(leaves)])


def make_apply_fn(apply_fn: Callable, rounding: str = 'nearest', dtype: Any = jnp.float32):
  """`apply_fn` whose parameters are rounded by `rounding` before the model
  casts them (config fields `model.param_rounding`, `model.dtype`).

  'nearest' returns `apply_fn` itself (each layer's cast rounds to nearest);
  'dither' pre-rounds with `dither_params`, and needs dtype bfloat16. Every
  pass (clean, perturbed, sensitivity) sees the same rounding rule, so the
  objectives need no change.
  """
  if rounding not in ROUNDINGS:
    raise ValueError(f'model.param_rounding must be one of {", ".join(ROUNDINGS)}; '
                     f'got {rounding!r}.')
  if rounding == 'nearest':
    return apply_fn
  if jnp.dtype(dtype) != jnp.bfloat16:
    raise ValueError(f"model.param_rounding='dither' needs model.dtype='bfloat16'; "
                     f'got {jnp.dtype(dtype).name}.')

  def wrapped(params, model_state, x, train, *args, **kwargs):
    return apply_fn(dither_params(params), model_state, x, train, *args, **kwargs)

  if hasattr(apply_fn, 'mix_points'):
    wrapped.mix_points = apply_fn.mix_points
  return wrapped
