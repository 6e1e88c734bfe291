"""What a checkpoint's digest costs next to the checkpoint itself.

  python experiments/bench_digest.py [--mb 100] [--repeats 3]

Builds a train-state-like tree of float32 arrays (``--mb`` MB of parameters
in ResNet-50-like sizes, plus an SGD momentum copy of each), then times
``gmix_jax.digest.record`` (SHA-256 of every array, on the host) and one
Orbax save of the same tree (``checkpoints.save``'s ``StandardSave``, waited
for) into a temporary folder. Prints one JSON line: MB hashed, seconds,
MB/s of the digest and of the save.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import numpy as np

from gmix_jax import digest


def state_like(mb: float, seed: int = 0) -> dict:
  """Params (and a momentum copy) totalling ``2 * mb`` MB, in arrays from
  1 MB to 9 MB (ResNet-50's largest layers are ~9 MB in float32)."""
  rng = np.random.default_rng(seed)
  params, left, i = {}, int(mb * 2**20 / 4), 0
  while left > 0:
    n = min(left, int(rng.integers(2**18, 9 * 2**18)))
    params[f'layer{i}'] = rng.normal(size=n).astype(np.float32)
    left, i = left - n, i + 1
  return {'params': params, 'opt_state': {'momentum': jax.tree.map(np.copy, params)},
          'step': np.int32(0)}


def best_of(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--mb', type=float, default=100.0)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  import orbax.checkpoint as ocp
  tree = state_like(args.mb)
  nbytes = sum(a.nbytes for a in jax.tree.leaves(tree)) / 2**20
  t_digest = best_of(lambda: digest.record(tree, {'pending': []}), args.repeats)
  device_tree = jax.device_put(tree)
  with tempfile.TemporaryDirectory() as d:
    mgr = ocp.CheckpointManager(os.path.join(d, 'ckpt'),
                                options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
    steps = iter(range(1, 1000))
    def save():
      mgr.save(next(steps), args=ocp.args.Composite(state=ocp.args.StandardSave(device_tree)))
      mgr.wait_until_finished()
    t_save = best_of(save, args.repeats)
    mgr.close()
  print(json.dumps({'mb': round(nbytes, 1), 'arrays': len(jax.tree.leaves(tree)),
                    'digest_sec': round(t_digest, 3), 'digest_mb_per_sec': round(nbytes / t_digest),
                    'orbax_save_sec': round(t_save, 3),
                    'orbax_save_mb_per_sec': round(nbytes / t_save),
                    'device': jax.devices()[0].device_kind}))


if __name__ == '__main__':
  main()
