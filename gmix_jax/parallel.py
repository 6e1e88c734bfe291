"""The data-parallel train step (ARCHITECTURE.md "Contracts worth keeping").

One pure function per device, ``per_device_step(state, batch)``, written with
a named batch axis; every cross-device average happens in one place in it.
It runs under two wrappers, which the tests prove give the same parameters:

  * ``shard_map_step``: ``jax.jit(jax.shard_map(...))`` on a 1-D ``Mesh``
    (the current JAX recommendation). The state is replicated (``P()``), the
    global batch ``[G*b, ...]`` is split on its leading axis.
  * ``pmap_step``: ``jax.pmap`` (asked for by the design). The state carries
    a leading device axis (``replicate``/``unreplicate``), the batch is
    ``[n_dev, b, ...]`` (``shard_batch``).

Typical use (one host)::

  mesh = make_mesh()
  objective = objectives.make_objective(method, apply_fn, axis_name='batch')
  step = shard_map_step(make_per_device_step(objective, optimizer), mesh)
  state = replicate_on_mesh(
      create_train_state(params, model_state, optimizer, rng_seed=0), mesh)
  for batch in batches:                       # global batches [G*b, ...]
    state, metrics = step(state, batch)       # state is donated

The pitfall this module exists to get right (docs/methods.md § 2): under
``shard_map`` a gradient with respect to *replicated* params is the sum over
devices of the per-device gradients, so a naive per-device SAM ascent is
silently wrong (8x on 8 devices). The step therefore marks the params
device-varying (``jax.lax.pcast(..., to='varying')``) before differentiating.
"""
from __future__ import annotations

import multiprocessing
import os
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from gmix_jax import sensitivity

PyTree = Any
Batch = dict


class TrainState(struct.PyTreeNode):
  """Everything needed to resume training exactly; plain arrays only.

  Attributes:
    step: int32 scalar, the number of updates done.
    params: model parameters.
    opt_state: the optimizer's state.
    model_state: non-trained model variables, e.g. ``{'batch_stats': ...}``.
    rng: raw key data (``jax.random.key_data``), so a checkpoint holds no
      typed keys. Never advanced: each step's key is derived from ``step``.
    scores: float32 ``[num_train]`` stale sensitivity table (refreshed by the
      trainer, read with ``use_stale_scores``); shape ``(1,)`` when unused (Orbax
      cannot save a zero-size array).
    skipped: int32 scalar, the number of updates skipped because their loss
      or gradient was not finite (``skip_nonfinite``; 0 otherwise).
    extra: the state of a method that keeps its own (e.g. SAMix's EMA
      encoder, mixblock and mixblock optimizer state), updated by the step's
      ``extra_update``; a ``(1,)`` placeholder when unused (as ``scores``).
  """
  step: jax.Array
  params: PyTree
  opt_state: PyTree
  model_state: PyTree
  rng: jax.Array
  scores: jax.Array
  skipped: jax.Array
  extra: PyTree


def create_train_state(params: PyTree, model_state: PyTree,
                       optimizer: optax.GradientTransformation, rng_seed: int,
                       num_train: int = 0, extra: Optional[PyTree] = None) -> TrainState:
  """A fresh state at step 0; ``num_train > 0`` allocates the stale-score table,
  ``extra`` is a method's own state (see ``make_per_device_step``)."""
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=optimizer.init(params),
      model_state=model_state,
      rng=jax.random.key_data(jax.random.key(rng_seed)),
      scores=jnp.zeros((max(num_train, 1),), jnp.float32),
      skipped=jnp.zeros((), jnp.int32),
      extra=jnp.zeros((1,), jnp.float32) if extra is None else extra)


def step_key(rng: jax.Array, step: jax.Array, axis_name: str) -> jax.Array:
  """This device's key for this step: fold_in(fold_in(key, step), device).

  Folding in the device index means no two devices ever draw the same mixing
  λ/partners or ESAM mask, whatever the device count.
  """
  key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
  return jax.random.fold_in(key, jax.lax.axis_index(axis_name))


def _pmean_state(tree: PyTree, axis_name: str) -> PyTree:
  """pmean float leaves (running statistics); other leaves (counters) are
  equal on every device by construction, and pmax makes that explicit and
  device-invariant (``shard_map``'s ``out_specs=P()`` needs invariance)."""
  def reduce(x):
    if jnp.issubdtype(x.dtype, jnp.floating):
      return jax.lax.pmean(x, axis_name)
    return jax.lax.pmax(x, axis_name)
  return jax.tree.map(reduce, tree)


