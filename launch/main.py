"""Runs one federated training job.

  python launch/main.py --config=configs/quickstart.py --workdir=runs/qs [--config.FIELD=VALUE]

Bad flags, configs, data or workdirs end the run before any compute with one line naming the
problem and a non-zero exit.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from launch import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for metrics, summary, checkpoints.')



def main(argv):
  del argv
  from fathom_sim.train import train_and_evaluate  # after flags: XLA_FLAGS may be set by then
  cli.setup_logging()
  cli.run_or_exit(lambda: train_and_evaluate(_CONFIG.value, _WORKDIR.value))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main, flags_parser=cli.parse_flags_or_exit)
