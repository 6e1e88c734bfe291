"""Per-example gradient norms ‖∇_w ℓ_i‖ in one backward pass (docs/methods.md § 3.1).

The ghost-norm / Book-Keeping identity (Goodfellow 2015; Li et al. 2022,
"Large Language Models Can Be Strong Differentially Private Learners";
Bu et al. 2022, "Scalable and Efficient Training of Large Convolutional
Neural Networks with Differential Privacy" and "Differentially Private
Optimization on Large Model at Small Cost"): a layer y = a W (+ b) applied
to example i's tokens a_i ``[T, D]`` has the per-example weight gradient
a_iᵀ δ_i with δ_i = ∂ℓ_i/∂y_i ``[T, C]``, whose squared norm is

  ‖a_iᵀ δ_i‖²_F   (direct, T·D·C)  =  Σ_{t,s} (a_i a_iᵀ)_{ts} (δ_i δ_iᵀ)_{ts}   (ghost, T²(D+C))

and for T = 1 simply ‖a_i‖²‖δ_i‖². Each layer takes the cheaper form. So
only the layer inputs (recorded in the forward pass) and the output
gradients δ (one backward pass of Σ_i ℓ_i with respect to a zero tensor added
to every layer's output) are needed; no per-example weight gradient is ever
formed. Layers are found with ``flax.linen.intercept_methods``, so a user's
Flax linen model needs no change. Rules (``_RULES``):

  * Dense / DenseGeneral: a = the input (non-example axes but the contracted
    ones are tokens); bias: ‖Σ_t δ_it‖².
  * Conv (any stride, padding, dilation, feature groups): a = the unfolded
    input (``lax.conv_general_dilated_patches``), one term per group.
  * BatchNorm (running statistics), LayerNorm, GroupNorm, RMSNorm,
    InstanceNorm: ∇scale_i = Σ_p x̂_ip ⊙ δ_ip, ∇bias_i = Σ_p δ_ip, with x̂ the
    layer's own normalised input (the layer applied without scale and bias;
    for BatchNorm r (Σ_p x_ip δ_ip − μ Σ_p δ_ip), r = 1/√(var + ε), from the
    running mean μ and variance, without forming x̂).
  * Embed: ‖Σ_t e_{id_t} δ_tᵀ‖² = Σ_{t,s} [id_t = id_s] δ_t·δ_s.

A module called several times (shared weights) has its tokens concatenated
over the calls, which keeps the identity exact. Parameters of any other
module fall back to vmapped per-example gradients of those parameters only
(a warning names them once). A BatchNorm that uses batch statistics couples
the examples, so the whole computation then falls back to vmapped gradients
of single examples (the definition of ``sensitivity.first_order``).
Norms are accumulated in float32 (or float64 under x64), docs/methods.md § 7.
"""
from __future__ import annotations

from collections.abc import Mapping
import itertools
import math
import warnings
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
from flax.linen import linear as flax_linear
import jax
import jax.numpy as jnp

PyTree = Any
_HIGH = jax.lax.Precision.HIGHEST
_WARNED: set = set()


def _warn_once(key, message: str):
  if key not in _WARNED:
    _WARNED.add(key)
    warnings.warn(message, stacklevel=4)


def _f32(a):
  return a.astype(jnp.promote_types(a.dtype, jnp.float32))


# ---------------------------------------------------------------- terms
class Outer(NamedTuple):
  """A weight gradient Σ_t a_t δ_tᵀ per group: a ``[B,T,G,D]``, d ``[B,T,G,C]``."""
  a: jax.Array
  d: jax.Array


class Grad(NamedTuple):
  """A per-example gradient itself, ``[B, ...]`` (scales and biases)."""
  g: jax.Array


class Lookup(NamedTuple):
  """An embedding gradient Σ_t e_{ids_t} δ_tᵀ: ids ``[B,T]``, d ``[B,T,E]``."""
  ids: jax.Array
  d: jax.Array
  vocab: int


