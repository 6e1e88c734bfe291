"""Methods as compositions: mixing policy × sharpness rule × partition rule.

Every method (docs/methods.md) is one ``Method`` value, and ``make_objective``
turns it into a pure per-device function

  objective(params, model_state, batch, rng) -> (grads, new_model_state, metrics)

built from ``apply_fn(params, model_state, x, train) -> (logits, new_state)``.

How the axes compose. The batch is first turned into one or two *parts*; a
part is a set of rows (x_r, y_r) with weights w_r and its own sharpness
rule; the objective is Σ_parts Σ_r w_r ℓ_r (weights over all parts sum to 1)
and each part's gradient is taken at its own perturbed point:

  ERM / Mixup / SAM / G-Mix   one part: policy(batch), uniform weights 1/R.
  BG-Mix ``mix_one_subset``    one part: policy(subset A) ∪ clean(rest), weights
                               (|A|/B)/R_A and 1/B — one ε for the whole L_BG.
  BG-Mix ``pair_within_subsets`` one part: policy(S⁺) ∪ policy(S⁻).
  BG-Mix ``sam_on_sensitive``  two parts: G-Mix rows whose first parent is in S⁺
                               (with the sharpness rule), the others (plain).
  DG-Mix                       two parts: policy(S⁺) with ρ⁺, clean S⁻ with ρ⁻
                               (the batches of BG-Mix ``mix_one_subset``, with
                               one perturbation per subset).

Manifold Mixup (Verma et al. 2019) fits the same parts: its rows carry the
unmixed inputs plus λ, partners among the part's rows and the point k, and
the model mixes h_k (``mixing.HiddenMix``); clean rows of a part are λ = 1
rows that are their own partners. Partners must therefore be rows of the
same forward pass, which rules out BG-Mix ``sam_on_sensitive``, DG-Mix with
``partners='whole_batch'`` and m-groups (rejected when the Method is built).

The split (``partition``) comes from per-example sharpness-sensitivity
(``sensitivity``) of the clean examples. BG-/DG-Mix are reconstructed from
the G-Mix abstract (Li & Tang); their knobs are ``PartitionConfig``'s.

BatchNorm: the new model state comes from each part's first (unperturbed)
pass, averaged over parts by their weight; perturbed passes never update it.

Gradient accumulation (``make_objective(..., accumulation_steps=K)``,
docs/methods.md § 6): the parts are built from the whole device batch as above
(same partners, λ and split as K = 1); then each part's gradient function
sweeps its rows in K micro-batches, and the sharpness rule calls that
function at w and at w + ε, so ε comes from the whole accumulated gradient.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp

from gmix_jax import accumulation
from gmix_jax import losses
from gmix_jax import mixing
from gmix_jax import partition
from gmix_jax import sensitivity
from gmix_jax import sharpness
from gmix_jax import vma

PyTree = Any
ApplyFn = Callable[..., tuple[jax.Array, PyTree]]
Objective = Callable[[PyTree, PyTree, Mapping[str, jax.Array], jax.Array],
                     tuple[PyTree, PyTree, dict]]

PARTITION_RULES = ('none', 'binary', 'decomposed')
BGMIX_RULES = ('mix_one_subset', 'pair_within_subsets', 'sam_on_sensitive')
MIX_SUBSETS = ('sensitive', 'insensitive')
PARTNERS = ('within_subset', 'whole_batch')
MIXUPE_VERSIONS = (1, 3)


def mixing_policies() -> tuple[str, ...]:
  """Every ``mixing.policy``: the registry's (``mixing.register``) and its
  variants (``mixing.VARIANTS``: ``mixupe``).

  Read at call time, so a policy registered after import is valid at once.
  """
  return tuple(mixing.policy_knobs())


@dataclasses.dataclass(frozen=True)
class MixingConfig:
  """Mixing policy and its knobs (docs/methods.md § 1; defaults as documented).

  ``alpha`` is Beta(α, α)'s parameter for every policy; ``lam_mode`` is
  mixup's (and manifold's); ``k`` and ``budget`` are multi-mix's. ``mixupe``
  is mixup plus MixupE's term on a second, clean forward pass, weighted by
  ``eta`` and thresholded at ``tau`` (its preset uses α = 2, as the paper
  does); ``mixupe_version`` 3 (default, ⟨f(x), y − p⟩) or 1 (the directional
  derivative J_f(x)(x̄ − x), ``losses.mixupe_term_v1``). ``manifold`` mixes
  hidden states at a point drawn uniformly from ``layers`` (``None``: all
  of the model's points, docs/methods.md § 1; Verma et al.'s PreActResNet runs
  used ``(0, 1, 2)``; a string ``'0,1,2'`` is read as that tuple); its
  preset uses α = 2 (Beta(2, 2), docs/methods.md).
  """
  policy: str = 'none'
  alpha: float = 1.0
  lam_mode: str = 'batch'
  k: int = 5
  budget: str = 'expand'
  eta: float = 0.001
  tau: float = 1.0
  mixupe_version: int = 3
  layers: Optional[tuple] = None

  def __post_init__(self):
    if isinstance(self.layers, str):          # from a config string such as '0,1,2'
      try:
        layers = tuple(int(v) for v in self.layers.replace(' ', '').strip('()[]').split(',') if v)
      except ValueError:
        raise ValueError(f"mixing.layers must be mixing points such as '0,1,2', "
                         f'got {self.layers!r}') from None
      object.__setattr__(self, 'layers', layers)
    elif self.layers is not None:
      object.__setattr__(self, 'layers', tuple(self.layers))
    if self.policy not in mixing_policies():
      raise ValueError(f'mixing.policy must be one of {sorted(mixing_policies())}, '
                       f'got {self.policy!r}')
    if not self.alpha > 0:
      raise ValueError(f'mixing.alpha must be > 0, got {self.alpha}')
    if self.lam_mode not in mixing.LAM_MODES:
      raise ValueError(f'mixing.lam_mode must be one of {mixing.LAM_MODES}, got {self.lam_mode!r}')
    if self.k < 1:
      raise ValueError(f'mixing.k must be >= 1, got {self.k}')
    if not self.eta >= 0:
      raise ValueError(f'mixing.eta must be >= 0, got {self.eta}')
    if self.budget not in mixing.BUDGETS:
      raise ValueError(f'mixing.budget must be one of {mixing.BUDGETS}, got {self.budget!r}')
    if self.mixupe_version not in MIXUPE_VERSIONS:
      raise ValueError(f'mixing.mixupe_version must be one of {MIXUPE_VERSIONS}, '
                       f'got {self.mixupe_version!r}')
    if self.layers is not None and not (
        self.layers and all(isinstance(l, int) and l >= 0 for l in self.layers)):
      raise ValueError('mixing.layers must be None (all of the model\'s points) or a non-empty '
                       f'tuple of mixing points >= 0, got {self.layers!r}')

  def make_policy(self, mix_points: Optional[int] = None) -> mixing.Policy:
    """The registered policy with the knobs it declares; ``manifold``'s points
    (``layers``) are resolved against the model's ``mix_points``."""
    variant = mixing.VARIANTS.get(self.policy)
    name = variant.base if variant else self.policy      # MixupE mixes as mixup does
    kwargs = {knob: getattr(self, knob) for knob in mixing.POLICIES[name].knobs}
    if 'layers' in kwargs:
      layers = self.layers if self.layers is not None else tuple(range(mix_points or 0))
      if mix_points is None or not layers or max(layers) >= mix_points:
        raise ValueError(f'mixing.layers={layers} must lie in [0, {mix_points}): the model '
                         f'has {mix_points} mixing points')
      kwargs['layers'] = layers
    return mixing.get_policy(name, **kwargs)


