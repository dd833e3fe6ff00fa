"""How the benchmarks time a chain of steps: shared by launch/benchmark.py (this jax) and
benchmarks/fedjax_fedavg.py (FedJAX's venv, an older jax), so it imports neither.

A chain is timed in CHUNKS chunks of equal steps, lengthened until the first takes a
CHUNKS-th of MIN_S, so the whole takes about that or more; its rate is their median. One pass
of 20-400 steps moved by 26 % between runs where the rounds' rate moved by 0.5 %: a pause of
the machine fell on a few seconds of steps and went straight into the ratio.
"""

import resource
import statistics
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
