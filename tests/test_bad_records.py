"""Records that cannot be read or decoded: ``dataset.bad_records='error'|'skip'``.

A small JPEG set written here as array_record (the format of mnist_jpeg and of
tfds's ImageNet) holds one record whose bytes are not a JPEG, or a file whose
bytes are corrupted on disk. 'error' names the dataset, split and record;
'skip' replaces the record by the next good one, checked against a plan
computed here from `batching` and PIL, the same in every run, on a resume
and with worker processes.
"""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from gmix_jax import main
from gmix_jax.data import batching
from gmix_jax.data import jpeg_sources
from gmix_jax.data import pipeline
from gmix_jax.data import sources
from gmix_jax.data import stats

SIDE = 8


def jpeg(rng) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)).save(buf, format='JPEG')
  return buf.getvalue()


def write_split(path, n, bad=(), seed=0):
  """``n`` JPEG records, label i % 3; those in ``bad`` hold bytes that are no image."""
  rng = np.random.default_rng(seed)
  payloads = [b'not a jpeg, just bytes' if i in bad else jpeg(rng) for i in range(n)]
  jpeg_sources.write_records(str(path), [jpeg_sources.encode_record(p, i % 3, i)
                                         for i, p in enumerate(payloads)])
  return payloads


def corrupt(path, payload) -> None:
  """Flips bytes inside ``payload``'s stored copy (the chunk checksum then fails)."""
  data = bytearray(open(path, 'rb').read())
  tail = payload[-60:-20]                       # image data: the headers are alike
  k = data.find(tail)
  assert k > 0 and data.count(tail) == 1
  for j in range(k, k + 20):
    data[j] ^= 0xFF
  open(path, 'wb').write(bytes(data))


def split_of(path, split='train', name='toyjpeg'):
  return sources.Split(name, split, jpeg_sources.JpegRecordSource(str(path)), 3, 255,
                       fixed_stats=((0.5,) * 3, (0.25,) * 3), channels=3)


def decoded(payloads, i):
  return np.asarray(Image.open(io.BytesIO(payloads[i])).convert('RGB'))


def stream(split, policy, start=0, stop=10, workers=0, batch=8, seed=3):
  with pipeline.train_batches(split, None, global_batch=batch, seed=seed, num_steps=stop,
                              start_step=start, workers=workers, bad_records=policy) as b:
    return list(b)


@pytest.mark.parametrize('workers', [0, 2])
def test_error_names_the_dataset_split_and_record(tmp_path, workers):
  write_split(tmp_path / 'a.array_record', 20, bad={13})
  with pytest.raises(pipeline.BadRecordError,
                     match=r"dataset 'toyjpeg': train record 13 cannot be read or decoded "
                           r'\(UnidentifiedImageError: .*bad_records=skip'):
    stream(split_of(tmp_path / 'a.array_record'), 'error', workers=workers)


def test_a_corrupted_file_names_the_record_whose_bytes_are_corrupted(tmp_path):
  path = tmp_path / 'a.array_record'
  payloads = write_split(path, 20)
  corrupt(path, payloads[7])
  src = jpeg_sources.JpegRecordSource(str(path))
  unreadable = []
  for i in range(20):                         # independently: which record fails alone
    try:
      src[i]
    except RuntimeError:
      unreadable.append(i)
  assert unreadable == [7]
  with pytest.raises(pipeline.BadRecordError,
                     match=r"train record 7 cannot be read or decoded \(RuntimeError: Corrupted"):
    stream(split_of(path), 'error')


