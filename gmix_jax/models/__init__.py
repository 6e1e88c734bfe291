"""Flax (linen) models and the name registry.

The rest of gmix_jax never touches Flax: it reaches a model only through

  apply_fn(params, model_state, x, train) -> (logits, new_model_state)

built here by `make_apply_fn`. `model_state` holds every non-parameter
collection: `{'batch_stats': ...}` for BatchNorm models, `{}` otherwise.

Example:

  module = get_model('cnn', num_classes=10, width=16)
  params, model_state = init_model(module, jax.random.key(0), (28, 28, 1))
  apply_fn = make_apply_fn(module)
  logits, model_state = apply_fn(params, model_state, images, True)
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gmix_jax.models.cnn import CNN
from gmix_jax.models.mlp import MLP
from gmix_jax.models.resnet import PreActResNet, PreActResNet18, ResNet, ResNet18
from gmix_jax.models.resnet50 import ResNet50
from gmix_jax.models.vit import ViT, vit
from gmix_jax.models.wrn import WideResNet

__all__ = [
    'CNN', 'DTYPES', 'MLP', 'MODELS', 'PreActResNet', 'PreActResNet18', 'ResNet',
    'ResNet18', 'ResNet50', 'ViT', 'WideResNet', 'count_params', 'get_model',
    'init_model', 'make_apply_fn',
]

# name -> constructor(num_classes=..., **kwargs) returning a linen Module.
MODELS: dict[str, Callable[..., nn.Module]] = {
    'mlp': MLP,
    'cnn': CNN,
    'resnet18': ResNet18,
    'preact_resnet18': PreActResNet18,
    'wrn28': functools.partial(WideResNet, depth=28),  # kwarg `width`, default 10
    'wrn28_2': functools.partial(WideResNet, depth=28, width=2),
    'wrn28_10': functools.partial(WideResNet, depth=28, width=10),
    # ImageNet models (224 px); every kwarg of the class can be overridden.
    'resnet50': ResNet50,
    'vit_ti16': functools.partial(vit, 'vit_ti16'),
    'vit_s16': functools.partial(vit, 'vit_s16'),
    'vit_b16': functools.partial(vit, 'vit_b16'),
    'vit_b32': functools.partial(vit, 'vit_b32'),
}

# Config field `model.dtype` -> the compute dtype every model takes as `dtype`.
# Parameters stay float32 (`param_dtype`); see gmix_jax/precision.py.
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def get_model(name: str, num_classes: int, dtype: str = 'float32', **kwargs) -> nn.Module:
  """Builds the registered model `name` (config fields `model.name`,
  `model.dtype`: one of DTYPES' names, the compute dtype)."""
  if name not in MODELS:
    raise ValueError(
        f'Unknown model.name {name!r}; valid names: {", ".join(sorted(MODELS))}.')
  return MODELS[name](num_classes=num_classes, dtype=compute_dtype(dtype), **kwargs)


def compute_dtype(name: str):
  """The jnp dtype of config field `model.dtype` (a clear error otherwise)."""
  if name not in DTYPES:
    raise ValueError(f'model.dtype must be one of {", ".join(DTYPES)}; got {name!r}.')
  return DTYPES[name]


def init_model(module: nn.Module, rng: jax.Array,
               input_shape: tuple[int, ...]) -> tuple[Any, dict[str, Any]]:
  """Initialises `module` on zeros of shape (1, *input_shape).

  Returns:
    (params, model_state), where model_state holds every other collection
    (`{'batch_stats': ...}` or `{}`).
  """
  x = jnp.zeros((1, *tuple(input_shape)), jnp.float32)
  # One compiled program rather than op by op. Init runs once, so its cost is
  # compile time: on XLA:CPU the optimising backend spends seconds to tens of
  # seconds on the inlined random initialisers (10 s for a 4-layer CNN), and
  # optimisation level 0 cuts that several-fold for no loss that matters.
  options = ({'xla_backend_optimization_level': 0}
             if jax.default_backend() == 'cpu' else None)
  init = jax.jit(functools.partial(module.init, train=False),
                 compiler_options=options)
  variables = init(rng, x)
  variables = dict(variables)
  params = variables.pop('params')
  return params, variables


def make_apply_fn(module: nn.Module):
  """Returns `apply_fn(params, model_state, x, train, rng=None, mix=None)`.

  - `train` must be a Python bool (it selects the program, not a value).
  - `train=True`: BatchNorm normalises with batch statistics and the returned
    model_state holds the updated running averages.
  - `train=False`: BatchNorm uses the running averages, so each example's
    logits are independent of the rest of the batch; `model_state` is
    returned unchanged (the same object).
  - `rng` is optional and feeds only dropout (the 'dropout' rng stream);
    without it dropout is off. The core calls apply_fn with four positional
    arguments.
  - `mix` is optional: a `mixing.HiddenMix` (Manifold Mixup) that the model
    applies at its mixing points. For a module with a `mix_points` property
    (every model here) the returned function carries it as
    `apply_fn.mix_points`, which is how the core's `manifold` policy learns
    that the model opts in and how many points it has.
  Logits are float32.
  """

  def apply_fn(params, model_state, x, train, rng=None, mix=None):
    variables = {'params': params, **model_state}
    rngs = None if rng is None else {'dropout': rng}
    kwargs = {} if mix is None else {'mix': mix}
    if train and model_state:
      logits, updates = module.apply(
          variables, x, train=True, rngs=rngs, mutable=list(model_state), **kwargs)
      return logits, {**model_state, **updates}
    return module.apply(variables, x, train=train, rngs=rngs, **kwargs), model_state

  if hasattr(module, 'mix_points'):
    apply_fn.mix_points = module.mix_points
  return apply_fn


def count_params(tree) -> int:
  """Number of scalars in a pytree of arrays (or of jax.ShapeDtypeStruct)."""
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))
