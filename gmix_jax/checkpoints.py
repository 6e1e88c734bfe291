"""Orbax checkpoints of a run: the TrainState, the loop's own state, digests.

One checkpoint step is an Orbax ``Composite`` of three items: ``state`` (the
TrainState: everything the step reads, including stale scores and method
state; the step's rng is derived from ``state.step``), ``loop`` (the open
metrics window, so a resumed run logs what an uninterrupted one would, and
the run's wall time so far) and ``digest`` (SHA-256 of every array of
``state`` and of ``loop``, `gmix_jax.digest`). Orbax makes a step appear
whole or not at all (it writes into a temporary folder and renames it); the
digest catches what reads back wrong after that: flipped bits, truncated or
missing files.

``restore_verified`` reads the newest checkpoint that reads and verifies. A
newer one that fails is reported by step and reason and set aside as
``checkpoints/<step>.corrupt-<reason>`` (renamed, never deleted: Orbax only
lists folders named by a step number, so it no longer sees it); if none
verifies, nothing is renamed and ``CheckpointCorruptError`` lists them all.
"""
from __future__ import annotations

import os
import sys
import threading
import weakref

import jax
import numpy as np

from gmix_jax import digest as digest_lib


class CheckpointCorruptError(RuntimeError):
  """No checkpoint of the workdir reads back and verifies."""


# A checkpoint starts only through `save`, under this gate; `quiesce` (an abort)
# takes it for good, so none starts while the process ends.
_SAVE_GATE = threading.Lock()
_MANAGERS = weakref.WeakSet()        # the run's managers, for `quiesce`


def manager(workdir: str, keep: int = 2):
  import orbax.checkpoint as ocp
  ckpt = ocp.CheckpointManager(
      os.path.join(workdir, 'checkpoints'),
      # A checkpoint half-written by a killed or aborted run is removed at start.
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           cleanup_tmp_directories=True))
  _MANAGERS.add(ckpt)
  return ckpt


def quiesce(timeout: float) -> None:
  """Before the process ends abruptly (a second Ctrl-C): no checkpoint starts
  from now on, and the ones being written get up to ``timeout`` seconds to
  finish (Orbax names a step only once it is whole; what is still unfinished
  after that is removed by the caller)."""
  _SAVE_GATE.acquire(timeout=timeout)          # never released: the process is ending

  def finish():
    for ckpt in list(_MANAGERS):
      try:
        ckpt.wait_until_finished()
      except Exception:  # pylint: disable=broad-except  (its failure is not the abort's)
        pass
  waiter = threading.Thread(target=finish, daemon=True)
  waiter.start()
  waiter.join(timeout)


def loop_item(pending: list[dict], wall_time_sec: float) -> dict:
  """The ``loop`` item: the open metrics window and the run's wall time so far."""
  return {'pending': [{k: float(v) for k, v in m.items()} for m in pending],
          'wall_time_sec': float(wall_time_sec)}


def save(ckpt, step: int, state, local_state, loop: dict) -> None:
  """Writes checkpoint ``step`` (asynchronously: ``ckpt.wait_until_finished``).

  ``state`` is what Orbax saves (the global state); ``local_state`` this
  process's full copy of it, which the digest hashes (the state is
  replicated: every process hashes the same bytes; process 0's digest item
  is the one written).
  """
  import orbax.checkpoint as ocp
  items = ocp.args.Composite(
      state=ocp.args.StandardSave(state), loop=ocp.args.JsonSave(loop),
      digest=ocp.args.JsonSave(digest_lib.record(local_state, loop)))
  with _SAVE_GATE:
    ckpt.save(step, args=items)


def _all_agree(ok: bool) -> bool:
  """True when every process found its copy good (they read the same files,
  but a read error on one host must not split the job across two steps)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def _short(e: BaseException) -> str:
  """The root cause of a read error, on one line (Orbax wraps TensorStore's)."""
  while (e.__cause__ or e.__context__) is not None:
    e = e.__cause__ or e.__context__
  text = ' '.join(str(e).split())
  return f'{type(e).__name__}: {text[:240]}' + ('...' if len(text) > 240 else '')


def _read_verified(ckpt, directory: str, step: int, template):
  """``(restored, None)`` or ``(None, (slug, reason))`` for one step."""
  import orbax.checkpoint as ocp
  if not os.listdir(os.path.join(directory, str(step))):
    return None, ('empty', 'its folder is empty')
  if not os.path.isdir(os.path.join(directory, str(step), 'digest')):
    return None, ('no-digest', 'it has no digest item (not written by this version, or lost)')
  try:
    restored = ckpt.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(template), loop=ocp.args.JsonRestore(),
        digest=ocp.args.JsonRestore()))
  except Exception as e:  # any read error: truncated, missing or garbled files
    return None, ('unreadable', f'it cannot be read ({_short(e)})')
  bad = digest_lib.mismatches(restored['digest'], restored['state'], restored['loop'])
  if bad:
    more = f' and {len(bad) - 3} more' if len(bad) > 3 else ''
    return None, ('digest', f'its contents differ from their digest ({"; ".join(bad[:3])}{more})')
  return restored, None


