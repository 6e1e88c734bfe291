"""Sharpness rules: the pure math of SAM and its variants (docs/methods.md § 2).

A sharpness rule turns the gradient g = ∇L(w) into a perturbation ε, and the
gradient at the perturbed point g_p = ∇L(w + ε) into the update direction:

  SAM  (Foret et al. 2021)   ε = ρ g / (‖g‖ + eps_norm);                update g_p
  ASAM (Kwon et al. 2021)    T = |w| + η (T = 1 on biases, as the authors' code);
                             ε = ρ T² g / (‖T g‖ + eps_norm);               update g_p
  GSAM (Zhuang et al. 2022)  ε as SAM; g = g_∥ + g_⊥ relative to g_p;  update g_p − α g_⊥
  ESAM-SWP (Du et al. 2022)  each tensor kept with probability β, m ∈ {0,1};
                             ε = (ρ/β) m⊙g / (‖m⊙g‖ + eps_norm);         update g_p
  LookSAM (Liu et al. 2022)  every k-th step SAM, storing g_v = g_p − (⟨g_p, g⟩/‖g‖²) g;
                             other steps g + α ‖g‖/‖g_v‖ · g_v (one gradient)
  F-SAM (Li et al. 2024)     d = g − σ m, m ← λ m + (1−λ) g (EMA of g);
                             ε = ρ d / (‖d‖ + eps_norm);                 update g_p
  MSAM (Becker et al. 2024)  ε = −ρ v / (‖v‖ + eps_norm), v the optimizer's momentum;
                             update ∇L(w + ε) (one gradient, no clean pass)

‖·‖ is the global L2 norm over the whole pytree and eps_norm = 1e-12 keeps a
zero gradient finite (optax's ``contrib.normalize`` divides by a zero norm).

These functions are shared by the objectives (``gmix_jax.objectives``) and
the Optax transforms (``gmix_jax.transforms``): the math lives only here.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
EPS_NORM = 1e-12

RULES = ('none', 'sam', 'asam', 'gsam', 'esam', 'looksam', 'fsam', 'msam')
# ρ defaults differ per rule: ASAM's ρ lives in the rescaled space T⁻¹ε; MSAM's
# 0.3 is the official code's default (its ε follows the momentum, not g).
DEFAULT_RHO = {'none': 0.0, 'sam': 0.05, 'asam': 0.5, 'gsam': 0.05, 'esam': 0.05,
               'looksam': 0.05, 'fsam': 0.05, 'msam': 0.3}
# Rules whose state is a vector carried from step to step (TrainState.extra in
# the trainer): LookSAM's g_v, F-SAM's gradient EMA m. MSAM reads the optimizer's.
STATEFUL_RULES = ('looksam', 'fsam')
# The knobs only one rule reads (the others are warned about when set).
RULE_KNOBS = {'asam': ('asam_eta', 'asam_biases'), 'gsam': ('gsam_alpha',),
              'esam': ('esam_beta',), 'looksam': ('looksam_k', 'looksam_alpha'),
              'fsam': ('fsam_sigma', 'fsam_lambda')}
M_MODES = ('device', 'global')
ASAM_BIASES = ('unscaled', 'scaled')
RHO_SCHEDULES = ('constant', 'lr')


def _wide(x: jax.Array) -> jax.Array:
  """x in at least float32, so bf16 leaves do not lose the norm to rounding."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def tree_dot(a: PyTree, b: PyTree) -> jax.Array:
  """⟨a, b⟩ over all leaves, accumulated in (at least) float32."""
  leaves = jax.tree.leaves(jax.tree.map(lambda x, y: jnp.sum(_wide(x) * _wide(y)), a, b))
  return sum(leaves, jnp.zeros((), jnp.float32))


def global_norm(tree: PyTree) -> jax.Array:
  """‖tree‖₂ over all leaves, accumulated in (at least) float32."""
  return jnp.sqrt(sum((jnp.sum(jnp.square(_wide(x))) for x in jax.tree.leaves(tree)),
                      jnp.zeros((), jnp.float32)))


