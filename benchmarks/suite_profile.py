r"""Where the test suite's time goes (run by hand; a pytest plugin): per test file, the seconds
its tests took, the XLA compiles in the test process and their seconds, and the commands the
tests started and their wall seconds; then the slowest tests, and those compiling longest.

  PYTHONPATH=benchmarks .venv/bin/python -m pytest -q -n 2 -p no:cacheprovider \
      -p suite_profile tests

A program loaded from the persistent compilation cache is not a compile here (conftest.py's
cache: a program built again by the same worker is loaded). With pytest-xdist each worker
writes its counts to a folder the first process made (the workers inherit its name), and that
process prints the table once they are done.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import shutil
import subprocess
import tempfile
import time

import pytest

_FOLDER_VARIABLE = 'FATHOM_SIM_SUITE_PROFILE'
# Per test id: [compiles, compile s, commands, command wall s, test s].
_counts: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0, 0.0, 0.0])
_current: list[str | None] = [None]


def _count_compiles() -> None:
  from jax._src import compiler  # (private: what XLA compiles, not what the cache loads)
  compile_and_load = compiler.backend_compile_and_load

  def counted(*args, **kwargs):
    start = time.perf_counter()
    try:
      return compile_and_load(*args, **kwargs)
    finally:
      counts = _counts[_current[0] or '(outside a test)']
      counts[0] += 1
      counts[1] += time.perf_counter() - start

  compiler.backend_compile_and_load = counted


def _count_commands() -> None:
  init, wait = subprocess.Popen.__init__, subprocess.Popen.wait

  def started(self, *args, **kwargs):
    self._profile_start, self._profile_test = time.perf_counter(), _current[0]
    init(self, *args, **kwargs)

  def waited(self, *args, **kwargs):
    status = wait(self, *args, **kwargs)
    if status is not None and not getattr(self, '_profile_done', False):
      self._profile_done = True
      counts = _counts[self._profile_test or '(outside a test)']
      counts[2] += 1
      counts[3] += time.perf_counter() - self._profile_start
    return status

  subprocess.Popen.__init__, subprocess.Popen.wait = started, waited


def pytest_configure(config):
  if _FOLDER_VARIABLE not in os.environ:  # the first process: pytest itself
    os.environ[_FOLDER_VARIABLE] = tempfile.mkdtemp(prefix='suite_profile_')
    atexit.register(shutil.rmtree, os.environ[_FOLDER_VARIABLE], ignore_errors=True)
  _count_compiles()
  _count_commands()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  _current[0] = item.nodeid
  start = time.perf_counter()
  yield
  _counts[item.nodeid][4] += time.perf_counter() - start
  _current[0] = None


def pytest_sessionfinish(session):
  name = os.environ.get('PYTEST_XDIST_WORKER', 'main')
  with open(os.path.join(os.environ[_FOLDER_VARIABLE], f'{name}.json'), 'w') as f:
    json.dump(_counts, f)


def pytest_terminal_summary(terminalreporter):
  if 'PYTEST_XDIST_WORKER' in os.environ:
    return
  counts: dict[str, list[float]] = {}
  folder = os.environ[_FOLDER_VARIABLE]
  for name in sorted(os.listdir(folder)):
    if name.endswith('.json') and name != 'main.json':  # (the workers', when there are)
      with open(os.path.join(folder, name)) as f:
        counts.update(json.load(f))
  counts = counts or dict(_counts)
  files = collections.defaultdict(lambda: [0, 0.0, 0, 0.0, 0.0])
  for test, c in counts.items():
    for i, value in enumerate(c):
      files[test.split('::')[0]][i] += value
  write = terminalreporter.write_line
  total = [sum(c[i] for c in files.values()) for i in range(5)]
  write(f'suite profile: {total[4]:.0f} s of tests; {total[0]:.0f} XLA compiles in the test '
        f'processes, {total[1]:.0f} s; {total[2]:.0f} commands started, {total[3]:.0f} s of '
        'their wall time')
  write(f'{"test s":>8} {"compile s":>9} {"compiles":>8} {"commands":>8} {"their s":>8}  file')
  for file, c in sorted(files.items(), key=lambda kv: -kv[1][4]):
    write(f'{c[4]:8.1f} {c[1]:9.1f} {c[0]:8.0f} {c[2]:8.0f} {c[3]:8.1f}  {file}')
  for title, column in (('slowest tests:', 4), ('most compile seconds:', 1)):
    write(title)
    for test, c in sorted(counts.items(), key=lambda kv: -kv[1][column])[:25]:
      write(f'{c[4]:8.1f} {c[1]:9.1f} {c[0]:8.0f} {c[2]:8.0f} {c[3]:8.1f}  {test}')
