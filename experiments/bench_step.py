"""Cost of a compiled train step relative to a baseline, timed in back-to-back pairs.

  python experiments/bench_step.py                                  # presets and estimators vs SAM
  python experiments/bench_step.py --methods gmix,bgmix --set sensitivity.estimator=first_order
  python experiments/bench_step.py --methods mixup,gmix,gmix:sharpness.rule=asam --baseline mixup,sam
  python experiments/bench_step.py --methods bgmix:first_order,bgmix:shared --baseline sam --pairs 40
  python experiments/bench_step.py --methods bgmix:shared,bgmix:shared_prev --baseline sam
  python experiments/bench_step.py --methods erm,samix,samix_p --baseline erm   # SAMix
  python experiments/bench_step.py --methods gmix --accum 1,2,4 --baseline gmix  # accumulation K
  python experiments/bench_step.py --model resnet18 --input 32,32,3 --chunk 16 --optax-sam  # GPU

Why pairs. On a shared machine the speed of a step drifts with the other
jobs' load by far more than the differences being measured; timing methods
one after another turns that drift into fake ratios (under load the old
version of this script put G-Mix at 2.49x SAM when it costs 1.01x). Here
every row is timed as ``--pairs`` pairs (baseline step, method step) run
back to back, the order alternating from pair to pair, and the figure is the
median over pairs of the per-pair ratio, both for the process CPU time of
the step (``time.process_time`` around the call and its
``block_until_ready``: all of XLA's threads, insensitive to how many cores
the other jobs leave us) and for wall time. p25/p75 of the per-pair ratios
give the spread. The 1-minute load average is recorded before and after
every row (``os.getloadavg``); report it with the figures, and the CPU model
and core count the JSON records (ratios are comparable on one machine only).

LookSAM (``sharpness.rule=looksam``) alternates a full SAM step every k-th
step with a one-gradient step; its two programs are compiled apart, as the
trainer does, each is paired with the baseline on its own, and the row is
the amortised cost per step (r_full + (k − 1) r_cheap)/k (``measure``).

Methods (``--methods``, comma-separated rows): a preset (`objectives.PRESETS`)
or a SAMix name (`samix.METHODS`), optionally followed by ``:``-separated
overrides of the method's configs, ``FIELD=VALUE`` with FIELD as in
``--config.method.FIELD`` (``sensitivity.estimator=first_order``,
``sharpness.rule=asam``, ``sharpness.rho=0.1``, ``partition.gamma=0.25``;
values are Python literals or bare strings); a bare word is short for
``sensitivity.estimator=WORD``. ``--set FIELD=VALUE`` (repeatable) applies to
every row but not to the baseline. A ``bgmix``/``dgmix`` row that sets no
estimator is expanded over ``--estimators``. ``--chunk`` is the
``sensitivity.chunk`` of split rows whose estimator is ``per_example``
unless they set it (0, the whole batch, for the others: ``first_order`` is one
ghost-norm pass over the whole batch, docs/methods.md § 3.1, which chunks
would only split). The baseline (``--baseline``, default
``sam``; ``sam,mixup,erm`` pairs every row with each) is a row spec too, and
a row equal to it is still paired with it: its ratio, ~1.00, shows the noise
floor.

Same model, batch and optimizer (SGD, momentum 0.9) for every row; the step
is the library's own (``parallel.make_per_device_step`` under
``jit(shard_map)``), compiled once, warmed up by ``--warmup`` calls. Memory
is XLA's account of the compiled step (``Compiled.memory_analysis()``):
``temp`` is the scratch the step needs beyond its inputs and outputs, what
grows with the batch or the sensitivity chunk. ``--accum 1,2,4`` runs every
row with each number of micro-batches K. ``--optax-sam`` adds
``optax.contrib.sam`` (opaque mode) paired against ``optax.chain(
gmix_jax.transforms.sam(rho), sgd)`` in a hand-written step. Prints a
markdown line per row as it is measured and a table at the end; ``--out
FILE`` writes JSON, rewritten after every row so a run cut short keeps what
it measured.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gmix_jax import losses, models, objectives, parallel, samix, transforms

CHUNKED_ESTIMATORS = ('per_example',)


# ----------------------------------------------------------------------------
# Row specs: NAME[:FIELD=VALUE[:...]]
# ----------------------------------------------------------------------------


def _value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_override(item: str) -> tuple[str, str, object]:
  """``'sensitivity.estimator=first_order'`` -> ``('sensitivity', 'estimator', 'first_order')``;
  a bare word is an estimator; a leading ``method.`` is dropped."""
  if '=' not in item:
    return 'sensitivity', 'estimator', item
  key, text = item.split('=', 1)
  key = key.strip()
  if key.startswith('method.'):
    key = key[len('method.'):]
  if key.count('.') != 1:
    raise ValueError(f'override {item!r}: expected FIELD=VALUE with FIELD like '
                     f'sensitivity.estimator or sharpness.rule')
  config, field = key.split('.')
  if (config, field) == ('sharpness', 'rule'):   # the config's name of SharpnessRule.name
    field = 'name'
  return config, field, _value(text.strip())


def parse_spec(spec: str, extra: list[str] = ()) -> tuple[str, dict]:
  """``'bgmix:first_order:partition.gamma=0.25'`` -> ``('bgmix', {config: {field: value}})``."""
  name, *items = spec.split(':')
  overrides: dict = {}
  for item in [*items, *extra]:
    config, field, value = parse_override(item)
    overrides.setdefault(config, {})[field] = value
  return name, overrides


def expand_rows(methods: str, sets: list[str], estimators: str, chunk: int) -> list[tuple[str, str, dict]]:
  """``(label, name, overrides)`` per row: ``bgmix``/``dgmix`` rows without an
  estimator expanded over ``estimators``; ``chunk`` for the chunked estimators."""
  rows = []
  for spec in (m for m in methods.split(',') if m):
    name, overrides = parse_spec(spec, sets)
    variants = [(spec, overrides)]
    if name in ('bgmix', 'dgmix') and 'estimator' not in overrides.get('sensitivity', {}):
      variants = [(f'{spec}:{e}', {**overrides, 'sensitivity': {**overrides.get('sensitivity', {}),
                                                               'estimator': e}})
                  for e in estimators.split(',') if e]
    for label, o in variants:
      rows.append((label, name, with_chunk(name, o, chunk)))
  return rows


def with_chunk(name: str, overrides: dict, chunk: int) -> dict:
  sens = overrides.get('sensitivity', {})
  if name in samix.METHODS or 'chunk' in sens:
    return overrides
  method = objectives.get_method(name, 10, **overrides)   # also checks the overrides early
  chunked = method.partition.rule != 'none' and method.sensitivity.estimator in CHUNKED_ESTIMATORS
  return {**overrides, 'sensitivity': {**sens, 'chunk': chunk if chunked else 0}}


# ----------------------------------------------------------------------------
# Steps: each a `run()` that does one compiled step and returns its output
# ----------------------------------------------------------------------------


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  if m is None:          # some backends do not report
    return {}
  mib = lambda v: float(v) / 2 ** 20
  return {'temp_mib': mib(m.temp_size_in_bytes), 'args_mib': mib(m.argument_size_in_bytes),
          'out_mib': mib(m.output_size_in_bytes)}


def cpu_model() -> str:
  """The CPU's model name (``/proc/cpuinfo``'s first ``model name``; the
  platform's processor string elsewhere): ratios are only comparable on one machine."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _random_batch(batch, input_shape, num_classes):
  rng = np.random.default_rng(0)
  return {'x': rng.normal(size=(batch, *input_shape)).astype(np.float32),
          'y': rng.integers(0, num_classes, batch).astype(np.int32),
          'index': np.arange(batch, dtype=np.int32)}


