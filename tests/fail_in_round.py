"""launch/main.py with bad data met by one process only, in one round: round FAIL_ROUND's
plan raises a DataError on process FAIL_PROCESS (as a damaged record of a prepared dataset
that only that process's lanes read would). Run as a script by test_multihost."""

import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

from fathom_sim import driver  # noqa: E402
from fathom_sim.data import DataError  # noqa: E402

_feed = driver.Rounds._feed


def _failing_feed(self, t, hp, *rest):
  if t == int(os.environ['FAIL_ROUND']) and jax.process_index() == int(os.environ['FAIL_PROCESS']):
    raise DataError(f'record 7 of split train cannot be read (injected, round {t})')
  return _feed(self, t, hp, *rest)


driver.Rounds._feed = _failing_feed
sys.argv[0] = os.path.join(ROOT, 'launch', 'main.py')
runpy.run_path(sys.argv[0], run_name='__main__')
