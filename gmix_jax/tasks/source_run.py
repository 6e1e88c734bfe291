"""A finished run's workdir as the source of another run.

The ``linear_probe`` task reads a pretraining run's encoder; ``samix_ssl_p``
a ``samix_ssl`` run's mixblock. Both check the source the same way before
anything compiles, each failure one ``ValueError`` naming the field
(``where``) and what is wrong:

  finished_config  the directory exists, holds a ``config.json`` of one of
                   the allowed tasks, and is finished (``summary.json``
                   written, its newest checkpoint is its last step);
  restore          its newest checkpoint reads back and verifies against its
                   digest (``checkpoints.restore_state``).
"""
from __future__ import annotations

import json
import os

from gmix_jax import checkpoints


def finished_config(path: str, where: str, allowed: tuple[str, ...], who: str) -> dict:
  """The source run's ``config.json`` after the file-level checks.

  ``where`` names the field in messages (``task.pretrained='...'``), ``who``
  the run that needs it (``the probe``); ``allowed`` are its task names.
  """
  src = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(src):
    raise ValueError(f'{where}: no such directory')
  cfg_path = os.path.join(src, 'config.json')
  if not os.path.exists(cfg_path):
    raise ValueError(f'{where}: no config.json in {src} (not a gmix_jax workdir)')
  with open(cfg_path) as f:
    old = json.load(f)
  name = (old.get('task') or {}).get('name', 'supervised')
  if name not in allowed:
    raise ValueError(f"{where}: that run's task.name is {name!r}; {who} needs one of "
                     f'{list(allowed)}')
  summary = os.path.join(src, 'summary.json')
  ckpts = os.path.join(src, 'checkpoints')
  steps = sorted(int(n) for n in os.listdir(ckpts) if n.isdigit()) if os.path.isdir(ckpts) else []
  if not steps or not os.path.exists(summary):
    raise ValueError(f'{where}: the run is not finished (no summary.json or no '
                     f'checkpoint in {src}); finish it first (rerun its command to resume)')
  with open(summary) as f:
    total = json.load(f).get('steps')
  if steps[-1] != total:
    raise ValueError(f'{where}: its newest checkpoint is step {steps[-1]}, not its last '
                     f'step {total}: the run is not finished')
  return old


def restore(path: str, where: str) -> dict:
  """The source run's newest checkpoint (a state dict), verified."""
  src = os.path.abspath(os.path.expanduser(path))
  try:
    _, state = checkpoints.restore_state(src)
  except (checkpoints.CheckpointCorruptError, FileNotFoundError, ValueError, OSError) as e:
    raise ValueError(f'{where}: its last checkpoint does not read back or verify '
                     f'({" ".join(str(e).split())[:300]})') from None
  return state
