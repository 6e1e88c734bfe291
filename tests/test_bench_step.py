"""experiments/bench_step.py: row specs and the paired timing's bookkeeping (no speed asserted)."""
import pytest

from experiments import bench_step


def test_parse_spec_overrides_and_estimator_shorthand():
  name, o = bench_step.parse_spec('bgmix:first_order:partition.gamma=0.25:method.sharpness.rule=asam',
                                  ['sharpness.rho=0.1'])
  assert name == 'bgmix'
  assert o == {'sensitivity': {'estimator': 'first_order'}, 'partition': {'gamma': 0.25},
               'sharpness': {'name': 'asam', 'rho': 0.1}}
  # The config's `sharpness.rule` is SharpnessRule's `name`: a rule row builds.
  rows = bench_step.expand_rows('gmix:sharpness.rule=looksam', [], 'shared', 1)
  assert rows[0][2]['sharpness'] == {'name': 'looksam'}
  with pytest.raises(ValueError, match='FIELD=VALUE'):
    bench_step.parse_spec('gmix:rho=0.1')


def test_expand_rows_estimators_and_chunk():
  rows = bench_step.expand_rows('sam,bgmix,dgmix:stale', [], 'per_example,shared', 4)
  assert [r[0] for r in rows] == ['sam', 'bgmix:per_example', 'bgmix:shared', 'dgmix:stale']
  chunks = {label: o['sensitivity']['chunk'] for label, _, o in rows}
  assert chunks == {'sam': 0, 'bgmix:per_example': 4, 'bgmix:shared': 0, 'dgmix:stale': 0}
  # --set reaches every row; an explicit chunk is kept.
  rows = bench_step.expand_rows('gmix,gmix:partition.rule=binary,bgmix:sensitivity.chunk=8',
                                ['sensitivity.estimator=first_order'], 'shared', 1)
  assert [(r[0], r[2]['sensitivity']) for r in rows] == [
      ('gmix', {'estimator': 'first_order', 'chunk': 0}),
      ('gmix:partition.rule=binary', {'estimator': 'first_order', 'chunk': 0}),
      ('bgmix:sensitivity.chunk=8', {'estimator': 'first_order', 'chunk': 8})]


def test_paired_alternates_order_and_takes_per_pair_ratios(monkeypatch):
  calls = []
  # Fake clocks: the baseline step costs 1 s, the row 3 s, and every second
  # pair runs on a "loaded" machine at twice the cost: each pair's ratio is
  # still 3, so p25 = median = p75 = 3.
  cost = {'base': 1.0, 'row': 3.0}
  now = [0.0]
  pair_of = lambda: len(calls) // 2
  def run_of(kind):
    def run():
      now[0] += cost[kind] * (2 if pair_of() % 2 else 1)
      calls.append(kind)
    return run
  monkeypatch.setattr(bench_step.time, 'perf_counter', lambda: now[0])
  monkeypatch.setattr(bench_step.time, 'process_time', lambda: now[0])
  monkeypatch.setattr(bench_step.jax, 'block_until_ready', lambda x: x)
  r = bench_step.paired(run_of('base'), run_of('row'), pairs=4)
  assert calls == ['base', 'row', 'row', 'base', 'base', 'row', 'row', 'base']
  assert r['cpu_ratio'] == [3.0, 3.0, 3.0] and r['wall_ratio'] == [3.0, 3.0, 3.0]
  assert r['pairs'] == 4 and r['base_cpu_ms'] == pytest.approx(1500.0)


@pytest.mark.parametrize('argv,message', [
    (['--methods', 'gmix:sharpness.foo=1'], 'sharpness field'),
    (['--baseline', 'nosuch'], 'method.name must be one of'),
])
def test_bad_rows_are_one_error_before_compiling(argv, message, monkeypatch, capsys):
  monkeypatch.setattr(bench_step.sys, 'argv', ['bench_step.py', *argv])
  monkeypatch.setattr(bench_step, 'build_step', lambda *a, **k: pytest.fail('compiled'))
  with pytest.raises(SystemExit) as e:
    bench_step.main()
  assert e.value.code == 2 and message in capsys.readouterr().err


def test_bench_ssl_pairs_each_ssl_step_with_moco(tmp_path):
  from experiments import bench_ssl
  out = tmp_path / 'ssl.json'
  r = bench_ssl.main(['--methods', 'moco_mixup,samix_ssl', '--width', '4', '--batch', '16',
                      '--queue', '64', '--input', '16,16,3', '--pairs', '2', '--warmup', '1',
                      '--out', str(out)])
  assert [row['method'] for row in r['rows']] == ['moco_mixup', 'samix_ssl']
  for row in r['rows']:
    v = row['vs']['moco']
    assert v['pairs'] == 2 and len(v['cpu_ratio']) == 3 and min(v['cpu_ratio']) > 0
  import json
  saved = json.loads(out.read_text())
  assert saved['rows'][1]['method'] == 'samix_ssl' and saved['cpu_model'] == bench_step.cpu_model()


