"""Whole-process wall time of a short run: the CLI vs a hand-written JAX + optax loop.

  python experiments/bench_overhead.py [--runs 3] [--steps 600] [--out experiments/bench_overhead.json]
  python experiments/bench_overhead.py --repos=/path/to/old/checkout,.   # before vs after

The work: G-Mix (SAM, ρ = 0.05, on the mixup loss, λ ~ Beta(1, 1), one λ and
one permutation per batch) on an MLP 40 → 256 → 256 → 10, SGD (momentum 0.9,
Nesterov, weight decay 5e-4, cosine from 0.05), batch 100, 600 steps, on a
generated npz of 1000 training and 500 test examples of 40 features (labels
from a random linear teacher), test accuracy once at the end.

- ``cli``: ``python -m gmix_jax.main --config=configs/digits.py:gmix`` with
  the dataset, batch and epochs overridden (60 epochs of 10 steps), a fresh
  workdir each time: everything a user's run does (imports, data, validation,
  compile, checkpoints, metrics, evaluations, plot, summary).
- ``plain``: this file with ``--plain``: the same model, optimizer, mixing and
  SAM step in about forty lines of JAX + optax, one jitted step, no
  checkpoints or logging.

The kinds alternate (cli, plain, cli, plain, ...; with ``--repos=OLD,NEW``
the CLI of each checkout in turn) so that the load of a shared machine hits
all of them; the medians of the wall time and of the child's CPU time
(user + system, less sensitive to other jobs on the machine) and their ratios
to the plain loop are printed (and written to ``--out``). Extra CLI flags:
``--cli-args='--config.plots=false'``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_data(path: str, n_train: int = 1000, n_test: int = 500, dim: int = 40,
              classes: int = 10, seed: int = 0) -> None:
  import numpy as np
  rng = np.random.default_rng(seed)
  teacher = rng.normal(size=(dim, classes))
  x = rng.normal(size=(n_train + n_test, dim)).astype(np.float32)
  y = np.argmax(x @ teacher + 0.5 * rng.normal(size=(n_train + n_test, classes)), 1)
  np.savez(path, x_train=x[:n_train], y_train=y[:n_train], x_test=x[n_train:], y_test=y[n_train:])


def plain(data: str, steps: int, batch: int = 100, rho: float = 0.05, lr: float = 0.05,
          init: str = 'jax') -> float:
  """The hand-written loop; returns the test accuracy. ``init='numpy'`` draws
  the initial weights with numpy (no compilation) instead of ``jax.random``."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  f = np.load(data)
  mean, std = f['x_train'].mean(0), f['x_train'].std(0) + 1e-6
  x_train, y_train = (f['x_train'] - mean) / std, f['y_train']
  x_test, y_test = (f['x_test'] - mean) / std, f['y_test']
  sizes = [x_train.shape[1], 256, 256, 10]
  if init == 'numpy':
    rng = np.random.default_rng(0)
    params = [(jnp.asarray(rng.normal(size=(a, b)) * (2 / a) ** 0.5, jnp.float32), jnp.zeros(b))
              for a, b in zip(sizes[:-1], sizes[1:])]
  else:                      # what hand-written code usually does: jax.random, op by op
    keys = jax.random.split(jax.random.PRNGKey(0), len(sizes))
    params = [(jax.random.normal(k, (a, b)) * (2 / a) ** 0.5, jnp.zeros(b))
              for k, a, b in zip(keys, sizes[:-1], sizes[1:])]

  def apply(p, x):
    for w, b in p[:-1]:
      x = jax.nn.relu(x @ w + b)
    return x @ p[-1][0] + p[-1][1]

  def loss(p, x, y):
    return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(apply(p, x)), -1))

  opt = optax.chain(optax.add_decayed_weights(5e-4),
                    optax.sgd(optax.cosine_decay_schedule(lr, steps), momentum=0.9, nesterov=True))

  @jax.jit
  def step(p, state, x, y, key):
    k1, k2 = jax.random.split(key)
    lam = jax.random.beta(k1, 1.0, 1.0)
    perm = jax.random.permutation(k2, x.shape[0])
    y = jax.nn.one_hot(y, 10)
    xm, ym = lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]
    g = jax.grad(loss)(p, xm, ym)
    norm = optax.global_norm(g)
    eps = jax.tree.map(lambda t: rho * t / (norm + 1e-12), g)
    g = jax.grad(loss)(jax.tree.map(jnp.add, p, eps), xm, ym)
    updates, state = opt.update(g, state, p)
    return optax.apply_updates(p, updates), state

  state = opt.init(params)
  per_epoch = x_train.shape[0] // batch
  order = None
  for s in range(steps):
    if s % per_epoch == 0:
      order = np.random.default_rng(s // per_epoch).permutation(x_train.shape[0])
    idx = order[(s % per_epoch) * batch:(s % per_epoch + 1) * batch]
    params, state = step(params, state, x_train[idx], y_train[idx], jax.random.PRNGKey(s))
  return float(np.mean(np.argmax(np.asarray(apply(params, x_test)), 1) == y_test))


def cli_command(data: str, workdir: str, steps: int, extra: list[str]) -> list[str]:
  epochs = steps // 10                   # 1000 examples / batch 100
  return [sys.executable, '-m', 'gmix_jax.main', '--config=configs/digits.py:gmix',
          f'--workdir={workdir}', f'--config.dataset.name=npz:{data}',
          '--config.batch_size=100', f'--config.num_epochs={epochs}',
          '--config.model.kwargs.hidden_sizes=(256, 256)', *extra]


def _timed(cmd: list[str], repo: str) -> tuple[float, float, str]:
  """``(wall seconds, CPU seconds of the child, first stdout line)``."""
  env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get('PYTHONPATH', ''))
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  t = time.perf_counter()
  out = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
  dt = time.perf_counter() - t
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  if out.returncode:
    raise RuntimeError(f'{shlex.join(cmd)} failed:\n{out.stderr[-3000:]}')
  return dt, cpu, out.stdout.strip().splitlines()[0] if out.stdout.strip() else ''


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--runs', type=int, default=3)
  p.add_argument('--steps', type=int, default=600)
  p.add_argument('--cli-args', default='', help='extra flags for the CLI runs')
  p.add_argument('--out', default=None)
  p.add_argument('--repos', default=REPO,
                 help='comma-separated checkouts whose CLI runs, alternated with the plain loop '
                      '(e.g. an older checkout first, for a before/after comparison)')
  p.add_argument('--plain-init', default='jax', choices=('jax', 'numpy'),
                 help="the plain loop's weight init: jax.random (default) or numpy (no compile)")
  p.add_argument('--plain', default=None, help=argparse.SUPPRESS)   # internal: run the plain loop
  a = p.parse_args()
  if a.plain:
    print(f'plain loop test accuracy {plain(a.plain, a.steps, init=a.plain_init):.4f}')
    return
  repos = [os.path.abspath(r) for r in a.repos.split(',')]
  kinds = [f'cli:{r}' for r in repos] + ['plain']
  wall = {k: [] for k in kinds}
  cpu = {k: [] for k in kinds}
  with tempfile.TemporaryDirectory() as tmp:
    data = os.path.join(tmp, 'data.npz')
    make_data(data)
    for i in range(a.runs):
      for j, kind in enumerate(kinds):
        if kind == 'plain':
          cmd, repo = [sys.executable, os.path.abspath(__file__), '--plain', data,
                       '--steps', str(a.steps), '--plain-init', a.plain_init], REPO
        else:
          repo = kind[len('cli:'):]
          cmd = cli_command(data, os.path.join(tmp, f'w{i}_{j}'), a.steps, shlex.split(a.cli_args))
        dt, c, line = _timed(cmd, repo)
        wall[kind].append(dt)
        cpu[kind].append(c)
        print(f'{kind} run {i}: wall {dt:6.2f} s, cpu {c:6.2f} s  {line}', flush=True)
  med = {k: statistics.median(v) for k, v in wall.items()}
  med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
  ratios = {k: med[k] / med['plain'] for k in kinds if k != 'plain'}
  cpu_ratios = {k: med_cpu[k] / med_cpu['plain'] for k in kinds if k != 'plain'}
  for k in kinds:
    extra = (f', ratio to plain: wall {ratios[k]:.2f}x, cpu {cpu_ratios[k]:.2f}x'
             if k in ratios else '')
    print(f'median {k}: wall {med[k]:.2f} s, cpu {med_cpu[k]:.2f} s{extra}')
  if a.out:
    with open(a.out, 'w') as f:
      json.dump({'wall_sec': wall, 'cpu_sec': cpu, 'median_wall_sec': med,
                 'median_cpu_sec': med_cpu, 'ratio_wall': ratios, 'ratio_cpu': cpu_ratios,
                 'steps': a.steps, 'cli_args': a.cli_args, 'plain_init': a.plain_init, 'machine': platform.platform(),
                 'cpus': os.cpu_count(), 'load_avg_at_end': os.getloadavg()}, f, indent=2)

if __name__ == '__main__':
  main()
