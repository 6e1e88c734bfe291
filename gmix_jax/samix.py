"""SAMix and SAMix^P: mixing with a learned pixel mask (docs/methods.md § 1).

Li et al., "Boosting Discriminative Visual Representation Learning with
Scenario-Agnostic Mixup" (SAMix; seed 004), building on AutoMix (Liu et al.
2022). A small network, the *mixblock* φ, turns the features of two images
and λ into a pixel mask s ∈ [0,1]^{H×W}; the mixed image is

  x̃_i = x_i ⊙ (1 − s_i) + x_π(i) ⊙ s_i,     label weight λ for y_i, 1 − λ for y_π(i),

with λ ~ Beta(α, α) (one per device batch) and π a random permutation. The
features come from a momentum (EMA) copy w̄ of the backbone encoder, never
from the backbone itself. Each step minimises two losses:

  mixblock  L_φ = mean_i ℓ_η(f_w̄(x̃_i(s_φ)), y_i, y_π(i), λ) + β mean_i |mean_hw(s_i) − (1−λ)|
            through the *frozen* EMA network (gradient with respect to φ only);
  backbone  L_w = mean_i CE(f_w(x̃_i(sg(s))), ỹ_i) + κ mean_i CE(f_w(x_i), y_i)
            on the stop-gradient mask's mixed image plus the clean image
            (ỹ = λ y + (1−λ) y_π), optionally through a sharpness rule.

ℓ_η is the η-balanced mixup loss in its sigmoid-BCE form (``eta_bce``):

  ℓ_η(z, y_a, y_b, λ) = −Σ_c w_c [ỹ_c log σ(z_c) + (1 − ỹ_c) log(1 − σ(z_c))],
  w_c = 1 for the two mixed classes (y_a,c + y_b,c > 0), w_c = η for the others:

local smoothness between the two classes, global discrimination (weighted by
η) from the rest. The reference code (OpenMixup's ``ClsMixupHead`` with
``eta_weight``) applies η to a *softmax* cross-entropy, −Σ_c w_c ỹ_c log p_c:
there every non-target class has ỹ_c = 0, so η multiplies zero and changes
neither the loss nor its gradient (the non-target classes enter only through
the softmax normaliser, unweighted). η acts only in the BCE form used here.

After the backbone update the EMA moves towards it,
w̄ ← m_t w̄ + (1 − m_t) w (``ema_update``; float leaves of the model state
likewise), with m_t rising from m₀ to 1 on a cosine (``momentum``):
m_t = 1 − (1 − m₀)(1 + cos(π t / T)) / 2 (OpenMixup: 0.999 → ~1).

SAMix^P (``pretrained``): the mixblock and the EMA encoder are loaded from a
finished SAMix run and frozen; only the backbone trains (one loss per step).

Deviations from the reference code, each a simplification: the mixblock is
one attention layer (``MixBlock``); the mask regulariser is the plain L1 gap
(no margin, no variance term); the mixblock has its own Adam optimizer;
λ is one per device batch; the EMA network runs in inference mode (its own
EMA running statistics), so each example's features are independent of the
batch.

The method keeps its state in ``TrainState.extra`` (``parallel``):
``{'ema': {'params', 'model_state'}, 'mixblock': φ, 'mixblock_opt': ...}``
(SAMix^P: no optimizer state), so a checkpoint resumes exactly.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gmix_jax import losses
from gmix_jax import sharpness

PyTree = Any
METHODS = ('samix', 'samix_p')
# The encoder layer whose output feeds the mixblock, per model: a spatial map at
# 1/4 (cnn) or 1/8 (ResNet stage 3, as in the reference configs' mask_layer=2;
# WRN's stage 2 has the same 16 -> 8 ratio to the last map) of the image size.
DEFAULT_FEATURE_LAYER = {
    'cnn': 'conv1',
    'resnet18': 'stage3_block2',
    'preact_resnet18': 'stage3_block2',
    'wrn28': 'stage2_block4',
    'wrn28_2': 'stage2_block4',
    'wrn28_10': 'stage2_block4',
}


def check_common_knobs(cfg) -> None:
  """The knobs supervised SAMix and SAMix-SSL share (``method.samix.*``)."""
  for field in ('alpha', 'mixblock_lr'):
    if not getattr(cfg, field) > 0:
      raise ValueError(f'method.samix.{field} must be > 0, got {getattr(cfg, field)}')
  for field in ('eta', 'mask_weight', 'clean_weight'):
    if not getattr(cfg, field) >= 0:
      raise ValueError(f'method.samix.{field} must be >= 0, got {getattr(cfg, field)}')
  if cfg.mixblock_dim < 1:
    raise ValueError(f'method.samix.mixblock_dim must be >= 1, got {cfg.mixblock_dim}')


@dataclasses.dataclass(frozen=True)
class SAMixConfig:
  """SAMix's knobs (config section ``method.samix``).

  Attributes:
    pretrained: SAMix^P — load and freeze the mixblock and EMA encoder.
    source_workdir: SAMix^P's source, the workdir of a finished SAMix run
      with the same model and dataset.
    alpha: λ ~ Beta(α, α); 2.0 as in the reference configs.
    eta: η, the weight of the non-target classes in ℓ_η; 0.1 as in the
      reference configs.
    mask_weight: β, the weight of the mask regulariser; 0.1 (reference).
    clean_weight: κ, the weight of the backbone's clean-image loss; 1.0.
    momentum: m₀, the EMA momentum at step 0 (cosine to 1); 0.999 (reference).
    mixblock_lr: the mixblock's Adam learning rate.
    mixblock_dim: the mixblock's query/key width.
    feature_layer: the encoder layer feeding the mixblock (a Flax module
      path such as ``conv1`` or ``stage3_block2``); None takes
      ``DEFAULT_FEATURE_LAYER[model.name]``.
  """
  pretrained: bool = False
  source_workdir: Optional[str] = None
  alpha: float = 2.0
  eta: float = 0.1
  mask_weight: float = 0.1
  clean_weight: float = 1.0
  momentum: float = 0.999
  mixblock_lr: float = 1e-3
  mixblock_dim: int = 32
  feature_layer: Optional[str] = None

  def __post_init__(self):
    check_common_knobs(self)
    if not 0.0 <= self.momentum <= 1.0:
      raise ValueError(f'method.samix.momentum must be in [0, 1], got {self.momentum}')
    if self.pretrained and not self.source_workdir:
      raise ValueError('method.samix.source_workdir must be set for samix_p: the workdir of a '
                       'finished samix run (with the same model and dataset) whose mixblock and '
                       'EMA encoder are loaded and frozen')


def get_config(name: str, **fields) -> SAMixConfig:
  """The config of ``name`` (``samix`` | ``samix_p``) with explicit fields
  (None = default)."""
  if name not in METHODS:
    raise ValueError(f'method.name must be one of {list(METHODS)} here, got {name!r}')
  known = {f.name for f in dataclasses.fields(SAMixConfig)} - {'pretrained'}
  unknown = set(fields) - known
  if unknown:
    raise ValueError(f'unknown method.samix field(s) {sorted(unknown)}; valid: {sorted(known)}')
  return SAMixConfig(pretrained=name == 'samix_p',
                     **{k: v for k, v in fields.items() if v is not None})


def feature_layer(cfg: SAMixConfig, model_name: str) -> str:
  """The layer feeding the mixblock; ValueError for a model without spatial maps."""
  if model_name not in DEFAULT_FEATURE_LAYER:
    raise ValueError(f'SAMix needs an encoder with a spatial feature map: model.name must be one '
                     f'of {sorted(DEFAULT_FEATURE_LAYER)}, got {model_name!r}')
  return cfg.feature_layer or DEFAULT_FEATURE_LAYER[model_name]


# ----------------------------------------------------------------------------
# The pure pieces.
# ----------------------------------------------------------------------------
def momentum(step, total_steps: int, m0: float) -> jax.Array:
  """m_t = 1 − (1 − m₀)(1 + cos(π t / T)) / 2: m₀ at t = 0, 1 at t = T."""
  t = jnp.minimum(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 1.0)
  return 1.0 - (1.0 - m0) * (1.0 + jnp.cos(jnp.pi * t)) / 2.0


def ema_update(ema: PyTree, online: PyTree, m) -> PyTree:
  """m·ema + (1 − m)·online on float leaves; other leaves (counters) from ``online``."""
  def one(e, o):
    if not jnp.issubdtype(e.dtype, jnp.floating):
      return o
    return (m * e + (1.0 - m) * o).astype(e.dtype)
  return jax.tree.map(one, ema, online)


def eta_bce(logits: jax.Array, y_a: jax.Array, y_b: jax.Array, lam: jax.Array,
            eta: float) -> jax.Array:
  """η-balanced mixup loss, sigmoid-BCE form, per example ``[B]``.

  ℓ = −Σ_c w_c [ỹ_c log σ(z_c) + (1 − ỹ_c) log(1 − σ(z_c))], ỹ = λ y_a + (1−λ) y_b,
  w_c = 1 where y_a,c + y_b,c > 0 (the two mixed classes), η elsewhere.
  (A softmax CE would make η inert: see the module docstring.)
  """
  dtype = jnp.promote_types(logits.dtype, jnp.float32)
  z = logits.astype(dtype)
  lam = lam.reshape(-1, 1).astype(dtype)
  y_a, y_b = y_a.astype(dtype), y_b.astype(dtype)
  target = lam * y_a + (1 - lam) * y_b
  weight = jnp.where(y_a + y_b > 0, 1.0, eta).astype(dtype)
  bce = -(target * jax.nn.log_sigmoid(z) + (1 - target) * jax.nn.log_sigmoid(-z))
  return jnp.sum(weight * bce, axis=-1)


def mix_images(x: jax.Array, x_partner: jax.Array, mask: jax.Array) -> jax.Array:
  """x ⊙ (1 − s) + x_partner ⊙ s; ``mask`` ``[B, H, W]``, ``x`` ``[B, H, W(, C)]``."""
  s = mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim)).astype(x.dtype)
  return x * (1 - s) + x_partner * s


class MixBlock(nn.Module):
  """The mixblock: two feature maps and λ → a pixel mask (AutoMix/SAMix, simplified).

  With f_a, f_b ``[B, h, w, c]`` (layer-normalised over channels) and λ as an
  extra constant channel (AutoMix's λ concatenation):
    q = W_q [f_b, 1−λ],  k = W_k [f_a, λ]  (1×1 convs, ``dim`` channels),
    v = W_v [f_b, 1−λ]  (one channel),
    A = softmax_j(q_i · k_j / √dim)  over the h·w positions,
    s = σ(A v)  ``[B, h, w]``, bilinearly upsampled to the image size.
  s is the weight of the *partner* image (``mix_images``). Bilinear
  upsampling is a convex combination, so s stays in [0, 1].
  """
  dim: int = 32

  @nn.compact
  def __call__(self, feat_a: jax.Array, feat_b: jax.Array, lam: jax.Array,
               image_hw: tuple[int, int]) -> jax.Array:
    b, h, w, _ = feat_a.shape
    # Features of a young (or any) encoder vary in scale across layers and
    # models; normalising them keeps the attention logits in a sane range.
    norm = nn.LayerNorm(name='norm')
    lam_map = jnp.broadcast_to(lam.reshape(b, 1, 1, 1).astype(jnp.float32), (b, h, w, 1))
    za = jnp.concatenate([norm(feat_a.astype(jnp.float32)), lam_map], -1)
    zb = jnp.concatenate([norm(feat_b.astype(jnp.float32)), 1 - lam_map], -1)
    q = nn.Dense(self.dim, name='query')(zb).reshape(b, h * w, self.dim)
    # No key bias: it adds q_i·b to every logit of row i, which softmax over j
    # ignores, so its gradient is exactly zero and Adam would only amplify
    # rounding noise into it (different on every device layout).
    k = nn.Dense(self.dim, use_bias=False, name='key')(za).reshape(b, h * w, self.dim)
    v = nn.Dense(1, name='value')(zb).reshape(b, h * w)
    attn = jax.nn.softmax(jnp.einsum('bid,bjd->bij', q, k) / math.sqrt(self.dim), axis=-1)
    s = jax.nn.sigmoid(jnp.einsum('bij,bj->bi', attn, v)).reshape(b, h, w)
    return jax.image.resize(s, (b, *image_hw), 'bilinear')


def make_features_fn(module: nn.Module, layer: str) -> Callable:
  """``features_fn(params, model_state, x) -> [B, h, w, c]``: the output of the
  submodule at path ``layer`` (``a/b`` for nested modules), inference mode.

  Read with Flax's ``capture_intermediates``, so any linen model works
  unchanged; under jit the layers after ``layer`` are dead code and dropped.
  """
  path = tuple(layer.split('/'))

  def features_fn(params, model_state, x):
    _, captured = module.apply(
        {'params': params, **model_state}, x, train=False, mutable=['intermediates'],
        capture_intermediates=lambda mdl, method: method == '__call__' and mdl.path == path)
    node = captured['intermediates']
    for name in path:
      node = node[name]
    return node['__call__'][0]
  return features_fn


def feature_shape(module: nn.Module, layer: str, input_shape) -> tuple[int, ...]:
  """The feature map's shape for one example, checked abstractly (nothing compiles).

  Raises ValueError when ``layer`` does not exist or its output is not a
  spatial map ``[h, w, c]``.
  """
  x = jax.ShapeDtypeStruct((1, *tuple(input_shape)), jnp.float32)

  def run(x):
    variables = module.init(jax.random.PRNGKey(0), x, train=False)
    params = variables['params']
    state = {k: v for k, v in variables.items() if k != 'params'}
    return make_features_fn(module, layer)(params, state, x)
  try:
    shape = jax.eval_shape(run, x).shape
  except KeyError as e:
    raise ValueError(f'method.samix.feature_layer={layer!r} is not a layer of this model '
                     f'(missing {e}); give a module path such as conv1 or stage3_block2') from e
  if len(shape) != 4:
    raise ValueError(f'method.samix.feature_layer={layer!r} outputs shape {shape[1:]} per example; '
                     'the mixblock needs a spatial feature map [h, w, c]')
  return tuple(shape[1:])


# ----------------------------------------------------------------------------
# The two losses.
# ----------------------------------------------------------------------------
def mixblock_loss(phi, ema, mixblock: MixBlock, apply_fn, features, x, y, perm, lam,
                  eta: float, mask_weight: float):
  """L_φ and the mask: the mixed image through the frozen EMA network.

  ``ema = {'params', 'model_state'}`` is under stop_gradient: the mixblock
  loss never trains the encoder (only φ). ``features`` ``[B, h, w, c]`` are
  the EMA encoder's features of ``x``. Returns ``(loss, (mask, bce, reg))``.
  """
  ema = jax.lax.stop_gradient(ema)
  features = jax.lax.stop_gradient(features)
  mask = mixblock.apply({'params': phi}, features, features[perm], lam, x.shape[1:3])
  x_mix = mix_images(x, x[perm], mask)
  logits, _ = apply_fn(ema['params'], ema['model_state'], x_mix, False)
  bce = jnp.mean(eta_bce(logits, y, y[perm], lam, eta))
  reg = jnp.mean(jnp.abs(jnp.mean(mask, axis=(1, 2)) - (1 - lam)))
  return bce + mask_weight * reg, (mask, bce, reg)


def backbone_loss(params, model_state, apply_fn, x, y, perm, lam, mask, clean_weight: float):
  """L_w on the stop-gradient mask's mixed image plus the clean image.

  Returns ``(loss, new_model_state)``; the model state (BatchNorm) comes from
  the clean pass. No gradient reaches the mask (hence the mixblock).
  """
  mask = jax.lax.stop_gradient(mask)
  lam_y = lam.reshape(-1, 1).astype(y.dtype)
  y_mix = lam_y * y + (1 - lam_y) * y[perm]
  logits_mix, _ = apply_fn(params, model_state, mix_images(x, x[perm], mask), True)
  logits, new_state = apply_fn(params, model_state, x, True)
  loss = (jnp.mean(losses.soft_cross_entropy(logits_mix, y_mix)) +
          clean_weight * jnp.mean(losses.soft_cross_entropy(logits, y)))
  return loss, new_state


# ----------------------------------------------------------------------------
# Per-device objective, extra state and its update (parallel.make_per_device_step).
# ----------------------------------------------------------------------------
def init_extra(cfg: SAMixConfig, mixblock: MixBlock, mixblock_opt, params, model_state,
               feat_shape, image_hw, rng) -> PyTree:
  """A fresh extra state: EMA = a copy of the backbone, a new mixblock."""
  f = jnp.zeros((1, *feat_shape), jnp.float32)
  phi = mixblock.init(rng, f, f, jnp.full((1,), 0.5), tuple(image_hw))['params']
  # Copies, not aliases: the train step donates the state.
  extra = {'ema': jax.tree.map(jnp.array, {'params': params, 'model_state': model_state}),
           'mixblock': phi}
  if not cfg.pretrained:
    extra['mixblock_opt'] = mixblock_opt.init(phi)
  return extra


def make_objective(cfg: SAMixConfig, apply_fn, features_fn, mixblock: MixBlock, num_classes: int,
                   rule: sharpness.SharpnessRule = sharpness.SharpnessRule('none'), *,
                   axis_name: Optional[str] = None):
  """``objective(params, model_state, batch, rng, extra) -> (grads,
  new_model_state, metrics, extra_grads)``: this device's backbone gradient
  (through ``rule`` when active) and mixblock gradient (``{}`` for SAMix^P),
  neither averaged yet. Metrics: ``loss`` (L_w), ``mask_mean`` and, for SAMix,
  ``mixblock_loss``, ``mixblock_bce`` and ``mask_gap`` (the regulariser).
  """
  def objective(params, model_state, batch, rng, extra):
    x = batch['x']
    y = losses.as_soft_labels(batch['y'], num_classes)
    b = x.shape[0]
    k_lam, k_perm, k_sharp = jax.random.split(rng, 3)
    lam = jnp.broadcast_to(jax.random.beta(k_lam, cfg.alpha, cfg.alpha, dtype=jnp.float32), (b,))
    perm = jax.random.permutation(k_perm, b)
    ema = jax.lax.stop_gradient(extra['ema'])
    features = features_fn(ema['params'], ema['model_state'], x)
    metrics = {}
    mb_loss = lambda phi: mixblock_loss(phi, ema, mixblock, apply_fn, features, x, y, perm, lam,
                                        cfg.eta, cfg.mask_weight)
    if cfg.pretrained:                       # SAMix^P: the frozen mixblock only makes the mask
      mask = mb_loss(extra['mixblock'])[1][0]
      mb_grads = {}
    else:
      (l_mb, (mask, bce, reg)), mb_grads = jax.value_and_grad(mb_loss, has_aux=True)(
          extra['mixblock'])
      metrics.update(mixblock_loss=l_mb, mixblock_bce=bce, mask_gap=reg)
    metrics['mask_mean'] = jnp.mean(mask)

    loss_fn = lambda p: backbone_loss(p, model_state, apply_fn, x, y, perm, lam, mask,
                                      cfg.clean_weight)
    (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    metrics['loss'] = loss
    if rule.active:
      grad_fn = lambda p: jax.value_and_grad(loss_fn, has_aux=True)(p)[::-1]
      grads, (loss_p, _) = sharpness.sharpness_gradient(rule, grad_fn, params, grads,
                                                        rng=k_sharp, axis_name=axis_name)
      metrics['perturbed_loss'] = loss_p
    return grads, new_state, metrics, mb_grads

  return objective


def make_extra_update(cfg: SAMixConfig, mixblock_opt, total_steps: int):
  """``update(extra, extra_grads, params, model_state, step) -> extra``, run
  after the backbone update with the device-averaged mixblock gradient:
  one mixblock optimizer step and w̄ ← m_t w̄ + (1 − m_t) w. SAMix^P: identity.
  """
  def update(extra, mb_grads, params, model_state, step):
    if cfg.pretrained:
      return extra
    updates, opt_state = mixblock_opt.update(mb_grads, extra['mixblock_opt'], extra['mixblock'])
    m = momentum(step, total_steps, cfg.momentum)
    ema = ema_update(extra['ema'], {'params': params, 'model_state': model_state}, m)
    return {'ema': ema, 'mixblock': optax.apply_updates(extra['mixblock'], updates),
            'mixblock_opt': opt_state}
  return update


def build(cfg: SAMixConfig, model_name: str, module: nn.Module, apply_fn, input_shape,
          num_classes: int, total_steps: int, params, model_state, rng, *,
          rule: sharpness.SharpnessRule = sharpness.SharpnessRule('none'),
          restore: Optional[Callable] = None, axis_name: str = 'batch'):
  """``(objective, extra, extra_update)`` for ``parallel.make_per_device_step``.

  ``extra`` is fresh (SAMix) or loaded from ``cfg.source_workdir`` with
  ``restore`` (SAMix^P); ``rule`` is the backbone's sharpness rule.
  """
  layer = feature_layer(cfg, model_name)
  mixblock = MixBlock(cfg.mixblock_dim)
  mixblock_opt = optax.adam(cfg.mixblock_lr)
  extra = init_extra(cfg, mixblock, mixblock_opt, params, model_state,
                     feature_shape(module, layer, input_shape), tuple(input_shape)[:2], rng)
  if cfg.pretrained:
    extra = load_source(cfg, extra, restore)
  objective = make_objective(cfg, apply_fn, make_features_fn(module, layer), mixblock,
                             num_classes, rule, axis_name=axis_name)
  return objective, extra, make_extra_update(cfg, mixblock_opt, total_steps)


# ----------------------------------------------------------------------------
# SAMix^P: the source run.
# ----------------------------------------------------------------------------
COMPATIBLE_FIELDS = ('dataset.name', 'model')


def check_source(cfg: SAMixConfig, config_json: Mapping) -> None:
  """File-level checks of SAMix^P's source workdir (before any data or compile).

  ``config_json`` is this run's config as a dict. The source must hold a
  checkpoint and a ``config.json`` of a ``samix`` run with the same model and
  dataset.
  """
  src = os.path.abspath(os.path.expanduser(cfg.source_workdir))
  where = f'method.samix.source_workdir={cfg.source_workdir!r}'
  ckpts = os.path.join(src, 'checkpoints')
  if not os.path.isdir(ckpts) or not any(n.isdigit() for n in os.listdir(ckpts)):
    raise ValueError(f'{where}: no checkpoint found in {ckpts}; train configs/X.py:samix '
                     'there first')
  path = os.path.join(src, 'config.json')
  if not os.path.exists(path):
    raise ValueError(f'{where}: no config.json in {src} (not a gmix_jax workdir)')
  with open(path) as f:
    old = json.load(f)
  get = config_field
  if get(old, 'method.name') != 'samix':
    raise ValueError(f"{where}: that run's method.name is {get(old, 'method.name')!r}; "
                     "samix_p needs a 'samix' run")
  changed = changed_fields(old, config_json, COMPATIBLE_FIELDS,
                           mixblock_resolvers(config_json, 'method.samix'))
  if changed:
    raise ValueError(f'{where}: that run differs in {", ".join(changed)}; its mixblock and '
                     'encoder cannot be used with this config')


def config_field(d: Mapping, dotted: str):
  """``d['a']['b']`` for ``'a.b'``; None where a level is missing."""
  for k in dotted.split('.'):
    d = d.get(k) if isinstance(d, Mapping) else None
  return d


def mixblock_resolvers(config_json: Mapping, section: str) -> dict[str, Callable]:
  """``{'SECTION.feature_layer': resolve, 'SECTION.mixblock_dim': resolve}``:
  the mixblock's input and width as a run resolves them (None = the default)."""
  model = config_field(config_json, 'model.name')
  return {f'{section}.feature_layer': lambda v: v or DEFAULT_FEATURE_LAYER.get(model),
          f'{section}.mixblock_dim': lambda v: v or SAMixConfig.mixblock_dim}


def changed_fields(old: Mapping, new: Mapping, fields, resolved: Mapping[str, Callable]) -> list:
  """The dotted ``fields`` that differ between two runs' configs, then those
  of ``resolved`` that differ after resolving (``{field: resolve}``)."""
  changed = [k for k in fields if config_field(old, k) != config_field(new, k)]
  changed += [k for k, resolve in resolved.items()
              if resolve(config_field(old, k)) != resolve(config_field(new, k))]
  return changed


def load_source(cfg: SAMixConfig, template: PyTree, restore: Callable) -> PyTree:
  """SAMix^P's extra state: the source run's EMA encoder and mixblock.

  ``template`` is a fresh SAMix^P extra (shapes to match); ``restore(workdir)
  -> (step, state dict)`` reads a checkpoint (``train.restore_state``).
  """
  _, state = restore(os.path.abspath(os.path.expanduser(cfg.source_workdir)))
  extra = state.get('extra')
  if not isinstance(extra, Mapping) or not {'ema', 'mixblock'} <= set(extra):
    raise ValueError(f'method.samix.source_workdir={cfg.source_workdir!r}: its checkpoint holds '
                     'no SAMix state (ema, mixblock)')
  loaded = {'ema': extra['ema'], 'mixblock': extra['mixblock']}
  shapes = lambda t: jax.tree.map(lambda a: tuple(np.shape(a)), t)
  if (jax.tree.structure(loaded) != jax.tree.structure(template) or
      shapes(loaded) != shapes(template)):
    raise ValueError(f'method.samix.source_workdir={cfg.source_workdir!r}: its EMA encoder or '
                     'mixblock has other shapes than this config builds (model, feature layer, '
                     'mixblock_dim or input size differ)')
  return jax.tree.map(lambda a, t: jnp.asarray(a, t.dtype), loaded, template)