def _samix_parts(name, model_name, module, apply_fn, input_shape, num_classes, params, model_state):
  """SAMix's objective, extra state and update (``samix_p``: a fresh SAMix's
  mixblock and EMA encoder stand in for the checkpoint it would load)."""
  build = lambda cfg, restore=None: samix.build(
      cfg, model_name, module, apply_fn, input_shape, num_classes, 1000, params, model_state,
      jax.random.PRNGKey(1), restore=restore)
  if name == 'samix':
    return build(samix.get_config('samix'))
  _, source, _ = build(samix.get_config('samix'))
  return build(samix.get_config('samix_p', source_workdir='(in memory)'),
               restore=lambda workdir: (0, {'extra': jax.device_get(source)}))


def build_step(name, overrides, model_name, module, input_shape, num_classes, batch, n_dev,
               accumulation_steps=1):
  """``(run, info)``: ``run()`` advances the row's own state by one compiled step."""
  apply_fn = models.make_apply_fn(module)
  optimizer = optax.sgd(0.05, momentum=0.9)
  params, model_state = models.init_model(module, jax.random.PRNGKey(0), input_shape)
  if name in samix.METHODS:
    if accumulation_steps != 1 or overrides:
      raise ValueError(f'{name}: overrides and --accum apply to the presets only')
    objective, extra, extra_update = _samix_parts(name, model_name, module, apply_fn, input_shape,
                                                  num_classes, params, model_state)
    step_kwargs = {'extra_update': extra_update}
    stale = False
    phases, objective = (None,), {None: objective}
  else:
    method = objectives.get_method(name, num_classes, **overrides)
    driver = objectives.rule_driver(method.sharpness)
    # LookSAM: one program per phase, as the trainer compiles them (a lax.cond
    # between them would time XLA's slow gradient-in-a-conditional instead).
    phases = driver.phases or (None,)
    objective = {ph: objectives.make_objective(method, apply_fn, accumulation_steps=accumulation_steps,
                                               **({'looksam_phase': ph} if ph else {}))
                 for ph in phases}
    # A method's own state (shared_prev's ascent direction, LookSAM's g_v, ...).
    extra, step_kwargs = objectives.step_kwargs(method, params)
    stale = method.partition.rule != 'none' and method.sensitivity.estimator == 'stale'
  state = parallel.create_train_state(params, model_state, optimizer, 0,
                                      num_train=batch if stale else 0, extra=extra)
  mesh = parallel.make_mesh(n_dev)
  state = parallel.replicate_on_mesh(state, mesh)
  data = parallel.global_batch_to_device(_random_batch(batch, input_shape, num_classes), mesh, 'batch')
  compiled, info = {}, {}
  for ph in phases:
    step = parallel.shard_map_step(parallel.make_per_device_step(
        objective[ph], optimizer, use_stale_scores=stale, **step_kwargs), mesh)
    t = time.perf_counter()
    compiled[ph] = step.lower(state, data).compile()
    info = {'compile_s': info.get('compile_s', 0.0) + time.perf_counter() - t,
            **_max_memory(info, _memory(compiled[ph]))}
  carry = [state]

  def run_phase(ph):
    def run():
      carry[0] = compiled[ph](carry[0], data)[0]
      return carry[0]
    return run
  if phases == (None,):
    return run_phase(None), info
  # The row's cost per step is the phases' average over LookSAM's period k
  # (``measure``); ``run`` itself follows the schedule, for the warm-up.
  counter = [0]

  def run():
    ph = driver.phase(counter[0])
    counter[0] += 1
    return run.phases[ph]()
  run.phases = {ph: run_phase(ph) for ph in phases}
  run.weights = phase_weights(driver.phase, method.sharpness.looksam_k)
  info['phase_weights'] = run.weights
  return run, info


