"""train_and_evaluate(config, workdir): the training loop, in phases.

  setup     validate the config (before anything compiles), read the data,
            build the model, method and optimizer            (``configure``)
  state     fresh, or the workdir's latest checkpoint        (``checkpoints``)
  step      the compiled data-parallel step, and where state and batches
            live (jit + shard_map, or pmap)                  (``parallel``)
  loop      one step per batch; the periodic work (refresh stale scores,
            log, evaluate, checkpoint, stop) is one small function each
  summary   ``summary.json`` and ``curves.png``              (``outputs``)

All the mathematics lives in the core (objectives and below); this file only
composes and records. Outputs in ``workdir``: ``config.json``,
``launches.jsonl`` (one record per launch), ``metrics.jsonl`` (one JSON record
per log/eval event), ``checkpoints/`` (Orbax, with digests), ``curves.png``,
``summary.json`` and ``.lock``.

Reliability (docs/long-runs.md): one run per workdir (``lock``); a
relaunch that would change the trajectory is refused (``drift``); a rerun
resumes exactly from the newest checkpoint that verifies (state, data plan
position, the open metrics window; records written after that checkpoint are
dropped from ``metrics.jsonl``); SIGTERM/SIGINT stop after the current step
with a checkpoint (all processes at the same step); ``nan_policy`` skips or
stops on a non-finite loss/gradient; a full disk is one clear error.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import optax

from gmix_jax import checkpoints
from gmix_jax import configure
from gmix_jax import data as data_lib
from gmix_jax import evaluation
from gmix_jax import lock
from gmix_jax import models
from gmix_jax import objectives
from gmix_jax import outputs
from gmix_jax import parallel
from gmix_jax import progress
from gmix_jax import sensitivity
from gmix_jax import tasks
from gmix_jax import tb_events
from gmix_jax import workdir as workdir_lib
from gmix_jax.checkpoints import restore_state  # noqa: F401  (public: train.restore_state)
from gmix_jax.preemption import Preemption


@dataclasses.dataclass
class Setup:
  """What the setup phase built: everything the later phases read."""
  config: ml_collections.ConfigDict
  workdir: str
  task: tasks.Task            # what is learned (its objective, extra state, views, evaluation)
  method: objectives.Method
  ds: data_lib.TrainData      # splits, training subset, normaliser (streamed, never in memory)
  module: Any
  apply_fn: Callable
  optimizer: optax.GradientTransformation
  steps_per_epoch: int
  total_steps: int
  n_dev: int                  # devices per process
  use_stale: bool             # the `stale` estimator keeps a score table in the state
  lr_at: Callable             # step -> learning rate (recorded in metrics.jsonl)
  relaunch_changes: dict      # non-trajectory fields this launch changed: {field: (old, new)}

  @property
  def lead(self) -> bool:
    return jax.process_index() == 0

  @property
  def per_device_batch(self) -> int:
    return self.config.batch_size // (self.n_dev * jax.process_count())

  @property
  def eval_batch(self) -> int:
    """Global evaluation batch: ``eval_batch_size`` rounded up to whole rows
    for every device of every process."""
    k = self.n_dev * jax.process_count()
    return -(-self.config.eval_batch_size // k) * k


@dataclasses.dataclass
class Placed:
  """The compiled step and how state and batches live on the devices."""
  step_fn: Callable           # (state, device batch, step number) -> (state, metrics)
  to_device: Callable         # host-local batch -> device batch
  host_state: Callable        # state -> what is checkpointed (the global state)
  local_state: Callable       # state -> this process's copy
  eval_state: Callable        # state -> what eval_fn / score_fn take (global or local)
  to_eval_device: Callable    # host-local eval batch -> what eval_fn / score_fn take
  eval_fn: Callable           # (params, model_state, x, y, mask) -> sums over all processes
  score_fn: Callable          # (params, model_state, x, y) -> s_i of the global batch


@dataclasses.dataclass
class Loop:
  """The loop's host-side state."""
  ckpt: Any
  writer: workdir_lib.MetricsWriter
  pending: list[dict]         # per-step metrics (host) since the last train record
  history: list[dict]         # test records so far
  last_eval: dict
  bar: Any = None
  # Metrics of dispatched steps not yet read back. Each step's are read (a few
  # scalars) once the next step is dispatched, so the host stays one step ahead
  # while the flags they carry (non-finite, stop) are seen within a step.
  in_flight: list = dataclasses.field(default_factory=list)
  t_window: float = dataclasses.field(default_factory=time.time)
  window_steps: int = 0
  t_start: float = dataclasses.field(default_factory=time.time)   # this launch's start
  wall_before: float = 0.0    # the run's wall time before this launch (from the checkpoint)

  def wall_time(self) -> float:
    """The run's wall time so far, across launches."""
    return self.wall_before + time.time() - self.t_start
  last_train: dict = dataclasses.field(default_factory=dict)       # the last train record


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint).

  Returns the summary (also written to ``summary.json``), with
  ``finished_before`` (not written) True when the workdir held a finished run
  and nothing was trained; after a SIGTERM,
  ``{'preempted': True, 'step': s, ...}`` instead, with a checkpoint at
  ``s`` (nothing else written): the next call with the same arguments
  resumes from it.

  Raises:
    ValueError: a bad config or dataset (before anything compiles).
    drift.ConfigDriftError: the workdir's checkpoints come from a config
      that trains differently (nothing is written).
    lock.WorkdirLockedError: another run holds the workdir.
    checkpoints.CheckpointCorruptError: no checkpoint verifies.
    workdir.DiskFullError: the disk filled up (what was kept is named).
    FloatingPointError: ``nan_policy='stop'`` and a non-finite loss or
      gradient norm; the last good checkpoint is kept.
  """
  t_start = time.time()
  parallel.maybe_initialize_distributed()  # before anything asks JAX for devices
  configure.validate_config(config)
  workdir = os.path.abspath(workdir)
  with (Preemption(workdir) as preemption, lock.job_lock(workdir),
        workdir_lib.disk_full_report(workdir) as report):
    s = setup(config, workdir)
    state, parts = fresh_state(s)
    state, loop = restore_or_start(s, state, t_start)
    finished_before = int(jax.device_get(state.step)) >= s.total_steps   # nothing to train
    report.ckpt = loop.ckpt          # its pending writes end before a full disk is reported
    state, placed = place(s, state, parts)
    state, step, stopped = run_loop(s, placed, state, loop, preemption)
    loop.ckpt.wait_until_finished()
    loop.writer.close()
    if loop.bar is not None:
      loop.bar.close()
    if stopped and step + 1 < s.total_steps:
      return {'preempted': True, 'step': step + 1, 'steps': s.total_steps, 'workdir': s.workdir,
              'signal': preemption.signal_name,
              'checkpoint': os.path.join(s.workdir, 'checkpoints', str(step + 1)),
              'wall_time_sec': time.time() - t_start}
    return {**summarize(s, placed, state, loop), 'finished_before': finished_before}


# ----------------------------------------------------------------------------
# Phases.
# ----------------------------------------------------------------------------
def setup(config: ml_collections.ConfigDict, workdir: str) -> Setup:
  """Refuses config drift, reads and checks the data, builds model, method
  and optimizer (the config is valid and the workdir locked)."""
  n_dev = configure.num_devices(config)
  relaunch_changes = workdir_lib.check_config(workdir, config, n_dev * jax.process_count())

  ds = data_lib.open_train_data(config)
  steps_per_epoch = data_lib.steps_per_epoch(ds.num_train, config.batch_size)

  task = tasks.get(config)
  module, apply_fn = task.build_model(config, ds.num_classes)
  method = task.build_method(config, ds.num_classes)
  configure.validate_data(config, ds, module, method)
  return Setup(
      config=config, workdir=workdir, task=task, method=method, ds=ds, module=module, apply_fn=apply_fn,
      optimizer=task.build_optimizer(config, steps_per_epoch),
      steps_per_epoch=steps_per_epoch, total_steps=config.num_epochs * steps_per_epoch,
      n_dev=n_dev, relaunch_changes=relaunch_changes,
      use_stale=method.uses_stale_scores,
      lr_at=_lr_at(configure.build_lr_schedule(config, steps_per_epoch)))


def _lr_at(schedule) -> Callable:
  """``step -> float`` learning rate: one small compiled function, or a constant."""
  if not callable(schedule):
    return lambda step: float(schedule)
  compiled = jax.jit(schedule)
  return lambda step: float(compiled(step))


def fresh_state(s: Setup):
  """``(state, parts)``: the initial TrainState and the task's
  ``tasks.StepParts`` (objectives normalising the batch on device)."""
  config = s.config
  params, model_state = models.init_model(s.module, jax.random.PRNGKey(config.seed),
                                          s.ds.input_shape)
  parts = s.task.step_parts(config, s.method, s.module, s.apply_fn, s.ds, s.total_steps, params,
                            model_state)
  if parts.params is not None:          # the task's own initial model (e.g. pretrained)
    params, model_state = parts.params, parts.model_state
  parts = parts.map_objectives(lambda f: configure.normalized(f, s.ds.normalizer))
  state = parallel.create_train_state(params, model_state, s.optimizer, config.seed,
                                      num_train=s.ds.num_train if s.use_stale else 0,
                                      extra=parts.extra)
  return state, parts


def restore_or_start(s: Setup, state, t_start: float) -> tuple[Any, Loop]:
  """The newest checkpoint that verifies, if there is one, and the loop's
  host state to continue from it; the launch is recorded (``config.json``,
  ``launches.jsonl``)."""
  pending, wall_before = [], 0.0
  restored = checkpoints.restore_verified(s.workdir, state, lead=s.lead)
  if restored is not None:
    _, state, loop_item = restored
    pending = [{k: np.float32(v) for k, v in m.items()} for m in loop_item['pending']]
    wall_before = loop_item.get('wall_time_sec', 0.0)
  if s.lead:
    workdir_lib.record_launch(s.workdir, s.config, int(state.step) if restored else 0,
                              s.relaunch_changes, s.n_dev * jax.process_count(),
                              fresh=restored is None)
  ckpt = checkpoints.manager(s.workdir, s.config.keep_checkpoints)
  writer = workdir_lib.MetricsWriter(s.workdir, s.lead)
  if s.lead and configure.opt(s.config, 'tensorboard'):   # TensorBoard drops steps past the checkpoint
    writer.events = tb_events.EventWriter(s.workdir, purge_step=int(state.step) + 1 if restored else None)
  # Records past the restored step were written by a run killed before its next
  # checkpoint: this run writes them again.
  kept = workdir_lib.truncate_metrics(writer.path, int(state.step), rewrite=s.lead)
  history = [r for r in kept if r.get('split') == 'test']
  return state, Loop(ckpt=ckpt, writer=writer, pending=pending, history=history,
                     last_eval=dict(history[-1]) if history else {}, t_start=t_start,
                     wall_before=wall_before)


def place(s: Setup, state, parts: tasks.StepParts) -> tuple[Any, Placed]:
  """Compiles the per-device step for the chosen parallelism and puts the
  state on the devices. A task whose rule has phases (``parts.phases``)
  gets one program per phase, chosen on the host by ``parts.phase(step)``."""
  config, method = s.config, s.method
  make_step = lambda obj: parallel.make_per_device_step(
      obj, s.optimizer, axis_name='batch', use_stale_scores=s.use_stale,
      skip_nonfinite=configure.opt(config, 'nan_policy') == 'skip',
      extra_update=parts.extra_update, objective_inputs=parts.objective_inputs)
  if config.parallel == 'shard_map':
    if jax.process_count() > 1:     # the first n_dev devices of every process, by process
      mesh = parallel.make_mesh(devices=[
          d for p in range(jax.process_count())
          for d in [d for d in jax.devices() if d.process_index == p][:s.n_dev]])
    else:
      mesh = parallel.make_mesh(s.n_dev)
    wrap = lambda f: parallel.shard_map_step(f, mesh)
    state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    to_device = lambda b: parallel.global_batch_to_device(b, mesh, 'batch')
    host_state = lambda st: st                # what is checkpointed: the global state
    # This process's copy (replicated, so every copy is the same).
    local_state = lambda st: jax.tree.map(lambda a: a.addressable_data(0), st)
    eval_state, eval_mesh = host_state, mesh  # evaluation: sharded over every process
  else:
    devices = jax.local_devices()[:s.n_dev]
    wrap = lambda f: parallel.pmap_step(f, devices=devices)
    state = parallel.replicate(state, devices)
    to_device = lambda b: parallel.shard_batch(b, s.n_dev)
    host_state = local_state = eval_state = parallel.unreplicate
    eval_mesh = None                          # evaluation: one device

  if parts.phases:
    programs = {p: wrap(make_step(obj)) for p, obj in parts.phases.items()}
    step_fn = lambda state, batch, step: programs[parts.phase(step)](state, batch)
  else:
    one = wrap(make_step(parts.objective))
    step_fn = lambda state, batch, step: one(state, batch)
  apply_fn, num_classes = s.apply_fn, s.ds.num_classes
  score_cfg = sensitivity.refresh_config(method.sensitivity)
  predict = lambda p, ms, x: apply_fn(p, ms, x, False)[0]
  score = lambda p, ms, x, y: sensitivity.scores(
      score_cfg, apply_fn, p, ms, x, jax.nn.one_hot(y, num_classes), method.sensitivity_rho)
  return state, Placed(
      step_fn=step_fn, to_device=to_device, host_state=host_state, local_state=local_state,
      eval_state=eval_state, to_eval_device=to_device if eval_mesh is not None else (lambda b: b),
      eval_fn=evaluation.make_eval_fn(predict, s.ds.normalizer, eval_mesh),
      score_fn=evaluation.make_score_fn(score, s.ds.normalizer, eval_mesh))


def run_loop(s: Setup, placed: Placed, state, loop: Loop, preemption: Preemption):
  """Steps from the state's step to the end (or a stop request).

  Returns ``(state, last step run, stopped early)``.
  """
  config = s.config
  start_step = int(jax.device_get(placed.local_state(state).step))
  # The plan is a function of (seed, step): resuming needs only the step.
  with s.ds.train_batches(global_batch=config.batch_size, seed=config.seed,
                          num_steps=s.total_steps, start_step=start_step,
                          process_index=jax.process_index(),
                          process_count=jax.process_count(), views=s.task.views) as batches:
    return _steps(s, placed, state, loop, preemption, batches, start_step)


def _steps(s: Setup, placed: Placed, state, loop: Loop, preemption: Preemption, batches,
           start_step: int):
  """The loop body of `run_loop` over an open batch stream."""
  config = s.config
  debug_nan_step = configure.opt(config, 'debug_nan_step')
  eval_every = s.steps_per_epoch * configure.opt(config, 'eval_every_epochs')
  loop.t_window, loop.window_steps = time.time(), 0
  stop, step = False, start_step - 1
  for step in range(start_step, s.total_steps):
    state = maybe_refresh_scores(s, placed, state, step)
    batch = _next_batch(s, loop, batches)
    bad = batch.pop('bad_records', None)       # dataset.bad_records='skip': records replaced
    if step == debug_nan_step:                 # test hook: a batch that makes the loss NaN
      batch['x'] = np.full(batch['x'].shape, np.nan, np.float32)
    # This process's stop request travels with its batch; the step returns the
    # max over all devices, so every process stops after the same step.
    batch['stop'] = np.full(batch['y'].shape, preemption.requested, np.int32)
    state, metrics = placed.step_fn(state, placed.to_device(batch), step)
    loop.in_flight.append((step, metrics if bad is None else {**metrics, 'bad_records': bad}))
    loop.window_steps += 1
    if step == start_step:     # compilation is not throughput: start the clocks after it
      jax.block_until_ready(metrics)
      loop.t_window, loop.window_steps = time.time(), 0
      if config.progress and s.lead:
        loop.bar = _progress_bar(s, step)

    last = step + 1 == s.total_steps
    log_now = (step + 1) % config.log_every_steps == 0 or last
    end_of_epoch = (step + 1) % eval_every == 0 or last      # an evaluated epoch end
    # Checkpoints: every checkpoint_every_steps, at the end, and on a stop
    # request (SIGTERM) below; a SIGKILL loses at most checkpoint_every_steps.
    ckpt_now = last or (step + 1) % config.checkpoint_every_steps == 0
    stop = drain(s, loop, keep=0 if (log_now or end_of_epoch or ckpt_now) else 1) or stop
    # One process needs no agreement: stop after this step.
    stop = stop or (preemption.requested and jax.process_count() == 1)
    if stop:
      drain(s, loop, keep=0)                   # check the last step before saving it
      ckpt_now = True
    if log_now:
      log_train(s, loop, step)
    if loop.bar is not None and step > start_step:   # the first step is the bar's start
      loop.bar.update(1)
    if end_of_epoch:
      evaluate_epoch(s, placed, state, loop, step)
    if ckpt_now:
      checkpoints.save(loop.ckpt, step + 1, placed.host_state(state), placed.local_state(state),
                       checkpoints.loop_item(loop.pending, loop.wall_time()))
    if stop:
      break
  return state, step, stop


def _next_batch(s: Setup, loop: Loop, batches) -> dict:
  """The next host batch; a record that cannot be read (``bad_records='error'``)
  stops the run with the last checkpoint finished and named."""
  try:
    return next(batches)
  except data_lib.BadRecordError as e:
    loop.ckpt.wait_until_finished()
    last = loop.ckpt.latest_step()
    kept = (f'the last checkpoint (step {last}) in {s.workdir}/checkpoints was kept'
            if last is not None else 'no checkpoint was written yet')
    raise data_lib.BadRecordError(f'{e}; {kept}') from None


def _progress_bar(s: Setup, step: int):
  """A tqdm bar (plain lines when stderr is not a terminal) started once the
  first step is done, so that its rate and ETA leave out the step's compilation."""
  return progress.make_bar(s.total_steps, step + 1)