@dataclasses.dataclass(frozen=True)
class PartitionConfig:
  """The split and the BG-/DG-Mix readings (docs/methods.md § 4, reconstruction).

  Attributes:
    rule: ``none`` | ``binary`` (BG-Mix) | ``decomposed`` (DG-Mix).
    gamma: fraction of the batch in S⁺, k = ⌊γB⌉.
    bgmix_rule: which reading of BG-Mix (``binary`` only).
    mix_subset: which subset is mixed (``mix_one_subset`` and DG-Mix).
    partners: ``within_subset`` (partners from the mixed subset) or
      ``whole_batch`` (``mix_one_subset`` and DG-Mix; ``sam_on_sensitive``
      always mixes as G-Mix does, ``pair_within_subsets`` within subsets).
    rho_plus, rho_minus: DG-Mix's radii; ``None`` = the sharpness ρ.
  """
  rule: str = 'none'
  gamma: float = 0.5
  bgmix_rule: str = 'mix_one_subset'
  mix_subset: str = 'sensitive'
  partners: str = 'within_subset'
  rho_plus: Optional[float] = None
  rho_minus: Optional[float] = None

  def __post_init__(self):
    for field, value, allowed in (('rule', self.rule, PARTITION_RULES),
                                  ('bgmix_rule', self.bgmix_rule, BGMIX_RULES),
                                  ('mix_subset', self.mix_subset, MIX_SUBSETS),
                                  ('partners', self.partners, PARTNERS)):
      if value not in allowed:
        raise ValueError(f'partition.{field} must be one of {allowed}, got {value!r}')
    if not 0.0 <= self.gamma <= 1.0:
      raise ValueError(f'partition.gamma must be in [0, 1], got {self.gamma}')
    for field in ('rho_plus', 'rho_minus'):
      value = getattr(self, field)
      if value is not None and not value >= 0:
        raise ValueError(f'partition.{field} must be >= 0, got {value}')


