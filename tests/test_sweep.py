"""The sweep pipeline end to end on the smoke grid: one run trains, is
measured and recorded; a rerun skips it; report.py turns the records into
tables. Also the grids' budgets and the filter."""
import json
import os

import pytest

from experiments import grids, report, sweep

RECORD_FIELDS = ('run_id', 'grid', 'dataset', 'method', 'seed', 'examples_per_class', 'config',
                 'final_test_accuracy', 'best_test_accuracy', 'final_test_loss', 'ece',
                 'lambda_max', 'rho_sharpness', 'wall_time_sec', 'steps', 'target_steps',
                 'git_commit', 'device', 'jax_version', 'curve', 'analysis')


def test_grids_share_one_budget_and_skip_absent_methods():
  runs, notes = grids.get_grid('benchmark', methods=('erm', 'gmix', 'no_such_method'))
  assert {r.method for r in runs} == {'erm', 'gmix'} and 'no_such_method' in notes[0]
  assert len({(r.steps, r.batch_size) for r in runs}) == 1
  assert len({r.run_id for r in runs}) == len(runs)
  abl, _ = grids.get_grid('ablation')
  assert len({r.run_id for r in abl}) == len(abl)
  assert {r.examples_per_class for r in abl} == {50}


def test_smoke_run_record_resume_and_report(tmp_path, capsys):
  results, scratch = tmp_path / 'results', tmp_path / 'scratch'
  argv = ['--grid', 'smoke', '--workers', '0', '--filter', 'erm-s0$', '--results', str(results),
          '--scratch', str(scratch), '--data-dir', str(tmp_path / 'data'), '--steps', '6',
          '--power-iters', '3', '--ascent-steps', '1', '--eval-examples', '64',
          '--no-compile-cache']
  assert sweep.main(argv) == 0
  path = results / 'smoke' / 'digits-n10-erm-s0.json'
  rec = json.loads(path.read_text())
  for field in RECORD_FIELDS:
    assert field in rec, field
  assert rec['steps'] == 6 and rec['num_train'] == 100 and rec['config']['seed'] == 0
  assert 0.0 <= rec['final_test_accuracy'] <= 1.0 and rec['lambda_max'] > 0
  assert rec['rho_sharpness'] >= 0 and len(rec['analysis']['lambda_trace']) == 4
  workdir = rec['workdir']
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    tests = [r for r in map(json.loads, f) if r['split'] == 'test']
  assert [r['step'] for r in tests] == [6]        # eval_every_epochs: only at the end
  assert not os.path.exists(os.path.join(workdir, 'checkpoints'))   # not a landscape run

  capsys.readouterr()
  assert sweep.main(argv) == 0                    # resumable: the record is there
  assert '0 to run' in capsys.readouterr().out

  out = tmp_path / 'RESULTS.md'
  assert report.main(['--results', str(results), '--grids', 'smoke', '--out', str(out),
                      '--plots', str(tmp_path / 'plots'), '--readme', '']) == 0
  text = out.read_text()
  assert '### digits, 10 per class' in text and '| ERM | 1 |' in text
  assert os.path.exists(tmp_path / 'plots' / 'acc_vs_size_digits.png')