def _max_memory(a: dict, b: dict) -> dict:
  """The larger of two programs' XLA memory accounts, field by field."""
  return {k: max(a.get(k, 0.0), v) for k, v in b.items()}


def phase_weights(phase, period: int) -> dict:
  """Share of each phase among the steps 0..period-1 of ``phase(step)``
  (LookSAM with k = 5: ``{'full': 0.2, 'cheap': 0.8}``)."""
  names = [phase(s) for s in range(period)]
  return {n: names.count(n) / period for n in dict.fromkeys(names)}


def build_sam_transform_step(kind, module, input_shape, num_classes, batch, rho=0.05, lr=0.05):
  """A hand-written SAM step with ``optax.chain(transforms.sam(rho), sgd)``
  (``kind='ours'``) or ``optax.contrib.sam`` in opaque mode (``'optax'``)."""
  apply_fn = models.make_apply_fn(module)
  params, model_state = models.init_model(module, jax.random.PRNGKey(0), input_shape)
  data = jax.device_put(_random_batch(batch, input_shape, num_classes))

  def loss_fn(p, ms, b):
    logits, new_state = apply_fn(p, ms, b['x'], True)
    return losses.soft_cross_entropy(logits, losses.as_soft_labels(b['y'], num_classes)).mean(), new_state

  if kind == 'ours':
    opt = optax.chain(transforms.sam(rho), optax.sgd(lr))
  else:
    opt = optax.contrib.sam(optax.sgd(lr), optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
                            sync_period=2, opaque_mode=True)

  def step(c, b):
    p, s, ms = c
    (_, new_ms), g = jax.value_and_grad(loss_fn, has_aux=True)(p, ms, b)
    grad_fn = lambda q, _: jax.grad(lambda q: loss_fn(q, ms, b)[0])(q)
    u, s = opt.update(g, s, p, grad_fn=grad_fn)
    return optax.apply_updates(p, u), s, new_ms

  carry = [jax.tree.map(jnp.copy, (params, opt.init(params), model_state))]
  t = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=0).lower(carry[0], data).compile()
  info = {'compile_s': time.perf_counter() - t, **_memory(compiled)}

  def run():
    carry[0] = compiled(carry[0], data)
    return carry[0]
  return run, info


