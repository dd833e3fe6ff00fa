"""How the benchmarks time a chain of steps: shared by launch/benchmark.py (this jax) and
benchmarks/fedjax_fedavg.py (FedJAX's venv, an older jax), so it imports neither.

A chain is timed in CHUNKS chunks of equal steps, lengthened until the first takes a
CHUNKS-th of MIN_S, so the whole takes about that or more; its rate is their median. One pass
of 20-400 steps moved by 26 % between runs where the rounds' rate moved by 0.5 %: a pause of
the machine fell on a few seconds of steps and went straight into the ratio.
"""

import atexit
import contextlib
import os
import resource
import statistics
import sys
import tempfile
import time
from typing import Callable

CHUNKS = 7
MIN_S = 2.0


def peak_rss_gib() -> float:
  """This process's peak resident memory, GiB. Linux's VmHWM is the process's own since its
  exec; ru_maxrss carries the parent's across fork and exec (docs/benchmarks.md, forty-third
  session: a child of a 1.5 GiB parent read 1.51 GiB, its VmHWM 0.01), so it is the fallback
  only."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) / 2**20  # kB
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


# Put by peak_measured in front of a script (or of `-c CODE`): writes the process's VmHWM (kB)
# into the file named first as the process exits, and runs the rest as python runs it.
# Self-contained (imports nothing of the project): the script may be another checkout's.
_PEAK_WRAPPER = '''
import atexit, os, runpy, sys
out, args = sys.argv[1], sys.argv[2:]
def peak():
  with open('/proc/self/status') as f:
    kb = next(line.split()[1] for line in f if line.startswith('VmHWM:'))
  with open(out, 'w') as f:
    f.write(kb)
atexit.register(peak)
if args[0] == '-c':
  sys.argv = ['-c', *args[2:]]
  exec(compile(args[1], '<string>', 'exec'), {'__name__': '__main__'})
else:
  sys.argv = args
  sys.path[0] = os.path.dirname(os.path.abspath(args[0]))
  runpy.run_path(args[0], run_name='__main__')
'''


_PEAK_FILES: set[str] = set()  # made by peak_measured, not read yet: removed at exit


@atexit.register
def _remove_unread_peaks() -> None:
  for path in list(_PEAK_FILES):  # (a benchmark that stopped before reading a child's peak)
    with contextlib.suppress(OSError):
      os.unlink(path)


def peak_measured(args: list[str]) -> tuple[list[str], Callable[[], float | None]]:
  """The command that runs `python *args` and records its own peak resident memory, and a
  function that reads that, GiB, once it has exited (None where it was killed by a signal:
  atexit did not run). A child's rusage (os.wait4, RUSAGE_CHILDREN) carries its parent's peak
  across fork and exec: a child of a parent that had held more read the parent's figure
  (peak_rss_gib)."""
  fd, path = tempfile.mkstemp(prefix='fathom_peak_')
  os.close(fd)
  _PEAK_FILES.add(path)

  def read() -> float | None:
    try:
      with open(path) as f:
        kb = f.read()
    finally:
      os.unlink(path)
      _PEAK_FILES.discard(path)
    return int(kb) / 2**20 if kb else None

  return [sys.executable, '-c', _PEAK_WRAPPER, path, *args], read


def chunk_rates(step: Callable[[int], None], sync: Callable[[], None], steps: int,
                examples_per_step: float, chunks: int = CHUNKS, min_s: float = MIN_S) -> dict:
  """Examples/s of `step(i)` (i cycles over 1..steps; the caller compiled it on step 0) over
  `chunks` chunks, each ended by `sync()` (waits for the device): their median, slowest and
  fastest, and the steps of a chunk."""
  per_chunk, rates, i = max(1, steps // chunks), [], 0
  while len(rates) < chunks:
    start = time.perf_counter()
    for _ in range(per_chunk):
      i = i % steps + 1
      step(i)
    sync()
    took = time.perf_counter() - start
    if not rates and took < min_s / chunks and per_chunk < 2**20:
      per_chunk *= 2  # too short to time against the clock and the sync: not kept
      continue
    rates.append(per_chunk * examples_per_step / took)
  return {'median': statistics.median(rates), 'min': min(rates), 'max': max(rates),
          'chunks': len(rates), 'steps_per_chunk': per_chunk}