@dataclasses.dataclass(frozen=True)
class Method:
  """One point of the grid mixing × sharpness × partition."""
  num_classes: int
  mixing: MixingConfig = MixingConfig()
  sharpness: sharpness.SharpnessRule = sharpness.SharpnessRule('none')
  partition: PartitionConfig = PartitionConfig()
  sensitivity: sensitivity.SensitivityConfig = sensitivity.SensitivityConfig()

  def __post_init__(self):
    if self.num_classes < 2:
      raise ValueError(f'num_classes must be >= 2, got {self.num_classes}')
    split = self.partition.rule != 'none'
    if split and self.mixing.policy == 'multimix' and self.mixing.budget == 'fixed':
      raise ValueError("mixing.budget='fixed' cannot be combined with partition.rule="
                       f"{self.partition.rule!r}: the fixed budget mixes only B/K first "
                       "parents, so subsets would lose examples; use budget='expand'")
    two_parts = (self.partition.rule == 'decomposed' or
                 (self.partition.rule == 'binary' and self.partition.bgmix_rule == 'sam_on_sensitive'))
    if two_parts and isinstance(self.sharpness.m, int):
      raise ValueError(f'sharpness.m={self.sharpness.m} (groups of examples) is not defined '
                       'for methods with one perturbation per subset (DG-Mix, BG-Mix '
                       "sam_on_sensitive); use 'device' or 'global'")
    if self.mixing.policy == 'mixupe' and split:
      raise ValueError("mixing.policy='mixupe' cannot be combined with partition.rule="
                       f"{self.partition.rule!r}: MixupE's term is defined on the whole clean "
                       'batch against the whole mixup loss; neither paper defines it per subset')
    if self.mixing.policy == 'mixupe' and isinstance(self.sharpness.m, int):
      raise ValueError(f"sharpness.m={self.sharpness.m} (groups) is not defined for "
                       "mixing.policy='mixupe'; use 'device' or 'global'")
    if self.mixing.policy == 'manifold':
      # The model mixes a row with its partner inside one forward pass, so
      # partners must be rows of the same part (and the same group of m).
      if isinstance(self.sharpness.m, int):
        raise ValueError(f"sharpness.m={self.sharpness.m} (groups) is not defined for "
                         "mixing.policy='manifold': a group would be forwarded without its "
                         "rows' partners; use 'device' or 'global'")
      if self.partition.rule == 'binary' and self.partition.bgmix_rule == 'sam_on_sensitive':
        raise ValueError("mixing.policy='manifold' cannot be combined with partition.bgmix_rule="
                         "'sam_on_sensitive': its two parts are forwarded at different weights "
                         'but mix rows across them; use mix_one_subset or pair_within_subsets')
      if self.partition.rule == 'decomposed' and self.partition.partners == 'whole_batch':
        raise ValueError("mixing.policy='manifold' cannot be combined with partition.rule="
                         "'decomposed' and partners='whole_batch': the mixed subset's partners "
                         "would be in the other subset's forward pass; use 'within_subset'")
    if self.mixing.policy != 'mixupe' and self.mixing.mixupe_version != 3:
      raise ValueError(f'mixing.mixupe_version={self.mixing.mixupe_version} needs '
                       f"mixing.policy='mixupe', got {self.mixing.policy!r}")
    if split and not self.sharpness.active and self.partition.rule == 'decomposed':
      raise ValueError("partition.rule='decomposed' needs a sharpness rule; got sharpness.rule='none'")

  @property
  def keeps_ascent(self) -> bool:
    """Whether the step keeps the direction of its clean gradient for the next
    step's split (``sensitivity.estimator='shared_prev'``, docs/methods.md § 3.2)."""
    return self.partition.rule != 'none' and self.sensitivity.estimator == 'shared_prev'

  @property
  def stateful(self) -> bool:
    """Whether the objective takes and returns state kept between steps
    (``step_state_init``): a stateful sharpness rule's, or ``shared_prev``'s."""
    return self.sharpness.name in sharpness.STATEFUL_RULES or self.keeps_ascent

  @property
  def uses_stale_scores(self) -> bool:
    """Whether the step reads a score table kept in the train state (a split
    with the ``stale`` estimator, refreshed by the trainer)."""
    return self.partition.rule != 'none' and sensitivity.keeps_table(self.sensitivity)

  @property
  def sensitivity_rho(self) -> float:
    if self.sensitivity.rho is not None:
      return self.sensitivity.rho
    # MSAM's ρ is a step along the momentum, not a gradient-ascent radius: the
    # split's per-example probe keeps SAM's radius.
    if not self.sharpness.active or self.sharpness.name == 'msam':
      return sharpness.DEFAULT_RHO['sam']
    return self.sharpness.radius

  def part_rows(self, batch_size: int) -> tuple[int, ...]:
    """Rows of each part the objective builds from a device batch of B (static).

    A part (see ``_build_parts``) is one set of rows with one perturbation;
    multi-mix (``expand``) emits k rows per first parent, the others one.
    """
    per = self.mixing.k if self.mixing.policy == 'multimix' and self.mixing.budget == 'expand' else 1
    cfg = self.partition
    if cfg.rule == 'none':
      return (batch_size * per,)
    k = partition.num_sensitive(cfg.gamma, batch_size)
    if cfg.rule == 'binary' and cfg.bgmix_rule == 'pair_within_subsets':
      return (batch_size * per,)
    if cfg.rule == 'binary' and cfg.bgmix_rule == 'sam_on_sensitive':
      return tuple(n for n in (k * per, (batch_size - k) * per) if n)
    mixed = k if cfg.mix_subset == 'sensitive' else batch_size - k
    if cfg.rule == 'binary':                       # mix_one_subset: one part
      return (mixed * per + batch_size - mixed,)
    return tuple(n for n in (mixed * per, batch_size - mixed) if n)     # DG-Mix

  def check_batch(self, batch_size: int, accumulation_steps: int = 1) -> None:
    """Static checks that need the per-device batch size B and the number of
    micro-batches K (``make_objective``'s ``accumulation_steps``), before any jit."""
    k_acc = accumulation.check_steps(accumulation_steps)
    m = self.sharpness.m
    if k_acc > 1:
      if batch_size % k_acc:
        raise ValueError(f'accumulation_steps={k_acc} must divide the per-device batch '
                         f'{batch_size}; allowed: {accumulation.divisors(batch_size)}')
      sizes = self.part_rows(batch_size)
      if any(n % k_acc for n in sizes):
        allowed = [d for d in accumulation.divisors(batch_size) if all(n % d == 0 for n in sizes)]
        raise ValueError(f'accumulation_steps={k_acc} must divide the rows of each part '
                         f'{list(sizes)} (per-device batch {batch_size}, partition.gamma='
                         f'{self.partition.gamma}); allowed: {allowed}')
      if self.mixing.policy == 'manifold':
        raise ValueError(f"accumulation_steps={k_acc} cannot be combined with mixing.policy="
                         "'manifold': Manifold Mixup mixes a row with its partner inside one "
                         'forward pass, and partners may lie in another micro-batch; use '
                         'accumulation_steps=1')
    rows = batch_size * (self.mixing.k if self.mixing.policy == 'multimix'
                         and self.mixing.budget == 'expand' else 1)
    if isinstance(m, int) and rows % m:
      raise ValueError(f'sharpness.m={m} must divide the rows per device ({rows})')
    if isinstance(m, int) and (rows // k_acc) % m:
      raise ValueError(f'sharpness.m={m} must divide the rows per micro-batch ({rows // k_acc} '
                       f'= {rows} rows / accumulation_steps={k_acc}): a group of m examples '
                       'must lie inside one micro-batch')
    if self.mixing.policy == 'multimix' and self.mixing.budget == 'fixed' and batch_size % self.mixing.k:
      raise ValueError(f'mixing.k={self.mixing.k} must divide the per-device batch {batch_size}')
    chunk = self.sensitivity.chunk
    if self.partition.rule != 'none' and chunk and batch_size % chunk:
      raise ValueError(f'sensitivity.chunk={chunk} must divide the per-device batch {batch_size}')


# Named compositions. Adding a method is one line here (and a config file).
PRESETS: dict[str, dict] = {
    'erm': {},
    'mixup': dict(mixing=MixingConfig('mixup')),
    'cutmix': dict(mixing=MixingConfig('cutmix')),
    'multimix': dict(mixing=MixingConfig('multimix')),
    'mixupe': dict(mixing=MixingConfig('mixupe', alpha=2.0)),
    'mixupe_v1': dict(mixing=MixingConfig('mixupe', alpha=2.0, mixupe_version=1)),
    'manifold_mixup': dict(mixing=MixingConfig('manifold', alpha=2.0)),
    'sam': dict(sharpness=sharpness.SharpnessRule('sam')),
    'asam': dict(sharpness=sharpness.SharpnessRule('asam')),
    'gsam': dict(sharpness=sharpness.SharpnessRule('gsam')),
    'esam': dict(sharpness=sharpness.SharpnessRule('esam')),
    'gmix': dict(mixing=MixingConfig('mixup'), sharpness=sharpness.SharpnessRule('sam')),
    # BG-Mix ranks by the `shared` estimator: in the ablation (experiments/RESULTS.md)
    # it was more accurate than `per_example` beyond 2 s.e., at 1.5x SAM's step
    # cost instead of 6x (docs/cost.md, "Cost per step"). DG-Mix showed no such gain.
    'bgmix': dict(mixing=MixingConfig('mixup'), sharpness=sharpness.SharpnessRule('sam'),
                  partition=PartitionConfig('binary'),
                  sensitivity=sensitivity.SensitivityConfig('shared')),
    'dgmix': dict(mixing=MixingConfig('mixup'), sharpness=sharpness.SharpnessRule('sam'),
                  partition=PartitionConfig('decomposed')),
    'manifold_gmix': dict(mixing=MixingConfig('manifold', alpha=2.0),
                          sharpness=sharpness.SharpnessRule('sam')),
}


def get_method(name: str, num_classes: int, **overrides) -> Method:
  """A preset by name, with any of its four configs replaced or amended.

  Each override is a config instance (replaces the preset's) or a dict of
  field values (applied on top of the preset's), e.g.
  ``get_method('bgmix', 10, partition={'gamma': 0.25})``.
  """
  if name not in PRESETS:
    raise ValueError(f'method.name must be one of {sorted(PRESETS)}, got {name!r}')
  fields = {'mixing': MixingConfig(), 'sharpness': sharpness.SharpnessRule('none'),
            'partition': PartitionConfig(), 'sensitivity': sensitivity.SensitivityConfig(),
            **PRESETS[name]}
  for key, value in overrides.items():
    if key not in fields:
      raise ValueError(f'method overrides must be among {sorted(fields)}, got {key!r}')
    if isinstance(value, Mapping):
      unknown = set(value) - {f.name for f in dataclasses.fields(fields[key])}
      if unknown:
        raise ValueError(f'unknown method.{key} field(s) {sorted(unknown)}; valid: '
                         f'{[f.name for f in dataclasses.fields(fields[key])]}')
      value = dataclasses.replace(fields[key], **value)
    fields[key] = value
  return Method(num_classes=num_classes, **fields)


# ----------------------------------------------------------------------------
# Parts: rows with weights and a sharpness rule.
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class _Part:
  x: jax.Array
  y: jax.Array
  w: jax.Array          # per-row weights; all parts together sum to 1
  share: float          # Σ w (static), for averaging BatchNorm state
  rule: sharpness.SharpnessRule
  rho: float
  clean: Optional[tuple] = None   # (x, y) of the clean batch, for MixupE's term
  mix: Optional[mixing.HiddenMix] = None   # Manifold Mixup: mixed inside the model


class _Rows(NamedTuple):
  """Rows of a part: inputs, labels, weights and, for Manifold Mixup, how the
  model mixes them (λ_r, partner(r) among these rows, the point k)."""
  x: jax.Array
  y: jax.Array
  w: jax.Array
  lam: Optional[jax.Array] = None
  partner: Optional[jax.Array] = None
  layer: Optional[jax.Array] = None

  def part(self, share: float, rule, rho, clean=None) -> _Part:
    mix = None if self.lam is None else mixing.HiddenMix(self.layer, self.lam, self.partner)
    return _Part(self.x, self.y, self.w, share, rule, rho, clean, mix)


def _concat(a: Optional[_Rows], b: Optional[_Rows]) -> _Rows:
  """Rows of a followed by rows of b, either of which may be absent.

  With Manifold Mixup, rows without a mix become λ = 1 rows that are their
  own partners (they pass the model's mixing point unchanged), b's partners
  are shifted past a's rows, and the part keeps a's point k (one forward
  pass mixes at one point).
  """
  if a is None or b is None:
    return a if b is None else b
  x, y, w = (jnp.concatenate([u, v]) for u, v in zip(a[:3], b[:3]))
  if a.lam is None and b.lam is None:
    return _Rows(x, y, w)
  def mix_of(r: _Rows):
    n = r.x.shape[0]
    if r.lam is None:
      return jnp.ones((n,), jnp.float32), jnp.arange(n)
    return r.lam, r.partner
  (lam_a, part_a), (lam_b, part_b) = mix_of(a), mix_of(b)
  return _Rows(x, y, w, jnp.concatenate([lam_a, lam_b]),
               jnp.concatenate([part_a, part_b + a.x.shape[0]]),
               a.layer if a.layer is not None else b.layer)


def _rows(x, y, share: float) -> Optional[_Rows]:
  """(x, y, uniform weights summing to ``share``), or None if empty."""
  if x.shape[0] == 0:
    return None
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  return _Rows(x, y, jnp.full((x.shape[0],), share / x.shape[0], dtype))


def _mixed_rows(m, share: float, stop: Optional[int] = None) -> Optional[_Rows]:
  """The first ``stop`` rows of a policy's output, weights summing to ``share``.

  For Manifold Mixup the rows keep λ, the partners (indices into the rows of
  ``m``: with ``stop`` they are valid only once the rest of ``m``'s rows
  follow, see ``_build_parts``) and the point.
  """
  rows = _rows(m.x[:stop], m.y[:stop], share)
  if rows is None or not isinstance(m, mixing.ManifoldMixed):
    return rows
  return rows._replace(lam=m.lam[:stop], partner=m.index_b[:stop], layer=m.layer)


def _mix_by_first_parent(policy, rng, x, y, first: jax.Array, rest: jax.Array):
  """Mix the whole batch, rows whose first parent is in ``first`` first.

  The policy sees the batch reordered as [first, rest], so partners come from
  the whole batch, and the rows whose first parent is in ``first`` are the
  leading ``cut`` rows — a static count, since mixup, cutmix, multi-mix
  (expand) and manifold emit R/B consecutive rows per first parent. Returns
  (the policy's output, cut).
  """
  order = jnp.concatenate([first, rest])
  m = policy(rng, x[order], y[order])
  return m, first.shape[0] * (m.x.shape[0] // x.shape[0])


def _build_parts(method: Method, policy, x, y, split, rng) -> list[_Part]:
  b = x.shape[0]
  rule = method.sharpness
  rho = rule.radius
  part_cfg = method.partition
  if split is None:                                  # ERM, Mixup, SAM, G-Mix
    m = policy(rng, x, y)
    clean = (x, y) if method.mixing.policy == 'mixupe' else None
    return [_mixed_rows(m, 1.0).part(1.0, rule, rho, clean)]

  plus, minus = split.sensitive, split.insensitive
  k = plus.shape[0]
  whole = part_cfg.partners == 'whole_batch'

  if part_cfg.rule == 'binary' and part_cfg.bgmix_rule == 'pair_within_subsets':
    rows = None
    for key, idx in ((rng, plus), (jax.random.fold_in(rng, 1), minus)):
      if idx.shape[0]:
        rows = _concat(rows, _mixed_rows(policy(key, x[idx], y[idx]), idx.shape[0] / b))
    return [rows.part(1.0, rule, rho)]

  if part_cfg.rule == 'binary' and part_cfg.bgmix_rule == 'sam_on_sensitive':
    # All rows mixed as in G-Mix; rows whose first parent is sensitive get
    # the sharpness rule, the others their plain gradient (ESAM's selection).
    m, cut = _mix_by_first_parent(policy, rng, x, y, plus, minus)
    parts = []
    if k:
      parts.append(_rows(m.x[:cut], m.y[:cut], k / b).part(k / b, rule, rho))
    if k < b:
      parts.append(_rows(m.x[cut:], m.y[cut:], (b - k) / b).part(
          (b - k) / b, sharpness.SharpnessRule('none'), 0.0))
    return parts

  # BG-Mix mix_one_subset and DG-Mix: subset A mixed, subset C clean.
  a_idx, c_idx = (plus, minus) if part_cfg.mix_subset == 'sensitive' else (minus, plus)
  mixed = None
  if a_idx.shape[0] and whole:
    # Manifold: the partners index [A; C] = the rows of `mixed` followed by
    # `clean` below, i.e. exactly the concatenated BG-Mix part.
    m, cut = _mix_by_first_parent(policy, rng, x, y, a_idx, c_idx)
    mixed = _mixed_rows(m, a_idx.shape[0] / b, cut)
  elif a_idx.shape[0]:
    mixed = _mixed_rows(policy(rng, x[a_idx], y[a_idx]), a_idx.shape[0] / b)
  clean = _rows(x[c_idx], y[c_idx], c_idx.shape[0] / b)
  if part_cfg.rule == 'binary':
    return [_concat(mixed, clean).part(1.0, rule, rho)]

  # DG-Mix: one perturbation per subset, ρ⁺ for S⁺ and ρ⁻ for S⁻.
  rho_of = {'sensitive': part_cfg.rho_plus, 'insensitive': part_cfg.rho_minus}
  other = 'insensitive' if part_cfg.mix_subset == 'sensitive' else 'sensitive'
  parts = []
  for rows, idx, which in ((mixed, a_idx, part_cfg.mix_subset), (clean, c_idx, other)):
    if rows is not None:
      r = rho if rho_of[which] is None else rho_of[which]
      parts.append(rows.part(idx.shape[0] / b, rule, r))
  return parts


def _average_states(states: list[PyTree], shares: list[float]) -> PyTree:
  """Σ share·state over float leaves (running statistics are linear in the batch mean)."""
  if len(states) == 1:
    return states[0]
  total = sum(shares)

  def avg(*leaves):
    if not jnp.issubdtype(leaves[0].dtype, jnp.floating):
      return leaves[0]
    return sum(s / total * l for s, l in zip(shares, leaves)).astype(leaves[0].dtype)
  return jax.tree.map(avg, *states)


def _mixupe_term(apply_fn, p, model_state, rows, mix_cfg: MixingConfig, frac: float):
  """MixupE's signed term on a clean forward pass of ``rows``: L = L_mix − η·(this).

  ``frac`` = (clean rows here)/(clean rows of the device batch), so that the
  terms of the micro-batches add up to the whole batch's (1/B) Σ_i.
  """
  x, y = rows['cx'], rows['cy']
  if mix_cfg.mixupe_version == 3:          # L = L_mix − ηR, r_i = ⟨f(x_i), y_i − p_i⟩
    clean_logits, _ = apply_fn(p, model_state, x, True)
    return frac * losses.mixupe_term(clean_logits, y, mix_cfg.alpha, mix_cfg.tau)
  # Version 1: L = L_mix + ηR₁ (the official code's sign), with the directional
  # derivative J_f(x_i) δ_i, δ_i = x̄ − x_i, from one jvp (δ from the whole
  # clean device batch, see _part_rows).
  clean_logits, jd = jax.jvp(lambda v: apply_fn(p, model_state, v, True)[0], (x,), (rows['delta'],))
  return -frac * losses.mixupe_term_v1(clean_logits, jd, y, mix_cfg.alpha, mix_cfg.tau)


def _part_rows(part: _Part, mix_cfg: MixingConfig) -> dict:
  """The part's per-row arrays, all with the leading row axis the sweep splits."""
  rows = {'x': part.x, 'y': part.y, 'w': part.w}
  if part.clean is not None:
    rows['cx'], rows['cy'] = part.clean
    if mix_cfg.mixupe_version == 1:
      # x̄ is the mean of the clean per-device batch (the official code uses the
      # training-set mean, which the objective does not see; the batch mean
      # estimates it), taken before any micro-batch split.
      cx = part.clean[0]
      rows['delta'] = jax.lax.stop_gradient(jnp.mean(cx, axis=0, keepdims=True) - cx)
  return rows


def _part_gradient(apply_fn, params, model_state, part: _Part, rng, axis_name,
                   mix_cfg: MixingConfig, rho, accumulation_steps: int = 1,
                   rule_state: Optional[dict] = None,
                   loss_fn: Callable = losses.weighted_loss):
  """Gradient of Σ_r w_r ℓ_r for one part, at its own perturbed point of radius ``rho``.

  Returns ``(direction, clean gradient, new model state, loss, perturbed loss)``.
  ``rule_state`` carries what a rule reads from the step's state: MSAM's
  ``'momentum'`` v, F-SAM's ``'m'`` (its gradient EMA) and ``'first'``.

  The part's gradient function sweeps its rows in ``accumulation_steps``
  micro-batches (``accumulation``); the sharpness rule calls it at w and at
  w + ε, so with K > 1 ε is formed once from the whole accumulated g.
  """
  # Manifold Mixup: the model mixes its hidden state; the perturbed pass uses
  # the same point, λ and partners.
  mix_kw = {} if part.mix is None else {'mix': part.mix}
  mixupe = part.clean is not None
  clean_rows = part.clean[0].shape[0] if mixupe else 1

  def micro_loss(p, rows):
    """(the additive objective of these rows, (their mixup loss, new model state))."""
    logits, new_state = apply_fn(p, model_state, rows['x'], True, **mix_kw)
    loss = loss_fn(logits, rows['y'], rows['w'])
    if not mixupe:
      return loss, (loss, new_state)
    term = _mixupe_term(apply_fn, p, model_state, rows, mix_cfg,
                        rows['cx'].shape[0] / clean_rows)
    return loss - mix_cfg.eta * term, (loss, new_state)

  def grad_fn(p, rows, k):
    """(∇, (objective value, model state)) of ``rows``, swept in k micro-batches."""
    def one(rows_j):
      (total, (mix, state)), g = jax.value_and_grad(micro_loss, has_aux=True)(p, rows_j)
      return (g, total, mix), state
    (g, total, mix), states = accumulation.accumulate(one, rows, k, like=p)
    if mixupe:
      # MixupE's rescaling L ← sg(|L_mix|/|L|)·L on the whole batch's values
      # (the value then equals L_mix; only the gradient changes).
      c = jax.lax.stop_gradient(jnp.abs(mix) / jnp.abs(total))
      g, total = sharpness.scale(g, c), c * total
    return g, (total, accumulation.mean_state(states))

  def one_group(rows, key, k):
    if part.rule.name == 'msam':
      # MSAM: one gradient, at w − ρ v/‖v‖; BatchNorm statistics come from
      # that pass (there is no clean one), as in the paper's code.
      eps = sharpness.momentum_perturbation(rule_state['momentum'], rho)
      g, (loss, new_state) = grad_fn(sharpness.add(params, eps), rows, k)
      return g, g, new_state, loss, loss
    g, (loss, new_state) = grad_fn(params, rows, k)
    if not part.rule.active:
      return g, g, new_state, loss, loss
    state = None
    if part.rule.name == 'fsam':
      # m estimates the gradient of the whole (unit-weight) batch; these rows'
      # gradient is Σ w_r ∇ℓ_r, so m enters scaled by Σ w_r (1 for one part).
      state = (sharpness.scale(rule_state['m'], jnp.sum(rows['w'])), rule_state['first'])
    d, (loss_p, _) = sharpness.sharpness_gradient(
        part.rule, lambda p: grad_fn(p, rows, k), params, g, rng=key, rho=rho,
        axis_name=axis_name, state=state)
    return d, g, new_state, loss, loss_p

  rows = _part_rows(part, mix_cfg)
  m = part.rule.m
  if not (part.rule.active and isinstance(m, int)) or m == part.x.shape[0]:
    return one_group(rows, rng, accumulation_steps)
  # m-sharpness: groups of m rows, each with its own ε; the part's gradient is
  # the sum of the groups' (the weights already carry the 1/R). Groups lie
  # inside a micro-batch (check_batch), so the sweep runs whole groups.
  groups = part.x.shape[0] // m
  grouped = {name: a.reshape((groups, m) + a.shape[1:]) for name, a in rows.items()}
  grouped['key'] = jax.random.split(rng, groups)

  def micro(gs):
    rows_j = {name: a for name, a in gs.items() if name != 'key'}
    d, g, states, loss, loss_p = jax.vmap(lambda r, kk: one_group(r, kk, 1))(rows_j, gs['key'])
    total = lambda t: jax.tree.map(lambda x: jnp.sum(x, 0), t)
    return ((total(d), total(g), jnp.sum(loss), jnp.sum(loss_p)),
            accumulation.mean_state(states))

  (d, g, loss, loss_p), states = accumulation.accumulate(
      micro, grouped, accumulation_steps, like=params)
  return d, g, accumulation.mean_state(states), loss, loss_p


def make_objective(method: Method, apply_fn: ApplyFn, *,
                   axis_name: Optional[str] = None, lr_schedule=None,
                   num_steps: Optional[int] = None,
                   accumulation_steps: int = 1,
                   looksam_phase: Optional[str] = None,
                   loss_fn: Callable = losses.weighted_loss) -> Objective:
  """The per-device objective of ``method``.

  Args:
    method: the composition (see ``get_method``).
    apply_fn: ``apply_fn(params, model_state, x, train) -> (logits, new_state)``.
      For ``mixing.policy='manifold'`` it must also take ``mix=`` (a
      ``mixing.HiddenMix``, applied at each of the model's mixing points) and
      declare their number as ``apply_fn.mix_points``; ``models.make_apply_fn``
      does both for every model of this library.
    axis_name: the data-parallel axis; used only by ``sharpness.m='global'``
      (the all-reduce of the ascent gradient). The final gradient is *not*
      averaged here: the train step does that, in one place.
    lr_schedule, num_steps: the optimizer's learning rate (a schedule
      ``step -> lr`` or a float) and the run's length; needed only by
      ``sharpness.rho_schedule='lr'`` (GSAM's ρ_t = ρ_min + (ρ − ρ_min)
      (lr_t − lr_min)/(lr_max − lr_min), applied to every part's ρ, DG-Mix's
      ρ± included), which then reads the step from ``batch['step']``.
    accumulation_steps: K, the number of micro-batches each part's rows are
      swept in (docs/methods.md § 6; ``accumulation``): a memory/time trade that
      leaves the update unchanged (K = 1's, to float tolerance) for models
      whose forward pass does not couple rows. Mixing, the sensitivity
      split and the sharpness rule act on the whole device batch; scores
      are computed micro-batch by micro-batch. BatchNorm batch statistics
      are per micro-batch (running statistics average the micro-batches'
      updates), the documented exception. K is an argument here, not a
      ``Method`` field, because it does not change the method: it must
      divide each part's rows and integer m groups must fit in a
      micro-batch (``Method.check_batch``); Manifold Mixup, which pairs rows
      inside one forward pass, is rejected with K > 1.
    looksam_phase: LookSAM only. ``None``: the objective chooses the full
      or the cheap step from ``batch['step']`` with a ``lax.cond``;
      ``'full'`` / ``'cheap'``: it is that step only. XLA on CPU runs a
      gradient inside a conditional an order of magnitude slower than
      outside one, so the trainer compiles the two phases and picks one on
      the host by the step number (``train.place``).
    loss_fn: ``loss_fn(outputs, targets, weights) -> Σ_r w_r ℓ_r`` of a part's
      rows, linear in the (mixed) targets; the default is the soft
      cross-entropy. A task with another loss passes its own: the
      contrastive one (``tasks.moco``) scores the rows' embeddings against
      keys, with instance targets in place of class labels, so every mixing
      policy and sharpness rule applies to it unchanged.

  Returns:
    ``objective(params, model_state, batch, rng) -> (grads, new_state, metrics)``;
    for a method that keeps state (``Method.stateful``: a stateful rule,
    ``sharpness.STATEFUL_RULES`` LookSAM and F-SAM, or the ``shared_prev``
    estimator) ``objective(params, model_state, batch, rng, extra) ->
    (grads, new_state, metrics, extra_grads)`` with ``extra`` from
    ``step_state_init`` and the update ``step_state_update``
    (``parallel.make_per_device_step``'s ``extra_update``); MSAM reads
    ``batch['momentum']`` (``msam_inputs``).
    with ``batch = {'x': [B, ...], 'y': int [B] or soft [B, C]}`` plus
    ``'score'`` ``[B]`` for the ``stale`` estimator and ``'step'`` (int
    scalar) for ``rho_schedule='lr'``. ``metrics`` holds
    ``loss`` (the objective at w), ``perturbed_loss`` (at the perturbed
    points) and, for partitioned methods, ``sensitivity`` (mean s_i) and
    ``sensitive_minus_rest`` (mean s over S⁺ minus mean over S⁻).
  """
  if looksam_phase not in (None, 'full', 'cheap'):
    raise ValueError(f"looksam_phase must be None, 'full' or 'cheap', got {looksam_phase!r}")
  if looksam_phase is not None and method.sharpness.name != 'looksam':
    raise ValueError(f"looksam_phase={looksam_phase!r} needs sharpness.rule='looksam', "
                     f'got {method.sharpness.name!r}')
  if method.mixing.policy == 'manifold' and getattr(apply_fn, 'mix_points', None) is None:
    raise ValueError("mixing.policy='manifold' needs a model that mixes hidden states: an "
                     'apply_fn(params, model_state, x, train, mix=None) that applies mix(j, h) at '
                     'each of its mixing points j = 0..P-1 and declares apply_fn.mix_points = P '
                     '(models.make_apply_fn does this for every model of gmix_jax.models)')
  k_acc = accumulation.check_steps(accumulation_steps)
  policy = method.mixing.make_policy(getattr(apply_fn, 'mix_points', None))
  split_on = method.partition.rule != 'none'
  scheduled = method.sharpness.rho_schedule == 'lr'
  lr_position = None                  # None: ρ constant (also for a constant LR)
  if scheduled:
    if lr_schedule is None or num_steps is None:
      raise ValueError("sharpness.rho_schedule='lr' needs make_objective(..., lr_schedule=, "
                       'num_steps=): the learning rate that rho follows')
    lr_position = sharpness.lr_fraction(lr_schedule, num_steps)

  def objective(params, model_state, batch, rng, extra=None):
    x = batch['x']
    y = losses.as_soft_labels(batch['y'], method.num_classes)
    b = x.shape[0]
    method.check_batch(b, k_acc)
    k_mix, k_sharp = jax.random.split(rng)
    metrics = {}
    split = None
    if method.keeps_ascent and (extra is None or 'ascent' not in extra):
      raise ValueError("sensitivity.estimator='shared_prev' keeps the previous step's ascent "
                       "direction: call the objective with its state (step_state_init)")
    if split_on:
      s = sensitivity.scores(method.sensitivity, apply_fn, params, model_state, x, y,
                             method.sensitivity_rho, batch.get('score'), micro_batches=k_acc,
                             direction=extra['ascent'] if method.keeps_ascent else None)
      split = partition.top_k_split(s, partition.num_sensitive(method.partition.gamma, b))
      metrics['sensitivity'] = jnp.mean(s)
      k = split.sensitive.shape[0]
      if 0 < k < b:
        metrics['sensitive_minus_rest'] = (jnp.mean(s[split.sensitive]) -
                                           jnp.mean(s[split.insensitive]))
    parts = _build_parts(method, policy, x, y, split, k_mix)
    u = None
    if lr_position is not None:
      if 'step' not in batch:
        raise ValueError("sharpness.rho_schedule='lr' needs the step count as batch['step'] "
                         '(parallel.make_per_device_step supplies it)')
      u = lr_position(batch['step'])
      metrics['rho'] = sharpness.scheduled_rho(method.sharpness.radius,
                                               method.sharpness.rho_min, u)
    elif scheduled:
      metrics['rho'] = jnp.asarray(method.sharpness.radius, jnp.float32)
    rule = method.sharpness
    rule_state = {}
    if rule.name == 'msam':
      if 'momentum' not in batch:
        raise ValueError("sharpness.rule='msam' needs the optimizer's momentum as "
                         "batch['momentum'] (parallel.make_per_device_step(..., "
                         'objective_inputs=msam_inputs) supplies it)')
      rule_state['momentum'] = batch['momentum']
    if rule.name in sharpness.STATEFUL_RULES:
      if extra is None or 'step' not in batch:
        raise ValueError(f'sharpness.rule={rule.name!r} keeps state: call the objective with '
                         "its state (step_state_init) and batch['step']")
    if rule.name == 'fsam':
      rule_state.update(m=extra['m'], first=batch['step'] == 0)

    def run(perturb: bool):
      """(Σ directions, Σ clean gradients, model state, loss, perturbed loss) over parts."""
      d_sum = g_sum = None
      states, shares = [], []
      loss = loss_p = 0.0
      for i, part in enumerate(parts):
        if not perturb:
          part = dataclasses.replace(part, rule=sharpness.SharpnessRule('none'))
        rho = part.rho if u is None else sharpness.scheduled_rho(part.rho, rule.rho_min, u)
        d, g, state, l, lp = _part_gradient(apply_fn, params, model_state, part,
                                            jax.random.fold_in(k_sharp, i), axis_name,
                                            method.mixing, rho, k_acc, rule_state,
                                            loss_fn)
        d_sum = d if d_sum is None else sharpness.add(d_sum, d)
        g_sum = g if g_sum is None else sharpness.add(g_sum, g)
        states.append(state)
        shares.append(part.share)
        loss, loss_p = loss + l, loss_p + lp
      return d_sum, g_sum, _average_states(states, shares), loss, loss_p

    if rule.name == 'looksam':
      grads, new_state, loss, loss_p, extra_grads, clean = _looksam(
          run, rule, extra, batch['step'], axis_name, looksam_phase)
    else:
      grads, clean, new_state, loss, loss_p = run(True)
      # F-SAM's m follows the device-averaged clean gradient: each device
      # hands its own, averaged with the update in the step's one pmean.
      extra_grads = {'g': clean} if rule.name == 'fsam' else None
    if method.keeps_ascent:
      # The clean gradient of this step's objective (SAM's ascent direction):
      # averaged over devices by the step's one pmean, normalised by
      # step_state_update, read by the next step's split.
      extra_grads = {**(extra_grads or {}), 'ascent': clean}
    metrics['loss'] = loss
    if rule.active:
      metrics['perturbed_loss'] = loss_p
    if method.stateful:
      return grads, new_state, metrics, extra_grads
    return grads, new_state, metrics

  return objective


def _looksam(run, rule: sharpness.SharpnessRule, extra, step, axis_name, phase=None):
  """LookSAM (Liu et al. 2022, Alg. 1): a SAM step every k-th step, else one
  clean gradient plus α‖g‖/‖g_v‖ · g_v with the stored g_v (``lax.cond``:
  only the taken branch runs).

  Per device (``m='device'``) the full step stores this device's
  g_v = g_p − (⟨g_p, g⟩/‖g‖²) g, averaged over devices by the step's one
  pmean (``extra_update`` keeps it); the cheap step uses this device's g.
  With ``m='global'`` g and g_p are the device averages, so the update does
  not depend on the device count. Returns (direction, model state, loss,
  perturbed loss, this device's g_v or zeros, this device's clean g).
  ``phase`` ('full' / 'cheap') runs that step only.
  """
  glob = rule.m == 'global'
  mean = (lambda t: jax.lax.pmean(t, axis_name)) if glob else (lambda t: t)

  def full(_):
    d, g, state, loss, loss_p = run(True)
    return _varying((d, state, loss, loss_p, {'g_v': sharpness.orthogonal_component(
        mean(d), mean(g))}, g), axis_name)

  def cheap(_):
    _, g, state, loss, _ = run(False)
    d = sharpness.looksam_reuse(mean(g), extra['g_v'], rule.looksam_alpha)
    zeros = jax.tree.map(jnp.zeros_like, extra['g_v'])
    return _varying((d, state, loss, loss, {'g_v': zeros}, g), axis_name)

  if phase is not None:                       # chosen on the host: no conditional
    return (full if phase == 'full' else cheap)(None)
  return jax.lax.cond(step % rule.looksam_k == 0, full, cheap, None)


def _varying(tree, axis_name: Optional[str]):
  """``tree`` typed device-varying over ``axis_name`` (under shard_map with
  ``check_vma``): the two branches of a ``lax.cond`` must agree, and a
  device average is invariant where a per-device value is not."""
  if axis_name is None or not vma.typed(axis_name):
    return tree
  return vma.cast_to(tree, (axis_name,))


def rule_state_init(rule: sharpness.SharpnessRule, params) -> Optional[dict]:
  """The state a stateful rule carries between steps (``TrainState.extra``):
  LookSAM's g_v, F-SAM's m, zeros at step 0; ``None`` for the other rules."""
  if rule.name not in sharpness.STATEFUL_RULES:
    return None
  zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.promote_types(p.dtype, jnp.float32)),
                       params)
  return {'g_v': zeros} if rule.name == 'looksam' else {'m': zeros}


