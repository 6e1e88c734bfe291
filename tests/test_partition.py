"""The top-γ split against numpy sorting."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmix_jax import partition


@pytest.mark.parametrize('gamma,b,k', [(0.5, 10, 5), (0.25, 10, 3), (0.0, 7, 0), (1.0, 7, 7),
                                       (0.05, 10, 1), (0.04, 10, 0)])
def test_num_sensitive_rounds_half_up(gamma, b, k):
  assert partition.num_sensitive(gamma, b) == k


@pytest.mark.parametrize('seed', range(5))
@pytest.mark.parametrize('k', [0, 1, 4, 9, 12])
def test_split_is_exactly_the_top_k(seed, k):
  s = np.random.default_rng(seed).normal(size=12).astype(np.float32)
  split = jax.jit(partition.top_k_split, static_argnums=1)(jnp.asarray(s), k)
  assert split.sensitive.shape == (k,) and split.insensitive.shape == (12 - k,)
  expected_top = set(np.argsort(-s, kind='stable')[:k].tolist())
  assert set(np.asarray(split.sensitive).tolist()) == expected_top
  union = np.concatenate([split.sensitive, split.insensitive])
  assert sorted(union.tolist()) == list(range(12)), 'the two sets partition the batch'
  assert np.all(np.diff(np.asarray(split.sensitive)) > 0), 'returned in example order'
  if 0 < k < 12:
    assert s[np.asarray(split.sensitive)].min() >= s[np.asarray(split.insensitive)].max()


def test_ties_are_broken_by_index_deterministically():
  s = jnp.array([1.0, 3.0, 3.0, 3.0, 0.0, 3.0])
  for _ in range(3):
    split = partition.top_k_split(s, 2)
    np.testing.assert_array_equal(split.sensitive, [1, 2])   # the lower indices of the tie
  np.testing.assert_array_equal(partition.top_k_split(s, 3).insensitive, [0, 4, 5])


def test_nan_counts_as_least_sensitive_and_membership():
  s = jnp.array([jnp.nan, 0.5, 0.1, 2.0])
  split = partition.top_k_split(s, 3)
  np.testing.assert_array_equal(split.insensitive, [0])
  np.testing.assert_array_equal(partition.membership(split, 4), [False, True, True, True])


def test_gamma_outside_unit_interval_is_rejected():
  with pytest.raises(ValueError, match=r'partition.gamma must be in \[0, 1\]'):
    partition.num_sensitive(1.5, 8)