def _set_aside(directory: str, step: int, slug: str) -> str:
  """Renames ``<step>`` to ``<step>.corrupt-<slug>`` (numbered if taken)."""
  target, n = os.path.join(directory, f'{step}.corrupt-{slug}'), 1
  while os.path.exists(target):
    n += 1
    target = os.path.join(directory, f'{step}.corrupt-{slug}-{n}')
  os.rename(os.path.join(directory, str(step)), target)
  return target


def restore_verified(workdir: str, template, lead: bool = True):
  """``(step, state, loop)`` of the newest checkpoint that verifies, or None
  when the workdir has no checkpoint.

  ``template`` is a fresh TrainState: the restored one has its structure,
  shapes and dtypes. Newer checkpoints that fail are set aside (by the
  ``lead`` process) and reported on stderr, with the step resumed from.

  Raises:
    CheckpointCorruptError: there are checkpoints but none verifies (all
      are left in place).
  """
  import orbax.checkpoint as ocp
  directory = os.path.join(workdir, 'checkpoints')
  # Every process must take the same branch: Orbax's CheckpointManager
  # synchronises the processes, so one that skipped it would pair its next
  # collective with another's barrier. On a fresh run process 0 may create the
  # folder before a slower process looks, so "exists" must hold on all of them.
  if not _all_agree(os.path.isdir(directory)):
    return None
  ckpt = ocp.CheckpointManager(directory)
  failed, found = [], None
  try:
    for step in sorted(ckpt.all_steps(), reverse=True):
      restored, why = _read_verified(ckpt, directory, step, template)
      if _all_agree(why is None):
        found = step, restored
        break
      failed.append((step, why or ('other-process', 'another process could not verify it')))
  finally:
    ckpt.close()
  if found is None and failed:
    raise CheckpointCorruptError(
        f'no checkpoint in {directory} reads back and verifies:\n' +
        '\n'.join(f'  step {s}: {why}' for s, (_, why) in failed) +
        '\nNothing was changed. Restore the checkpoints from a copy, or move them away to '
        'start the run over (or use a new --workdir).')
  for step, (slug, why) in failed:
    if lead:
      target = _set_aside(directory, step, slug)
      print(f'checkpoint {step} in {directory}: {why}; set aside as {target}', file=sys.stderr,
            flush=True)
  if failed:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices('checkpoints set aside')
    if lead:
      print(f'resuming from checkpoint {found[0]}, the newest that verifies', file=sys.stderr,
            flush=True)
  if found is None:
    return None
  step, restored = found
  return step, restored['state'], restored['loop']


def restore_state(workdir: str, step: int | None = None) -> tuple[int, dict]:
  """``(step, state)`` of a workdir's checkpoint (the latest by default).

  ``state`` is the saved ``TrainState`` as a nested dict of numpy arrays
  (``params``, ``opt_state``, ``model_state``, ``step``, ``rng``,
  ``scores``, ``skipped``, ``extra``); no config is needed, and the checkpoint may come
  from any device count or number of processes. For tests and analysis; the
  trainer restores into its own typed state. The contents are checked
  against the checkpoint's digest (``CheckpointCorruptError`` if they differ).
  """
  import orbax.checkpoint as ocp
  ckpt = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                               item_handlers={'state': ocp.StandardCheckpointHandler(),
                                              'loop': ocp.JsonCheckpointHandler(),
                                              'digest': ocp.JsonCheckpointHandler()})
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {workdir!r}')
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          ckpt.item_metadata(step)['state'])
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  verify = os.path.isdir(os.path.join(directory, str(step), 'digest'))
  items = dict(state=ocp.args.StandardRestore(abstract))
  if verify:           # a checkpoint written before digests existed is read unverified
    items.update(loop=ocp.args.JsonRestore(), digest=ocp.args.JsonRestore())
  restored = ckpt.restore(step, args=ocp.args.Composite(**items))
  ckpt.close()
  state = jax.device_get(restored['state'])
  bad = verify and digest_lib.mismatches(restored['digest'], state, restored['loop'])
  if bad:
    raise CheckpointCorruptError(f'checkpoint {step} in {directory}: its contents differ from '
                                 f'their digest ({"; ".join(bad[:3])})')
  return step, state