def rule_state_update(rule: sharpness.SharpnessRule):
  """``extra_update(extra, averaged_extra_grads, params, model_state, step)``
  for ``parallel.make_per_device_step``: LookSAM keeps the averaged g_v of a
  full step (every k-th) and its old g_v otherwise; F-SAM moves m towards the
  averaged clean gradient, m ← λ m + (1 − λ) ḡ (m = ḡ at step 0)."""
  def update(extra, averaged, params, model_state, step):
    del params, model_state
    if rule.name == 'looksam':
      full = step % rule.looksam_k == 0
      return {'g_v': jax.tree.map(lambda new, old: jnp.where(full, new, old),
                                  averaged['g_v'], extra['g_v'])}
    return {'m': sharpness.fsam_momentum(extra['m'], averaged['g'], rule.fsam_lambda,
                                         step == 0)}
  return update


def rule_step_kwargs(rule: sharpness.SharpnessRule, params) -> tuple[Optional[dict], dict]:
  """``(extra, kwargs)`` for a stateful rule's step: ``extra`` is the initial
  ``TrainState.extra`` (``parallel.create_train_state(..., extra=extra)``)
  and ``kwargs`` go to ``parallel.make_per_device_step`` (``extra_update``
  for LookSAM / F-SAM, ``objective_inputs`` for MSAM); ``(None, {})`` for
  the other rules."""
  extra = rule_state_init(rule, params)
  kwargs = {}
  if extra is not None:
    kwargs['extra_update'] = rule_state_update(rule)
  inputs = rule_driver(rule).objective_inputs
  if inputs is not None:
    kwargs['objective_inputs'] = inputs
  return extra, kwargs


