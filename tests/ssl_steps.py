"""The data-parallel step of an SSL task (``samix_ssl``, ``samix_ssl_p``) built
from its config, under shard_map and under pmap from one initial state, with
one global batch of query and key views (tests/test_samix_ssl.py,
tests/test_samix_ssl_p.py)."""
import types

import jax
import numpy as np
import optax

from gmix_jax import models, parallel, tasks


def task_step_pair(config, num_train: int):
  """``config``'s task step on 2 devices (a CNN on 8x8x1 digits, 10 classes,
  SGD 0.1, 4 total steps).

  Returns a namespace: ``sm``/``pm`` (the shard_map and pmap programs), ``a``/
  ``b`` (the initial state placed for each), ``before`` (the initial extra
  state, on the host), ``data`` (8 query and 8 key views) and ``pm_data``
  (the same, split for pmap).
  """
  task = tasks.get(config)
  method = task.check_config(config)
  module, apply_fn = task.build_model(config, 10)
  params, state = models.init_model(module, jax.random.PRNGKey(0), (8, 8, 1))
  ds = types.SimpleNamespace(num_train=num_train, input_shape=(8, 8, 1), num_classes=10)
  parts = task.step_parts(config, method, module, apply_fn, ds, 4, params, state)
  optimizer = optax.sgd(0.1)
  ts = parallel.create_train_state(params, state, optimizer, 0, extra=parts.extra)
  step = parallel.make_per_device_step(parts.objective, optimizer,
                                       extra_update=parts.extra_update)
  kx, kx2 = jax.random.split(jax.random.PRNGKey(1))
  data = {'x': np.asarray(jax.random.normal(kx, (8, 8, 8, 1))),
          'x2': np.asarray(jax.random.normal(kx2, (8, 8, 8, 1)))}
  mesh = parallel.make_mesh(2)
  before = jax.device_get(ts.extra)
  return types.SimpleNamespace(
      sm=parallel.shard_map_step(step, mesh), pm=parallel.pmap_step(step, devices=jax.devices()[:2]),
      a=parallel.replicate_on_mesh(ts, mesh), b=parallel.replicate(ts, 2), before=before,
      data=data, pm_data=parallel.shard_batch(data, 2))
