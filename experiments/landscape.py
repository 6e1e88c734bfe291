"""1-D and 2-D loss landscapes of ERM, Mixup, SAM and G-Mix (Li et al. 2018).

  python experiments/landscape.py [--retrain]      # then: python experiments/report.py

Reads the checkpoints the sweep keeps (``grids.LANDSCAPE_METHODS`` at
``grids.LANDSCAPE_SETTING``, seed 0, under ``--scratch``); ``--retrain``
trains the missing ones first (the sweep's own run, so the same config).
For each model: L(w + α d₁) and L(w + α d₁ + β d₂) with random Gaussian
directions d₁, d₂ filter-normalised to that model's weights (each filter
of d scaled to the norm of the same filter of w; biases zeroed), drawn from
the same keys for every model, so the curves are comparable across models
whatever their weight scale. The loss is the mean cross-entropy
(``train=False``) on (a stratified subset of) the run's own training set and
on the sweep's fixed test subset (``sweep.eval_subset``). Writes ``<results>/landscape/landscape.json`` and the plots
(``plot``, also called by report.py so that one command redraws everything).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def compute(run, workdir: str, data_dir: str, alphas, betas, eval_examples: int = 512,
            batch_size: int = 128) -> dict:
  import jax
  from gmix_jax import analysis, models, train
  from gmix_jax import data as data_lib
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  ds = data_lib.load_dataset(config['dataset']['name'], data_dir)
  x_tr, y_tr = ds.x_train, ds.y_train
  if config['dataset']['examples_per_class']:
    x_tr, y_tr = data_lib.subsample(x_tr, y_tr, seed=config['seed'],
                                    examples_per_class=config['dataset']['examples_per_class'])
  from experiments import sweep
  x_tr, y_tr = sweep.eval_subset(x_tr, y_tr, eval_examples)
  x_te, y_te = sweep.eval_subset(ds.x_test, ds.y_test, eval_examples)
  module = models.get_model(config['model']['name'], ds.num_classes, **config['model']['kwargs'])
  apply_fn = models.make_apply_fn(module)
  _, state = train.restore_state(workdir)
  params, model_state = state['params'], state['model_state']
  d1 = analysis.filter_normalized_direction(jax.random.PRNGKey(1), params)
  d2 = analysis.filter_normalized_direction(jax.random.PRNGKey(2), params)
  out = {'run_id': run.run_id, 'method': run.method, 'workdir': workdir}
  for split, (x, y) in (('train', (x_tr, y_tr)), ('test', (x_te, y_te))):
    data = analysis.make_eval_set(x, np.asarray(y), ds.num_classes, batch_size)
    loss_fn = analysis.make_loss_fn(apply_fn, model_state, data)
    out[f'{split}_1d'] = analysis.landscape_1d(loss_fn, params, d1, alphas).tolist()
    if split == 'train':
      out['train_2d'] = analysis.landscape_2d(loss_fn, params, d1, d2, alphas, betas).tolist()
  return out


def plot(data: dict, out_dir: str) -> list[str]:
  """1-D curves (train and test) and 2-D contours, one panel per method."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  os.makedirs(out_dir, exist_ok=True)
  alphas, betas, runs = np.array(data['alphas']), np.array(data['betas']), data['models']
  fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
  for r in runs:
    ax[0].plot(alphas, r['train_1d'], label=r['method'])
    ax[1].plot(alphas, r['test_1d'], label=r['method'])
  for a, split in zip(ax, ('train', 'test')):
    a.set_xlabel('α (filter-normalised direction)'); a.set_ylabel(f'{split} loss')
    a.set_yscale('log'); a.legend(fontsize=8)
  fig.suptitle(f"1-D loss landscape, {data['setting']}")
  fig.tight_layout()
  paths = [os.path.join(out_dir, 'landscape_1d.png')]
  fig.savefig(paths[0], dpi=110); plt.close(fig)

  fig, axes = plt.subplots(1, len(runs), figsize=(3.6 * len(runs), 3.4), squeeze=False)
  levels = np.logspace(np.log10(max(min(np.min(r['train_2d']) for r in runs), 1e-4)),
                       np.log10(max(np.max(r['train_2d']) for r in runs)), 15)
  for a, r in zip(axes[0], runs):
    cs = a.contour(alphas, betas, np.array(r['train_2d']).T, levels=levels, cmap='viridis',
                   norm=matplotlib.colors.LogNorm())
    a.clabel(cs, fontsize=6, fmt='%.2g'); a.set_title(r['method']); a.set_xlabel('α')
  axes[0][0].set_ylabel('β')
  fig.suptitle(f"2-D train-loss landscape, {data['setting']} (same levels in every panel)")
  fig.tight_layout()
  paths.append(os.path.join(out_dir, 'landscape_2d.png'))
  fig.savefig(paths[1], dpi=110); plt.close(fig)
  return paths