def step_state_init(method: Method, params) -> Optional[dict]:
  """The state a composed method carries between steps (``TrainState.extra``):
  its sharpness rule's (``rule_state_init``) and, for
  ``sensitivity.estimator='shared_prev'``, ``'ascent'``: the unit direction
  of the previous step's clean gradient, zeros before the first step (ε = 0:
  every s_i = 0, and the split is the batch's first k examples, which the
  shuffled batch makes a random split). ``None`` when there is none."""
  extra = rule_state_init(method.sharpness, params) or {}
  if method.keeps_ascent:
    extra['ascent'] = jax.tree.map(
        lambda p: jnp.zeros(jnp.shape(p), jnp.promote_types(p.dtype, jnp.float32)), params)
  return extra or None


def step_state_update(method: Method):
  """``extra_update`` for ``step_state_init``'s state: the rule's part by
  ``rule_state_update``; ``'ascent'`` ← ḡ/(‖ḡ‖ + eps_norm) with ḡ the
  device average of the step's clean gradients (the objective's
  ``extra_grads['ascent']``), normalised in the stored dtype (at least float32)."""
  rule_update = (rule_state_update(method.sharpness)
                 if method.sharpness.name in sharpness.STATEFUL_RULES else None)

  def update(extra, averaged, params, model_state, step):
    new = {}
    if rule_update is not None:
      new.update(rule_update(extra, averaged, params, model_state, step))
    if method.keeps_ascent:
      # Normalised in the stored (at least float32) dtype, not a bf16 gradient's.
      new['ascent'] = sharpness.normalize(jax.tree.map(
          lambda g, old: g.astype(old.dtype), averaged['ascent'], extra['ascent']))
    return new
  return update


