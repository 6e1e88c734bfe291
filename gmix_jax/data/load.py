"""`load_dataset(name, data_dir)`: a small dataset's splits as normalised arrays.

For analysis on small sets (experiments/sweep.py, landscape.py), not for
training (which streams, `gmix_jax.data.pipeline`). The arrays come through
the pipeline's own path: each split's records in order (`ordered_batches`,
evaluation transform), normalised with the stored statistics as the step does
on device (`gmix_jax.data.normalize`). Names: `gmix_jax.data.sources`.
"""

from __future__ import annotations

import numpy as np

from gmix_jax.data import dataset as dataset_lib
from gmix_jax.data import normalize
from gmix_jax.data import pipeline
from gmix_jax.data import sources

_BATCH = 1024


def read_split(split: sources.Split, augment: str = 'none',
               image_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Every record of ``split`` in order: ``(images as transformed, labels int32)``."""
  xs, ys = [], []
  with pipeline.ordered_batches(split, global_batch=min(_BATCH, len(split)), augment=augment,
                                image_size=image_size) as batches:
    for b in batches:
      xs.append(b['x'][b['mask']])
      ys.append(b['y'][b['mask']])
  return np.concatenate(xs), np.concatenate(ys)


def load_dataset(name: str, data_dir: str, *, download: bool = False,
                 augment: str = 'none', image_size: int | None = None) -> dataset_lib.Dataset:
  """Both splits of ``name`` as float32 normalised arrays (see module docstring)."""
  train, test = sources.open_splits(name, data_dir, download=download)
  norm = normalize.for_split(train)
  scale = 1.0 if norm.pixel_max is None else 1.0 / norm.pixel_max
  arrays = {}
  for key, split in (('train', train), ('test', test)):
    x, y = read_split(split, augment, image_size)
    arrays[f'x_{key}'] = ((x.astype(np.float32) * np.float32(scale) - norm.mean) / norm.std
                          ).astype(np.float32)
    arrays[f'y_{key}'] = y
  return dataset_lib.Dataset(name=name, num_classes=train.num_classes,
                             input_shape=tuple(arrays['x_train'].shape[1:]), mean=norm.mean,
                             std=norm.std, **arrays)
