"""The Grain pipeline (gmix_jax.data.pipeline), stored statistics, on-device
normalisation and streaming evaluation.

Sources are in-memory arrays or small PNG sets written here, so nothing is
prepared by tfds. Each property is checked against an independent
computation: the pure batch plan (`batching.batch_indices`), numpy over the
whole split, `losses` over all logits at once, a fresh in-order run.
"""
import io
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmix_jax import evaluation
from gmix_jax import losses
from gmix_jax.data import batching
from gmix_jax.data import normalize
from gmix_jax.data import pipeline
from gmix_jax.data import sources
from gmix_jax.data import stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def array_split(n=53, shape=(6, 6, 3), num_classes=4, seed=0, split='train'):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
  labels = (np.arange(n) % num_classes).astype(np.int32)
  return sources.Split('toy', split, sources.ArrayRecords(images, labels), num_classes, 255)


def png_split(sizes, tmp_path=None, seed=0):
  """Encoded PNGs of different sizes (as a tfds Image feature stores them)."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  pixels = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
  def png(x):
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format='PNG')
    return buf.getvalue()
  records = [{'image': png(x), 'label': i % 3} for i, x in enumerate(pixels)]
  split = sources.Split('pngs', 'train', records, 3, 255,
                        meta_dir=str(tmp_path) if tmp_path else None)
  return split, pixels


def collect(batches):
  with batches:
    return list(batches)


# -- The training plan --------------------------------------------------------------
def test_batches_follow_the_pure_plan_and_processes_partition_them():
  split = array_split()
  ids = np.arange(3, 53)                      # a subset: 50 records, 6 steps of 8
  full = pipeline.TrainBatch(split, ids, 8, seed=5, transform=None)
  parts = [pipeline.TrainBatch(split, ids, 8, 5, None, p, 2) for p in range(2)]
  for step in (0, 5, 6, 13):                  # across epochs, out of order
    epoch, pos = divmod(step, 6)
    plan = batching.batch_indices(50, 8, 5, epoch, pos)
    g = full(step)
    np.testing.assert_array_equal(g['index'], plan)
    np.testing.assert_array_equal(g['x'], split.records.images[ids[plan]])
    np.testing.assert_array_equal(g['y'], split.records.labels[ids[plan]])
    local = [p(step) for p in parts]
    for key in ('x', 'y', 'index'):           # process 0's rows, then process 1's
      np.testing.assert_array_equal(np.concatenate([b[key] for b in local]), g[key])
    assert not set(local[0]['index']) & set(local[1]['index'])


def test_every_record_once_per_epoch_remainder_dropped():
  split = array_split(n=53)
  fn = pipeline.TrainBatch(split, None, 8, seed=1, transform=None)
  assert fn.steps_per_epoch == 6
  for epoch in range(2):
    seen = np.concatenate([fn(epoch * 6 + k)['index'] for k in range(6)])
    assert len(seen) == len(np.unique(seen)) == 48
  assert not np.array_equal(fn(0)['index'], fn(6)['index'])     # a new shuffle per epoch


def test_resume_from_a_step_equals_the_straight_run_with_augmentation():
  split = array_split(n=40, shape=(8, 8, 3))
  kw = dict(global_batch=8, seed=3, num_steps=12, augment='cifar')
  straight = collect(pipeline.train_batches(split, None, **kw))
  resumed = collect(pipeline.train_batches(split, None, start_step=7, **kw))
  assert len(straight) == 12 and len(resumed) == 5
  for a, b in zip(straight[7:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  # Augmentation happened (cifar crop + flip), and per record: a record seen in
  # two epochs is augmented differently.
  x = straight[0]['x']
  assert x.dtype == np.uint8 and x.shape == (8, 8, 8, 3)
  assert not np.array_equal(x, split.records.images[straight[0]['index']])


def test_bad_batch_shapes_fail_when_built():
  split = array_split(n=10)
  with pytest.raises(ValueError, match='larger than the training set'):
    pipeline.TrainBatch(split, None, 16, 0, None)
  with pytest.raises(ValueError, match='not divisible'):
    pipeline.TrainBatch(split, None, 9, 0, None, 0, 2)
  with pytest.raises(ValueError, match='dataset.workers'):
    pipeline.train_batches(split, None, global_batch=2, seed=0, num_steps=1, workers=-1)


def test_augment_names_and_old_booleans():
  assert pipeline.augment_name(True) == 'cifar' and pipeline.augment_name(False) == 'none'
  assert pipeline.augment_name('inception') == 'inception'
  with pytest.raises(ValueError, match=r"dataset.augment must be one of \['none', 'cifar'"):
    pipeline.augment_name('flip')


# -- Ordered passes: evaluation and the stale refresh ------------------------------------
@pytest.mark.parametrize('n,batch,processes', [(37, 8, 2), (5, 8, 1), (24, 6, 3)])
def test_ordered_batches_cover_every_record_exactly_once(n, batch, processes):
  split = array_split(n=n)
  rows = []
  for p in range(processes):
    fn = pipeline.OrderedBatch(split, None, batch, None, p, processes)
    rows.append([fn(k) for k in range(fn.num_batches)])
  seen = []
  for k in range(len(rows[0])):               # the global batch k, process by process
    for p in range(processes):
      b = rows[p][k]
      seen.extend(b['index'][b['mask']])
      np.testing.assert_array_equal(b['x'], split.records.images[b['index']])
  assert sorted(seen) == list(range(n)) and seen == list(range(n))


def test_streamed_metrics_equal_the_whole_split_computation():
  rng = np.random.default_rng(0)
  n, c, batch = 37, 5, 8
  logits = rng.normal(size=(n, c)).astype(np.float32) * 3
  labels = rng.integers(0, c, n)
  total, batch_sums = None, jax.jit(evaluation.batch_sums)
  for start in range(0, n, batch):            # padded last batch, masked
    idx = np.arange(start, start + batch)
    mask = idx < n
    idx = np.where(mask, idx, 0)
    sums = jax.device_get(batch_sums(jnp.asarray(logits[idx]), jnp.asarray(labels[idx]),
                                                jnp.asarray(mask)))
    total = sums if total is None else jax.tree.map(np.add, total, sums)
  got = evaluation.finalize(total)
  ce = losses.soft_cross_entropy(jnp.asarray(logits), jax.nn.one_hot(labels, c))
  assert got['num_examples'] == n
  np.testing.assert_allclose(got['accuracy'], float(losses.accuracy(jnp.asarray(logits),
                                                                    jnp.asarray(labels))))
  np.testing.assert_allclose(got['loss'], float(jnp.mean(ce)), rtol=1e-5)
  np.testing.assert_allclose(got['ece'], float(losses.expected_calibration_error(
      jnp.asarray(logits), jnp.asarray(labels))), rtol=1e-5, atol=1e-7)


def test_eval_over_a_mesh_equals_one_device():
  """The shard_map evaluation (sums psum-ed over the devices) = one device."""
  from gmix_jax import parallel
  n, batch = 21, 8
  split = array_split(n=n, shape=(4,), split='test')
  w = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)), jnp.float32)
  predict = lambda p, ms, x: x @ p
  norm = normalize.Normalizer(np.full(1, 0.5, np.float32), np.full(1, 0.25, np.float32), 255)
  mesh = parallel.make_mesh(4)
  results = []
  for m, to_device in ((None, lambda b: b),
                       (mesh, lambda b: parallel.global_batch_to_device(b, mesh))):
    with pipeline.ordered_batches(split, global_batch=batch) as batches:
      results.append(evaluation.evaluate(evaluation.make_eval_fn(predict, norm, m), w, None,
                                         batches, to_device))
  assert results[0]['num_examples'] == results[1]['num_examples'] == n
  for key in ('accuracy', 'loss', 'ece'):
    np.testing.assert_allclose(results[0][key], results[1][key], rtol=1e-5)


# -- Statistics and normalisation -------------------------------------------------------------
def test_stats_of_variable_size_images_are_pixel_weighted_and_stored(tmp_path, monkeypatch):
  split, pixels = png_split([(5, 7), (9, 4), (3, 3), (6, 6)], tmp_path)
  mean, std = stats.channel_stats(split)
  every = np.concatenate([x.reshape(-1, 3) for x in pixels]).astype(np.float64) / 255
  np.testing.assert_allclose(mean, every.mean(0), rtol=1e-6)
  np.testing.assert_allclose(std, every.std(0), rtol=1e-5)
  assert os.path.exists(tmp_path / stats.STATS_FILE)
  monkeypatch.setattr(stats, '_compute', lambda s: pytest.fail('recomputed'))
  np.testing.assert_array_equal(stats.channel_stats(split)[0], mean)   # read back
  np.testing.assert_array_equal(stats.split_labels(split), np.arange(4) % 3)
  assert os.path.exists(tmp_path / 'gmix_labels_train.npy')


def test_normalizer_on_device_equals_numpy_and_inverts():
  split = array_split(n=30)
  norm = normalize.for_split(split)
  x = split.records.images
  ref = (x / 255.0 - x.reshape(-1, 3).mean(0) / 255) / (x.reshape(-1, 3).std(0) / 255)
  out = jax.jit(norm)(x)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(norm.invert(np.asarray(out)), x / 255.0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out).reshape(-1, 3).mean(0), 0, atol=1e-5)


def test_encoded_images_are_decoded_per_record(tmp_path):
  split, pixels = png_split([(6, 6)] * 5)
  with pipeline.ordered_batches(split, global_batch=2) as batches:
    xs = [b['x'][b['mask']] for b in batches]
  np.testing.assert_array_equal(np.concatenate(xs), np.stack(pixels))    # PNG is lossless


# -- Worker processes -----------------------------------------------------------------------------
WORKER_SCRIPT = '''
import sys
import numpy as np
from gmix_jax.data import pipeline, sources

def main():
  rng = np.random.default_rng(0)
  split = sources.Split('toy', 'train', sources.ArrayRecords(
      rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8), np.arange(40, dtype=np.int32) % 4), 4, 255)
  out = {}
  for workers in (0, 2):
    with pipeline.train_batches(split, None, global_batch=8, seed=3, num_steps=9, start_step=2,
                                augment='cifar', workers=workers) as batches:
      for i, b in enumerate(batches):
        for k, v in b.items():
          out[f'{workers}_{i}_{k}'] = v
  np.savez(sys.argv[1], **out)

if __name__ == '__main__':   # spawned workers re-import __main__
  main()
'''


@pytest.mark.slow
def test_two_workers_give_the_same_batches_and_close_cleanly(tmp_path):
  """Outside absl.app.run (flags unparsed), with workers spawned and closed."""
  script = tmp_path / 'read.py'
  script.write_text(WORKER_SCRIPT)
  out = tmp_path / 'batches.npz'
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''),
             JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Exception ignored' not in proc.stderr, proc.stderr[-3000:]
  with np.load(out) as f:
    got = dict(f)
  assert len([k for k in got if k.startswith('2_')]) == 7 * 3
  for i in range(7):
    for k in ('x', 'y', 'index'):
      np.testing.assert_array_equal(got[f'0_{i}_{k}'], got[f'2_{i}_{k}'])


def _initialize_in_child(queue):
  os.environ.update(JAX_COORDINATOR_ADDRESS='localhost:1', JAX_NUM_PROCESSES='2',
                    JAX_PROCESS_ID='1')
  from gmix_jax import parallel
  parallel.maybe_initialize_distributed()   # would block waiting for a peer if it joined
  queue.put(jax.distributed.is_initialized())


def test_a_spawned_worker_never_initializes_jax_distributed():
  import multiprocessing
  ctx = multiprocessing.get_context('spawn')          # as Grain starts its workers
  queue = ctx.Queue()
  child = ctx.Process(target=_initialize_in_child, args=(queue,))
  child.start()
  try:
    assert queue.get(timeout=120) is False
  finally:
    child.join(timeout=30)
    if child.is_alive():
      child.kill()


def test_a_workdir_of_an_old_boolean_augment_config_resumes(tmp_path):
  """config.json written when dataset.augment was a bool: no drift against
  today's name for the same augmentation, drift against another."""
  import json
  from configs import common
  from gmix_jax import drift, workdir
  c = common.base()
  c.dataset.augment = 'cifar'
  old = json.loads(c.to_json())
  old['dataset']['augment'] = True
  (tmp_path / 'checkpoints').mkdir()
  (tmp_path / 'config.json').write_text(json.dumps(old))
  assert workdir.check_config(str(tmp_path), c) == {}
  c.dataset.augment = 'none'
  with pytest.raises(drift.ConfigDriftError, match=r'dataset.augment: "cifar" -> "none"'):
    workdir.check_config(str(tmp_path), c)


