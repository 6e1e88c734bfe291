"""ImageNet-sized train-step throughput per method and compute dtype (for a GPU).

  python experiments/bench_gpu.py                     # ~8 min on one recent GPU
  python experiments/bench_gpu.py --smoke             # tiny models, 32 px: checks the script on CPU

Rows: ResNet-50 at 224 px, global batch ``--batch`` (256), in bfloat16 for every
method of ``--methods`` and in float32 for ``--f32-methods`` (ERM and SAM: the
bfloat16 / float32 ratio); ViT-B/16 at 224 px in bfloat16 for every method.
Methods: erm, mixup, sam, gmix, and BG-Mix with the ``stale`` and ``shared``
sensitivity estimators. Each row is the library's own step
(experiments/bench_step.py's ``bench``: ``parallel.make_per_device_step``
under ``jit(shard_map)``, SGD with momentum, median of ``--steps`` calls after
two warm-up calls), reported as images/s = batch / median step time, with
XLA's temp memory of the compiled step (``Compiled.memory_analysis``).

Rows are written to ``--out`` (JSON) as they finish, with a markdown table
(``--out`` with .md); a row that would start after ``--budget-s`` seconds is
skipped, so the script ends inside a fixed device lease with what it has.

Targets (issue 11): G-Mix ≤ 1.03x SAM's step time, SAM ≤ 2.05x ERM's,
bfloat16 ≥ 1.8x float32 images/s for ResNet-50 ERM. Published reference for
the last (different framework and pipeline, for scale only): NVIDIA
DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5/README.md,
1x A100 80GB, pytorch-21.03 container, training: 938 img/s TF32, 2470 img/s
mixed precision (2.63x).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import bench  # noqa: E402  (the library's step, timed)

from gmix_jax import models  # noqa: E402

METHODS = {  # row name -> (preset, overrides)
    'erm': ('erm', {}),
    'mixup': ('mixup', {}),
    'sam': ('sam', {}),
    'gmix': ('gmix', {}),
    'bgmix_stale': ('bgmix', {'sensitivity': {'estimator': 'stale'}}),
    'bgmix_shared': ('bgmix', {'sensitivity': {'estimator': 'shared'}}),
}
TINY = {'resnet50': dict(stage_sizes=(1, 1), width=8),
        'vit_b16': dict(patch=8, width=32, depth=2, mlp_dim=64, num_heads=2)}


def plan(args):
  """(model, dtype, method) rows in the order they run."""
  rows = [('resnet50', 'bfloat16', m) for m in args.methods.split(',')]
  rows += [('resnet50', 'float32', m) for m in args.f32_methods.split(',') if m]
  rows += [('vit_b16', 'bfloat16', m) for m in args.methods.split(',')]
  return [r for r in rows if r[0] in args.models.split(',')]


def table(result) -> str:
  lines = [f"{result['device']}, jax {result['jax']}, batch {result['args']['batch']}, "
           f"{result['args']['px']} px, median of {result['args']['steps']} steps",
           '', '| model | dtype | method | images/s | ms/step | x ERM | x SAM | temp MiB |',
           '| --- | --- | --- | --- | --- | --- | --- | --- |']
  for r in result['rows']:
    ref = {x['method']: x['median_ms'] for x in result['rows']
           if (x['model'], x['dtype']) == (r['model'], r['dtype'])}
    ratio = lambda k: f"{r['median_ms'] / ref[k]:.2f}" if k in ref else 'n/a'
    lines.append(f"| {r['model']} | {r['dtype']} | {r['method']} | {r['images_per_s']:.0f} | "
                 f"{r['median_ms']:.1f} | {ratio('erm')} | {ratio('sam')} | "
                 f"{r.get('temp_mib', float('nan')):.0f} |")
  return '\n'.join(lines)


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--models', default='resnet50,vit_b16')
  p.add_argument('--methods', default=','.join(METHODS))
  p.add_argument('--f32-methods', default='erm,sam')
  p.add_argument('--batch', type=int, default=256)
  p.add_argument('--px', type=int, default=224)
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--budget-s', type=float, default=420.0)
  p.add_argument('--smoke', action='store_true',
                 help='tiny models, 32 px, batch 16, 2 steps, no budget')
  p.add_argument('--out', default='experiments/bench_gpu.json')
  args = p.parse_args()
  if args.smoke:   # every row, whatever the CPU time
    args.batch, args.px, args.steps, args.budget_s = 16, 32, 2, float('inf')
  device = f'{jax.devices()[0].device_kind} ({jax.default_backend()}, {os.cpu_count()} host cores)'
  result = {'device': device, 'jax': jax.__version__, 'args': vars(args), 'rows': []}
  start = time.perf_counter()
  for model, dtype, name in plan(args):
    if time.perf_counter() - start > args.budget_s:
      print(f'budget: skipping {model} {dtype} {name}', flush=True)
      continue
    kwargs = TINY[model] if args.smoke else {}
    module = models.get_model(model, 1000, dtype=dtype, **kwargs)
    preset, overrides = METHODS[name]
    r = bench(preset, model, module, (args.px, args.px, 3), 1000, args.batch, args.steps, 1,
              overrides)
    r = {'model': model, 'dtype': dtype, 'method': name,
         'images_per_s': args.batch / (r['median_ms'] / 1e3), **r}
    result['rows'].append(r)
    print(f"{model} {dtype} {name:13s} {r['images_per_s']:8.0f} img/s  {r['median_ms']:8.1f} ms  "
          f"temp {r.get('temp_mib', float('nan')):7.0f} MiB  compile {r['compile_s']:.0f} s",
          flush=True)
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=2)
    with open(os.path.splitext(args.out)[0] + '.md', 'w') as f:
      f.write(table(result) + '\n')
  print('\n' + table(result))


if __name__ == '__main__':
  main()
