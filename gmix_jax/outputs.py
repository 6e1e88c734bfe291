"""What a finished run leaves for people: train records, ``curves.png`` and
the summary (strict JSON, with the run's provenance: seed, git commit, a hash
of the config's trajectory fields, package versions, device kind)."""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
from typing import Any

import numpy as np

from gmix_jax import tasks

# Record fields that measure the clock, not the run: they differ between two
# runs of the same config (and between a resumed run and an uninterrupted one).
WALL_CLOCK_FIELDS = ('examples_per_sec', 'wall_time_sec', 'timestamp')


def train_record(pending: list[dict]) -> dict:
  """One train record: each metric's mean over the window's steps, skipped
  (non-finite) steps left out; ``nonfinite_skipped`` is the running count."""
  used = [m for m in pending if not m['nonfinite']]
  keys = [k for k in pending[0] if k not in ('nonfinite', 'nonfinite_skipped')]
  rec = {k: float(np.mean([m[k] for m in used])) if used else float('nan') for k in keys}
  rec['nonfinite_skipped'] = float(pending[-1]['nonfinite_skipped'])
  return rec


def read_metrics(workdir: str) -> tuple[list[dict], list[dict]]:
  """``(train records, test records)`` of ``workdir/metrics.jsonl``."""
  train, test = [], []
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      r = json.loads(line)
      (train if r['split'] == 'train' else test).append(r)
  return train, test


def curves_title(info: dict) -> str:
  """``method · dataset · model · seed s — test accuracy a %, ECE e`` from a summary."""
  names = {k: str(info[k]) for k in ('method', 'dataset', 'model') if k in info}
  if info.get('task', tasks.DEFAULT) != tasks.DEFAULT:   # a task other than the default: named
    names = {'task': str(info['task']), **names}
  if names.get('dataset', '').startswith('npz:'):       # a user's file: its name, not its path
    names['dataset'] = 'npz:' + os.path.basename(names['dataset'][len('npz:'):])
  head = ' · '.join(names.values())
  if 'seed' in info:
    head += f" · seed {info['seed']}"
  if 'final_test_accuracy' in info:
    head += (f" — test accuracy {100 * info['final_test_accuracy']:.1f} %, "
             f"ECE {info['final_test_ece']:.3f}")
  if 'final_knn_accuracy' in info:
    head += f" — kNN accuracy {100 * info['final_knn_accuracy']:.1f} %"
  return head


def _series(records: list[dict], key: str, x: str = 'step'):
  points = [(r[x], r[key]) for r in records if key in r]
  return [p[0] for p in points], [p[1] for p in points]