def test_stats_of_a_large_split_use_a_fixed_sample(monkeypatch):
  split, pixels = png_split([(4, 4), (5, 3), (2, 6), (3, 3), (4, 2)])
  monkeypatch.setattr(stats, 'MAX_RECORDS', 3)
  chosen = np.sort(np.random.default_rng(0).choice(5, 3, replace=False))
  every = np.concatenate([pixels[i].reshape(-1, 3) for i in chosen]).astype(np.float64) / 255
  mean, std = stats.channel_stats(split)
  np.testing.assert_allclose(mean, every.mean(0), rtol=1e-6)
  np.testing.assert_allclose(std, every.std(0), rtol=1e-5)


def test_cifar_padding_is_the_mean_pixel_so_it_normalises_to_zero(tmp_path):
  """The host-side crop pads with the training set's mean colour: padding
  then normalises to 0 on device, as zero-padding the normalised image did
  when the crop ran on device (black would normalise to -mean/std)."""
  from configs import common
  from gmix_jax.data import inputs
  c = common.base()
  c.dataset.name, c.dataset.data_dir, c.dataset.augment = 'digits', str(tmp_path), 'cifar'
  ds = inputs.open_train_data(c)
  fill = np.asarray(ds.pad_fill(), np.float32)
  padded = np.asarray(ds.normalizer(fill.reshape(1, 1, 1, -1)))
  # Rounding the mean to a whole pixel value costs at most half a level.
  half_level = 0.5 / ds.train.pixel_max / ds.normalizer.std
  assert np.all(np.abs(padded) <= half_level + 1e-6)
  assert np.all(np.abs(np.asarray(ds.normalizer(np.zeros((1, 1, 1, fill.size))))) > 4 * half_level)


