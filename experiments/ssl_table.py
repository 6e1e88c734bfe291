"""The SSL table of docs/ssl.md: kNN and linear-probe top-1 on mnist_jpeg, over seeds.

  python experiments/ssl_table.py --root /tmp/ssl_table --jobs 2          # run what is missing, then the table
  python experiments/ssl_table.py --root /tmp/ssl_table --dry-run         # print the commands only
  python experiments/ssl_table.py --root /tmp/ssl_table --collect         # the table from finished runs

Rows (configs/ssl_mnist_jpeg.py, each seed in ``--seeds``):

  METHOD        pretraining ``:METHOD`` (its final kNN monitor), then
                ``:linear_probe`` on its workdir (probe top-1)
  random init   ``:linear_probe --config.task.pretrained=random``: the
                untrained encoder of that seed (its kNN and probe top-1), the floor
  supervised    ``:supervised``: the same backbone trained end to end with
                labels on the same data and crops, the ceiling

Every run is ``python -m gmix_jax.main`` in ``ROOT/NAME_sSEED`` (under
``nice -n 5``, no progress bar); a run whose ``summary.json`` exists is not
run again, so an interrupted table resumes by running the same command (a
run still training in its workdir, its lock held, is waited for, not
launched twice). At most ``--jobs`` runs at a time (those waited for
included), a probe as soon as its pretraining has finished, in this order:
every row of the first seed (longest first), then the floor and ceiling of
the others, then their pretrainings cheapest first (MoCo, + mixup, + cutmix, then + mixup +
SAM, then SAMix-SSL), so a table cut short holds every row once and the cheap
rows over several seeds. The 1-minute load average is
sampled while they run and written with the table (``ROOT/table.md``).
Mean ± sample standard deviation (n − 1) over the seeds that finished; the
``n`` column says how many.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import subprocess
import sys
import time

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = 'configs/ssl_mnist_jpeg.py'
METHODS = ('moco', 'moco_mixup', 'moco_cutmix', 'moco_gmix', 'samix_ssl')
COST = {'random': 0, 'supervised': 0, 'moco': 1, 'moco_mixup': 1, 'moco_cutmix': 1,
        'moco_gmix': 2, 'samix_ssl': 3}      # rank of a row's pretraining cost (one epoch)


def jobs(root: str, seeds: list[int]) -> list[dict]:
  """Every run of the table, in the order they should start: ``name``,
  ``argv`` (after ``python -m gmix_jax.main``), ``after`` (a run's name)."""
  out = []
  for s in seeds:
    for m in METHODS:
      pre = f'{m}_s{s}'
      out.append({'name': pre, 'after': None, 'row': m, 'seed': s,
                  'argv': [f'--config={CONFIG}:{m}']})
      out.append({'name': f'{pre}_probe', 'after': pre, 'row': m, 'seed': s,
                  'argv': [f'--config={CONFIG}:linear_probe',
                           f'--config.task.pretrained={os.path.join(root, pre)}']})
    out.append({'name': f'random_s{s}_probe', 'after': None, 'row': 'random', 'seed': s,
                'argv': [f'--config={CONFIG}:linear_probe', '--config.task.pretrained=random']})
    out.append({'name': f'supervised_s{s}', 'after': None, 'row': 'supervised', 'seed': s,
                'argv': [f'--config={CONFIG}:supervised']})
    for j in out[-2 * len(METHODS) - 2:]:
      j['argv'] += [f'--workdir={os.path.join(root, j["name"])}', f'--config.seed={s}',
                    '--config.progress=False']
  # The first seed's longest runs first (they set the end); stable: a probe
  # stays right after its pretraining.
  first = lambda j: j['seed'] == seeds[0]
  return sorted(out, key=lambda j: (not first(j), -COST[j['row']] if first(j) else COST[j['row']]))


def busy(root: str, name: str) -> bool:
  """Whether a run (another launch of this script, say) trains in that
  workdir now: its ``.lock`` is held (gmix_jax.lock)."""
  path = os.path.join(root, name, '.lock')
  if not os.path.exists(path):
    return False
  with open(path) as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      return True
    fcntl.flock(f, fcntl.LOCK_UN)
  return False


def command(job: dict) -> list[str]:
  return ['nice', '-n', '5', sys.executable, '-m', 'gmix_jax.main', *job['argv']]


def summary(root: str, name: str) -> dict | None:
  path = os.path.join(root, name, 'summary.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def run_all(root: str, todo: list[dict], max_jobs: int) -> list[float]:
  """Runs the jobs without a summary, ``max_jobs`` at a time; returns the
  1-minute load averages sampled meanwhile."""
  pending = [j for j in todo if summary(root, j['name']) is None]
  running: dict[str, subprocess.Popen] = {}
  failed: set[str] = set()
  loads = []
  while pending or running:
    pending = [j for j in pending if summary(root, j['name']) is None]   # (finished elsewhere)
    for name, proc in list(running.items()):
      if proc.poll() is not None:
        del running[name]
        ok = proc.returncode == 0 and summary(root, name) is not None
        print(f'{time.strftime("%H:%M:%S")} {"done" if ok else "FAILED"} {name}', flush=True)
        if not ok:
          failed.add(name)
    elsewhere = [j for j in pending if busy(root, j['name'])]
    for j in list(pending):
      if len(running) + len(elsewhere) >= max_jobs:
        break
      if j in elsewhere:
        continue
      if j['after'] in failed:
        pending.remove(j)
        failed.add(j['name'])
        continue
      if j['after'] is not None and summary(root, j['after']) is None:
        continue
      pending.remove(j)
      os.makedirs(root, exist_ok=True)
      log = open(os.path.join(root, j['name'] + '.log'), 'w')
      print(f'{time.strftime("%H:%M:%S")} start {j["name"]}: {" ".join(command(j))}', flush=True)
      running[j['name']] = subprocess.Popen(command(j), cwd=ROOT_DIR, stdout=log,
                                            stderr=subprocess.STDOUT)
    loads.append(os.getloadavg()[0])
    time.sleep(5)
  return loads


def mean_std(values: list[float]) -> str:
  if not values:
    return '—'
  m = 100 * statistics.mean(values)
  if len(values) == 1:
    return f'{m:.1f}'
  return f'{m:.1f} ± {100 * statistics.stdev(values):.1f}'


def table(root: str, seeds: list[int]) -> str:
  """The markdown table (kNN and probe top-1 in %, mean ± std over seeds)."""
  rows = [('random init (untrained encoder)', lambda s: f'random_s{s}_probe',
           lambda s: f'random_s{s}_probe')]
  rows += [(m, lambda s, m=m: f'{m}_s{s}', lambda s, m=m: f'{m}_s{s}_probe') for m in METHODS]
  lines = ['| row | kNN top-1 % | linear probe top-1 % | n |', '| --- | --- | --- | --- |']
  for label, knn_run, probe_run in rows:
    knn = [r['final_knn_accuracy'] for r in (summary(root, knn_run(s)) for s in seeds) if r]
    probe = [r['final_test_accuracy'] for r in (summary(root, probe_run(s)) for s in seeds) if r]
    lines.append(f'| {label} | {mean_std(knn)} | {mean_std(probe)} | {len(knn)} / {len(probe)} |')
  sup = [r['final_test_accuracy'] for r in (summary(root, f'supervised_s{s}') for s in seeds) if r]
  lines.append(f'| supervised (same backbone, labels) | — | {mean_std(sup)} | — / {len(sup)} |')
  return '\n'.join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--root', default='/tmp/ssl_table', help='one workdir per run under it')
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument('--jobs', type=int, default=2, help='runs at a time')
  p.add_argument('--dry-run', action='store_true', help='print the commands, run nothing')
  p.add_argument('--collect', action='store_true', help='only the table of finished runs')
  a = p.parse_args()
  seeds = [int(s) for s in a.seeds.split(',')]
  root = os.path.abspath(a.root)
  todo = jobs(root, seeds)
  if a.dry_run:
    for j in todo:
      print(' '.join(command(j)))
    return
  loads = [] if a.collect else run_all(root, todo, a.jobs)
  text = table(root, seeds)
  commits = {r.get('git_commit') for j in todo if (r := summary(root, j['name']))}
  note = (f'seeds {a.seeds}; commit(s) {", ".join(sorted(c for c in commits if c)) or "?"}; '
          f'{os.cpu_count()}-core CPU')
  if loads:
    note += (f'; 1-min load average while running: min {min(loads):.1f}, median '
             f'{statistics.median(loads):.1f}, max {max(loads):.1f}')
  print(f'\n{text}\n\n{note}')
  with open(os.path.join(root, 'table.md'), 'a') as f:
    f.write(f'{text}\n\n{note}\n\n')


if __name__ == '__main__':
  main()
