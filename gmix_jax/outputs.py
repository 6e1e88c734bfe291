"""What a finished run leaves for people: train records, ``curves.png`` and
the summary."""
from __future__ import annotations

import json
import os

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


def write_summary(workdir: str, summary: dict) -> str:
  """``summary.json`` in ``workdir``; returns its path."""
  path = os.path.join(workdir, 'summary.json')
  with open(path, 'w') as f:
    json.dump(summary, f, indent=2)
  return path
