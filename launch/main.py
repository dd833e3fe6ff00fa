"""Runs one federated training job.

  python launch/main.py --config=configs/quickstart.py --workdir=runs/qs [--config.FIELD=VALUE]

Bad flags, configs, data or workdirs end the run with one line naming the problem and a
non-zero exit: before any compute, but for a prepared dataset's records, checked as rounds read
them.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from launch import cli  # noqa: E402

sys.argv = cli.expand_flagfiles(sys.argv)  # before --config is defined: it reads them
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for metrics, summary, checkpoints.')
_MULTIHOST = flags.DEFINE_bool(
    'multihost', False, 'Join a multi-host run whose processes JAX finds itself (Cloud TPU '
    'pod, Slurm, Open MPI); launch the same command on every host.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, to join a multi-process run by hand '
    '(with --num_processes and --process_id; the same value on every process).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes-1.')
_COMPILATION_CACHE = cli.compilation_cache_flag()
flags.declare_key_flag('compilation_cache')  # defined in cli.py; listed by --help here


def _join_distributed_run() -> None:
  from fathom_sim import distributed
  from fathom_sim.errors import first_line
  if _COORDINATOR.value:
    n, i = _NUM_PROCESSES.value, _PROCESS_ID.value
    if n is None or n < 1 or i is None or not 0 <= i < n:
      cli.fail('--coordinator_address needs --num_processes >= 1 and --process_id in '
               f'[0, num_processes), got --num_processes={n} --process_id={i}')
    refusal = distributed.check_address(_COORDINATOR.value)
    if refusal:  # JAX waited 5 minutes on it, then aborted with a C++ stack trace
      cli.fail(f'--coordinator_address={_COORDINATOR.value}: {refusal}; give host:port of '
               'process 0 (the same on every process)')
  try:
    if _COORDINATOR.value:
      distributed.initialize(_COORDINATOR.value, n, i)
    else:
      distributed.initialize()
  except (ValueError, RuntimeError, IndexError) as e:  # jax's, for an address or cluster
    how = (f'--coordinator_address={_COORDINATOR.value}' if _COORDINATOR.value else
           '--multihost (JAX finds the processes on a Cloud TPU pod, Slurm or Open MPI only)')
    cli.fail(f'{how}: cannot join the distributed run ({type(e).__name__}: {first_line(e)}); by '
             'hand, give --coordinator_address=host:port of process 0 (the same on every '
             'process), --num_processes and --process_id')


def main(argv):
  cli.no_arguments(argv)
  from fathom_sim.train import train_and_evaluate  # after flags: XLA_FLAGS may be set by then
  cli.setup_logging()
  if (_NUM_PROCESSES.value is not None or _PROCESS_ID.value is not None) and not (
      _COORDINATOR.value):
    # Alone they ran one process, and two such would write the same workdir.
    cli.fail('--num_processes and --process_id join a multi-process run with '
             '--coordinator_address=host:port (or use --multihost where JAX finds them)')
  if _COORDINATOR.value or _MULTIHOST.value:
    _join_distributed_run()
  cli.use_compilation_cache(_COMPILATION_CACHE)
  cli.warn_unread(_CONFIG.value, config_flags.get_override_values(flags.FLAGS['config']))
  cli.run_or_exit(lambda: train_and_evaluate(_CONFIG.value, _WORKDIR.value))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main, flags_parser=cli.parse_flags_or_exit)