def make_per_device_step(objective: Callable, optimizer: optax.GradientTransformation, *,
                         axis_name: str = 'batch', use_stale_scores: bool = False,
                         skip_nonfinite: bool = False,
                         extra_update: Optional[Callable] = None):
  """The train step for one device shard, with the named axis ``axis_name``.

  Args:
    objective: ``objective(params, model_state, batch, rng) -> (grads,
      new_model_state, metrics)`` (``objectives.make_objective`` with the same
      ``axis_name``); its gradient is this device's, not yet averaged.
    optimizer: any Optax transformation.
    axis_name: the data-parallel axis of the wrapper.
    use_stale_scores: fill ``batch['score']`` from ``state.scores`` by
      ``batch['index']`` (the ``stale`` sensitivity estimator).
    skip_nonfinite: when the (device-averaged) loss or gradient norm is not
      finite, keep params, opt_state and model_state unchanged (``step``
      still advances, so the data plan moves on) and count the step in
      ``state.skipped``. Decided on values after the ``pmean``, so every
      device takes the same branch, inside the compiled step (no host
      round-trip).
    extra_update: for a method that keeps its own state in ``state.extra``
      (SAMix). The objective is then called as ``objective(params,
      model_state, batch, rng, extra)`` and returns a fourth value, this
      device's gradients for that state (any pytree), averaged with the model
      gradient in the one ``pmean``; after the model update,
      ``extra_update(extra, averaged_extra_grads, new_params,
      new_model_state, step) -> new_extra``. It must give the same value on
      every device (it sees only averaged or replicated inputs). The
      objective may return a fifth value, ``aux``: values that are already
      the same on every device (e.g. all-gathered contrastive keys), passed
      to ``extra_update`` as a sixth argument without averaging (a ``pmax``
      makes their device-invariance explicit, and is exact).

  Returns:
    ``per_device_step(state, batch) -> (new_state, metrics)``; ``metrics``
    are scalars averaged over devices: the objective's, ``grad_norm`` of the
    averaged gradient, ``nonfinite`` (1.0 when this step's loss or gradient
    norm was not finite, else 0.0) and ``nonfinite_skipped`` (the running
    count ``state.skipped``). An optional ``batch['stop']`` (int, one per
    example; the trainer's preemption flag) is not seen by the objective; its
    maximum over all devices comes back as ``metrics['stop']``, so every
    process learns that any one of them was asked to stop. The objective
    also sees ``batch['step']`` (``state.step``, an int32 scalar).
  """
  def per_device_step(state: TrainState, batch: Batch):
    key = step_key(state.rng, state.step, axis_name)
    batch = dict(batch)
    stop = batch.pop('stop', None)
    batch['step'] = state.step      # for schedules inside the objective (GSAM's ρ_t)
    # Pitfall: under shard_map the state arrives replicated (device-invariant)
    # and jax.grad w.r.t. an invariant value is psum'd over the axis, i.e. the
    # SAM ascent would use the sum of all devices' gradients. Marking the
    # params varying gives the per-device gradient. Under pmap (implemented
    # on shard_map with check_vma=False) there is no varying/invariant typing,
    # gradients are per-device anyway and this cast is a no-op.
    params = jax.lax.pcast(state.params, axis_name, to='varying')
    if use_stale_scores:
      batch = {**batch, 'score': sensitivity.lookup(state.scores, batch['index'])}
    if extra_update is None:
      grads, model_state, metrics = objective(params, state.model_state, batch, key)
      extra_grads = ()
    else:
      # The extra state is differentiated too (e.g. SAMix's mixblock): the same
      # pitfall, the same cast.
      extra = jax.lax.pcast(state.extra, axis_name, to='varying')
      out = objective(params, state.model_state, batch, key, extra)
      grads, model_state, metrics, extra_grads = out[:4]
      aux = tuple(jax.lax.pmax(a, axis_name) for a in out[4:])

    # The one place of averaging over devices.
    grads, extra_grads = jax.lax.pmean((grads, extra_grads), axis_name)
    model_state = _pmean_state(model_state, axis_name)
    metrics = jax.lax.pmean(dict(metrics), axis_name)
    metrics['grad_norm'] = optax.tree.norm(grads)

    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    # Averaged values: every device computes the same flag.
    finite = jnp.isfinite(metrics['grad_norm'])
    if 'loss' in metrics:
      finite &= jnp.isfinite(metrics['loss'])
    new_extra = state.extra
    if extra_update is not None:
      finite &= jnp.isfinite(optax.tree.norm(extra_grads))
      new_extra = extra_update(state.extra, extra_grads, new_params, model_state, state.step,
                               *aux)
    skipped = state.skipped
    if skip_nonfinite:
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
      new_params = keep(new_params, state.params)
      opt_state = keep(opt_state, state.opt_state)
      model_state = keep(model_state, state.model_state)
      new_extra = keep(new_extra, state.extra)
      skipped = skipped + jnp.where(finite, 0, 1).astype(skipped.dtype)
    metrics['nonfinite'] = jnp.where(finite, 0.0, 1.0).astype(jnp.float32)
    metrics['nonfinite_skipped'] = skipped.astype(jnp.float32)
    if stop is not None:
      metrics['stop'] = jax.lax.pmax(jnp.max(stop), axis_name).astype(jnp.float32)
    new_state = state.replace(step=state.step + 1, params=new_params, opt_state=opt_state,
                              model_state=model_state, skipped=skipped, extra=new_extra)
    return new_state, metrics

  return per_device_step


