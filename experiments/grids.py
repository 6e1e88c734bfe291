"""The sweep grids: which runs ``experiments/sweep.py`` makes, as data.

A run is a ``Run``: a config file (``configs/<dataset>.py:<method>``), a
training-set size, a seed, a step budget and dotted config overrides. Every
method in a grid gets the *same* number of optimizer steps of the same batch
(``steps`` × ``batch_size``); ``sweep.py`` converts the budget to epochs per
training-set size (``num_epochs = round(steps / steps_per_epoch)``, so the
realised count is within half an epoch of the budget and is recorded).

Grids:
- ``benchmark``: the limited-data benchmark. Every method of ``METHODS`` that
  the code base defines (``objectives.PRESETS`` or ``samix.METHODS``; absent
  ones are skipped with a note), on ``digits`` (small CNN, 8×8) and
  ``mnist_subset`` (small CNN, 28×28) at three training-set sizes, 5 seeds.
- ``ablation``: the reconstruction knobs of BG-Mix / DG-Mix (docs/methods.md § 4),
  one at a time around the defaults, on ``mnist_subset`` at 50 per class,
  with ERM, Mixup, SAM and G-Mix as references, 5 seeds. The defaults and
  references are the benchmark's own runs (shared records, trained once).
- ``rules``: G-Mix with each efficient sharpness rule, next to G-Mix and Mixup.
- ``ascent``: BG-Mix with the ``shared`` and the ``shared_prev`` estimator.
- ``smoke``: 2 methods × 1 size × 2 seeds × 30 steps on digits (tests).
- ``all``: benchmark + ablation in one queue (one pool of workers).

The seed sets the initialisation, the data order, the mixing draws *and* the
stratified training subset (``data.subsample(seed=...)``), so the spread
over seeds includes the choice of the few training examples.
"""
from __future__ import annotations

import dataclasses
from typing import Any

# The limited-data benchmark's methods; samix / manifold_mixup only where defined.
METHODS = ('erm', 'mixup', 'cutmix', 'sam', 'asam', 'gmix', 'bgmix', 'dgmix', 'mixupe',
           'multimix', 'samix', 'manifold_mixup')
SEEDS = (0, 1, 2, 3, 4)
STEPS = 400             # optimizer steps per run, every method and size
BATCH = 64
# examples_per_class; None = the whole training split (digits 1347, mnist_subset 4000).
SIZES = {'digits': (10, 30, None), 'mnist_subset': (50, 100, None)}
# Runs whose checkpoints are kept for experiments/landscape.py (seed 0 of these).
LANDSCAPE_METHODS = ('erm', 'mixup', 'sam', 'gmix')
LANDSCAPE_SETTING = ('mnist_subset', 50)

# Per-dataset overrides shared by every method. digits: the small CNN rather
# than the config's MLP, so that CutMix (boxes) and SAMix (a spatial feature
# map) run on the same model as the rest.
DATASET_OVERRIDES = {
    'digits': {'model.name': 'cnn', 'model.kwargs': {'width': 16, 'norm': 'none'}},
    'mnist_subset': {},
}
# Per-method overrides under every run's own. The sweep ran when `per_example`
# was BG-Mix's estimator; its ablation then made `shared` the preset's default
# (objectives.PRESETS). Pinned, so a rerun reproduces the recorded runs and
# the ablation's `est-shared` row stays the comparison that decided it.
METHOD_OVERRIDES = {
    'bgmix': {'method.sensitivity.estimator': 'per_example'},
}


@dataclasses.dataclass(frozen=True)
class Run:
  grid: str
  dataset: str
  method: str
  examples_per_class: int | None
  seed: int
  steps: int = STEPS
  batch_size: int = BATCH
  variant: str = ''                       # ablation label ('' = the preset's defaults)
  overrides: tuple[tuple[str, Any], ...] = ()   # dotted config field -> value
  keep_checkpoint: bool = False           # kept for the landscape plots

  @property
  def size(self) -> str:
    return 'all' if self.examples_per_class is None else str(self.examples_per_class)

  @property
  def run_id(self) -> str:
    variant = f'-{self.variant}' if self.variant else ''
    return f'{self.dataset}-n{self.size}-{self.method}{variant}-s{self.seed}'


