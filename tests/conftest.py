"""Pytest setup: 8 fake CPU devices, set before JAX is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import contextlib  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def x64():
  """Run a test body in float64 (for comparisons against exact computations)."""
  import jax
  ctx = getattr(jax, 'enable_x64', None)
  if ctx is None:  # older JAX
    from jax.experimental import enable_x64 as ctx
  with ctx(True):
    yield


@pytest.fixture
def mock_tfds(monkeypatch):
  """`tfds.testing.mock_data` with a fixed batched read.

  In tfds 4.9.10 the mock assigns ``__getitems__`` as a plain attribute of
  a MagicMock, so it is called without ``self`` and fails; ``__getitem__``
  is a supported magic method and works. Patch the helper it wraps.
  """
  import tensorflow_datasets as tfds
  from tensorflow_datasets.testing import mocking

  def getitems(*args, generator, serialized=False):
    del serialized  # args: (record_keys,) now, (self, record_keys) once fixed
    return [generator[k] for k in args[-1]]

  monkeypatch.setattr(mocking, '_getitems', getitems)
  with tfds.testing.mock_data(num_examples=12,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    yield


# configs/ is imported as a package by the end-to-end tests.
import sys  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
