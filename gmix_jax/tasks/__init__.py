"""Tasks: what a run learns (docs/methods.md § 8).

A task is one object that the trainer (``train.py``, ``configure.py``) calls
without knowing which task it is. It says

  check_config  every config error of its own (before any data or compile),
                returning the composed method (mixing × sharpness ×
                partition) that it trains with;
  ignored_knobs the config knobs it never reads (warned about);
  check_data    what needs the data (labels, shapes), before compiling;
  step_parts    the per-device objective and its extra state: created at
                init, carried in ``TrainState.extra`` (so checkpointed,
                digested, restored and placed on the devices like the rest)
                and updated inside the compiled step by ``extra_update``;
                and what its sharpness rule needs of the trainer (phases,
                objective inputs; ``drives_rules``);
  views         what a data record becomes (one view, or two augmented views);
  label_free    whether its loss reads no labels, so that it may train on a
                ``dataset.train_split`` union holding unlabelled records;
  build_model   the module it trains;
  evaluate      its evaluation record, ``summary_metrics`` and ``progress``
                what the summary and the progress bar show of it;
  summary_name  how the summary names what was trained.

``config.task.name`` selects the task (``common.task(NAME)`` builds the
section); a config without a ``task`` section is ``supervised``, so every
config written before tasks existed trains, resumes and hashes as before.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import ml_collections

PyTree = Any
DEFAULT = 'supervised'


@dataclasses.dataclass(frozen=True)
class StepParts:
  """What ``parallel.make_per_device_step`` takes from a task.

  ``objective(params, model_state, batch, rng[, extra]) -> (grads,
  model_state, metrics[, extra_grads])``; ``extra`` is the task's initial
  extra state (None: none) and ``extra_update(extra, extra_grads, params,
  model_state, step) -> extra`` its update after the model's.
  """
  objective: Callable
  extra: Optional[PyTree] = None
  extra_update: Optional[Callable] = None
  # The initial model (None: the fresh initialisation passed to step_parts);
  # e.g. a linear probe's frozen, pretrained encoder.
  params: Optional[PyTree] = None
  model_state: Optional[PyTree] = None
  # A sharpness rule's needs (``objectives.RuleDriver``): ``objective_inputs``
  # (``state -> dict`` added to the batch); ``phases`` {name: objective}, one
  # compiled program each, and ``phase(step) -> name`` choosing one on the host.
  objective_inputs: Optional[Callable] = None
  phases: Optional[dict] = None
  phase: Optional[Callable[[int], str]] = None

  def map_objectives(self, fn: Callable) -> 'StepParts':
    """These parts with ``fn`` applied to the objective and every phase's."""
    phases = None if self.phases is None else {k: fn(v) for k, v in self.phases.items()}
    return dataclasses.replace(self, objective=fn(self.objective), phases=phases)


class Task:
  """The interface (one instance per task, stateless). Subclasses override
  what they need; the defaults are the plain supervised choices."""
  name: str = ''

  def check_config(self, config: ml_collections.ConfigDict):
    raise NotImplementedError

  def build_method(self, config: ml_collections.ConfigDict, num_classes: int):
    raise NotImplementedError

  def ignored_knobs(self, config: ml_collections.ConfigDict, method) -> list[str]:
    return []

  def check_data(self, config: ml_collections.ConfigDict, ds, module, method) -> None:
    pass

  def step_parts(self, config: ml_collections.ConfigDict, method, module, apply_fn, ds,
                 total_steps: int, params, model_state) -> StepParts:
    raise NotImplementedError

  def drives_rules(self, config: ml_collections.ConfigDict) -> bool:
    """Whether its step drives every sharpness rule, the non-plain ones
    (``objectives.RuleDriver``: state, phases, objective inputs) included;
    False: only the plain rules (``objectives.plain_rules``)."""
    return False

  def summary_name(self, config: ml_collections.ConfigDict) -> dict:
    return {'task': self.name, 'method': config.method.name}

  # What a data record becomes: 1 view (``x``), or 2 (``x``, ``x2``).
  views: int = 1
  # The loss reads no labels: dataset.train_split may add unlabelled splits.
  label_free: bool = False

  def build_optimizer(self, config: ml_collections.ConfigDict, steps_per_epoch: int):
    """The optax transformation of the parameters (a task may freeze some)."""
    from gmix_jax import configure
    return configure.build_optimizer(config, steps_per_epoch)

  def build_model(self, config: ml_collections.ConfigDict, num_classes: int):
    """``(module, apply_fn)``: the model the objective trains."""
    from gmix_jax import configure
    return configure.build_model(config, num_classes)

  def evaluate(self, s, placed, state) -> dict:
    """One evaluation record's fields (``s``: ``train.Setup``; ``placed``:
    ``train.Placed``; ``state``: as ``placed.eval_fn`` takes it)."""
    raise NotImplementedError

  def summary_metrics(self, last_eval: dict, history: list[dict]) -> dict:
    """The summary's result fields from the last and every evaluation."""
    raise NotImplementedError

  def progress(self, last_eval: dict) -> dict:
    """The progress bar's fields from the last evaluation."""
    return {}


def _registry() -> dict[str, Task]:
  from gmix_jax.tasks import linear_probe, moco, samix_ssl, samix_ssl_p, supervised
  return {t.name: t for t in (supervised.TASK, moco.TASK, samix_ssl.TASK, samix_ssl_p.TASK,
                              linear_probe.TASK)}


def names() -> list[str]:
  return sorted(_registry())


def label_free_names() -> list[str]:
  """The tasks that may train on unlabelled records (``Task.label_free``)."""
  return sorted(n for n, t in _registry().items() if t.label_free)


def name_of(config: ml_collections.ConfigDict) -> str:
  """``config.task.name``; ``'supervised'`` for a config without a task section."""
  section = config.get('task')
  return (section.get('name') if section is not None else None) or DEFAULT


def get(config: ml_collections.ConfigDict) -> Task:
  """The task a config selects.

  Raises:
    ValueError: an unknown ``task.name`` (naming the allowed ones).
  """
  name, registry = name_of(config), _registry()
  if name not in registry:
    from gmix_jax import cli  # pylint: disable=g-import-not-at-top
    raise ValueError(f'task.name must be one of {sorted(registry)}, got {name!r}'
                     f'{cli.did_you_mean(name, registry)}')
  return registry[name]