def _outer_sq(a, d):
  """Σ_g ‖a_gᵀ d_g‖²_F per example, by the cheaper of the direct and ghost forms."""
  a, d = _f32(a), _f32(d)
  b, t, g, dim = a.shape
  c = d.shape[3]
  if t == 1:
    return jnp.sum(jnp.sum(a[:, 0] ** 2, -1) * jnp.sum(d[:, 0] ** 2, -1), -1)
  # groups join the example axis: 3-d einsums are plain batched matmuls (4-d
  # ones with a group axis ran ~10x slower on XLA:CPU)
  a = jnp.moveaxis(a, 2, 1).reshape(b * g, t, dim)
  d = jnp.moveaxis(d, 2, 1).reshape(b * g, t, c)
  if t * (dim + c) < dim * c:                     # ghost: T²(D + C) < T·D·C
    ga = jnp.einsum('btd,bsd->bts', a, a, precision=_HIGH)
    sq = jnp.sum(ga * jnp.einsum('btc,bsc->bts', d, d, precision=_HIGH), (1, 2))
  else:                                           # direct per-example product
    sq = jnp.sum(jnp.einsum('btd,btc->bdc', a, d, precision=_HIGH) ** 2, (1, 2))
  return jnp.sum(sq.reshape(b, g), 1)


def _lookup_sq(ids, d, vocab):
  d = _f32(d)
  t = ids.shape[1]
  if t < vocab:                                   # ghost: T²E < T·V·E
    same = ids[:, :, None] == ids[:, None, :]
    gd = jnp.einsum('btc,bsc->bts', d, d, precision=_HIGH)
    return jnp.sum(jnp.where(same, gd, 0), (1, 2))
  g = jnp.einsum('btv,btc->bvc', jax.nn.one_hot(ids, vocab, dtype=d.dtype), d, precision=_HIGH)
  return jnp.sum(g ** 2, (1, 2))


def _term_sq(term):
  if isinstance(term, Outer):
    return _outer_sq(term.a, term.d)
  if isinstance(term, Lookup):
    return _lookup_sq(term.ids, term.d, term.vocab)
  g = _f32(term.g)
  return jnp.sum(g.reshape(g.shape[0], -1) ** 2, -1)


def _merge(terms):
  """One term from a module's calls: tokens concatenated, gradients summed."""
  first = terms[0]
  if len(terms) == 1:
    return first
  if isinstance(first, Outer):
    return Outer(*(jnp.concatenate(z, 1) for z in zip(*[(u.a, u.d) for u in terms])))
  if isinstance(first, Lookup):
    return Lookup(jnp.concatenate([u.ids for u in terms], 1),
                  jnp.concatenate([u.d for u in terms], 1), first.vocab)
  return Grad(sum(_f32(u.g) for u in terms))


# ---------------------------------------------------------------- rules
def _first_arg(args, kwargs):
  return args[0] if args else next(iter(kwargs.values()))


def _axes(axes, ndim):
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  return tuple(a % ndim for a in axes)


def _tokens(v, keep: tuple):
  """v ``[B, ...]`` -> ``[B, T, 1, F]``: the ``keep`` axes flattened last, the rest tokens."""
  rest = [i for i in range(1, v.ndim) if i not in keep]
  v = jnp.transpose(v, [0] + rest + list(keep))
  return v.reshape(v.shape[0], -1, 1, math.prod(v.shape[v.ndim - len(keep):]))


class _Dense:
  owned = ('kernel', 'bias')

  def check(self, m, args, kwargs):
    if getattr(m, 'dot_general', None) is not None or getattr(m, 'dot_general_cls', None) is not None:
      return 'custom dot_general'
    if isinstance(m, nn.DenseGeneral):
      axes = _axes(m.axis, _first_arg(args, kwargs).ndim)
      if tuple(m.batch_dims) or 0 in axes:
        return 'batch_dims or a contracted example axis'
    return None

  def record(self, m, args, kwargs):
    return _first_arg(args, kwargs)

  def terms(self, m, a, d):
    axes = _axes(m.axis, a.ndim) if isinstance(m, nn.DenseGeneral) else (a.ndim - 1,)
    nf = d.ndim - (a.ndim - len(axes))            # output feature axes come last
    out = {'kernel': Outer(_tokens(a, axes), _tokens(d, tuple(range(d.ndim - nf, d.ndim))))}
    if m.use_bias:
      out['bias'] = Grad(jnp.sum(_f32(out['kernel'].d), 1))
    return out