def test_bench_ssl_step_is_the_tasks_training_step():
  import jax
  import numpy as np
  from experiments import bench_ssl
  run, _ = bench_ssl.build_ssl_step('samix_ssl', 4, 16, 64, (16, 16, 3))
  before = jax.device_get(run())
  after = jax.device_get(run())
  assert (int(before.step), int(after.step)) == (1, 2)
  assert not np.array_equal(before.extra['queue'], after.extra['queue'])     # keys enqueued
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before.extra['mixblock']),
                                                        jax.tree.leaves(after.extra['mixblock'])))


def test_bench_ssl_refuses_an_unknown_method(capsys):
  from experiments import bench_ssl
  with pytest.raises(SystemExit) as e:
    bench_ssl.main(['--methods', 'simclr'])
  assert e.value.code == 2 and "'simclr' is not an SSL method" in capsys.readouterr().err


def test_phase_weights_and_amortised_ratio():
  from gmix_jax import objectives, sharpness
  driver = objectives.rule_driver(sharpness.SharpnessRule('looksam', looksam_k=5))
  w = bench_step.phase_weights(driver.phase, 5)
  assert w == {'full': 0.2, 'cheap': 0.8}
  fig = lambda r, ms: {'pairs': 4, 'cpu_ratio': [r - 0.1, r, r + 0.1], 'wall_ratio': [r, r, r],
                       'cpu_ms': ms, 'wall_ms': ms, 'base_cpu_ms': 10.0, 'base_wall_ms': 10.0}
  a = bench_step.amortised({'full': fig(2.0, 20.0), 'cheap': fig(1.0, 10.0)}, w)
  # (r_full + (k - 1) r_cheap) / k by hand: (2 + 4 * 1) / 5 = 1.2; 12 ms per step.
  assert a['cpu_ratio'] == pytest.approx([1.1, 1.2, 1.3]) and a['cpu_ms'] == pytest.approx(12.0)
  assert a['pairs'] == 8 and a['phases']['full']['cpu_ratio'][1] == 2.0


def test_looksam_row_times_each_compiled_phase_not_a_conditional(monkeypatch):
  from gmix_jax import models
  module = models.get_model('cnn', 10, width=4)
  run, info = bench_step.build_step('gmix', {'sharpness': {'name': 'looksam', 'looksam_k': 3}},
                                    'cnn', module, (8, 8, 1), 10, 8, 1)
  assert set(run.phases) == {'full', 'cheap'} and info['phase_weights']['full'] == pytest.approx(1 / 3)
  seen = []
  fake = lambda kind: lambda: seen.append(kind)
  run.phases = {'full': fake('full'), 'cheap': fake('cheap')}
  monkeypatch.setattr(bench_step.jax, 'block_until_ready', lambda x: x)
  r = bench_step.measure(fake('base'), run, pairs=2)
  assert seen.count('full') == 2 and seen.count('cheap') == 2 and seen.count('base') == 4
  assert set(r['phases']) == {'full', 'cheap'}
  run()                           # the schedule: step 0 is a full step
  assert seen[-1] == 'full'


def test_json_records_the_cpu_model(tmp_path, monkeypatch):
  import json
  out = tmp_path / 'b.json'
  monkeypatch.setattr(bench_step.sys, 'argv', ['bench_step.py', '--methods', 'erm', '--baseline',
                                              'erm', '--pairs', '2', '--warmup', '0', '--out', str(out)])
  monkeypatch.setattr(bench_step, 'build_step', lambda *a, **k: (lambda: 0, {}))
  bench_step.main()
  d = json.loads(out.read_text())
  assert d['cpu_model'] == bench_step.cpu_model() and d['cpu_model']
  assert d['cpu_count'] == bench_step.os.cpu_count() and d['rows'][0]['method'] == 'erm'


def test_manifold_cond_probe_changes_no_value():
  """experiments/bench_manifold_cond.py's probe (a lax.cond at each mixing
  point whose branches are both the identity: λ = 1, partner = itself) leaves
  ERM's step unchanged: only the compiled program differs."""
  import jax
  import numpy as np
  from experiments import bench_manifold_cond
  plain, _ = bench_manifold_cond.build('erm', batch=8)
  probed, _ = bench_manifold_cond.build('erm', (0, 1, 2, 3), batch=8)
  for a, b in zip(jax.tree.leaves(plain().params), jax.tree.leaves(probed().params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
