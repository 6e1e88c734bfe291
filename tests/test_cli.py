"""The command line explains itself: help, one-line errors, configs from anywhere, model kwargs."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from gmix_jax import cli, main, models, objectives

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(capsys, *argv):
  code = main.main(list(argv))
  out = capsys.readouterr()
  return code, out.out, out.err


def test_help_exits_zero_and_lists_fields_presets_models_datasets(capsys):
  code, out, err = run_main(capsys, '--help')
  assert code == 0 and not err
  for preset in [*objectives.PRESETS, 'samix', 'samix_p']:
    assert preset in out
  for model in models.MODELS:
    assert f'\n  {model} ' in out
  assert 'mnist_subset' in out and 'npz:' in out and 'configs/digits.py' in out
  # Every field of the shared defaults is listed with its value and its comment.
  assert "optimizer.learning_rate = 0.05  # peak learning rate" in out
  assert "method.partition.gamma = None  # γ: fraction of the batch" in out
  assert "  cnn             width=32, norm='none'" in out     # a model's kwargs and defaults


def test_every_default_field_has_a_doc():
  """configs/common.py documents every field where it is set (the help reads it)."""
  docs = cli.field_docs()
  leaves = [name for name, _ in cli._leaves(cli._common_defaults())]
  assert [name for name in leaves if name not in docs] == []


def test_config_help_shows_that_configs_values(capsys):
  code, out, _ = run_main(capsys, '--config=configs/digits.py:dgmix', '--config.seed=3', '--help')
  assert code == 0
  assert "method.name = 'dgmix'" in out and 'seed = 3' in out
  assert "model.kwargs = {'hidden_sizes': (256, 256)}" in out


@pytest.mark.slow
def test_help_and_config_from_another_directory(tmp_path):
  """configs/X.py resolves against the repository when the cwd has no such file,
  and its ``from configs import common`` works there too (a fresh process)."""
  env = dict(os.environ, PYTHONPATH=REPO)
  out = subprocess.run([sys.executable, '-m', 'gmix_jax.main', '--config=configs/digits.py:gmix',
                        '--help'], cwd=tmp_path, env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  assert "method.name = 'gmix'" in out.stdout and "dataset.name = 'digits'" in out.stdout


def test_relative_path_prefers_the_working_directory(tmp_path, monkeypatch):
  (tmp_path / 'configs').mkdir()
  (tmp_path / 'configs' / 'digits.py').write_text(
      'from configs import common\n\ndef get_config():\n'
      '  c = common.base()\n  c.seed = 42\n  return c\n')
  monkeypatch.chdir(tmp_path)
  assert cli.resolve_config_path('configs/digits.py') == str(tmp_path / 'configs' / 'digits.py')
  assert cli.resolve_config_path('configs/mnist_subset.py') == os.path.join(
      REPO, 'configs', 'mnist_subset.py')
  with pytest.raises(cli.UsageError, match=r"config file 'configs/nope.py' not found"):
    cli.resolve_config_path('configs/nope.py')


@pytest.mark.parametrize('flag,message', [
    ('--config.method.nme=gmix',
     "error: unknown config field 'method.nme'; did you mean 'method.name'?"),
    ('--config.optimizer.learning_rat=0.1',
     "error: unknown config field 'optimizer.learning_rat'; did you mean 'optimizer.learning_rate'?"),
    ('--config.batch_size=many', 'error: --config.batch_size=many: expected an int'),
    ('--config.progress=maybe', 'error: --config.progress=maybe: expected true or false'),
    ('--config.optimizer.learning_rate=fast',
     'error: --config.optimizer.learning_rate=fast: expected a float'),
    ('--workdirr=/tmp/x', 'error: unknown flag --workdirr'),
])
def test_bad_fields_and_values_give_one_line_and_exit_2(capsys, flag, message):
  code, out, err = run_main(capsys, '--config=configs/digits.py:gmix', '--workdir=/unused', flag)
  assert code == 2 and not out
  assert err.startswith(message) and err.count('\n') == 1, err
  assert 'Traceback' not in err


@pytest.mark.parametrize('flags', [('--config=configs/digits.py:gmix', '--workdir=/unused'),
                                   ('--help',)])
def test_bad_jpeg_decoder_variable_is_one_line_before_anything_loads(capsys, monkeypatch, flags):
  monkeypatch.setenv('GMIX_JAX_JPEG_DECODER', 'turbo')
  monkeypatch.setattr(cli, 'load', lambda *a: pytest.fail('the config was loaded'))
  monkeypatch.setattr(cli, 'help_text', lambda *a: pytest.fail('help was built'))
  code, out, err = run_main(capsys, *flags)
  assert code == 2 and not out
  assert err == ('error: environment variable GMIX_JAX_JPEG_DECODER must be one of simplejpeg, '
                 "pil (unset: simplejpeg), got 'turbo'\n")


def test_valid_jpeg_decoder_variable_passes(monkeypatch):
  for value in ('pil', 'simplejpeg'):
    monkeypatch.setenv('GMIX_JAX_JPEG_DECODER', value)
    cli.check_environment()
  monkeypatch.delenv('GMIX_JAX_JPEG_DECODER')
  cli.check_environment()


def test_missing_flags_are_named(capsys):
  code, _, err = run_main(capsys, '--config=configs/digits.py')
  assert code == 2 and '--config and --workdir are required' in err


def test_kwargs_are_dropped_when_the_model_changes_unless_given():
  config, notes = cli.load('configs/default.py', [('model.name', 'mlp')])
  assert config.model.name == 'mlp' and dict(config.model.kwargs) == {}
  assert len(notes) == 1 and "they were for 'cnn'" in notes[0]
  # Given on the command line (in any order): kept, and new keys are allowed.
  config, notes = cli.load('configs/cifar10.py:gmix', [('model.kwargs.width', '10'),
                                                      ('model.name', 'wrn28')])
  assert (config.model.name, dict(config.model.kwargs), notes) == ('wrn28', {'width': 10}, [])
  config, _ = cli.load('configs/digits.py', [('model.kwargs.hidden_sizes', '(16,)')])
  assert dict(config.model.kwargs) == {'hidden_sizes': (16,)}
  config, _ = cli.load('configs/digits.py', [('model.kwargs', "{'hidden_sizes': (8, 8)}")])
  assert dict(config.model.kwargs) == {'hidden_sizes': (8, 8)}


def test_values_parse_as_the_fields_type():
  config, _ = cli.load('configs/digits.py', [
      ('dataset.examples_per_class', '50'), ('optimizer.grad_clip', '1'),
      ('method.sharpness.m', 'global'), ('optimizer.nesterov', 'false'),
      ('dataset.train_fraction', 'None')])
  assert config.dataset.examples_per_class == 50
  assert config.optimizer.grad_clip == 1.0 and isinstance(config.optimizer.grad_clip, float)
  assert config.method.sharpness.m == 'global' and config.optimizer.nesterov is False
  assert config.dataset.train_fraction is None


def test_a_data_error_from_the_trainer_is_one_line_too(capsys, tmp_path):
  code, _, err = run_main(capsys, '--config=configs/digits.py:gmix', f'--workdir={tmp_path / "wd"}',
                          f'--config.dataset.name=npz:{tmp_path / "missing.npz"}')
  assert code == 2 and err.startswith('error: npz dataset file not found') and err.count('\n') == 1


def test_a_model_change_prints_a_note(capsys):
  code, out, err = run_main(capsys, '--config=configs/default.py', '--config.model.name=mlp', '--help')
  assert code == 0 and err.startswith("note: model.name='mlp': dropped the config file's model.kwargs")
  assert 'model.kwargs = {}' in out


# Values that mean nothing are refused before anything runs (one line, exit 2).
@pytest.mark.parametrize('flag,message', [
    ('--config.dataset.examples_per_class=0', 'error: dataset.examples_per_class must be None'),
    ('--config.dataset.examples_per_class=-3', 'error: dataset.examples_per_class must be None'),
    ('--config.dataset.train_fraction=0', 'error: dataset.train_fraction must be None (every '
                                          'example) or a number in (0, 1], got 0.0'),
    ('--config.dataset.train_fraction=1.5', 'error: dataset.train_fraction must be None'),
    ('--config.num_devices=0', 'error: num_devices must be None (all) or an int in [1, '),
    ('--config.dataset.train_split=train[:5]', 'error: dataset.train_split must be a split name'),
    ('--config.dataset.train_split=unlabelled+train', "error: dataset.train_split='unlabelled+train' "
                                                      'needs a tfds dataset'),
    ('--workdir=', 'error: --workdir is empty'),
    ('--workdir=  ', 'error: --workdir is empty'),
])
def test_values_that_mean_nothing_are_refused(capsys, tmp_path, monkeypatch, flag, message):
  monkeypatch.chdir(tmp_path)                  # an empty --workdir would write here
  argv = ['--config=configs/digits.py:gmix', '--config.num_epochs=1', '--config.progress=false',
          '--config.plots=false', f'--workdir={tmp_path / "wd"}', flag]
  code, out, err = run_main(capsys, *argv)
  assert code == 2 and err.startswith(message) and err.count('\n') == 1, err
  assert os.listdir(tmp_path) == []            # nothing written: no workdir, no run in the cwd


@pytest.mark.parametrize('x', [np.array([['1.0', '2.0']] * 8), np.ones((8, 2), np.complex64)],
                         ids=['str', 'complex'])
def test_npz_features_that_are_not_real_numbers_are_refused(capsys, tmp_path, x):
  path = tmp_path / 'd.npz'
  y = np.arange(8) % 2
  np.savez(path, x_train=x, y_train=y, x_test=x, y_test=y)
  code, _, err = run_main(capsys, '--config=configs/digits.py:erm', f'--workdir={tmp_path / "wd"}',
                          f'--config.dataset.name=npz:{path}', '--config.num_epochs=1',
                          '--config.batch_size=8', '--config.progress=false', '--config.plots=false')
  assert code == 2 and err.count('\n') == 1, err
  assert err.startswith(f'error: {path}: x_train must hold real numbers'), err
  assert not (tmp_path / 'wd' / 'checkpoints').exists()


def test_a_bad_stats_file_stops_the_run_before_anything_is_written(capsys, tmp_path):
  """A stored gmix_stats.json of 3 channels for 1-channel digits: one line naming
  the file and how to rebuild it, exit 2, no checkpoint folder, no config.json."""
  from gmix_jax.data import sources, stats
  data = str(tmp_path / 'data')
  train = sources.open_split('digits', 'train', data)  # prepares digits (offline)
  path = os.path.join(train.meta_dir, stats.STATS_FILE)
  with open(path, 'w') as f:
    f.write(f'{{"version": 1, "num_records": {len(train)}, "pixel_max": {train.pixel_max}, '
            '"mean": [0.3, 0.3, 0.3], "std": [0.3, 0.3, 0.3]}')
  capsys.readouterr()                                  # the preparation's note
  workdir = tmp_path / 'wd'
  code, _, err = run_main(capsys, '--config=configs/digits.py:erm', f'--workdir={workdir}',
                          f'--config.dataset.data_dir={data}', '--config.num_epochs=1',
                          '--config.progress=false', '--config.plots=false')
  assert code == 2 and err.count('\n') == 1, err
  assert err.startswith(f'error: statistics file {path}: it has statistics of 3 channel(s), the '
                        "dataset's examples have 1") and 'delete it and rerun' in err, err
  assert not (workdir / 'checkpoints').exists() and not (workdir / 'config.json').exists()


# --help with a config shows what the preset runs with; every model its kwargs.
def test_config_help_shows_the_presets_resolved_knobs(capsys):
  from gmix_jax import sharpness
  code, out, _ = run_main(capsys, '--config=configs/digits.py:dgmix', '--help')
  assert code == 0
  method = objectives.get_method('dgmix', 10)       # the preset, built independently
  rho = sharpness.DEFAULT_RHO[method.sharpness.name]
  assert f'  method.sharpness.rho = {rho!r}  (dgmix default)  # ρ' in out
  assert f'  method.partition.gamma = {method.partition.gamma!r}  (dgmix default)' in out
  assert f"  method.partition.rule = 'decomposed'  (dgmix default)" in out
  assert f'  method.partition.rho_plus = {rho!r}  (dgmix default)' in out   # None = ρ
  assert f'  method.mixing.alpha = {method.mixing.alpha!r}  (dgmix default)' in out
  assert '  method.sharpness.asam_eta = None  (not read by dgmix)' in out   # SAM's rule
  assert '  method.mixing.k = None  (not read by dgmix)' in out             # multimix only
  # A knob the command line sets is shown as set.
  code, out, _ = run_main(capsys, '--config=configs/digits.py:dgmix',
                          '--config.method.sharpness.rho=0.2', '--help')
  assert '  method.sharpness.rho = 0.2  # ρ' in out


def test_every_model_lists_the_kwargs_it_takes(capsys):
  from gmix_jax import models
  code, out, _ = run_main(capsys, '--help')
  assert code == 0
  for name, ctor in models.MODELS.items():
    line = next(l for l in out.splitlines() if l.startswith(f'  {name} '))
    parts = re.split(r', (?=\w+=)', line[len(f'  {name} '):].strip())
    listed = dict(part.split('=', 1) for part in parts)
    assert listed, name
    module = models.get_model(name, 10, **{k: getattr(ctor(num_classes=10), k) for k in listed})
    for key, shown in listed.items():       # each is a constructor field with that value
      value = getattr(module, key)
      assert shown == (getattr(value, '__name__', None) or repr(value)), (name, key)
  vit = next(l for l in out.splitlines() if l.startswith('  vit_b16 '))
  assert "width=768" in vit and "pool='tok'" in vit and 'dropout=0.0' in vit


def test_a_misspelt_preset_gets_a_suggestion(capsys, tmp_path):
  code, out, err = run_main(capsys, '--config=configs/digits.py:gmx', f'--workdir={tmp_path}/wd')
  assert code == 2 and err.count('\n') == 1 and "got 'gmx'; did you mean 'gmix'" in err, err
  assert not os.path.exists(tmp_path / 'wd')
  code, out, _ = run_main(capsys, '--config=configs/digits.py:gmx', '--help')
  assert code == 0 and "(method.name='gmx' is not a method preset; did you mean 'gmix'" in out


def test_config_not_found_names_each_folder_once(tmp_path):
  for cwd in (REPO, str(tmp_path)):
    with pytest.raises(cli.UsageError) as e:
      cli.resolve_config_path('configs/nope.py', cwd=cwd)
    folders = str(e.value).split('(looked in: ')[1].rstrip(')').split(', ')
    assert len(folders) == len(set(folders)) and os.path.join(REPO, 'configs') in folders
    assert (os.path.join(str(tmp_path), 'configs') in folders) == (cwd != REPO)
