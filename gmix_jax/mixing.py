"""Mixing policies: pure functions ``(rng, x, y) -> Mixed``.

A mixing policy turns a batch (inputs ``x`` of any rank ``[B, ...]``, soft
labels ``y`` ``[B, C]``) into a batch of virtual examples. Every policy
returns the same record, ``Mixed``, so objectives can weight, gather and
split mixed examples without knowing which policy made them:

  x̃_r = λ_r x_{a(r)} + (1 − λ_r) x_{b(r)},   ỹ_r = λ_r y_{a(r)} + (1 − λ_r) y_{b(r)}

(cutmix replaces the interpolation of inputs by a box paste, with λ_r the
fraction of pixels kept from ``x_{a(r)}``).

Policies (docs/methods.md § 1):
  * ``identity``  — no mixing (ERM).
  * ``mixup``     — Zhang et al. 2018, "mixup: Beyond Empirical Risk Minimization".
  * ``cutmix``    — Yun et al. 2019, "CutMix", area-corrected λ.
  * ``multimix``  — "Mixup Augmentation with Multiple Interpolations": K sorted
                    λ per pair, ``expand`` or ``fixed`` budget.
  * ``manifold``  — Verma et al. 2019, "Manifold Mixup": mixup's λ and partners,
                    applied by the model to its hidden state at a sampled
                    mixing point (``HiddenMix``); the inputs stay unmixed.

Adding a policy = one function here + one ``register`` line at the bottom
of this file (or a ``register`` call in your own code, before the config is
validated): the registry is the one place validation, ``--help`` and the
trainer read. ``VARIANTS`` lists the policies that mix as a registered one
and add a loss term elsewhere (``mixupe``); ``policy_knobs`` and
``image_policies`` are the tables the config checks read.

Labels: ``y`` is one-hot or soft, ``[B, C]`` float. Integer class labels
``[B]`` are accepted only with ``num_classes=C`` (then one-hot encoded);
without it a policy refuses them, since interpolating class indices means
nothing (and broadcasting ``[B]`` against λ would silently give a ``[B, B]``
"label").
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp

LAM_MODES = ('batch', 'example')
BUDGETS = ('expand', 'fixed')


class Mixed(NamedTuple):
  """A mixed batch of R rows.

  Attributes:
    x: mixed inputs ``[R, ...]``.
    y: mixed soft labels ``[R, C]``.
    lam: weight of the first parent per row ``[R]``.
    index_a: first parent of each row, an index into the input batch ``[R]``.
    index_b: partner of each row ``[R]``.
  """
  x: jax.Array
  y: jax.Array
  lam: jax.Array
  index_a: jax.Array
  index_b: jax.Array


class ManifoldMixed(NamedTuple):
  """``Mixed`` of the ``manifold`` policy, plus the sampled mixing point.

  ``x`` holds the *unmixed* inputs (rows ``index_a``): the model mixes its
  hidden state at point ``layer`` (an int32 scalar) by ``hidden_mix(m)``.
  """
  x: jax.Array
  y: jax.Array
  lam: jax.Array
  index_a: jax.Array
  index_b: jax.Array
  layer: jax.Array


Policy = Callable[[jax.Array, jax.Array, jax.Array], Mixed]


def sample_lam(rng: jax.Array, alpha: float, shape=()) -> jax.Array:
  """λ ~ Beta(α, α) in float32."""
  return jax.random.beta(rng, alpha, alpha, shape=shape, dtype=jnp.float32)


def _per_row(lam: jax.Array, x: jax.Array) -> jax.Array:
  """Reshape ``[R]`` to ``[R, 1, ..., 1]`` so it broadcasts against ``x``."""
  return lam.reshape(lam.shape + (1,) * (x.ndim - 1)).astype(x.dtype)


def soft_labels(y: jax.Array, num_classes: Optional[int] = None) -> jax.Array:
  """``y`` as ``[B, C]`` soft labels; integer labels need ``num_classes``."""
  if jnp.issubdtype(y.dtype, jnp.integer) or jnp.issubdtype(y.dtype, jnp.bool_):
    if num_classes is None:
      raise ValueError(
          f'mixing expects one-hot or soft labels y of shape [B, C] (float), got {y.dtype} '
          f'labels of shape {tuple(y.shape)}; pass num_classes=C to one-hot integer labels')
    if y.ndim != 1:
      raise ValueError(f'integer labels must have shape [B], got {tuple(y.shape)}')
    return jax.nn.one_hot(y, num_classes, dtype=jnp.float32)
  if y.ndim != 2:
    raise ValueError(f'mixing expects labels y of shape [B, C], got shape {tuple(y.shape)}')
  if num_classes is not None and y.shape[-1] != num_classes:
    raise ValueError(f'labels have {y.shape[-1]} classes but num_classes={num_classes}')
  return y


def interpolate(x: jax.Array, y: jax.Array, lam: jax.Array,
                index_a: jax.Array, index_b: jax.Array) -> Mixed:
  """Rows ``λ_r z_{a(r)} + (1−λ_r) z_{b(r)}`` for inputs and labels alike."""
  xa, xb = x[index_a], x[index_b]
  ya, yb = y[index_a], y[index_b]
  x_mix = _per_row(lam, xa) * xa + (1 - _per_row(lam, xa)) * xb
  lam_y = lam[:, None].astype(y.dtype)
  return Mixed(x_mix, lam_y * ya + (1 - lam_y) * yb, lam, index_a, index_b)


def identity(rng: jax.Array, x: jax.Array, y: jax.Array, *,
             num_classes: Optional[int] = None) -> Mixed:
  """No mixing: λ = 1, every example is its own partner."""
  del rng
  y = soft_labels(y, num_classes)
  idx = jnp.arange(x.shape[0])
  return Mixed(x, y, jnp.ones((x.shape[0],), jnp.float32), idx, idx)


def mixup(rng: jax.Array, x: jax.Array, y: jax.Array, *, alpha: float = 1.0,
          lam_mode: str = 'batch', num_classes: Optional[int] = None) -> Mixed:
  """Mixup with a random-permutation partner.

  λ ~ Beta(α, α) — one for the batch (``lam_mode='batch'``, the paper's form)
  or one per example (``'example'``); π is a uniform random permutation and
  x̃_i = λ x_i + (1−λ) x_π(i), ỹ_i = λ y_i + (1−λ) y_π(i).
  """
  y = soft_labels(y, num_classes)
  lam, perm = _mixup_draw(rng, x.shape[0], alpha, lam_mode)
  return interpolate(x, y, lam, jnp.arange(x.shape[0]), perm)


def _mixup_draw(rng: jax.Array, b: int, alpha: float, lam_mode: str):
  """Mixup's (λ [B], π [B]) from ``rng``; shared by ``mixup`` and ``manifold``."""
  if lam_mode not in LAM_MODES:
    raise ValueError(f'mixup.lam_mode must be one of {LAM_MODES}, got {lam_mode!r}')
  k_lam, k_perm = jax.random.split(rng)
  shape = () if lam_mode == 'batch' else (b,)
  lam = jnp.broadcast_to(sample_lam(k_lam, alpha, shape), (b,))
  return lam, jax.random.permutation(k_perm, b)


def box_mask(rng: jax.Array, lam: jax.Array, height: int, width: int) -> jax.Array:
  """CutMix box: 1 inside a √(1−λ)H × √(1−λ)W box with uniform centre.

  The arithmetic is the reference implementation's (clovaai/CutMix-PyTorch
  ``rand_bbox``, also timm's): cut = ⌊side·√(1−λ)⌋, centre c uniform in
  [0, side), edges clip(c − ⌊cut/2⌋) and clip(c + ⌊cut/2⌋) — so an odd cut
  gives a box one pixel shorter than cut, exactly as there. The box is
  clipped at the border, so its real area can be smaller than (1−λ)HW;
  callers must use the area-corrected λ (``1 − mean(mask)``).
  """
  k_y, k_x = jax.random.split(rng)
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  cy = jax.random.randint(k_y, (), 0, height)
  cx = jax.random.randint(k_x, (), 0, width)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  return ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)).astype(jnp.float32)


