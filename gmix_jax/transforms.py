"""Sharpness rules as Optax transformations (docs/methods.md § 2 and § 5).

Each factory returns an ``optax.GradientTransformationExtraArgs`` whose
``update`` receives, besides the gradient g = ∇L(w) and the params w, the
gradient function as the keyword ``grad_fn`` — the calling convention of
``optax.contrib.sam`` in opaque mode: ``grad_fn(params, i) -> grads``. It
returns the sharpness-aware direction (g_p, or GSAM's g_p − α g_⊥), so it
chains in front of any Optax optimizer::

  >>> import jax, jax.numpy as jnp, optax
  >>> from gmix_jax import transforms
  >>> loss = lambda w: jnp.sum((w - 3.0) ** 2)
  >>> opt = optax.chain(transforms.sam(rho=0.05), optax.sgd(0.1))
  >>> w = jnp.zeros(2); state = opt.init(w)
  >>> for _ in range(50):
  ...   g = jax.grad(loss)(w)
  ...   u, state = opt.update(g, state, w, grad_fn=lambda p, _: jax.grad(loss)(p))
  ...   w = optax.apply_updates(w, u)
  >>> bool(jnp.allclose(w, 3.0, atol=1e-2))
  True

Put the sharpness transform first in the chain: it must see the raw
gradient. The efficient rules (docs/methods.md § 2): ``looksam`` (a SAM step
every k-th update, one gradient otherwise) and ``fsam`` chain the same way;
``msam`` wraps the optimizer instead, because its ε comes from that
optimizer's momentum: ``transforms.msam(optax.sgd(lr, momentum=0.9))``. The math is ``gmix_jax.sharpness``'s, shared with the objectives.

Data parallel: with ``batch_axis_name`` the perturbed gradient is averaged
over that axis (like ``optax.contrib.sam``'s). Without ``global_ascent`` each
device perturbs with its own gradient (m = the device batch). With
``global_ascent=True`` every quantity of the rule is the global one: g is
averaged before ε, ESAM draws one mask for all devices and GSAM decomposes
against the averaged g_p, so the update does not depend on the device count.

Under ``jax.shard_map`` (``check_vma=True``, the default) differentiate with
respect to params marked device-varying,
``p = jax.lax.pcast(params, axis, to='varying')``: a gradient with respect to
*replicated* params is the sum of all devices' gradients, which would make
the direction n_devices× too large and the ascent not per device. The
transform raises a ``ValueError`` when it sees replicated params there.
Under ``jax.pmap`` (no such typing) gradients are per device already. The
README ("Quick start for library users") and docs/api.md run both.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from gmix_jax import sharpness
from gmix_jax import vma

Schedule = Callable[[jax.Array], jax.Array]
ScalarOrSchedule = Union[float, jax.Array, Schedule]


class SharpnessState(NamedTuple):
  """State of every sharpness transform.

  Attributes:
    count: updates taken so far (int32); evaluates a ρ schedule.
    rng: raw PRNG key data (uint32 [2]) for ESAM's random weight mask; carried
      by every rule so the state has one structure (stable under ``lax.cond``).
  """
  count: jax.Array
  rng: jax.Array


def sharpness_aware(rule: sharpness.SharpnessRule, rho: ScalarOrSchedule, *,
                    batch_axis_name: Optional[str] = None,
                    global_ascent: bool = False,
                    seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """The generic sharpness transform for ``rule`` with radius ``rho``.

  ``rho`` may be a float or a schedule ``count -> ρ`` (GSAM lets ρ follow the
  learning-rate schedule).
  """
  if global_ascent and batch_axis_name is None:
    raise ValueError('global_ascent=True needs batch_axis_name')
  rule = dataclasses.replace(rule, rho=None, m='global' if global_ascent else 'device')

  def init_fn(params):
    del params
    return SharpnessState(count=jnp.zeros((), jnp.int32),
                          rng=jax.random.key_data(jax.random.PRNGKey(seed)))

  def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
    del extra_args
    _check_call(rule.name, params, grad_fn, batch_axis_name)
    key, next_key = jax.random.split(jax.random.wrap_key_data(state.rng))
    rho_t = rho(state.count) if callable(rho) else rho
    direction, _ = sharpness.sharpness_gradient(
        rule, _checked(grad_fn, params, rule.name), params, updates,
        rng=key, rho=rho_t, axis_name=batch_axis_name)
    if batch_axis_name is not None:
      direction = jax.lax.pmean(direction, batch_axis_name)
    direction = jax.tree.map(lambda d, u: d.astype(u.dtype), direction, updates)
    return direction, SharpnessState(optax.safe_increment(state.count),
                                     jax.random.key_data(next_key))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_call(name: str, params, grad_fn, batch_axis_name: Optional[str]) -> None:
  """What every sharpness transform's ``update`` needs from its caller."""
  if params is None or grad_fn is None:
    raise ValueError(f'the {name} transform needs params and grad_fn=(params, i) -> grads')
  if batch_axis_name is not None:
    _check_per_device(params, batch_axis_name, name)


