"""Whole-process time of a short run: the CLI vs a hand-written JAX + optax loop doing the same work.

  python experiments/bench_overhead.py [--runs 5] [--steps 600] [--out experiments/bench_overhead.json]
  python experiments/bench_overhead.py --repos=/path/to/old/checkout,.   # before vs after

The work: G-Mix (SAM, rho = 0.05, on the mixup loss, lambda ~ Beta(1, 1), one
lambda and one permutation per batch) on an MLP 40 -> 256 -> 256 -> 10, SGD
(momentum 0.9, Nesterov, weight decay 5e-4, cosine from 0.05), batch 100,
600 steps (60 epochs of 10), on a generated npz of 1000 training and 500
test examples of 40 features (labels from a random linear teacher); a train
record every 20 steps, the test set's accuracy, loss and ECE after every
epoch, the weights saved every 500 steps and at the end.

- ``cli``: ``python -m gmix_jax.main --config=configs/digits.py:gmix`` with
  the dataset, batch, epochs and those cadences set, a fresh workdir each
  time: everything a user's run does (imports, data, validation, compile,
  checkpoints, metrics, evaluations, plot, summary).
- ``plain``: this file with ``--plain``: the same model, optimizer, mixing,
  SAM step, logging, evaluations and saves in about eighty lines of JAX +
  optax, written the fair way: weights drawn with numpy (no op-by-op
  ``jax.random`` compilation), one jitted step, one jitted evaluation.

The kinds alternate (cli, plain, cli, plain, ...; with ``--repos=OLD,NEW``
the CLI of each checkout in turn) so that the load of a shared machine hits
all of them. Printed (and written to ``--out``): the median wall time and
CPU time (user + system of the child, less sensitive to other jobs on the
machine) of each kind, the ratios of those medians to the plain loop's, the
median of the per-round ratios (a round = one run of each kind, back to
back), and the 1-minute load average before and after every run.
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
LOG_EVERY = 20            # steps between train records (the configs' default)
EVAL_EVERY_EPOCHS = 1     # test-set evaluations (the configs' default)
CHECKPOINT_EVERY = 500    # steps between checkpoints (the configs' default)


def make_data(path: str, n_train: int = 1000, n_test: int = 500, dim: int = 40,
              classes: int = 10, seed: int = 0) -> None:
  import numpy as np
  rng = np.random.default_rng(seed)
  teacher = rng.normal(size=(dim, classes))
  x = rng.normal(size=(n_train + n_test, dim)).astype(np.float32)
  y = np.argmax(x @ teacher + 0.5 * rng.normal(size=(n_train + n_test, classes)), 1)
  np.savez(path, x_train=x[:n_train], y_train=y[:n_train], x_test=x[n_train:], y_test=y[n_train:])


def plain(data: str, steps: int, out_dir: str, batch: int = 100, rho: float = 0.05, lr: float = 0.05,
          log_every: int = LOG_EVERY, eval_every_epochs: int = EVAL_EVERY_EPOCHS,
          checkpoint_every: int = CHECKPOINT_EVERY, num_bins: int = 15) -> float:
  """The hand-written loop; returns the final test accuracy.

  The same work as the CLI's run, written the way a careful user would: the
  weights drawn with numpy (nothing to compile), one jitted step, a train
  record (mean loss of the last ``log_every`` steps) appended to
  ``out_dir/metrics.jsonl`` every ``log_every`` steps, the test set's
  accuracy, loss and 15-bin ECE (one jitted function) every
  ``eval_every_epochs`` epochs and at the end, and the parameters saved
  (``np.savez``) every ``checkpoint_every`` steps and at the end.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  f = np.load(data)
  mean, std = f['x_train'].mean(0), f['x_train'].std(0) + 1e-6
  x_train, y_train = (f['x_train'] - mean) / std, f['y_train']
  x_test, y_test = jnp.asarray((f['x_test'] - mean) / std), jnp.asarray(f['y_test'])
  sizes = [x_train.shape[1], 256, 256, 10]
  rng = np.random.default_rng(0)
  params = [(jnp.asarray(rng.normal(size=(a, b)) * (2 / a) ** 0.5, jnp.float32), jnp.zeros(b))
            for a, b in zip(sizes[:-1], sizes[1:])]

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
    value, g = jax.value_and_grad(loss)(p, xm, ym)
    norm = optax.global_norm(g)
    eps = jax.tree.map(lambda t: rho * t / (norm + 1e-12), g)
    g = jax.grad(loss)(jax.tree.map(jnp.add, p, eps), xm, ym)
    updates, state = opt.update(g, state, p)
    return optax.apply_updates(p, updates), state, value

  @jax.jit
  def evaluate(p):
    logits = apply(p, x_test)
    probs = jax.nn.softmax(logits)
    conf, pred = probs.max(-1), probs.argmax(-1)
    correct = (pred == y_test).astype(jnp.float32)
    bins = jnp.clip(jnp.ceil(conf * num_bins).astype(jnp.int32) - 1, 0, num_bins - 1)
    gap = jnp.zeros(num_bins).at[bins].add(correct - conf)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), y_test[:, None], 1).mean()
    return {'accuracy': correct.mean(), 'loss': nll, 'ece': jnp.abs(gap).sum() / y_test.shape[0]}

  state = opt.init(params)
  per_epoch = x_train.shape[0] // batch
  eval_every = per_epoch * eval_every_epochs
  order, pending, result = None, [], {}
  with open(os.path.join(out_dir, 'metrics.jsonl'), 'w') as log:
    for s in range(steps):
      if s % per_epoch == 0:
        order = np.random.default_rng(s // per_epoch).permutation(x_train.shape[0])
      idx = order[(s % per_epoch) * batch:(s % per_epoch + 1) * batch]
      params, state, value = step(params, state, x_train[idx], y_train[idx], jax.random.PRNGKey(s))
      pending.append(value)
      last = s + 1 == steps
      if (s + 1) % log_every == 0 or last:
        log.write(json.dumps({'split': 'train', 'step': s + 1,
                              'loss': float(np.mean(jax.device_get(pending)))}) + '\n')
        pending = []
      if (s + 1) % eval_every == 0 or last:
        result = {k: float(v) for k, v in jax.device_get(evaluate(params)).items()}
        log.write(json.dumps({'split': 'test', 'step': s + 1, **result}) + '\n')
      if (s + 1) % checkpoint_every == 0 or last:
        np.savez(os.path.join(out_dir, f'params_{s + 1}.npz'),
                 *[np.asarray(t) for t in jax.tree.leaves(params)])
  return result['accuracy']


def cli_command(data: str, workdir: str, steps: int, extra: list[str]) -> list[str]:
  epochs = steps // 10                   # 1000 examples / batch 100
  return [sys.executable, '-m', 'gmix_jax.main', '--config=configs/digits.py:gmix',
          f'--workdir={workdir}', f'--config.dataset.name=npz:{data}',
          '--config.batch_size=100', f'--config.num_epochs={epochs}',
          '--config.model.kwargs.hidden_sizes=(256, 256)',
          f'--config.log_every_steps={LOG_EVERY}', f'--config.eval_every_epochs={EVAL_EVERY_EPOCHS}',
          f'--config.checkpoint_every_steps={CHECKPOINT_EVERY}', *extra]


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
  p.add_argument('--runs', type=int, default=5)
  p.add_argument('--steps', type=int, default=600)
  p.add_argument('--cli-args', default='', help='extra flags for the CLI runs')
  p.add_argument('--out', default=None)
  p.add_argument('--repos', default=REPO,
                 help='comma-separated checkouts whose CLI runs, alternated with the plain loop '
                      '(e.g. an older checkout first, for a before/after comparison)')
  p.add_argument('--plain', default=None, help=argparse.SUPPRESS)   # internal: run the plain loop
  a = p.parse_args()
  if a.plain:
    with tempfile.TemporaryDirectory() as out_dir:
      print(f'plain loop test accuracy {plain(a.plain, a.steps, out_dir):.4f}')
    return
  repos = [os.path.abspath(r) for r in a.repos.split(',')]
  kinds = [f'cli:{r}' for r in repos] + ['plain']
  wall = {k: [] for k in kinds}
  cpu = {k: [] for k in kinds}
  loads = []
  with tempfile.TemporaryDirectory() as tmp:
    data = os.path.join(tmp, 'data.npz')
    make_data(data)
    for i in range(a.runs):
      # Alternate the order from round to round as well, so no kind always runs first.
      for j, kind in enumerate(kinds if i % 2 == 0 else kinds[::-1]):
        if kind == 'plain':
          cmd, repo = [sys.executable, os.path.abspath(__file__), '--plain', data,
                       '--steps', str(a.steps)], REPO
        else:
          repo = kind[len('cli:'):]
          cmd = cli_command(data, os.path.join(tmp, f'w{i}_{j}'), a.steps, shlex.split(a.cli_args))
        before = os.getloadavg()[0]
        dt, c, line = _timed(cmd, repo)
        loads.append((before, os.getloadavg()[0]))
        wall[kind].append(dt)
        cpu[kind].append(c)
        print(f'{kind} run {i}: wall {dt:6.2f} s, cpu {c:6.2f} s, load {before:.1f} -> '
              f'{loads[-1][1]:.1f}  {line}', flush=True)
  med = {k: statistics.median(v) for k, v in wall.items()}
  med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
  ratios = {k: med[k] / med['plain'] for k in kinds if k != 'plain'}
  cpu_ratios = {k: med_cpu[k] / med_cpu['plain'] for k in kinds if k != 'plain'}
  round_ratio = lambda xs, k: statistics.median(x / y for x, y in zip(xs[k], xs['plain']))
  paired = {k: {'wall': round_ratio(wall, k), 'cpu': round_ratio(cpu, k)} for k in ratios}
  flat = [x for pair in loads for x in pair]
  print(f'load average (1 min) over the runs: min {min(flat):.1f}, median '
        f'{statistics.median(flat):.1f}, max {max(flat):.1f}; {a.runs} runs of each kind')
  for k in kinds:
    extra = (f'; to plain: wall {ratios[k]:.2f}x, CPU {cpu_ratios[k]:.2f}x (medians), per-round '
             f"median wall {paired[k]['wall']:.2f}x, CPU {paired[k]['cpu']:.2f}x" if k in ratios else '')
    print(f'median {k}: wall {med[k]:.2f} s, CPU {med_cpu[k]:.2f} s{extra}')
  if a.out:
    with open(a.out, 'w') as f:
      json.dump({'wall_sec': wall, 'cpu_sec': cpu, 'median_wall_sec': med,
                 'median_cpu_sec': med_cpu, 'ratio_wall': ratios, 'ratio_cpu': cpu_ratios,
                 'per_round_ratio': paired, 'load_avg_before_after_each_run': loads,
                 'steps': a.steps, 'cli_args': a.cli_args, 'machine': platform.platform(),
                 'cpus': os.cpu_count()}, f, indent=2)


if __name__ == '__main__':
  main()
