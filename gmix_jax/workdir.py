"""The workdir's plain files: ``config.json`` and ``metrics.jsonl``.

A workdir belongs to one run. ``check_config`` refuses to resume a
checkpoint written under a config that would change what it means;
``write_config`` records the config of a fresh run; ``MetricsWriter``
appends one JSON record per event and ``truncate_metrics`` cuts the file
back to a checkpoint's step so a resumed run's file equals an uninterrupted
one's.
"""
from __future__ import annotations

import json
import os

import ml_collections

# Config fields whose change makes an existing checkpoint unusable.
INCOMPATIBLE_FIELDS = ('dataset.name', 'dataset.examples_per_class', 'dataset.train_fraction',
                       'model', 'method', 'optimizer.name', 'seed', 'batch_size')


class MetricsWriter:
  """metrics.jsonl, appended (a resumed run continues the same file)."""

  def __init__(self, workdir: str, enabled: bool):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.enabled = enabled

  def write(self, record: dict) -> None:
    if self.enabled:
      with open(self.path, 'a') as f:
        f.write(json.dumps(record) + '\n')


def truncate_metrics(path: str, max_step: int, rewrite: bool = True) -> list[dict]:
  """The records of ``path`` up to ``max_step``; with ``rewrite``, the file
  is replaced (atomically) by exactly those.

  A run killed after its last checkpoint has already appended records for
  steps it will redo; the resumed run drops them, so the file ends up as an
  uninterrupted run's. A line cut short by the kill is dropped too.
  """
  if not os.path.exists(path):
    return []
  kept, dropped = [], False
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:                       # a partial last line
        dropped = True
        continue
      if record.get('step', 0) <= max_step:
        kept.append(record)
      else:
        dropped = True
  if rewrite and dropped:
    tmp = f'{path}.tmp.{os.getpid()}'
    with open(tmp, 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in kept)
    os.replace(tmp, path)
  return kept


def _without_none(d):
  """``d`` without None-valued entries: a knob left at None (its default)
  means the same as a knob an older version of the config did not have."""
  if isinstance(d, dict):
    return {k: _without_none(v) for k, v in d.items() if v is not None}
  return d


def check_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Refuse to resume a checkpoint written by an incompatible config."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f)
  new = json.loads(config.to_json())
  def get(d, dotted):
    for k in dotted.split('.'):
      d = d.get(k) if isinstance(d, dict) else None
    return _without_none(d)
  changed = [k for k in INCOMPATIBLE_FIELDS if get(old, k) != get(new, k)]
  if changed and os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise ValueError(
        f'workdir {workdir!r} holds a checkpoint from a different config (changed: '
        f'{", ".join(changed)}). Nothing was overwritten: use a new --workdir, or restore the '
        'old values to resume.')


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """``config.json``: the config of the run this workdir holds."""
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json(indent=2))
