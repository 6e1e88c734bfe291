"""Whole-split passes outside the train step, streamed: test-set evaluation and
the ``stale`` estimator's score refresh.

Both read `gmix_jax.data.pipeline.ordered_batches`: every record exactly once,
in padded batches with a ``mask``, each process its own rows. Evaluation
reduces per-batch *sums* (examples, correct, cross-entropy, and per ECE bin the
count, correct and confidence), masked and summed over devices and processes
inside the compiled function, so the metrics are exact whatever the batch size,
padding or process count:

  accuracy = Σ correct / N,   loss = Σ CE / N,
  ECE      = Σ_bins |Σ_b correct − Σ_b conf| / N       (Guo et al. 2017, 15 bins)

as `losses.accuracy`, `losses.soft_cross_entropy` and
`losses.expected_calibration_error` over the whole split. The refresh returns
each example's fresh s_i; every process gets the whole table.
"""
from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gmix_jax import losses

NUM_BINS = 15
_SUM_KEYS = ('count', 'correct', 'loss', 'bin_count', 'bin_correct', 'bin_conf')


def batch_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
  """Masked sums of one batch (module docstring), float32."""
  w = mask.astype(jnp.float32)
  logits = logits.astype(jnp.float32)
  ce = losses.soft_cross_entropy(logits, jax.nn.one_hot(labels, logits.shape[-1]))
  probs = jax.nn.softmax(logits, axis=-1)
  conf = jnp.max(probs, axis=-1)
  correct = (jnp.argmax(probs, axis=-1) == labels).astype(jnp.float32) * w
  # Same binning as losses.expected_calibration_error: equal-width bins on (0, 1].
  bins = jnp.clip(jnp.ceil(conf * NUM_BINS).astype(jnp.int32) - 1, 0, NUM_BINS - 1)
  zeros = jnp.zeros(NUM_BINS, jnp.float32)
  return {'count': jnp.sum(w), 'correct': jnp.sum(correct), 'loss': jnp.sum(ce * w),
          'bin_count': zeros.at[bins].add(w), 'bin_correct': zeros.at[bins].add(correct),
          'bin_conf': zeros.at[bins].add(conf * w)}


def finalize(sums: dict[str, np.ndarray]) -> dict[str, float]:
  """Accuracy, mean loss and ECE from accumulated sums."""
  n = max(float(sums['count']), 1.0)
  ece = float(np.sum(np.abs(sums['bin_correct'] - sums['bin_conf']))) / n
  return {'accuracy': float(sums['correct']) / n, 'loss': float(sums['loss']) / n, 'ece': ece,
          'num_examples': int(sums['count'])}


def _host(tree):
  """A replicated (possibly multi-process) result as numpy, from this process's copy."""
  return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)


def make_eval_fn(predict: Callable, normalize: Callable, mesh=None, axis_name: str = 'batch'):
  """``(params, model_state, x, y, mask) -> sums`` (numpy), compiled.

  With ``mesh``: the batch is split over its devices (``shard_map``), params
  replicated, and the sums are ``psum``-ed, so they cover every process.
  Without: one device, this process's batch only (the pmap trainer).
  """
  def local(params, model_state, x, y, mask):
    return batch_sums(predict(params, model_state, normalize(x)), y, mask)

  if mesh is None:
    fn = jax.jit(local)
    return lambda *a: jax.device_get(fn(*a))

  def per_device(params, model_state, x, y, mask):
    return jax.lax.psum(local(params, model_state, x, y, mask), axis_name)

  batch = P(axis_name)
  fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), batch, batch, batch),
                             out_specs=P()))
  return lambda *a: _host(fn(*a))


def make_score_fn(score: Callable, normalize: Callable, mesh=None, axis_name: str = 'batch'):
  """``(params, model_state, x, y) -> s [global batch]`` (numpy, every process
  gets all rows), each device scoring its own rows."""
  local = lambda p, ms, x, y: score(p, ms, normalize(x), y)
  if mesh is None:
    fn = jax.jit(local)
    return lambda *a: np.asarray(jax.device_get(fn(*a)))
  sm = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(axis_name), P(axis_name)),
                     out_specs=P(axis_name))
  fn = jax.jit(sm, out_shardings=NamedSharding(mesh, P()))   # gathered to every device
  return lambda *a: np.asarray(fn(*a).addressable_data(0))


def evaluate(eval_fn, params, model_state, batches: Iterable[dict],
             to_device: Callable) -> dict[str, float]:
  """Streams ``batches`` (ordered, padded, masked) through ``eval_fn``."""
  total = None
  for b in batches:
    d = to_device({'x': b['x'], 'y': b['y'], 'mask': b['mask']})
    sums = eval_fn(params, model_state, d['x'], d['y'], d['mask'])
    total = sums if total is None else jax.tree.map(np.add, total, sums)
  return finalize(total)


def refresh_scores(score_fn, params, model_state, batches: Iterable[dict], to_device: Callable,
                   num_examples: int, global_batch: int) -> np.ndarray:
  """Fresh s_i of every training example (the ``stale`` estimator's table).

  ``batches`` cover positions ``[k*G, (k+1)*G)`` in order (the global batch
  ``G`` assembled from the processes' rows); padding rows are dropped.
  """
  table = np.zeros(num_examples, np.float32)
  for k, b in enumerate(batches):
    d = to_device({'x': b['x'], 'y': b['y']})
    s = score_fn(params, model_state, d['x'], d['y'])
    pos = k * global_batch + np.arange(global_batch)
    keep = pos < num_examples
    table[pos[keep]] = s[keep]
  return table