def step_kwargs(method: Method, params) -> tuple[Optional[dict], dict]:
  """``rule_step_kwargs`` for a whole composed method: ``(extra, kwargs)`` with
  ``step_state_init``'s state and ``step_state_update`` as ``extra_update``
  (a stateful rule, ``shared_prev``), MSAM's ``objective_inputs``."""
  extra = step_state_init(method, params)
  kwargs = {}
  if extra is not None:
    kwargs['extra_update'] = step_state_update(method)
  inputs = rule_driver(method.sharpness).objective_inputs
  if inputs is not None:
    kwargs['objective_inputs'] = inputs
  return extra, kwargs


def msam_inputs(state) -> dict:
  """``objective_inputs`` for MSAM: the optimizer's momentum v from the
  train state's ``opt_state`` (``sharpness.optimizer_momentum``)."""
  return {'momentum': sharpness.optimizer_momentum(state.opt_state)}


# ----------------------------------------------------------------------------
# How the trainer drives a rule's step (beyond calling its objective).
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RuleDriver:
  """What a step needs from the trainer for one sharpness rule.

  Attributes:
    objective_inputs: ``state -> dict`` added to the objective's batch
      (``parallel.make_per_device_step``), or None.
    phases: names of separately compiled programs (``make_objective(...,
      looksam_phase=NAME)``); empty: one program.
    phase: host-side ``step -> one of phases`` (only with phases).
    keeps_state: the rule carries state in ``TrainState.extra``
      (``rule_state_init`` / ``rule_state_update``).
    needs_momentum: the rule reads the optimizer's momentum buffer, so a
      momentum-free SGD is refused before anything compiles.
  """
  objective_inputs: Optional[Callable] = None
  phases: tuple[str, ...] = ()
  phase: Optional[Callable[[int], str]] = None
  keeps_state: bool = False
  needs_momentum: bool = False

  @property
  def plain(self) -> bool:
    """Nothing but the objective: any task's step can drive the rule."""
    return not (self.objective_inputs or self.phases or self.keeps_state)


