"""Pytest setup: 8 fake CPU devices, set before JAX is imported anywhere, and
a persistent XLA compilation cache shared by the session's processes."""
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


# -- A persistent compilation cache for the test session ------------------------
# Most of the suite's CPU time is XLA compiling the same small programs again:
# each end-to-end run (in process or a `python -m gmix_jax.main` subprocess)
# builds its step afresh, and a resume test trains the same config two or three
# times. JAX's persistent cache stores each compiled executable under a hash of
# the program, its compile options, devices, XLA flags and the jax/jaxlib
# versions, so a changed program is a miss (compiled and checked as before);
# only XLA's backend compile is skipped, tracing and lowering still run, and
# programs with host callbacks are never cached. The cache lives in pytest's
# cache folder (`--cache-clear` empties it, `-p no:cacheprovider` turns it off)
# and is passed to subprocesses and xdist workers through the environment.
CACHE_LIMIT_BYTES = 2 << 30      # pruned to half this, oldest first, at the start


def _prune(folder, limit):
  entries = []
  for name in os.listdir(folder):
    path = os.path.join(folder, name)
    try:
      st = os.stat(path)
    except OSError:
      continue
    entries.append((st.st_mtime, st.st_size, path))
  total = sum(size for _, size, _ in entries)
  if total <= limit:
    return
  for _, size, path in sorted(entries):
    if total <= limit // 2:
      break
    try:
      os.unlink(path)
      total -= size
    except OSError:
      pass


def pytest_configure(config):
  if os.environ.get('JAX_COMPILATION_CACHE_DIR') or getattr(config, 'cache', None) is None:
    return                       # the user's own cache, or no pytest cache (then none)
  folder = str(config.cache.mkdir('jax_compilation_cache'))
  if not hasattr(config, 'workerinput'):         # the controller (or the only process)
    _prune(folder, CACHE_LIMIT_BYTES)
  # Every program: the suite's are small and compile in well under JAX's 1 s default.
  for key, value in (('JAX_COMPILATION_CACHE_DIR', folder),
                     ('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0'),
                     ('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')):
    os.environ[key] = value
  if 'jax' in sys.modules:       # imported by a plugin: set it there too
    import jax
    jax.config.update('jax_compilation_cache_dir', folder)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