def available_methods() -> set[str]:
  """Method names the code base defines now (another engineer may add more)."""
  from gmix_jax import objectives
  names = set(objectives.PRESETS)
  try:
    from gmix_jax import samix
    names |= set(samix.METHODS)
  except ImportError:
    pass
  return names


def _keep(dataset, method, n, seed) -> bool:
  return (dataset, n) == LANDSCAPE_SETTING and method in LANDSCAPE_METHODS and seed == 0


def benchmark(methods=METHODS, seeds=SEEDS, steps=STEPS, sizes=None) -> list[Run]:
  sizes = sizes or SIZES
  return [Run('benchmark', d, m, n, s, steps, keep_checkpoint=_keep(d, m, n, s))
          for d, ns in sizes.items() for n in ns for m in methods for s in seeds]


# One knob at a time around the defaults (docs/methods.md § 4): (method, label, overrides).
RHO = 0.05
ABLATION_VARIANTS = (
    ('erm', '', {}), ('mixup', '', {}), ('sam', '', {}), ('gmix', '', {}),
    ('bgmix', '', {}),                                             # mix_one_subset, γ=0.5, per_example
    ('bgmix', 'rule-pair_within_subsets', {'method.partition.bgmix_rule': 'pair_within_subsets'}),
    ('bgmix', 'rule-sam_on_sensitive', {'method.partition.bgmix_rule': 'sam_on_sensitive'}),
    ('bgmix', 'mix-insensitive', {'method.partition.mix_subset': 'insensitive'}),
    ('bgmix', 'partners-whole_batch', {'method.partition.partners': 'whole_batch'}),
    ('bgmix', 'gamma0.25', {'method.partition.gamma': 0.25}),
    ('bgmix', 'gamma0.75', {'method.partition.gamma': 0.75}),
    ('bgmix', 'est-first_order', {'method.sensitivity.estimator': 'first_order'}),
    ('bgmix', 'est-shared', {'method.sensitivity.estimator': 'shared'}),
    ('bgmix', 'est-stale', {'method.sensitivity.estimator': 'stale'}),
    ('dgmix', '', {}),
    ('dgmix', 'gamma0.25', {'method.partition.gamma': 0.25}),
    ('dgmix', 'gamma0.75', {'method.partition.gamma': 0.75}),
    ('dgmix', 'rho+0.1', {'method.partition.rho_plus': 2 * RHO}),
    ('dgmix', 'rho-0.1', {'method.partition.rho_minus': 2 * RHO}),
    ('dgmix', 'rho+0.1-rho-0.025', {'method.partition.rho_plus': 2 * RHO,
                                    'method.partition.rho_minus': RHO / 2}),
    ('dgmix', 'est-stale', {'method.sensitivity.estimator': 'stale'}),
    ('dgmix', 'est-shared', {'method.sensitivity.estimator': 'shared'}),
)


def ablation(seeds=SEEDS, steps=STEPS, dataset='mnist_subset', n=50) -> list[Run]:
  """The variants; the defaults and references (no variant) *are* benchmark
  runs (same config, same run id), so they are recorded once, under
  ``benchmark``, and report.py reads them from there."""
  return [Run('ablation' if v else 'benchmark', dataset, m, n, s, steps, variant=v,
              overrides=tuple(sorted(o.items())), keep_checkpoint=_keep(dataset, m, n, s))
          for m, v, o in ABLATION_VARIANTS for s in seeds]


# Efficient sharpness rules (docs/methods.md § 2) inside G-Mix, next to G-Mix
# with SAM and Mixup, at the benchmark's two smallest settings.
RULES_SETTINGS = (('digits', 10), ('mnist_subset', 50))
RULES_VARIANTS = (
    ('mixup', '', {}), ('gmix', '', {}),
    ('gmix', 'looksam', {'method.sharpness.rule': 'looksam'}),
    ('gmix', 'msam', {'method.sharpness.rule': 'msam'}),
    ('gmix', 'fsam', {'method.sharpness.rule': 'fsam'}),
    # A diagnostic of LookSAM's α (its cheap step pushes α‖g‖ along g_v whatever ρ is).
    ('gmix', 'looksam-a0.1', {'method.sharpness.rule': 'looksam',
                              'method.sharpness.looksam_alpha': 0.1}),
)


