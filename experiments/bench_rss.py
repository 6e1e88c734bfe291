"""Host memory does not grow with the dataset: peak RSS, 5,000 vs 50,000 records.

  python experiments/bench_rss.py                    # workers 0 and 2
  python experiments/bench_rss.py --sizes 5000,50000 --workers 0,2 --steps 20

For each size, an array_record file of `gmix_jax.data.jpeg_sources` records
is written (the ImageNet-like 500 x 375 JPEGs of `bench_input`, about 110
KB; the records cycle ``--distinct`` generated images, so 50,000 records
are about 5.5 GB on disk, removed afterwards). Then a fresh Python process
runs ``--steps`` training batches through the library's training stream
as `bench_input` does (`pipeline.train_batches`: epoch permutation,
batched read, Inception crop at 224, flip, stack; ``--workers``
processes) and reports its peak resident set
size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and that of its
largest worker (``RUSAGE_CHILDREN``, after the workers have exited). The
pass mark is that the larger dataset's peak is within 10 % of the smaller's.
Results are merged into ``--out`` under ``rss/<label>``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_input  # noqa: E402  pylint: disable=g-import-not-at-top


def child(path: str, workers: int, steps: int, batch: int) -> None:
  """Runs the short pipeline and prints peak RSS (MB) as one JSON line."""
  with bench_input.make_dataset(path, workers, batch, 224) as it:
    for _ in range(steps):
      b = next(it)
  assert b['x'].shape == (batch, 224, 224, 3)
  self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  kids_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
  print(json.dumps({'self_peak_mb': round(self_mb, 1),
                    'worker_peak_mb': round(kids_mb, 1)}))


def measure(path: str, workers: int, steps: int, batch: int) -> dict:
  env = dict(os.environ)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env['PYTHONPATH'] = repo + os.pathsep + env.get('PYTHONPATH', '')
  out = subprocess.run(
      [sys.executable, os.path.abspath(__file__), '--child', path,
       '--workers', str(workers), '--steps', str(steps), '--batch',
       str(batch)], env=env, check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--sizes', default='5000,50000')
  p.add_argument('--workers', default='0,2')
  p.add_argument('--steps', type=int, default=20)
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--distinct', type=int, default=64)
  p.add_argument('--data_dir', default=None)
  p.add_argument('--label', default='cpu')
  p.add_argument('--child', default=None, help=argparse.SUPPRESS)
  p.add_argument('--out', default=os.path.join(os.path.dirname(__file__),
                                               'bench_input.json'))
  args = p.parse_args(argv)
  if args.child:
    child(args.child, int(args.workers), args.steps, args.batch)
    return

  sizes = [int(x) for x in args.sizes.split(',')]
  workers = [int(x) for x in args.workers.split(',')]
  rows = []
  with tempfile.TemporaryDirectory(dir=args.data_dir) as tmp:
    for n in sizes:
      path = os.path.join(tmp, f'rss_{n}.array_record')
      start = time.perf_counter()
      mean_bytes = bench_input.write_jpeg_records(path, n, args.distinct)
      size_gb = os.path.getsize(path) / 1e9
      print(f'{n} records, {size_gb:.2f} GB, written in '
            f'{time.perf_counter() - start:.0f} s', flush=True)
      for w in workers:
        row = {'records': n, 'file_gb': round(size_gb, 2), 'workers': w,
               'mean_jpeg_bytes': round(mean_bytes),
               **measure(path, w, args.steps, args.batch)}
        rows.append(row)
        print(row, flush=True)
      os.remove(path)

  summary = {}
  for w in workers:
    peaks = {r['records']: r for r in rows if r['workers'] == w}
    small, large = peaks[min(sizes)], peaks[max(sizes)]
    for key in ('self_peak_mb', 'worker_peak_mb'):
      if small[key] > 0:
        summary[f'workers={w} {key} growth'] = round(
            large[key] / small[key] - 1, 4)
  print(summary)
  results = {}
  if os.path.exists(args.out):
    with open(args.out) as f:
      results = json.load(f)
  results.setdefault('rss', {})[args.label] = {
      'machine': bench_input.machine(),
      'command': 'python ' + ' '.join(
          [os.path.relpath(__file__)] + (sys.argv[1:] if argv is None
                                         else argv)),
      'steps': args.steps, 'batch': args.batch, 'crop': 224,
      'rows': rows, 'growth': summary}
  with open(args.out, 'w') as f:
    json.dump(results, f, indent=1)
    f.write('\n')


if __name__ == '__main__':
  main()
