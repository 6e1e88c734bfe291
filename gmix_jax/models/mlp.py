"""Multi-layer perceptron."""

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
  """Fully connected ReLU network: flatten -> [Dense(h) -> ReLU]* -> Dense(C).

  Accepts inputs of any rank: everything after the batch axis is flattened.
  Manifold Mixup points (``mix``, see ``gmix_jax.mixing.HiddenMix``): 0 = the
  flattened input, j = the output of hidden layer j (after its ReLU).
  No normalisation layers, so every example is processed independently and
  the model state is empty. `train` is accepted for interface uniformity and
  has no effect.

  Attributes:
    num_classes: number of output logits.
    hidden_sizes: widths of the hidden layers.
    dtype: compute dtype; logits are cast to float32.
    param_dtype: parameter dtype (keep float32: the optimizer and SAM's ε
      live there).
  """
  num_classes: int
  hidden_sizes: Sequence[int] = (256, 256)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def mix_points(self) -> int:
    """Number of Manifold Mixup points: the input and each hidden layer."""
    return 1 + len(self.hidden_sizes)

  @nn.compact
  def __call__(self, x, train: bool = False, mix=None):
    del train  # No train-time behaviour.
    mix = mix or (lambda j, h: h)
    x = mix(0, jnp.asarray(x, self.dtype).reshape(x.shape[0], -1))
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    for i, h in enumerate(self.hidden_sizes):
      x = mix(i + 1, nn.relu(dense(h, name=f'dense{i}')(x)))
    x = dense(self.num_classes, name='head')(x)
    return x.astype(jnp.float32)