def summarize(s: Setup, placed: Placed, state, loop: Loop) -> dict[str, Any]:
  """The summary (``summary.json`` on process 0) and ``curves.png``."""
  config = s.config
  last_eval = loop.last_eval
  if not last_eval:                # resumed after the last step: evaluate once
    last_eval = _evaluate(s, placed, state)
  summary = {
      **s.task.summary_metrics(last_eval, loop.history),
      'steps': s.total_steps, 'epochs': config.num_epochs, 'num_train': s.ds.num_train,
      'num_test': s.ds.num_test, **s.task.summary_name(config),
      'model': config.model.name, 'dataset': config.dataset.name,
      'devices': s.n_dev * jax.process_count(), 'parallel': config.parallel,
      'nonfinite_skipped': int(jax.device_get(placed.local_state(state).skipped)),
      'wall_time_sec': time.time() - loop.t_start,          # this launch
      'total_wall_time_sec': loop.wall_time(),              # the run, across launches
      **outputs.provenance(config, jax.process_count()),
  }
  if s.lead:
    curves = (outputs.plot(s.workdir, {**summary, 'seed': config.seed})
              if configure.opt(config, 'plots') else None)
    if curves:
      summary['curves'] = curves
    summary['metrics'] = loop.writer.path
    outputs.write_summary(s.workdir, summary)
  return summary


