"""Compiling ahead of need, on threads, while rounds run: the round for the padded batch sizes
around the current one, and the evaluation's program before the first evaluation.

FATHOM moves B a little every round, so every few dozen rounds B_int crosses into the next
padded size (data/plan.py's grid) and the round needs a new program. On an H100 each such
compile took 4-8 s of a 131 s run of 1500 rounds (docs/benchmarks.md). A program lowered and
compiled ahead of time for the same argument shapes, shardings and static arguments is the one
`jax.jit` then finds in its cache, so the round that crosses does not wait for XLA.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import threading
from typing import Callable, Sequence

import jax

from fathom_sim import compile_cache

# (batch_pad, the round's argument specs): what selects a compiled round program.
Key = tuple


def specs(args) -> tuple:
  """Shape, dtype, sharding and weak type of every array in `args`, hashable: the part of a
  jit cache key that the arguments' values do not change."""
  leaves, treedef = jax.tree.flatten(args)
  # An uncommitted array (a scalar made on the default device) lets jit place it: no sharding.
  return treedef, tuple(jax.ShapeDtypeStruct(a.shape, a.dtype,
                                             sharding=a.sharding if a.committed else None,
                                             weak_type=a.weak_type)
                        for a in leaves)


class CompileAhead:
  """Compiles `round_fn` (a jax.jit of the round with static `batch_pad` and
  `num_iterations=None`) for the padded sizes around each one the run uses, on background
  threads.

  Call `before(args, batch_pad)` just before dispatching a round: it waits if that very program
  is being compiled, and the first time it meets a padded size it queues the sizes up to
  `reach` steps away on each side (nearest first) not met yet, so that they compile while this
  round's own program does. Why that early and that far (H100, 1500 FATHOM rounds): B crossed
  from padded 24 to 16 at round 9, 0.2 s after round 1's compile, and on to 12 at round 87, 3 s
  later; neighbours queued only after round 1 ran, one at a time, were ready for neither.
  """

  def __init__(self, round_fn, neighbours: Callable[[int], Sequence[int]], *, reach: int = 1,
               workers: int = 1):
    """round_fn None: no round is compiled ahead (`before` does nothing), only the programs
    passed to `also`."""
    if reach < 1 or workers < 1:
      raise ValueError(f'reach and workers must be at least 1, got {reach} and {workers}')
    self._round_fn = round_fn
    self._neighbours = neighbours
    self._reach = reach
    self._pool = concurrent.futures.ThreadPoolExecutor(workers,
                                                       thread_name_prefix='compile-ahead')
    # Every key met: None if the round compiled it itself, else the background job's future.
    self._jobs: dict[Key, concurrent.futures.Future | None] = {}
    self._others: dict[str, concurrent.futures.Future] = {}  # other programs, by name
    self._other_pool: concurrent.futures.ThreadPoolExecutor | None = None
    self._count_lock = threading.Lock()  # `compiled` and `loaded`: counted by several threads
    self.compiled = 0  # programs compiled on the threads
    self.loaded = 0    # programs the threads loaded from the persistent cache instead
    self.used = 0      # rounds (and other programs' first uses) that found their program
                       # compiled ahead (jit's cache then serves it: the tests check that
                       # such a round, or evaluation, compiles nothing)

  def before(self, args: tuple, batch_pad: int) -> None:
    if self._round_fn is None:
      return
    treedef, arg_specs = specs(args)
    key = (batch_pad, (treedef, arg_specs))
    job = self._jobs.get(key)
    met = key in self._jobs and job is None  # a round ran this program before
    if job is not None and not job.cancel():
      # Being compiled now: waiting is shorter than compiling it again here. A failed
      # compile is left to the round itself, which raises its own error.
      if job.exception() is None:
        self.used += 1
    self._jobs[key] = None
    if not met:
      # The padded lengths only grow: programs still queued for earlier argument shapes would
      # never be used, and would hold the threads ahead of this one's neighbours.
      for other, queued in list(self._jobs.items()):
        if queued is not None and other[1] != key[1] and queued.cancel():
          del self._jobs[other]
      args = jax.tree.unflatten(treedef, arg_specs)
      for pad in self._around(batch_pad):
        other = (pad, (treedef, arg_specs))
        if other not in self._jobs:
          self._jobs[other] = self._pool.submit(
              self._compile, f'round for batch_pad {pad}', functools.partial(
                  self._round_fn.lower, *args, batch_pad=pad, num_iterations=None))

  def _around(self, batch_pad: int) -> list[int]:
    """The padded sizes up to `reach` steps from `batch_pad`: one step away first."""
    below = above = batch_pad
    out = []
    for _ in range(self._reach):
      steps = self._neighbours(below)
      down = [p for p in steps if p < below]
      steps = self._neighbours(above)
      up = [p for p in steps if p > above]
      out += down + up
      below = down[0] if down else below
      above = up[0] if up else above
    return list(dict.fromkeys(out))

  def _compile(self, what: str, lower: Callable[[], object]) -> None:
    """lower().compile() on a thread, counted as compiled or loaded; a failure is logged and
    left to the program's first use, which compiles it itself and reports a real error."""
    try:
      lowered = lower()  # (whatever it runs, e.g. an eager op, may load programs of its own)
      before = compile_cache.thread_hits()
      lowered.compile()
      with self._count_lock:
        if compile_cache.thread_hits() > before:
          self.loaded += 1
        else:
          self.compiled += 1
    except Exception:
      logging.warning('compiling the %s ahead failed', what, exc_info=True)
      raise

  def also(self, name: str, lower: Callable[[], object]) -> None:
    """Starts lower().compile(), the compile of another program than the round's (e.g. the
    evaluation's: 4-15 s on an H100 at the first evaluation, docs/benchmarks.md), on a thread
    of its own: behind the round's speculative sizes it would not start before it is needed
    (on an H100 the 100th round comes ~3 s after the first). A name queued and not yet
    `ready` is not queued again. Call `ready(name)` before that program's first use."""
    if name not in self._others:
      if self._other_pool is None:
        self._other_pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix='compile-ahead-other')
      self._others[name] = self._other_pool.submit(self._compile, f'{name} program', lower)

  def ready(self, name: str) -> None:
    """Before program `name`'s first use: waits while it is being compiled (shorter than
    compiling it again); drops it if it has not started. Later calls do nothing."""
    job = self._others.pop(name, None)
    if job is not None and not job.cancel() and job.exception() is None:
      self.used += 1

  def wait(self) -> None:
    """Blocks until every queued compile has finished (tests, benchmarks)."""
    for job in list(self._jobs.values()) + list(self._others.values()):
      if job is not None:
        concurrent.futures.wait([job])

  def close(self) -> None:
    """Drops queued compiles and waits for those already running (seconds on a GPU; the
    interpreter would wait for them at exit anyway). Why wait here: so that a run's counts
    (`compiled`, `loaded`, the persistent cache's hits) are final when its summary is written,
    and a next run in the same process (a sweep) neither shares the host with them nor is
    charged their cache hits."""
    for pool in (self._pool, self._other_pool):
      if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)
    for pool in (self._pool, self._other_pool):
      if pool is not None:
        pool.shutdown(wait=True)
