"""The ``linear_probe`` task: only the probe trains; a missing, unfinished or
damaged pretraining workdir is one clear error line."""
import glob
import json
import os
import shutil

import jax
import numpy as np
import pytest

import ssl_probe_config
from gmix_jax import checkpoints, main, models, train
from gmix_jax.tasks import moco
from test_moco import tiny_config

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  root = tmp_path_factory.mktemp('pre')
  with pytest.warns(UserWarning, match='capped'):
    train.train_and_evaluate(tiny_config(root / 'data'), str(root / 'moco'))
  return root


def probe_config(pretrained, workdir):
  c = ssl_probe_config.get_config()
  c.dataset.data_dir = str(pretrained / 'data')
  c.task.pretrained = str(workdir)
  return c


@pytest.mark.slow
def test_only_the_probe_trains_and_the_summary_is_supervised(pretrained, tmp_path):
  summary = train.train_and_evaluate(probe_config(pretrained, pretrained / 'moco'),
                                     str(tmp_path / 'probe'))
  assert summary['task'] == 'linear_probe' and 0 <= summary['final_test_accuracy'] <= 1
  _, pre = checkpoints.restore_state(str(pretrained / 'moco'))
  _, probe = checkpoints.restore_state(str(tmp_path / 'probe'))
  np.testing.assert_equal(jax.tree.structure(pre['params']),
                          jax.tree.structure(probe['params']['encoder']))
  for a, b in zip(jax.tree.leaves(pre['params']), jax.tree.leaves(probe['params']['encoder'])):
    np.testing.assert_array_equal(a, b)                 # the encoder never moved
  for a, b in zip(jax.tree.leaves(pre['model_state']),
                  jax.tree.leaves(probe['params']['frozen_state'])):
    np.testing.assert_array_equal(a, b)                 # nor its BatchNorm statistics
  assert jax.tree.leaves(pre['model_state'])           # (the CNN has BatchNorm)
  assert float(np.abs(probe['params']['probe']['kernel']).sum()) > 0
  with open(tmp_path / 'probe' / 'metrics.jsonl') as f:
    assert [json.loads(line)['step'] for line in f if '"train"' in line] == [1, 2, 3, 4, 5]
  # The frozen encoder's kNN (the probe's own feature path) is the pretraining run's monitor.
  pre_summary = json.loads((pretrained / 'moco' / 'summary.json').read_text())
  assert summary['final_knn_accuracy'] == pre_summary['final_knn_accuracy']


@pytest.mark.slow
def test_random_init_probe_trains_on_the_seeds_fresh_moco_encoder(pretrained, tmp_path):
  c = probe_config(pretrained, 'random')
  c.seed = 3
  summary = train.train_and_evaluate(c, str(tmp_path / 'probe'))
  assert summary['task'] == 'linear_probe' and 0 <= summary['final_test_accuracy'] <= 1
  assert 0 <= summary['final_knn_accuracy'] <= 1
  _, probe = checkpoints.restore_state(str(tmp_path / 'probe'))
  # Independently: a MoCo encoder of this model, default head, initialised from the seed.
  backbone = models.get_model('cnn', moco.DEFAULTS['proj_hidden'], width=4, norm='batch')
  fresh, fresh_state = models.init_model(moco.Projected(backbone, moco.DEFAULTS['proj_dim']),
                                         jax.random.PRNGKey(3), (8, 8, 1))
  np.testing.assert_equal(jax.tree.structure(fresh), jax.tree.structure(probe['params']['encoder']))
  for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(probe['params']['encoder'])):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(fresh_state), jax.tree.leaves(probe['params']['frozen_state'])):
    np.testing.assert_array_equal(a, b)                 # BatchNorm: mean 0, variance 1
  assert jax.tree.leaves(fresh_state)
  assert float(np.abs(probe['params']['probe']['kernel']).sum()) > 0


def _damage(wd):
  """Flips a bit every 97 bytes of every array data file of the last
  checkpoint, wherever Orbax put them (``state/**/d/*``): with one flip in the
  middle of a file, whether it hit an array's bytes depended on the layout."""
  step = max(int(n) for n in os.listdir(wd / 'checkpoints') if n.isdigit())
  paths = glob.glob(str(wd / 'checkpoints' / str(step) / 'state' / '**' / 'd' / '*'),
                    recursive=True)
  assert paths, 'no checkpoint data files to damage'
  for path in paths:
    raw = bytearray(open(path, 'rb').read())
    for i in range(len(raw) // 2 % 97, len(raw), 97):
      raw[i] ^= 1 << 3
    open(path, 'wb').write(raw)


@pytest.mark.slow
@pytest.mark.parametrize('case,message', [
    ('missing', 'no such directory'),
    ('unfinished', 'the run is not finished'),
    ('damaged', 'its last checkpoint does not read back or verify'),
    ('not_ssl', "that run's task.name is 'supervised'"),
])
def test_a_bad_pretraining_workdir_is_one_error_line(case, message, pretrained, tmp_path, capsys):
  wd = tmp_path / 'pre'
  if case != 'missing':
    shutil.copytree(pretrained / 'moco', wd)
  if case == 'unfinished':
    os.remove(wd / 'summary.json')
  elif case == 'damaged':
    _damage(wd)
  elif case == 'not_ssl':
    cfg = json.loads((wd / 'config.json').read_text())
    del cfg['task']
    (wd / 'config.json').write_text(json.dumps(cfg))
  code = main.main([f'--config={os.path.join(HERE, "ssl_probe_config.py")}',
                    f'--workdir={tmp_path / "probe"}',
                    f'--config.dataset.data_dir={pretrained / "data"}',
                    f'--config.task.pretrained={wd}'])
  err = capsys.readouterr().err
  assert code == 2, err
  assert err.startswith(f"error: task.pretrained='{wd}'") and message in err, err
  assert err.count('\n') == 1, err
