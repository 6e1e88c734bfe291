"""Orbax checkpoints of a run: the TrainState and the loop's own state.

One checkpoint step is an Orbax ``Composite`` of two items: ``state`` (the
TrainState: everything the step reads, including stale scores and method
state; the step's rng is derived from ``state.step``) and ``loop`` (the
open metrics window, so a resumed run logs what an uninterrupted one
would).
"""
from __future__ import annotations

import os

import jax
import numpy as np


def manager(workdir: str, keep: int = 2):
  import orbax.checkpoint as ocp
  return ocp.CheckpointManager(
      os.path.join(workdir, 'checkpoints'),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def save(ckpt, step: int, state, pending: list[dict]) -> None:
  """Writes checkpoint ``step`` (asynchronously: ``ckpt.wait_until_finished``)."""
  import orbax.checkpoint as ocp
  ckpt.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      loop=ocp.args.JsonSave({'pending': [{k: float(v) for k, v in m.items()} for m in pending]})))


def restore_latest(ckpt, state):
  """``(state, pending)`` from the latest checkpoint, or None if there is none.

  ``state`` is the template (a fresh TrainState): the restored one has its
  structure, shapes and dtypes.
  """
  import orbax.checkpoint as ocp
  step = ckpt.latest_step()
  if step is None:
    return None
  restored = ckpt.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(state), loop=ocp.args.JsonRestore()))
  pending = [{k: np.float32(v) for k, v in m.items()} for m in restored['loop']['pending']]
  return restored['state'], pending


def restore_state(workdir: str, step: int | None = None) -> tuple[int, dict]:
  """``(step, state)`` of a workdir's checkpoint (the latest by default).

  ``state`` is the saved ``TrainState`` as a nested dict of numpy arrays
  (``params``, ``opt_state``, ``model_state``, ``step``, ``rng``,
  ``scores``, ``skipped``, ``extra``); no config is needed, and the checkpoint may come
  from any device count or number of processes. For tests and analysis; the
  trainer restores into its own typed state.
  """
  import orbax.checkpoint as ocp
  ckpt = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                               item_handlers={'state': ocp.StandardCheckpointHandler()})
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {workdir!r}')
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          ckpt.item_metadata(step)['state'])
  restored = ckpt.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
  ckpt.close()
  return step, jax.device_get(restored['state'])
