"""ResNet-50, ImageNet variant (224x224 inputs), in compute dtype `dtype`.

He et al. 2016, "Deep Residual Learning for Image Recognition"
(arXiv:1512.03385), in the "v1.5" form of torchvision and the Flax ImageNet
example: the stride-2 of a downsampling bottleneck sits on its 3x3 conv, not
on the first 1x1.

Manifold Mixup points (``mix``, see ``gmix_jax.mixing.HiddenMix``): 0 = the
input, i = the output of stage i (i = 1..4; the stem belongs to stage 1).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from gmix_jax.models.cnn import as_image_batch

# He et al. (2015) initialisation for convs that feed ReLUs.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class Bottleneck(nn.Module):
  """1x1 (c) -> 3x3 (c, stride) -> 1x1 (4c), BN after each, + shortcut, ReLU.

  `zero_init_scale`: the last BN's scale starts at 0, so every block starts
  as the identity (Goyal et al. 2017, "Accurate, Large Minibatch SGD").
  """
  features: int
  strides: int
  conv: Any
  norm: Any
  zero_init_scale: bool = False

  @nn.compact
  def __call__(self, x):
    y = nn.relu(self.norm()(self.conv(self.features, (1, 1))(x)))
    y = self.conv(self.features, (3, 3), (self.strides, self.strides))(y)
    y = nn.relu(self.norm()(y))
    y = self.conv(4 * self.features, (1, 1))(y)
    scale_init = nn.initializers.zeros if self.zero_init_scale else nn.initializers.ones
    y = self.norm(scale_init=scale_init)(y)
    if x.shape[-1] != 4 * self.features or self.strides != 1:
      # Projection shortcut (option B of He et al.): 1x1 conv + BN.
      x = self.conv(4 * self.features, (1, 1), (self.strides, self.strides),
                    name='shortcut_conv')(x)
      x = self.norm(name='shortcut_bn')(x)
    return nn.relu(x + y)


class ResNet50(nn.Module):
  """ResNet with the ImageNet stem and bottleneck blocks; ResNet-50 by default.

  7x7/2 conv(64) -> BN -> ReLU -> 3x3/2 max-pool, four stages of bottleneck
  blocks (`stage_sizes`, default (3, 4, 6, 3)) with `width * (1, 2, 4, 8)`
  inner channels and 4x as many outputs (stride 2 in the first block of stages
  2-4), global average pooling, Dense classifier. 25,557,032 parameters for
  1000 classes, torchvision's figure for ``resnet50``.

  Attributes:
    num_classes: number of output logits.
    stage_sizes: bottleneck blocks per stage.
    width: inner channels of stage 1 (and stem channels).
    zero_init_residual: start each block's last BN scale at 0.
    bn_momentum: running-average decay (Flax convention; 0.9 = PyTorch's 0.1).
    dtype: compute dtype (e.g. bfloat16). BatchNorm statistics are computed
      in at least float32 by Flax; logits are cast to float32 at the head.
    param_dtype: parameter dtype (keep float32: the optimizer and SAM's ε
      live there).
  """
  num_classes: int
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  zero_init_residual: bool = False
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def mix_points(self) -> int:
    """Manifold Mixup points: 0 = input, i = the output of stage i."""
    return 1 + len(self.stage_sizes)

  @nn.compact
  def __call__(self, x, train: bool = False, mix=None):
    mix = mix or (lambda j, h: h)
    conv = functools.partial(nn.Conv, use_bias=False, padding='SAME', kernel_init=conv_init,
                             dtype=self.dtype, param_dtype=self.param_dtype)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=1e-5,
                             dtype=self.dtype, param_dtype=self.param_dtype)
    x = mix(0, as_image_batch(x, self.dtype))
    x = conv(self.width, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name='stem_conv')(x)
    x = nn.relu(norm(name='stem_bn')(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i, n_blocks in enumerate(self.stage_sizes):
      for j in range(n_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = Bottleneck(self.width * 2**i, strides, conv, norm, self.zero_init_residual,
                       name=f'stage{i + 1}_block{j + 1}')(x)
      x = mix(i + 1, x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                 name='head')(x)
    return x.astype(jnp.float32)