# ----------------------------------------------------------------------------
# Paired timing
# ----------------------------------------------------------------------------


def timed(run, reps: int = 1) -> tuple[float, float]:
  """``(wall s, process CPU s)`` per step of ``reps`` blocked steps."""
  w, c = time.perf_counter(), time.process_time()
  for _ in range(reps):
    jax.block_until_ready(run())
  return (time.perf_counter() - w) / reps, (time.process_time() - c) / reps


def paired(base, run, pairs: int, reps: int = 1) -> dict:
  """Per-pair ratios (row / baseline) of back-to-back steps, order alternating."""
  wall, cpu, base_wall, base_cpu = [], [], [], []
  for i in range(pairs):
    if i % 2 == 0:
      wb, cb = timed(base, reps)
      wr, cr = timed(run, reps)
    else:
      wr, cr = timed(run, reps)
      wb, cb = timed(base, reps)
    wall.append(wr), cpu.append(cr), base_wall.append(wb), base_cpu.append(cb)
  q = lambda xs: [float(np.percentile(xs, p)) for p in (25, 50, 75)]
  return {'pairs': pairs,
          'cpu_ratio': q([r / b for r, b in zip(cpu, base_cpu)]),
          'wall_ratio': q([r / b for r, b in zip(wall, base_wall)]),
          'cpu_ms': statistics.median(cpu) * 1e3, 'wall_ms': statistics.median(wall) * 1e3,
          'base_cpu_ms': statistics.median(base_cpu) * 1e3,
          'base_wall_ms': statistics.median(base_wall) * 1e3}


def measure(base, run, pairs: int, reps: int = 1) -> dict:
  """``paired``, or for a row with phases (LookSAM: ``run.phases``,
  ``run.weights``) each phase paired with the baseline on its own (its cost
  does not depend on the values the schedule would feed it) and the ratios
  and times amortised, Σ_phase w_phase r_phase = (r_full + (k − 1) r_cheap)/k.
  The amortised p25/p75 are the weighted sums of the phases' p25/p75."""
  if not hasattr(run, 'phases'):
    return paired(base, run, pairs, reps)
  per = {ph: paired(base, r, pairs, reps) for ph, r in run.phases.items()}
  return amortised(per, run.weights)


