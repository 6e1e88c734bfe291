"""gmix_jax.knn: the streamed weighted kNN equals a brute-force numpy kNN."""
import numpy as np
import pytest

from gmix_jax import knn


def brute_force(train_f, train_y, test_f, num_classes, k, tau):
  """Full similarity matrix, stable sort (ties: lower training index), votes."""
  norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  sim = norm(test_f.astype(np.float64)) @ norm(train_f.astype(np.float64)).T
  preds, neighbours = [], []
  for row in sim:
    idx = np.argsort(-row, kind='stable')[:k]
    votes = np.zeros(num_classes)
    for j in idx:
      votes[train_y[j]] += np.exp(row[j] / tau)
    preds.append(int(np.argmax(votes)))
    neighbours.append(idx)
  return np.array(preds), np.array(neighbours)


def pieces(f, y, sizes):
  """The training set as a stream of pieces of uneven sizes."""
  start = 0
  for s in sizes:
    yield f[start:start + s], y[start:start + s]
    start += s
  assert start == len(f)


@pytest.mark.parametrize('k,chunk', [(20, 16), (7, 64), (50, 13)])
def test_knn_matches_brute_force(k, chunk):
  rng = np.random.default_rng(0)
  c = 4
  centres = rng.normal(size=(c, 8))
  train_y = rng.integers(0, c, 101)
  test_y = rng.integers(0, c, 37)
  train_f = (centres[train_y] + 1.5 * rng.normal(size=(101, 8))).astype(np.float32)
  test_f = (centres[test_y] + 1.5 * rng.normal(size=(37, 8))).astype(np.float32)
  want_pred, want_idx = brute_force(train_f, train_y, test_f, c, k, 0.1)
  state = knn.topk_neighbours(pieces(train_f, train_y, [30, 5, 66]), test_f, k=k, chunk=chunk)
  np.testing.assert_array_equal(np.asarray(state['index']), want_idx)
  np.testing.assert_array_equal(np.asarray(state['label']), train_y[want_idx])
  np.testing.assert_array_equal(np.asarray(knn.predict(state, c, 0.1)), want_pred)
  acc = knn.knn_accuracy(pieces(train_f, train_y, [101]), test_f, test_y, num_classes=c, k=k,
                         chunk=chunk)
  assert acc == pytest.approx(np.mean(want_pred == test_y))
  assert 0.3 < acc < 1.0   # informative features, not a degenerate case


def test_ties_broken_by_lower_training_index():
  # Rows with four entries ±1: every cosine is a multiple of 1/4, exact in
  # float32 whatever the summation order, so many exact ties.
  rng = np.random.default_rng(1)

  def grid(n):
    f = np.zeros((n, 8), np.float32)
    for row in f:
      row[rng.choice(8, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
    return f
  train_f, test_f = grid(60), grid(9)
  train_y = rng.integers(0, 3, 60)
  _, want_idx = brute_force(train_f, train_y, test_f, 3, 25, 0.1)
  state = knn.topk_neighbours(pieces(train_f, train_y, [17, 43]), test_f, k=25, chunk=8)
  np.testing.assert_array_equal(np.asarray(state['index']), want_idx)


def test_k_larger_than_the_training_set():
  rng = np.random.default_rng(2)
  train_f, test_f = rng.normal(size=(5, 3)), rng.normal(size=(4, 3))
  train_y = np.array([0, 1, 1, 2, 2])
  want, _ = brute_force(train_f, train_y, test_f, 3, 5, 0.1)
  state = knn.topk_neighbours([(train_f, train_y)], test_f, k=9, chunk=4)
  assert (np.asarray(state['index'])[:, 5:] == -1).all()
  np.testing.assert_array_equal(np.asarray(knn.predict(state, 3, 0.1)), want)


def test_bad_k_refused():
  with pytest.raises(ValueError, match='k >= 1'):
    knn.topk_neighbours([], np.zeros((1, 2)), k=0)
