"""Run a grid of trainings (experiments/grids.py), measure each trained model,
write one JSON record per run.

  python experiments/sweep.py --grid benchmark --dry-run          # list the runs
  python experiments/sweep.py --grid benchmark --workers 8
  python experiments/sweep.py --grid ablation --workers 8 --filter bgmix
  python experiments/report.py                                     # tables + plots

Each run: ``train.train_and_evaluate`` in its own workdir under ``--scratch``
(not committed), then the final checkpoint is restored
(``train.restore_state``) and ``gmix_jax.analysis`` measures loss, accuracy,
ECE, Hessian λ_max and ρ-sharpness on a fixed, class-stratified subset of
``--eval-examples`` test images (``eval_subset``); accuracy, loss and ECE
on the whole test split come from the trainer's final evaluation. The record goes to
``<results>/<grid>/<run_id>.json`` (written atomically); a run whose record
exists (same step budget) is skipped, so an interrupted sweep resumes by
running the same command. A failed run writes ``error.txt`` in its workdir
and no record (it is retried next time).

Speed: every run evaluates the test set once, at the end
(``eval_every_epochs``), writes one checkpoint, no plots, no progress bar.
``--workers N`` runs N worker processes, each its own JAX process, fed runs
from a queue (``concurrent.futures``); on a CPU each worker is pinned to its share of the cores
(``sched_setaffinity``), on a GPU they share it (no preallocation, a 1/N
memory fraction each). Compiled programs go to a persistent compilation
cache (``<scratch>/jax_cache``): a method's step recompiles for a new
training-set size (the LR schedule's length is baked in) but not for a new
seed. Worker output goes to ``<workdir>/log.txt``.
"""
from __future__ import annotations

import argparse
from concurrent import futures
from concurrent.futures.process import BrokenProcessPool
import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)           # gmix_jax, configs, experiments importable as a script too

from experiments import grids  # noqa: E402

DEFAULT_RESULTS = os.path.join(ROOT, 'experiments', 'results')
DEFAULT_SCRATCH = os.path.join(ROOT, 'workdirs', 'sweep')
DEFAULT_DATA = os.path.join(ROOT, 'data')


# ----------------------------------------------------------------------------
# One run (inside a worker process).
# ----------------------------------------------------------------------------
def _set(config, dotted: str, value) -> None:
  *path, last = dotted.split('.')
  node = config
  for key in path:
    node = node[key]
  node[last] = value


