"""Tables, claims and plots from the sweep's JSON records; nothing hand-typed.

  python experiments/report.py [--results experiments/results] [--out experiments/RESULTS.md]

Reads every ``<results>/<grid>/*.json`` record written by
``experiments/sweep.py`` and writes ``RESULTS.md`` (mean ± std over seeds of
test accuracy, ECE, Hessian λ_max and ρ-sharpness per dataset × training-set
size, the best mean of each column in bold; the ablation table; each G-Mix
claim checked against these numbers) and PNG plots under ``--plots``
(accuracy vs training-set size, λ_max vs accuracy, training curves, and the
loss landscapes if ``experiments/landscape.py`` has written
``<results>/landscape/landscape.json``). Needs numpy and matplotlib only.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
from collections import defaultdict
from typing import Callable, NamedTuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# (record key, header, better, format); 'better' picks the bold entry.
COLUMNS = (
    ('final_test_accuracy', 'test acc. (%)', max, lambda m, s: f'{100 * m:.2f} ± {100 * s:.2f}'),
    ('ece', 'ECE (%)', min, lambda m, s: f'{100 * m:.2f} ± {100 * s:.2f}'),
    ('lambda_max', 'λ_max', min, lambda m, s: f'{m:.3g} ± {s:.2g}'),
    ('rho_sharpness', 'ρ-sharpness', min, lambda m, s: f'{m:.3g} ± {s:.2g}'),
)
ABLATION_REFERENCES = ('erm', 'mixup', 'sam', 'gmix', 'bgmix', 'dgmix')
METHOD_ORDER = ('erm', 'mixup', 'cutmix', 'manifold_mixup', 'mixupe', 'multimix', 'samix',
                'sam', 'asam', 'gmix', 'bgmix', 'dgmix')
LABELS = {'erm': 'ERM', 'mixup': 'Mixup', 'cutmix': 'CutMix', 'manifold_mixup': 'Manifold Mixup',
          'mixupe': 'MixupE', 'multimix': 'Multi-Mix', 'samix': 'SAMix', 'sam': 'SAM',
          'asam': 'ASAM', 'gmix': 'G-Mix', 'bgmix': 'BG-Mix', 'dgmix': 'DG-Mix'}


def load(results: str) -> list[dict]:
  out = []
  for path in sorted(glob.glob(os.path.join(results, '*', '*.json'))):
    with open(path) as f:
      rec = json.load(f)
    if isinstance(rec, dict) and 'run_id' in rec:
      out.append(rec)
  return out


def _order(method: str) -> tuple:
  return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def _size_key(size: str) -> float:
  return math.inf if size == 'all' else float(size)


def stats(recs: list[dict], key: str) -> tuple[float, float, int]:
  """Mean, sample std (0 for one seed) and count of ``key`` over records."""
  v = np.array([r[key] for r in recs if r.get(key) is not None and np.isfinite(r[key])], float)
  if not v.size:
    return math.nan, math.nan, 0
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def label(method: str, variant: str = '') -> str:
  return LABELS.get(method, method) + (f' [{variant}]' if variant else '')


def table(groups: dict[str, list[dict]], names: list[str]) -> list[str]:
  """A markdown table, one row per group, the best mean of each column bold."""
  rows = {n: {k: stats(groups[n], k) for k, *_ in COLUMNS} for n in names}
  best = {}
  for key, _, better, _ in COLUMNS:
    means = [rows[n][key][0] for n in names if not math.isnan(rows[n][key][0])]
    best[key] = better(means) if means else None
  lines = ['| method | seeds | ' + ' | '.join(h for _, h, *_ in COLUMNS) + ' | s/run |',
           '| --- | --- |' + ' --- |' * len(COLUMNS) + ' --- |']
  for n in names:
    cells = []
    for key, _, _, fmt in COLUMNS:
      m, s, c = rows[n][key]
      cell = '—' if c == 0 else fmt(m, s)
      cells.append(f'**{cell}**' if c and m == best[key] and len(names) > 1 else cell)
    wall = stats(groups[n], 'wall_time_sec')[0]
    lines.append(f'| {n} | {len(groups[n])} | ' + ' | '.join(cells) + f' | {wall:.0f} |')
  return lines


# ----------------------------------------------------------------------------
# Claims, computed.
# ----------------------------------------------------------------------------
def _compare(a: list[dict], b: list[dict], key: str, higher_better: bool):
  """(holds, difference of means, standard error of the difference; NaN
  with a single seed on either side)."""
  ma, sa, na = stats(a, key)
  mb, sb, nb = stats(b, key)
  if not (na and nb):
    return None
  diff = ma - mb
  se = math.sqrt((sa ** 2) / na + (sb ** 2) / nb) if min(na, nb) > 1 else math.nan
  return (diff > 0) if higher_better else (diff < 0), diff, se


def _verdict(res, scale=100.0, unit=' pts') -> str:
  holds, diff, se = res
  if math.isnan(se):
    return f'**{"yes" if holds else "no"}** ({diff * scale:+.2f}{unit}; one seed, no error estimate)'
  noise = abs(diff) <= 2 * se
  return (f'**{"yes" if holds else "no"}** ({diff * scale:+.2f}{unit}, 2·s.e. {2 * se * scale:.2f}'
          f'{"; within seed noise" if noise else ""})')


def claims(settings: dict[tuple, dict[str, list[dict]]]) -> list[str]:
  """Each G-Mix claim per benchmark setting, from the numbers."""
  acc = 'final_test_accuracy'
  checks = (
      ('G-Mix beats max(Mixup, SAM) in test accuracy', 'gmix', ('mixup', 'sam'), acc, True),
      ('G-Mix beats ERM in test accuracy', 'gmix', ('erm',), acc, True),
      ('G-Mix is flatter than Mixup (lower λ_max)', 'gmix', ('mixup',), 'lambda_max', False),
      ('G-Mix is flatter than ERM (lower λ_max)', 'gmix', ('erm',), 'lambda_max', False),
      ('BG-Mix beats G-Mix in test accuracy', 'bgmix', ('gmix',), acc, True),
      ('DG-Mix beats G-Mix in test accuracy', 'dgmix', ('gmix',), acc, True),
      ('G-Mix is better calibrated than ERM (lower ECE)', 'gmix', ('erm',), 'ece', False),
  )
  lines = []
  for text, method, rivals, key, higher in checks:
    verdicts, held, total = [], 0, 0
    for (dataset, size), groups in sorted(settings.items(), key=lambda kv: (kv[0][0], _size_key(kv[0][1]))):
      if method not in groups or not all(r in groups for r in rivals):
        continue
      # The strongest rival by its mean (max for accuracy, min otherwise).
      pick = max if higher else min
      rival = pick(rivals, key=lambda r: stats(groups[r], key)[0])
      res = _compare(groups[method], groups[rival], key, higher)
      if res is None:
        continue
      total += 1
      held += bool(res[0])
      scale, unit = (100.0, ' pts') if key in (acc, 'ece') else (1.0, '')
      verdicts.append(f'{dataset} {size}/class vs {label(rival)}: {_verdict(res, scale, unit)}')
    if total:
      lines.append(f'- {text}: held in {held}/{total} settings. ' + '; '.join(verdicts) + '.')
  return lines


# ----------------------------------------------------------------------------
# Plots.
# ----------------------------------------------------------------------------
def _plt():
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def plot_acc_vs_size(bench: list[dict], out_dir: str) -> list[str]:
  plt = _plt()
  paths = []
  for dataset in sorted({r['dataset'] for r in bench}):
    recs = [r for r in bench if r['dataset'] == dataset]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for m in sorted({r['method'] for r in recs}, key=_order):
      by_size = defaultdict(list)
      for r in recs:
        if r['method'] == m:
          by_size[r['num_train']].append(r)
      xs = sorted(by_size)
      ms = [stats(by_size[x], 'final_test_accuracy') for x in xs]
      ax.errorbar(xs, [100 * v[0] for v in ms], yerr=[100 * v[1] for v in ms], marker='o',
                  capsize=3, label=label(m), lw=2.2 if m in ('gmix', 'bgmix', 'dgmix') else 1.0)
    ax.set_xscale('log'); ax.set_xlabel('training examples'); ax.set_ylabel('test accuracy (%)')
    ax.set_title(f'{dataset}: mean ± std over seeds'); ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, f'acc_vs_size_{dataset}.png'))
    fig.savefig(paths[-1], dpi=110); plt.close(fig)
  return paths


def plot_lambda_vs_acc(bench: list[dict], out_dir: str) -> str:
  plt = _plt()
  datasets = sorted({r['dataset'] for r in bench})
  fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
  methods = sorted({r['method'] for r in bench}, key=_order)
  colors = {m: plt.cm.tab20(i / max(1, len(methods) - 1)) for i, m in enumerate(methods)}
  for ax, dataset in zip(axes[0], datasets):
    for m in methods:
      rs = [r for r in bench if r['dataset'] == dataset and r['method'] == m]
      if rs:
        ax.scatter([r['lambda_max'] for r in rs], [100 * r['final_test_accuracy'] for r in rs],
                   s=14, color=colors[m], label=label(m))
    ax.set_xscale('log'); ax.set_xlabel('Hessian λ_max (test subset)')
    ax.set_ylabel('test accuracy (%)'); ax.set_title(f'{dataset}: every run')
  axes[0][-1].legend(fontsize=7, ncol=2)
  fig.tight_layout()
  path = os.path.join(out_dir, 'lambda_vs_acc.png')
  fig.savefig(path, dpi=110); plt.close(fig)
  return path


def plot_curves(recs: list[dict], out_dir: str, name: str, title: str) -> str | None:
  """Training loss (mean over seeds) against the step, one line per method."""
  plt = _plt()
  groups = defaultdict(list)
  for r in recs:
    groups[label(r['method'], r.get('variant', ''))].append(r)
  fig, ax = plt.subplots(figsize=(6.5, 4))
  drawn = False
  for g, rs in sorted(groups.items()):
    curves = [[(c['step'], c['loss']) for c in r.get('curve', []) if c.get('split') == 'train']
              for r in rs]
    curves = [c for c in curves if c]
    if not curves:
      continue
    n = min(len(c) for c in curves)
    steps = [s for s, _ in curves[0][:n]]
    ax.plot(steps, np.mean([[l for _, l in c[:n]] for c in curves], 0), label=g)
    drawn = True
  if not drawn:
    plt.close(fig)
    return None
  ax.set_yscale('log'); ax.set_xlabel('step'); ax.set_ylabel('training loss (mixed, mean over seeds)')
  ax.set_title(title); ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  path = os.path.join(out_dir, name)
  fig.savefig(path, dpi=110); plt.close(fig)
  return path


# ----------------------------------------------------------------------------
# The document.
# ----------------------------------------------------------------------------
def build(records: list[dict], out: str, plots_dir: str, results: str,
          readme: str | None = None) -> str:
  os.makedirs(plots_dir, exist_ok=True)
  rel = lambda p: os.path.relpath(p, os.path.dirname(os.path.abspath(out)))
  lines = ['# Results: limited-data benchmark and BG-/DG-Mix ablation', '',
           f'Generated by `python experiments/report.py` from {len(records)} run records in '
           f'`{os.path.relpath(results, ROOT)}/` (written by `experiments/sweep.py`); do not edit '
           'by hand. Mean ± sample std over seeds; the seed also draws the training subset. '
           'λ_max: top Hessian eigenvalue of the test loss (power iteration on HVPs); '
           'ρ-sharpness: max loss increase within an L2 ball of radius ρ found by projected '
           'gradient ascent (a lower bound); both on a fixed test subset, `train=False`. '
           'Bold: best mean of the column (highest accuracy, lowest otherwise). '
           '`s/run`: wall time of training + analysis.', '']
  meta = defaultdict(set)
  for r in records:
    for k in ('device', 'jax_version', 'git_commit', 'target_steps', 'batch_size'):
      meta[k].add(str(r.get(k)))
    meta['rho'].add(str(r.get('analysis', {}).get('rho')))
    meta['eval'].add(str(r.get('analysis', {}).get('num_examples')))
  lines.append('Setup: ' + '; '.join(f'{k} {", ".join(sorted(v))}' for k, v in meta.items()) + '.')
  lines.append('')

  claim_lines, ablation_lines, landscape_line = [], [], ''   # also for the README block
  bench = [r for r in records if r['grid'] == 'benchmark']
  settings: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
  for r in bench:
    settings[(r['dataset'], r['size'])][r['method']].append(r)
  if bench:
    lines += ['## Limited-data benchmark', '',
              'Every method: the same optimizer steps and batch (converted to epochs per size).', '']
    for (dataset, size), groups in sorted(settings.items(), key=lambda kv: (kv[0][0], _size_key(kv[0][1]))):
      n_train = sorted({r['num_train'] for rs in groups.values() for r in rs})
      lines += [f'### {dataset}, {size} per class ({", ".join(map(str, n_train))} training examples)', '']
      names = sorted(groups, key=_order)
      lines += table({label(m): groups[m] for m in names}, [label(m) for m in names]) + ['']
    lines += ["## The G-Mix paper's claims on these numbers", '',
              'Computed from the table means; "within seed noise" when |difference| ≤ 2 standard '
              'errors of the difference of the means.', '']
    claim_lines = claims(settings) or ['- (no setting has the methods a claim needs)']
    lines += claim_lines
    lines.append('')

  abl = [r for r in records if r['grid'] == 'ablation']
  if abl:
    # The defaults and references are benchmark runs at the ablation's setting.
    where = {(r['dataset'], r['size'], r.get('target_steps')) for r in abl}
    abl += [r for r in bench if (r['dataset'], r['size'], r.get('target_steps')) in where
            and r['method'] in ABLATION_REFERENCES]
    groups = defaultdict(list)
    for r in abl:
      groups[label(r['method'], r.get('variant', ''))].append(r)
    names = sorted(groups, key=lambda g: (_order(groups[g][0]['method']), groups[g][0].get('variant', '')))
    setting = sorted({f"{r['dataset']} {r['size']}/class" for r in abl})
    lines += ['## Ablation of the reconstructed knobs (docs/methods.md § 4)', '',
              f'{", ".join(setting)}; one knob changed at a time from the defaults '
              '(BG-Mix: `mix_one_subset`, mix the sensitive subset, partners within it, γ = 0.5, '
              '`per_example`; DG-Mix: γ = 0.5, ρ⁺ = ρ⁻ = ρ). Variants: the overridden fields.', '']
    lines += table(groups, names) + ['']
    base = {m: groups.get(label(m)) for m in ('bgmix', 'dgmix', 'gmix')}
    for m in ('bgmix', 'dgmix'):
      if not base[m]:
        continue
      variants = [g for g in names if groups[g][0]['method'] == m and groups[g][0].get('variant')]
      better = [g for g in variants
                if (res := _compare(groups[g], base[m], 'final_test_accuracy', True)) and res[0]
                and abs(res[1]) > 2 * res[2]]        # False for NaN (one seed)
      ablation_lines.append(f'- {label(m)}: variants clearly (beyond 2 s.e.) more accurate than the default: '
                            + (', '.join(better) if better else 'none') + '.')
      if base['gmix']:
        res = _compare(base[m], base['gmix'], 'final_test_accuracy', True)
        if res:
          ablation_lines.append(f'- {label(m)} default beats G-Mix here: {_verdict(res)}.')
    lines += ablation_lines + ['']

  # -- Plots -----------------------------------------------------------------
  figs = []
  if bench:
    figs += [(p, 'Accuracy vs training-set size') for p in plot_acc_vs_size(bench, plots_dir)]
    figs.append((plot_lambda_vs_acc(bench, plots_dir), 'λ_max vs accuracy'))
    for dataset in sorted({r['dataset'] for r in bench}):
      smallest = min({r['size'] for r in bench if r['dataset'] == dataset}, key=_size_key)
      p = plot_curves([r for r in bench if r['dataset'] == dataset and r['size'] == smallest],
                      plots_dir, f'curves_{dataset}_n{smallest}.png',
                      f'{dataset}, {smallest}/class: training loss')
      if p:
        figs.append((p, f'Training curves, {dataset} {smallest}/class'))
  if abl:
    p = plot_curves(abl, plots_dir, 'curves_ablation.png', 'ablation: training loss')
    if p:
      figs.append((p, 'Training curves, ablation'))
  land = os.path.join(results, 'landscape', 'landscape.json')
  if os.path.exists(land):
    from experiments import landscape
    with open(land) as f:
      data = json.load(f)
    figs += [(p, 'Loss landscape (filter-normalised directions, Li et al. 2018)')
             for p in landscape.plot(data, plots_dir)]
    landscape_line = landscape.summary(data)
    lines += ['## Loss landscapes', '', landscape_line, '']
  if figs:
    lines += ['## Plots', '']
    lines += [f'![{t}]({rel(p)})' for p, t in figs] + ['']
  text = '\n'.join(lines)
  with open(out, 'w') as f:
    f.write(text)
  if readme and settings:
    summary = accuracy_summary(settings, meta, len(records), os.path.relpath(out, ROOT))
    summary += ['', "The G-Mix paper's claims, checked on these numbers (2·s.e.: two standard errors "
                'of the difference of the means):', ''] + claim_lines
    if ablation_lines:
      summary += ['', 'Ablation (mnist_subset, 50 per class; table in the full results):', '']
      summary += ablation_lines
    if landscape_line:
      summary += ['', 'Loss landscapes: ' + landscape_line]
    rel_readme = lambda p: os.path.relpath(p, os.path.dirname(os.path.abspath(readme)))
    summary += [''] + [f'![{t}]({rel_readme(p)})' for p, t in figs
                       if os.path.basename(p).startswith(('acc_vs_size', 'landscape_1d'))]
    replace_block(readme, summary)
  return text


RULES_BEGIN = '<!-- rules:begin (generated by experiments/report.py --section rules) -->'
RULES_END = '<!-- rules:end -->'
RULES_ROWS = (('mixup', ''), ('gmix', ''), ('gmix', 'looksam'), ('gmix', 'looksam-a0.1'),
              ('gmix', 'msam'), ('gmix', 'fsam'))
RULE_LABELS = {('mixup', ''): 'Mixup', ('gmix', ''): 'G-Mix (SAM)',
               ('gmix', 'looksam'): 'G-Mix + LookSAM',
               ('gmix', 'looksam-a0.1'): 'G-Mix + LookSAM, α = 0.1', ('gmix', 'msam'): 'G-Mix + MSAM',
               ('gmix', 'fsam'): 'G-Mix + F-SAM'}
BENCH_ROW = {('mixup', ''): 'mixup', ('gmix', ''): 'gmix', ('gmix', 'looksam'): 'gmix:looksam',
             ('gmix', 'looksam-a0.1'): 'gmix:looksam',
             ('gmix', 'msam'): 'gmix:msam', ('gmix', 'fsam'): 'gmix:fsam'}
COST_GOAL = 1.2


def _mean_se(recs, key='final_test_accuracy'):
  m, s, n = stats(recs, key)
  return m, (s / math.sqrt(n) if n > 1 else math.nan), n


def rules_section(records: list[dict], bench: dict | None) -> list[str]:
  """G-Mix with each efficient sharpness rule next to G-Mix (SAM) and Mixup
  (grid ``rules``), with the paired step cost of experiments/bench_rules.py.

  The goal checked per row: accuracy within 2 s.e. of G-Mix's (s.e. of the
  difference of the means; or above it) at ≤ 1.2× Mixup's step cost.
  """
  recs = [r for r in records if r['grid'] == 'rules']
  if not recs:
    return []
  rows = bench.get('rows', {}) if bench else {}
  setup = bench.get('setting', {}) if bench else {}
  loads = [l for r in rows.values() for l in r.get('load_1m', [])]
  devices = sorted({str(r.get('device')) for r in recs})
  commits = sorted({str(r.get('git_commit'))[:7] for r in recs})
  lines = ['## Efficient sharpness rules inside G-Mix (docs/methods.md § 2)', '',
           'G-Mix (Mixup + SAM) with its sharpness rule replaced by LookSAM (k = 5, α = 0.7), '
           'MSAM (ρ = 0.3, the SGD momentum) or F-SAM (σ = 1, λ = 0.95), next to G-Mix with SAM '
           'and Mixup, all trained on the same machine by '
           '`python experiments/sweep.py --grid rules --workers 2` (400 steps of batch 64, the '
           f'benchmark\'s setting; {", ".join(devices)}; commits {", ".join(commits)}). Test '
           'accuracy: mean ± standard error over seeds (the seed also draws the training subset). '
           'Δ vs G-Mix: difference of the means ± 2 s.e. of the difference. This section: '
           '`python experiments/report.py --section rules`.', '',
           'Step cost: `python experiments/bench_rules.py --pairs 30 --out '
           'experiments/bench_rules_cpu.json` — the library\'s compiled step on the mnist_subset '
           f'model ({setup.get("model", "cnn")}, batch {setup.get("batch", 64)}), timed in '
           'back-to-back pairs (Mixup step, rule step; order alternating), median over pairs of '
           'the per-pair CPU-time ratio; LookSAM amortised over its period, (r_full + 4 r_cheap)/5. '
           f'Machine: {setup.get("cpus", "?")}-core CPU shared with other jobs, 1-minute load '
           f'average {min(loads):.0f}–{max(loads):.0f} during the timing.' if loads else
           'Step cost: not measured.', '',
           f'Goal: G-Mix\'s accuracy (within 2 s.e.) at ≤ {COST_GOAL}× Mixup\'s step cost. '
           'The goal column is computed for Mixup too: where Mixup itself meets it, the '
           'accuracy criterion does not separate G-Mix from Mixup on that setting, and λ_max '
           '(the flatness G-Mix is for) is the column that tells the rules apart.', '']
  for dataset, size in sorted({(r['dataset'], r['size']) for r in recs}):
    here = [r for r in recs if (r['dataset'], r['size']) == (dataset, size)]
    group = {key: [r for r in here if (r['method'], r.get('variant', '')) == key]
             for key in RULES_ROWS}
    gmix = group[('gmix', '')]
    # The benchmark grid's own runs of the references (5 seeds, another machine
    # and commit): a second estimate of G-Mix's accuracy with more seeds.
    ref = {m: [r for r in records if r['grid'] == 'benchmark' and r['method'] == m
               and (r['dataset'], r['size']) == (dataset, size)] for m in ('mixup', 'gmix')}
    lines += [f'### {dataset}, {size} per class', '',
              '| method | seeds | test acc. (%) | Δ vs G-Mix (pts) | Δ vs benchmark G-Mix (pts) '
              '| λ_max | CPU step cost / Mixup | goal |',
              '| --- | --- | --- | --- | --- | --- | --- | --- |']
    pairs = [(a['final_test_accuracy'], b['final_test_accuracy'])
             for m in ('mixup', 'gmix') for a in group[(m, '')] for b in ref[m]
             if a['seed'] == b['seed']]
    agree = (f'Seeds run in both grids ({len(pairs)} runs): test accuracy differs by at most '
             f'{100 * max(abs(a - b) for a, b in pairs):.2f} pts between the two machines.'
             if pairs else '')
    for m in ('mixup', 'gmix'):
      if ref[m]:
        mm, mse, mn = _mean_se(ref[m])
        dev = sorted({str(r.get('device')).split(':')[0] for r in ref[m]})
        lines.append(f'| {LABELS[m]} [benchmark grid, {", ".join(dev)}] | {mn} | '
                     f'{100 * mm:.2f} ± {100 * mse:.2f} | | | '
                     f'{stats(ref[m], "lambda_max")[0]:.3g} | | |')
    for key in RULES_ROWS:
      rs = group[key]
      if not rs:
        continue
      m, se, n = _mean_se(rs)
      lam = stats(rs, 'lambda_max')[0]
      cost = rows.get(BENCH_ROW[key], {}).get('cpu_ratio')
      cost_cell = '—' if cost is None else f'{cost:.2f}'
      if key[1].startswith('looksam') and cost is not None:
        r = rows[BENCH_ROW[key]]
        cost_cell += f" (full {r['cpu_ratio_full']:.2f}, cheap {r['cpu_ratio_cheap']:.2f})"
      delta, goal = '—', '—'
      if key != ('gmix', '') and gmix:
        gm, gse, gn = _mean_se(gmix)
        d = m - gm
        d_se = math.sqrt(se ** 2 + gse ** 2) if n > 1 and gn > 1 else math.nan
        delta = f'{100 * d:+.2f} ± {200 * d_se:.2f}' if not math.isnan(d_se) else f'{100 * d:+.2f}'
      # The goal against this machine's G-Mix when it has 2+ seeds, else the benchmark grid's.
      goal_ref, where = (gmix, '') if len(gmix) > 1 else (ref['gmix'], ' (vs benchmark G-Mix)')
      if key != ('gmix', '') and goal_ref:
        gm, gse, gn = _mean_se(goal_ref)
        d = m - gm
        d_se = math.sqrt(se ** 2 + gse ** 2) if n > 1 and gn > 1 else math.nan
        acc_ok = (d >= 0 or abs(d) <= 2 * d_se) if not math.isnan(d_se) else None
        cost_ok = None if cost is None else cost <= COST_GOAL
        if acc_ok is None or cost_ok is None:
          goal = 'n/a'
        else:
          goal = ('**yes**' if acc_ok and cost_ok else (
              'no (' + ', '.join(w for w, ok in (('accuracy', acc_ok), ('cost', cost_ok))
                                 if not ok) + ')')) + where
      acc = f'{100 * m:.2f} ± {100 * se:.2f}' if n > 1 else f'{100 * m:.2f}'
      delta_b = '—'
      if ref['gmix'] and key != ('gmix', ''):
        bm, bse, bn = _mean_se(ref['gmix'])
        d_se = math.sqrt(se ** 2 + bse ** 2) if n > 1 and bn > 1 else math.nan
        delta_b = (f'{100 * (m - bm):+.2f} ± {200 * d_se:.2f}' if not math.isnan(d_se)
                   else f'{100 * (m - bm):+.2f}')
      lines.append(f'| {RULE_LABELS[key]} | {n} | {acc} | {delta} | {delta_b} | {lam:.3g} | '
                   f'{cost_cell} | {goal} |')
    lines += ['', agree, ''] if agree else ['']
  return lines


ASCENT_BEGIN = '<!-- ascent:begin (generated by experiments/report.py --section ascent) -->'
ASCENT_END = '<!-- ascent:end -->'
ASCENT_ROWS = (('est-shared', 'BG-Mix, `shared`', 'bgmix:shared'),
               ('est-shared_prev', 'BG-Mix, `shared_prev`', 'bgmix:shared_prev'))


def ascent_section(records: list[dict], bench: dict | None) -> list[str]:
  """BG-Mix ranked by ``shared`` vs by ``shared_prev`` (grid ``ascent``), with
  the paired step cost × SAM of experiments/bench_step.py (``bench``: its
  ``--out`` JSON). Δ: difference of the means ± 2 s.e. of the difference."""
  recs = [r for r in records if r['grid'] == 'ascent']
  if not recs:
    return []
  cost = {}
  for row in (bench or {}).get('rows', []):
    if 'sam' in row.get('vs', {}):
      cost[row['method']] = row['vs']['sam']['cpu_ratio']      # p25, median, p75
  loads = [l for row in (bench or {}).get('rows', []) for l in (row['load_before'],
                                                                row['load_after'])]
  args = (bench or {}).get('args', {})
  devices = sorted({str(r.get('device')) for r in recs})
  commits = sorted({str(r.get('git_commit'))[:7] for r in recs})
  lines = ['## BG-Mix: `shared` vs `shared_prev` (docs/methods.md § 3.2)', '',
           'BG-Mix (the `bgmix` preset: mixup × SAM × binary, `mix_one_subset`, γ = 0.5) with its '
           'split ranked by `shared` (ε from the clean batch\'s gradient) and by `shared_prev` (ε '
           'along the previous step\'s ascent direction), trained on the same machine by '
           '`python experiments/sweep.py --grid ascent --workers 2` (400 steps of batch 64, the '
           f'benchmark\'s setting; {", ".join(devices)}; commits {", ".join(commits)}). Test '
           'accuracy, ECE (on the analysis subset) and Hessian λ_max: mean ± standard error over '
           'seeds (the seed also draws the training subset); Δ: difference of the means ± 2 s.e. '
           'of the difference. This section: '
           '`python experiments/report.py --section ascent`.', '',
           ('Step cost × SAM: `python experiments/bench_step.py --methods '
            f'{args.get("methods", "?")} --baseline {args.get("baseline", "sam")} '
            f'--pairs {args.get("pairs", "?")} --out experiments/bench_step_cpu_shared_prev.json` '
            f'(small CNN width {args.get("width", "?")}, batch {args.get("batch", "?")}, the '
            'library\'s compiled step, back-to-back pairs, median of the per-pair CPU-time ratio, '
            'p25-p75 in brackets) on this 2-core CPU shared with other jobs, 1-minute load average '
            f'{min(loads):.0f}–{max(loads):.0f}.') if loads else 'Step cost: not measured.', '']
  for dataset, size in sorted({(r['dataset'], r['size']) for r in recs}):
    here = [r for r in recs if (r['dataset'], r['size']) == (dataset, size)]
    group = {v: [r for r in here if r.get('variant', '') == v] for v, _, _ in ASCENT_ROWS}
    lines += [f'### {dataset}, {size} per class', '',
              '| estimator | seeds | test acc. (%) | Δ acc. vs `shared` (pts) | ECE (%) '
              '| Δ ECE vs `shared` (pts) | λ_max | CPU step cost × SAM |',
              '| --- | --- | --- | --- | --- | --- | --- | --- |']
    ref = group['est-shared']

    def cell(rs, key, scale):
      m, se, n = _mean_se(rs, key)
      return f'{scale * m:.2f} ± {scale * se:.2f}' if n > 1 else f'{scale * m:.2f}'

    def delta(rs, key):
      """Δ of the means ± 2 s.e. of the difference, in points, with the verdict."""
      if not ref or rs is ref:
        return '—'
      (m, se, n), (rm, rse, rn) = _mean_se(rs, key), _mean_se(ref, key)
      d_se = math.sqrt(se ** 2 + rse ** 2) if n > 1 and rn > 1 else math.nan
      if math.isnan(d_se):
        return f'{100 * (m - rm):+.2f}'
      verdict = 'within' if abs(m - rm) <= 2 * d_se else 'beyond'
      return f'{100 * (m - rm):+.2f} ± {200 * d_se:.2f} ({verdict} 2 s.e.)'

    for variant, name, bench_row in ASCENT_ROWS:
      rs = group[variant]
      if not rs:
        continue
      c = cost.get(bench_row)
      cost_cell = '—' if c is None else f'{c[1]:.2f} ({c[0]:.2f}-{c[2]:.2f})'
      lines.append(f'| {name} | {len(rs)} | {cell(rs, "final_test_accuracy", 100)} | '
                   f'{delta(rs, "final_test_accuracy")} | {cell(rs, "ece", 100)} | '
                   f'{delta(rs, "ece")} | {cell(rs, "lambda_max", 1)} | {cost_cell} |')
    lines.append('')
  return lines


class Section(NamedTuple):
  """A block of --out that ``--section NAME`` rewrites from grid NAME's records."""
  build: Callable[[list[dict], dict | None], list[str]]   # (records, bench JSON) -> lines
  bench: str                # default bench JSON, under experiments/
  bench_script: str         # the script whose --out writes it
  begin: str
  end: str


