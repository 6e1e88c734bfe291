"""Input throughput: decode -> random-resized crop -> flip -> batch, images/s.

  python experiments/bench_input.py                       # 0, 1, 2 workers
  python experiments/bench_input.py --workers 1,2,4,8,16 --label gpu16   # 16 cores
  python experiments/bench_input.py --workers 1 --decoders fast,simplejpeg,pil \
      --psnr_crops 400 --label cpu2_fast            # dataset.decode='fast' (OpenCV)

ImageNet-like records are generated first (deterministic): ``--images``
distinct 500 x 375 RGB JPEGs at quality 90 of a smooth colour pattern plus
Gaussian noise (sigma 28), about 110 KB each (the mean is measured and
written), stored as one array_record file of `gmix_jax.data.jpeg_sources`
records. Each setting runs the library's training stream,
`gmix_jax.data.pipeline.train_batches` (the trainer's own input path) over a
`sources.Split` of these records: ``MapDataset.range(steps).map(batch at
step s) -> to_iter_dataset(one thread) -> mp_prefetch(N workers)`` (no
``mp_prefetch`` for 0 workers: one thread of the main process does the
work), where a batch is an epoch-permutation slice, one ``__getitems__``
read, the ``inception`` training transform of `gmix_jax.data.image_ops` per
record at ``--size`` (224: decode, crop, bilinear resize, flip), and a ``np.stack`` into uint8 ``[B, 224, 224, 3]``. One worker is one
process with one thread, so images/s per worker is a per-core figure. Each
worker count runs ``--repeats`` times per ``--decoders`` entry
(`gmix_jax.data.fast_jpeg`: ``simplejpeg``, the default, and ``pil``, the
fallback; ``fast``: the opt-in ``dataset.decode='fast'``, `fast_resize`,
with OpenCV installed), the decoders alternating; rows give medians over the repeats and
the median per-repeat ratio of CPU rates (`pipeline_rows`).

Timing: ``--warmup`` batches (worker start-up, and long enough to drain the
batches buffered meanwhile, so the timed part is steady state), then the
next ``--batches`` batches are timed with ``time.perf_counter``; images/s =
images / seconds, and per worker = that / N. On a shared machine a process
may get only part of a core, so CPU time is read too (psutil: this process
and its worker processes, user + system, over the timed window):
``images_per_worker_cpu_s`` = images / the workers' CPU seconds (the main
process's for 0 workers) is what one worker does with a whole core. Also timed, in the main
process without grain: full decode only, and the transform alone (so the
cost of grain and of batching can be read off), per wall and per CPU second,
with each decoder (`time_in_process`); with OpenCV installed, also the three
transforms alternated record by record (`time_paired`) and the PSNR of
``dataset.decode='fast'`` on two photographs (`photo_psnr`). Results are merged into
``--out`` under ``--label`` (one entry per machine).
"""
from __future__ import annotations

import argparse
import importlib.util
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


def make_dataset(path: str, workers: int, batch: int, size: int,
                 seed: int = 0, steps: int = 1 << 30, decode: str = 'exact'):
  """The library's training stream (`pipeline.train_batches`) over the
  records at ``path``, Inception crops at ``size`` (``decode``:
  ``dataset.decode``); close it when done."""
  from gmix_jax.data import jpeg_sources
  from gmix_jax.data import pipeline
  from gmix_jax.data import sources
  split = sources.Split('bench_jpeg', 'train',
                        jpeg_sources.JpegRecordSource(path), num_classes=1000,
                        pixel_max=255, channels=3)
  return pipeline.train_batches(
      split, None, global_batch=batch, seed=seed, num_steps=steps,
      augment='inception', image_size=size, workers=workers, decode=decode)


def time_pipeline(path: str, workers: int, batch: int, size: int,
                  warmup: int, batches: int, decode: str = 'exact') -> dict:
  with make_dataset(path, workers, batch, size, decode=decode) as it:
    for _ in range(warmup):
      b = next(it)
    assert b['x'].shape == (batch, size, size, 3), b['x'].shape
    assert b['x'].dtype == np.uint8
    start, cpu0 = time.perf_counter(), cpu_seconds()
    for _ in range(batches):
      next(it)
    seconds = time.perf_counter() - start
    cpu1 = cpu_seconds()
  images = batch * batches
  rate = images / seconds
  row = {'workers': workers, 'images_per_s': round(rate, 1),
         'images_per_s_per_worker': round(rate / max(workers, 1), 1),
         'seconds': round(seconds, 2), 'images': images}
  if cpu0 is not None:
    main, kids = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    row.update(cpu_s_main=round(main, 2), cpu_s_workers=round(kids, 2),
               images_per_worker_cpu_s=round(images / (kids if workers
                                                       else main), 1))
  return row


