"""Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16
Words", arXiv:2010.11929), pre-LN encoder in the form of big_vision's
``big_vision/models/vit.py``.

patches (conv p x p / p) -> [+ class token] -> + learned position embedding
-> depth x [x + MHA(LN(x)); x + MLP(LN(x))] -> LN -> pool (class token or
mean of the tokens) -> Dense head (zero-initialised, as big_vision does).

Manifold Mixup points (``mix``, see ``gmix_jax.mixing.HiddenMix``): 0 = the
input image, j = the tokens after encoder block j (j = 1..depth).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from gmix_jax.models.cnn import as_image_batch

POOLS = ('tok', 'gap')


class MlpBlock(nn.Module):
  """Dense(mlp_dim) -> GELU -> (dropout) -> Dense(width)."""
  mlp_dim: int
  dropout: float
  dense: Any

  @nn.compact
  def __call__(self, x, deterministic: bool):
    width = x.shape[-1]
    x = nn.gelu(self.dense(self.mlp_dim)(x))
    x = nn.Dropout(self.dropout, deterministic=deterministic)(x)
    return self.dense(width)(x)


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + MHA(LN(x)), then x + MLP(LN(x))."""
  num_heads: int
  mlp_dim: int
  dropout: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x, deterministic: bool):
    norm = functools.partial(nn.LayerNorm, dtype=self.dtype, param_dtype=self.param_dtype)
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype,
                              kernel_init=nn.initializers.xavier_uniform(),
                              bias_init=nn.initializers.normal(stddev=1e-6))
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(),
        force_fp32_for_softmax=True,  # the attention softmax stays float32 (see precision.py)
        deterministic=True, name='attention')(norm(name='ln1')(x))
    x = x + nn.Dropout(self.dropout, deterministic=deterministic)(y)
    y = MlpBlock(self.mlp_dim, self.dropout, dense, name='mlp')(norm(name='ln2')(x), deterministic)
    return x + nn.Dropout(self.dropout, deterministic=deterministic)(y)


class ViT(nn.Module):
  """Vision Transformer classifier.

  ViT-B/16 (width 768, depth 12, mlp 3072, 12 heads, patch 16, class token)
  has 86,567,656 parameters for 1000 classes at 224 px, the figure of the
  paper's and timm's ``vit_base_patch16_224``; `pool='gap'` drops the class
  token and its position (1,536 fewer).

  Attributes:
    num_classes: number of output logits.
    patch: patch side p (the image side must be a multiple of p).
    width, depth, mlp_dim, num_heads: encoder size.
    pool: 'tok' (class token, default) or 'gap' (mean of the output tokens).
    dropout: dropout rate in the blocks; active only with train=True and a
      'dropout' rng (``make_apply_fn``'s optional `rng`).
    dtype: compute dtype (e.g. bfloat16); LayerNorm statistics and the
      attention softmax are float32, logits are cast to float32.
    param_dtype: parameter dtype (keep float32).
  """
  num_classes: int
  patch: int = 16
  width: int = 768
  depth: int = 12
  mlp_dim: int = 3072
  num_heads: int = 12
  pool: str = 'tok'
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def mix_points(self) -> int:
    """Manifold Mixup points: 0 = the input, j = the output of block j."""
    return 1 + self.depth

  @nn.compact
  def __call__(self, x, train: bool = False, mix=None):
    if self.pool not in POOLS:
      raise ValueError(f'model.kwargs.pool must be one of {POOLS}; got {self.pool!r}.')
    mix = mix or (lambda j, h: h)
    deterministic = not train or not self.has_rng('dropout')
    x = mix(0, as_image_batch(x, self.dtype))
    x = nn.Conv(self.width, (self.patch, self.patch), (self.patch, self.patch), padding='VALID',
                dtype=self.dtype, param_dtype=self.param_dtype, name='embedding')(x)
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    if self.pool == 'tok':
      cls = self.param('cls', nn.initializers.zeros, (1, 1, c), self.param_dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, c)), x], axis=1)
    pos = self.param('pos_embedding', nn.initializers.normal(stddev=1 / np.sqrt(c)),
                     (1, x.shape[1], c), self.param_dtype)
    x = nn.Dropout(self.dropout, deterministic=deterministic)(x + pos.astype(x.dtype))
    for j in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_dim, self.dropout, self.dtype,
                       self.param_dtype, name=f'block{j + 1}')(x, deterministic)
      x = mix(j + 1, x)
    x = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name='encoder_norm')(x)
    x = x[:, 0] if self.pool == 'tok' else jnp.mean(x, axis=1)
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=nn.initializers.zeros, name='head')(x)
    return x.astype(jnp.float32)


VIT_SIZES = {  # name: (patch, width, depth, mlp_dim, heads), the paper's Table 1 / DeiT-Ti.
    'vit_ti16': (16, 192, 12, 768, 3),
    'vit_s16': (16, 384, 12, 1536, 6),
    'vit_b16': (16, 768, 12, 3072, 12),
    'vit_b32': (32, 768, 12, 3072, 12),
}


def vit(size: str, **kwargs) -> ViT:
  patch, width, depth, mlp_dim, heads = VIT_SIZES[size]
  defaults = dict(patch=patch, width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads)
  return ViT(**{**defaults, **kwargs})
