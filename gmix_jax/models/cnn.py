"""A small, cheap convolutional network for digits / MNIST / CIFAR-sized inputs."""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


def as_image_batch(x, dtype):
  """Casts `x` to `dtype` and returns it as (B, H, W, C).

  A rank-3 input (B, H, W) is read as single-channel images.
  """
  x = jnp.asarray(x, dtype)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4:
    raise ValueError(
        f'Convolutional models expect inputs of shape (B, H, W) or '
        f'(B, H, W, C); got shape {x.shape}.')
  return x


class CNN(nn.Module):
  """Small all-convolutional network: three [Conv3x3/2 -> (BN) -> ReLU]
  layers with `width * (1, 2, 4)` channels, global average pooling and a
  Dense classifier (in the spirit of Springenberg et al. 2015, "Striving for
  Simplicity: The All Convolutional Net").

  Each stride-2 conv halves the resolution (28 -> 14 -> 7 -> 4 for MNIST,
  8 -> 4 -> 2 -> 1 for sklearn digits) and the global average pool makes the
  classifier independent of the input size, so any spatial size works.
  Strided convs instead of conv + max-pool: on XLA:CPU the max-pool gradient
  (select-and-scatter) and full-resolution convs cost several times more than
  the whole strided network, and this model exists to be cheap (a training
  step on 128 MNIST images in tens of milliseconds on two CPU cores).

  With `norm='none'` (default) every example is processed independently and
  the model state is empty. With `norm='batch'` a BatchNorm follows each conv:
  `train=True` normalises with batch statistics (and updates the running
  averages in the `batch_stats` collection), `train=False` with the running
  averages.

  Manifold Mixup points (``mix``, see ``gmix_jax.mixing.HiddenMix``): 0 = the
  input, j = the output of conv layer j (after its ReLU), j = 1, 2, 3.

  Attributes:
    num_classes: number of output logits.
    width: channels of the first conv; the next two have 2x and 4x as many.
    norm: 'none' or 'batch'.
    bn_momentum: running-average decay (Flax convention; 0.9 corresponds to
      PyTorch's momentum=0.1).
    dtype: compute dtype; logits are cast to float32.
    param_dtype: parameter dtype (keep float32: the optimizer and SAM's ε
      live there).
  """
  num_classes: int
  width: int = 32
  norm: str = 'none'
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def mix_points(self) -> int:
    """Number of Manifold Mixup points: the input and each conv layer."""
    return 4

  @nn.compact
  def __call__(self, x, train: bool = False, mix=None):
    if self.norm not in ('none', 'batch'):
      raise ValueError(f"norm must be 'none' or 'batch'; got {self.norm!r}.")
    use_bn = self.norm == 'batch'
    # A conv followed by BatchNorm needs no bias: BN's shift replaces it.
    conv = functools.partial(nn.Conv, kernel_size=(3, 3), strides=(2, 2),
                             use_bias=not use_bn, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    norm = functools.partial(
        nn.BatchNorm, use_running_average=not train,
        momentum=self.bn_momentum, epsilon=1e-5, dtype=self.dtype,
        param_dtype=self.param_dtype)

    mix = mix or (lambda j, h: h)
    x = mix(0, as_image_batch(x, self.dtype))
    for i, multiplier in enumerate((1, 2, 4)):
      x = conv(multiplier * self.width, name=f'conv{i}')(x)
      if use_bn:
        x = norm(name=f'bn{i}')(x)
      x = mix(i + 1, nn.relu(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name='head')(x)
    return x.astype(jnp.float32)
