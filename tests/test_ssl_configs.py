"""configs/ssl.py and configs/ssl_mnist_jpeg.py: every preset and SSL method
validates, and each preset's MoCo step builds (lowered through the whole
step; one also compiled) with a tiny version of its model at 32 px."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common, ssl, ssl_mnist_jpeg
from gmix_jax import configure, models, parallel, tasks

TINY = {'resnet18': dict(stage_sizes=(1, 1), width=4),
        'resnet50': dict(stage_sizes=(1, 1), width=4),
        'cnn': dict(width=4)}


@pytest.mark.parametrize('method', sorted(common.SSL_METHODS))
def test_every_preset_and_method_validates(method):
  for dataset in ssl.PRESETS:
    c = ssl.get_config(f'{dataset},{method}')
    task = 'samix_ssl' if method == 'samix_ssl' else 'moco'
    assert (c.task.name, c.dataset.augment) == (task, 'moco')
    assert c.method.name == common.SSL_METHODS[method]
    configure.validate_config(c)
  configure.validate_config(ssl_mnist_jpeg.get_config(method))


def test_recipes():
  r50 = ssl.get_config('imagenet2012')
  assert (r50.model.name, r50.batch_size, r50.num_epochs, r50.optimizer.learning_rate,
          r50.optimizer.weight_decay, r50.task.queue_size) == ('resnet50', 256, 200, 0.03, 1e-4,
                                                               65536)
  stl = ssl.get_config('stl10')
  assert (stl.dataset.name, stl.dataset.train_split, stl.dataset.image_size) == (
      'tfds:stl10', 'unlabelled+train', 96)       # pretrains on unlabelled + train
  assert ssl.get_config('cifar10').dataset.train_split is None   # = 'train'
  c10 = ssl.get_config('cifar10')
  assert (c10.model.name, c10.dataset.image_size, c10.optimizer.weight_decay) == ('resnet18', 32,
                                                                                  5e-4)
  with pytest.raises(ValueError, match='DATASET must be one of'):
    ssl.get_config('mnist')
  with pytest.raises(ValueError, match='SSL method must be one of'):
    ssl.get_config('cifar10,samix')


def test_the_probe_floor_and_ceiling_configs_validate():
  probe, sup = ssl_mnist_jpeg.get_config('linear_probe'), ssl_mnist_jpeg.get_config('supervised')
  probe.task.pretrained = 'random'
  configure.validate_config(probe)
  configure.validate_config(sup)
  assert 'task' not in sup and sup.method.name == 'erm'
  for field in ('dataset', 'model', 'batch_size', 'num_epochs'):   # the same data, crops, net
    assert probe[field] == sup[field], field


@pytest.mark.parametrize('preset,method,compile', [
    ('cifar10', 'moco_gmix', True), ('cifar100', 'moco_gmix', False),
    ('stl10', 'moco_gmix', False), ('imagenet2012', 'moco_gmix', False),
    ('mnist_jpeg', 'moco_gmix', False), ('mnist_jpeg', 'samix_ssl', True)])
def test_moco_step_builds_with_a_tiny_model(preset, method, compile):
  c = ssl_mnist_jpeg.get_config(method) if preset == 'mnist_jpeg' else ssl.get_config(
      f'{preset},{method}')
  c.model.kwargs.update(TINY[c.model.name])
  c.batch_size, c.task.queue_size, c.task.proj_hidden = 16, 64, 32
  task = tasks.get(c)
  module, apply_fn = task.build_model(c, 10)
  method = task.build_method(c, 10)
  params, ms = models.init_model(module, jax.random.PRNGKey(0), (32, 32, 3))
  ds = types.SimpleNamespace(num_train=1000, num_classes=10, input_shape=(32, 32, 3))
  parts = task.step_parts(c, method, module, apply_fn, ds, 100, params, ms)
  optimizer = configure.build_optimizer(c, steps_per_epoch=10)
  state = parallel.create_train_state(params, ms, optimizer, 0, extra=parts.extra)
  mesh = parallel.make_mesh(2)
  step = parallel.shard_map_step(parallel.make_per_device_step(
      parts.objective, optimizer, extra_update=parts.extra_update), mesh)
  img = jax.ShapeDtypeStruct((16, 32, 32, 3), jnp.float32)
  batch = {'x': img, 'x2': img, 'y': jax.ShapeDtypeStruct((16,), jnp.int32)}
  lowered = step.lower(jax.eval_shape(lambda s: s, state), batch)
  if compile:
    lowered.compile({'xla_backend_optimization_level': 0})
  assert np.shape(parts.extra['queue']) == (64, c.task.proj_dim)