def scale(tree: PyTree, s: jax.Array) -> PyTree:
  """s·tree, keeping each leaf's dtype."""
  return jax.tree.map(lambda x: (s * x).astype(x.dtype), tree)


def normalize(tree: PyTree, eps: float = EPS_NORM) -> PyTree:
  """tree / (‖tree‖ + eps): a unit vector, or exactly zero for a zero tree."""
  return scale(tree, 1.0 / (global_norm(tree) + eps))


def add(a: PyTree, b: PyTree) -> PyTree:
  return jax.tree.map(lambda x, y: (x + y).astype(x.dtype), a, b)


def sam_perturbation(grads: PyTree, rho, eps: float = EPS_NORM) -> PyTree:
  """ε = ρ g / (‖g‖ + eps)."""
  return scale(grads, rho / (global_norm(grads) + eps))


def is_bias(path) -> bool:
  """Whether a pytree path names a bias: its last key is ``bias`` (Flax linen
  and NNX naming; an NNX ``State``'s trailing ``value`` attribute is skipped)."""
  names = [getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', None))) for k in path]
  names = [n for n in names if n not in ('value', 'raw_value')]
  return bool(names) and names[-1] == 'bias'


def asam_perturbation(grads: PyTree, params: PyTree, rho, eta: float = 0.01,
                      eps: float = EPS_NORM, biases: str = 'unscaled') -> PyTree:
  """ASAM's adaptive ε = ρ T² g / (‖T g‖ + eps) with T = |w| + η elementwise.

  ``biases='unscaled'`` (default) keeps T = 1 on bias leaves (``is_bias``), as
  the authors' implementation does (SamsungLabs/ASAM: only parameters named
  ``weight`` are rescaled, so biases move by the plain ρ g/‖T g‖);
  ``'scaled'`` applies T = |b| + η to biases too (with biases at 0 that
  perturbs them η² = 10⁻⁴ times less).
  """
  if biases not in ASAM_BIASES:
    raise ValueError(f'sharpness.asam_biases must be one of {ASAM_BIASES}, got {biases!r}')
  unscaled = biases == 'unscaled'
  t = jax.tree_util.tree_map_with_path(
      lambda path, w: jnp.ones_like(w) if unscaled and is_bias(path) else jnp.abs(w) + eta,
      params)
  tg = jax.tree.map(lambda ti, g: ti * g, t, grads)
  norm = global_norm(tg)
  return jax.tree.map(lambda ti, g: (rho * ti * ti * g / (norm + eps)).astype(g.dtype),
                      t, grads)


def esam_swp_perturbation(rng: jax.Array, grads: PyTree, rho, beta: float = 0.5,
                          eps: float = EPS_NORM) -> PyTree:
  """ESAM's stochastic weight perturbation.

  Each parameter tensor is kept in the ascent with probability β (one
  Bernoulli draw per leaf); ε is the SAM perturbation of the kept part,
  scaled by 1/β: ε = (ρ/β) m⊙g / (‖m⊙g‖ + eps). β = 1 is SAM.
  """
  leaves, treedef = jax.tree.flatten(grads)
  keep = jax.random.bernoulli(rng, beta, (len(leaves),))
  kept = treedef.unflatten([g * keep[i].astype(g.dtype) for i, g in enumerate(leaves)])
  return sam_perturbation(kept, rho / beta, eps)


def gsam_combine(grads: PyTree, perturbed_grads: PyTree, alpha,
                 eps: float = EPS_NORM) -> PyTree:
  """GSAM's update g_p − α g_⊥, where g_⊥ = g − (⟨g, g_p⟩/‖g_p‖²) g_p."""
  coef = tree_dot(grads, perturbed_grads) / (jnp.square(global_norm(perturbed_grads)) + eps)
  return jax.tree.map(
      lambda g, gp: (gp - alpha * (g - coef * gp)).astype(gp.dtype),
      grads, perturbed_grads)


def orthogonal_component(perturbed_grads: PyTree, grads: PyTree,
                         eps: float = EPS_NORM) -> PyTree:
  """LookSAM's g_v = g_p − (⟨g_p, g⟩/‖g‖²) g: the part of the SAM gradient
  orthogonal to the clean one (Liu et al. 2022, Eq. 5).

  When g_p ∥ g (e.g. an isotropic quadratic) the subtraction leaves only
  rounding error, of size ~ε_dtype‖g_p‖, whose direction is noise that the
  cheap step would scale up to α‖g‖. A g_v below 64 ε_dtype ‖g_p‖ is
  therefore returned as exactly zero (the cheap step is then g).
  """
  coef = tree_dot(perturbed_grads, grads) / (jnp.square(global_norm(grads)) + eps)
  g_v = jax.tree.map(lambda gp, g: (gp - coef * g).astype(gp.dtype), perturbed_grads, grads)
  leaves = jax.tree.leaves(perturbed_grads)
  tiny = 64 * max(float(jnp.finfo(jnp.promote_types(l.dtype, jnp.float32)).eps) for l in leaves)
  keep = global_norm(g_v) > tiny * global_norm(perturbed_grads)
  return jax.tree.map(lambda v: jnp.where(keep, v, jnp.zeros_like(v)), g_v)


def looksam_reuse(grads: PyTree, g_v: PyTree, alpha, eps: float = EPS_NORM) -> PyTree:
  """LookSAM's cheap step: g + α ‖g‖/‖g_v‖ · g_v (g_v = 0 gives g)."""
  return add(grads, scale(g_v, alpha * global_norm(grads) / (global_norm(g_v) + eps)))


def fsam_direction(grads: PyTree, m: PyTree, sigma, first) -> PyTree:
  """F-SAM's ascent direction d = g − σ m, or g on the first step (m not yet
  an average: the official code starts m at the first gradient)."""
  keep = 1.0 - jnp.asarray(first, jnp.float32)
  return jax.tree.map(lambda g, mi: (g - keep * sigma * mi).astype(g.dtype), grads, m)


def fsam_momentum(m: PyTree, grads: PyTree, lam, first) -> PyTree:
  """F-SAM's m ← λ m + (1 − λ) g, or m = g on the first step."""
  lam = jnp.where(first, 0.0, lam)
  return jax.tree.map(lambda mi, g: (lam * mi + (1.0 - lam) * g).astype(mi.dtype), m, grads)


def momentum_perturbation(momentum: PyTree, rho, eps: float = EPS_NORM) -> PyTree:
  """MSAM's ε = −ρ v/(‖v‖ + eps), against the momentum (Becker et al. 2024,
  Alg. 1: w̃ = w − ρ v/‖v‖); v = 0 (the first step) gives ε = 0."""
  return scale(momentum, -rho / (global_norm(momentum) + eps))


def optimizer_momentum(opt_state: PyTree) -> PyTree:
  """The momentum buffer inside an Optax state, found by name: ``trace``
  (``optax.sgd(momentum=μ)``, ``optax.trace``: v ← μ v + g) or ``mu`` (Adam's
  first moment). Raises a ``ValueError`` when the state has neither."""
  for name in ('trace', 'mu'):
    v = optax.tree.get(opt_state, name)
    if v is not None:
      return v
  raise ValueError("sharpness.rule='msam' perturbs along the optimizer's momentum, but the "
                   "optimizer state has none ('trace' of optax.sgd(momentum=...) or 'mu' of "
                   'adam/adamw): use optimizer.momentum > 0 with sgd, or adam/adamw')


@dataclasses.dataclass(frozen=True)
class SharpnessRule:
  """A sharpness rule and its knobs (docs/methods.md § 2).

  Attributes:
    name: one of ``RULES``; ``'none'`` means a plain gradient (one pass).
    rho: perturbation radius ρ; ``None`` takes ``DEFAULT_RHO[name]``
      (SAM/GSAM/ESAM 0.05, ASAM 0.5).
    asam_eta: ASAM's η in T = |w| + η.
    asam_biases: ``'unscaled'`` (T = 1 on biases, the authors' code; default)
      or ``'scaled'`` (T = |b| + η on biases too).
    gsam_alpha: GSAM's α (α = 0 is SAM). 0.1 is within the range the GSAM
      paper tunes over; not given by docs/methods.md.
    esam_beta: ESAM-SWP's keep probability β (β = 1 is SAM); 0.5 as in ESAM.
    m: the group the ascent gradient is computed on (m-sharpness):
      ``'device'`` (the per-device batch, default), ``'global'`` (the ascent
      gradient is all-reduced over the data axis first) or a positive int m
      (groups of m examples, each with its own ε; m must divide the batch).
    rho_schedule: ``'constant'`` (ρ every step) or ``'lr'`` (GSAM, Zhuang et
      al. 2022: ρ_t = ρ_min + (ρ − ρ_min)(lr_t − lr_min)/(lr_max − lr_min),
      ρ following the learning-rate schedule; the objective then needs the
      schedule, see ``objectives.make_objective``).
    rho_min: ρ_min of ``rho_schedule='lr'`` (ρ is ρ_max); 0 by default (not
      given by docs/methods.md).
    looksam_k: LookSAM's period k: a full SAM step every k steps (5, the
      paper's default).
    looksam_alpha: LookSAM's α, weight of the reused g_v (0.7, the paper's).
    fsam_sigma: F-SAM's σ in d = g − σ m (1, the paper's).
    fsam_lambda: F-SAM's EMA factor λ of m (0.95, the official run script's).
  """
  name: str = 'sam'
  rho: Optional[float] = None
  asam_eta: float = 0.01
  gsam_alpha: float = 0.1
  esam_beta: float = 0.5
  m: Union[str, int] = 'device'
  rho_schedule: str = 'constant'
  rho_min: float = 0.0
  asam_biases: str = 'unscaled'
  looksam_k: int = 5
  looksam_alpha: float = 0.7
  fsam_sigma: float = 1.0
  fsam_lambda: float = 0.95

  def __post_init__(self):
    # Numeric knobs are checked when they are Python numbers; arrays (e.g.
    # from optax.inject_hyperparams) are the caller's responsibility.
    number = lambda v: isinstance(v, (int, float))
    if self.name not in RULES:
      raise ValueError(f'sharpness.rule must be one of {RULES}, got {self.name!r}')
    if number(self.rho) and not self.rho >= 0:
      raise ValueError(f'sharpness.rho must be >= 0, got {self.rho}')
    if number(self.esam_beta) and not 0 < self.esam_beta <= 1:
      raise ValueError(f'sharpness.esam_beta must be in (0, 1], got {self.esam_beta}')
    if number(self.asam_eta) and self.asam_eta < 0:
      raise ValueError(f'sharpness.asam_eta must be >= 0, got {self.asam_eta}')
    if self.asam_biases not in ASAM_BIASES:
      raise ValueError(f'sharpness.asam_biases must be one of {ASAM_BIASES}, '
                       f'got {self.asam_biases!r}')
    if isinstance(self.m, str):
      if self.m not in M_MODES:
        raise ValueError(f"sharpness.m must be 'device', 'global' or a positive int, got {self.m!r}")
    elif not (isinstance(self.m, int) and self.m > 0):
      raise ValueError(f"sharpness.m must be 'device', 'global' or a positive int, got {self.m!r}")
    if not (isinstance(self.looksam_k, int) and not isinstance(self.looksam_k, bool)
            and self.looksam_k >= 1):
      raise ValueError(f'sharpness.looksam_k must be an int >= 1, got {self.looksam_k!r}')
    if number(self.looksam_alpha) and not self.looksam_alpha >= 0:
      raise ValueError(f'sharpness.looksam_alpha must be >= 0, got {self.looksam_alpha}')
    if number(self.fsam_sigma) and not self.fsam_sigma >= 0:
      raise ValueError(f'sharpness.fsam_sigma must be >= 0, got {self.fsam_sigma}')
    if number(self.fsam_lambda) and not 0 <= self.fsam_lambda < 1:
      raise ValueError(f'sharpness.fsam_lambda must be in [0, 1), got {self.fsam_lambda}')
    if self.name == 'msam' and self.m != 'device':
      raise ValueError(f"sharpness.m={self.m!r} has no meaning for sharpness.rule='msam': its ε "
                       "comes from the optimizer's momentum, not from an ascent gradient; "
                       "leave sharpness.m='device'")
    if self.rho_schedule not in RHO_SCHEDULES:
      raise ValueError(f'sharpness.rho_schedule must be one of {RHO_SCHEDULES}, '
                       f'got {self.rho_schedule!r}')
    if number(self.rho_min) and (self.rho is None or number(self.rho)) and \
        not 0 <= self.rho_min <= self.radius:
      raise ValueError(f'sharpness.rho_min must be in [0, rho={self.radius}], got {self.rho_min}')
    if self.rho_schedule == 'lr' and not self.active:
      raise ValueError("sharpness.rho_schedule='lr' needs a sharpness rule; got sharpness.rule='none'")

  @property
  def active(self) -> bool:
    return self.name != 'none'

  @property
  def radius(self) -> float:
    return DEFAULT_RHO[self.name] if self.rho is None else self.rho


def lr_fraction(lr_schedule, num_steps: int) -> Optional[Callable[[jax.Array], jax.Array]]:
  """u_t = (lr_t − lr_min)/(lr_max − lr_min) ∈ [0, 1], GSAM's LR position.

  lr_min and lr_max are the schedule's extremes over steps 0 … num_steps−1,
  found once on the host when this is built (not inside the step). A
  constant learning rate (a float, or a flat schedule) returns ``None``:
  ρ_t = ρ_max every step, i.e. plain GSAM (the formula's 0/0 read as u = 1).
  """
  if not callable(lr_schedule):
    return None
  lrs = np.asarray(jax.vmap(lr_schedule)(jnp.arange(max(int(num_steps), 1))), np.float64)
  lr_min, lr_max = float(lrs.min()), float(lrs.max())
  if lr_max - lr_min <= 1e-12 * max(abs(lr_max), 1e-30):
    return None
  return lambda step: ((lr_schedule(step) - lr_min) / (lr_max - lr_min)).astype(jnp.float32)


def scheduled_rho(rho_max, rho_min, u):
  """GSAM's ρ_t = ρ_min + (ρ_max − ρ_min) u_t (Zhuang et al. 2022, § 5)."""
  return rho_min + (rho_max - rho_min) * u


def rho_following_lr(rho_max: float, rho_min: float, lr_schedule,
                     num_steps: int) -> Callable[[jax.Array], jax.Array]:
  """The schedule ``step -> ρ_t`` of GSAM: ρ follows the learning rate.

  Pass it as ``rho`` to ``transforms.gsam`` (or any sharpness transform).
  """
  u = lr_fraction(lr_schedule, num_steps)
  if u is None:
    return lambda step: jnp.asarray(rho_max, jnp.float32)
  return lambda step: scheduled_rho(rho_max, rho_min, u(step))


def perturbation(rule: SharpnessRule, grads: PyTree, params: PyTree,
                 rng: Optional[jax.Array] = None, rho=None, state=None) -> PyTree:
  """ε for ``rule`` from the ascent gradient; ``rho`` overrides ``rule.radius``.

  ``state`` is F-SAM's ``(m, first)``: its EMA m and whether this is the first step.
  """
  rho = rule.radius if rho is None else rho
  if rule.name in ('sam', 'gsam', 'looksam'):
    return sam_perturbation(grads, rho)
  if rule.name == 'fsam':
    if state is None:
      raise ValueError("sharpness.rule='fsam' needs its state (m, first)")
    m, first = state
    return sam_perturbation(fsam_direction(grads, m, rule.fsam_sigma, first), rho)
  if rule.name == 'asam':
    return asam_perturbation(grads, params, rho, rule.asam_eta, biases=rule.asam_biases)
  if rule.name == 'esam':
    if rng is None:
      raise ValueError("sharpness.rule='esam' needs an rng for its weight mask")
    return esam_swp_perturbation(rng, grads, rho, rule.esam_beta)
  raise ValueError(f'sharpness rule {rule.name!r} has no perturbation')


def combine(rule: SharpnessRule, grads: PyTree, perturbed_grads: PyTree) -> PyTree:
  """The update direction from g = ∇L(w) and g_p = ∇L(w + ε)."""
  if rule.name == 'gsam':
    return gsam_combine(grads, perturbed_grads, rule.gsam_alpha)
  return perturbed_grads


def sharpness_gradient(rule: SharpnessRule,
                       grad_fn: Callable[[PyTree], tuple[PyTree, Any]],
                       params: PyTree, grads: PyTree, *,
                       rng: Optional[jax.Array] = None, rho=None,
                       axis_name: Optional[str] = None, state=None) -> tuple[PyTree, Any]:
  """One ascent-descent step: returns (update direction, aux at w + ε).

  Args:
    rule: the sharpness rule.
    grad_fn: ``params -> (grads, aux)`` of the same loss that produced
      ``grads``; called once, at w + ε.
    params: w.
    grads: g = ∇L(w), already computed by the caller (its first pass also
      gives BatchNorm state and metrics, so it is not recomputed here).
    rng: for ESAM's mask.
    rho: overrides ``rule.radius`` (e.g. a schedule value).
    state: F-SAM's ``(m, first)`` (``perturbation``).
    axis_name: when ``rule.m == 'global'``, the ascent gradient is averaged
      over this axis before ε is formed, ESAM's key is device 0's on every
      device and g_p is averaged before GSAM's decomposition, so the
      direction is the same on every device and equals the one-device
      direction on the whole batch (``grad_fn``'s aux stays per device).
  """
  if rule.name == 'msam':
    raise ValueError("sharpness.rule='msam' takes no ascent step: perturb with "
                     'momentum_perturbation and take one gradient there')
  if rule.m != 'global':
    eps = perturbation(rule, grads, params, rng, rho, state)
    perturbed_grads, aux = grad_fn(add(params, eps))
    return combine(rule, grads, perturbed_grads), aux
  # Global m: every quantity of the rule is the global one (docs/methods.md § 2),
  # so the result does not depend on how the batch is spread over devices.
  if axis_name is None:
    raise ValueError("sharpness.m='global' needs the data-parallel axis name")
  grads = jax.lax.pmean(grads, axis_name)
  if rng is not None:
    rng = shared_key(rng, axis_name)
  eps = perturbation(rule, grads, params, rng, rho, state)
  perturbed_grads, aux = grad_fn(add(params, eps))
  # GSAM decomposes against the averaged g_p: the mean of per-device GSAM
  # updates is not the GSAM update of the mean gradients.
  perturbed_grads = jax.lax.pmean(perturbed_grads, axis_name)
  return combine(rule, grads, perturbed_grads), aux


def shared_key(rng: jax.Array, axis_name: str) -> jax.Array:
  """Device 0's key on every device of ``axis_name`` (a two-word all-reduce).

  Keys reaching a rule are per device (the step folds the device index in),
  but global m needs one ESAM keep-mask, hence one key. Device 0's key is the
  one a single-device run draws, so 1 device and n devices use the same mask.
  """
  typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
  data = jax.random.key_data(rng) if typed else rng
  first = jax.lax.axis_index(axis_name) == 0
  data = jax.lax.psum(jnp.where(first, data, jnp.zeros_like(data)), axis_name)
  return jax.random.wrap_key_data(data) if typed else data