def rules(seeds=SEEDS, steps=STEPS) -> list[Run]:
  """G-Mix with each efficient rule, and its references, run on one machine
  (grid ``rules``, so the step costs and accuracies come from the same code)."""
  return [Run('rules', d, m, n, s, steps, variant=v, overrides=tuple(sorted(o.items())))
          for s in seeds for d, n in RULES_SETTINGS for m, v, o in RULES_VARIANTS]


# BG-Mix ranked by `shared` against `shared_prev` (ε along the previous step's
# ascent direction, docs/methods.md § 3.2), at the benchmark's two smallest
# settings, both on one machine.
ASCENT_VARIANTS = (
    ('bgmix', 'est-shared', {'method.sensitivity.estimator': 'shared'}),
    ('bgmix', 'est-shared_prev', {'method.sensitivity.estimator': 'shared_prev'}),
)


def ascent(seeds=SEEDS, steps=STEPS) -> list[Run]:
  """BG-Mix with ``shared`` and with ``shared_prev`` (grid ``ascent``)."""
  return [Run('ascent', d, m, n, s, steps, variant=v, overrides=tuple(sorted(o.items())))
          for s in seeds for d, n in RULES_SETTINGS for m, v, o in ASCENT_VARIANTS]


def smoke(seeds=(0, 1), steps=30) -> list[Run]:
  return [Run('smoke', 'digits', m, 10, s, steps) for m in ('erm', 'gmix') for s in seeds]


def everything(seeds=SEEDS, steps=STEPS, methods=METHODS) -> list[Run]:
  """benchmark + ablation, each run once (the ablation's references are benchmark runs)."""
  runs = {r.run_id + r.grid: r for r in benchmark(methods, seeds, steps)}
  runs.update({r.run_id + r.grid: r for r in ablation(seeds, steps)})
  return list(runs.values())


GRIDS = {'benchmark': benchmark, 'ablation': ablation, 'smoke': smoke, 'all': everything,
         'rules': rules, 'ascent': ascent}

# Step cost relative to ERM (docs/cost.md, "Cost per step": small CNN, CPU), for
# scheduling only: the longest runs start first, so they do not make the tail.
STEP_COST = {'multimix': 8.7, 'bgmix': 6.1, 'samix': 5.7, 'dgmix': 5.3, 'mixupe': 2.1,
             'asam': 2.1, 'gmix': 1.9, 'sam': 1.7, 'cutmix': 1.2, 'manifold_mixup': 1.2}


def schedule(runs: list[Run]) -> list[Run]:
  """Seed 0 of every config first (it fills the compilation cache that the
  other seeds then hit), longest first within each phase."""
  def cost(r: Run):
    c = STEP_COST.get(r.method, 1.0)
    if 'est-stale' in r.variant or 'est-shared' in r.variant:
      c = STEP_COST['gmix']
    return c * r.steps * (1.0 if r.dataset == 'mnist_subset' else 0.3)
  first = min((r.seed for r in runs), default=0)
  return sorted(runs, key=lambda r: (r.seed != first, -cost(r), r.run_id))


def get_grid(name: str, seeds=None, steps=None, methods=None) -> tuple[list[Run], list[str]]:
  """``(runs, notes)``: the grid's runs (methods the code lacks dropped, with a note)."""
  if name not in GRIDS:
    raise ValueError(f'--grid must be one of {sorted(GRIDS)}, got {name!r}')
  kwargs = {}
  if seeds is not None:
    kwargs['seeds'] = tuple(seeds)
  if steps is not None:
    kwargs['steps'] = steps
  if methods is not None and name in ('benchmark', 'all'):
    kwargs['methods'] = tuple(methods)
  runs = GRIDS[name](**kwargs)
  if methods is not None and name not in ('benchmark', 'all'):
    runs = [r for r in runs if r.method in methods]
  have = available_methods()
  missing = sorted({r.method for r in runs} - have)
  notes = [f'skipped method {m!r}: not in objectives.PRESETS / samix.METHODS of this checkout'
           for m in missing]
  return [r for r in runs if r.method in have], notes
