"""Command line: python -m gmix_jax.main --config=configs/X.py[:METHOD] --workdir=DIR [--config.a.b=v].

``--help`` lists the flags, configs, method presets, models, datasets and
every config field with its documentation; ``--config=FILE --help`` shows that
config's values. Rerunning the same command resumes from the workdir's latest
checkpoint. On SIGTERM the run checkpoints after its current step and exits 0;
on Ctrl-C (SIGINT) the same, exit code 130; a second Ctrl-C aborts at once
(one line, exit 130, the last checkpoint kept). A signal during start-up,
before anything is written, stops the run there (exit 0 for SIGTERM, 130 for
SIGINT); a signal after the last step changes nothing (exit 0).

Exit status: 0 done (or preempted by SIGTERM, or help); 2 a bad command line,
environment variable (``GMIX_JAX_JPEG_DECODER``),
config or dataset, or the ``train`` extra not installed, or a workdir that
cannot be written (one line ``error: ...`` on stderr, before anything compiles;
or a dataset record that cannot be read, when the run reaches it under
``dataset.bad_records='error'``, its last checkpoint kept); 1 a locked workdir,
config drift, checkpoints that do not verify or a full disk (one line
``error: ...``); 130 stopped by SIGINT.
"""
from __future__ import annotations

import os
import shlex
import signal
import sys
import time
import warnings

from gmix_jax import cli
from gmix_jax import extras
from gmix_jax import preemption


def _warning(message, category, filename, lineno, line=None):
  del category, filename, lineno, line
  return f'warning: {message}\n'


def _after_the_run(signum, frame):
  """Outside ``train_and_evaluate`` (its own handlers are gone): the run is
  complete or checkpointed, so a late signal has nothing left to stop."""
  del signum, frame


def _start_hook() -> None:
  """Tests: with ``GMIX_START_HOOK=PATH``, create PATH and wait until it is
  removed, so that a signal can be sent at a known point of start-up."""
  path = os.environ.get('GMIX_START_HOOK')
  if not path:
    return
  open(path, 'w').close()
  while os.path.exists(path):
    time.sleep(0.01)


def _parse(argv: list[str]):
  """``(config, workdir)``, or an exit code (help printed, or a usage error)."""
  try:
    cli.check_environment()
    args = cli.parse_argv(argv)
    config, notes = cli.load(args.config_spec, args.overrides) if args.config_spec else (None, [])
    for note in notes:
      print(f'note: {note}', file=sys.stderr)
    if args.help:
      print(cli.help_text(config))
      return 0
    if config is None or args.workdir is None:
      raise cli.UsageError(f'--config and --workdir are required; {cli.USAGE} (see --help)')
    if not args.workdir.strip():       # '' would write the run into the current directory
      raise cli.UsageError(f'--workdir is empty; name a directory for the run: {cli.USAGE}')
  except cli.UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return config, args.workdir


def result_line(summary: dict, workdir: str) -> str:
  """What the run achieved; for a workdir that already held a finished run,
  says that nothing was trained and that the figures are that run's."""
  if 'final_test_accuracy' in summary:
    result = (f"final test accuracy {summary['final_test_accuracy']:.4f} "
              f"(ECE {summary['final_test_ece']:.4f}) after {summary['epochs']} epochs")
  else:                                # a pretraining task (moco, samix_ssl): the kNN monitor
    result = (f"final kNN accuracy {summary['final_knn_accuracy']:.4f} "
              f"(best {summary['best_knn_accuracy']:.4f}) after {summary['epochs']} epochs")
  if summary.get('finished_before'):
    return (f"{workdir} holds a finished run: nothing was trained (summary.json and the plot "
            f"were re-written; use a new --workdir for a new run). Its {result}, "
            f"{summary['total_wall_time_sec']:.0f} s over all its launches")
  return f"{result}, {summary['wall_time_sec']:.0f} s"


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  preemption.on_start_up()             # a signal from here on is a request, not a crash
  _start_hook()
  warnings.formatwarning = _warning    # gmix_jax's warnings as one line each
  try:                                 # a core-only install: say which extra, not a traceback
    extras.require('train', 'python -m gmix_jax.main')
  except extras.MissingExtraError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  parsed = _parse(argv)
  if isinstance(parsed, int):
    return parsed
  config, workdir = parsed

  # Imported only for a valid command line: --help and usage errors answer at once.
  from absl import logging
  from gmix_jax import checkpoints, drift, lock, train
  from gmix_jax import workdir as workdir_lib
  # Errors about the workdir, not the code: the message is the whole story.
  workdir_errors = (lock.WorkdirLockedError, drift.ConfigDriftError,
                    checkpoints.CheckpointCorruptError, workdir_lib.DiskFullError)
  logging.set_verbosity(logging.WARNING)   # Orbax logs every save at INFO
  try:
    summary = train.train_and_evaluate(config, workdir)
  except preemption.StoppedBeforeStart as e:
    print(e, file=sys.stderr, flush=True)
    return 128 + signal.SIGINT if e.signal_name == 'SIGINT' else 0
  except lock.WorkdirNotWritableError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    return 2
  except workdir_errors as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    return 1
  # A bad config or dataset, or a dataset that cannot be prepared here: raised
  # before training starts. GMIX_TRACEBACK=1 shows where.
  except (ValueError, FileNotFoundError, ImportError) as e:
    if os.environ.get('GMIX_TRACEBACK'):
      raise
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    return 2
  finally:
    for sig in (signal.SIGTERM, signal.SIGINT):
      signal.signal(sig, _after_the_run)   # the run is over: nothing left to stop
  if summary.get('preempted'):
    command = ' '.join(shlex.quote(a) for a in [sys.executable, '-m', 'gmix_jax.main', *argv])
    print(f"preempted at step {summary['step']}/{summary['steps']} ({summary['signal']}); "
          f"checkpoint {summary['checkpoint']}.\nTo resume, rerun the same command:\n  {command}",
          flush=True)
    return 128 + signal.SIGINT if summary['signal'] == 'SIGINT' else 0
  print(result_line(summary, workdir))
  print(f"metrics: {summary.get('metrics')}\nplot:    {summary.get('curves')}\n"
        f"summary: {os.path.join(os.path.abspath(workdir), 'summary.json')}")
  return 0


if __name__ == '__main__':
  sys.exit(main())
