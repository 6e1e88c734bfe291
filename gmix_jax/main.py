"""Command line: python -m gmix_jax.main --config=configs/X.py --workdir=DIR [--config.a.b=v].

Rerunning the same command resumes from the workdir's latest checkpoint. On
SIGTERM the run checkpoints after its current step and exits 0.
"""
import shlex
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from gmix_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Where metrics, checkpoints and the summary go.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)   # Orbax logs every save at INFO
  summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if summary.get('preempted'):
    command = ' '.join(shlex.quote(a) for a in [sys.executable, '-m', 'gmix_jax.main', *sys.argv[1:]])
    print(f"preempted at step {summary['step']}/{summary['steps']} (SIGTERM); checkpoint "
          f"{summary['checkpoint']}.\nTo resume, rerun the same command:\n  {command}", flush=True)
    return
  print(f"final test accuracy {summary['final_test_accuracy']:.4f} "
        f"(ECE {summary['final_test_ece']:.4f}) after {summary['epochs']} epochs, "
        f"{summary['wall_time_sec']:.0f} s")
  print(f"metrics: {summary.get('metrics')}\nplot:    {summary.get('curves')}\n"
        f"summary: {FLAGS.workdir}/summary.json")


if __name__ == '__main__':
  app.run(main)
