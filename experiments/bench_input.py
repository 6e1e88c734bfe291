"""Input throughput: decode -> random-resized crop -> flip -> batch, images/s.

  python experiments/bench_input.py                       # 0, 1, 2 workers
  python experiments/bench_input.py --workers 1,2,4,8,16 --label gpu16   # 16 cores

ImageNet-like records are generated first (deterministic): ``--images``
distinct 500 x 375 RGB JPEGs at quality 90 of a smooth colour pattern plus
Gaussian noise (sigma 28), about 110 KB each (the mean is measured and
written), stored as one array_record file of `gmix_jax.data.jpeg_sources`
records. Each setting runs the grain chain of the library's pipeline
(`gmix_jax.data.pipeline`): ``MapDataset.range(steps).map(batch at step s)
-> to_iter_dataset(one thread, 2 batches ahead) -> mp_prefetch(N workers,
2 batches each)`` (no ``mp_prefetch`` for 0 workers: one thread of the main
process does the work), where a batch is one ``__getitems__`` read, the
``inception`` training transform of `gmix_jax.data.image_ops` per record at
``--size`` (224: PIL draft-mode decode, crop, bilinear resize, flip), and a
``np.stack`` into uint8 ``[B, 224, 224, 3]``. One worker is one process with
one thread, so images/s per worker is a per-core figure.

Timing: ``--warmup`` batches (worker start-up, and long enough to drain the
batches buffered meanwhile, so the timed part is steady state), then the
next ``--batches`` batches are timed with ``time.perf_counter``; images/s =
images / seconds, and per worker = that / N. Also timed, in the main
process without grain: full decode only, and the transform alone (so the
cost of grain and of batching can be read off). Results are merged into
``--out`` under ``--label`` (one entry per machine).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

HEIGHT, WIDTH = 375, 500
QUALITY = 90
NOISE = 28.0


def make_jpeg(seed: int) -> bytes:
  """A 500 x 375 JPEG: per-channel sinusoidal gradient plus noise."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
  phase = rng.uniform(0, 1, 3)
  base = np.stack([
      127.5 * (1 + np.sin(2 * np.pi * (xx / WIDTH * (1 + c)
                                       + yy / HEIGHT * (2 - c) + phase[c])))
      for c in range(3)], -1)
  image = np.clip(base + rng.normal(0, NOISE, base.shape), 0, 255)
  buf = io.BytesIO()
  Image.fromarray(image.astype(np.uint8)).save(buf, format='JPEG',
                                               quality=QUALITY)
  return buf.getvalue()


def write_jpeg_records(path: str, num_records: int, distinct: int) -> float:
  """``num_records`` records cycling ``distinct`` JPEGs; returns mean bytes."""
  from gmix_jax.data import jpeg_sources
  pool = [make_jpeg(i) for i in range(min(distinct, num_records))]
  jpeg_sources.write_records(
      path, (jpeg_sources.encode_record(pool[i % len(pool)], i % 1000, i)
             for i in range(num_records)))
  return float(np.mean([len(p) for p in pool]))


class BatchAt:
  """Step ``s`` -> one host batch, like the library's pipeline: epoch
  ``e = s // steps_per_epoch`` is a permutation drawn from ``(seed, e)``; the
  batch's records are read in one ``__getitems__`` call, each transformed
  with its own generator from ``(seed, record, e)``, and stacked."""

  def __init__(self, path: str, batch: int, size: int, seed: int = 0):
    from gmix_jax.data import image_ops
    from gmix_jax.data import jpeg_sources
    self.source = jpeg_sources.JpegRecordSource(path)
    self.batch, self.seed = batch, seed
    self.steps_per_epoch = len(self.source) // batch
    self.transform = image_ops.make_record_transform(
        'inception', size, train=True, channels=3)

  def __call__(self, step: int) -> dict:
    epoch, k = divmod(int(step), self.steps_per_epoch)
    perm = np.random.default_rng([self.seed, epoch]).permutation(
        len(self.source))
    rows = perm[k * self.batch:(k + 1) * self.batch]
    out = [self.transform(r, np.random.default_rng([self.seed, int(i), epoch]))
           for i, r in zip(rows, self.source.__getitems__(rows.tolist()))]
    return {'image': np.stack([o['image'] for o in out]),
            'label': np.array([o['label'] for o in out])}


def make_dataset(path: str, workers: int, batch: int, size: int,
                 seed: int = 0):
  """The grain chain (module docstring) over the records at ``path``."""
  import grain
  ds = grain.MapDataset.range(0, 1 << 30).map(
      BatchAt(path, batch, size, seed)).to_iter_dataset(
          grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
  if workers:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=2))
  return ds


