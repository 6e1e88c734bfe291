"""Data: random-access sources without TensorFlow, one Grain pipeline, stored
statistics, on-device normalisation, limited-data subsets.

Typical use (see `gmix_jax.train`)::

  data = open_train_data(config)             # splits, subset, normaliser, input shape
  with data.train_batches(global_batch=128, seed=0, num_steps=n, start_step=s,
                          process_index=jax.process_index(),
                          process_count=jax.process_count()) as batches:
    batch = next(batches)                    # {'x': uint8, 'y', 'index'} (this process's rows)
  x = data.normalizer(batch['x'])            # inside the jit step

Modules, one idea each: `sources` (every split by random access: `tfds_source`,
`builders`, `npz_source`, `jpeg_sources`), `stats` (labels and per-channel
statistics, stored beside the dataset), `subsets` (index selections),
`batching` (the pure batch plan), `image_ops` (per-record transforms),
`pipeline` (the Grain chain), `normalize` (on device), `inputs` (what a trainer
reads from ``config.dataset``), `load` (whole small splits as arrays, for
analysis). tfds is imported only when a tfds or offline dataset is opened.
"""

from gmix_jax.data.batching import batch_indices
from gmix_jax.data.batching import epoch_permutation
from gmix_jax.data.batching import steps_per_epoch
from gmix_jax.data.dataset import Dataset
from gmix_jax.data import inputs
from gmix_jax.data.inputs import open_train_data
from gmix_jax.data.inputs import TrainData
from gmix_jax.data.load import load_dataset
from gmix_jax.data.normalize import Normalizer
from gmix_jax.data.pipeline import AUGMENT_NAMES
from gmix_jax.data.pipeline import BadRecordError
from gmix_jax.data.pipeline import Batches
from gmix_jax.data.pipeline import ordered_batches
from gmix_jax.data.pipeline import train_batches
from gmix_jax.data.sources import dataset_names
from gmix_jax.data.sources import open_split
from gmix_jax.data.sources import open_splits
from gmix_jax.data.sources import Split
from gmix_jax.data.subsets import subsample
from gmix_jax.data.subsets import subsample_indices

__all__ = [
    'AUGMENT_NAMES', 'BadRecordError', 'Batches', 'Dataset', 'Normalizer', 'Split', 'TrainData', 'batch_indices',
    'dataset_names', 'epoch_permutation', 'load_dataset', 'open_split', 'open_splits',
    'open_train_data', 'ordered_batches', 'steps_per_epoch', 'subsample', 'subsample_indices',
    'train_batches',
]
