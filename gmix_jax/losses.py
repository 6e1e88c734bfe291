"""Per-example losses and metrics on soft labels.

Everything here is per example (shape ``[B]``) so that callers choose the
reduction: objectives weight examples (BG-/DG-Mix give subsets their own
weights, docs/methods.md § 4) and the sensitivity estimators need ℓ_i itself
(docs/methods.md § 3).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def soft_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """ℓ_i = −Σ_c y_ic log softmax(f(x_i))_c, shape ``[B]``.

  ``labels`` are distributions over the C classes (one-hot or mixed). The
  log-softmax is taken in at least float32, so bf16 models do not lose the
  loss to rounding (and float64 stays float64).
  """
  dtype = jnp.promote_types(logits.dtype, jnp.float32)
  logp = jax.nn.log_softmax(logits.astype(dtype), axis=-1)
  return -jnp.sum(labels.astype(dtype) * logp, axis=-1)


def as_soft_labels(labels: jax.Array, num_classes: int) -> jax.Array:
  """Integer labels ``[B]`` → one-hot ``[B, C]``; ``[B, C]`` passes through.

  The dtype is JAX's default float (float32, or float64 under x64).
  """
  dtype = jnp.result_type(float)
  if labels.ndim == 1:
    return jax.nn.one_hot(labels, num_classes, dtype=dtype)
  return labels.astype(jnp.promote_types(labels.dtype, dtype))


def weighted_loss(logits: jax.Array, labels: jax.Array,
                  weights: jax.Array) -> jax.Array:
  """Σ_i w_i ℓ_i: the one reduction every objective uses."""
  return jnp.sum(weights * soft_cross_entropy(logits, labels))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of examples whose arg-max logit matches the arg-max label."""
  target = labels if labels.ndim == 1 else jnp.argmax(labels, axis=-1)
  return jnp.mean(jnp.argmax(logits, axis=-1) == target)


def expected_calibration_error(logits: jax.Array, labels: jax.Array,
                               num_bins: int = 15) -> jax.Array:
  """ECE (Guo et al. 2017): Σ_bins (n_b/N) |acc_b − conf_b|.

  Confidence = max softmax probability; equal-width bins on (0, 1].
  ``labels`` are integer classes ``[N]``.
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  conf = jnp.max(probs, axis=-1)
  correct = (jnp.argmax(probs, axis=-1) == labels).astype(jnp.float32)
  bins = jnp.clip(jnp.ceil(conf * num_bins).astype(jnp.int32) - 1, 0, num_bins - 1)
  count = jnp.zeros(num_bins).at[bins].add(1.0)
  acc_sum = jnp.zeros(num_bins).at[bins].add(correct)
  conf_sum = jnp.zeros(num_bins).at[bins].add(conf)
  return jnp.sum(jnp.abs(acc_sum - conf_sum)) / jnp.maximum(jnp.sum(count), 1.0)


def mixupe_term(logits: jax.Array, labels: jax.Array, alpha: float,
                tau: float) -> jax.Array:
  """MixupE's extra term R on a clean forward pass (Zou et al. 2023, version 3).

  r_i = ⟨f(x_i), y_i − p_i⟩ with p_i = softmax(f(x_i)), λ̄ = (α+1)/(2α+1) and
  R = (1−λ̄)/B Σ_{i: r_i<τ} r_i (docs/methods.md § 1). No stop-gradient on p_i:
  docs/methods.md states none.
  """
  dtype = jnp.promote_types(logits.dtype, jnp.float32)
  logits = logits.astype(dtype)
  r = jnp.sum(logits * (labels.astype(dtype) - jax.nn.softmax(logits, axis=-1)), axis=-1)
  lam_bar = (alpha + 1.0) / (2.0 * alpha + 1.0)
  return (1.0 - lam_bar) / logits.shape[0] * jnp.sum(jnp.where(r < tau, r, 0.0))


def mixupe_rescale(mix_loss: jax.Array, term: jax.Array, eta: float) -> jax.Array:
  """L = L_mix − ηR, rescaled by stop_grad(|L_mix|/|L|): the value equals
  L_mix, only the gradient changes (MixupE's official recipe)."""
  total = mix_loss - eta * term
  return jax.lax.stop_gradient(jnp.abs(mix_loss) / jnp.abs(total)) * total


def mixupe_term_v1(logits: jax.Array, jvp_logits: jax.Array, labels: jax.Array,
                   alpha: float, tau: float) -> jax.Array:
  """MixupE's version-1 term R₁ (Zou et al. 2023; official code, "more accurate").

  The first-order term of mixup's Taylor expansion (Zhang et al. 2021):
  r_i = ⟨J_f(x_i) δ_i, sg(p_i − y_i)⟩ with δ_i = sg(x̄ − x_i), i.e. the
  directional derivative of the logits towards the input mean, dotted with
  the (stopped) residual; R₁ = (1−λ̄)/B Σ_{i: r_i<τ} r_i, λ̄ = (α+1)/(2α+1).
  ``jvp_logits`` is J_f(x) δ (``jax.jvp``); the official code gets the same
  number by double backprop, ⟨∇_x ⟨f(x_i), b_i⟩, δ_i⟩. The gradient reaches
  the weights only through J_f δ (second-order terms, as in the official
  code). With x̄ = 0 and a positively homogeneous f (J_f(x) x = f(x)), r_i
  equals version 3's r_i.
  """
  dtype = jnp.promote_types(logits.dtype, jnp.float32)
  logits = logits.astype(dtype)
  residual = jax.lax.stop_gradient(jax.nn.softmax(logits, axis=-1) - labels.astype(dtype))
  r = jnp.sum(jvp_logits.astype(dtype) * residual, axis=-1)
  lam_bar = (alpha + 1.0) / (2.0 * alpha + 1.0)
  return (1.0 - lam_bar) / logits.shape[0] * jnp.sum(jnp.where(r < tau, r, 0.0))