def time_pipeline(path: str, workers: int, batch: int, size: int,
                  warmup: int, batches: int) -> dict:
  it = iter(make_dataset(path, workers, batch, size))
  try:
    for _ in range(warmup):
      b = next(it)
    assert b['image'].shape == (batch, size, size, 3), b['image'].shape
    start = time.perf_counter()
    for _ in range(batches):
      next(it)
    seconds = time.perf_counter() - start
  finally:
    close = getattr(it, 'close', None)
    if close is not None:
      close()
  rate = batch * batches / seconds
  return {'workers': workers, 'images_per_s': round(rate, 1),
          'images_per_s_per_worker': round(rate / max(workers, 1), 1),
          'seconds': round(seconds, 2), 'images': batch * batches}


def time_in_process(path: str, size: int, n: int = 200) -> dict:
  """Decode alone and the transform alone, main process, no grain."""
  from PIL import Image
  from gmix_jax.data import image_ops
  from gmix_jax.data import jpeg_sources
  src = jpeg_sources.JpegRecordSource(path)
  records = [src[i % len(src)] for i in range(n)]
  start = time.perf_counter()
  for r in records:
    np.asarray(Image.open(io.BytesIO(r['image'])).convert('RGB'))
  decode = n / (time.perf_counter() - start)
  transform = image_ops.make_record_transform('inception', size, True,
                                              channels=3)
  rng = np.random.default_rng(0)
  start = time.perf_counter()
  for r in records:
    transform(r, rng)
  crop = n / (time.perf_counter() - start)
  return {'full_decode_per_s': round(decode, 1),
          'transform_per_s': round(crop, 1)}


def machine() -> dict:
  return {'platform': platform.platform(), 'python': platform.python_version(),
          'cpus': os.cpu_count(),
          'load_avg_at_start': [round(x, 2) for x in os.getloadavg()]}


def parse_flags_for_grain() -> None:
  """grain's mp_prefetch reads absl flags; outside absl.app.run they must
  be marked parsed (defaults) or it raises UnparsedFlagAccessError."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workers', default='0,1,2')
  p.add_argument('--images', type=int, default=256,
                 help='distinct JPEGs generated (the records cycle them)')
  p.add_argument('--records', type=int, default=4096)
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--size', type=int, default=224)
  p.add_argument('--warmup', type=int, default=0,
                 help='batches before timing (default: 4 + 3 per worker)')
  p.add_argument('--batches', type=int, default=0,
                 help='timed batches (default: 16 + 8 per worker)')
  p.add_argument('--data_dir', default=None,
                 help='where the records file goes (default: a temp dir)')
  p.add_argument('--label', default='cpu')
  p.add_argument('--out', default=os.path.join(os.path.dirname(__file__),
                                               'bench_input.json'))
  args = p.parse_args(argv)
  parse_flags_for_grain()

  tmp = None
  if args.data_dir is None:
    tmp = tempfile.TemporaryDirectory()
  data_dir = args.data_dir or tmp.name
  path = os.path.join(data_dir, f'bench_jpeg_{args.records}.array_record')
  start = time.perf_counter()
  mean_bytes = write_jpeg_records(path, args.records, args.images)
  print(f'{args.records} records ({args.images} distinct JPEGs, mean '
        f'{mean_bytes / 1e3:.1f} KB) in {time.perf_counter() - start:.1f} s',
        flush=True)

  entry = {'machine': machine(), 'command': 'python ' + ' '.join(
      [os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else argv)),
           'image': f'{WIDTH}x{HEIGHT} RGB JPEG q{QUALITY}',
           'mean_jpeg_bytes': round(mean_bytes), 'crop': args.size,
           'batch': args.batch, 'in_process': time_in_process(path, args.size),
           'pipeline': []}
  print(entry['in_process'], flush=True)
  for w in [int(x) for x in args.workers.split(',')]:
    row = time_pipeline(path, w, args.batch, args.size,
                        args.warmup or 4 + 3 * w,
                        args.batches or 16 + 8 * w)
    entry['pipeline'].append(row)
    print(row, flush=True)

  entry['machine']['load_avg_at_end'] = [round(x, 2) for x in os.getloadavg()]
  results = {}
  if os.path.exists(args.out):
    with open(args.out) as f:
      results = json.load(f)
  results[args.label] = entry
  with open(args.out, 'w') as f:
    json.dump(results, f, indent=1)
    f.write('\n')
  if tmp is not None:
    tmp.cleanup()


if __name__ == '__main__':
  main()
