"""A user's own arrays from one ``.npz`` file.

The file holds ``x_train``, ``y_train``, ``x_test``, ``y_test``. Features may
have any shape (``[N, D]`` vectors or ``[N, H, W, C]`` images); labels are
1-D integer arrays with values ``>= 0``. The file may declare the class count
as a scalar ``num_classes`` (then every label must lie in ``[0, num_classes)``);
otherwise it is one more than the largest label in either split. A class with
no training example is warned about (`gmix_jax.data.validate`). A uint8 ``x`` is taken to be pixels (white =
255); any other dtype is used as given (then standardised, see
`gmix_jax.data.dataset`).

Every problem raises ``ValueError`` naming the file, the offending key and
the expected keys, since a half-loaded dataset fails much later and far
from its cause: missing keys, a file that is not an npz, non-finite
features (with the first example indices), labels out of range, empty
splits.
"""

from __future__ import annotations

import os

import numpy as np

from gmix_jax.data import validate

EXPECTED_KEYS = ('x_train', 'y_train', 'x_test', 'y_test')


def _error(path: str, message: str) -> ValueError:
  return ValueError(
      f'{path}: {message} (expected keys: {", ".join(EXPECTED_KEYS)}; '
      f'features any shape [N, ...], labels integer [N]).')


def read_npz(path: str):
  """Reads and validates an npz dataset file.

  Returns:
    ``(x_train, y_train, x_test, y_test, num_classes, pixel_max)``, with
    ``pixel_max`` 255 for uint8 features and ``None`` otherwise.

  Raises:
    FileNotFoundError: no such file.
    ValueError: not an npz, missing keys, bad label dtype/shape/values,
      features and labels of different lengths, non-finite features, or an
      empty split.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'npz dataset file not found: {path}')
  arrays = validate.read_npz_arrays(path)
  missing = [k for k in EXPECTED_KEYS if k not in arrays]
  if missing:
    raise _error(path, f'missing key(s) {", ".join(missing)}; found '
                 f'{", ".join(sorted(arrays)) or "none"}')
  declared = arrays.get('num_classes')

  for split in ('train', 'test'):
    x, y = arrays[f'x_{split}'], arrays[f'y_{split}']
    if not np.issubdtype(y.dtype, np.integer):
      raise _error(path, f'y_{split} must hold integer class labels, got '
                   f'dtype {y.dtype} (convert with y.astype(int))')
    if y.ndim != 1:
      raise _error(path, f'y_{split} must be 1-D, got shape {y.shape}')
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
            or x.dtype == np.bool_):
      raise _error(path, f'x_{split} must hold real numbers (integer, float or bool), got '
                   f'dtype {x.dtype}')
    if x.ndim < 2:
      raise _error(path, f'x_{split} must be [N, ...] with at least one '
                   f'feature axis, got shape {x.shape}')
    if len(x) != len(y):
      raise _error(path, f'x_{split} has {len(x)} rows but y_{split} has '
                   f'{len(y)}')
    if len(y) and y.min() < 0:
      raise _error(path, f'y_{split} has negative label {y.min()}')
  if len(arrays['y_train']) == 0:
    raise _error(path, 'x_train/y_train are empty')
  if arrays['x_train'].shape[1:] != arrays['x_test'].shape[1:]:
    raise _error(path, f'x_train example shape {arrays["x_train"].shape[1:]} '
                 f'differs from x_test {arrays["x_test"].shape[1:]}')

  if declared is not None:
    if declared.shape or not np.issubdtype(declared.dtype, np.integer) or declared < 1:
      raise _error(path, f'num_classes must be one integer >= 1, got {declared!r}')
    num_classes = int(declared)
  else:
    num_classes = 1 + int(max(arrays['y_train'].max(),
                              arrays['y_test'].max(initial=0)))
  name = f'npz:{path}'
  for split in ('train', 'test'):
    validate.check_split(name, split, arrays[f'x_{split}'], arrays[f'y_{split}'], num_classes)
  validate.missing_classes(name, arrays['y_train'], num_classes)
  pixel_max = 255 if arrays['x_train'].dtype == np.uint8 else None
  return (arrays['x_train'], arrays['y_train'], arrays['x_test'],
          arrays['y_test'], num_classes, pixel_max)
