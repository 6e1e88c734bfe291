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
gradient. The math is ``gmix_jax.sharpness``'s, shared with the objectives.

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
    if params is None or grad_fn is None:
      raise ValueError(f'the {rule.name} transform needs params and grad_fn=(params, i) -> grads')
    if batch_axis_name is not None:
      _check_per_device(params, batch_axis_name, rule.name)
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