# -- A stored statistics file that cannot be right is named, before anything runs --------
@pytest.mark.parametrize('content,problem', [
    ('{"version": 1, "num_re', 'not valid JSON'),
    ('[1, 2]', 'expected a JSON object'),
    ('{"version": 1, "num_records": 4, "pixel_max": 255, "mean": [0.5, 0.5, 0.5], '
     '"std": [NaN, 0.2, 0.2]}', "'std' holds non-finite values"),
    ('{"version": 1, "num_records": 4, "pixel_max": 255, "mean": [0.5, 0.5, 0.5], '
     '"std": [1e-30, 0.2, 7.0]}', r"'std' \[1e-30, 0.2, 7.0\] is outside \[0, 0.5\]"),
    ('{"version": 1, "num_records": 4, "pixel_max": 255, "mean": [0.5, 0.5, 0.5], '
     '"std": [-0.1, 0.2, 0.2]}', "'std' .* is outside"),
    ('{"version": 1, "num_records": 4, "pixel_max": 255, "mean": [128, 0.5, 0.5], '
     '"std": [0.1, 0.2, 0.2]}', r"'mean' .* is outside \[0, 1\]"),
    ('{"version": 1, "num_records": 4, "pixel_max": 255, "mean": "zero", "std": [0.1]}',
     "'mean' must be a list of numbers"),
    ('{"version": 1, "num_records": 4, "pixel_max": 255, "mean": [0.5], "std": [0.1, 0.1]}',
     "'mean' has 1 channels but 'std' has 2"),
    ('{"version": 1, "num_records": 4, "pixel_max": 16, "mean": [0.5, 0.5, 0.5], '
     '"std": [0.1, 0.2, 0.2]}', "pixel_max 16 is not the dataset's 255"),
])
def test_a_bad_stats_file_is_named_with_how_to_rebuild_it(tmp_path, content, problem):
  split, _ = png_split([(5, 7), (9, 4), (3, 3), (6, 6)], tmp_path)
  path = tmp_path / stats.STATS_FILE
  path.write_text(content)
  with pytest.raises(ValueError, match=problem) as e:
    stats.channel_stats(split)
  message = str(e.value)
  assert message.startswith(f'statistics file {path}: ') and 'delete it and rerun' in message


def test_a_stats_file_of_another_channel_count_is_refused(tmp_path):
  split, pixels = png_split([(5, 7), (9, 4)], tmp_path)
  stats.channel_stats(split)                           # stored: 3 channels
  assert stats.channel_stats(split, channels=3)[0].shape == (3,)
  with pytest.raises(ValueError, match=r"statistics of 3 channel\(s\), the dataset's examples "
                                       r'have 1. It is computed .* delete it'):
    stats.channel_stats(split, channels=1)
  # A stale file (another record count) is recomputed, not refused.
  (tmp_path / stats.STATS_FILE).write_text(
      '{"version": 1, "num_records": 99, "pixel_max": 255, "mean": [9], "std": [9]}')
  every = np.concatenate([x.reshape(-1, 3) for x in pixels]).astype(np.float64) / 255
  np.testing.assert_allclose(stats.channel_stats(split, channels=3)[0], every.mean(0), rtol=1e-6)