def curves_figure(train: list[dict], test: list[dict], info: dict):
  """The figure of ``curves.png``: losses; test accuracy and ECE; learning
  rate and ρ; and, for BG-/DG-Mix, the sensitivity scores. Every panel's x
  axis is the training step."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  sensitive = any('sensitivity' in r for r in train)
  fig, axes = plt.subplots(1, 4 if sensitive else 3, figsize=(16 if sensitive else 12.5, 3.6))
  ax = axes[0]
  ax.plot(*_series(train, 'loss'), label='train loss (mixed batch)')
  if any('perturbed_loss' in r for r in train):
    ax.plot(*_series(train, 'perturbed_loss'), label='train loss at w + ε')
  if any('mixblock_loss' in r for r in train):        # SAMix-SSL's second objective
    ax.plot(*_series(train, 'mixblock_loss'), label='mixblock loss')
  ax.plot(*_series(test, 'loss'), 'o-', ms=3, label='test loss')
  ssl = any('knn_accuracy' in r for r in test)
  ax.set(xlabel='step', ylabel='InfoNCE' if ssl else 'cross-entropy', title='loss')
  ax = axes[1]
  if ssl:                                               # self-supervised: the kNN monitor
    ax.plot(*_series(test, 'knn_accuracy'), 'o-', ms=3, label='kNN accuracy (test)')
  ax.plot(*_series(test, 'accuracy'), 'o-', ms=3, label='test accuracy')
  ax.plot(*_series(test, 'ece'), 's--', ms=3, label='test ECE')
  ax.set(xlabel='step', ylabel='fraction', ylim=(0, 1.02),
         title='kNN accuracy' if ssl else 'test accuracy and calibration')
  ax = axes[2]
  ax.plot(*_series(train, 'learning_rate'), color='C0', label='learning rate')
  ax.set(xlabel='step', ylabel='learning rate', title='schedule')
  if any('rho' in r for r in train):
    twin = ax.twinx()
    steps, rhos = _series(train, 'rho')
    twin.plot(steps, rhos, color='C3', ls='--', label='ρ (SAM radius)')
    twin.set_ylim(0, 1.15 * max(rhos))       # from 0: a constant ρ reads as constant
    twin.set_ylabel('ρ')
    twin.legend(loc='center right', fontsize=8)
  elif any('momentum' in r for r in train):            # a momentum (key) encoder's m
    twin = ax.twinx()
    twin.plot(*_series(train, 'momentum'), color='C2', ls='--', label='momentum m')
    twin.set_ylabel('m')
    twin.legend(loc='center right', fontsize=8)
  if sensitive:
    ax = axes[3]
    ax.plot(*_series(train, 'sensitivity'), label='mean s_i')
    ax.plot(*_series(train, 'sensitive_minus_rest'), label='mean s_i: S⁺ − S⁻')
    ax.set(xlabel='step', ylabel='sharpness-sensitivity', title='per-example sensitivity')
  for ax in axes:
    if ax.get_legend_handles_labels()[0]:
      ax.legend(loc='upper left' if ax is axes[2] else 'best', fontsize=8)
    ax.grid(alpha=0.3)
  fig.suptitle(curves_title(info))
  fig.tight_layout()
  return fig


def plot(workdir: str, info: dict | None = None) -> str | None:
  """``curves.png`` from ``metrics.jsonl``, titled from ``info`` (the summary
  plus ``seed``); None without matplotlib."""
  try:
    import matplotlib  # noqa: F401
  except ImportError:
    return None
  import matplotlib.pyplot as plt
  fig = curves_figure(*read_metrics(workdir), info or {})
  path = os.path.join(workdir, 'curves.png')
  # The title is also stored in the PNG's metadata, for tools that index runs.
  fig.savefig(path, dpi=100, metadata={'Title': curves_title(info or {})})
  plt.close(fig)
  return path


# -- The summary (summary.json) ---------------------------------------------------
PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain', 'numpy')


def strict_json(value: Any) -> Any:
  """``value`` with every non-finite float as None (JSON has no NaN)."""
  if isinstance(value, dict):
    return {k: strict_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [strict_json(v) for v in value]
  if isinstance(value, (float, np.floating)):
    return float(value) if np.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  return value


def git_commit() -> str | None:
  """The commit of the checkout holding this package (``+dirty`` with
  uncommitted changes), or None outside a git checkout or without git."""
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    run = lambda *a: subprocess.run(['git', '-C', here, *a], capture_output=True, text=True,
                                    timeout=10, check=True).stdout.strip()
    commit = run('rev-parse', 'HEAD')
    return commit + ('+dirty' if run('status', '--porcelain', '--untracked-files=no') else '')
  except (OSError, subprocess.SubprocessError):
    return None


def provenance(config, processes: int) -> dict:
  """What the summary records about how the run was made: seed, code,
  config, software, hardware."""
  import jax
  from gmix_jax import configure, drift
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  defaults = {k: v for k, v in configure.OPTIONAL_FIELDS.items() if v is not None}
  device = jax.local_devices()[0]
  return {'seed': config.seed, 'git_commit': git_commit(),
          'config_hash': drift.trajectory_hash(json.loads(config.to_json()), defaults),
          'versions': versions, 'platform': device.platform, 'device_kind': device.device_kind,
          'processes': processes}


def write_summary(workdir: str, summary: dict) -> str:
  """``summary.json`` in ``workdir``, strict JSON (a NaN metric is null);
  returns its path. Written atomically: a kill never leaves half a file."""
  path = os.path.join(workdir, 'summary.json')
  tmp = f'{path}.tmp.{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(strict_json(summary), f, indent=2, allow_nan=False)
  os.replace(tmp, path)
  return path