def _unfold(a, ks, strides, pad, lhs_dil, rhs_dil):
  """[B, *S, C] -> [B, T, K, C]: the input window of each of the T output
  positions (K = window size), by padding (interior padding = input dilation)
  and strided slices, as the convolution sees it."""
  spatial = a.shape[1:-1]
  if isinstance(pad, str):
    dilated = [(n - 1) * d + 1 for n, d in zip(spatial, lhs_dil)]
    window = [(k - 1) * r + 1 for k, r in zip(ks, rhs_dil)]
    pad = jax.lax.padtype_to_pads(dilated, window, strides, pad)
  zero = jnp.zeros((), a.dtype)
  a = jax.lax.pad(a, zero, [(0, 0, 0)] + [(lo, hi, d - 1) for (lo, hi), d in zip(pad, lhs_dil)]
                  + [(0, 0, 0)])
  outs = [(n - (k - 1) * r - 1) // s + 1 for n, k, r, s in zip(a.shape[1:-1], ks, rhs_dil, strides)]
  cols = []
  for offset in itertools.product(*[range(k) for k in ks]):
    start = [o * r for o, r in zip(offset, rhs_dil)]
    stop = [st + (n - 1) * s + 1 for st, n, s in zip(start, outs, strides)]
    cols.append(jax.lax.slice(a, [0, *start, 0], [a.shape[0], *stop, a.shape[-1]],
                              [1, *strides, 1]))
  u = jnp.stack(cols, -2)                               # [B, *outs, K, C]
  return u.reshape(a.shape[0], math.prod(outs), len(cols), a.shape[-1])


class _Conv:
  owned = ('kernel', 'bias')

  def check(self, m, args, kwargs):
    ks = (m.kernel_size,) if isinstance(m.kernel_size, int) else tuple(m.kernel_size)
    if m.mask is not None or m.conv_general_dilated is not None or \
        m.conv_general_dilated_cls is not None:
      return 'mask or custom convolution'
    if _first_arg(args, kwargs).ndim != len(ks) + 2:
      return 'not exactly one batch axis'
    return None

  def record(self, m, args, kwargs):
    return _first_arg(args, kwargs)

  def terms(self, m, a, d):
    ks = (m.kernel_size,) if isinstance(m.kernel_size, int) else tuple(m.kernel_size)
    bc = lambda v: (1,) * len(ks) if v is None else ((v,) * len(ks) if isinstance(v, int) else tuple(v))
    kdil = bc(m.kernel_dilation)
    pad = flax_linear.canonicalize_padding(m.padding, len(ks))
    if pad in ('CIRCULAR', 'REFLECT'):            # as flax pads them (linear._Conv)
      dil = [(k - 1) * r + 1 for k, r in zip(ks, kdil)]
      a = jnp.pad(a, [(0, 0)] + [((k - 1) // 2, k // 2) for k in dil] + [(0, 0)],
                  mode={'CIRCULAR': 'wrap', 'REFLECT': 'reflect'}[pad])
      pad = 'VALID'
    elif pad == 'CAUSAL':
      a = jnp.pad(a, [(0, 0), (kdil[0] * (ks[0] - 1), 0), (0, 0)])
      pad = 'VALID'
    b, g = a.shape[0], m.feature_group_count
    u = _unfold(_f32(a), ks, bc(m.strides), pad, bc(m.input_dilation), kdil)   # [B, T, K, C]
    u = u.reshape(u.shape[:3] + (g, -1))                 # group g's input channels
    u = jnp.moveaxis(u, 3, 2).reshape(b, u.shape[1], g, -1)
    dd = d.reshape(b, -1, g, d.shape[-1] // g)
    out = {'kernel': Outer(u, dd)}
    if m.use_bias:
      out['bias'] = Grad(jnp.sum(_f32(d.reshape(b, -1, d.shape[-1])), 1))
    return out


class _Norm:
  owned = ('scale', 'bias')

  def check(self, m, args, kwargs):
    if isinstance(m, nn.BatchNorm):
      use_ra = kwargs.get('use_running_average', args[1] if len(args) > 1 else None)
      use_ra = m.use_running_average if use_ra is None else use_ra
      if not use_ra:
        return 'batch statistics'
    return None

  def record(self, m, args, kwargs):
    x = _first_arg(args, kwargs)
    if isinstance(m, nn.BatchNorm):
      # running statistics are the same for every example: x̂ need not be formed
      stats = m.variables['batch_stats']
      return {'x': x, 'mean': stats['mean'], 'var': stats['var']}
    off = {k: False for k in ('use_scale', 'use_bias') if hasattr(m, k)}
    return {'xhat': m.clone(parent=None, **off).apply({}, *args, **kwargs)}  # flax's own x̂

  def terms(self, m, rec, d):
    feat = -1 if isinstance(m, nn.GroupNorm) else (m.axis if isinstance(m, nn.BatchNorm)
                                                   else m.feature_axes)
    keep = _axes(feat, d.ndim)
    dd = _f32(_tokens(d, keep))[:, :, 0]                # [B, P, F]
    sum_d = jnp.sum(dd, 1)
    out = {}
    if getattr(m, 'use_scale', False):
      if 'xhat' in rec:
        out['scale'] = Grad(jnp.sum(_f32(_tokens(rec['xhat'], keep))[:, :, 0] * dd, 1))
      else:   # Σ_p x̂_p δ_p = r (Σ_p x_p δ_p − μ Σ_p δ_p), r = 1/√(var + ε)
        xd = jnp.sum(_f32(_tokens(rec['x'], keep))[:, :, 0] * dd, 1)
        mean, var = (_f32(rec[k]).reshape(-1) for k in ('mean', 'var'))
        out['scale'] = Grad(jax.lax.rsqrt(var + m.epsilon) * (xd - mean * sum_d))
    if getattr(m, 'use_bias', False):
      out['bias'] = Grad(sum_d)
    return out


class _Embed:
  owned = ('embedding',)

  def check(self, m, args, kwargs):
    return None

  def record(self, m, args, kwargs):
    return _first_arg(args, kwargs)

  def terms(self, m, ids, d):
    b = ids.shape[0]
    return {'embedding': Lookup(ids.reshape(b, -1), d.reshape(b, -1, d.shape[-1]),
                                m.num_embeddings)}


_NORM = _Norm()
_RULES = {nn.Dense: _Dense(), nn.DenseGeneral: _Dense(), nn.Conv: _Conv(), nn.Embed: _Embed(),
          nn.BatchNorm: _NORM, nn.LayerNorm: _NORM, nn.GroupNorm: _NORM, nn.RMSNorm: _NORM,
          nn.InstanceNorm: _NORM}


# ---------------------------------------------------------------- driver
def _key(path: tuple, k: int) -> str:
  return '/'.join(path) + f'#{k}'


class _Plan(NamedTuple):
  calls: dict          # key -> (module path, rule, unbound module, output ShapeDtypeStruct)
  covered: frozenset   # parameter paths (tuples of names) the rules own
  coupled: Optional[str]   # a layer that couples the examples (full fallback)


def _discover(run_model: Callable, params: PyTree, batch: int) -> _Plan:
  """Which layer calls the rules handle, from one abstract forward pass."""
  calls, bad, counts, coupled = {}, {}, {}, []

  def icpt(next_fun, args, kwargs, ctx):
    m, rule = ctx.module, _RULES.get(type(ctx.module))
    if rule is None or m.scope is None:
      return next_fun(*args, **kwargs)
    path = tuple(m.scope.path)
    if ctx.method_name != '__call__':
      if ctx.method_name != 'setup':            # e.g. Embed.attend: a use no rule follows
        bad[path] = f'method {ctx.method_name}'
      return next_fun(*args, **kwargs)
    reason = rule.check(m, args, kwargs)
    y = next_fun(*args, **kwargs)
    first = _first_arg(args, kwargs)
    if reason is None and not (first.shape[:1] == (batch,) and y.shape[:1] == (batch,)):
      reason = 'no leading example axis'
    if reason == 'batch statistics':
      coupled.append('/'.join(path))
    if reason is not None:
      bad[path] = reason
    else:
      k = counts.get(path, 0)
      counts[path] = k + 1
      calls[_key(path, k)] = (path, rule, m.clone(parent=None),
                              jax.ShapeDtypeStruct(y.shape, y.dtype))
    return y

  with nn.intercept_methods(icpt):
    jax.eval_shape(run_model)
  covered = set()
  for path in {c[0] for c in calls.values()} - set(bad):
    node = params
    for name in path:
      node = node.get(name) if isinstance(node, Mapping) else None
    rule = next(c[1] for c in calls.values() if c[0] == path)
    if isinstance(node, Mapping) and set(node) <= set(rule.owned) and all(
        not isinstance(v, Mapping) for v in node.values()):
      covered.update(path + (n,) for n in node)
    else:
      bad[path] = 'parameters the rule does not know'
  calls = {k: c for k, c in calls.items() if c[0] not in bad}
  return _Plan(calls, frozenset(covered), coupled[0] if coupled else None)


def _param_paths(params: PyTree):
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [tuple(getattr(k, 'key', getattr(k, 'name', k)) for k in p) for p, _ in leaves]
  return paths, [v for _, v in leaves], treedef


def _fallback_sq(example_loss, params, leftover: list, x, y):
  """Σ over the ``leftover`` leaves of ‖∇ℓ_i‖², vmapped over single examples."""
  paths, values, treedef = _param_paths(params)
  idx = [paths.index(p) for p in leftover]

  def one(xi, yi):
    def loss(sub):
      vals = list(values)
      for j, i in enumerate(idx):
        vals[i] = sub[j]
      return example_loss(treedef.unflatten(vals), xi, yi)
    g = jax.grad(loss)([values[i] for i in idx])
    return sum(jnp.sum(_f32(v) ** 2) for v in g)
  return jax.vmap(one)(x, y)


def squared_norms(apply_fn: Callable, params: PyTree, model_state: PyTree, x: jax.Array,
                  y: jax.Array, loss_fn: Callable) -> jax.Array:
  """‖∇_w ℓ_i(w)‖² for every example, ``[B]`` (float32, or float64 under x64).

  ``ℓ_i = loss_fn(logits, y)[i]`` with ``logits = apply_fn(params, model_state,
  x, False)[0]`` (``models.make_apply_fn``'s signature). Exact when example
  i's layer inputs depend on example i only (true for train=False models:
  BatchNorm then uses its running statistics).
  """
  b = x.shape[0]

  def example_loss(p, xi, yi):
    logits, _ = apply_fn(p, model_state, xi[None], False)
    return loss_fn(logits, yi[None])[0]

  run = lambda: apply_fn(params, model_state, x, False)[0]
  plan = _discover(run, params, b)
  paths, _, _ = _param_paths(params)
  if plan.coupled is not None:
    _warn_once(('coupled', plan.coupled),
               f'ghost norm: {plan.coupled} normalises with batch statistics, which couple the '
               'examples; per-example gradients of single examples are vmapped instead')
    return _fallback_sq(example_loss, params, paths, x, y)
  leftover = [p for p in paths if p not in plan.covered]
  if not plan.calls:
    _warn_once(('none',), 'ghost norm: the model has no Flax linen layer with a rule; '
               'its per-example gradients are vmapped')
    return _fallback_sq(example_loss, params, paths, x, y)
  for layer in sorted({'/'.join(map(str, p[:-1])) or '(top)' for p in leftover}):
    _warn_once(('layer', layer), f'ghost norm: no rule for the parameters of {layer}; '
               'their per-example gradients are vmapped')
  sq = _ghost_sq(apply_fn, params, model_state, x, y, loss_fn, plan)
  if leftover:
    sq = sq + _fallback_sq(example_loss, params, leftover, x, y)
  return sq


def _ghost_sq(apply_fn, params, model_state, x, y, loss_fn, plan: _Plan):
  """Σ over the planned layers of ‖∇ℓ_i‖², from one forward and one backward pass."""
  zeros = {k: jnp.zeros(c[3].shape, c[3].dtype) for k, c in plan.calls.items()}

  def total(ghosts):
    records, counts, busy = {}, {}, []

    def icpt(next_fun, args, kwargs, ctx):
      m = ctx.module
      if busy or type(m) not in _RULES or m.scope is None or ctx.method_name != '__call__':
        return next_fun(*args, **kwargs)
      path = tuple(m.scope.path)
      k = counts.get(path, 0)
      counts[path] = k + 1
      key = _key(path, k)
      if key not in plan.calls:
        return next_fun(*args, **kwargs)
      busy.append(1)                          # the rule's own layer calls pass through
      records[key] = _RULES[type(m)].record(m, args, kwargs)
      busy.pop()
      return next_fun(*args, **kwargs) + ghosts[key]

    with nn.intercept_methods(icpt):
      logits, _ = apply_fn(params, model_state, x, False)
    return jnp.sum(loss_fn(logits, y)), records

  deltas, records = jax.grad(total, has_aux=True)(zeros)
  by_param = {}
  for key, (path, rule, module, _) in plan.calls.items():
    for name, term in rule.terms(module, records[key], deltas[key]).items():
      by_param.setdefault(path + (name,), []).append(term)
  return sum(_term_sq(_merge(terms)) for terms in by_param.values())