def set_decoder(name: str) -> str:
  """Selects the library's JPEG decoder in this process and in worker
  processes started after the call (`fast_jpeg`: 'simplejpeg' or 'pil';
  'fast': simplejpeg with ``dataset.decode='fast'``, `fast_resize`);
  returns the ``dataset.decode`` value to run with."""
  from gmix_jax.data import fast_jpeg
  decode = 'fast' if name == 'fast' else 'exact'
  name = 'simplejpeg' if name == 'fast' else name
  os.environ[fast_jpeg.ENV] = name
  fast_jpeg.simplejpeg = fast_jpeg._load_simplejpeg()  # pylint: disable=protected-access
  assert fast_jpeg.decoder() == name, f'{name} is not installed'
  return decode


def psnr(a: np.ndarray, b: np.ndarray) -> float:
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return float('inf') if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def time_in_process(path: str, size: int, n: int = 64, rounds: int = 9,
                    psnr_crops: int = 16) -> dict:
  """Decode alone and the transform alone, main process, no grain.

  Kinds: ``decode_pil`` (PIL's decode into an array), ``decode_simplejpeg``;
  the library's ``inception`` training transform with each decoder
  (``transform_pil``: PIL decodes, crops, resizes, flips;
  ``transform_simplejpeg``: the default, `fast_jpeg` decodes into a PIL image
  without a copy, then the same crop, resize and flip),
  ``transform_fastdct``, the default with libjpeg-turbo's fast integer IDCT
  (not the library's: it changes pixels; its PSNR against PIL is reported),
  and, with OpenCV installed, the opt-in ``dataset.decode='fast'``
  (`fast_resize`: simplejpeg's decode, OpenCV's resize), as is
  (``transform_fast``) and after a fast-IDCT decode (``transform_fast_fastdct``),
  and OpenCV's plain ``INTER_AREA`` / ``INTER_LINEAR`` resize of the crop
  (``transform_cv2_area`` / ``transform_cv2_linear``: PIL's filter not
  approximated; ``INTER_LINEAR`` aliases when it reduces).
  The kinds alternate in ``rounds`` rounds of ``n`` records (order flipped
  every round); figures are medians over rounds, and ``*_over_pil_cpu`` is
  the median of the per-round ratios of CPU time per image of a transform to
  PIL's (< 1: cheaper). ``*_identical`` / ``*_min_psnr_db`` /
  ``*_median_psnr_db``: the outputs of ``psnr_crops`` random crops (cycling
  the records) against PIL's under the same generator.
  """
  from PIL import Image
  import simplejpeg
  from gmix_jax.data import fast_jpeg
  from gmix_jax.data import image_ops
  from gmix_jax.data import jpeg_sources
  src = jpeg_sources.JpegRecordSource(path)
  records = [src[i % len(src)] for i in range(n)]
  transform = image_ops.make_record_transform('inception', size, True, channels=3)

  open_rgb = fast_jpeg.open_rgb

  def fastdct_open(b):
    array = simplejpeg.decode_jpeg(b, 'RGBX', fastdct=True)
    return fast_jpeg._wrap_rgb(array, *array.shape[1::-1])  # pylint: disable=protected-access

  def with_decoder(module, opener):
    def run(r, rng):   # two attribute stores: negligible next to a decode
      fast_jpeg.simplejpeg, fast_jpeg.open_rgb = module, opener
      return transform(r, rng)['image']
    return run

  kinds = {'decode_pil': lambda r, rng: np.asarray(
               Image.open(io.BytesIO(r['image'])).convert('RGB')),
           'decode_simplejpeg': lambda r, rng: simplejpeg.decode_jpeg(r['image'], 'RGB'),
           'transform_pil': with_decoder(None, open_rgb),
           'transform_simplejpeg': with_decoder(simplejpeg, open_rgb),
           'transform_fastdct': with_decoder(simplejpeg, fastdct_open)}
  compared = ['transform_simplejpeg', 'transform_fastdct']
  if importlib.util.find_spec('cv2') is not None:
    kinds.update(opencv_kinds(size, simplejpeg))
    compared += [k for k in kinds if k not in compared and k.startswith('transform_')
                 and k != 'transform_pil']

  def per_second(fn):
    rng = np.random.default_rng(0)
    start, cpu = time.perf_counter(), time.process_time()
    for r in records:
      fn(r, rng)
    return n / (time.perf_counter() - start), n / (time.process_time() - cpu)

  out = {'rounds': rounds, 'records_per_round': n}
  crops = [(records[i % n], i) for i in range(psnr_crops)]
  ref = [kinds['transform_pil'](r, np.random.default_rng(i)) for r, i in crops]
  for k in compared:
    got = [kinds[k](r, np.random.default_rng(i)) for r, i in crops]
    out[f'{k}_identical'] = all(np.array_equal(a, b) for a, b in zip(got, ref))
    db = [psnr(a, b) for a, b in zip(got, ref)]
    out[f'{k}_min_psnr_db'] = round(float(min(db)), 2)
    out[f'{k}_median_psnr_db'] = round(float(np.median(db)), 2)
  runs = {k: [] for k in kinds}
  for i in range(rounds):
    for k in (list(kinds) if i % 2 == 0 else list(kinds)[::-1]):
      runs[k].append(per_second(kinds[k]))
  fast_jpeg.simplejpeg, fast_jpeg.open_rgb = simplejpeg, open_rgb
  med = lambda xs: round(float(np.median(xs)), 1)
  for k, xs in runs.items():
    out[f'{k}_per_s'] = med([x[0] for x in xs])
    out[f'{k}_per_cpu_s'] = med([x[1] for x in xs])
  for k in compared:
    out[f'{k}_over_pil_cpu'] = round(float(np.median(
        [p[1] / f[1] for f, p in zip(runs[k], runs['transform_pil'])])), 3)
  return out