def _wide_zeros(params):
  """Zeros shaped like ``params`` in at least float32 (a rule's stored direction)."""
  return jax.tree.map(
      lambda p: jnp.zeros(jnp.shape(p), jnp.promote_types(p.dtype, jnp.float32)), params)


def _checked(grad_fn, params, name: str):
  """``grad_fn`` as ``p -> (grads, None)``, refusing grads not shaped like ``params``.

  The check is on the pytree structure, at trace time (no cost in the step).
  Flax NNX is the usual cause: ``nnx.Optimizer`` hands the transform pure
  arrays, so a ``grad_fn`` returning ``nnx.grad``'s ``State`` of ``Param``
  variables does not line up with them (docs/nnx.md shows the working form).
  """
  want = jax.tree.structure(params)

  def fn(p):
    grads = grad_fn(p, 0)
    got = jax.tree.structure(grads)
    if got != want:
      raise ValueError(
          f'transforms.{name}: grad_fn(params, i) returned gradients whose pytree structure '
          f'differs from the params it was given ({_brief(got)} vs {_brief(want)}). It must '
          'return arrays in exactly the params\' structure, e.g. jax.grad of a loss of those '
          'params. With Flax NNX, differentiate a function of the pure params that merges them '
          'into the model (nnx.merge(graphdef, p, rest)) instead of returning nnx.grad\'s '
          'State of Variables; see docs/nnx.md.')
    return grads, None
  return fn


def _brief(treedef, limit: int = 120) -> str:
  text = str(treedef)
  return text if len(text) <= limit else text[:limit] + '…'


def _check_per_device(params, axis_name: str, name: str) -> None:
  """Raise if ``params`` are replicated over ``axis_name`` under shard_map.

  Only where JAX types values as varying/invariant (shard_map with
  ``check_vma``, where the device index itself is varying); under pmap or
  ``check_vma=False`` nothing is typed and gradients are per device anyway.
  """
  if not vma.typed(axis_name):
    return
  if all(axis_name in (vma.varying_axes(p) or ()) for p in jax.tree.leaves(params)):
    return
  raise ValueError(
      f'transforms.{name}(batch_axis_name={axis_name!r}) under shard_map got params that are '
      f'replicated over {axis_name!r}: jax.grad with respect to them sums every device\'s '
      'gradient, so the direction would be n_devices times too large and the ascent not per '
      f'device. Differentiate with respect to jax.lax.pcast(params, {axis_name!r}, '
      "to='varying') and pass those params to update.")


# The factories spell out their keyword arguments (no **kwargs) because
# optax.inject_hyperparams reads the signature to find the hyperparameters.
def sam(rho: ScalarOrSchedule = 0.05, *, batch_axis_name: Optional[str] = None,
        global_ascent: bool = False) -> optax.GradientTransformationExtraArgs:
  """SAM (Foret et al. 2021, arXiv:2010.01412): ε = ρ g/‖g‖, update ∇L(w+ε)."""
  return sharpness_aware(sharpness.SharpnessRule('sam'), rho,
                         batch_axis_name=batch_axis_name, global_ascent=global_ascent)


def asam(rho: ScalarOrSchedule = 0.5, eta: float = 0.01, *,
         biases: str = 'unscaled',
         batch_axis_name: Optional[str] = None,
         global_ascent: bool = False) -> optax.GradientTransformationExtraArgs:
  """ASAM (Kwon et al. 2021, arXiv:2102.11600): ε = ρ T²g/‖Tg‖, T = |w| + η.

  ``biases='unscaled'`` keeps T = 1 on leaves named ``bias``, as the authors'
  code does; ``'scaled'`` rescales them too (``sharpness.asam_perturbation``).
  """
  rule = sharpness.SharpnessRule('asam', asam_eta=eta, asam_biases=biases)
  return sharpness_aware(rule, rho,
                         batch_axis_name=batch_axis_name, global_ascent=global_ascent)


