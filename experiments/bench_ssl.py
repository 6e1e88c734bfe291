"""Cost of a compiled SSL train step relative to MoCo v2, timed in back-to-back pairs.

  python experiments/bench_ssl.py                                  # every SSL method vs moco
  python experiments/bench_ssl.py --methods moco_gmix,samix_ssl --pairs 40

Rows are configs/ssl_mnist_jpeg.py's methods (configs/common.py
``SSL_METHODS``: ``moco_mixup``, ``moco_cutmix``, ``moco_gmix``,
``samix_ssl``), each the task's own step (``tasks.get(config).step_parts``:
the query and momentum encoders, the all-gathered queue, shuffled BN,
SAMix-SSL's mixblock and its Adam) under ``jit(shard_map)`` on the config's
model (CNN width 32, BatchNorm, head 512 → 128, 32 x 32 x 3 inputs, queue
3840), as ``python -m gmix_jax.main`` compiles it, on a fixed random batch of
two views. ``--width``, ``--batch``, ``--queue`` and ``--input`` shrink it.
The baseline is ``moco``; a ``moco`` row shows the noise floor.

The timing is experiments/bench_step.py's (``paired``: per-pair CPU-time and
wall-time ratios, the order alternating, median and p25-p75; the 1-minute
load average before and after every row), and so is the table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import types

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common, ssl_mnist_jpeg                      # noqa: E402
from experiments import bench_step                              # noqa: E402
from gmix_jax import configure, models, parallel, tasks          # noqa: E402

BASELINE = 'moco'


def ssl_config(method: str, width: int, batch: int, queue: int):
  c = ssl_mnist_jpeg.get_config(method)
  c.model.kwargs = {**c.model.kwargs, 'width': width}
  c.batch_size, c.task.queue_size = batch, queue
  return c


def build_ssl_step(method: str, width: int, batch: int, queue: int, input_shape, n_dev: int = 1,
                   num_train: int = 4000):
  """``(run, info)`` as ``bench_step.build_step``: ``run()`` advances the
  row's own state (model, queue, momentum encoder, mixblock) by one step."""
  c = ssl_config(method, width, batch, queue)
  configure.validate_config(c)
  task = tasks.get(c)
  module, apply_fn = task.build_model(c, 10)
  method_ = task.build_method(c, 10)
  params, model_state = models.init_model(module, jax.random.PRNGKey(0), input_shape)
  ds = types.SimpleNamespace(num_train=num_train, num_classes=10, input_shape=input_shape)
  steps_per_epoch = num_train // batch
  parts = task.step_parts(c, method_, module, apply_fn, ds, steps_per_epoch * c.num_epochs, params,
                          model_state)
  optimizer = task.build_optimizer(c, steps_per_epoch)
  state = parallel.create_train_state(params, model_state, optimizer, 0, extra=parts.extra)
  mesh = parallel.make_mesh(n_dev)
  step = parallel.shard_map_step(parallel.make_per_device_step(
      parts.objective, optimizer, extra_update=parts.extra_update), mesh)
  state = parallel.replicate_on_mesh(state, mesh)
  rng = np.random.default_rng(0)
  batch_ = {'x': rng.normal(size=(batch, *input_shape)).astype(np.float32),
            'x2': rng.normal(size=(batch, *input_shape)).astype(np.float32),
            'y': rng.integers(0, 10, batch).astype(np.int32)}
  data = parallel.global_batch_to_device(batch_, mesh, 'batch')
  t = time.perf_counter()
  compiled = step.lower(state, data).compile()
  info = {'compile_s': time.perf_counter() - t, **bench_step._memory(compiled)}  # pylint: disable=protected-access
  carry = [state]

  def run():
    carry[0] = compiled(carry[0], data)[0]
    return carry[0]
  return run, info


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--methods', default='moco,moco_mixup,moco_cutmix,moco_gmix,samix_ssl')
  p.add_argument('--width', type=int, default=32)
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--queue', type=int, default=3840)
  p.add_argument('--input', default='32,32,3')
  p.add_argument('--pairs', type=int, default=20)
  p.add_argument('--reps', type=int, default=1, help='steps per half of a pair')
  p.add_argument('--warmup', type=int, default=3)
  p.add_argument('--out', default=None)
  a = p.parse_args(argv)
  methods = [m for m in a.methods.split(',') if m]
  bad = sorted(set(methods) - set(common.SSL_METHODS))
  if bad:
    p.error(f'--methods: {bad[0]!r} is not an SSL method; one of {sorted(common.SSL_METHODS)}')
  input_shape = tuple(int(v) for v in a.input.split(','))
  build = lambda m: build_ssl_step(m, a.width, a.batch, a.queue, input_shape)

  def warm(run):
    for _ in range(a.warmup):
      jax.block_until_ready(run())
    return run

  device = f'{jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}, ' \
           f'{os.cpu_count()} cores)'
  result = {'device': device, 'cpu_model': bench_step.cpu_model(), 'cpu_count': os.cpu_count(),
            'jax': jax.__version__, 'args': vars(a), 'baselines': [BASELINE],
            'load_at_start': os.getloadavg(), 'rows': []}
  print(f'ssl_mnist_jpeg CNN width {a.width}, batch {a.batch}, queue {a.queue}, {device}; '
        f'{a.pairs} pairs per row; load average at start {os.getloadavg()[0]:.2f}', flush=True)
  print(bench_step.markdown_header([BASELINE]), flush=True)
  base = warm(build(BASELINE)[0])
  for m in methods:
    run, info = build(m)
    warm(run)
    row = {'method': m, 'batch': a.batch, **info, 'load_before': os.getloadavg()[0],
           'vs': {BASELINE: bench_step.paired(base, run, a.pairs, a.reps)}}
    row.update(cpu_ms=row['vs'][BASELINE]['cpu_ms'], wall_ms=row['vs'][BASELINE]['wall_ms'],
               load_after=os.getloadavg()[0])
    result['rows'].append(row)
    print(bench_step.markdown_row(row, [BASELINE]), flush=True)
    if a.out:
      with open(a.out, 'w') as f:
        json.dump(result, f, indent=2)
  result['load_at_end'] = os.getloadavg()
  print(f"load average (1, 5, 15 min) at start {tuple(round(x, 2) for x in result['load_at_start'])}, "
        f"at end {tuple(round(x, 2) for x in result['load_at_end'])}")
  if a.out:
    with open(a.out, 'w') as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == '__main__':
  main()
