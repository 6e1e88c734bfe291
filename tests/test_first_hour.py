"""What a new user sees in the first hour says what happened: a rerun of a
finished run says it trained nothing, a first dataset preparation says it
prepares, a data_dir the readers cannot open is refused up front."""
import pytest

from gmix_jax import main
from gmix_jax.data import jpeg_sources


def _tiny(tmp_path, workdir):
  return ['--config=configs/digits.py:erm', f'--workdir={workdir}',
          f'--config.dataset.data_dir={tmp_path / "data"}', '--config.dataset.examples_per_class=4',
          '--config.model.kwargs.hidden_sizes=(8,)', '--config.batch_size=20',
          '--config.num_epochs=1', '--config.num_devices=1', '--config.progress=False',
          '--config.plots=False']


@pytest.mark.slow
def test_rerunning_a_finished_run_says_it_trained_nothing(capsys, tmp_path):
  argv = _tiny(tmp_path, tmp_path / 'wd')
  assert main.main(argv) == 0
  first = capsys.readouterr().out.splitlines()[0]
  assert first.startswith('final test accuracy ') and 'nothing was trained' not in first
  assert main.main(argv) == 0
  again = capsys.readouterr().out.splitlines()[0]
  assert again.startswith(f'{tmp_path / "wd"} holds a finished run: nothing was trained')
  # The figures are the finished run's, the same as the first launch printed.
  assert first.split(' after ')[0].replace('final test accuracy', '') in again


def test_mnist_jpeg_first_preparation_prints_one_line(capsys, tmp_path, monkeypatch):
  monkeypatch.setattr(jpeg_sources, '_write_mnist_jpeg', lambda root: None)   # the line, not the build
  jpeg_sources.prepare_mnist_jpeg(str(tmp_path))
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith("preparing the offline dataset 'mnist_jpeg' in ")
  jpeg_sources.prepare_mnist_jpeg(str(tmp_path))          # prepared: silent
  assert capsys.readouterr().err == ''


@pytest.mark.slow
@pytest.mark.parametrize('url', ['gs://bucket/tfds', 's3://b/d', 'file:///tmp/tfds'])
def test_a_url_data_dir_is_one_error_line(capsys, tmp_path, url):
  code = main.main(['--config=configs/mnist_jpeg.py:erm', f'--workdir={tmp_path / "wd"}',
                    f'--config.dataset.data_dir={url}'])
  err = capsys.readouterr().err
  assert code == 2 and err.count('\n') == 1
  assert err.startswith(f"error: dataset.data_dir='{url}': URLs are not supported")
  assert not (tmp_path / 'wd').exists()                   # refused before anything is written