def gsam(rho: ScalarOrSchedule = 0.05, alpha: float = 0.1, *,
         batch_axis_name: Optional[str] = None,
         global_ascent: bool = False) -> optax.GradientTransformationExtraArgs:
  """GSAM (Zhuang et al. 2022, arXiv:2203.08065): update g_p − α g_⊥.

  Pass a schedule as ``rho`` to let ρ follow the learning rate as in the
  paper, ρ_t = ρ_min + (ρ_max − ρ_min)(lr_t − lr_min)/(lr_max − lr_min):
  ``rho=sharpness.rho_following_lr(rho_max, rho_min, lr_schedule, num_steps)``.
  """
  return sharpness_aware(sharpness.SharpnessRule('gsam', gsam_alpha=alpha), rho,
                         batch_axis_name=batch_axis_name, global_ascent=global_ascent)


def esam(rho: ScalarOrSchedule = 0.05, beta: float = 0.5, *,
         batch_axis_name: Optional[str] = None, global_ascent: bool = False,
         seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """ESAM's stochastic weight perturbation (Du et al. 2022, arXiv:2110.03141).

  ``seed`` starts the key of the per-tensor keep mask, carried in the state.
  """
  return sharpness_aware(sharpness.SharpnessRule('esam', esam_beta=beta), rho,
                         batch_axis_name=batch_axis_name, global_ascent=global_ascent,
                         seed=seed)


# ----------------------------------------------------------------------------
# Efficient rules: LookSAM, F-SAM, MSAM (docs/methods.md § 2).
# ----------------------------------------------------------------------------
class LookSAMState(NamedTuple):
  """State of ``looksam``.

  Attributes:
    count: updates taken so far (int32); a full SAM step when count % k == 0.
    g_v: the stored component of the last SAM gradient orthogonal to its
      clean gradient, g_v = g_p − (⟨g_p, g⟩/‖g‖²) g (zeros before the first
      full step); float32 or wider, shaped like the params.
  """
  count: jax.Array
  g_v: optax.Params


def _mean(tree, axis_name):
  return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def _branch_axes(trees, batch_axis_name):
  """Axes both branches of a cond are cast to: those the inputs vary over,
  except the data axis, which outputs are averaged over (invariant)."""
  axes = vma.union(trees) or frozenset()
  return tuple(sorted(axes - {batch_axis_name}))


def looksam(rho: ScalarOrSchedule = 0.05, k: int = 5, alpha: float = 0.7, *,
            batch_axis_name: Optional[str] = None,
            global_ascent: bool = False) -> optax.GradientTransformationExtraArgs:
  """LookSAM (Liu et al. 2022, "Towards Efficient and Scalable Sharpness-Aware
  Minimization", CVPR, arXiv:2203.02714, Alg. 1).

  Every k-th update (count % k == 0) a SAM step: g_p = ∇L(w + ρ g/‖g‖),
  returned as the direction, and g_v = g_p − (⟨g_p, g⟩/‖g‖²) g stored. The
  other updates call no ``grad_fn``: g + α ‖g‖/‖g_v‖ · g_v, one gradient.
  Defaults k = 5 and α = 0.7 are the paper's. Only the taken branch of a
  ``lax.cond`` runs, so k − 1 of every k updates cost one gradient.

  Data parallel (``batch_axis_name``): the direction is averaged over the
  axis; g_v is the average of the devices' g_v (the state stays replicated).
  Per device (default) each device ascends with its own g and combines its
  own g on the cheap steps; ``global_ascent=True`` uses the averaged g and
  g_p everywhere, so the update does not depend on the device count.

    >>> import jax, jax.numpy as jnp, optax
    >>> from gmix_jax import transforms
    >>> loss = lambda w: jnp.sum((w - 3.0) ** 2) + jnp.sum(w ** 4) / 100
    >>> opt = optax.chain(transforms.looksam(rho=0.05, k=5, alpha=0.7), optax.sgd(0.05))
    >>> w = jnp.zeros(2); state = opt.init(w)
    >>> for _ in range(200):
    ...   u, state = opt.update(jax.grad(loss)(w), state, w,
    ...                         grad_fn=lambda p, _: jax.grad(loss)(p))
    ...   w = optax.apply_updates(w, u)
    >>> int(state[0].count), bool(jnp.allclose(jax.grad(loss)(w), 0.0, atol=1e-2))
    (200, True)
  """
  if global_ascent and batch_axis_name is None:
    raise ValueError('global_ascent=True needs batch_axis_name')
  # k may arrive as an array (optax.inject_hyperparams); checked when a number.
  if isinstance(k, (int, float)) and not (int(k) == k and k >= 1):
    raise ValueError(f'looksam: k must be an int >= 1, got {k!r}')
  rule = sharpness.SharpnessRule('looksam', m='global' if global_ascent else 'device')
  glob = (lambda t: _mean(t, batch_axis_name)) if global_ascent else (lambda t: t)

  def init_fn(params):
    return LookSAMState(count=jnp.zeros((), jnp.int32), g_v=_wide_zeros(params))

  def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
    del extra_args
    _check_call('looksam', params, grad_fn, batch_axis_name)
    rho_t = rho(state.count) if callable(rho) else rho
    axes = _branch_axes((updates, params, state), batch_axis_name)

    def full(_):
      d, _ = sharpness.sharpness_gradient(
          rule, _checked(grad_fn, params, rule.name), params, updates, rho=rho_t,
          axis_name=batch_axis_name)
      g_v = _mean(sharpness.orthogonal_component(d, glob(updates)), batch_axis_name)
      g_v = jax.tree.map(lambda v, old: v.astype(old.dtype), g_v, state.g_v)
      return vma.cast_to((_mean(d, batch_axis_name), g_v), axes)

    def cheap(_):
      d = sharpness.looksam_reuse(glob(updates), state.g_v, alpha)
      return vma.cast_to((_mean(d, batch_axis_name), state.g_v), axes)

    direction, g_v = jax.lax.cond(state.count % k == 0, full, cheap, None)
    direction = jax.tree.map(lambda d, u: d.astype(u.dtype), direction, updates)
    return direction, LookSAMState(optax.safe_increment(state.count), g_v)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class FSAMState(NamedTuple):
  """State of ``fsam``.

  Attributes:
    count: updates taken so far (int32); m starts as the first gradient.
    m: the exponential moving average of the clean gradient,
      m ← λ m + (1 − λ) g; float32 or wider, shaped like the params.
  """
  count: jax.Array
  m: optax.Params


def fsam(rho: ScalarOrSchedule = 0.05, sigma: float = 1.0, lam: float = 0.95, *,
         batch_axis_name: Optional[str] = None,
         global_ascent: bool = False) -> optax.GradientTransformationExtraArgs:
  """F-SAM (Li et al. 2024, "Friendly Sharpness-Aware Minimization", CVPR,
  arXiv:2403.12350): the ascent drops the full-gradient component that SAM's
  perturbation carries, estimated by an EMA m of the gradients:
  d = g − σ m, ε = ρ d/‖d‖, update ∇L(w + ε); then m ← λ m + (1 − λ) g.
  On the first update m = g and d = g (the official code). σ = 1 is the
  paper's; λ = 0.95 its official CIFAR run script's (the class default is 0.9).

  Data parallel: m follows the device-averaged g (replicated state); the
  ascent uses each device's g (``global_ascent``: the averaged g).

    >>> import jax, jax.numpy as jnp, optax
    >>> from gmix_jax import transforms
    >>> loss = lambda w: jnp.sum((w - 3.0) ** 2)
    >>> opt = optax.chain(transforms.fsam(rho=0.05, sigma=1.0, lam=0.95), optax.sgd(0.1))
    >>> w = jnp.zeros(2); state = opt.init(w)
    >>> for _ in range(100):
    ...   u, state = opt.update(jax.grad(loss)(w), state, w,
    ...                         grad_fn=lambda p, _: jax.grad(loss)(p))
    ...   w = optax.apply_updates(w, u)
    >>> bool(jnp.allclose(w, 3.0, atol=5e-2))
    True
  """
  if global_ascent and batch_axis_name is None:
    raise ValueError('global_ascent=True needs batch_axis_name')
  rule = sharpness.SharpnessRule('fsam', fsam_sigma=sigma, fsam_lambda=lam,
                                 m='global' if global_ascent else 'device')

  def init_fn(params):
    return FSAMState(count=jnp.zeros((), jnp.int32), m=_wide_zeros(params))

  def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
    del extra_args
    _check_call('fsam', params, grad_fn, batch_axis_name)
    rho_t = rho(state.count) if callable(rho) else rho
    first = state.count == 0
    direction, _ = sharpness.sharpness_gradient(
        rule, _checked(grad_fn, params, rule.name), params, updates, rho=rho_t,
        axis_name=batch_axis_name, state=(state.m, first))
    direction = _mean(direction, batch_axis_name)
    m = sharpness.fsam_momentum(state.m, _mean(updates, batch_axis_name), rule.fsam_lambda, first)
    direction = jax.tree.map(lambda d, u: d.astype(u.dtype), direction, updates)
    return direction, FSAMState(optax.safe_increment(state.count), m)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class MSAMState(NamedTuple):
  """State of ``msam``: the wrapped optimizer's state, whose momentum buffer
  (``trace`` of ``optax.sgd(momentum=μ)``, ``mu`` of adam/adamw) gives ε.

  Attributes:
    inner: the wrapped optimizer's state.
  """
  inner: optax.OptState


def msam(optimizer: optax.GradientTransformation, rho: float = 0.3, *,
         batch_axis_name: Optional[str] = None) -> optax.GradientTransformationExtraArgs:
  """Momentum-SAM (Becker et al. 2024, "Momentum-SAM: Sharpness Aware
  Minimization without Computational Overhead", arXiv:2401.12033).

  MSAM wraps the optimizer it perturbs for, because ε comes from *its*
  momentum v: ε = −ρ v/‖v‖ (the paper's sign: against the momentum), and the
  update is ``optimizer``'s on g̃ = ∇L(w + ε) — one gradient per step, no
  ascent pass. v is read from the wrapped state by name
  (``sharpness.optimizer_momentum``: ``trace`` or ``mu``), so any chain that
  contains ``optax.sgd(momentum=μ)``, ``optax.trace`` or adam/adamw works,
  weight decay included where the chain adds it before the momentum (as the
  paper's SGD does); no second copy of the momentum is kept. v = 0 on the
  first step gives ε = 0. ρ = 0.3 is the official code's default.

  Use it in place of the optimizer:

    >>> import jax, jax.numpy as jnp, optax
    >>> from gmix_jax import transforms
    >>> loss = lambda w: jnp.sum((w - 3.0) ** 2)
    >>> opt = transforms.msam(optax.sgd(0.02, momentum=0.9), rho=0.05)
    >>> w = jnp.zeros(2); state = opt.init(w)
    >>> step = jax.jit(lambda w, s: opt.update(jax.grad(loss)(w), s, w,
    ...                                        grad_fn=lambda p, _: jax.grad(loss)(p)))
    >>> for _ in range(300):
    ...   u, state = step(w, state)
    ...   w = optax.apply_updates(w, u)
    >>> bool(jnp.allclose(w, 3.0, atol=5e-2))
    True

  ``updates`` (the caller's gradient at w) is not used: MSAM's only gradient
  is ``grad_fn`` at w + ε. Under ``jax.jit`` the caller's gradient is then
  dead code and XLA removes it, so the jitted step costs one gradient.
  """
  if callable(rho):
    raise ValueError('msam: rho must be a number (wrap msam in optax.inject_hyperparams to '
                     'change it during training)')

  def init_fn(params):
    inner = optimizer.init(params)
    sharpness.optimizer_momentum(inner)          # a clear error now, not at the first step
    return MSAMState(inner)

  def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
    _check_call('msam', params, grad_fn, batch_axis_name)
    del extra_args
    eps = sharpness.momentum_perturbation(sharpness.optimizer_momentum(state.inner), rho)
    grads, _ = _checked(grad_fn, params, 'msam')(sharpness.add(params, eps))
    grads = _mean(grads, batch_axis_name)
    grads = jax.tree.map(lambda g, u: g.astype(u.dtype), grads, updates)
    new_updates, inner = optimizer.update(grads, state.inner, params)
    return new_updates, MSAMState(inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