def expected_skip(payloads, bad, step, n=20, batch=8, seed=3):
  """The batch of ``step`` under 'skip', computed from the plan: a bad record at
  position p is replaced by the first good one at p+1, p+2, ... (cyclically)."""
  spe = batching.steps_per_epoch(n, batch)
  pos = batching.batch_indices(n, batch, seed, step // spe, step % spe)
  out = []
  for p in pos:
    while p in bad:
      p = (p + 1) % n
    out.append(p)
  out = np.asarray(out)
  return out, np.stack([decoded(payloads, p) for p in out]), int(np.isin(pos, list(bad)).sum())


@pytest.mark.parametrize('kind', ['not_jpeg', 'corrupted'])
def test_skip_replaces_deterministically_and_counts(tmp_path, kind):
  path = tmp_path / 'a.array_record'
  bad = {4, 5} if kind == 'not_jpeg' else {4}       # two in a row: the next good one is 6
  payloads = write_split(path, 20, bad=bad if kind == 'not_jpeg' else ())
  if kind == 'corrupted':
    corrupt(path, payloads[4])
  split = split_of(path)
  full = stream(split, 'skip')
  assert sum(int(b['bad_records']) for b in full) > 0
  for step, b in enumerate(full):
    pos, x, count = expected_skip(payloads, bad, step)
    np.testing.assert_array_equal(b['index'], pos)
    np.testing.assert_array_equal(b['x'], x)
    np.testing.assert_array_equal(b['y'], pos % 3)
    assert int(b['bad_records']) == count
  # The same in a second run, from a resumed step, and in worker processes.
  for again in (stream(split, 'skip'), [None] * 6 + stream(split, 'skip', start=6),
                stream(split, 'skip', workers=2)):
    for b, ref in zip(again, full):
      if b is not None:
        for key in ('x', 'y', 'index', 'bad_records'):
          np.testing.assert_array_equal(b[key], ref[key])


def test_ordered_batches_mask_a_skipped_record_and_error_names_it(tmp_path):
  payloads = write_split(tmp_path / 't.array_record', 11, bad={2})
  split = split_of(tmp_path / 't.array_record', 'test')
  with pipeline.ordered_batches(split, global_batch=4, bad_records='skip') as batches:
    got = list(batches)
  mask = np.concatenate([b['mask'] for b in got])
  assert np.flatnonzero(~mask).tolist() == [2, 11]           # the bad record, the padding
  np.testing.assert_array_equal(got[0]['x'][2], decoded(payloads, 3))   # its substitute
  with pytest.raises(pipeline.BadRecordError, match=r"'toyjpeg': test record 2 cannot"):
    with pipeline.ordered_batches(split, global_batch=4) as batches:
      list(batches)


def test_statistics_name_a_bad_record_or_leave_it_out(tmp_path):
  payloads = write_split(tmp_path / 'a.array_record', 12, bad={5})
  split = sources.Split('toyjpeg', 'train', jpeg_sources.JpegRecordSource(
      str(tmp_path / 'a.array_record')), 3, 255, channels=3)
  with pytest.raises(pipeline.BadRecordError, match=r"'toyjpeg': train record 5 cannot be read"):
    stats.channel_stats(split)
  good = np.concatenate([decoded(payloads, i).reshape(-1, 3) for i in range(12) if i != 5]) / 255
  mean, std = stats.channel_stats(split, bad_records='skip')
  np.testing.assert_allclose(mean, good.mean(0), rtol=1e-5)
  np.testing.assert_allclose(std, good.std(0), rtol=1e-4)


# -- Through the trainer: one line, the checkpoint kept, then 'skip' resumes ------------
@pytest.fixture
def toyjpeg(tmp_path, monkeypatch):
  """``dataset.name='toyjpeg'``: 40 train records (record 29 not a JPEG), 16 test."""
  root = tmp_path / 'toy'
  root.mkdir()
  write_split(root / 'train.array_record', 40)
  write_split(root / 'test.array_record', 16, seed=1)
  def make(split, data_dir, download=False):
    del data_dir, download
    return sources.Split('toyjpeg', split,
                         jpeg_sources.JpegRecordSource(str(root / f'{split}.array_record')), 3,
                         255, meta_dir=str(root), channels=3)
  monkeypatch.setitem(jpeg_sources.SPLITS, 'toyjpeg', make)
  stats.channel_stats(make('train', None))         # prepared and measured while whole,
  return write_split(root / 'train.array_record', 40, bad={29})   # damaged later


def train(capsys, workdir, *flags):
  code = main.main(['--config=configs/mnist_subset.py:erm', f'--workdir={workdir}',
                    '--config.dataset.name=toyjpeg', '--config.batch_size=8',
                    '--config.num_epochs=3', '--config.checkpoint_every_steps=2',
                    '--config.log_every_steps=1', '--config.progress=false',
                    '--config.plots=false', '--config.model.kwargs.width=4', *flags])
  out = capsys.readouterr()
  return code, out.err


def train_records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  drop = ('wall_time_sec', 'timestamp', 'examples_per_sec')
  return [{k: v for k, v in r.items() if k not in drop} for r in records]


def test_trainer_stops_on_a_bad_record_keeps_its_checkpoint_and_skip_resumes(
    capsys, tmp_path, toyjpeg):
  spe = 40 // 8
  # Where record 29 is first met (the plan of seed 0) and how often in 3 epochs.
  steps = [e * spe + list(batching.epoch_permutation(40, 0, e)).index(29) // 8
           for e in range(3)]
  steps = [s for s, e in zip(steps, range(3)) if s < (e + 1) * spe]
  assert steps[0] >= 2, 'the plan must reach a checkpoint first'
  wd = tmp_path / 'wd'
  code, err = train(capsys, wd)
  kept = (steps[0] // 2) * 2
  assert code == 2 and err.count('\n') == 1, err
  assert err.startswith("error: dataset 'toyjpeg': train record 29 cannot be read or decoded "
                        '(UnidentifiedImageError'), err
  assert f'the last checkpoint (step {kept}) in {wd}/checkpoints was kept' in err
  assert str(kept) in os.listdir(wd / 'checkpoints')
  # Resumed with 'skip' (allowed: the steps so far saw good records only).
  code, err = train(capsys, wd, '--config.dataset.bad_records=skip')
  assert code == 0, err
  resumed = train_records(wd)
  # A fresh 'skip' run writes the same records: the replacement is deterministic
  # (the first launch's records, written under 'error', carry no count).
  code, err = train(capsys, tmp_path / 'fresh', '--config.dataset.bad_records=skip')
  assert code == 0, err
  fresh = train_records(tmp_path / 'fresh')
  for records in (resumed, fresh):
    counts = {r['step']: r.get('bad_records', 0) for r in records if r['split'] == 'train'}
    assert sum(counts.values()) == len(steps) and all(counts[s + 1] == 1 for s in steps)
  assert all(r['bad_records'] == 0 for r in fresh if r['split'] == 'test')
  assert ([{k: v for k, v in r.items() if k != 'bad_records'} for r in fresh] ==
          [{k: v for k, v in r.items() if k != 'bad_records'} for r in resumed])
