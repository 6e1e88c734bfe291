"""Config drift: which fields a resumed run may change.

A checkpoint continues one trajectory: the data, model, method and its knobs,
optimizer, schedule, batch, epochs, seed, precision, accumulation... A
relaunch that changes any of these would splice two different runs into one
set of results, so it is refused, listing each field ``old -> new``. Only the
fields in ``NON_TRAJECTORY`` (how the run is watched and stored, not what it
computes) may change; everything else, including fields added to the
configs after this list was written, counts as trajectory: the safe default.

Configs are compared as flat ``{dotted.field: value}`` maps. A field set to
None (a knob at its preset's default) matches an absent one, and a field
absent from an older ``config.json`` matches the new one at its documented
default (``defaults``), so a workdir written before a knob existed resumes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# Fields a resume may change; with the reason each leaves the trajectory as is.
NON_TRAJECTORY = (
    'progress',                 # the progress bar
    'tensorboard',              # a copy of the records as TensorBoard events
    'log_every_steps',          # how often train records are written
    'plots',                    # curves.png at the end
    'eval_every_epochs',        # evaluation (and its epoch-end checkpoint) reads the state only
    'eval_batch_size',          # evaluation is padded to whole batches and sliced back
    'checkpoint_every_steps',   # a checkpoint is a copy of the state
    'keep_checkpoints',
    'nan_policy',               # a stopped run is continued with 'skip' (docs/long-runs.md); a run that
                                # ran on had no non-finite step, which both policies treat alike
    'debug_nan_step',           # test hook
    'parallel',                 # shard_map and pmap run the same per-device step
    'dataset.data_dir',         # where the same data lives
    'dataset.download',
    'dataset.workers',          # host-side loading parallelism; batches depend on (seed, step)
    'dataset.bad_records',      # 'error' stops at the first bad record: the steps before it
                                # saw good records only, which 'skip' reads alike
)
MISSING = '(absent)'


class ConfigDriftError(ValueError):
  """A relaunch changes a trajectory field of the workdir's run."""


def flatten(config: dict, prefix: str = '') -> dict[str, Any]:
  """``{'a.b': v}`` for every non-None leaf of a nested dict (lists are leaves)."""
  out = {}
  for k, v in config.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(flatten(v, key + '.'))
    elif v is not None:
      out[key] = v
  return out


def is_trajectory(field: str) -> bool:
  return not any(field == f or field.startswith(f + '.') for f in NON_TRAJECTORY)


def changes(old: dict, new: dict, defaults: dict | None = None) -> dict[str, tuple[Any, Any]]:
  """``{field: (old, new)}`` for every field that differs (``MISSING`` for
  an absent one), absent fields read at their ``defaults`` first."""
  defaults = defaults or {}
  a, b = flatten(old), flatten(new)
  out = {}
  for field in sorted(set(a) | set(b)):
    va, vb = a.get(field, defaults.get(field, MISSING)), b.get(field, defaults.get(field, MISSING))
    if va != vb:
      out[field] = (va, vb)
  return out


def split(diff: dict) -> tuple[dict, dict]:
  """``(trajectory, other)`` parts of a ``changes`` result."""
  traj = {k: v for k, v in diff.items() if is_trajectory(k)}
  return traj, {k: v for k, v in diff.items() if k not in traj}


def format_changes(diff: dict) -> str:
  return '\n'.join(f'  {k}: {json.dumps(a)} -> {json.dumps(b)}' for k, (a, b) in diff.items())


def check(workdir: str, old: dict, new: dict, defaults: dict | None = None) -> dict:
  """The non-trajectory changes of a relaunch (to record); raises on any
  trajectory change.

  Raises:
    ConfigDriftError: listing each changed trajectory field ``old -> new``.
  """
  traj, other = split(changes(old, new, defaults))
  if traj:
    hint = (' A run cannot be extended in place: its learning-rate schedule (and data plan) '
            'span num_epochs, so training longer is a new run: use a new --workdir.'
            if 'num_epochs' in traj else '')
    raise ConfigDriftError(
        f'workdir {workdir!r} holds a checkpoint from a different config (changed: '
        f'{", ".join(traj)}); a resume must continue the same training (old -> new):\n'
        f'{format_changes(traj)}\n'
        f'Nothing was written. Rerun with the old values to resume, or use a new --workdir.'
        f'{hint} Fields a resume may change: {", ".join(NON_TRAJECTORY)}.')
  return other


def trajectory_hash(config: dict, defaults: dict | None = None) -> str:
  """SHA-256 of a config's trajectory fields (canonical JSON): equal for two
  configs that train the same run, whatever their logging or storage."""
  flat = {**(defaults or {}), **flatten(config)}
  flat = {k: v for k, v in flat.items() if is_trajectory(k)}
  text = json.dumps(flat, sort_keys=True, separators=(',', ':'))
  return hashlib.sha256(text.encode()).hexdigest()