# Name -> section, in the order they stand in experiments/RESULTS.md.
SECTIONS = {
    'rules': Section(rules_section, 'bench_rules_cpu.json', 'experiments/bench_rules.py',
                     RULES_BEGIN, RULES_END),
    'ascent': Section(ascent_section, 'bench_step_cpu_shared_prev.json',
                      'experiments/bench_step.py', ASCENT_BEGIN, ASCENT_END),
}


def replace_section_block(path: str, block: list[str], begin: str, end: str) -> None:
  """Puts ``block`` between the markers ``begin`` … ``end`` in place of the old
  one, or at the end."""
  with open(path) as f:
    text = f.read()
  if begin in text and end in text:
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
  else:
    head, tail = text.rstrip('\n') + '\n\n', '\n'
  with open(path, 'w') as f:
    f.write(head + '\n'.join([begin] + block + [end]) + tail)


def write_section(name: str, results: str, bench_path: str, out: str,
                  quiet: bool = False) -> int:
  """Rewrites section ``name`` of ``out`` (the rest of the file as it is); 1
  when grid ``name`` has no records under ``results`` (said unless ``quiet``)."""
  section = SECTIONS[name]
  bench = None
  if os.path.exists(bench_path):
    with open(bench_path) as f:
      bench = json.load(f)
  block = section.build(load(results), bench)
  if not block:
    if not quiet:
      print(f'no records of grid {name} under {results}')
    return 1
  replace_section_block(out, block, section.begin, section.end)
  print(f'wrote the {name} section of {out}')
  return 0