def opencv_kinds(size: int, simplejpeg) -> dict:
  """The OpenCV transforms of `time_in_process` (``(record, rng) -> image``)."""
  import cv2
  from gmix_jax.data import fast_resize
  from gmix_jax.data import image_ops
  fast_resize.cv2_module()   # one thread, as in the library

  def crop_flip(resize, fastdct=False):
    def run(r, rng):
      array = simplejpeg.decode_jpeg(r['image'], 'RGB', fastdct=fastdct)
      box = image_ops.random_resized_crop_box(rng, *array.shape[:2])
      out = resize(array, box)
      return np.ascontiguousarray(out[:, ::-1] if rng.random() < 0.5 else out)
    return run

  def plain(interpolation):
    def resize(array, box):
      top, left, h, w = box
      return cv2.resize(array[top:top + h, left:left + w], (size, size),
                        interpolation=interpolation)
    return resize

  fast = lambda array, box: fast_resize.crop_resize(array, box, size)
  return {'transform_fast': crop_flip(fast),
          'transform_fast_fastdct': crop_flip(fast, fastdct=True),
          'transform_cv2_area': crop_flip(plain(cv2.INTER_AREA)),
          'transform_cv2_linear': crop_flip(plain(cv2.INTER_LINEAR))}


def time_paired(path: str, size: int, n: int = 1200, repeats: int = 3) -> dict:
  """``dataset.decode='fast'`` and the default against PIL, record by record.

  Each record goes through the three transforms back to back (PIL's decode,
  simplejpeg's, and 'fast'; order flipped every record, the same generator
  seed for the three), each timed in CPU seconds; per repeat the ratio of
  summed CPU times (PIL's / the other's: > 1 is faster). Alternating per
  record rather than per round keeps a shared machine's swings out of the
  ratio."""
  import simplejpeg
  from gmix_jax.data import fast_jpeg
  from gmix_jax.data import image_ops
  from gmix_jax.data import jpeg_sources
  src = jpeg_sources.JpegRecordSource(path)
  records = [src[i % len(src)] for i in range(min(n, 256))]
  exact = image_ops.make_record_transform('inception', size, True, channels=3)
  fast = image_ops.make_record_transform('inception', size, True, channels=3,
                                         decode_mode='fast')

  def pil(r, rng):
    fast_jpeg.simplejpeg = None
    try:
      return exact(r, rng)
    finally:
      fast_jpeg.simplejpeg = simplejpeg

  kinds = {'pil': pil, 'simplejpeg': exact, 'fast': fast}
  out = {'records': n, 'repeats': repeats}
  ratios = {k: [] for k in ('simplejpeg', 'fast')}
  for _ in range(repeats):
    cpu = dict.fromkeys(kinds, 0.0)
    for j in range(n):
      for k in (list(kinds) if j % 2 == 0 else list(kinds)[::-1]):
        rng, start = np.random.default_rng(j), time.process_time()
        kinds[k](records[j % len(records)], rng)
        cpu[k] += time.process_time() - start
    for k in ratios:
      ratios[k].append(round(cpu['pil'] / cpu[k], 3))
  for k, xs in ratios.items():
    out[f'{k}_over_pil_cpu_runs'] = xs
    out[f'{k}_over_pil_cpu'] = round(float(np.median(xs)), 3)
  return out


