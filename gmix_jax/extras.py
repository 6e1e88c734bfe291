"""Which optional install ("extra") each part of gmix_jax needs, and one line
saying which to install when it is missing.

The core (`transforms`, `sharpness`, `mixing`, `objectives`, `losses`,
`partition`, `sensitivity`, `accumulation`) needs only the package's own
dependencies: jax, optax, numpy. The trainer and its command line need the
``train`` extra; ``--config.tensorboard=True`` the ``tensorboard`` extra;
``--config.dataset.decode=fast`` the ``fast-decode`` extra.
pyproject.toml lists the same distributions (tests/test_install.py checks
that the two agree). Only ``importlib.util.find_spec`` is used here, so a
check imports nothing.
"""
from __future__ import annotations

import importlib.util

# extra -> {top-level module: the distribution that provides it}
EXTRAS = {
    'train': {
        'flax': 'flax', 'orbax': 'orbax-checkpoint', 'ml_collections': 'ml-collections',
        'absl': 'absl-py', 'tqdm': 'tqdm', 'matplotlib': 'matplotlib', 'PIL': 'pillow',
        'grain': 'grain', 'tensorflow_datasets': 'tensorflow-datasets',
        'array_record': 'array-record', 'sklearn': 'scikit-learn', 'mlxtend': 'mlxtend',
        'simplejpeg': 'simplejpeg',
    },
    'tensorboard': {'tensorboardX': 'tensorboardX'},
    'fast-decode': {'cv2': 'opencv-python-headless'},
}


class MissingExtraError(ImportError):
  """An optional install is missing; the message is one line naming it."""


def missing(extra: str) -> list[str]:
  """The modules of ``extra`` that cannot be imported here."""
  return [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]


def require(extra: str, what: str) -> None:
  """Raises `MissingExtraError` if ``extra`` is not installed.

  ``what`` names what needs it, e.g. 'the command line'.
  """
  absent = missing(extra)
  if absent:
    raise MissingExtraError(
        f"{what} needs the '{extra}' extra (missing: {', '.join(absent)}); install it with: "
        f"pip install 'gmix_jax[{extra}]'  (from a checkout: pip install -e '.[{extra}]')")
