"""Weighted kNN classifier on frozen features (docs/methods.md § 9).

Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination", § 3.4, the monitor of InstDisc and MoCo: with L2-normalised
features, a test point's k nearest training points by cosine similarity s_j
vote for their class with weight exp(s_j / τ); the prediction is the class
with the largest total,

  ŷ = argmax_c Σ_{j ∈ top-k} exp(s_j / τ) [y_j = c],     k = 200, τ = 0.1.

The training features stream through in chunks of a static size: a running
top-k (similarity, label, index) per query is merged with each chunk's
similarities, so the [queries × train set] similarity matrix is never held,
only [queries × (k + chunk)]. Ties are broken by the lower training index
(the running entries precede the chunk's, and ``lax.top_k`` keeps the earlier
of equal values), i.e. as a stable sort of the whole similarity row would;
vote ties go to the lower class (argmax).
"""
from __future__ import annotations

import functools
from typing import Iterable, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from gmix_jax.contrastive import l2_normalize

DEFAULT_K = 200
DEFAULT_TEMPERATURE = 0.1


def init_topk(num_queries: int, k: int) -> dict:
  """An empty running top-k: similarity −inf, label and index −1."""
  return {'sim': jnp.full((num_queries, k), -jnp.inf, jnp.float32),
          'label': jnp.full((num_queries, k), -1, jnp.int32),
          'index': jnp.full((num_queries, k), -1, jnp.int32)}


@jax.jit
def update_topk(state: dict, queries: jax.Array, feats: jax.Array, labels: jax.Array,
                offset: jax.Array, num_valid: jax.Array) -> dict:
  """Merge one chunk of training features into the running top-k.

  ``queries`` ``[Q, D]`` L2-normalised; ``feats`` ``[C, D]`` (normalised
  here), ``labels`` ``[C]``; rows ≥ ``num_valid`` are padding. ``offset`` is
  the training index of the chunk's first row.
  """
  c = feats.shape[0]
  sim = queries.astype(jnp.float32) @ l2_normalize(feats.astype(jnp.float32)).T
  sim = jnp.where(jnp.arange(c) < num_valid, sim, -jnp.inf)
  q = queries.shape[0]
  index = jnp.broadcast_to(offset + jnp.arange(c, dtype=jnp.int32), (q, c))
  label = jnp.broadcast_to(labels.astype(jnp.int32), (q, c))
  all_sim = jnp.concatenate([state['sim'], sim], axis=1)
  top, pos = jax.lax.top_k(all_sim, state['sim'].shape[1])
  pick = lambda a, b: jnp.take_along_axis(jnp.concatenate([a, b], axis=1), pos, axis=1)
  return {'sim': top, 'label': pick(state['label'], label),
          'index': pick(state['index'], index)}


@functools.partial(jax.jit, static_argnames=('num_classes',))
def predict(state: dict, num_classes: int, temperature: float = DEFAULT_TEMPERATURE):
  """ŷ = argmax_c Σ_j exp(s_j/τ)[y_j = c] over the running top-k ``[Q]``;
  empty slots (similarity −inf, label −1) vote with weight 0."""
  weight = jnp.exp(state['sim'] / temperature)
  votes = jnp.einsum('qk,qkc->qc', weight, jax.nn.one_hot(state['label'], num_classes))
  return jnp.argmax(votes, axis=-1)


def _chunks(train: Iterable[Tuple[np.ndarray, np.ndarray]], chunk: int):
  """Re-batch ``(feats, labels)`` pieces of any size into ``chunk`` rows,
  the last padded: ``(feats, labels, offset, num_valid)``."""
  buf_f, buf_l, held, offset = [], [], 0, 0
  for f, l in train:
    buf_f.append(np.asarray(f))
    buf_l.append(np.asarray(l))
    held += len(f)
    while held >= chunk:
      f_all, l_all = np.concatenate(buf_f), np.concatenate(buf_l)
      yield f_all[:chunk], l_all[:chunk], offset, chunk
      buf_f, buf_l, held, offset = [f_all[chunk:]], [l_all[chunk:]], held - chunk, offset + chunk
  if held:
    f_all, l_all = np.concatenate(buf_f), np.concatenate(buf_l)
    pad = chunk - held
    yield (np.pad(f_all, [(0, pad)] + [(0, 0)] * (f_all.ndim - 1)),
           np.pad(l_all, (0, pad)), offset, held)


def topk_neighbours(train: Iterable[Tuple[np.ndarray, np.ndarray]], queries, *,
                    k: int = DEFAULT_K, chunk: int = 1024) -> dict:
  """The running top-k of ``queries`` ``[Q, D]`` over a stream of training
  ``(feats, labels)`` pieces (any sizes; re-chunked to ``chunk`` rows so
  one compilation serves all)."""
  if k < 1 or chunk < 1:
    raise ValueError(f'kNN needs k >= 1 and chunk >= 1, got k={k}, chunk={chunk}')
  queries = l2_normalize(jnp.asarray(queries, jnp.float32))
  state = init_topk(queries.shape[0], k)
  for f, l, offset, valid in _chunks(train, chunk):
    state = update_topk(state, queries, jnp.asarray(f), jnp.asarray(l), jnp.int32(offset),
                        jnp.int32(valid))
  return state


def knn_accuracy(train: Iterable[Tuple[np.ndarray, np.ndarray]], test_feats, test_labels, *,
                 num_classes: int, k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE,
                 chunk: int = 1024) -> float:
  """Top-1 accuracy (a fraction) of the weighted kNN classifier."""
  state = topk_neighbours(train, test_feats, k=k, chunk=chunk)
  pred = np.asarray(predict(state, num_classes, temperature))
  return float(np.mean(pred == np.asarray(test_labels)))
