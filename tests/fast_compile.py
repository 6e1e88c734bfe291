"""XLA:CPU compile options for tests that build a program, run it once and
compare its results within the same run (never against stored bits).

Such a test's time is compile time. Two options cut it on XLA:CPU (compile
CPU time of the programs of test_grid.py and test_ghost_norm.py: about 1.5x
less with the first, 3-3.5x less with both, than at the defaults):

  * ``xla_backend_optimization_level=0``: LLVM's optimisation level only;
  * ``xla_cpu_use_fusion_emitters=False``: fusions emitted by the older
    elemental emitter instead of the MLIR fusion emitters.

Neither changes XLA's HLO passes or IEEE arithmetic (no fast-math), but
either may change the last bits of a result (the order of a reduction, a
fused multiply-add), so they are NOT for tests that compare against digests
recorded at the default (test_supervised_unchanged.py): those compile as the
library does. An option this jaxlib does not know is left out.
"""
import functools

import jax

WANTED = {'xla_backend_optimization_level': 0, 'xla_cpu_use_fusion_emitters': False}


@functools.cache
def options():
  """The subset of ``WANTED`` this backend accepts (None off CPU)."""
  if jax.default_backend() != 'cpu':
    return None
  accepted = {}
  for name, value in WANTED.items():
    try:
      jax.jit(lambda v: v + 1).lower(1.0).compile({**accepted, name: value})
    except Exception:  # pylint: disable=broad-except  ('No such compile option')
      continue
    accepted[name] = value
  return accepted


def jit(fn):
  """``jax.jit(fn)`` compiled with ``options()``."""
  return jax.jit(fn, compiler_options=options())
