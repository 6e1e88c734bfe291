"""Step cost of G-Mix with each sharpness rule against Mixup's step, in pairs.

  python experiments/bench_rules.py                       # the sweep's mnist_subset setting
  python experiments/bench_rules.py --pairs 40 --out experiments/bench_rules_cpu.json

Every row is the library's own compiled step (``parallel.make_per_device_step``
under ``jit(shard_map)``, one device, SGD with Nesterov momentum 0.9, the
rule's state where it keeps one) on the limited-data benchmark's model and
batch (configs/mnist_subset.py: small CNN, width 32, batch 64 as in
experiments/grids.py). It is timed in ``--pairs`` pairs (Mixup step, rule
step) run back to back, the order alternating from pair to pair; the figure is
the median over pairs of the per-pair ratio of process CPU time
(``time.process_time`` around the call and its ``block_until_ready``), with
p25/p75 and the wall-time ratio. On a shared machine a step's speed drifts
with the other jobs' load far more than the differences measured, and pairs
cancel that drift. The 1-minute load average is recorded per row.

LookSAM's step alternates: a full SAM step every k-th step, a one-gradient
step otherwise. Its pairs are split by which step the rule took, and the row
reports both medians and the amortised ratio (r_full + (k − 1) r_cheap)/k,
the cost per step of a run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import numpy as np
import optax

from gmix_jax import models, objectives, parallel
from gmix_jax.sharpness import SharpnessRule

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import bench_step                              # noqa: E402

ROWS = ('mixup', 'gmix', 'gmix:looksam', 'gmix:msam', 'gmix:fsam')


def build(row: str, module, input_shape, batch: int):
  """A ``run()`` that takes one compiled step of ``row`` (``preset[:rule]``)."""
  name, _, rule = row.partition(':')
  overrides = {'sharpness': SharpnessRule(rule)} if rule else {}
  method = objectives.get_method(name, 10, **overrides)
  apply_fn = models.make_apply_fn(module)
  optimizer = optax.sgd(0.05, momentum=0.9, nesterov=True)
  params, model_state = models.init_model(module, jax.random.PRNGKey(0), input_shape)
  extra, kwargs = objectives.rule_step_kwargs(method.sharpness, params)
  state = parallel.create_train_state(params, model_state, optimizer, 0, extra=extra)
  mesh = parallel.make_mesh(1)
  state = parallel.replicate_on_mesh(state, mesh)
  rng = np.random.default_rng(0)
  data = {'x': rng.normal(size=(batch, *input_shape)).astype(np.float32),
          'y': rng.integers(0, 10, size=(batch,)).astype(np.int32)}
  data = parallel.global_batch_to_device(data, mesh, 'batch')
  # LookSAM: its two phases compiled apart and chosen on the host, as the trainer does.
  phases = ('full', 'cheap') if method.sharpness.name == 'looksam' else (None,)
  compiled = {}
  for phase in phases:
    objective = objectives.make_objective(method, apply_fn, axis_name='batch',
                                          looksam_phase=phase)
    step = parallel.shard_map_step(
        parallel.make_per_device_step(objective, optimizer, **kwargs), mesh)
    compiled[phase] = step.lower(state, data).compile()
  carry = {'state': state, 'step': 0}

  def run():
    phase = None
    if method.sharpness.name == 'looksam':
      phase = 'full' if carry['step'] % method.sharpness.looksam_k == 0 else 'cheap'
    carry['state'] = compiled[phase](carry['state'], data)[0]
    carry['step'] += 1
    return carry['state']
  return run, carry, method.sharpness


def timed(fn):
  t, c = time.perf_counter(), time.process_time()
  jax.block_until_ready(fn())
  return time.perf_counter() - t, time.process_time() - c


def measure(ref, run, carry, rule, pairs: int) -> dict:
  """Per-pair CPU and wall ratios run/ref; LookSAM's split by step kind."""
  out = {'full': [], 'cheap': [], 'wall': [], 'cpu_ms': [], 'ref_cpu_ms': []}
  load = [os.getloadavg()[0]]
  for i in range(pairs):
    kind = 'full' if rule.name != 'looksam' or carry['step'] % rule.looksam_k == 0 else 'cheap'
    if i % 2:
      (w1, c1), (w0, c0) = timed(run), timed(ref)
    else:
      (w0, c0), (w1, c1) = timed(ref), timed(run)
    out[kind].append(c1 / c0)
    out['wall'].append(w1 / w0)
    out['cpu_ms'].append(c1 * 1e3)
    out['ref_cpu_ms'].append(c0 * 1e3)
  load.append(os.getloadavg()[0])
  q = lambda xs, p: float(np.percentile(xs, p)) if xs else float('nan')
  row = {'pairs': pairs, 'load_1m': load, 'wall_ratio_median': q(out['wall'], 50),
         'cpu_ms_median': q(out['cpu_ms'], 50), 'ref_cpu_ms_median': q(out['ref_cpu_ms'], 50)}
  if rule.name == 'looksam':
    k = rule.looksam_k
    r_full, r_cheap = q(out['full'], 50), q(out['cheap'], 50)
    row.update(cpu_ratio_full=r_full, cpu_ratio_cheap=r_cheap, full_pairs=len(out['full']),
               cpu_ratio=(r_full + (k - 1) * r_cheap) / k)
  else:
    row.update(cpu_ratio=q(out['full'], 50), cpu_ratio_p25=q(out['full'], 25),
               cpu_ratio_p75=q(out['full'], 75))
  return row


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--rows', default=','.join(ROWS))
  p.add_argument('--baseline', default='mixup')
  p.add_argument('--pairs', type=int, default=25, help='pairs per row (>= 20)')
  p.add_argument('--warmup', type=int, default=3)
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--input', default='28,28,1')
  p.add_argument('--width', type=int, default=32)
  p.add_argument('--out', default=None)
  a = p.parse_args(argv)
  input_shape = tuple(int(v) for v in a.input.split(','))
  module = models.get_model('cnn', 10, width=a.width, norm='none')
  ref, _, _ = build(a.baseline, module, input_shape, a.batch)
  results = {'setting': {'model': f'cnn width {a.width}', 'input': input_shape, 'batch': a.batch,
                         'baseline': a.baseline, 'cpus': os.cpu_count(),
                         'cpu_model': bench_step.cpu_model(), 'cpu_count': os.cpu_count(),
                         'jax': jax.__version__}, 'rows': {}}
  print(f'| row | CPU ratio / {a.baseline} | p25-p75 or full/cheap | wall ratio | CPU ms | '
        f'{a.baseline} CPU ms | load 1m |')
  for row in a.rows.split(','):
    run, carry, rule = build(row, module, input_shape, a.batch)
    for _ in range(a.warmup):
      timed(run), timed(ref)
    # LookSAM: start the pairs on a full step, so every k-th pair is one.
    while rule.name == 'looksam' and carry['step'] % rule.looksam_k:
      timed(run)
    r = measure(ref, run, carry, rule, a.pairs)
    results['rows'][row] = r
    spread = (f"full {r['cpu_ratio_full']:.2f} / cheap {r['cpu_ratio_cheap']:.2f}"
              if rule.name == 'looksam' else f"{r['cpu_ratio_p25']:.2f}-{r['cpu_ratio_p75']:.2f}")
    print(f"| {row} | {r['cpu_ratio']:.2f} | {spread} | {r['wall_ratio_median']:.2f} | "
          f"{r['cpu_ms_median']:.1f} | {r['ref_cpu_ms_median']:.1f} | "
          f"{r['load_1m'][0]:.1f}-{r['load_1m'][1]:.1f} |", flush=True)
    if a.out:
      with open(a.out, 'w') as f:
        json.dump(results, f, indent=2)


if __name__ == '__main__':
  main()
