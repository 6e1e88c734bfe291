"""configs/imagenet.py and configs/imagenet_vit.py: every preset validates, and
two representative ones build the library's real train step with a tiny model
at 32 px (ViT/GSAM compiled by XLA; ResNet-50/BG-Mix lowered, i.e. traced
through the whole step to StableHLO, which is most of what can fail; its XLA
compile costs over a minute on a loaded 2-core CPU)."""
from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import pytest

from gmix_jax import configure, objectives, parallel

CONFIGS = ('imagenet', 'imagenet_vit')
TINY = {'resnet50': dict(stage_sizes=(1, 1), width=4),
        'vit_b32': dict(patch=8, width=16, depth=1, mlp_dim=32, num_heads=2)}


def get(name, method):
  return importlib.import_module(f'configs.{name}').get_config(method)


@pytest.mark.parametrize('name', CONFIGS)
def test_every_preset_validates(name):
  for method in sorted(objectives.PRESETS):
    config = importlib.import_module(f'configs.{name}').get_config(method)
    assert (config.method.name, config.model.dtype) == (method, 'bfloat16')
    assert config.dataset.image_size == 224 and config.dataset.augment == 'inception'
    configure.validate_config(get(name, method))
    configure.build_optimizer(config, steps_per_epoch=1251)


def test_recipes():
  r50 = get('imagenet', 'sam')
  assert (r50.batch_size, r50.num_epochs, r50.model.name) == (1024, 90, 'resnet50')
  assert r50.optimizer.learning_rate == pytest.approx(0.4)          # 0.1 x 1024 / 256
  vit = get('imagenet_vit', 'gsam')
  method = configure.build_method(vit, 1000)
  assert (vit.batch_size, vit.num_epochs, vit.model.name) == (4096, 300, 'vit_b32')
  assert (method.sharpness.rho, method.sharpness.rho_min, method.sharpness.gsam_alpha,
          method.sharpness.rho_schedule) == (0.6, 0.1, 0.6, 'lr')


@pytest.mark.parametrize('name,method,compile', [('imagenet', 'bgmix', False),
                                                 ('imagenet_vit', 'gsam', True)])
def test_step_builds_with_a_tiny_model(name, method, compile):
  config = get(name, method)
  config.model.kwargs.update(TINY[config.model.name])
  config.batch_size = 16
  if config.method.sensitivity.chunk:
    config.method.sensitivity.chunk = 4
  module, apply_fn = configure.build_model(config, num_classes=1000)
  method_obj = configure.build_method(config, 1000)
  optimizer = configure.build_optimizer(config, steps_per_epoch=10)
  lr = configure.build_lr_schedule(config, 10)
  objective = objectives.make_objective(method_obj, apply_fn, axis_name='batch',
                                        lr_schedule=lr, num_steps=100)
  x = jax.ShapeDtypeStruct((16, 32, 32, 3), jnp.float32)
  state = jax.eval_shape(lambda x: parallel.create_train_state(
      *_split(module.init(jax.random.key(0), x[:1], train=False)), optimizer, 0), x)
  mesh = parallel.make_mesh(2)
  step = parallel.shard_map_step(parallel.make_per_device_step(objective, optimizer), mesh)
  batch = {'x': x, 'y': jax.ShapeDtypeStruct((16,), jnp.int32),
           'index': jax.ShapeDtypeStruct((16,), jnp.int32)}
  lowered = step.lower(state, batch)
  if compile:
    lowered.compile({'xla_backend_optimization_level': 0})
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(state.params))


def _split(variables):
  variables = dict(variables)
  return variables.pop('params'), variables
