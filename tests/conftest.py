"""Pytest setup: 8 fake CPU devices, set before JAX is imported anywhere; a
persistent XLA compilation cache shared by the session's processes; the
longest test modules scheduled first under xdist."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# No compile-speed flag for the whole session: --xla_backend_optimization_level=0
# and --xla_cpu_use_fusion_emitters=false each cut XLA:CPU compile time several-fold
# but change the last bits of some training runs (test_supervised_unchanged.py:
# bgmix and samix digests, 2026-12-03), and --xla_llvm_disable_expensive_passes=true
# keeps the bits but saved no compile time. Tests that compare only within
# their own run use them per program (fast_compile.py).
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
  is a supported magic method and works. Patch the function it wraps.
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
# cache folder (`--cache-clear` empties it, `-p no:cacheprovider` turns it off,
# JAX_COMPILATION_CACHE_DIR names another) and reaches subprocesses and xdist
# workers through the environment.
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
  folder = os.environ.get('JAX_COMPILATION_CACHE_DIR')      # the user's own, if set
  if not folder:
    if getattr(config, 'cache', None) is None:
      return                                                 # -p no:cacheprovider: none
    folder = str(config.cache.mkdir('jax_compilation_cache'))
    if not hasattr(config, 'workerinput'):   # the controller (or the only process)
      _prune(folder, CACHE_LIMIT_BYTES)
    os.environ['JAX_COMPILATION_CACHE_DIR'] = folder
  # Every program: the suite's are small and compile in well under JAX's 1 s default.
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')
  if 'jax' in sys.modules:       # imported by a plugin: set it there too
    import jax
    jax.config.update('jax_compilation_cache_dir', folder)
    jax.config.update('jax_persistent_cache_min_compile_time_secs',
                      float(os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']))
    jax.config.update('jax_persistent_cache_min_entry_size_bytes',
                      int(os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES']))


# -- Scheduling under xdist: the longest modules first ---------------------------
# `--dist loadfile` (pyproject.toml) sends a module's tests to one worker, so a
# module-scoped fixture (a trained workdir) is built once, and hands modules
# out in collection order (`--no-loadscope-reorder`): a long module collected
# last (alphabetically, test_train.py) would leave the other worker idle at the
# end. Modules are sorted by their tests' seconds in the last run that ran them
# (kept in pytest's cache), else by MODULE_SECONDS (a clean clone has no
# cache), longest first; a module's tests keep their order.
MODULE_SECONDS = {     # test seconds per module, cold cache, whole suite at -n 2 (2026-12-03)
    'test_train.py': 79, 'test_grid.py': 59, 'test_reliability.py': 57, 'test_samix.py': 57,
    'test_manifold.py': 49, 'test_samix_ssl_p.py': 48, 'test_objectives.py': 42,
    'test_moco.py': 41, 'test_faults.py': 36, 'test_parallel.py': 35, 'test_bench_step.py': 33,
    'test_models.py': 32, 'test_accumulation.py': 32, 'test_mixing.py': 32, 'test_rules.py': 31,
    'test_transforms.py': 29, 'test_samix_ssl.py': 29, 'test_global_m.py': 25,
    'test_ssl_configs.py': 24, 'test_shared_prev.py': 24, 'test_analysis.py': 23,
    'test_integrity.py': 20, 'test_moco_resume.py': 19, 'test_bad_records.py': 16,
    'test_ghost_norm.py': 16,
}
DURATIONS_KEY = 'gmix_jax/test_seconds'


def _module_seconds(config):
  learned = config.cache.get(DURATIONS_KEY, {}) if getattr(config, 'cache', None) else {}
  measured = {}
  for nodeid, s in learned.items():
    module = os.path.basename(nodeid.split('::')[0])
    measured[module] = measured.get(module, 0.0) + s
  return {**MODULE_SECONDS, **measured}


def pytest_collection_modifyitems(config, items):
  seconds = _module_seconds(config)
  items.sort(key=lambda item: -seconds.get(item.path.name, 0.0))   # stable


_seconds = {}


def pytest_runtest_logreport(report):
  _seconds[report.nodeid] = _seconds.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session):
  config = session.config
  if hasattr(config, 'workerinput') or getattr(config, 'cache', None) is None or not _seconds:
    return
  stored = config.cache.get(DURATIONS_KEY, {})
  stored.update({nodeid: round(s, 2) for nodeid, s in _seconds.items()})
  config.cache.set(DURATIONS_KEY, stored)
