"""Command line -> config: find the config file, load it, apply overrides, explain it.

``gmix_jax.main`` is the entry point; this module does the work that needs no
JAX, so ``--help`` and a misspelt field answer in a second, before anything
compiles. Every user error is a ``UsageError`` whose message is one line
naming the flag or field (``main`` prints it as ``error: ...``, exit 2).

Config files (``--config=FILE[:ARG]``) are found relative to the current
directory first, then to the repository that holds this package, so
``--config=configs/digits.py:gmix`` works from any directory; the directory
above the file's package (``configs/``) goes on ``sys.path`` so that its
``from configs import common`` imports resolve.

``model.kwargs`` are the chosen model's constructor arguments. They belong to
the config file's model: ``--config.model.name=OTHER`` drops them (with a
note) unless the command line sets ``model.kwargs`` itself, and
``--config.model.kwargs.KEY=VALUE`` may add keys the file did not set (a
Python literal, else a string). Overrides of every other field must name an
existing field (else the error suggests the closest names) and parse as its
type.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import os
import re
import sys
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USAGE = ('usage: python -m gmix_jax.main --config=FILE[:ARG] --workdir=DIR '
         '[--config.FIELD=VALUE ...]')


class UsageError(ValueError):
  """A bad command line or config value; the message is one line."""


@dataclasses.dataclass
class Args:
  config_spec: str | None = None     # FILE[:ARG] as given
  workdir: str | None = None
  overrides: list = dataclasses.field(default_factory=list)   # [(field, raw value)]
  help: bool = False


def check_environment() -> None:
  """The environment variables the library reads, checked before anything
  loads (`gmix_jax.decoder_env`: ``GMIX_JAX_JPEG_DECODER``); UsageError."""
  from gmix_jax import decoder_env  # pylint: disable=g-import-not-at-top
  try:
    decoder_env.jpeg_decoder()
  except ValueError as e:
    raise UsageError(str(e)) from None


def parse_argv(argv: list[str]) -> Args:
  """``argv`` (without the program name) -> ``Args``; no config is loaded yet."""
  args = Args()
  it = iter(argv)
  for arg in it:
    if arg in ('-h', '--help', '--helpfull', '-help'):
      args.help = True
      continue
    if not arg.startswith('--'):
      raise UsageError(f'unexpected argument {arg!r}; {USAGE}')
    name, eq, value = arg[2:].partition('=')
    if not eq:                         # --flag VALUE
      value = next(it, None)
      if value is None:
        raise UsageError(f'--{name} needs a value: --{name}=VALUE')
    if name == 'config':
      args.config_spec = value
    elif name == 'workdir':
      args.workdir = value
    elif name.startswith('config.') and len(name) > len('config.'):
      args.overrides.append((name[len('config.'):], value))
    else:
      raise UsageError(f'unknown flag --{name}; flags: --config, --workdir, --config.FIELD, --help')
  return args


def resolve_config_path(path: str, cwd: str | None = None) -> str:
  """An existing config file: absolute, else relative to ``cwd``, else to the repository."""
  path = os.path.expanduser(path)
  candidates = [path] if os.path.isabs(path) else [
      os.path.join(cwd or os.getcwd(), path), os.path.join(REPO_ROOT, path)]
  for candidate in candidates:
    if os.path.isfile(candidate):
      return os.path.abspath(candidate)
  folders = dict.fromkeys(os.path.dirname(os.path.abspath(c)) for c in candidates)  # once each
  raise UsageError(f'config file {path!r} not found (looked in: {", ".join(folders)})')


def load_config_file(spec: str):
  """``FILE[:ARG]`` -> the ``ml_collections.ConfigDict`` of ``get_config([ARG])``."""
  path, _, arg = spec.partition(':')
  path = resolve_config_path(path)
  # ``from configs import common`` inside the file: its package's parent first,
  # then the repository (for a stand-alone file elsewhere).
  package_parent = os.path.dirname(os.path.dirname(path))
  for root in (package_parent, REPO_ROOT):
    if root not in sys.path:
      sys.path.insert(0 if root == package_parent else len(sys.path), root)
  name = f'_gmix_config_{abs(hash(path))}'
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise UsageError(f'config file {path!r} defines no get_config()')
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except TypeError as e:
    raise UsageError(f'config {spec!r}: get_config() does not take {"an argument" if arg else "zero arguments"} '
                     f'({e})') from None
  return config


def did_you_mean(value, choices) -> str:
  """``"; did you mean 'x'?"`` for the choices close to ``value`` (a typo), else ``''``."""
  if not isinstance(value, str):
    return ''
  close = difflib.get_close_matches(value, [str(c) for c in choices], n=3, cutoff=0.6)
  return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ''


def _holder(config, field: str):
  """``(parent ConfigDict, last key)`` of an existing dotted ``field``."""
  *parents, key = field.split('.')
  node, seen = config, []
  for part in [*parents, key]:
    keys = list(node.keys()) if hasattr(node, 'keys') else []
    if part not in keys:
      close = difflib.get_close_matches(part, keys, n=3, cutoff=0.5)
      where = '.'.join(seen) or 'the config'
      hint = f"; did you mean {' or '.join(repr('.'.join([*seen, c])) for c in close)}?" if close else (
          f'; fields of {where}: {", ".join(sorted(keys))}' if keys else f'; {where} has no fields')
      raise UsageError(f'unknown config field {field!r}{hint}')
    if part != key:
      node = node[part]
    seen.append(part)
  return node, key


def _literal(raw: str):
  try:
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    return raw


def parse_value(field: str, raw: str, field_type):
  """``raw`` as a value of ``field_type`` (None = untyped: a Python literal or a string)."""
  import ml_collections
  if raw in ('None', 'none', 'null') and field_type is not bool:
    return None
  if field_type is bool:
    low = raw.lower()
    if low in ('true', '1', 'yes'):
      return True
    if low in ('false', '0', 'no'):
      return False
    raise UsageError(f'--config.{field}={raw}: expected true or false')
  if field_type in (int, float):
    try:
      value = field_type(raw) if field_type is float else int(raw, 0)
    except ValueError:
      raise UsageError(f'--config.{field}={raw}: expected {"an int" if field_type is int else "a float"}') from None
    return value
  if field_type is str:
    return raw
  if field_type in (tuple, list, dict, ml_collections.ConfigDict) or field_type is None:
    value = _literal(raw)
    if field_type is tuple and isinstance(value, (list, int, float, str)):
      value = tuple(value) if isinstance(value, list) else (value,)
    if field_type in (dict, ml_collections.ConfigDict) and not isinstance(value, dict):
      raise UsageError(f'--config.{field}={raw}: expected a dict such as {{"width": 16}}')
    return value
  return _literal(raw)


def apply_overrides(config, overrides: list[tuple[str, str]]) -> list[str]:
  """Applies ``--config.FIELD=VALUE`` overrides in place; returns notes for the user.

  ``model.kwargs`` overrides are applied last, after the kwargs of the file's
  model were dropped if ``model.name`` changed (see the module docstring).
  """
  notes = []
  kwargs_overrides = [(f, v) for f, v in overrides
                      if f == 'model.kwargs' or f.startswith('model.kwargs.')]
  file_model = config.model.name if 'model' in config else None
  for field, raw in overrides:
    if (field, raw) in kwargs_overrides:
      continue
    holder, key = _holder(config, field)
    value = parse_value(field, raw, _field_type(holder, key))
    try:
      holder[key] = value
    except (TypeError, ValueError) as e:
      raise UsageError(f'--config.{field}={raw}: {_one_line(e)}') from None
  if 'model' in config and config.model.name != file_model and config.model.get('kwargs'):
    if not kwargs_overrides:
      notes.append(f'model.name={config.model.name!r}: dropped the config file\'s model.kwargs '
                   f'{dict(config.model.kwargs)} (they were for {file_model!r}); set '
                   '--config.model.kwargs.KEY=VALUE for the new model')
    with config.unlocked():
      config.model.kwargs = {}
  for field, raw in kwargs_overrides:
    with config.unlocked():
      if field == 'model.kwargs':
        config.model.kwargs = parse_value(field, raw, dict)
      else:
        key = field[len('model.kwargs.'):]
        if '.' in key:
          raise UsageError(f'--config.{field}: model.kwargs take one level of keys')
        try:
          config.model.kwargs[key] = _literal(raw)
        except (TypeError, ValueError):       # the file set it with another type
          current = config.model.kwargs[key]
          kind = {'int': 'an int', 'bool': 'true or false', 'str': 'a string'}.get(
              type(current).__name__, f'a {type(current).__name__}')
          raise UsageError(f"--config.{field}={raw}: expected {kind} like the config file's "
                           f'{current!r}') from None
  return notes


def _field_type(holder, key):
  try:
    return holder.get_type(key)
  except (AttributeError, KeyError, TypeError):
    return None


def _one_line(error: BaseException) -> str:
  return ' '.join(str(error).split())


def load(spec: str, overrides: list[tuple[str, str]]):
  """``(config, notes)``: the config file with the overrides applied, locked."""
  config = load_config_file(spec)
  config.lock()
  notes = apply_overrides(config, overrides)
  return config, notes


# ----------------------------------------------------------------------------
# --help
# ----------------------------------------------------------------------------
def field_docs(path: str | None = None) -> dict[str, str]:
  """``{dotted field: its comment}`` read from configs/common.py.

  The file documents each field where it is set: ``c.a.b = value  # doc`` in
  ``base()``, ``'key': ...  # doc`` inside ``method()`` / ``samix()``.
  """
  path = path or os.path.join(REPO_ROOT, 'configs', 'common.py')
  if not os.path.exists(path):
    return {}
  prefixes = {'method': 'method', 'samix': 'method.samix'}
  docs, function, stack = {}, None, []
  with open(path) as f:
    for line in f:
      m = re.match(r'def (\w+)\(', line)
      if m:
        function, stack = m.group(1), []
        continue
      m = re.match(r'\s*c\.([\w.]+)\s*=.*?#\s*(.*\S)\s*$', line)
      if m and function == 'base':
        docs[m.group(1)] = m.group(2)
        continue
      if function not in prefixes:
        continue
      m = re.match(r"\s*'(\w+)':\s*\{\s*(#.*)?$", line)
      if m:                                   # a section opens on its own line
        stack.append(m.group(1))
        continue
      m = re.match(r"\s*'(\w+)':.*?#\s*(.*\S)\s*$", line)
      if m:
        docs['.'.join([prefixes[function], *stack, m.group(1)])] = m.group(2)
      if re.match(r'\s*\},?\s*(#.*)?$', line) and stack:
        stack.pop()
  return docs


def _leaves(config, prefix: str = '') -> list[tuple[str, Any]]:
  out = []
  for key in config.keys():
    value = config[key]
    name = f'{prefix}{key}'
    if hasattr(value, 'keys') and key != 'kwargs':
      out += _leaves(value, name + '.')
    else:
      out.append((name, value.to_dict() if hasattr(value, 'to_dict') else value))
  return out


def _config_files() -> list[tuple[str, str]]:
  folder = os.path.join(REPO_ROOT, 'configs')
  out = []
  for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
    if name.endswith('.py') and name not in ('__init__.py', 'common.py'):
      with open(os.path.join(folder, name)) as f:
        m = re.search(r'"""(.*?)\n', f.read(), re.S)
      out.append((f'configs/{name}', m.group(1).strip() if m else ''))
  return out


