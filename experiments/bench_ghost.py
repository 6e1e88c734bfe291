"""Cost of the ghost-norm per-example gradient norms against one plain backward pass.

  python experiments/bench_ghost.py --models mlp,cnn,resnet18 --pairs 20

For each model, three compiled functions of the same batch: ``grad`` (the mean
loss and its gradient: one forward and one backward pass, train=False),
``ghost`` (``sensitivity.first_order``: ρ‖∇ℓ_i‖ by the ghost-norm identity,
docs/methods.md § 3.1) and ``vmap`` (the same norms from vmapped per-example
gradients, ``first_order(..., ghost=False)``, ``--chunk`` examples at a
time). Each is timed in ``--pairs`` back-to-back pairs against ``grad``, the
order alternating; the figure is the median per-pair ratio of process CPU
time (p25-p75 in brackets). Prints the 1-minute load average at the start
and end, and the largest relative difference between the two norms.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import numpy as np

from gmix_jax import losses, models, sensitivity

KWARGS = {'mlp': {'hidden_sizes': (256, 256)}, 'cnn': {'width': 32, 'norm': 'batch'},
          'resnet18': {}}
INPUTS = {'mlp': (28, 28, 1), 'cnn': (28, 28, 1), 'resnet18': (32, 32, 3)}


def cpu_time(fn, args):
  c = time.process_time()
  jax.block_until_ready(fn(*args))
  return time.process_time() - c


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--models', default='mlp,cnn,resnet18')
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--chunk', type=int, default=1, help='sensitivity.chunk of the vmapped norms')
  p.add_argument('--pairs', type=int, default=20)
  p.add_argument('--no-vmap', action='store_true', help='time only the ghost norm')
  a = p.parse_args()
  print(f'batch {a.batch}, {a.pairs} pairs, jax {jax.__version__}, {jax.devices()[0].platform}, '
        f'load at start {os.getloadavg()[0]:.1f}')
  print('| model | ghost / grad | vmap / grad | max rel. diff ghost vs vmap |')
  print('| --- | --- | --- | --- |')
  for name in a.models.split(','):
    module = models.get_model(name, 10, **KWARGS[name])
    params, state = models.init_model(module, jax.random.PRNGKey(0), INPUTS[name])
    apply_fn = models.make_apply_fn(module)
    rng = np.random.default_rng(0)
    data = (jax.device_put(rng.normal(size=(a.batch, *INPUTS[name])).astype(np.float32)),
            jax.nn.one_hot(rng.integers(0, 10, a.batch), 10))
    mean_loss = lambda q, x, y: losses.soft_cross_entropy(apply_fn(q, state, x, False)[0], y).mean()
    # the batch is an argument, not a constant XLA could fold into the program
    fns = {'grad': jax.jit(jax.value_and_grad(mean_loss)),
           'ghost': jax.jit(lambda q, x, y: sensitivity.first_order(apply_fn, q, state, x, y, 0.05)),
           'vmap': jax.jit(lambda q, x, y: sensitivity.first_order(apply_fn, q, state, x, y, 0.05,
                                                                   a.chunk, ghost=False))}
    if a.no_vmap:
      fns['vmap'] = fns['ghost']
    for fn in fns.values():
      jax.block_until_ready(fn(params, *data))
    g, v = np.asarray(fns['ghost'](params, *data)), np.asarray(fns['vmap'](params, *data))
    args = (params, *data)
    ratios = {k: [] for k in ('ghost', 'vmap')}
    for i in range(a.pairs):
      for k in ratios:
        if i % 2:
          base = cpu_time(fns['grad'], args)
          t = cpu_time(fns[k], args)
        else:
          t = cpu_time(fns[k], args)
          base = cpu_time(fns['grad'], args)
        ratios[k].append(t / base)
    cell = lambda r: (f'{statistics.median(r):.2f} ({np.percentile(r, 25):.2f}-'
                      f'{np.percentile(r, 75):.2f})')
    print(f"| {name} | {cell(ratios['ghost'])} | {cell(ratios['vmap'])} | "
          f'{np.max(np.abs(g - v) / np.abs(v)):.1e} |', flush=True)
  print(f'load at end {os.getloadavg()[0]:.1f}')


if __name__ == '__main__':
  main()