def cutmix(rng: jax.Array, x: jax.Array, y: jax.Array, *,
           alpha: float = 1.0, num_classes: Optional[int] = None) -> Mixed:
  """CutMix: paste a box of the partner image; λ corrected to the kept area.

  ``x`` is ``[B, H, W]`` or ``[B, H, W, C]``. One box per batch, as in the
  paper. The returned λ (used for the labels) equals 1 − box area / (H·W)
  exactly, i.e. the fraction of pixels that come from the first parent.
  """
  if x.ndim < 3:
    raise ValueError(f'cutmix needs image inputs [B, H, W(, C)], got shape {x.shape}')
  y = soft_labels(y, num_classes)
  b, h, w = x.shape[:3]
  k_lam, k_box, k_perm = jax.random.split(rng, 3)
  mask = box_mask(k_box, sample_lam(k_lam, alpha), h, w)
  lam = jnp.broadcast_to(1.0 - jnp.mean(mask), (b,))
  perm = jax.random.permutation(k_perm, b)
  m = mask.reshape((1, h, w) + (1,) * (x.ndim - 3)).astype(x.dtype)
  x_mix = (1 - m) * x + m * x[perm]
  y_mix = lam[:, None] * y + (1 - lam[:, None]) * y[perm]
  return Mixed(x_mix, y_mix, lam, jnp.arange(b), perm)