# ----------------------------------------------------------------------------
# The loop's periodic work.
# ----------------------------------------------------------------------------
def maybe_refresh_scores(s: Setup, placed: Placed, state, step: int):
  """The `stale` estimator: fresh s_i for every training example every
  ``refresh_every`` epochs (at the epoch's first step)."""
  if not (s.use_stale and step % (s.method.sensitivity.refresh_every * s.steps_per_epoch) == 0):
    return state
  st = placed.eval_state(state)
  g = s.config.batch_size        # divisible by every device of every process
  with s.ds.ordered_batches('train', global_batch=g, process_index=jax.process_index(),
                            process_count=jax.process_count()) as batches:
    table = evaluation.refresh_scores(placed.score_fn, st.params, st.model_state, batches,
                                      placed.to_eval_device, s.ds.num_train, g)
  return parallel.set_scores(state, table)


def drain(s: Setup, loop: Loop, keep: int) -> bool:
  """Reads all but the newest ``keep`` in-flight steps' metrics into
  ``loop.pending``; True when some process asked to stop.

  Raises:
    FloatingPointError: a non-finite step under ``nan_policy='stop'``.
  """
  asked = False
  while len(loop.in_flight) > keep:
    step, m = loop.in_flight.pop(0)
    m = {k: np.float32(np.mean(v)) for k, v in jax.device_get(m).items()}
    if m['nonfinite'] and configure.opt(s.config, 'nan_policy') == 'stop':
      loop.ckpt.wait_until_finished()
      raise FloatingPointError(
          f'non-finite loss or gradient at step {step} (loss={m.get("loss")}, '
          f'grad_norm={m["grad_norm"]}); stopped (nan_policy=stop). The last good checkpoint '
          f'(step {loop.ckpt.latest_step()}) in {s.workdir}/checkpoints was kept. Lower the '
          'learning rate or set optimizer.grad_clip and use a new workdir, or rerun the same '
          'command with --config.nan_policy=skip to resume from it and skip such steps.')
    asked |= bool(m.pop('stop', 0.0))
    loop.pending.append(m)
  return asked


