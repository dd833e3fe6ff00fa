"""Runs one federated training job.

  python launch/main.py --config=configs/quickstart.py --workdir=runs/qs [--config.FIELD=VALUE]

Bad flags, configs, data or workdirs end the run before any compute with one line naming the
problem and a non-zero exit.
"""

import logging as pylogging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from launch import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for metrics, summary, checkpoints.')


def _quiet_libraries(record) -> bool:
  """Keeps orbax's per-save INFO chatter out of the progress log (warnings still show)."""
  return record.levelno >= pylogging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  del argv
  from fathom_sim.train import train_and_evaluate  # after flags: XLA_FLAGS may be set by then
  handler = logging.get_absl_handler()
  handler.python_handler.stream = sys.stdout
  handler.addFilter(_quiet_libraries)
  cli.run_or_exit(lambda: train_and_evaluate(_CONFIG.value, _WORKDIR.value))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main, flags_parser=cli.parse_flags_or_exit)