def _model_kwargs(constructor) -> str:
  """``name=value`` of the model.kwargs a registered model takes: the fields of
  the module it builds, with the values it builds them with (a ViT size's
  width and depth, a class default), less those fixed by its registry entry
  (``wrn28_10``'s width) and ``dtype`` (set by ``model.dtype``)."""
  import functools
  fixed = {}
  ctor = constructor
  while isinstance(ctor, functools.partial):
    fixed.update(ctor.keywords)
    ctor = ctor.func
  try:
    module = constructor(num_classes=10)   # a linen module is a dataclass: nothing is built
  except Exception:  # pylint: disable=broad-except
    return ''
  if not dataclasses.is_dataclass(module):
    return ''
  parts = []
  for f in dataclasses.fields(module):
    if f.name in ('parent', 'name', 'num_classes', 'dtype') or f.name in fixed or not f.init:
      continue
    value = getattr(module, f.name)
    value = getattr(value, '__name__', None) or repr(value)   # dtypes by name
    parts.append(f'{f.name}={value}')
  return ', '.join(parts)


def _common_defaults():
  """configs/common.py's ``base()``, with the SAMix-only section added."""
  if REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)
  from configs import common
  config = common.base()
  config.method.samix = common.samix()
  return config


def method_defaults(config) -> dict[str, tuple[Any, bool]]:
  """``{'method.SECTION.KNOB': (value, read)}`` for the knobs ``config`` leaves
  at None: the value the preset runs with, and whether the method reads the
  knob at all (`configure.ignored_knobs`). Empty when the method is not valid."""
  from gmix_jax import configure
  from gmix_jax.tasks import supervised
  try:
    method = configure.build_method(config, num_classes=10)
    samix_cfg = supervised.build_samix(config) if supervised.own_step(config) else None
  except Exception:  # pylint: disable=broad-except   (the run reports it)
    return {}
  parts = {'mixing': method.mixing, 'sharpness': method.sharpness,
           'partition': method.partition, 'sensitivity': method.sensitivity}
  radius = method.sharpness.radius if method.sharpness.active else None
  special = {('sharpness', 'rule'): method.sharpness.name, ('sharpness', 'rho'): radius,
             ('partition', 'rho_plus'): method.partition.rho_plus or radius,
             ('partition', 'rho_minus'): method.partition.rho_minus or radius,
             ('sensitivity', 'rho'): method.sensitivity_rho}
  values = {}
  for section in config.method.keys():
    knobs = config.method[section]
    if not hasattr(knobs, 'keys'):
      continue
    source = samix_cfg if section == 'samix' else parts.get(section)
    for key in knobs.keys():
      if knobs[key] is None and source is not None:
        values[f'method.{section}.{key}'] = special.get((section, key), getattr(source, key, None))
  # The knobs the method does not read: what ignored_knobs says of each once set.
  probe = config.copy_and_resolve_references()
  with probe.unlocked():
    for field, value in values.items():
      _, section, key = field.split('.')
      for trial in ([value] if value is not None else ['0', 0, 0.0]):   # None: any set value
        try:
          probe.method[section][key] = trial
          break
        except (TypeError, ValueError):
          pass
  unread = {m.split('=', 1)[0] for m in configure.ignored_knobs(probe, method)}
  if samix_cfg is not None:          # its own mixing; only method.sharpness composes with it
    unread = {f for f in values if f.split('.')[1] in ('mixing', 'partition', 'sensitivity')}
  return {field: (value, field not in unread) for field, value in values.items()}