def log_train(s: Setup, loop: Loop, step: int) -> None:
  """One train record: the window's mean metrics and its throughput."""
  bad = sum(m.pop('bad_records', 0) for m in loop.pending)  # a count, not a mean
  rec = outputs.train_record(loop.pending)
  if data_lib.inputs.dataset_field(s.config, 'bad_records') == 'skip':
    rec['bad_records'] = int(bad)          # records of this process replaced in the window
  dt = time.time() - loop.t_window
  rec.update(split='train', step=step + 1, epoch=(step + 1) / s.steps_per_epoch,
             # None for a window holding only the first (compiling) step.
             examples_per_sec=(loop.window_steps * s.config.batch_size / max(dt, 1e-9)
                               if loop.window_steps else None),
             learning_rate=s.lr_at(step))
  if 'rho' not in rec and s.method.sharpness.active:   # a scheduled ρ is the step's own mean
    rec['rho'] = float(s.method.sharpness.radius)
  rec.update(_clock(loop))
  loop.writer.write(rec)
  loop.last_train = rec
  _show(s, loop)
  loop.pending, loop.t_window, loop.window_steps = [], time.time(), 0


def evaluate_epoch(s: Setup, placed: Placed, state, loop: Loop, step: int) -> None:
  """Test-set evaluation at an (evaluated) epoch end, recorded."""
  jax.block_until_ready(state)  # finish the epoch's steps: they count as training time
  dt, steps_done = time.time() - loop.t_window, loop.window_steps
  loop.last_eval = _evaluate(s, placed, state)
  loop.last_eval.update(split='test', step=step + 1, epoch=(step + 1) // s.steps_per_epoch)
  loop.writer.write({**loop.last_eval, **_clock(loop)})
  loop.history.append(loop.last_eval)
  _show(s, loop)                   # the bar shows this evaluation now, not at the next log
  if loop.bar is not None:
    loop.bar.unpause()          # its rate leaves the evaluation out
  # Evaluation time is not training throughput: restart the window after it,
  # crediting the steps finished before it.
  loop.t_window, loop.window_steps = time.time() - dt, steps_done


def _show(s: Setup, loop: Loop) -> None:
  """The bar's postfix: the last train record's loss and throughput, the last
  evaluation's headline numbers (the task's: accuracy and ECE, or kNN accuracy)."""
  if loop.bar is None:
    return
  train, test = loop.last_train, loop.last_eval
  loop.bar.set_postfix(
      **({'loss': f"{train['loss']:.3f}"} if train else {}),
      **({'ex_s': f"{train['examples_per_sec']:.0f}"} if train.get('examples_per_sec') else {}),
      **(s.task.progress(test) if test else {}))


def _clock(loop: Loop) -> dict:
  """When a record was written: the run's wall time so far (across
  relaunches), and the UNIX time."""
  return {'wall_time_sec': loop.wall_time(), 'timestamp': time.time()}


def _evaluate(s: Setup, placed: Placed, state) -> dict:
  """The task's evaluation (streamed; supervised: accuracy, loss and ECE
  over the whole test split)."""
  return s.task.evaluate(s, placed, placed.eval_state(state))
