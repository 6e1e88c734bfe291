"""Flatness and calibration of a trained model: the quantities the G-Mix
claims are about, measured after training.

Everything here is pure and jit-able and reaches the model only through
``apply_fn(params, model_state, x, train)`` (called with ``train=False``:
BatchNorm uses its running statistics, so the loss at given weights does not
depend on how the evaluation set is batched). The loss is the mean soft-label
cross-entropy over a *fixed* evaluation set, split into equal batches (static
shapes; padding rows carry weight 0).

- ``hvp`` / ``hessian_top_eigenvalue``: λ_max of ∇²L(w) by power iteration on
  Hessian-vector products (Keskar et al. 2017 use the Hessian spectrum as the
  sharpness of a minimum; forward-over-reverse HVPs as in Pearlmutter 1994).
- ``rho_sharpness``: max_{‖ε‖≤ρ} L(w+ε) − L(w) (Keskar et al. 2017's
  ε-sharpness without the 1+L normalisation; the quantity SAM minimises,
  Foret et al. 2021), found by projected normalised gradient ascent: a
  **lower bound** on the true maximum.
- ``expected_calibration_error``: Guo et al. 2017 (the one in ``losses``).
- ``filter_normalized_direction`` / ``landscape_1d`` / ``landscape_2d``: loss
  along random filter-normalised directions (Li et al. 2018, "Visualizing
  the Loss Landscape of Neural Nets").
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gmix_jax import losses
from gmix_jax import sharpness


EPS_NORM = sharpness.EPS_NORM
expected_calibration_error = losses.expected_calibration_error


# ----------------------------------------------------------------------------
# A random direction (the pytree algebra is sharpness.py's).
# ----------------------------------------------------------------------------
def tree_normal(rng: jax.Array, like):
  """Standard normal pytree shaped (and typed) like ``like``."""
  leaves, treedef = jax.tree.flatten(like)
  keys = jax.random.split(rng, len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, l.shape, l.dtype)
                                      for k, l in zip(keys, leaves)])


# ----------------------------------------------------------------------------
# The loss on a fixed evaluation set.
# ----------------------------------------------------------------------------
class EvalSet(NamedTuple):
  """A fixed evaluation set in ``[nb, b, ...]`` batches; ``w`` = 1/n on real
  rows, 0 on padding, so Σ w ℓ is the mean loss over the n real examples."""
  x: jax.Array
  y: jax.Array        # [nb, b, C] soft labels
  w: jax.Array        # [nb, b]


def make_eval_set(x, y, num_classes: int, batch_size: int) -> EvalSet:
  """Pads ``(x, y)`` (integer labels) to whole batches of ``batch_size``."""
  x, y = np.asarray(x), np.asarray(y)
  n = x.shape[0]
  nb = -(-n // batch_size)
  pad = nb * batch_size - n
  x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
  y = np.concatenate([y, np.zeros((pad,), y.dtype)])
  w = np.concatenate([np.full(n, 1.0 / n), np.zeros(pad)])
  dtype = jnp.result_type(float)
  return EvalSet(jnp.asarray(x).reshape(nb, batch_size, *x.shape[1:]),
                 jax.nn.one_hot(y, num_classes, dtype=dtype).reshape(nb, batch_size, num_classes),
                 jnp.asarray(w, dtype).reshape(nb, batch_size))


def make_loss_fn(apply_fn: Callable, model_state, data: EvalSet) -> Callable:
  """``loss(params)`` = mean cross-entropy over ``data`` with ``train=False``.

  The batches are a Python loop (unrolled when traced), not ``lax.map``:
  XLA:CPU runs the convolutions of a loop body about 20× slower than the
  same ops outside a loop (measured here: a 512-image CNN gradient, 2.5 s in
  ``lax.scan``, 0.13 s unrolled). The evaluation set has a few batches.
  """
  def loss(params):
    total = 0.0
    for i in range(data.x.shape[0]):
      logits, _ = apply_fn(params, model_state, data.x[i], False)
      total = total + jnp.sum(data.w[i] * losses.soft_cross_entropy(logits, data.y[i]))
    return total
  return loss


def logits_on(apply_fn: Callable, params, model_state, data: EvalSet) -> jax.Array:
  """Logits of every row of ``data`` (padding included), shape ``[nb*b, C]``."""
  return jnp.concatenate([apply_fn(params, model_state, data.x[i], False)[0]
                          for i in range(data.x.shape[0])])


# ----------------------------------------------------------------------------
# Hessian: HVPs and the top eigenvalue.
# ----------------------------------------------------------------------------
def hvp(loss_fn: Callable, params, v):
  """∇²L(w) v by forward-over-reverse: the JVP of ∇L along v.

  One HVP costs about one gradient plus one forward-mode pass, and never
  forms the Hessian.
  """
  return jax.jvp(jax.grad(loss_fn), (params,), (v,))[1]


class PowerIteration(NamedTuple):
  eigenvalue: jax.Array      # Rayleigh quotient vᵀHv at the last iterate
  vector: object             # the last (unit) iterate, a params-shaped pytree
  trace: jax.Array           # [num_iters + 1] Rayleigh quotient of iterate 0 (start) .. num_iters


def hessian_top_eigenvalue(loss_fn: Callable, params, rng: jax.Array,
                           num_iters: int = 20, unroll: bool = False) -> PowerIteration:
  """λ_max of ∇²L(w) by power iteration: v ← Hv/‖Hv‖, λ = vᵀHv.

  Power iteration converges to the eigenvalue of largest *magnitude*; at a
  trained network's minimum that is the largest positive one (negative
  curvature there is small), which is the sharpness Keskar et al. 2017
  read off the spectrum. It converges at rate |λ₂/λ₁| per iteration, so
  ``trace`` shows whether ``num_iters`` (fixed, for ``lax.fori_loop``) was
  enough. The start vector is Gaussian (``rng``). ``unroll=True`` unrolls the
  loop: slower to compile, but XLA:CPU runs a conv net's HVP inside a loop
  body many times slower than unrolled (see ``make_loss_fn``).
  """
  v0 = sharpness.normalize(tree_normal(rng, params))
  dtype = jnp.result_type(*jax.tree.leaves(params))

  def body(i, carry):
    v, _, trace = carry
    hv = hvp(loss_fn, params, v)
    lam = sharpness.tree_dot(v, hv)      # Rayleigh quotient (‖v‖ = 1)
    v = sharpness.normalize(hv)
    return v, lam, trace.at[i].set(lam)

  v, lam, trace = jax.lax.fori_loop(
      0, num_iters, body, (v0, jnp.zeros((), dtype), jnp.zeros((num_iters + 1,), dtype)),
      unroll=unroll or None)
  # The Rayleigh quotient of the final iterate (the loop's λ is one behind it).
  lam = sharpness.tree_dot(v, hvp(loss_fn, params, v))
  return PowerIteration(lam, v, trace.at[num_iters].set(lam))


# ----------------------------------------------------------------------------
# ρ-sharpness.
# ----------------------------------------------------------------------------
class Sharpness(NamedTuple):
  sharpness: jax.Array       # max over iterates of L(w+ε) − L(w), ε in the ρ-ball
  loss: jax.Array            # L(w)
  epsilon: object            # the ε attaining it


def rho_sharpness(loss_fn: Callable, params, rho: float, num_steps: int = 5,
                  step_size: float | None = None, unroll: bool = False) -> Sharpness:
  """max_{‖ε‖₂≤ρ} L(w+ε) − L(w), a lower bound by projected gradient ascent.

  ε₀ = ρ g/‖g‖ with g = ∇L(w) (SAM's one-step answer, Foret et al. 2021);
  then ``num_steps`` steps ε ← Π_ρ(ε + η ∇L(w+ε)/‖∇L(w+ε)‖), η = ρ by
  default (a normalised step: the ascent does not depend on the gradient's
  scale), Π_ρ the projection onto the ball. The best of the num_steps + 1
  iterates is kept, so the value never falls below SAM's one-step estimate.
  For a convex L and η = ρ no step decreases L (L(ε') ≥ L(ε) + gᵀ(ε' − ε),
  and gᵀ(ε' − ε) ≥ 0 when ‖ε‖ ≤ ρ = η), but it reaches the maximum only in
  the limit (at best): the result is always
  a lower bound on the true maximum (Keskar et al. 2017 solve the same
  problem with L-BFGS-B). ``unroll``: as in ``hessian_top_eigenvalue``.
  """
  eta = rho if step_size is None else step_size
  value_and_grad = jax.value_and_grad(loss_fn)
  base, g = value_and_grad(params)
  eps = sharpness.sam_perturbation(g, rho)

  def body(_, carry):
    eps, best, best_eps = carry
    val, g = value_and_grad(sharpness.add(params, eps))
    better = val > best
    best = jnp.where(better, val, best)
    best_eps = jax.tree.map(lambda a, b: jnp.where(better, a, b), eps, best_eps)
    eps = sharpness.add(eps, sharpness.scale(sharpness.normalize(g), eta))
    eps = sharpness.scale(eps, jnp.minimum(1.0, rho / (sharpness.global_norm(eps) + EPS_NORM)))
    return eps, best, best_eps

  eps, best, best_eps = jax.lax.fori_loop(
      0, num_steps, body, (eps, jnp.full((), -jnp.inf, base.dtype), eps),
      unroll=(unroll or None) if num_steps else None)
  # The last iterate was moved to but not evaluated.
  last = loss_fn(sharpness.add(params, eps))
  better = last > best
  best = jnp.where(better, last, best)
  best_eps = jax.tree.map(lambda a, b: jnp.where(better, a, b), eps, best_eps)
  return Sharpness(best - base, base, best_eps)


# ----------------------------------------------------------------------------
# Loss landscapes along filter-normalised directions (Li et al. 2018).
# ----------------------------------------------------------------------------
def filter_normalized_direction(rng: jax.Array, params, ignore_1d: bool = True):
  """A Gaussian direction d with ‖d_f‖ = ‖w_f‖ for every filter f (Li et al. 2018).

  A filter is one output unit: the slice along the *last* axis of a Flax
  kernel (``[kh, kw, in, out]`` conv, ``[in, out]`` dense), i.e. the rows of a
  PyTorch weight. Scaling each filter of d to its weights' norm removes the
  scale invariance of ReLU networks, so landscapes of different networks are
  comparable. Leaves with ndim ≤ 1 (biases, BatchNorm scale/shift) are set to
  zero, as in the paper's default (``ignore='biasbn'``); with
  ``ignore_1d=False`` they are normalised as one filter each.
  """
  d = tree_normal(rng, params)

  def normalise(di, wi):
    if wi.ndim <= 1:
      if ignore_1d:
        return jnp.zeros_like(di)
      return di * jnp.linalg.norm(wi) / (jnp.linalg.norm(di) + EPS_NORM)
    axes = tuple(range(wi.ndim - 1))
    dn = jnp.sqrt(jnp.sum(di * di, axis=axes, keepdims=True))
    wn = jnp.sqrt(jnp.sum(wi * wi, axis=axes, keepdims=True))
    return di * wn / (dn + EPS_NORM)

  return jax.tree.map(normalise, d, params)


def plane_loss(loss_fn: Callable) -> Callable:
  """``at(params, d1, d2, α, β) = L(w + α d₁ + β d₂)``, compiled once."""
  return jax.jit(lambda params, d1, d2, a, b: loss_fn(
      sharpness.add(params, sharpness.add(sharpness.scale(d1, a), sharpness.scale(d2, b)))))


def landscape_1d(loss_fn: Callable, params, direction, alphas) -> np.ndarray:
  """L(w + α d) for each α.

  A host loop over one compiled evaluation rather than ``lax.map``: one
  evaluation in memory at a time, and no loop body for XLA:CPU to slow down
  (see ``make_loss_fn``); a grid of a few hundred points costs as many
  dispatches, which is nothing next to the evaluations.
  """
  return landscape_2d(loss_fn, params, direction, direction, alphas, [0.0])[:, 0]


def landscape_2d(loss_fn: Callable, params, d1, d2, alphas, betas) -> np.ndarray:
  """L(w + α d₁ + β d₂) on the grid, shape ``[len(alphas), len(betas)]``."""
  at = plane_loss(loss_fn)
  zero = lambda v: jnp.asarray(v, jnp.result_type(float))
  vals = [[at(params, d1, d2, zero(a), zero(b)) for b in betas] for a in alphas]
  return np.asarray(jax.device_get(vals), dtype=np.float64)


# ----------------------------------------------------------------------------
# All of it for one trained model.
# ----------------------------------------------------------------------------
def analyse(apply_fn: Callable, params, model_state, x, y, num_classes: int, *,
            batch_size: int = 128, rho: float = 0.05, ascent_steps: int = 5,
            power_iters: int = 20, num_bins: int = 15, seed: int = 0,
            unroll: bool | None = None) -> dict:
  """Loss, accuracy, ECE, λ_max (with its power-iteration trace) and
  ρ-sharpness of ``params`` on the evaluation set ``(x, y)``; floats.
  ``unroll`` (the fixed loops; default: on CPU only, see ``make_loss_fn``)."""
  if unroll is None:
    unroll = jax.default_backend() == 'cpu'
  data = make_eval_set(x, y, num_classes, batch_size)
  n = int(np.asarray(x).shape[0])

  @jax.jit   # the data is an argument, not a constant folded into the program
  def run(params, model_state, data, rng):
    loss_fn = make_loss_fn(apply_fn, model_state, data)
    logits = logits_on(apply_fn, params, model_state, data)[:n]
    labels = jnp.argmax(data.y.reshape(-1, num_classes)[:n], -1)
    power = hessian_top_eigenvalue(loss_fn, params, rng, power_iters, unroll=unroll)
    sharp = rho_sharpness(loss_fn, params, rho, ascent_steps, unroll=unroll)
    return {'loss': sharp.loss, 'accuracy': losses.accuracy(logits, labels),
            'ece': expected_calibration_error(logits, labels, num_bins),
            'lambda_max': power.eigenvalue, 'lambda_trace': power.trace,
            'rho_sharpness': sharp.sharpness}

  out = jax.device_get(run(params, model_state, data, jax.random.PRNGKey(seed)))
  res = {k: float(v) for k, v in out.items() if k != 'lambda_trace'}
  res['lambda_trace'] = [float(v) for v in out['lambda_trace']]
  res.update(num_examples=n, rho=rho, ascent_steps=ascent_steps, power_iters=power_iters)
  return res