def time_batches_paired(path: str, size: int, batch: int = 64, rounds: int = 8
                        ) -> dict:
  """The trainer's batch function (`pipeline.TrainBatch`: read, transform each
  record, stack), main process, no grain, under four settings alternated batch
  by batch (order flipped every round, the same steps for all):
  ``{pil, default}`` decoder x ``{batched, single}`` reads, where ``batched``
  is array_record's one ``__getitems__`` call for the batch (what the library
  did before) and ``single`` one read per record (what it does), and
  ``rgbx``: the default decoder, single reads, the decoded image wrapped as a
  4-band ``RGBX`` PIL image (before) instead of ``RGB`` (`fast_jpeg._wrap_rgb`).
  Every setting's batches are checked equal to ``pil_single``'s. Reported:
  images per CPU-second (median over rounds) and the median per-round ratio
  of each setting's CPU time to ``pil_single``'s (< 1: cheaper)."""
  from PIL import Image
  import simplejpeg
  from gmix_jax.data import fast_jpeg
  from gmix_jax.data import jpeg_sources
  from gmix_jax.data import pipeline
  from gmix_jax.data import sources
  src = jpeg_sources.JpegRecordSource(path)
  split = sources.Split('bench_jpeg', 'train', src, num_classes=1000, pixel_max=255,
                        channels=3)
  fn = pipeline.TrainBatch(split, None, batch, 0,
                           pipeline.record_transform(split, 'inception', size, True))
  wrap_rgb = fast_jpeg._wrap_rgb  # pylint: disable=protected-access
  wrap_rgbx = lambda a, w, h: Image.frombuffer('RGBX', (w, h), a, 'raw', 'RGBX', 0, 1)
  batched = lambda ids: [jpeg_sources.decode_record(r)
                         for r in src._source.__getitems__(ids)]  # pylint: disable=protected-access
  single = jpeg_sources.JpegRecordSource.__getitems__.__get__(src)
  settings = {'pil_batched': (None, batched, wrap_rgb),
              'pil_single': (None, single, wrap_rgb),
              'default_batched_rgbx': (simplejpeg, batched, wrap_rgbx),
              'default_batched': (simplejpeg, batched, wrap_rgb),
              'default_single_rgbx': (simplejpeg, single, wrap_rgbx),
              'default_single': (simplejpeg, single, wrap_rgb)}

  def run(name, step):
    decoder, read, wrap = settings[name]
    fast_jpeg.simplejpeg, src.__getitems__, fast_jpeg._wrap_rgb = decoder, read, wrap
    start = time.process_time()
    x = fn(step)['x']
    return time.process_time() - start, x

  cpu = {k: [] for k in settings}
  try:
    run('pil_single', 0)                       # opens the file, warms caches
    for i in range(rounds):
      step = 1 + i
      ref = None
      for k in (list(settings) if i % 2 == 0 else list(settings)[::-1]):
        seconds, x = run(k, step)
        cpu[k].append(seconds)
        ref = x if ref is None else ref
        assert np.array_equal(x, ref), (k, step)
  finally:
    fast_jpeg.simplejpeg, fast_jpeg._wrap_rgb = simplejpeg, wrap_rgb
    del src.__getitems__
  out = {'batch': batch, 'rounds': rounds, 'identical': True}
  for k, xs in cpu.items():
    out[f'{k}_per_cpu_s'] = round(float(np.median([batch / t for t in xs])), 1)
    out[f'{k}_over_pil_single_cpu'] = round(float(np.median(
        [t / p for t, p in zip(xs, cpu['pil_single'])])), 3)
  return out