def amortised(per_phase: dict, weights: dict) -> dict:
  """The weighted sums over phases of ``paired``'s figures, plus the phases'."""
  w = lambda key: sum(weights[ph] * r[key] for ph, r in per_phase.items())
  quantiles = lambda key: [sum(weights[ph] * r[key][i] for ph, r in per_phase.items())
                           for i in range(3)]
  return {'pairs': sum(r['pairs'] for r in per_phase.values()),
          'cpu_ratio': quantiles('cpu_ratio'), 'wall_ratio': quantiles('wall_ratio'),
          **{k: w(k) for k in ('cpu_ms', 'wall_ms', 'base_cpu_ms', 'base_wall_ms')},
          'weights': weights, 'phases': per_phase}


def markdown_row(row: dict, baselines: list[str]) -> str:
  cells = [row['method'], str(row['batch']), f"{row['cpu_ms']:.1f}", f"{row['wall_ms']:.1f}"]
  for b in baselines:
    r = row['vs'][b]
    cells += [f"{r['cpu_ratio'][1]:.2f} ({r['cpu_ratio'][0]:.2f}-{r['cpu_ratio'][2]:.2f})",
              f"{r['wall_ratio'][1]:.2f}"]
  cells += [f"{row.get('temp_mib', float('nan')):.0f}",
            f"{row['load_before']:.1f} / {row['load_after']:.1f}"]
  return '| ' + ' | '.join(cells) + ' |'


