"""How much of SAM's perturbation survives bfloat16 compute, for ResNet-50 and ViT-B/16.

  python experiments/bench_precision.py          # both models; ~40 min on a loaded 2-core CPU
  python experiments/bench_precision.py --models resnet50 --train-steps 0 --px 64   # quick look

For each model and parameter state (at initialisation, and after
``--train-steps`` float32 SGD steps on generated data at ``--train-px``
pixels; ResNet-50 is measured at ``--px``, ViT at ``--train-px`` because its
position embedding fixes the token count), with ρ = ``--rho`` and ε = ρ g/‖g‖ from the float32 gradient g of
one batch of ``--batch`` generated images (class labels 0..9 from a fixed
random teacher, so training has something to learn):

- the cast survival of ε (gmix_jax.precision.cast_survival): the ratio
  ‖cast(w+ε) − cast(w)‖/‖ε‖, the share along ε ⟨Δ, ε⟩/‖ε‖², the fraction of
  elements that move, and per layer (leaf) the min / median of the ratio and
  of the share; the leaf with the smallest share is named;
- the SAM update direction ∇L(w+ε) computed with bfloat16 compute vs float32
  compute, same batch, each with its own ε (as a bfloat16 SAM step would form
  it): the cosine of the directions and of the SAM corrections
  ∇L(w+ε) − ∇L(w), with the ERM gradients' cosine as the bfloat16 noise
  floor; for round-to-nearest casts and for ``dither`` rounding.

BatchNorm runs in train mode (batch statistics), as in SAM's passes.
XLA:CPU is told not to keep excess precision (``--xla_allow_excess_precision
=false``) so that every bfloat16 cast really rounds, as it does on a GPU.
Writes JSON (``--out``) and prints a markdown table.
"""
from __future__ import annotations

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_allow_excess_precision=false').strip()

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from gmix_jax import models, precision  # noqa: E402


