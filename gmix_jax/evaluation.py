"""Whole-split passes outside the train step: test-set evaluation and the
``stale`` estimator's score refresh."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gmix_jax import losses


def evaluate(predict, params, model_state, x, y, batch_size: int) -> dict:
  """Accuracy, mean loss and ECE over a split (padded to whole batches)."""
  n = x.shape[0]
  logits = []
  for start in range(0, n, batch_size):
    xb = x[start:start + batch_size]
    pad = batch_size - xb.shape[0]
    if pad:                       # one compiled shape for every batch
      xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)])
    logits.append(np.asarray(predict(params, model_state, xb))[:batch_size - pad])
  logits = jnp.asarray(np.concatenate(logits))
  labels = jnp.asarray(y)
  ce = losses.soft_cross_entropy(logits, jax.nn.one_hot(labels, logits.shape[-1]))
  return {'accuracy': float(losses.accuracy(logits, labels)), 'loss': float(jnp.mean(ce)),
          'ece': float(losses.expected_calibration_error(logits, labels))}


def refresh_scores(score_fn, params, model_state, x, y, batch_size: int) -> np.ndarray:
  """Fresh s_i for every training example (the ``stale`` estimator's table)."""
  out = []
  for start in range(0, x.shape[0] - batch_size + 1, batch_size):
    out.append(np.asarray(score_fn(params, model_state, x[start:start + batch_size],
                                   y[start:start + batch_size])))
  rest = x.shape[0] % batch_size
  if rest:
    out.append(np.asarray(score_fn(params, model_state, x[-rest:], y[-rest:])))
  return np.concatenate(out)
