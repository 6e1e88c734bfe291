"""A workdir nobody can corrupt (issue #12): data validated before compiling,
checksummed checkpoints with fallback, the workdir lock, refused config
drift, clean ends (signals, full disk, strict-JSON summary).

Unit tests compare each check with an independent computation (a Python loop
over examples, a hand-made file); the end-to-end tests run the trainer, and
the CLI in a subprocess where the behaviour is the CLI's, on the tiny config
of tests/reliability_config.py.
"""
import os
import warnings

import jax
import numpy as np
import pytest

from gmix_jax import train
from gmix_jax.data import npz_source
from gmix_jax.data import validate
from test_train import tiny_config


# -- Data validation ------------------------------------------------------------
def test_nonfinite_rows_match_a_loop_over_examples(monkeypatch):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(50, 3, 4)).astype(np.float32)
  x[7, 1, 2], x[7, 0, 0], x[31, 2, 3], x[49, 0, 1] = np.nan, np.inf, -np.inf, np.nan
  monkeypatch.setattr(validate, '_CHUNK_BYTES', 3 * x[:1].nbytes)   # several chunks
  count, rows = validate.nonfinite_rows(x)
  loop = [i for i in range(len(x)) if not all(np.isfinite(v) for v in x[i].ravel())]
  assert count == 4 and rows.tolist() == loop == [7, 31, 49]
  assert validate.nonfinite_rows(np.zeros((3, 2), np.uint8))[0] == 0


def test_check_record_names_the_record():
  validate.check_record('d', 'train', 3, {'x': np.ones(2, np.float32), 'y': np.int64(1)}, 2)
  with pytest.raises(ValueError, match=r"'d': train record 3: label 2 outside \[0, 2\)"):
    validate.check_record('d', 'train', 3, {'image': np.ones(2), 'label': 2}, 2)
  with pytest.raises(ValueError, match=r"'d': test record 8: 1 non-finite feature"):
    validate.check_record('d', 'test', 8, (np.array([1.0, np.nan]), 0), 2)


def write_npz(path, case):
  rng = np.random.default_rng(0)
  a = {'x_train': rng.normal(size=(40, 6)).astype(np.float32), 'y_train': np.arange(40) % 3,
       'x_test': rng.normal(size=(9, 6)).astype(np.float32), 'y_test': np.arange(9) % 3}
  if case == 'nan_train':
    a['x_train'][[4, 17], 2] = np.nan
  elif case == 'inf_test':
    a['x_test'][5, 0] = np.inf
  elif case == 'label_declared':
    a['num_classes'] = np.int64(3)
    a['y_test'][2] = 3
  elif case == 'empty_test':
    a['x_test'], a['y_test'] = a['x_test'][:0], a['y_test'][:0]
  elif case == 'gap':                      # one stray label adds 6 empty classes
    a['y_train'][0] = 9
  elif case == 'npy':
    np.save(path, a['x_train'])
    os.replace(f'{path}.npy', path)
    return f'npz:{path}'
  elif case == 'pickled':
    a['y_test'] = np.array([None] * 9, dtype=object)
  np.savez(path, **a)
  return f'npz:{path}'


BAD_DATA = [
    ('nan_train', r'x_train holds 2 non-finite value\(s\) \(NaN or Inf\) in 2 example\(s\); '
                  r'first example indices: \[4, 17\]'),
    ('inf_test', r'x_test holds 1 non-finite .* indices: \[5\]'),
    ('label_declared', r'y_test has 1 label\(s\) outside \[0, 3\) \(num_classes=3\); '
                       r'first indices: \[2\], values: \[3\]'),
    ('empty_test', r'the test split is empty; the evaluation after each epoch needs'),
    ('npy', r'not an .npz file \(a single .npy array\)'),
    ('pickled', r"array 'y_test' holds Python objects \(pickled\)"),
]


@pytest.mark.parametrize('case,message', BAD_DATA)
def test_read_npz_refuses_bad_data(case, message, tmp_path):
  name = write_npz(tmp_path / 'd.npz', case)
  with pytest.raises(ValueError, match=message):
    npz_source.read_npz(name[4:])


def test_a_class_without_training_examples_is_warned(tmp_path):
  name = write_npz(tmp_path / 'd.npz', 'gap')
  with pytest.warns(UserWarning, match=r'6 of 10 classes have no training example: \[3, 4, 5'):
    *_, num_classes, _ = npz_source.read_npz(name[4:])
  assert num_classes == 10
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    npz_source.read_npz(write_npz(tmp_path / 'ok.npz', 'ok')[4:])


@pytest.mark.parametrize('case,message', BAD_DATA[:4])
def test_bad_data_stops_the_trainer_before_anything_compiles(case, message, tmp_path, monkeypatch):
  def no_jit(*a, **k):
    raise AssertionError('jax.jit called before the data was validated')
  monkeypatch.setattr(jax, 'jit', no_jit)
  c = tiny_config('erm', 'digits', tmp_path / 'data')
  c.dataset.name = write_npz(tmp_path / 'd.npz', case)
  c.dataset.examples_per_class = None
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(c, str(tmp_path / 'wd'))
  written = os.listdir(tmp_path / 'wd') if os.path.exists(tmp_path / 'wd') else []
  assert set(written) <= {'.lock'}, written
