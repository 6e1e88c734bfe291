"""Install for each kind of user: the core needs only jax, optax and numpy; the
trainer needs the ``train`` extra, and without it the command line says so in
one line.

The core-only environment is built offline from this interpreter's own
site-packages: the distributions that pyproject.toml's core dependencies
require, transitively, are linked into a fresh folder, and a ``python -S``
subprocess (no site-packages) sees only that folder and the repository. So the
test checks what ``pip install gmix_jax`` would bring, not a list of blocked
modules.
"""
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

from gmix_jax import extras

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject():
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    return tomllib.load(f)['project']


def _canon(name: str) -> str:
  return re.sub(r'[-_.]+', '-', name).lower()


def test_core_dependencies_are_what_the_core_imports_and_extras_match_the_code():
  project = _pyproject()
  assert {_canon(Requirement(r).name) for r in project['dependencies']} == {'jax', 'optax', 'numpy'}
  optional = project['optional-dependencies']
  for extra, modules in extras.EXTRAS.items():
    assert {_canon(Requirement(r).name) for r in optional[extra]} == {
        _canon(d) for d in modules.values()}, extra
  assert Requirement(optional['all'][0]).extras == {'train', 'tensorboard', 'test'}


def _closure(names):
  """The installed distributions ``names`` need, transitively (no extras)."""
  seen, todo = {}, list(names)
  while todo:
    name = _canon(todo.pop())
    if name in seen:
      continue
    seen[name] = dist = importlib.metadata.distribution(name)
    for line in dist.requires or []:
      req = Requirement(line)
      if req.marker is None or req.marker.evaluate({'extra': ''}):
        todo.append(req.name)
  return seen


@pytest.fixture(scope='module')
def core_site(tmp_path_factory):
  """A folder holding only the core's dependency closure (links), plus gmix_jax."""
  site = tmp_path_factory.mktemp('core_site')
  deps = _closure(Requirement(r).name for r in _pyproject()['dependencies'])
  for dist in deps.values():
    base = dist.locate_file('')
    tops = {str(f).split('/')[0] for f in dist.files or []}
    for top in tops - {'..', '__pycache__', 'bin'}:
      if not (site / top).exists() and os.path.exists(os.path.join(base, top)):
        os.symlink(os.path.join(base, top), site / top)
  os.symlink(os.path.join(ROOT, 'gmix_jax'), site / 'gmix_jax')
  assert not {'flax', 'orbax-checkpoint', 'tensorstore', 'pillow'} & set(deps)
  return site


def _run(site, *args, cwd=None):
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  env['PYTHONPATH'] = str(site)
  return subprocess.run([sys.executable, '-S', *args], capture_output=True, text=True, env=env,
                        cwd=cwd or str(site), timeout=300)


def _readme_transform_example():
  with open(os.path.join(ROOT, 'README.md')) as f:
    quick_start = f.read().split('## Quick start for library users', 1)[1]
  return re.search(r'```python\n(.*?)```', quick_start, re.S).group(1)


def test_core_install_imports_the_core_and_runs_the_readme_example(core_site, tmp_path):
  script = tmp_path / 'example.py'
  script.write_text(
      'import sys\n'
      'from gmix_jax import transforms, sharpness, mixing, objectives, losses, partition, sensitivity\n'
      + _readme_transform_example() +
      '\nimport numpy as np\nnp.testing.assert_allclose(w, [1.0, -2.0, 0.5], atol=0.05)\n'
      'train_modules = {"flax", "orbax", "ml_collections", "tqdm", "matplotlib", "PIL", "grain"}\n'
      'print("LOADED", sorted(train_modules & {m.split(".")[0] for m in sys.modules}))\n')
  result = _run(core_site, str(script))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'LOADED []' in result.stdout
  # And the trainer's modules are truly absent there (the environment is core-only).
  absent = _run(core_site, '-c', 'import importlib.util as u; print([m for m in '
                '("flax", "orbax", "PIL", "ml_collections") if u.find_spec(m)])')
  assert absent.stdout.strip() == '[]', absent.stderr[-2000:]


@pytest.mark.parametrize('argv', [['--help'],
                                  ['--config=configs/default.py', '--workdir=wd']])
def test_cli_without_the_train_extra_names_the_extra_in_one_line(core_site, tmp_path, argv):
  result = _run(core_site, '-m', 'gmix_jax.main', *argv, cwd=str(tmp_path))
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.count('\n') == 1 and result.stdout == ''
  assert result.stderr.startswith("error: python -m gmix_jax.main needs the 'train' extra "
                                  '(missing: flax, orbax, ml_collections')
  assert "pip install 'gmix_jax[train]'" in result.stderr
  assert not (tmp_path / 'wd').exists()


def test_require_passes_when_installed_and_names_what_is_missing(monkeypatch):
  extras.require('train', 'the trainer')          # the test environment has everything
  monkeypatch.setitem(extras.EXTRAS, 'toy', {'json': 'stdlib', 'no_such_module_x': 'no-such'})
  with pytest.raises(extras.MissingExtraError, match=r"the trainer needs the 'toy' extra "
                     r"\(missing: no_such_module_x\); install it with: pip install 'gmix_jax\[toy\]'"):
    extras.require('toy', 'the trainer')