def help_text(config=None) -> str:
  """The ``--help`` page; with ``config``, that config's values beside the field docs."""
  from gmix_jax import models, objectives, tasks
  from gmix_jax.tasks import supervised
  docs = field_docs()
  lines = [USAGE, '',
           'Trains one config; rerunning the same command resumes from the workdir\'s latest',
           'checkpoint. The method definitions: docs/methods.md.', '',
           'flags:',
           '  --config=FILE[:ARG]   a config file (relative to this directory or the repository);',
           '                        ARG is passed to its get_config(), e.g. a method preset',
           '  --workdir=DIR         metrics.jsonl, checkpoints/, curves.png, summary.json go here',
           '  --config.FIELD=VALUE  override one config field (listed below)',
           '  --help                this page; with --config, that config\'s values', '',
           'configs:']
  lines += [f'  {name:28s}{doc}' for name, doc in _config_files()]
  lines += ['', 'tasks (task.name; a config without a task section is supervised):',
            '  ' + ', '.join(tasks.names()), '',
            'method presets (method.name, or FILE:NAME):',
            '  ' + ', '.join(supervised.method_names()), '',
            'models (model.name) and their model.kwargs (constructor defaults):']
  lines += [f'  {name:16s}{_model_kwargs(ctor)}' for name, ctor in models.MODELS.items()]
  from gmix_jax import mixing
  lines += ['', 'mixing policies (method.mixing.policy; add one with gmix_jax.mixing.register):']
  lines += [f'  {name:16s}{spec.doc}' for name, spec in mixing.POLICIES.items()]
  lines += [f'  {name:16s}{variant.doc}' for name, variant in mixing.VARIANTS.items()]
  docs['method.mixing.policy'] = ' | '.join(objectives.mixing_policies())
  from gmix_jax.data import sources
  lines += ['', 'datasets (dataset.name):', '  ' + ', '.join(sources.dataset_names()), '']
  if config is None:
    lines.append('config fields (field = default  # doc; --config=FILE --help shows a config\'s '
                 'values):')
    config = _common_defaults()
    defaults = {}
  else:
    lines.append('this config\'s values (field = value  # doc; a method knob left at None shows '
                 'the value its preset runs with):')
    defaults = method_defaults(config)
    presets = supervised.method_names()
    if config.method.name not in presets:
      lines.append(f'  (method.name={config.method.name!r} is not a method preset'
                   f'{did_you_mean(config.method.name, presets)})')
  name_of = config.method.name
  for name, value in _leaves(config):
    doc = docs.get(name, '')
    shown = repr(value)
    if name in defaults:
      resolved, read = defaults[name]
      shown = (f'{resolved!r}  ({name_of} default)' if read and resolved is not None
               else f'None  (not read by {name_of})' if not read else 'None')
    lines.append(f'  {name} = {shown}' + (f'  # {doc}' if doc else ''))
  return '\n'.join(lines)

