"""``GMIX_JAX_JPEG_DECODER``: which library decodes JPEGs in the input workers.

`gmix_jax.data.fast_jpeg` reads it when imported (an invalid value raises
ValueError there); it lives here, apart from the data package (which imports
JAX), so that the command line checks it in a moment, before anything loads or
compiles (`gmix_jax.cli.check_environment`).
"""
from __future__ import annotations

import os
from typing import Mapping

ENV = 'GMIX_JAX_JPEG_DECODER'
DECODERS = ('simplejpeg', 'pil')
DEFAULT = 'simplejpeg'


def jpeg_decoder(environ: Mapping[str, str] | None = None) -> str:
  """The decoder ``environ`` (default ``os.environ``) asks for: one of
  `DECODERS`, `DEFAULT` when unset. Raises ValueError naming the variable
  and the allowed values for anything else."""
  environ = os.environ if environ is None else environ
  choice = environ.get(ENV, DEFAULT)
  if choice not in DECODERS:
    raise ValueError(f"environment variable {ENV} must be one of {', '.join(DECODERS)} "
                     f"(unset: {DEFAULT}), got {choice!r}")
  return choice