def _looksam_driver(rule: sharpness.SharpnessRule) -> RuleDriver:
  # Two programs chosen on the host by the step number, not a lax.cond: XLA on
  # CPU runs a gradient inside a conditional an order of magnitude slower.
  k = rule.looksam_k
  return RuleDriver(phases=('full', 'cheap'), keeps_state=True,
                    phase=lambda step: 'full' if step % k == 0 else 'cheap')


# rule name -> (rule -> RuleDriver); a rule not listed is plain.
RULE_DRIVERS: dict[str, Callable[[sharpness.SharpnessRule], RuleDriver]] = {
    'looksam': _looksam_driver,
    'fsam': lambda rule: RuleDriver(keeps_state=True),
    'msam': lambda rule: RuleDriver(objective_inputs=msam_inputs, needs_momentum=True),
}


def rule_driver(rule: sharpness.SharpnessRule) -> RuleDriver:
  """The ``RuleDriver`` of ``rule`` (``RULE_DRIVERS``; plain when unlisted)."""
  make = RULE_DRIVERS.get(rule.name)
  return make(rule) if make is not None else RuleDriver()


def plain_rules() -> list[str]:
  """The active rules any task's step can drive."""
  return [r for r in sharpness.RULES
          if r != 'none' and rule_driver(sharpness.SharpnessRule(r)).plain]