def markdown_header(baselines: list[str]) -> str:
  cols = ['method', 'batch', 'CPU ms', 'wall ms']
  for b in baselines:
    cols += [f'CPU × {b} (p25-p75)', f'wall × {b}']
  cols += ['temp MiB', 'load before / after']
  return '| ' + ' | '.join(cols) + ' |\n' + '| ' + ' | '.join('---' for _ in cols) + ' |'


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--model', default='cnn')
  p.add_argument('--width', type=int, default=32)
  p.add_argument('--batch', default='128', help='one or more global batch sizes, comma-separated')
  p.add_argument('--input', default='28,28,1')
  p.add_argument('--devices', type=int, default=1)
  p.add_argument('--methods', default='erm,mixup,sam,gmix,bgmix,dgmix',
                 help='rows: NAME[:FIELD=VALUE...] (a bare word after ":" is an estimator)')
  p.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                 help='override for every row (not the baseline), e.g. sensitivity.estimator=first_order')
  p.add_argument('--baseline', default='sam', help='row spec(s) to pair with, e.g. sam or sam,mixup,erm')
  p.add_argument('--estimators', default='per_example,first_order,shared,stale',
                 help='expansion of bgmix/dgmix rows that set no estimator')
  p.add_argument('--chunk', type=int, default=1, help='sensitivity.chunk of per_example rows')
  p.add_argument('--chunks', default='', help='also BG-Mix per_example at each of these chunks')
  p.add_argument('--accum', default='1', help='accumulation_steps K of the rows, comma-separated')
  p.add_argument('--pairs', type=int, default=20)
  p.add_argument('--reps', type=int, default=1, help='steps per half of a pair')
  p.add_argument('--warmup', type=int, default=3)
  p.add_argument('--optax-sam', action='store_true', help='also optax.contrib.sam vs transforms.sam')
  p.add_argument('--out', default=None)
  a = p.parse_args()
  input_shape = tuple(int(v) for v in a.input.split(','))
  module = models.get_model(a.model, 10, **({'width': a.width} if a.model == 'cnn' else {}))
  try:      # bad names or overrides: one line, before anything compiles
    rows = expand_rows(a.methods, a.set, a.estimators, a.chunk)
    for b in (b for b in a.baseline.split(',') if b):
      with_chunk(*parse_spec(b), a.chunk)
  except ValueError as e:
    p.error(str(e))
  rows += [(f'bgmix:per_example:sensitivity.chunk={c}', 'bgmix',
            {'sensitivity': {'estimator': 'per_example', 'chunk': int(c)}})
           for c in a.chunks.split(',') if c]
  baselines = [b for b in a.baseline.split(',') if b]
  accums = [int(k) for k in a.accum.split(',')]
  device = (f'{jax.devices()[0].device_kind} x{a.devices} '
            f'({platform.processor() or platform.machine()}, {os.cpu_count()} cores)')
  result = {'device': device, 'cpu_model': cpu_model(), 'cpu_count': os.cpu_count(),
            'jax': jax.__version__, 'args': vars(a), 'baselines': baselines,
            'load_at_start': os.getloadavg(), 'rows': []}
  print(f'{a.model} width {a.width}, {device}, {cpu_model()}, jax {jax.__version__}; {a.pairs} pairs per row, '
        f'{a.reps} step(s) per half; load average at start {os.getloadavg()[0]:.2f}', flush=True)

  def save():
    if a.out:
      with open(a.out, 'w') as f:
        json.dump(result, f, indent=2)

  def warm(run):
    for _ in range(a.warmup):
      jax.block_until_ready(run())
    return run

  print(markdown_header(baselines), flush=True)
  for batch in (int(b) for b in a.batch.split(',')):
    base_runs = {}
    for b in baselines:
      name, overrides = parse_spec(b)
      base_runs[b] = warm(build_step(name, with_chunk(name, overrides, a.chunk), a.model, module,
                                     input_shape, 10, batch, a.devices)[0])
    todo = [(label + (f' K={k}' if accums != [1] else ''), k,
             lambda name=name, o=o, k=k: build_step(name, o, a.model, module, input_shape, 10, batch,
                                                    a.devices, k))
            for label, name, o in rows for k in accums]
    if a.optax_sam:
      ours = warm(build_sam_transform_step('ours', module, input_shape, 10, batch)[0])
      todo.append(('optax.contrib.sam (opaque) vs transforms.sam', 1,
                   lambda: build_sam_transform_step('optax', module, input_shape, 10, batch)))
    for label, k, build in todo:
      run, info = build()
      warm(run)
      row = {'method': label, 'batch': batch, 'accum': k, **info, 'load_before': os.getloadavg()[0],
             'vs': {}}
      pairs_with = {'ours': ours} if label.startswith('optax.contrib') else base_runs
      for b, base in pairs_with.items():
        row['vs'][b] = measure(base, run, a.pairs, a.reps)
      first = row['vs'][next(iter(pairs_with))]
      row.update(cpu_ms=first['cpu_ms'], wall_ms=first['wall_ms'], load_after=os.getloadavg()[0])
      result['rows'].append(row)
      print(markdown_row(row, list(pairs_with)), flush=True)
      save()
  result['load_at_end'] = os.getloadavg()
  print(f"\nload average (1, 5, 15 min) at start {tuple(round(x, 2) for x in result['load_at_start'])}, "
        f"at end {tuple(round(x, 2) for x in result['load_at_end'])}; median over {a.pairs} pairs "
        f'of the per-pair ratio (p25-p75 in brackets)\n')
  print(markdown_header(baselines))
  for row in result['rows']:
    if set(row['vs']) == set(baselines):
      print(markdown_row(row, baselines))
  for row in result['rows']:
    if set(row['vs']) != set(baselines):
      r = row['vs']['ours']
      print(f"\n{row['method']}: CPU × {r['cpu_ratio'][1]:.2f} ({r['cpu_ratio'][0]:.2f}-"
            f"{r['cpu_ratio'][2]:.2f}), wall × {r['wall_ratio'][1]:.2f}; "
            f"{r['cpu_ms']:.1f} vs {r['base_cpu_ms']:.1f} CPU ms")
  save()


if __name__ == '__main__':
  main()