README_BEGIN = '<!-- results:begin (generated by experiments/report.py; do not edit) -->'
README_END = '<!-- results:end -->'


def accuracy_summary(settings, meta, n_records: int, full: str) -> list[str]:
  """Test accuracy of every method in every benchmark setting, one table."""
  cols = sorted(settings, key=lambda k: (k[0], _size_key(k[1])))
  methods = sorted({m for g in settings.values() for m in g}, key=_order)
  best = {c: max(stats(settings[c][m], 'final_test_accuracy')[0] for m in settings[c]) for c in cols}
  seeds = sorted({len(rs) for g in settings.values() for rs in g.values()})
  lines = [f'Generated by `python experiments/report.py` from {n_records} run records '
           f'(`experiments/sweep.py --grid all`; {"/".join(map(str, seeds))} seeds per cell, the '
           f'same {", ".join(sorted(meta["target_steps"]))} steps of batch '
           f'{", ".join(sorted(meta["batch_size"]))} for every method; '
           f'{", ".join(sorted(meta["device"]))}). Test accuracy (%), mean ± std over seeds, best '
           f'mean per column in bold; ECE, Hessian λ_max, ρ-sharpness, the ablation and all plots '
           f'are in [{full}]({full}).', '',
           '| method | ' + ' | '.join(f'{d} {n}/class' for d, n in cols) + ' |',
           '| --- |' + ' --- |' * len(cols)]
  for m in methods:
    cells = []
    for c in cols:
      mean, std, n = stats(settings[c].get(m, []), 'final_test_accuracy')
      cell = '—' if not n else f'{100 * mean:.1f} ± {100 * std:.1f}'
      cells.append(f'**{cell}**' if n and mean == best[c] else cell)
    lines.append(f'| {label(m)} | ' + ' | '.join(cells) + ' |')
  return lines


