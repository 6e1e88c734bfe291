"""Compiled train-step time and memory per method, relative to ERM, in one process.

  python experiments/bench_step.py [--model cnn] [--batch 128] [--steps 30] [--devices 1] [--chunk 32]
  python experiments/bench_step.py --methods erm,samix,samix_p     # any preset or SAMix name
  python experiments/bench_step.py --methods gmix --accum 1,2,4      # gradient accumulation K
  python experiments/bench_step.py --model resnet18 --input 32,32,3 --batch 128,256 \\
      --optax-sam --chunks 8,16,32,64,128 --out experiments/bench_step_gpu.json   # on a GPU

Same model, batch and optimizer for every method; the step is the library's
own (`parallel.make_per_device_step` under `jit(shard_map)`), timed as the
median of ``--steps`` calls after two warm-up calls, each ended by
``block_until_ready``. Memory is XLA's own account of the compiled step
(``Compiled.memory_analysis()``): ``temp`` is the scratch the step needs
beyond its inputs and outputs (activations, per-example gradients), which
is what grows with the batch or the sensitivity chunk; it does not depend on
what else the process has allocated, unlike the allocator's peak.

``--optax-sam`` also times a plain SAM step built two ways on the same model
and batch — ``optax.chain(gmix_jax.transforms.sam(ρ), sgd)`` and
``optax.contrib.sam(sgd, chain(normalize, sgd(ρ)), opaque_mode=True)`` —
alternating the two so drift hits both. ``--chunks`` times BG-Mix with the
``per_example`` estimator at each chunk size (memory should follow the
chunk, not the batch). ``--accum 1,2,4`` runs every method with each number
of micro-batches K (``make_objective(..., accumulation_steps=K)``; temp
memory should fall with K). Prints markdown tables; ``--out FILE`` writes JSON,
rewritten after every row so a run cut short keeps what it measured.
"""
import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gmix_jax import losses, models, objectives, parallel, samix, transforms


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  if m is None:          # some backends do not report
    return {}
  mib = lambda v: float(v) / 2 ** 20
  return {'temp_mib': mib(m.temp_size_in_bytes), 'args_mib': mib(m.argument_size_in_bytes),
          'out_mib': mib(m.output_size_in_bytes)}


def _time(fn, carry, steps):
  """Median and p90 seconds of ``carry = fn(carry)`` after two warm-up calls."""
  times = []
  for i in range(steps + 2):
    t = time.perf_counter()
    carry = fn(carry)
    jax.block_until_ready(carry)
    if i >= 2:
      times.append(time.perf_counter() - t)
  return statistics.median(times), float(np.percentile(times, 90)), carry


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


def bench(method_name, model_name, module, input_shape, num_classes, batch, steps, n_dev, overrides,
          accumulation_steps=1):
  apply_fn = models.make_apply_fn(module)
  optimizer = optax.sgd(0.05, momentum=0.9)
  params, model_state = models.init_model(module, jax.random.PRNGKey(0), input_shape)
  if method_name in samix.METHODS:
    if accumulation_steps != 1:
      raise ValueError(f'--accum applies to the presets, not to {method_name}')
    objective, extra, extra_update = _samix_parts(method_name, model_name, module, apply_fn, input_shape,
                                                  num_classes, params, model_state)
    stale = False
  else:
    method = objectives.get_method(method_name, num_classes, **overrides)
    objective = objectives.make_objective(method, apply_fn, accumulation_steps=accumulation_steps)
    extra, extra_update = None, None
    stale = method.partition.rule != 'none' and method.sensitivity.estimator == 'stale'
  state = parallel.create_train_state(params, model_state, optimizer, 0,
                                      num_train=batch if stale else 0, extra=extra)
  mesh = parallel.make_mesh(n_dev)
  step = parallel.shard_map_step(parallel.make_per_device_step(
      objective, optimizer, use_stale_scores=stale, extra_update=extra_update), mesh)
  state = parallel.replicate_on_mesh(state, mesh)
  data = parallel.global_batch_to_device(_random_batch(batch, input_shape, num_classes), mesh, 'batch')
  t = time.perf_counter()
  compiled = step.lower(state, data).compile()
  compile_s = time.perf_counter() - t
  med, p90, _ = _time(lambda s: compiled(s, data)[0], state, steps)
  return {'median_ms': med * 1e3, 'p90_ms': p90 * 1e3, 'compile_s': compile_s, **_memory(compiled)}


