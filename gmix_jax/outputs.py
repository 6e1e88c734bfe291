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


def train_record(pending: list[dict]) -> dict:
  """One train record: each metric's mean over the window's steps, skipped
  (non-finite) steps left out; ``nonfinite_skipped`` is the running count."""
  used = [m for m in pending if not m['nonfinite']]
  keys = [k for k in pending[0] if k not in ('nonfinite', 'nonfinite_skipped')]
  rec = {k: float(np.mean([m[k] for m in used])) if used else float('nan') for k in keys}
  rec['nonfinite_skipped'] = float(pending[-1]['nonfinite_skipped'])
  return rec


def plot(workdir: str) -> str | None:
  """``curves.png`` from ``metrics.jsonl`` (None without matplotlib)."""
  try:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
  except ImportError:
    return None
  train, test = [], []
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      r = json.loads(line)
      (train if r['split'] == 'train' else test).append(r)
  fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
  ax[0].plot([r['step'] for r in train], [r['loss'] for r in train], label='train (mixed) loss')
  ax[0].plot([r['step'] for r in test], [r['loss'] for r in test], 'o-', label='test loss')
  ax[0].set_xlabel('step'); ax[0].legend()
  ax[1].plot([r['epoch'] for r in test], [r['accuracy'] for r in test], 'o-')
  ax[1].set_xlabel('epoch'); ax[1].set_ylabel('test accuracy')
  fig.tight_layout()
  path = os.path.join(workdir, 'curves.png')
  fig.savefig(path, dpi=100)
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