def test_report_bolds_best_and_computes_claims(tmp_path):
  def rec(method, acc, lam, seed, grid='benchmark', variant=''):
    return {'run_id': f'{method}{variant}{seed}', 'grid': grid, 'dataset': 'd', 'size': '5',
            'num_train': 50, 'method': method, 'variant': variant, 'seed': seed,
            'final_test_accuracy': acc, 'ece': 0.1, 'lambda_max': lam, 'rho_sharpness': 0.01,
            'wall_time_sec': 1.0, 'target_steps': 10}
  recs = [rec('mixup', 0.70, 5.0, 0), rec('mixup', 0.72, 5.0, 1), rec('sam', 0.75, 4.0, 0),
          rec('sam', 0.77, 4.0, 1), rec('gmix', 0.80, 2.0, 0), rec('gmix', 0.82, 2.0, 1),
          rec('bgmix', 0.90, 2.0, 0, 'ablation', 'gamma0.25'),
          rec('bgmix', 0.91, 2.0, 1, 'ablation', 'gamma0.25')]
  for r in recs:
    (tmp_path / r['grid']).mkdir(exist_ok=True)
    (tmp_path / r['grid'] / f"{r['run_id']}.json").write_text(json.dumps(r))
  out = tmp_path / 'R.md'
  readme = tmp_path / 'README.md'
  readme.write_text(f'# top\n{report.README_BEGIN}\nstale\n{report.README_END}\n## next\n')
  assert report.main(['--results', str(tmp_path), '--out', str(out),
                      '--plots', str(tmp_path / 'plots'), '--readme', str(readme)]) == 0
  block = readme.read_text()
  assert block.startswith('# top\n') and block.endswith(f'{report.README_END}\n## next\n')
  assert 'stale' not in block and '| G-Mix | **81.0 ± 1.4** |' in block
  assert 'G-Mix beats max(Mixup, SAM) in test accuracy: held in 1/1' in block
  text = out.read_text()
  assert '| G-Mix | 2 | **81.00 ± 1.41**' in text
  assert 'G-Mix beats max(Mixup, SAM) in test accuracy: held in 1/1' in text
  assert 'vs SAM: **yes** (+5.00 pts' in text
  ablation = text.split('## Ablation')[1]        # variants + the benchmark's references
  assert '| BG-Mix [gamma0.25] | 2 | **90.50 ± 0.71**' in ablation and '| G-Mix | 2 |' in ablation


def test_eval_subset_is_fixed_and_stratified():
  import numpy as np
  y = np.repeat(np.arange(10), 100)                 # sorted by class, as mnist_subset's test split
  x = np.arange(1000)
  xs, ys = sweep.eval_subset(x, y, 512)
  assert xs.shape == (512,) and np.bincount(ys, minlength=10).min() >= 51
  np.testing.assert_array_equal(xs, sweep.eval_subset(x, y, 512)[0])
  assert sweep.eval_subset(x, y, 5000)[0].shape == (1000,)


def test_ascent_section_differences_by_hand(tmp_path):
  """``--section ascent``: mean ± s.e. per estimator, Δ = difference of the
  means ± 2 s.e. of the difference (s.e. = std/√n, ddof 1) with its verdict,
  the paired cost × SAM from the bench JSON; the rest of the file is kept."""
  def rec(variant, seed, acc, ece):
    return {'run_id': f'{variant}{seed}', 'grid': 'ascent', 'dataset': 'd', 'size': '5',
            'method': 'bgmix', 'variant': variant, 'seed': seed, 'final_test_accuracy': acc,
            'ece': ece, 'lambda_max': 3.0, 'git_commit': 'abcdef0123', 'device': 'cpu:cpu'}
  (tmp_path / 'ascent').mkdir()
  for r in [rec('est-shared', 0, 0.80, 0.05), rec('est-shared', 1, 0.82, 0.05),
            rec('est-shared_prev', 0, 0.81, 0.09), rec('est-shared_prev', 1, 0.83, 0.09)]:
    (tmp_path / 'ascent' / f"{r['run_id']}.json").write_text(json.dumps(r))
  bench = {'args': {'methods': 'bgmix:shared,bgmix:shared_prev', 'baseline': 'sam', 'pairs': 3,
                    'width': 32, 'batch': '128'},
           'rows': [{'method': 'bgmix:shared_prev', 'load_before': 2.0, 'load_after': 3.0,
                     'vs': {'sam': {'cpu_ratio': [1.2, 1.25, 1.3]}}}]}
  (tmp_path / 'bench.json').write_text(json.dumps(bench))
  out = tmp_path / 'R.md'
  out.write_text('# kept\n')
  assert report.main(['--results', str(tmp_path), '--out', str(out), '--section', 'ascent',
                      '--bench-ascent', str(tmp_path / 'bench.json')]) == 0
  text = out.read_text()
  assert text.startswith('# kept\n') and report.ASCENT_END in text
  # Accuracy: means 81 and 82 %, s.e. 1 % each: Δ +1.00 ± 2·√2 = 2.83, within.
  # ECE: equal seeds, s.e. 0: Δ +4.00 ± 0.00, beyond.
  assert ('| BG-Mix, `shared_prev` | 2 | 82.00 ± 1.00 | +1.00 ± 2.83 (within 2 s.e.) | '
          '9.00 ± 0.00 | +4.00 ± 0.00 (beyond 2 s.e.) | 3.00 ± 0.00 | 1.25 (1.20-1.30) |') in text
  assert '| BG-Mix, `shared` | 2 | 81.00 ± 1.00 | — |' in text and 'load average 2–3' in text


