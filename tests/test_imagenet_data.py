"""End to end on mock imagenet2012: two training steps and an evaluation.

`tfds.testing.mock_data` stands in for a prepared imagenet2012 (12 random
images of random sizes per split, 1000 classes); the trainer reads it
through `jpeg_sources` and the grain pipeline, crops with the Inception
transform on the host, normalises on device with ImageNet's constants.
"""
import json
import os

import pytest

from configs import common
from gmix_jax import train


@pytest.mark.slow
def test_mock_imagenet2012_two_steps_and_an_evaluation(tmp_path, mock_tfds):
  c = common.base()
  c.dataset.name = 'imagenet2012'
  c.dataset.data_dir = str(tmp_path / 'data')
  c.dataset.augment = 'inception'
  c.dataset.image_size = 16
  c.model.name = 'mlp'             # compiles in a fraction of the CNN's time
  c.model.kwargs = {'hidden_sizes': (16,)}
  c.method = common.method('erm')
  c.batch_size = 6                 # 12 mock training images: 2 steps
  c.num_epochs = 1
  c.num_devices = 2
  c.eval_batch_size = 8            # 12 test images: a padded second batch
  c.log_every_steps = 1
  c.progress = False
  c.plots = False
  summary = train.train_and_evaluate(c, str(tmp_path / 'wd'))

  with open(tmp_path / 'wd' / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  assert [r['step'] for r in records if r['split'] == 'train'] == [1, 2]
  assert all(r['loss'] == r['loss'] for r in records)      # finite
  tests = [r for r in records if r['split'] == 'test']
  assert tests and tests[-1]['step'] == 2
  assert summary['steps'] == 2 and summary['num_test'] == 12
  assert 0.0 <= summary['final_test_accuracy'] <= 1.0
  assert os.path.exists(tmp_path / 'wd' / 'summary.json')