def bench_optax_sam(module, input_shape, num_classes, batch, steps, rho=0.05, lr=0.05):
  """Our SAM transform vs optax.contrib.sam (opaque mode), same step otherwise."""
  apply_fn = models.make_apply_fn(module)
  params, model_state = models.init_model(module, jax.random.PRNGKey(0), input_shape)
  data = jax.device_put(_random_batch(batch, input_shape, num_classes))

  def loss_fn(p, model_state, batch):
    logits, new_state = apply_fn(p, model_state, batch['x'], True)
    labels = losses.as_soft_labels(batch['y'], num_classes)
    return losses.soft_cross_entropy(logits, labels).mean(), new_state

  def make_step(opt):
    def step(carry, batch):
      p, s, ms = carry
      (_, new_ms), g = jax.value_and_grad(loss_fn, has_aux=True)(p, ms, batch)
      grad_fn = lambda q, _: jax.grad(lambda q: loss_fn(q, ms, batch)[0])(q)
      u, s = opt.update(g, s, p, grad_fn=grad_fn)
      return optax.apply_updates(p, u), s, new_ms
    return opt, jax.jit(step, donate_argnums=0)

  variants = {
      'gmix_jax.transforms.sam': make_step(optax.chain(transforms.sam(rho), optax.sgd(lr))),
      'optax.contrib.sam (opaque)': make_step(optax.contrib.sam(
          optax.sgd(lr), optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
          sync_period=2, opaque_mode=True)),
  }
  # Each variant gets its own copies: the steps donate their carry.
  carries = {k: jax.tree.map(jnp.copy, (params, opt.init(params), model_state))
             for k, (opt, _) in variants.items()}
  times = {k: [] for k in variants}
  for k, (_, step) in variants.items():       # compile + warm up
    for _ in range(2):
      carries[k] = step(carries[k], data)
    jax.block_until_ready(carries[k])
  for _ in range(steps):                       # alternate, so drift hits both
    for k, (_, step) in variants.items():
      t = time.perf_counter()
      carries[k] = step(carries[k], data)
      jax.block_until_ready(carries[k])
      times[k].append(time.perf_counter() - t)
  return [{'variant': k, 'median_ms': statistics.median(v) * 1e3,
           'p90_ms': float(np.percentile(v, 90)) * 1e3} for k, v in times.items()]


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--model', default='cnn')
  p.add_argument('--width', type=int, default=32)
  p.add_argument('--batch', default='128', help='one or more global batch sizes, comma-separated')
  p.add_argument('--steps', type=int, default=30)
  p.add_argument('--devices', type=int, default=1)
  p.add_argument('--input', default='28,28,1')
  p.add_argument('--methods', default='erm,mixup,sam,gmix,bgmix,dgmix')
  p.add_argument('--estimators', default='per_example,first_order,shared,stale')
  p.add_argument('--chunk', type=int, default=32, help='sensitivity.chunk (0 = whole batch)')
  p.add_argument('--chunks', default='', help='BG-Mix per_example at each of these chunk sizes')
  p.add_argument('--accum', default='1', help='accumulation_steps K, one or more, comma-separated')
  p.add_argument('--optax-sam', action='store_true', help='also time our SAM vs optax.contrib.sam')
  p.add_argument('--out', default=None)
  a = p.parse_args()
  input_shape = tuple(int(v) for v in a.input.split(','))
  kwargs = {'width': a.width} if a.model in ('cnn',) else {}
  module = models.get_model(a.model, 10, **kwargs)
  device = (f'{jax.devices()[0].device_kind} x{a.devices} '
            f'({platform.processor() or platform.machine()}, {os.cpu_count()} cores)')
  result = {'device': device, 'jax': jax.__version__, 'args': vars(a), 'rows': [],
            'chunks': [], 'optax_sam': []}

  def save():
    if a.out:
      with open(a.out, 'w') as f:
        json.dump(result, f, indent=2)

  for batch in (int(b) for b in a.batch.split(',')):
    for name in (m for m in a.methods.split(',') if m):
      variants = [('', {})]
      if name in ('bgmix', 'dgmix'):
        variants = [(f' ({e})', {'sensitivity': {'estimator': e, 'chunk': a.chunk if e in ('per_example', 'first_order') else 0}})
                    for e in a.estimators.split(',')]
      accums = [int(k) for k in a.accum.split(',')]
      for (suffix, overrides), k in ((v, k) for v in variants for k in accums):
        suffix += f' K={k}' if accums != [1] else ''
        r = bench(name, a.model, module, input_shape, 10, batch, a.steps, a.devices, overrides, k)
        result['rows'].append({'method': name + suffix, 'batch': batch, 'accum': k, **r})
        print(f"batch {batch} {name + suffix:24s} {r['median_ms']:8.1f} ms  "
              f"temp {r.get('temp_mib', float('nan')):8.1f} MiB  compile {r['compile_s']:.0f} s", flush=True)
        save()
    for chunk in (int(c) for c in a.chunks.split(',') if c):
      r = bench('bgmix', a.model, module, input_shape, 10, batch, a.steps, a.devices,
                {'sensitivity': {'estimator': 'per_example', 'chunk': chunk}})
      result['chunks'].append({'batch': batch, 'chunk': chunk, **r})
      print(f"batch {batch} bgmix per_example chunk {chunk:4d} {r['median_ms']:8.1f} ms  "
            f"temp {r.get('temp_mib', float('nan')):8.1f} MiB", flush=True)
      save()
    if a.optax_sam:
      for r in bench_optax_sam(module, input_shape, 10, batch, a.steps):
        result['optax_sam'].append({'batch': batch, **r})
        print(f"batch {batch} {r['variant']:28s} {r['median_ms']:8.1f} ms", flush=True)
        save()

  print(f'\n{a.model} width {a.width}, chunk {a.chunk}, {device}, jax {jax.__version__}, '
        f'median of {a.steps} steps\n')
  ratio = lambda v, ref: f'{v / ref:.2f}' if ref else 'n/a'
  print('| batch | method | ms/step (median) | p90 | × ERM | × SAM | temp MiB |\n'
        '| --- | --- | --- | --- | --- | --- | --- |')
  for r in result['rows']:
    ref = {x['method']: x['median_ms'] for x in result['rows'] if x['batch'] == r['batch']}
    print(f"| {r['batch']} | {r['method']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | "
          f"{ratio(r['median_ms'], ref.get('erm'))} | {ratio(r['median_ms'], ref.get('sam'))} | "
          f"{r.get('temp_mib', float('nan')):.0f} |")
  if result['chunks']:
    print('\n| batch | per_example chunk | ms/step | temp MiB |\n| --- | --- | --- | --- |')
    for r in result['chunks']:
      print(f"| {r['batch']} | {r['chunk']} | {r['median_ms']:.1f} | {r.get('temp_mib', float('nan')):.0f} |")
  if result['optax_sam']:
    print('\n| batch | SAM step | ms/step | p90 |\n| --- | --- | --- | --- |')
    for r in result['optax_sam']:
      print(f"| {r['batch']} | {r['variant']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} |")
  save()


if __name__ == '__main__':
  main()
