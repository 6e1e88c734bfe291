"""Wide ResNet (WRN-d-k), CIFAR variant."""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from gmix_jax.models.cnn import as_image_batch

# He et al. (2015) initialisation, as in the reference WRN code.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class WideBlock(nn.Module):
  """Pre-activation wide block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3."""
  features: int
  strides: int
  dropout_rate: float
  conv: Any
  norm: Any

  @nn.compact
  def __call__(self, x, train: bool):
    y = nn.relu(self.norm()(x))
    if x.shape[-1] != self.features or self.strides != 1:
      # The 1x1 projection sees the pre-activated input; an identity shortcut
      # carries the raw input.
      x = self.conv(self.features, (1, 1), (self.strides, self.strides),
                    name='shortcut_conv')(y)
    y = self.conv(self.features, (3, 3), (self.strides, self.strides))(y)
    y = nn.relu(self.norm()(y))
    if self.dropout_rate > 0:
      # Active only when training *and* a 'dropout' rng was supplied.
      y = nn.Dropout(self.dropout_rate, deterministic=(
          not train or not self.has_rng('dropout')))(y)
    y = self.conv(self.features, (3, 3))(y)
    return x + y


class WideResNet(nn.Module):
  """Wide ResNet for CIFAR (Zagoruyko & Komodakis 2016, "Wide Residual
  Networks", arXiv:1605.07146).

  3x3 conv(16), three stages of n = (depth - 4) / 6 pre-activation wide blocks
  with 16k, 32k and 64k channels (stride 1, 2, 2; 1x1-conv projection
  shortcut where the shape changes), final BN -> ReLU, global average pooling,
  Dense classifier. WRN-28-10 (depth=28, width=10) has 36,479,194 parameters
  for 10 classes, the figure of the reference implementation.

  Dropout between the two convs of each block (the paper's WRN-28-10-dropout
  uses 0.3) is off by default. When `dropout_rate > 0` it is active only if
  `train=True` and a 'dropout' rng is passed to `apply` (with
  `make_apply_fn`, the optional `rng` argument); otherwise it is the identity.

  Attributes:
    num_classes: number of output logits.
    depth: total depth d; d - 4 must be divisible by 6.
    width: widen factor k.
    dropout_rate: dropout probability inside each block.
    bn_momentum: running-average decay (Flax convention; 0.9 corresponds to
      PyTorch's momentum=0.1).
    dtype: compute dtype; logits are cast to float32.
    param_dtype: parameter dtype (keep float32: the optimizer and SAM's ε
      live there).
  """
  num_classes: int
  depth: int = 28
  width: int = 10
  dropout_rate: float = 0.0
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def mix_points(self) -> int:
    """Manifold Mixup points (``mix``, see ``gmix_jax.mixing.HiddenMix``):
    0 = input, i = the output of stage i, i = 1, 2, 3."""
    return 4

  @nn.compact
  def __call__(self, x, train: bool = False, mix=None):
    mix = mix or (lambda j, h: h)
    if (self.depth - 4) % 6:
      raise ValueError(f'WRN depth - 4 must be divisible by 6; got {self.depth}.')
    n_blocks = (self.depth - 4) // 6
    conv = functools.partial(nn.Conv, use_bias=False, padding='SAME',
                             kernel_init=conv_init, dtype=self.dtype, param_dtype=self.param_dtype)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=1e-5,
                             dtype=self.dtype, param_dtype=self.param_dtype)
    x = mix(0, as_image_batch(x, self.dtype))
    x = conv(16, (3, 3), name='stem_conv')(x)
    for i in range(3):
      for j in range(n_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = WideBlock(16 * self.width * 2**i, strides, self.dropout_rate,
                      conv, norm, name=f'stage{i + 1}_block{j + 1}')(x, train)
      x = mix(i + 1, x)
    x = nn.relu(norm(name='final_bn')(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name='head')(x)
    return x.astype(jnp.float32)