def write_records(root, rec, runs):
  """One run record per entry of ``runs`` (grid -> list of fields over ``rec``),
  as the sweep writes them: ``root/GRID/I.json``."""
  for grid, rs in runs.items():
    (root / grid).mkdir()
    for i, r in enumerate(rs):
      (root / grid / f'{i}.json').write_text(json.dumps({**rec, **r, 'grid': grid,
                                                         'run_id': f'{grid}{i}'}))


def test_every_section_rewrites_its_own_block_in_place(tmp_path):
  """Each ``--section`` in ``report.SECTIONS`` appends its marked block once,
  then replaces it where it stands; the other blocks and the rest are kept."""
  rec = {'dataset': 'd', 'size': '5', 'seed': 0, 'final_test_accuracy': 0.8, 'ece': 0.05,
         'lambda_max': 3.0, 'git_commit': 'abcdef0123', 'device': 'cpu:cpu'}
  runs = {'rules': [{'method': 'gmix', 'variant': ''}, {'method': 'mixup', 'variant': ''}],
          'ascent': [{'method': 'bgmix', 'variant': 'est-shared'}]}
  assert set(runs) == set(report.SECTIONS)
  write_records(tmp_path, rec, runs)
  out = tmp_path / 'R.md'
  out.write_text('# kept\n')
  run = lambda name: report.main(['--results', str(tmp_path), '--out', str(out), '--section',
                                  name, f'--bench-{name}', str(tmp_path / 'absent.json')])
  for name in report.SECTIONS:
    assert run(name) == 0
  first = out.read_text()
  for name in reversed(report.SECTIONS):
    assert run(name) == 0
  assert out.read_text() == first and first.startswith('# kept\n')
  at = [first.index(m) for s in report.SECTIONS.values() for m in (s.begin, s.end)]
  assert at == sorted(at) and all(first.count(m) == 1 for s in report.SECTIONS.values()
                                  for m in (s.begin, s.end))


def test_the_whole_report_writes_every_section_in_table_order(tmp_path):
  """A plain ``report.py`` run rewrites --out from scratch and then adds every
  ``SECTIONS`` block that has records, in the table's order, so the file does
  not depend on the order earlier ``--section`` runs were made in."""
  rec = {'dataset': 'd', 'size': '5', 'num_train': 50, 'seed': 0, 'final_test_accuracy': 0.8,
         'ece': 0.05, 'lambda_max': 3.0, 'rho_sharpness': 0.01, 'wall_time_sec': 1.0,
         'target_steps': 10, 'git_commit': 'abcdef0123', 'device': 'cpu:cpu'}
  runs = {'benchmark': [{'method': 'erm', 'variant': ''}, {'method': 'gmix', 'variant': ''}],
          'rules': [{'method': 'gmix', 'variant': ''}, {'method': 'mixup', 'variant': ''}],
          'ascent': [{'method': 'bgmix', 'variant': 'est-shared'}]}
  write_records(tmp_path, rec, runs)
  out = tmp_path / 'R.md'
  args = ['--results', str(tmp_path), '--out', str(out), '--plots', str(tmp_path / 'plots'),
          '--readme', '', '--grids', 'benchmark']
  args += [a for name in report.SECTIONS for a in (f'--bench-{name}', str(tmp_path / 'x.json'))]
  out.write_text('# an older file\n')
  for name in reversed(report.SECTIONS):         # the order that used to swap the blocks
    report.main(args[:4] + ['--section', name] + args[-6:])
  assert report.main(args) == 0
  text = out.read_text()
  at = [text.index(m) for s in report.SECTIONS.values() for m in (s.begin, s.end)]
  assert at == sorted(at) and all(text.count(m) == 1 for s in report.SECTIONS.values()
                                  for m in (s.begin, s.end))
  assert report.main(args) == 0 and out.read_text() == text