# ----------------------------------------------------------------------------
# jit + shard_map on a mesh.
# ----------------------------------------------------------------------------
def make_mesh(num_devices: Optional[int] = None, axis_name: str = 'batch',
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D data mesh over ``jax.devices()[:num_devices]`` (all by default),
  or over ``devices`` in the order given.

  The axis is ``Auto``, not ``jax.make_mesh``'s default ``Explicit``: with an
  Explicit axis, shard_map refuses a batch that is not already sharded on it
  (``in_specs ... does not match the specs of the input``), so every caller
  would have to place batches first. With ``Auto`` the jitted step accepts
  any global batch (numpy, or placed by ``global_batch_to_device``) and lays
  it out itself. Inside the shard_map the axis is manual either way, so the
  step computes the same thing.
  """
  if devices is not None:
    return Mesh(np.asarray(list(devices)), (axis_name,), axis_types=(AxisType.Auto,))
  devices = jax.devices()
  n = len(devices) if num_devices is None else num_devices
  if not 1 <= n <= len(devices):
    raise ValueError(f'num_devices must be in [1, {len(devices)}], got {n}')
  return Mesh(np.asarray(devices[:n]), (axis_name,), axis_types=(AxisType.Auto,))


def shard_map_step(per_device_step: Callable, mesh: Mesh, axis_name: str = 'batch'):
  """``(state, global_batch) -> (state, metrics)``, jitted, state donated.

  The state is replicated over ``mesh``; every batch leaf is split on its
  leading axis, which must divide by the mesh size. Outputs are replicated.

  Put the initial state on the mesh first (``replicate_on_mesh``): arrays
  placed on a mesh have a different abstract type (it names the mesh axes)
  from fresh single-device ones, so a fresh state would compile the step
  once for step 0 and again for the state it returns. Donation invalidates
  the state passed in, and can invalidate the arrays it was built from
  (``device_put`` onto one device does not copy).
  """
  step = jax.shard_map(per_device_step, mesh=mesh,
                       in_specs=(P(), P(axis_name)), out_specs=(P(), P()))
  return jax.jit(step, donate_argnums=0)


def replicate_on_mesh(tree: PyTree, mesh: Mesh) -> PyTree:
  """``tree`` replicated on every device of ``mesh`` (as the step returns it)."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def global_batch_to_device(local_batch: Batch, mesh: Mesh, axis_name: str = 'batch') -> Batch:
  """Each leaf as one global array split over ``mesh`` on its leading axis.

  Every process passes its own rows (its share of the global batch); on one
  process this is ``device_put`` with that sharding.
  """
  sharding = NamedSharding(mesh, P(axis_name))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x),
                      local_batch)


# ----------------------------------------------------------------------------
# pmap.
# ----------------------------------------------------------------------------
def pmap_step(per_device_step: Callable, axis_name: str = 'batch',
              devices: Optional[Sequence[jax.Device]] = None):
  """``(replicated_state, [n_dev, b, ...] batch) -> (state, metrics)``, state
  donated; the outputs keep the leading device axis (metrics are equal on
  every device: take ``unreplicate``)."""
  return jax.pmap(per_device_step, axis_name=axis_name, donate_argnums=0,
                  devices=devices)


