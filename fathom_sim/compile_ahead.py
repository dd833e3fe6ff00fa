"""Compiling the round ahead of need: the padded batch sizes next to the current one, on a
thread, while rounds run.

FATHOM moves B a little every round, so every few dozen rounds B_int crosses into the next
padded size (data/plan.py's grid) and the round needs a new program. On an H100 each such
compile took 4-8 s of a 131 s run of 1500 rounds (docs/benchmarks.md). A program lowered and
compiled ahead of time for the same argument shapes, shardings and static arguments is the one
`jax.jit` then finds in its cache, so the round that crosses does not wait for XLA.
"""

from __future__ import annotations

import concurrent.futures
import logging
from typing import Callable, Sequence

import jax

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
  `num_iterations=None`) for the neighbours of each padded size the run uses, one at a time
  on a background thread.

  Call `before(args, batch_pad)` just before dispatching a round (it waits if that very
  program is being compiled, and returns the key), then `after(key)` once it is dispatched.
  """

  def __init__(self, round_fn, neighbours: Callable[[int], Sequence[int]]):
    self._round_fn = round_fn
    self._neighbours = neighbours
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='compile-ahead')
    # Every key met: None if the round compiled it itself, else the background job's future.
    self._jobs: dict[Key, concurrent.futures.Future | None] = {}
    self.compiled = 0  # programs compiled on the thread
    self.used = 0      # rounds that found their program compiled ahead (jit's cache then
                       # serves it: the tests check that such a round compiles nothing)

  def before(self, args: tuple, batch_pad: int) -> Key:
    key = (batch_pad, specs(args))
    job = self._jobs.get(key)
    if job is not None and not job.cancel():
      # Being compiled now: waiting is shorter than compiling it again here. A failed
      # compile is left to the round itself, which raises its own error.
      if job.exception() is None:
        self.used += 1
    self._jobs[key] = None
    return key

  def after(self, key: Key) -> None:
    batch_pad, (treedef, arg_specs) = key
    for pad in self._neighbours(batch_pad):
      other = (pad, (treedef, arg_specs))
      if other not in self._jobs:
        self._jobs[other] = self._pool.submit(self._compile, treedef, arg_specs, pad)

  def _compile(self, treedef, arg_specs, batch_pad: int) -> None:
    try:
      args = jax.tree.unflatten(treedef, arg_specs)
      self._round_fn.lower(*args, batch_pad=batch_pad, num_iterations=None).compile()
      self.compiled += 1
    except Exception:
      # The round that needs this program compiles it itself, and reports a real error.
      logging.warning('compiling the round ahead for batch_pad %d failed', batch_pad,
                      exc_info=True)
      raise

  def wait(self) -> None:
    """Blocks until every queued compile has finished (tests, benchmarks)."""
    for job in list(self._jobs.values()):
      if job is not None:
        concurrent.futures.wait([job])

  def close(self) -> None:
    """Drops queued compiles. One already running finishes in the background, and the
    interpreter waits for it at exit (seconds on a GPU)."""
    self._pool.shutdown(wait=False, cancel_futures=True)
