"""Why Manifold Mixup's step measures cheaper than ERM's on a CPU (docs/cost.md).

  python experiments/bench_manifold_cond.py --pairs 20
  python experiments/bench_manifold_cond.py --pairs 0 --profile 40   # time per XLA fusion

Manifold Mixup does ERM's work plus one mix; its ``lax.cond`` at each mixing
point (``mixing.HiddenMix``) only changes how XLA compiles the step. This
script prints XLA's FLOP count of the ERM, Manifold Mixup and G-Mix / Manifold
G-Mix steps, then times, in back-to-back pairs against plain ERM
(``bench_step.paired``), ERM with an identity ``lax.cond`` that never mixes at
the given mixing points, and Manifold Mixup itself. Same model, batch and
optimizer as ``bench_step.py`` (small CNN width 32, batch 128). ``--profile N``
also traces N steps of each (``jax.profiler``, in alternating blocks of 10)
and prints the mean time per step of each XLA thunk (fusion, convolution)
whose time differs most between the two.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import bench_step                              # noqa: E402
from gmix_jax import mixing, models, objectives, parallel       # noqa: E402


def build(name: str, points=(), batch: int = 128):
  """``(run, compiled)`` of preset ``name``; ``points``: mixing points where
  the model gets an identity ``lax.cond`` (its predicate traced, never true)."""
  module = models.get_model('cnn', 10, width=32)
  apply_fn = models.make_apply_fn(module)
  if points:
    base = apply_fn

    def apply_fn(p, ms, x, train, mix=None):
      del mix
      b = x.shape[0]
      never = (x.reshape(b, -1)[0, 0] > 1e30).astype(jnp.int32) - 1      # traced: -1
      hm = mixing.HiddenMix(never, jnp.ones((b,)), jnp.arange(b))
      return base(p, ms, x, train, mix=lambda j, h: hm(j, h) if j in points else h)
  method = objectives.get_method(name, 10)
  objective = objectives.make_objective(method, apply_fn)
  params, ms = models.init_model(module, jax.random.PRNGKey(0), (28, 28, 1))
  opt = optax.sgd(0.05, momentum=0.9)
  mesh = parallel.make_mesh(1)
  state = parallel.replicate_on_mesh(parallel.create_train_state(params, ms, opt, 0), mesh)
  step = parallel.shard_map_step(parallel.make_per_device_step(objective, opt), mesh)
  data = parallel.global_batch_to_device(bench_step._random_batch(batch, (28, 28, 1), 10), mesh,  # pylint: disable=protected-access
                                         'batch')
  compiled = step.lower(state, data).compile()
  carry = [state]

  def run():
    carry[0] = compiled(carry[0], data)[0]
    return carry[0]
  for _ in range(3):
    jax.block_until_ready(run())
  return run, compiled


def flops(compiled) -> float:
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)['flops']


def thunk_ms(runs: dict, steps: int, block: int = 10) -> dict:
  """``{name: {thunk: ms per step}}`` from a ``jax.profiler`` trace of ``steps``
  steps of each run, in alternating blocks (the load drifts alike for both)."""
  out = {name: collections.Counter() for name in runs}
  for start in range(0, steps, block):
    for name, run in runs.items():
      with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
          for _ in range(min(block, steps - start)):
            jax.block_until_ready(run())
        with gzip.open(glob.glob(f'{d}/**/*.trace.json.gz', recursive=True)[0]) as f:
          events = json.load(f)
      for e in (events['traceEvents'] if isinstance(events, dict) else events):
        thunk = e.get('name', '')
        if e.get('ph') == 'X' and ('fusion' in thunk or thunk.startswith('convolution')):
          out[name][thunk] += e.get('dur', 0) / 1e3 / steps
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--pairs', type=int, default=20)
  p.add_argument('--profile', type=int, default=0, help='steps of each step to trace')
  a = p.parse_args(argv)
  for name in ('erm', 'manifold_mixup', 'gmix', 'manifold_gmix'):
    print(f'{name}: {flops(build(name)[1]) / 1e9:.3f} GFLOP', flush=True)
  erm, _ = build('erm')
  rows = [('ERM, identity cond at point 0', 'erm', (0,)), ('... at point 1', 'erm', (1,)),
          ('... at point 2', 'erm', (2,)), ('... at point 3', 'erm', (3,)),
          ('... at points 0-3', 'erm', (0, 1, 2, 3)), ('Manifold Mixup', 'manifold_mixup', ())]
  if a.pairs:
    print(f'load average {os.getloadavg()[0]:.1f}; CPU × plain ERM, median of {a.pairs} pairs '
          '(p25-p75)')
  for label, name, points in rows if a.pairs else ():
    r = bench_step.paired(erm, build(name, points)[0], a.pairs)['cpu_ratio']
    print(f'{label}: {r[1]:.2f} ({r[0]:.2f}-{r[2]:.2f}), load {os.getloadavg()[0]:.1f}', flush=True)
  if a.profile:
    t = thunk_ms({'erm': erm, 'manifold_mixup': build('manifold_mixup')[0]}, a.profile)
    print(f'ms per step by thunk (same names: same role in both programs); load '
          f'{os.getloadavg()[0]:.1f}')
    names = sorted(set(t['erm']) | set(t['manifold_mixup']),
                   key=lambda n: -abs(t['erm'][n] - t['manifold_mixup'][n]))
    for n in names[:8]:
      print(f"  {n}: ERM {t['erm'][n]:.2f}, Manifold Mixup {t['manifold_mixup'][n]:.2f}")
    print(f"  all fusions and convolutions: ERM {sum(t['erm'].values()):.1f}, "
          f"Manifold Mixup {sum(t['manifold_mixup'].values()):.1f}")


if __name__ == '__main__':
  main()