def make_config(run: grids.Run, opts: dict):
  """The run's ml_collections config (before the epoch count is known)."""
  import importlib
  from configs import common
  config = importlib.import_module(f'configs.{run.dataset}').get_config(run.method)
  for key, value in {**grids.DATASET_OVERRIDES[run.dataset],
                     **grids.METHOD_OVERRIDES.get(run.method, {}), **dict(run.overrides)}.items():
    _set(config, key, value)
  if opts.get('sens_chunk') is not None and run.method not in common.SAMIX_METHODS:
    config.method.sensitivity.chunk = opts['sens_chunk']
  config.seed = run.seed
  config.dataset.examples_per_class = run.examples_per_class
  config.dataset.data_dir = opts['data_dir']
  config.batch_size = run.batch_size
  config.num_devices = 1                  # one device per worker; same semantics everywhere
  config.progress = False
  config.log_every_steps = max(1, run.steps // 20)   # a 20-point training curve
  config.checkpoint_every_steps = 10 ** 9  # only the final checkpoint (and epoch ends below)
  config.keep_checkpoints = 1
  config.eval_every_epochs = 10 ** 6       # test-set evaluation at the last step only
  config.plots = False
  return config


def _git() -> dict:
  def out(*args):
    try:
      return subprocess.run(['git', *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
      return ''
  return {'git_commit': out('rev-parse', 'HEAD') or None,
          'git_dirty': bool(out('status', '--porcelain', '--untracked-files=no'))}


def _curve(workdir: str) -> list[dict]:
  """The training curve kept in the record: train loss per log window, test evals."""
  path = os.path.join(workdir, 'metrics.jsonl')
  keep = ('split', 'step', 'epoch', 'loss', 'accuracy', 'ece', 'grad_norm')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [{k: r[k] for k in keep if k in r} for r in map(json.loads, f)]


EVAL_SUBSET_SEED = 0    # the same analysis subset for every run


def eval_subset(x, y, n: int):
  """A fixed, class-stratified subset of ``n`` examples of ``(x, y)`` (all
  when n ≥ len): mnist_subset's test split is sorted by class, so its first
  n images would miss whole classes."""
  import numpy as np
  from gmix_jax import data as data_lib
  y = np.asarray(y)
  if n >= y.shape[0]:
    return x, y
  idx = data_lib.subsample_indices(y, train_fraction=n / y.shape[0], seed=EVAL_SUBSET_SEED)
  return x[idx], y[idx]


def record_path(results: str, run: grids.Run) -> str:
  return os.path.join(results, run.grid, f'{run.run_id}.json')


def workdir_of(scratch: str, run: grids.Run) -> str:
  return os.path.join(scratch, run.grid, f't{run.steps}', run.run_id)


def execute(run: grids.Run, opts: dict) -> dict:
  """Train, analyse, write the record. Returns a short status dict (never raises)."""
  workdir = workdir_of(opts['scratch'], run)
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  log = open(os.path.join(workdir, 'log.txt'), 'a')
  saved = (os.dup(1), os.dup(2)) if opts.get('redirect', True) else None
  if saved:
    sys.stdout.flush(); sys.stderr.flush()
    os.dup2(log.fileno(), 1); os.dup2(log.fileno(), 2)
  try:
    rec = _execute(run, opts, workdir)
    return {'run_id': run.run_id, 'ok': True, 'wall': time.time() - t0,
            'accuracy': rec['final_test_accuracy'], 'lambda_max': rec['lambda_max']}
  except Exception:  # noqa: BLE001 -- one failed run must not stop the sweep
    err = traceback.format_exc()
    with open(os.path.join(workdir, 'error.txt'), 'w') as f:
      f.write(err)
    return {'run_id': run.run_id, 'ok': False, 'wall': time.time() - t0,
            'error': err.strip().splitlines()[-1]}
  finally:
    if saved:
      sys.stdout.flush(); sys.stderr.flush()
      os.dup2(saved[0], 1); os.dup2(saved[1], 2)
      os.close(saved[0]); os.close(saved[1])
    log.close()


def _execute(run: grids.Run, opts: dict, workdir: str) -> dict:
  import jax
  import numpy as np
  from gmix_jax import analysis, models, train
  from gmix_jax import data as data_lib

  config = make_config(run, opts)
  t0 = time.time()
  # The budget in epochs for this training-set size (same data the trainer loads).
  ds = data_lib.load_dataset(config.dataset.name, config.dataset.data_dir)
  n_train = ds.x_train.shape[0]
  if run.examples_per_class is not None:
    n_train = data_lib.subsample(ds.x_train, ds.y_train, examples_per_class=run.examples_per_class,
                                 seed=run.seed)[1].shape[0]
  spe = data_lib.steps_per_epoch(n_train, run.batch_size)
  config.num_epochs = max(1, round(run.steps / spe))
  summary = train.train_and_evaluate(config, workdir)
  if summary.get('preempted'):
    raise RuntimeError(f'preempted at step {summary["step"]}')
  t_train = time.time() - t0

  # -- Flatness and calibration of the final weights --------------------------
  t1 = time.time()
  _, state = train.restore_state(workdir)
  module = models.get_model(config.model.name, ds.num_classes, **config.model.kwargs)
  apply_fn = models.make_apply_fn(module)
  x_eval, y_eval = eval_subset(ds.x_test, ds.y_test, opts['eval_examples'])
  ana = analysis.analyse(apply_fn, state['params'], state['model_state'],
                         x_eval, y_eval, ds.num_classes,
                         batch_size=opts['eval_batch'], rho=opts['rho'],
                         ascent_steps=opts['ascent_steps'], power_iters=opts['power_iters'])
  t_analysis = time.time() - t1

  device = jax.devices()[0]
  rec = {
      'run_id': run.run_id, 'grid': run.grid, 'dataset': run.dataset, 'method': run.method,
      'variant': run.variant, 'examples_per_class': run.examples_per_class, 'size': run.size,
      'seed': run.seed, 'overrides': dict(run.overrides),
      'target_steps': run.steps, 'steps': summary['steps'], 'epochs': summary['epochs'],
      'batch_size': run.batch_size, 'num_train': summary['num_train'],
      'num_test': summary['num_test'],
      'final_test_accuracy': summary['final_test_accuracy'],
      'best_test_accuracy': summary['best_test_accuracy'],
      'final_test_loss': summary['final_test_loss'],
      'final_test_ece': summary['final_test_ece'],
      'ece': ana['ece'], 'lambda_max': ana['lambda_max'], 'rho_sharpness': ana['rho_sharpness'],
      'analysis': ana,
      'train_wall_time_sec': t_train, 'analysis_wall_time_sec': t_analysis,
      'wall_time_sec': t_train + t_analysis,
      'nonfinite_skipped': summary.get('nonfinite_skipped', 0),
      'curve': _curve(workdir),
      'config': json.loads(config.to_json()),
      **_git(),
      'device': f'{device.platform}:{getattr(device, "device_kind", "")}',
      'jax_version': jax.__version__, 'python': platform.python_version(),
      'host': platform.node(), 'finished_at': time.strftime('%Y-%m-%dT%H:%M:%S'),
      'workdir': workdir,
  }
  path = record_path(opts['results'], run)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.tmp.{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(rec, f, indent=1)
  os.replace(tmp, path)
  if not (run.keep_checkpoint or opts.get('keep_workdirs')):
    shutil.rmtree(os.path.join(workdir, 'checkpoints'), ignore_errors=True)
  return rec


# ----------------------------------------------------------------------------
# Worker processes.
# ----------------------------------------------------------------------------
def _setup_jax(cache_dir: str | None) -> None:
  if not cache_dir:
    return
  import jax
  jax.config.update('jax_compilation_cache_dir', cache_dir)
  # Cache every program: the sweep's steps compile in ~1 s each on a GPU,
  # below the default threshold, and there are hundreds of them.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def _worker_init(cores_queue, cache_dir: str | None) -> None:
  cores = cores_queue.get() if cores_queue is not None else None
  if cores:
    os.sched_setaffinity(0, cores)
  _setup_jax(cache_dir)


def _worker_run(args):
  run, opts = args
  return execute(run, opts)


def _cpu_shares(workers: int) -> list[list[int]] | None:
  cores = sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else []
  if workers < 2 or len(cores) < workers:
    return None
  k = len(cores) // workers
  return [cores[i * k:(i + 1) * k] for i in range(workers)]


def _fmt(sec: float) -> str:
  sec = int(sec)
  return f'{sec // 3600}:{sec % 3600 // 60:02d}:{sec % 60:02d}'


def _done(run: grids.Run, results: str) -> bool:
  path = record_path(results, run)
  if not os.path.exists(path):
    return False
  try:
    with open(path) as f:
      return json.load(f).get('target_steps') == run.steps
  except ValueError:
    return False


def _prepare_data(runs, data_dir: str) -> None:
  """Prepare each dataset once, before workers race to build it."""
  from gmix_jax import data as data_lib
  for name in sorted({r.dataset for r in runs}):
    data_lib.load_dataset(name, data_dir)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--grid', default='benchmark', choices=sorted(grids.GRIDS))
  p.add_argument('--filter', default=None, help='regex searched in run ids (re.search)')
  p.add_argument('--seeds', default=None, help='comma list, e.g. 0,1,2')
  p.add_argument('--steps', type=int, default=None, help='optimizer steps per run (grid default)')
  p.add_argument('--methods', default=None, help='comma list (grid default); absent ones skipped')
  p.add_argument('--workers', type=int, default=1,
                 help='worker processes (0: run in this process, for tests/debugging)')
  p.add_argument('--limit', type=int, default=None, help='run at most this many (after filters)')
  p.add_argument('--deadline', type=float, default=None,
                 help='seconds: start no new run after this, finish the ones in flight (up to '
                      'workers + 1 runs already handed to the pool still start)')
  p.add_argument('--dry-run', action='store_true', help='list the runs and exit')
  p.add_argument('--results', default=DEFAULT_RESULTS)
  p.add_argument('--scratch', default=DEFAULT_SCRATCH, help='workdirs + compilation cache')
  p.add_argument('--data-dir', default=DEFAULT_DATA)
  p.add_argument('--sens-chunk', type=int, default=None,
                 help='method.sensitivity.chunk for every run (configs: 1, best on CPU; '
                      'on a GPU use the batch, 64)')
  p.add_argument('--eval-examples', type=int, default=512, help='test subset for λ_max / ρ-sharpness')
  p.add_argument('--eval-batch', type=int, default=128)
  p.add_argument('--rho', type=float, default=0.05, help='radius of ρ-sharpness')
  p.add_argument('--ascent-steps', type=int, default=5)
  p.add_argument('--power-iters', type=int, default=20)
  p.add_argument('--keep-workdirs', action='store_true', help='keep every checkpoint')
  p.add_argument('--no-compile-cache', action='store_true',
                 help='no persistent compilation cache (tests: leave JAX\'s global config alone)')
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  seeds = [int(s) for s in args.seeds.split(',')] if args.seeds else None
  methods = args.methods.split(',') if args.methods else None
  runs, notes = grids.get_grid(args.grid, seeds=seeds, steps=args.steps, methods=methods)
  if args.filter:
    runs = [r for r in runs if re.search(args.filter, r.run_id)]
  todo = grids.schedule([r for r in runs if not _done(r, args.results)])
  if args.limit is not None:
    todo = todo[:args.limit]
  for note in notes:
    print(f'note: {note}')
  print(f'grid {args.grid}: {len(runs)} runs, {len(runs) - len(todo) if args.limit is None else "-"}'
        f' already recorded, {len(todo)} to run ({args.workers or "in-process"} workers)', flush=True)
  if args.dry_run:
    for r in runs:
      print(f'  {"done" if _done(r, args.results) else "todo"}  {r.run_id}  steps={r.steps} '
            f'batch={r.batch_size} {dict(r.overrides) or ""}')
    return 0
  if not todo:
    return 0
  opts = {'results': os.path.abspath(args.results), 'scratch': os.path.abspath(args.scratch),
          'data_dir': os.path.abspath(args.data_dir), 'sens_chunk': args.sens_chunk,
          'eval_examples': args.eval_examples, 'eval_batch': args.eval_batch, 'rho': args.rho,
          'ascent_steps': args.ascent_steps, 'power_iters': args.power_iters,
          'keep_workdirs': args.keep_workdirs}
  cache_dir = None if args.no_compile_cache else os.path.join(opts['scratch'], 'jax_cache')
  if cache_dir:
    os.makedirs(cache_dir, exist_ok=True)
  n = min(args.workers, len(todo))
  # Before anything here or in a worker starts JAX: N processes share one GPU.
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', f'{min(0.9, 0.9 / max(n, 1)):.3f}')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  _prepare_data(todo, opts['data_dir'])

  t0, failed = time.time(), []
  def report(i, res):
    elapsed = time.time() - t0
    eta = elapsed / i * (len(todo) - i)
    msg = (f'acc={res["accuracy"]:.4f} λmax={res["lambda_max"]:.3g}' if res['ok']
           else f'FAILED: {res["error"]}')
    print(f'[{i}/{len(todo)}] {res["run_id"]}  {msg}  ({res["wall"]:.0f}s)  '
          f'elapsed {_fmt(elapsed)}  ETA {_fmt(eta)}', flush=True)
    if not res['ok']:
      failed.append(res['run_id'])

  if args.workers == 0:
    _setup_jax(cache_dir)
    opts['redirect'] = False
    for i, run in enumerate(todo, 1):
      report(i, execute(run, opts))
  else:
    ctx = mp.get_context('spawn')           # a fresh JAX in every worker
    shares = _cpu_shares(n) if os.environ.get('JAX_PLATFORMS', '') in ('cpu', '') else None
    cores = None
    if shares and not _has_gpu_hint():
      cores = ctx.Queue()
      for s in shares:
        cores.put(s)
    # A worker that dies (out of memory, a signal) breaks the pool: the sweep
    # stops with an error instead of waiting forever; rerun to resume.
    # SIGTERM (e.g. `timeout`) -> KeyboardInterrupt: stop the workers too.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    pool = futures.ProcessPoolExecutor(n, mp_context=ctx, initializer=_worker_init,
                                       initargs=(cores, cache_dir))
    jobs = [pool.submit(_worker_run, (r, opts)) for r in todo]
    i, cancelled = 0, False
    try:
      for job in futures.as_completed(jobs):
        if job.cancelled():
          continue
        i += 1
        report(i, job.result())
        if args.deadline and not cancelled and time.time() - t0 > args.deadline:
          cancelled = True
          n_left = sum(j.cancel() for j in jobs)
          print(f'--deadline {args.deadline}s reached: {n_left} runs not started; finishing '
                'the ones in flight (rerun the same command to resume)', flush=True)
    except BrokenProcessPool as e:
      print(f'a worker process died ({e}); rerun the same command to resume', flush=True)
      return 2
    except KeyboardInterrupt:
      print('interrupted: stopping the workers (a run in training checkpoints first; rerun '
            'the same command to resume)', flush=True)
      for j in jobs:
        j.cancel()
      for proc in list(getattr(pool, '_processes', {}).values()):
        proc.terminate()          # SIGTERM: train_and_evaluate checkpoints and returns
      pool.shutdown(wait=True, cancel_futures=True)
      return 130
    pool.shutdown(wait=True)
    if cancelled and i < len(todo):
      print(f'stopped at the deadline: {i}/{len(todo)} runs done in {_fmt(time.time() - t0)}',
            flush=True)
      return 3
  print(f'finished {len(todo) - len(failed)}/{len(todo)} runs in {_fmt(time.time() - t0)}; '
        f'records under {args.results}', flush=True)
  if failed:
    print(f'{len(failed)} failed (see error.txt in their workdirs under {args.scratch}): '
          + ', '.join(failed), flush=True)
  return 1 if failed else 0


def _has_gpu_hint() -> bool:
  """Whether a GPU is visible, without starting JAX in this process."""
  if os.environ.get('JAX_PLATFORMS', '').startswith('cpu'):
    return False
  return shutil.which('nvidia-smi') is not None or os.path.exists('/dev/nvidia0')


if __name__ == '__main__':
  sys.exit(main())
