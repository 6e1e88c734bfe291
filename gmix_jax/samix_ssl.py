"""SAMix-SSL: SAMix's learned mask on MoCo v2 (docs/methods.md § 9).

Li et al., "Boosting Discriminative Visual Representation Learning with
Scenario-Agnostic Mixup" (the self-supervised half; reference code:
OpenMixup's ``MoCoSAMix``). The mixblock φ of supervised SAMix
(``samix.MixBlock``) reads the *momentum* encoder's feature maps of the query
views x_i and x_π(i) and λ ~ Beta(α, α) and returns a pixel mask s; the mixed
query is x̃_i = x_i ⊙ (1 − s_i) + x_π(i) ⊙ s_i. Per step, two losses:

  mixblock  L_φ = mean_i ℓ_η(q̄(x̃_i(s_φ))) + β mean_i |mean_hw(s_i) − (1 − λ)|
            through the frozen momentum encoder q̄ (gradient to φ only);
            ℓ_η = ``contrastive.instance_eta_bce`` (``mixblock_loss='eta_bce'``)
            or the reference's λ-weighted InfoNCE (``'infonce'``);
  backbone  L_θ = κ mean_i ℓ_NCE(q_θ(x_i), k_i)
                  + mean_i [λ ℓ_NCE(q_θ(x̃_i(sg(s))), k_i) + (1 − λ) ℓ_NCE(q_θ(x̃_i), k_π(i))]
            the clean MoCo loss plus the λ-weighted InfoNCE of the
            stop-gradient mask's mixed query (optionally through a sharpness
            rule).

k_i are the momentum encoder's keys of the key views x'_i; the queue holds
the negatives. The encoders are given as functions, so this module does not
know the model: ``query_fn(params, model_state, x) -> (q, new_model_state)``
(the trained encoder + head, L2-normalised, training mode) and
``momentum_fn(key_vars, x) -> q̄`` (the momentum encoder + head with its
variables ``key_vars``; whatever its BatchNorm does, e.g. shuffled across
devices) and ``features_fn(key_vars, x) -> [B, h, w, c]`` (its feature map
at the mixblock's layer). ``key_vars`` is never trained here: every loss
sees it under stop_gradient.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from gmix_jax import contrastive
from gmix_jax import samix
from gmix_jax import sharpness

MIXBLOCK_LOSSES = ('eta_bce', 'infonce')


@dataclasses.dataclass(frozen=True)
class SAMixSSLConfig:
  """SAMix-SSL's knobs; defaults from OpenMixup's ``MoCoSAMix`` where it has
  them (docs/methods.md § 9).

  Attributes:
    alpha: λ ~ Beta(α, α); 2 (reference ``alpha=2``).
    eta: η, the weight of the queue's negatives in ℓ_η; 0.1 (supervised SAMix).
    mask_weight: β, the mask-area regulariser's weight; 0.1 (reference
      ``weight_mb_mask``).
    clean_weight: κ, the clean MoCo loss's weight in L_θ; 1 (reference
      ``weight_bb_ssl``).
    mixblock_loss: ``'eta_bce'`` (§ 9's instance η-BCE) or ``'infonce'``
      (the reference's default ``main_mb_loss``).
    mixblock_lr: the mixblock's Adam learning rate.
    mixblock_dim: the mixblock's query/key width.
    feature_layer: the momentum encoder's layer feeding the mixblock; None
      takes ``samix.DEFAULT_FEATURE_LAYER`` (stage 2, 0-based, for ResNets:
      reference ``mask_layer=2``).
  """
  alpha: float = 2.0
  eta: float = 0.1
  mask_weight: float = 0.1
  clean_weight: float = 1.0
  mixblock_loss: str = 'eta_bce'
  mixblock_lr: float = 1e-3
  mixblock_dim: int = 32
  feature_layer: Optional[str] = None

  def __post_init__(self):
    samix.check_common_knobs(self)
    if self.mixblock_loss not in MIXBLOCK_LOSSES:
      raise ValueError(f'method.samix.mixblock_loss must be one of {list(MIXBLOCK_LOSSES)}, '
                       f'got {self.mixblock_loss!r}')


def mask_of(mixblock: samix.MixBlock, phi, feats, perm, lam, image_hw):
  """s = φ(f_i, f_π(i), λ) ``[B, H, W]``: the partner's pixel weight."""
  return mixblock.apply({'params': phi}, feats, feats[perm], lam, tuple(image_hw))


def mixblock_loss(cfg: SAMixSSLConfig, phi, mixblock: samix.MixBlock, momentum_fn: Callable,
                  key_vars, feats, x, perm, lam, keys, queue, temperature: float):
  """L_φ and its parts ``(loss, (mask, main, reg))`` for a batch.

  ``feats`` ``[B, h, w, c]``: the momentum encoder's features of ``x``;
  ``keys`` ``[B, D]`` the keys of the key views; ``lam`` ``[B]``. The
  momentum encoder, the features, the keys and the queue are constants
  here: the gradient reaches φ only, through the mask.
  """
  key_vars, feats, keys, queue = jax.lax.stop_gradient((key_vars, feats, keys, queue))
  mask = mask_of(mixblock, phi, feats, perm, lam, x.shape[1:3])
  q_mix = momentum_fn(key_vars, samix.mix_images(x, x[perm], mask))
  if cfg.mixblock_loss == 'eta_bce':
    loss, (main, reg) = contrastive.samix_ssl_mixblock_loss(
        q_mix, keys, keys[perm], queue, lam, mask, temperature=temperature, eta=cfg.eta,
        mask_weight=cfg.mask_weight)
  else:
    main = jnp.mean(contrastive.mixed_info_nce(q_mix, keys, keys[perm], queue, lam, temperature))
    reg = jnp.mean(jnp.abs(jnp.mean(mask, axis=(1, 2)) - (1 - lam)))
    loss = main + cfg.mask_weight * reg
  return loss, (mask, main, reg)


def backbone_loss(cfg: SAMixSSLConfig, params, model_state, query_fn: Callable, x, perm, lam,
                  mask, keys, queue, temperature: float):
  """L_θ and ``(new_model_state, clean, mixed)``; no gradient reaches the mask,
  the keys or the queue. The model state (BatchNorm) comes from the clean pass."""
  mask, keys, queue = jax.lax.stop_gradient((mask, keys, queue))
  q, new_state = query_fn(params, model_state, x)
  q_mix, _ = query_fn(params, model_state, samix.mix_images(x, x[perm], mask))
  clean = jnp.mean(contrastive.info_nce(q, keys, queue, temperature))
  mixed = jnp.mean(contrastive.mixed_info_nce(q_mix, keys, keys[perm], queue, lam, temperature))
  return cfg.clean_weight * clean + mixed, (new_state, clean, mixed)


def draw(cfg: SAMixSSLConfig, rng, b: int):
  """``(lam [B], perm [B])``: one λ ~ Beta(α, α) per device batch (as
  supervised SAMix) and a partner permutation within the device batch."""
  k_lam, k_perm = jax.random.split(rng)
  lam = jnp.broadcast_to(jax.random.beta(k_lam, cfg.alpha, cfg.alpha, dtype=jnp.float32), (b,))
  return lam, jax.random.permutation(k_perm, b)


def step_losses(cfg: SAMixSSLConfig, params, model_state, phi, key_vars, *,
                mixblock: samix.MixBlock, query_fn: Callable, momentum_fn: Callable,
                features_fn: Callable, x, keys, queue, lam, perm, temperature: float):
  """``((L_θ, L_φ), aux)`` from all three parameter sets at once: the mask
  comes from φ, L_θ uses it. A function of (θ, φ, key_vars) for the tests'
  check that each loss's gradient reaches only its own parameters."""
  feats = features_fn(jax.lax.stop_gradient(key_vars), x)
  l_mb, (mask, main, reg) = mixblock_loss(cfg, phi, mixblock, momentum_fn, key_vars, feats, x,
                                          perm, lam, keys, queue, temperature)
  l_bb, (new_state, clean, mixed) = backbone_loss(cfg, params, model_state, query_fn, x, perm,
                                                  lam, mask, keys, queue, temperature)
  return (l_bb, l_mb), (mask, new_state, clean, mixed, main, reg)


def losses_and_grads(cfg: SAMixSSLConfig, params, model_state, phi, key_vars, *,
                     mixblock: samix.MixBlock, query_fn: Callable, momentum_fn: Callable,
                     features_fn: Callable, x, keys, queue, rng, temperature: float,
                     rule: sharpness.SharpnessRule = sharpness.SharpnessRule('none'),
                     axis_name: Optional[str] = None):
  """One device's SAMix-SSL gradients: ``(grads_θ, grads_φ, new_model_state,
  metrics)``, neither averaged over devices yet.

  λ and π come from ``rng`` (`draw`); the backbone's gradient goes through
  ``rule`` when it is active.
  """
  k_draw, k_sharp = jax.random.split(rng)
  lam, perm = draw(cfg, k_draw, x.shape[0])
  feats = features_fn(jax.lax.stop_gradient(key_vars), x)
  mb = lambda p: mixblock_loss(cfg, p, mixblock, momentum_fn, key_vars, feats, x, perm, lam,
                               keys, queue, temperature)
  (l_mb, (mask, main, reg)), phi_grads = jax.value_and_grad(mb, has_aux=True)(phi)
  grads, new_state, metrics = _backbone_gradient(cfg, params, model_state, query_fn, x, perm,
                                                 lam, mask, keys, queue, temperature, rule,
                                                 k_sharp, axis_name)
  metrics.update(mixblock_loss=l_mb, mixblock_main=main, mask_gap=reg)
  return grads, phi_grads, new_state, metrics


def _backbone_gradient(cfg, params, model_state, query_fn, x, perm, lam, mask, keys, queue,
                       temperature, rule, k_sharp, axis_name):
  """∇_θ L_θ (through ``rule`` when active), the new model state and the metrics."""
  bb = lambda p: backbone_loss(cfg, p, model_state, query_fn, x, perm, lam, mask, keys, queue,
                               temperature)
  (loss, (new_state, clean, mixed)), grads = jax.value_and_grad(bb, has_aux=True)(params)
  metrics = {'loss': loss, 'clean_loss': clean, 'mix_loss': mixed, 'mask_mean': jnp.mean(mask)}
  if rule.active:
    grad_fn = lambda p: jax.value_and_grad(bb, has_aux=True)(p)[::-1]
    grads, (loss_p, _) = sharpness.sharpness_gradient(rule, grad_fn, params, grads, rng=k_sharp,
                                                      axis_name=axis_name)
    metrics['perturbed_loss'] = loss_p
  return grads, new_state, metrics


def frozen_mask_grads(cfg: SAMixSSLConfig, params, model_state, phi, mixer_vars, *,
                      mixblock: samix.MixBlock, query_fn: Callable, features_fn: Callable, x,
                      keys, queue, rng, temperature: float,
                      rule: sharpness.SharpnessRule = sharpness.SharpnessRule('none'),
                      axis_name: Optional[str] = None):
  """SAMix^P-SSL: ``(grads_θ, new_model_state, metrics)`` with the mask of a
  *frozen* mixblock φ on a frozen encoder's features (``mixer_vars``, the
  source run's momentum encoder): L_θ only, no L_φ, nothing reaches φ.

  λ and π are drawn as in `losses_and_grads` (same ``rng`` split), so for
  equal φ and features the mask is SAMix-SSL's.
  """
  k_draw, k_sharp = jax.random.split(rng)
  lam, perm = draw(cfg, k_draw, x.shape[0])
  phi, mixer_vars = jax.lax.stop_gradient((phi, mixer_vars))
  mask = mask_of(mixblock, phi, features_fn(mixer_vars, x), perm, lam, x.shape[1:3])
  return _backbone_gradient(cfg, params, model_state, query_fn, x, perm, lam, mask, keys, queue,
                            temperature, rule, k_sharp, axis_name)