def multimix(rng: jax.Array, x: jax.Array, y: jax.Array, *, k: int = 5,
             alpha: float = 1.0, budget: str = 'expand',
             num_classes: Optional[int] = None) -> Mixed:
  """Multi-mix: K sorted interpolations per pair (seed 003).

  For each pair (i, π(i)) draw λ_1 ≤ … ≤ λ_K i.i.d. Beta(α, α) (sorted) and
  emit the K interpolations, consecutively (rows ``i*K … i*K+K−1``).
  ``budget='expand'``: all B pairs → K·B rows. ``budget='fixed'``: the first
  B/K pairs → B rows, the compute of plain mixup (needs K | B). The loss is
  the uniform mean over the rows.
  """
  if budget not in BUDGETS:
    raise ValueError(f'multimix.budget must be one of {BUDGETS}, got {budget!r}')
  y = soft_labels(y, num_classes)
  b = x.shape[0]
  if budget == 'fixed' and b % k:
    raise ValueError(f'multimix.k={k} must divide the per-device batch {b} '
                     "with budget='fixed'")
  pairs = b if budget == 'expand' else b // k
  k_lam, k_perm = jax.random.split(rng)
  lam = jnp.sort(sample_lam(k_lam, alpha, (pairs, k)), axis=-1).reshape(-1)
  perm = jax.random.permutation(k_perm, b)[:pairs]
  index_a = jnp.repeat(jnp.arange(pairs), k)
  index_b = jnp.repeat(perm, k)
  return interpolate(x, y, lam, index_a, index_b)


class HiddenMix(NamedTuple):
  """Manifold Mixup's instruction to a model (Verma et al. 2019).

  A model that supports Manifold Mixup takes ``mix`` (a ``HiddenMix`` or
  ``None``) and, at each of its eligible mixing points j = 0, 1, …, P−1
  (0 = the input, then e.g. after each stage), replaces its hidden state h
  by ``mix(j, h)``:

    mix(j, h)_r = λ_r h_r + (1 − λ_r) h_{partner(r)}   if j = k,   else h_r.

  k is a traced scalar, so the structure is static: one ``lax.cond`` per
  point, only the taken branch runs (under ``vmap`` both do). Partners and λ
  are the same at every point; rows with λ = 1 and partner(r) = r (BG-Mix's
  clean rows) pass through exactly. Its ``apply_fn`` declares P as the
  attribute ``apply_fn.mix_points`` (``models.make_apply_fn`` does this).

  Attributes:
    layer: k, the sampled mixing point (int32 scalar).
    lam: λ_r ``[R]``.
    partner: partner(r), an index into the R rows of the same forward pass.
  """
  layer: jax.Array
  lam: jax.Array
  partner: jax.Array

  def __call__(self, point: int, h: jax.Array) -> jax.Array:
    def mixed(h):
      lam = _per_row(self.lam, h)
      return lam * h + (1 - lam) * h[self.partner]
    return jax.lax.cond(self.layer == point, mixed, lambda h: h, h)


def hidden_mix(m: ManifoldMixed) -> HiddenMix:
  """The ``HiddenMix`` of a ``manifold`` batch (partners index its rows)."""
  return HiddenMix(m.layer, m.lam, m.index_b)


def manifold(rng: jax.Array, x: jax.Array, y: jax.Array, *, layers: Sequence[int],
             alpha: float = 2.0, lam_mode: str = 'batch',
             num_classes: Optional[int] = None) -> ManifoldMixed:
  """Manifold Mixup (Verma et al. 2019): mixup at a random mixing point.

  k is drawn uniformly from ``layers`` (the eligible points; 0 = input); λ
  and π are drawn exactly as ``mixup`` draws them from the same ``rng`` (so
  ``layers=(0,)`` *is* input mixup), labels are mixed with them:
  ỹ_i = λ y_i + (1−λ) y_π(i). The returned ``x`` is unmixed: the model mixes
  h_k by ``hidden_mix(result)``. docs/methods.md § 1: λ ~ Beta(2, 2).
  """
  layers = tuple(int(l) for l in layers)
  if not layers or min(layers) < 0:
    raise ValueError(f'manifold.layers must be a non-empty set of points >= 0, got {layers}')
  y = soft_labels(y, num_classes)
  b = x.shape[0]
  lam, perm = _mixup_draw(rng, b, alpha, lam_mode)
  # The point gets its own stream: λ and π stay those of mixup(rng, ...).
  pick = jax.random.randint(jax.random.fold_in(rng, 0x4D4D), (), 0, len(layers))
  layer = jnp.asarray(layers, jnp.int32)[pick]
  lam_y = lam[:, None].astype(y.dtype)
  return ManifoldMixed(x, lam_y * y + (1 - lam_y) * y[perm], lam, jnp.arange(b), perm, layer)


