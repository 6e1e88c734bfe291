"""Command line: python -m gmix_jax.main --config=configs/X.py --workdir=DIR [--config.a.b=v].

Rerunning the same command resumes from the workdir's latest checkpoint. On
SIGTERM the run checkpoints after its current step and exits 0; on Ctrl-C
(SIGINT) the same, exit code 130. A signal after the last step changes
nothing (exit 0). A locked workdir, config drift, checkpoints that do not
verify and a full disk end with one line ``error: ...`` and exit code 1.
"""
import shlex
import signal
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from gmix_jax import checkpoints
from gmix_jax import drift
from gmix_jax import lock
from gmix_jax import train
from gmix_jax import workdir as workdir_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Where metrics, checkpoints and the summary go.')
flags.mark_flags_as_required(['config', 'workdir'])


# Errors about the workdir, not the code: the message is the whole story.
WORKDIR_ERRORS = (lock.WorkdirLockedError, drift.ConfigDriftError,
                  checkpoints.CheckpointCorruptError, workdir_lib.DiskFullError)


def _after_the_run(signum, frame):
  """Outside ``train_and_evaluate`` (its own handlers are gone): the run is
  complete or checkpointed, so a late signal has nothing left to stop."""
  del signum, frame


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)   # Orbax logs every save at INFO
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, _after_the_run)     # put back by the trainer when it returns
  try:
    summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except WORKDIR_ERRORS as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)
  if summary.get('preempted'):
    command = ' '.join(shlex.quote(a) for a in [sys.executable, '-m', 'gmix_jax.main', *sys.argv[1:]])
    print(f"preempted at step {summary['step']}/{summary['steps']} ({summary['signal']}); "
          f"checkpoint {summary['checkpoint']}.\nTo resume, rerun the same command:\n  {command}",
          flush=True)
    if summary['signal'] == 'SIGINT':
      sys.exit(128 + signal.SIGINT)
    return
  print(f"final test accuracy {summary['final_test_accuracy']:.4f} "
        f"(ECE {summary['final_test_ece']:.4f}) after {summary['epochs']} epochs, "
        f"{summary['wall_time_sec']:.0f} s")
  print(f"metrics: {summary.get('metrics')}\nplot:    {summary.get('curves')}\n"
        f"summary: {FLAGS.workdir}/summary.json")


if __name__ == '__main__':
  app.run(main)
