"""Every supervised config trains bit-for-bit as before the task interface.

``supervised_golden.json`` holds, for a few short runs, the SHA-256 of the
final TrainState (every array, as the checkpoint's digest computes it) and
the exact final test metrics, recorded on the commit before ``config.task``
existed, with the jax/jaxlib versions stored in the file. Under those versions
the runs must match bit for bit. Another XLA may round differently (JAX 0.12
changes the last bits of one BG-Mix loss), so under other versions the losses
and metrics must match to a relative 1e-5 and the state's digest is not
compared. Regenerate (only for an intended change of behaviour) with the
command stored in the file.
"""
import json
import os

import jax
import jaxlib
import numpy as np
import pytest

from configs import common
from gmix_jax import checkpoints
from gmix_jax import digest as digest_lib
from gmix_jax import train

GOLDEN = os.path.join(os.path.dirname(__file__), 'supervised_golden.json')
COMMAND = 'GMIX_WRITE_GOLDEN=1 python -m pytest -q -n 0 tests/test_supervised_unchanged.py'
# (method, parallel, model): ERM, G-Mix, BG-Mix (per-example s_i), DG-Mix with
# the stale table, Mixup under pmap, SAMix (mixblock + EMA state in `extra`).
RUNS = [('erm', 'shard_map'), ('gmix', 'shard_map'), ('bgmix', 'shard_map'),
        ('dgmix_stale', 'shard_map'), ('mixup', 'pmap'), ('samix', 'shard_map')]


def tiny(method: str, parallel: str, data_dir: str):
  c = common.base()
  c.dataset.name = 'digits'
  c.dataset.data_dir = data_dir
  c.dataset.examples_per_class = 4           # 40 examples -> 2 steps of 20
  c.batch_size = 20
  c.model.name = 'mlp'
  c.model.kwargs = {'hidden_sizes': (16,)}
  name = method.split('_')[0]
  c.method = common.method(name)
  if method == 'dgmix_stale':
    c.method.sensitivity.estimator = 'stale'
  if name == 'samix':
    c.model.name = 'cnn'
    c.model.kwargs = {'width': 4, 'norm': 'none'}
    c.method.samix.feature_layer = 'conv0'
  c.num_epochs = 1
  c.num_devices = 2
  c.parallel = parallel
  c.eval_batch_size = 64
  c.log_every_steps = 1
  c.progress = False
  c.plots = False
  return c


def run(method, parallel, tmp_path) -> dict:
  wd = str(tmp_path / f'{method}_{parallel}')
  summary = train.train_and_evaluate(tiny(method, parallel, str(tmp_path / 'data')), wd)
  step, state = checkpoints.restore_state(wd)
  with open(os.path.join(wd, 'metrics.jsonl')) as f:
    losses = [json.loads(line)['loss'] for line in f if '"train"' in line]
  return {'step': step, 'state_sha256': digest_lib.json_digest(digest_lib.tree_digests(state)),
          'train_losses': losses, 'final_test_accuracy': summary['final_test_accuracy'],
          'final_test_loss': summary['final_test_loss']}


def test_supervised_runs_match_the_recorded_ones(tmp_path):
  got = {f'{m}/{p}': run(m, p, tmp_path) for m, p in RUNS}
  if os.environ.get('GMIX_WRITE_GOLDEN'):
    with open(GOLDEN, 'w') as f:
      json.dump({'command': COMMAND, 'runs': got, 'jax': jax.__version__,
                 'jaxlib': jaxlib.__version__}, f, indent=1, sort_keys=True)
      f.write('\n')
    pytest.skip(f'wrote {GOLDEN}')
  with open(GOLDEN) as f:
    golden = json.load(f)
  want = golden['runs']
  assert sorted(got) == sorted(want)
  exact = (golden['jax'], golden['jaxlib']) == (jax.__version__, jaxlib.__version__)
  for name in want:
    if exact:
      assert got[name] == want[name], name
      continue
    assert got[name]['step'] == want[name]['step'], name
    for key in ('train_losses', 'final_test_accuracy', 'final_test_loss'):
      np.testing.assert_allclose(got[name][key], want[name][key], rtol=1e-5,
                                 err_msg=f'{name} {key}')