class PolicySpec(NamedTuple):
  """A registered policy: its function and the ``MixingConfig`` knobs it takes.

  ``knobs`` name fields of ``objectives.MixingConfig`` (``alpha``, ``lam_mode``,
  ``k``, ``budget``, ``layers``); the trainer passes exactly those as keyword
  arguments, and warns about the others when a config sets them.
  ``needs_image``: the policy reads examples as images ``[H, W(, C)]``; the
  trainer refuses other data before compiling.
  """
  fn: Callable[..., Union[Mixed, ManifoldMixed]]
  knobs: tuple[str, ...]
  doc: str
  needs_image: bool = False


class Variant(NamedTuple):
  """A policy that mixes as the registered policy ``base`` and adds a term
  computed outside this module (``objectives``), with its own ``MixingConfig``
  knobs."""
  base: str
  knobs: tuple[str, ...]
  doc: str


KNOBS = ('alpha', 'lam_mode', 'k', 'budget', 'layers')
POLICIES: dict[str, PolicySpec] = {}
# MixupE (Zou et al. 2023): mixup's batch plus a term on a clean forward pass
# (objectives.make_objective, losses.mixupe_term), weighted by eta, thresholded at tau.
VARIANTS: dict[str, Variant] = {
    'mixupe': Variant('mixup', ('eta', 'tau', 'mixupe_version'),
                      'mixup plus the MixupE term (Zou et al. 2023)'),
}


def register(name: str, fn: Callable[..., Union[Mixed, ManifoldMixed]],
             knobs: Sequence[str] = (), doc: str = '', needs_image: bool = False) -> None:
  """Make ``fn(rng, x, y, **knobs)`` the mixing policy ``name``.

  From then on ``method.mixing.policy=name`` validates, is listed by
  ``--help`` and is built by the trainer (``objectives.MixingConfig``)::

    mixing.register('flip', my_flip_mix, knobs=('alpha',), doc='my policy')

  ``needs_image=True``: a dataset whose examples are not images ``[H, W(, C)]``
  is refused before anything compiles.
  """
  unknown = sorted(set(knobs) - set(KNOBS))
  if unknown:
    raise ValueError(f'mixing.register({name!r}): unknown knobs {unknown}; a policy takes '
                     f'some of {KNOBS} (fields of objectives.MixingConfig)')
  POLICIES[name] = PolicySpec(fn, tuple(knobs), doc or (fn.__doc__ or '').split('\n')[0],
                              needs_image)


register('none', identity, (), 'no mixing (ERM)')
register('mixup', mixup, ('alpha', 'lam_mode'), 'mixup (Zhang et al. 2018)')
register('cutmix', cutmix, ('alpha',), 'CutMix (Yun et al. 2019), area-corrected λ',
         needs_image=True)
register('multimix', multimix, ('alpha', 'k', 'budget'), 'K sorted interpolations per pair')
register('manifold', manifold, ('alpha', 'lam_mode', 'layers'),
         'Manifold Mixup (Verma et al. 2019), hidden states')


def get_policy(name: str, **kwargs) -> Policy:
  """Policy by name with its knobs bound: ``get_policy('mixup', alpha=0.4)``."""
  if name not in POLICIES:
    raise ValueError(f'mixing.policy must be one of {sorted(POLICIES)}, got {name!r}')
  fn = POLICIES[name].fn
  return functools.partial(fn, **kwargs) if kwargs else fn


def policy_knobs() -> dict[str, tuple[str, ...]]:
  """Every policy (registered, then ``VARIANTS``) -> the ``MixingConfig``
  knobs it reads; a variant reads its base's and its own. Read at call time,
  so a policy registered after import is included."""
  table = {name: spec.knobs for name, spec in POLICIES.items()}
  table.update({name: POLICIES[v.base].knobs + v.knobs for name, v in VARIANTS.items()})
  return table


def image_policies() -> frozenset[str]:
  """The policies that need images ``[H, W(, C)]`` (a variant: as its base)."""
  names = {name for name, spec in POLICIES.items() if spec.needs_image}
  return frozenset(names | {name for name, v in VARIANTS.items() if v.base in names})
