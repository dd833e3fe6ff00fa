"""Runs a sweep: every (setting, seed) of a sweep file, one workdir each, in this process.

  python launch/sweep.py --sweep=sweeps/initial_eta.py --out=runs/eta [--seeds=5]
      [--vmap_seeds] [--config.FIELD=VALUE ...]

--config.FIELD=VALUE overrides apply to every run (e.g. --config.num_rounds=200); raising
num_rounds later continues finished runs. Run the same command again to skip finished runs and
resume unfinished ones. Exits 1 when a run failed (see sweep.json), 2 on a bad sweep file.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from launch import cli  # noqa: E402

_SWEEP = flags.DEFINE_string('sweep', None, 'Sweep file (sweeps/*.py) with get_sweep().')
_OUT = flags.DEFINE_string('out', None, 'Folder for the runs and sweep.json.')
_SEEDS = flags.DEFINE_integer('seeds', None, 'Use seeds 0..N-1 instead of the sweep\'s own.')
_VMAP_SEEDS = flags.DEFINE_bool(
    'vmap_seeds', False, 'Run each setting\'s seeds together as one vectorised program '
    '(vmap over seeds): one compilation for all of them; for models small enough that S '
    'copies fit on the devices.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'List the runs and their status; train nothing.')
_COMPILATION_CACHE = cli.compilation_cache_flag()
flags.declare_key_flag('compilation_cache')  # defined in cli.py; listed by --help here

_EXTRA: dict = {}


def parse_flags(argv: list[str]) -> list[str]:
  """Takes the --config.FIELD=VALUE overrides out of argv (they apply to every run; parsed as
  main.py parses them), parses the rest."""
  overrides, rest = cli.config_overrides(argv)
  _EXTRA.update(overrides)
  return cli.parse_flags_or_exit(rest)


def _dry_run(sweep_lib, sweep) -> None:
  """Prints each run of the sweep and what the sweep would do with it: as the sweep judges it,
  a workdir holding a run of another config is a failure, whether finished or not."""
  from fathom_sim import sweep_def
  runs = sweep_def.plan_runs(sweep, _OUT.value, _EXTRA)
  sweep_lib.check_out(sweep, _OUT.value, _EXTRA)  # what the sweep would refuse, refused here
  for run in runs:
    status, error = sweep_lib.run_status(run)
    print(f'{run.name}: ' + {'done': 'done', 'pending': 'to run'}.get(status, f'fails: {error}'))


def main(argv):
  cli.no_arguments(argv)
  from fathom_sim import sweep as sweep_lib
  from fathom_sim import sweep_def
  from fathom_sim.config import ConfigError
  cli.setup_logging()
  if _SEEDS.value is not None and not 1 <= _SEEDS.value <= sweep_def.MAX_SEEDS:
    # 0 or fewer would run nothing; more, one workdir each, are past what a sweep plans.
    cli.fail(f'--seeds must be in [1, {sweep_def.MAX_SEEDS}] (it runs seeds 0..N-1), got '
             f'{_SEEDS.value}')
  try:
    sweep = sweep_def.load_sweep(_SWEEP.value)
    if _SEEDS.value is not None:
      sweep.seeds = list(range(_SEEDS.value))
    if _DRY_RUN.value:
      cli.run_or_exit(lambda: _dry_run(sweep_lib, sweep))
      return
    entries = []
    cli.use_compilation_cache(_COMPILATION_CACHE)
    # A SIGTERM in a run's rounds is a preemption it checkpoints at (train.py); elsewhere
    # (planning, between runs, loading a run's data) it ended the sweep at once, with no line,
    # and left the run it was starting 'running' in sweep.json. It now stops as Ctrl-C does.
    cli.terminate_as_interrupt()
    cli.run_or_exit(lambda: entries.extend(sweep_lib.run_sweep(
        sweep, _OUT.value, extra=_EXTRA, vmap_seeds=_VMAP_SEEDS.value)), interrupted=lambda e: (
            f'stopped by {"SIGTERM" if isinstance(e, cli.Terminated) else "Ctrl-C"}; the same '
            'command resumes the sweep: finished runs are skipped, started ones resume from '
            'their last checkpoint'))
  except ConfigError as e:
    cli.fail(str(e))
  failed = [e for e in entries if e['status'] == 'failed']
  if failed:
    names = ', '.join(e['name'] for e in failed[:5]) + (
        f' and {len(failed) - 5} more' if len(failed) > 5 else '')
    print(f'error: {len(failed)} of {len(entries)} run(s) failed: {names}; {failed[0]["name"]}: '
          f'{failed[0]["error"]} (every run\'s error is in sweep.json)', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  flags.mark_flags_as_required(['sweep', 'out'])
  app.run(main, flags_parser=parse_flags)