def replace_block(path: str, block: list[str]) -> None:
  """Replaces the text between the README markers (left alone if absent)."""
  with open(path) as f:
    text = f.read()
  if README_BEGIN not in text or README_END not in text:
    print(f'{path}: no {README_BEGIN!r} marker; README not updated')
    return
  head, rest = text.split(README_BEGIN, 1)
  _, tail = rest.split(README_END, 1)
  with open(path, 'w') as f:
    f.write(head + README_BEGIN + '\n' + '\n'.join(block) + '\n' + README_END + tail)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--results', default=os.path.join(ROOT, 'experiments', 'results'))
  p.add_argument('--out', default=os.path.join(ROOT, 'experiments', 'RESULTS.md'))
  p.add_argument('--plots', default=os.path.join(ROOT, 'experiments', 'plots'))
  p.add_argument('--readme', default=os.path.join(ROOT, 'README.md'),
                 help="README whose results block is regenerated ('' = none)")
  p.add_argument('--grids', default='benchmark,ablation',
                 help='comma list of grids to report (e.g. smoke for a test)')
  p.add_argument('--section', default=None, choices=list(SECTIONS),
                 help='rewrite only this section of --out: '
                      + ' or '.join(f"'{n}' (grid {n} + --bench-{n})" for n in SECTIONS)
                      + ', leaving the rest of the file as it is')
  for name, section in SECTIONS.items():
    p.add_argument(f'--bench-{name}', default=os.path.join(ROOT, 'experiments', section.bench),
                   help=f'{section.bench_script} --out file (step costs of the {name} section)')
  args = p.parse_args(argv)
  if args.section:
    return write_section(args.section, args.results, getattr(args, f'bench_{args.section}'),
                         args.out)
  keep = set(args.grids.split(','))
  records = [r for r in load(args.results) if r['grid'] in keep]
  if not records:
    print(f'no records for grids {sorted(keep)} under {args.results}')
    return 1
  # The smoke grid is reported as a benchmark (for tests of this script).
  for r in records:
    if r['grid'] == 'smoke':
      r['grid'] = 'benchmark'
  build(records, args.out, args.plots, os.path.abspath(args.results), args.readme or None)
  # `build` writes the file afresh; the sections follow in SECTIONS' order, so
  # the whole file never depends on the order of earlier --section runs.
  for name in SECTIONS:
    write_section(name, args.results, getattr(args, f'bench_{name}'), args.out, quiet=True)
  print(f'wrote {args.out} ({len(records)} records) and plots in {args.plots}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
