"""Command line: python -m gmix_jax.main --config=configs/X.py[:METHOD] --workdir=DIR [--config.a.b=v].

``--help`` lists the flags, configs, method presets, models, datasets and
every config field with its documentation; ``--config=FILE --help`` shows that
config's values. Rerunning the same command resumes from the workdir's latest
checkpoint. On SIGTERM the run checkpoints after its current step and exits 0.

Exit status: 0 done (or preempted, or help), 2 a bad command line, config or
dataset (one line ``error: ...`` on stderr, before anything compiles).
"""
from __future__ import annotations

import os
import shlex
import sys
import warnings

from gmix_jax import cli


def _warning(message, category, filename, lineno, line=None):
  del category, filename, lineno, line
  return f'warning: {message}\n'


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  warnings.formatwarning = _warning    # gmix_jax's warnings as one line each
  try:
    args = cli.parse_argv(argv)
    config, notes = cli.load(args.config_spec, args.overrides) if args.config_spec else (None, [])
    for note in notes:
      print(f'note: {note}', file=sys.stderr)
    if args.help:
      print(cli.help_text(config))
      return 0
    if config is None or args.workdir is None:
      raise cli.UsageError(f'--config and --workdir are required; {cli.USAGE} (see --help)')
  except cli.UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2

  from absl import logging
  from gmix_jax import train
  logging.set_verbosity(logging.WARNING)   # Orbax logs every save at INFO
  try:
    summary = train.train_and_evaluate(config, args.workdir)
  # A bad config, dataset or workdir, or a dataset that cannot be prepared
  # here: all raised before training starts.
  except (ValueError, FileNotFoundError, ImportError) as e:
    if os.environ.get('GMIX_TRACEBACK'):
      raise
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    return 2
  if summary.get('preempted'):
    command = ' '.join(shlex.quote(a) for a in [sys.executable, '-m', 'gmix_jax.main', *argv])
    print(f"preempted at step {summary['step']}/{summary['steps']} (SIGTERM); checkpoint "
          f"{summary['checkpoint']}.\nTo resume, rerun the same command:\n  {command}", flush=True)
    return 0
  print(f"final test accuracy {summary['final_test_accuracy']:.4f} "
        f"(ECE {summary['final_test_ece']:.4f}) after {summary['epochs']} epochs, "
        f"{summary['wall_time_sec']:.0f} s")
  workdir = os.path.abspath(args.workdir)
  print(f"metrics: {summary.get('metrics')}\nplot:    {summary.get('curves')}\n"
        f"summary: {os.path.join(workdir, 'summary.json')}")
  return 0


if __name__ == '__main__':
  sys.exit(main())
