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