def generated(seed, n, px, classes=10):
  """Gaussian images; label = argmax of a fixed random linear map of the 8x8-pooled image."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, px, px, 3)).astype(np.float32)
  pooled = x.reshape(n, 8, px // 8, 8, px // 8, 3).mean(axis=(2, 4)).reshape(n, -1)
  teacher = np.random.default_rng(1234).normal(size=(pooled.shape[1], classes))
  return x, (pooled @ teacher).argmax(-1)


def loss_fn(apply_fn, num_classes):
  def loss(params, state, x, y):
    logits, new_state = apply_fn(params, state, x, True)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], 1)), new_state
  return loss


def flat(tree):
  return jnp.concatenate([jnp.ravel(v).astype(jnp.float32) for v in jax.tree.leaves(tree)])


def cos(a, b):
  return float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b) + 1e-30))


def train(module, params, state, px, steps, batch, lr, log):
  """`steps` float32 SGD (momentum 0.9) steps on generated data at `px` pixels."""
  opt = optax.sgd(lr, momentum=0.9)
  loss = loss_fn(models.make_apply_fn(module), 1000)

  @jax.jit
  def step(params, state, opt_state, x, y):
    (value, state), g = jax.value_and_grad(loss, has_aux=True)(params, state, x, y)
    updates, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, updates), state, opt_state, value

  opt_state, first, t = opt.init(params), None, time.perf_counter()
  for s in range(steps):
    x, y = generated(s, batch, px)
    params, state, opt_state, value = step(params, state, opt_state, x, y)
    first = float(value) if first is None else first
    if s % 50 == 0 or s == steps - 1:
      log(f'  train step {s}: loss {float(value):.3f} ({time.perf_counter() - t:.0f} s)')
  return params, state, {'steps': steps, 'px': px, 'batch': batch, 'lr': lr,
                         'loss_first': first, 'loss_last': float(value)}


class Measure:
  """The three gradient programs of one model at one input size, compiled once
  and reused for every parameter state."""

  def __init__(self, name, kwargs):
    bf16 = models.get_model(name, 1000, dtype='bfloat16', **kwargs)
    fns = {'float32': models.make_apply_fn(models.get_model(name, 1000, **kwargs)),
           'nearest': models.make_apply_fn(bf16),
           'dither': precision.make_apply_fn(models.make_apply_fn(bf16), 'dither', jnp.bfloat16)}
    self.grads = {k: jax.jit(jax.grad(lambda p, s, x, y, fn=fn: loss_fn(fn, 1000)(p, s, x, y)[0]))
                  for k, fn in fns.items()}
    self.survival = {
        key: jax.jit(lambda p, e, cast=cast: precision.cast_survival(p, e, jnp.bfloat16, cast))
        for key, cast in (('nearest', None),
                          ('dither', lambda v: precision.dither_params({'v': v})['v']))}

  def __call__(self, params, state, px, batch, rho, log):
    x, y = generated(10_000, batch, px)
    grads = {}
    for key, grad in self.grads.items():
      t = time.perf_counter()
      g = grad(params, state, x, y)
      eps = jax.tree.map(lambda v, n=jnp.linalg.norm(flat(g)): rho * v / (n + 1e-12), g)
      g_sam = grad(jax.tree.map(jnp.add, params, eps), state, x, y)
      grads[key] = (flat(g), flat(g_sam), eps)
      log(f'  {key}: two gradients in {time.perf_counter() - t:.0f} s')
    g32, s32, eps32 = grads['float32']
    out = {'px': px, 'batch': batch, 'rho': rho}
    names = ['/'.join(str(getattr(k, 'key', k)) for k in path)
             for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for key, survival in self.survival.items():
      surv = survival(params, eps32)
      has = np.asarray(surv['leaf_has_eps'])
      ratio, share = np.asarray(surv['leaf_ratio'])[has], np.asarray(surv['leaf_aligned'])[has]
      g, s, _ = grads[key]
      out[key] = {
          'ratio': float(surv['ratio']), 'aligned': float(surv['aligned']),
          'cosine_delta_eps': float(surv['cosine']), 'moved': float(surv['moved']),
          'leaf_ratio_min': float(ratio.min()), 'leaf_ratio_median': float(np.median(ratio)),
          'leaf_aligned_min': float(share.min()), 'leaf_aligned_median': float(np.median(share)),
          'leaf_aligned_min_name': [n for n, h in zip(names, has) if h][int(share.argmin())],
          'leaves_lost': int(np.sum(ratio == 0)), 'leaves': int(has.sum()),
          'cos_sam_direction': cos(s, s32), 'cos_erm_gradient': cos(g, g32),
          'cos_sam_correction': cos(s - g, s32 - g32),
          'correction_norm_ratio': float(jnp.linalg.norm(s - g) / jnp.linalg.norm(s32 - g32)),
      }
    out['f32_correction_rel'] = float(jnp.linalg.norm(s32 - g32) / jnp.linalg.norm(g32))
    return out


def table(results) -> str:
  rows = ['| model | state | px | rounding | ‖Δ‖/‖ε‖ | ⟨Δ,ε⟩/‖ε‖² | per-layer share min / median '
          '(worst layer) | moved | cos SAM dir. | cos SAM corr. | cos ERM grad |',
          '|---|---|---|---|---|---|---|---|---|---|---|']
  for r in results:
    for key in ('nearest', 'dither'):
      m = r[key]
      rows.append(
          f"| {r['model']} | {r['state']} | {r['px']} | {key} | {m['ratio']:.2f} | "
          f"{m['aligned']:.3f} | {m['leaf_aligned_min']:.2f} / {m['leaf_aligned_median']:.2f} "
          f"(`{m['leaf_aligned_min_name']}`) | {m['moved']:.4f} | {m['cos_sam_direction']:.4f} | "
          f"{m['cos_sam_correction']:.3f} | {m['cos_erm_gradient']:.4f} |")
  return '\n'.join(rows)


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--models', default='resnet50,vit_b16')
  p.add_argument('--rho', type=float, default=0.05)
  p.add_argument('--batch', type=int, default=4)
  p.add_argument('--px', type=int, default=224)
  p.add_argument('--train-steps', type=int, default=30)
  p.add_argument('--train-px', type=int, default=64)
  p.add_argument('--train-batch', type=int, default=8)
  p.add_argument('--resnet-lr', type=float, default=0.05)
  p.add_argument('--vit-lr', type=float, default=0.01)
  p.add_argument('--out', default='experiments/precision.json')
  args = p.parse_args()
  log = lambda s: print(s, flush=True)
  results, meta = [], {'backend': jax.default_backend(), 'device': str(jax.devices()[0]),
                       'machine': platform.processor() or platform.machine(),
                       'cpus': os.cpu_count(), 'jax': jax.__version__,
                       'xla_flags': os.environ['XLA_FLAGS']}

  def record(r):
    results.append(r)
    with open(args.out, 'w') as f:
      json.dump({'meta': meta, 'args': vars(args), 'results': results}, f, indent=1)
    log(table(results[-1:]))

  for name in args.models.split(','):
    # ResNet-50 as configs/imagenet.py builds it (each block's last BN scale at 0).
    kwargs = {'zero_init_residual': True} if name == 'resnet50' else {}
    module = models.get_model(name, 1000, **kwargs)
    vit = name.startswith('vit')
    # ViT's position embedding is tied to the token count: ViT is measured at train_px.
    px = args.train_px if vit else args.px
    params, state = models.init_model(module, jax.random.PRNGKey(0), (px, px, 3))
    measure = Measure(name, kwargs)
    log(f'{name}: init')
    record({'model': name, 'state': 'init', **measure(params, state, px, args.batch,
                                                      args.rho, log)})
    if args.train_steps:
      lr = args.vit_lr if vit else args.resnet_lr
      params, state, info = train(module, params, state, args.train_px, args.train_steps,
                                  args.train_batch, lr, log)
      log(f'{name}: trained')
      record({'model': name, 'state': f"trained ({info['steps']} SGD steps at {info['px']} px)",
              'train': info, **measure(params, state, px, args.batch, args.rho, log)})
  print(table(results))


if __name__ == '__main__':
  main()
