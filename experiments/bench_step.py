"""Compiled train-step time per method, relative to ERM, in one process.

  python experiments/bench_step.py [--model cnn] [--batch 128] [--steps 30] [--devices 1] [--chunk 32]

Same model, batch and optimizer for every method; the step is the library's
own (`parallel.make_per_device_step` under `jit(shard_map)`), timed as the
median of ``--steps`` calls after two warm-up calls, each ended by
``block_until_ready``. Prints a markdown table; ``--out FILE`` also writes JSON.
"""
import argparse
import json
import os
import platform
import statistics
import time

import jax
import numpy as np
import optax

from gmix_jax import models, objectives, parallel


def bench(method_name, module, input_shape, num_classes, batch, steps, n_dev, overrides):
  apply_fn = models.make_apply_fn(module)
  method = objectives.get_method(method_name, num_classes, **overrides)
  optimizer = optax.sgd(0.05, momentum=0.9)
  params, model_state = models.init_model(module, jax.random.PRNGKey(0), input_shape)
  stale = method.partition.rule != 'none' and method.sensitivity.estimator == 'stale'
  state = parallel.create_train_state(params, model_state, optimizer, 0, num_train=batch if stale else 0)
  mesh = parallel.make_mesh(n_dev)
  step = parallel.shard_map_step(parallel.make_per_device_step(
      objectives.make_objective(method, apply_fn), optimizer, use_stale_scores=stale), mesh)
  state = parallel.replicate_on_mesh(state, mesh)
  rng = np.random.default_rng(0)
  data = {'x': rng.normal(size=(batch, *input_shape)).astype(np.float32),
          'y': rng.integers(0, num_classes, batch).astype(np.int32),
          'index': np.arange(batch, dtype=np.int32)}
  data = parallel.global_batch_to_device(data, mesh, 'batch')
  times = []
  for i in range(steps + 2):
    t = time.perf_counter()
    state, metrics = step(state, data)
    jax.block_until_ready((state, metrics))
    if i >= 2:
      times.append(time.perf_counter() - t)
  return statistics.median(times), float(np.percentile(times, 90))


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--model', default='cnn')
  p.add_argument('--width', type=int, default=32)
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--steps', type=int, default=30)
  p.add_argument('--devices', type=int, default=1)
  p.add_argument('--input', default='28,28,1')
  p.add_argument('--methods', default='erm,mixup,sam,gmix,bgmix,dgmix')
  p.add_argument('--estimators', default='per_example,first_order,shared,stale')
  p.add_argument('--chunk', type=int, default=32, help='sensitivity.chunk (0 = whole batch)')
  p.add_argument('--out', default=None)
  a = p.parse_args()
  input_shape = tuple(int(v) for v in a.input.split(','))
  kwargs = {'width': a.width} if a.model in ('cnn',) else {}
  module = models.get_model(a.model, 10, **kwargs)
  rows = []
  for name in a.methods.split(','):
    variants = [('', {})]
    if name in ('bgmix', 'dgmix'):
      variants = [(f' ({e})', {'sensitivity': {'estimator': e, 'chunk': a.chunk if e in ('per_example', 'first_order') else 0}})
                  for e in a.estimators.split(',')]
    for suffix, overrides in variants:
      med, p90 = bench(name, module, input_shape, 10, a.batch, a.steps, a.devices, overrides)
      rows.append({'method': name + suffix, 'median_ms': med * 1e3, 'p90_ms': p90 * 1e3})
      print(f'{name + suffix:24s} {med * 1e3:8.1f} ms', flush=True)
  erm = next((r['median_ms'] for r in rows if r['method'] == 'erm'), None)
  sam = next((r['median_ms'] for r in rows if r['method'] == 'sam'), None)
  device = f'{jax.devices()[0].device_kind} x{a.devices} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)'
  print(f'\n{a.model} width {a.width}, batch {a.batch}, chunk {a.chunk}, {device}, jax {jax.__version__}, median of {a.steps} steps\n')
  print('| method | ms/step (median) | p90 | × ERM | × SAM |\n| --- | --- | --- | --- | --- |')
  ratio = lambda v, ref: f'{v / ref:.2f}' if ref else 'n/a'
  for r in rows:
    print(f"| {r['method']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | "
          f"{ratio(r['median_ms'], erm)} | {ratio(r['median_ms'], sam)} |")
  if a.out:
    with open(a.out, 'w') as f:
      json.dump({'device': device, 'args': vars(a), 'rows': rows}, f, indent=2)


if __name__ == '__main__':
  main()
