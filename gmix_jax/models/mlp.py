"""Multi-layer perceptron."""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
  """Fully connected ReLU network: flatten -> [Dense(h) -> ReLU]* -> Dense(C).

  Accepts inputs of any rank: everything after the batch axis is flattened.
  No normalisation layers, so every example is processed independently and
  the model state is empty. `train` is accepted for interface uniformity and
  has no effect.

  Attributes:
    num_classes: number of output logits.
    hidden_sizes: widths of the hidden layers.
    dtype: compute dtype; parameters are float32 and logits are cast to
      float32.
  """
  num_classes: int
  hidden_sizes: Sequence[int] = (256, 256)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # No train-time behaviour.
    x = jnp.asarray(x, self.dtype).reshape(x.shape[0], -1)
    for i, h in enumerate(self.hidden_sizes):
      x = nn.relu(nn.Dense(h, dtype=self.dtype, name=f'dense{i}')(x))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return x.astype(jnp.float32)
