"""ResNet-18 and PreActResNet-18, CIFAR variants (32x32 inputs).

The CIFAR variants replace the ImageNet stem (7x7/2 conv + max-pool) with a
single 3x3/1 conv, so the four stages run at 32, 16, 8 and 4 pixels for a
32x32 input. This is the form used by the mixup, SAM and G-Mix CIFAR
experiments.

Manifold Mixup points (``mix``, see ``gmix_jax.mixing.HiddenMix``): 0 = the
input, i = the output of stage i (the stem belongs to stage 1), as in the
Manifold Mixup code's PreActResNet (Verma et al. 2019 mix at {0, 1, 2}).
"""

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from gmix_jax.models.cnn import as_image_batch

# He et al. (2015) initialisation for convs that feed ReLUs.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class BasicBlock(nn.Module):
  """Post-activation basic block: conv-BN-ReLU-conv-BN, + shortcut, ReLU."""
  features: int
  strides: int
  conv: Any
  norm: Any

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.features, (3, 3), (self.strides, self.strides))(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.features, (3, 3))(y)
    y = self.norm()(y)
    if x.shape[-1] != self.features or self.strides != 1:
      # Projection shortcut (option B of He et al.): 1x1 conv + BN.
      x = self.conv(self.features, (1, 1), (self.strides, self.strides),
                    name='shortcut_conv')(x)
      x = self.norm(name='shortcut_bn')(x)
    return nn.relu(x + y)


class PreActBlock(nn.Module):
  """Pre-activation basic block: BN-ReLU-conv-BN-ReLU-conv, + shortcut."""
  features: int
  strides: int
  conv: Any
  norm: Any

  @nn.compact
  def __call__(self, x):
    y = nn.relu(self.norm()(x))
    if x.shape[-1] != self.features or self.strides != 1:
      # The projection sees the pre-activated input; an identity shortcut
      # carries the raw input, keeping the residual path free of BN/ReLU.
      x = self.conv(self.features, (1, 1), (self.strides, self.strides),
                    name='shortcut_conv')(y)
    y = self.conv(self.features, (3, 3), (self.strides, self.strides))(y)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.features, (3, 3))(y)
    return x + y


class ResNet(nn.Module):
  """ResNet for CIFAR (He et al. 2016, "Deep Residual Learning for Image
  Recognition", arXiv:1512.03385), with the CIFAR stem.

  3x3 conv(64) -> BN -> ReLU, then four stages of post-activation basic blocks
  with `width * (1, 2, 4, 8)` channels (the first block of stages 2-4 has
  stride 2 and a 1x1-conv + BN projection shortcut), global average pooling,
  Dense classifier. The default `stage_sizes=(2, 2, 2, 2)` is ResNet-18:
  11,173,962 parameters for 10 classes.

  Attributes:
    num_classes: number of output logits.
    stage_sizes: blocks per stage.
    width: channels of the stem and of the first stage.
    bn_momentum: running-average decay (Flax convention; 0.9 corresponds to
      PyTorch's momentum=0.1).
    dtype: compute dtype; logits are cast to float32.
    param_dtype: parameter dtype (keep float32: the optimizer and SAM's ε
      live there).
  """
  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  width: int = 64
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
    conv = functools.partial(nn.Conv, use_bias=False, padding='SAME',
                             kernel_init=conv_init, dtype=self.dtype, param_dtype=self.param_dtype)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=1e-5,
                             dtype=self.dtype, param_dtype=self.param_dtype)
    x = mix(0, as_image_batch(x, self.dtype))
    x = conv(self.width, (3, 3), name='stem_conv')(x)
    x = nn.relu(norm(name='stem_bn')(x))
    for i, n_blocks in enumerate(self.stage_sizes):
      for j in range(n_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = BasicBlock(self.width * 2**i, strides, conv, norm,
                       name=f'stage{i + 1}_block{j + 1}')(x)
      x = mix(i + 1, x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name='head')(x)
    return x.astype(jnp.float32)


class PreActResNet(nn.Module):
  """Pre-activation ResNet for CIFAR (He et al. 2016, "Identity Mappings in
  Deep Residual Networks", arXiv:1603.05027), with the CIFAR stem.

  3x3 conv(64) (no BN/ReLU: the first block pre-activates it), four stages of
  pre-activation basic blocks with `width * (1, 2, 4, 8)` channels (1x1-conv
  projection shortcut on the first block of stages 2-4), a final BN -> ReLU as
  in the paper, global average pooling, Dense classifier. The default
  `stage_sizes=(2, 2, 2, 2)` is PreActResNet-18: 11,172,170 parameters for
  10 classes. (The PreActResNet-18 used by the mixup reference code omits the
  final BN -> ReLU and has 1,024 fewer parameters, 11,171,146.)

  Attributes:
    num_classes: number of output logits.
    stage_sizes: blocks per stage.
    width: channels of the stem and of the first stage.
    bn_momentum: running-average decay (Flax convention; 0.9 corresponds to
      PyTorch's momentum=0.1).
    dtype: compute dtype; logits are cast to float32.
    param_dtype: parameter dtype (keep float32: the optimizer and SAM's ε
      live there).
  """
  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  width: int = 64
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
    conv = functools.partial(nn.Conv, use_bias=False, padding='SAME',
                             kernel_init=conv_init, dtype=self.dtype, param_dtype=self.param_dtype)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=1e-5,
                             dtype=self.dtype, param_dtype=self.param_dtype)
    x = mix(0, as_image_batch(x, self.dtype))
    x = conv(self.width, (3, 3), name='stem_conv')(x)
    for i, n_blocks in enumerate(self.stage_sizes):
      for j in range(n_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = PreActBlock(self.width * 2**i, strides, conv, norm,
                        name=f'stage{i + 1}_block{j + 1}')(x)
      x = mix(i + 1, x)
    x = nn.relu(norm(name='final_bn')(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name='head')(x)
    return x.astype(jnp.float32)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2))
PreActResNet18 = functools.partial(PreActResNet, stage_sizes=(2, 2, 2, 2))