def summary(data: dict) -> str:
  """One computed sentence per split: the loss rise at the edge of the 1-D plot."""
  alphas = np.array(data['alphas'])
  i0 = int(np.argmin(np.abs(alphas)))
  parts = []
  for split in ('train', 'test'):
    rise = {r['method']: float(np.mean([r[f'{split}_1d'][0], r[f'{split}_1d'][-1]])
                               - r[f'{split}_1d'][i0]) for r in data['models']}
    order = sorted(rise, key=rise.get)
    parts.append(f'{split} loss rise from α=0 to |α|={alphas.max():g} (mean of both ends), '
                 'flattest first: ' + ', '.join(f'{m} {rise[m]:.3g}' for m in order))
  # "G-Mix finds flatter minima", on the test curve (rise is the last split's).
  if 'gmix' in rise and 'mixup' in rise and 'sam' in rise:
    parts.append(f'G-Mix flatter than Mixup and SAM on the test curve: '
                 f'{"yes" if rise["gmix"] < min(rise["mixup"], rise["sam"]) else "no"}')
  return f"{data['setting']}. " + '. '.join(parts) + '.'


def main(argv=None) -> int:
  from experiments import grids, sweep
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--scratch', default=sweep.DEFAULT_SCRATCH)
  p.add_argument('--results', default=sweep.DEFAULT_RESULTS)
  p.add_argument('--data-dir', default=sweep.DEFAULT_DATA)
  p.add_argument('--plots', default=os.path.join(ROOT, 'experiments', 'plots'))
  p.add_argument('--steps', type=int, default=grids.STEPS)
  p.add_argument('--points', type=int, default=21, help='grid points per axis, α, β ∈ [-1, 1]')
  p.add_argument('--retrain', action='store_true', help='train the runs whose checkpoint is missing')
  args = p.parse_args(argv)
  dataset, n = grids.LANDSCAPE_SETTING
  runs = [r for r in grids.benchmark(methods=grids.LANDSCAPE_METHODS, seeds=(0,), steps=args.steps,
                                     sizes={dataset: (n,)})]
  opts = {'results': os.path.abspath(args.results), 'scratch': os.path.abspath(args.scratch),
          'data_dir': os.path.abspath(args.data_dir), 'sens_chunk': None, 'eval_examples': 512,
          'eval_batch': 128, 'rho': 0.05, 'ascent_steps': 5, 'power_iters': 20,
          'keep_workdirs': True, 'redirect': False}
  sweep._setup_jax(os.path.join(opts['scratch'], 'jax_cache'))
  alphas = np.linspace(-1.0, 1.0, args.points)
  models_out = []
  for run in runs:
    workdir = sweep.workdir_of(opts['scratch'], run)
    if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
      if not args.retrain:
        print(f'no checkpoint for {run.run_id} in {workdir}: rerun with --retrain')
        return 1
      res = sweep.execute(run, opts)
      if not res['ok']:
        print(f'{run.run_id} failed: {res["error"]}')
        return 1
    print(f'landscape of {run.run_id}', flush=True)
    models_out.append(compute(run, workdir, opts['data_dir'], alphas, alphas))
  data = {'setting': f'{dataset} {n}/class, seed 0, {args.steps} steps',
          'alphas': alphas.tolist(), 'betas': alphas.tolist(), 'models': models_out}
  path = os.path.join(args.results, 'landscape', 'landscape.json')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(data, f)
  print('wrote', path, *plot(data, args.plots))
  return 0


if __name__ == '__main__':
  sys.exit(main())