def photo_psnr(size: int, crops: int = 300) -> dict:
  """PSNR of ``dataset.decode='fast'`` against the exact path on two
  photographs that scikit-learn ships (427 x 640 JPEGs), ``crops`` Inception
  crops each (generator seeds 0..crops-1): worst and median per photo."""
  import sklearn.datasets
  from gmix_jax.data import image_ops
  root = os.path.join(os.path.dirname(sklearn.datasets.__file__), 'images')
  out = {}
  for name in ('china.jpg', 'flower.jpg'):
    with open(os.path.join(root, name), 'rb') as f:
      data = f.read()
    db = [psnr(image_ops.inception_train(data, np.random.default_rng(s), size, 3, 'fast'),
               image_ops.inception_train(data, np.random.default_rng(s), size, 3, 'exact'))
          for s in range(crops)]
    out[name] = {'crops': crops, 'min_psnr_db': round(float(min(db)), 2),
                 'median_psnr_db': round(float(np.median(db)), 2)}
  return out


def pipeline_rows(path: str, workers: int, args) -> list[dict]:
  """One row per decoder for ``workers``: ``--repeats`` runs of each, the
  decoders alternating (order flipped every repeat), medians over the runs
  (the per-run figures kept), and for the default decoder the median of the
  per-repeat ratios of its images per worker CPU-second to PIL's."""
  decoders = args.decoders.split(',')
  runs = {d: [] for d in decoders}
  for rep in range(args.repeats):
    for decoder in (decoders if rep % 2 == 0 else decoders[::-1]):
      decode = set_decoder(decoder)
      runs[decoder].append(time_pipeline(path, workers, args.batch, args.size,
                                         args.warmup or 4 + 3 * workers,
                                         args.batches or 16 + 8 * workers, decode))
      print(decoder, runs[decoder][-1], flush=True)
  rows = []
  for decoder, xs in runs.items():
    row = {'decoder': decoder, 'workers': workers, 'repeats': len(xs)}
    for key in xs[0]:
      if key != 'workers':
        row[key] = round(float(np.median([x[key] for x in xs])), 2)
    key = 'images_per_worker_cpu_s'
    if key in xs[0]:
      row[key + '_runs'] = [x[key] for x in xs]
      if decoder != 'pil' and 'pil' in runs:
        row[key + '_over_pil'] = round(float(np.median(
            [x[key] / p[key] for x, p in zip(xs, runs['pil'])])), 3)
    rows.append(row)
    print(row, flush=True)
  return rows


def cpu_seconds() -> tuple[float, float] | None:
  """CPU seconds (user + system) of this process and of its live children
  (the grain workers); None without psutil."""
  try:
    import psutil
  except ImportError:
    return None
  me = psutil.Process()
  kids = 0.0
  for child in me.children(recursive=True):
    try:
      t = child.cpu_times()
      kids += t.user + t.system
    except psutil.Error:
      pass
  t = me.cpu_times()
  return t.user + t.system, kids


def machine() -> dict:
  return {'platform': platform.platform(), 'python': platform.python_version(),
          'cpus': os.cpu_count(),
          'load_avg_at_start': [round(x, 2) for x in os.getloadavg()]}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workers', default='0,1,2')
  p.add_argument('--decoders', default='simplejpeg,pil',
                 help='JPEG decoders of the pipeline rows, in this order per '
                 'worker count (simplejpeg: the library default; fast: '
                 "dataset.decode='fast', needs OpenCV)")
  p.add_argument('--psnr_crops', type=int, default=16,
                 help='random crops compared with the PIL path (PSNR)')
  p.add_argument('--repeats', type=int, default=3,
                 help='pipeline runs per decoder and worker count (alternating)')
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
           'batch': args.batch,
           'in_process': time_in_process(path, args.size, psnr_crops=args.psnr_crops),
           'pipeline': []}
  print(entry['in_process'], flush=True)
  entry['batches_paired'] = time_batches_paired(path, args.size, args.batch)
  print(entry['batches_paired'], flush=True)
  if importlib.util.find_spec('cv2') is not None:
    entry['paired_per_record'] = time_paired(path, args.size)
    print(entry['paired_per_record'], flush=True)
    entry['fast_psnr_photos'] = photo_psnr(args.size)
    print(entry['fast_psnr_photos'], flush=True)
  for w in [int(x) for x in args.workers.split(',')]:
    entry['pipeline'].extend(pipeline_rows(path, w, args))
  set_decoder('simplejpeg')

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