def replicate(tree: PyTree, devices: Union[int, Sequence[jax.Device], None] = None,
              axis_name: str = 'batch') -> PyTree:
  """``tree`` stacked on a leading device axis, one copy per device.

  ``devices``: the devices (as given to ``pmap_step``), or a count n for the
  first n local devices; all local devices by default. Laid out exactly as
  ``jax.pmap`` (now built on shard_map) lays out its inputs and outputs — a
  ``Mesh(devices, (axis_name,))`` split on the leading axis — so that the
  first call and later ones share one compilation and donation needs no
  copy. (``jax.device_put_replicated`` is gone in JAX 0.10.)
  """
  if devices is None or isinstance(devices, int):
    devices = jax.local_devices()[:devices]
  devices = list(devices)
  sharding = NamedSharding(Mesh(np.asarray(devices), (axis_name,)), P(axis_name))
  n = len(devices)
  return jax.tree.map(
      lambda x: jax.device_put(jnp.broadcast_to(x, (n,) + jnp.shape(x)), sharding), tree)


def unreplicate(tree: PyTree) -> PyTree:
  """The first device's copy of a ``replicate``d (or pmap output) tree."""
  def first(x):
    # Read the first shard as is: indexing the sharded array would run (and
    # compile) a slicing computation on the devices.
    if isinstance(x, jax.Array) and len(x.addressable_shards) > 1:
      return x.addressable_shards[0].data[0]
    return x[0]
  return jax.tree.map(first, tree)


def set_scores(state: TrainState, table) -> TrainState:
  """``state`` with a fresh stale-score table, laid out like the old one
  (replicated on the mesh, or one copy per device for pmap)."""
  old = state.scores
  table = jnp.broadcast_to(jnp.asarray(table, old.dtype), old.shape)
  return state.replace(scores=jax.device_put(table, old.sharding))


def shard_batch(batch: Batch, n: int) -> Batch:
  """Global batch ``[n*b, ...]`` -> ``[n, b, ...]`` (device d gets rows d*b..)."""
  def reshape(x):
    if x.shape[0] % n:
      raise ValueError(f'global batch {x.shape[0]} does not divide by {n} devices')
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])
  return jax.tree.map(reshape, batch)


# ----------------------------------------------------------------------------
# Multi-host.
# ----------------------------------------------------------------------------
def _launched_multiprocess(env) -> bool:
  """Whether the launcher started several processes that must meet.

  Only signals that are set per launched process count: a job allocation
  alone (``SLURM_NTASKS`` outside ``srun``) would make a lone process wait
  for peers that never come.
  """
  if env.get('GMIX_DISTRIBUTED', '').lower() in ('1', 'true'):
    return True
  if env.get('JAX_COORDINATOR_ADDRESS') or env.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return True                                     # explicit, or multi-slice TPU
  if ',' in env.get('TPU_WORKER_HOSTNAMES', ''):
    return True                                     # TPU pod: one name per host
  for var in ('SLURM_STEP_NUM_TASKS', 'OMPI_COMM_WORLD_SIZE'):   # srun, mpirun
    if int(env.get(var) or 1) > 1:
      return True
  return False


def maybe_initialize_distributed() -> None:
  """``jax.distributed.initialize()`` when launched as several processes.

  Multi-process when ``JAX_COORDINATOR_ADDRESS`` is set (then
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` give the rest, unless the
  cluster can tell), or a TPU pod / SLURM / Open MPI launch of more than one
  process is detected from its environment, or ``GMIX_DISTRIBUTED=1``
  (JAX then auto-detects everything; on a Cloud TPU pod this is all that is
  needed). A no-op on a single host, when already initialized, and in a
  process started by ``multiprocessing`` (a Grain input worker: spawned, it
  re-imports ``__main__`` and inherits the launcher's environment, but must
  never join the job as one more process). Call it first thing, before any
  JAX computation.
  """
  if (jax.distributed.is_initialized() or multiprocessing.parent_process() is not None
      or not _launched_multiprocess(os.environ)):
    return
  as_int = lambda var: int(os.environ[var]) if os.environ.get(var) else None
  jax.distributed.initialize(
      coordinator_address=os.environ.get('JAX_COORDINATOR_ADDRESS') or None,
      num_processes=as_int('JAX_NUM_PROCESSES'),
      process_id=as_int('JAX_PROCESS_ID'))
