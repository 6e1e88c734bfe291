"""Data: sources without TensorFlow, limited-data subsets, a stateless batch
plan and on-device augmentation.

Typical use (see `train.py`)::

  ds = load_dataset('cifar10', data_dir)                  # float32, normalised
  x, y = subsample(ds.x_train, ds.y_train, examples_per_class=100, seed=0)
  it = BatchIterator((x, y), global_batch=128, seed=0,
                     process_index=jax.process_index(),
                     process_count=jax.process_count(),
                     start_step=int(state.step))
  batch = next(it)                                        # {'x', 'y', 'index'}
  x_aug = random_crop_flip(rng, batch['x'])               # inside the jit step

Modules, one idea each: `dataset` (the container and normalisation),
`tfds_source` (tfds random access), `builders` (offline tfds builders),
`npz_source`, `load` (the name -> source entry point), `subsets`,
`batching`, `augment`. tfds is imported only when a tfds or offline dataset
is loaded.
"""

from gmix_jax.data.augment import random_crop
from gmix_jax.data.augment import random_crop_flip
from gmix_jax.data.augment import random_flip
from gmix_jax.data.batching import batch_indices
from gmix_jax.data.batching import BatchIterator
from gmix_jax.data.batching import epoch_permutation
from gmix_jax.data.batching import steps_per_epoch
from gmix_jax.data.dataset import Dataset
from gmix_jax.data.load import DATASET_NAMES
from gmix_jax.data.load import load_dataset
from gmix_jax.data.subsets import subsample
from gmix_jax.data.subsets import subsample_indices

__all__ = [
    'BatchIterator', 'DATASET_NAMES', 'Dataset', 'batch_indices',
    'epoch_permutation', 'load_dataset', 'random_crop', 'random_crop_flip',
    'random_flip', 'steps_per_epoch', 'subsample', 'subsample_indices',
]
