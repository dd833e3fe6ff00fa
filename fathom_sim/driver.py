"""Rounds: the host's side of each round. It samples and plans the cohort, sends its arrays to
the devices, calls round.py's jitted round, and prepares round t+1 while round t computes.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from fathom_sim import fathom
from fathom_sim.compile_ahead import CompileAhead
from fathom_sim.errors import InputError
from fathom_sim.data.federated import ArrayClientDataset, Prefetcher
from fathom_sim.data.sampling import sample_cohorts
from fathom_sim.data.plan import Planner, SeedPlanners, neighbour_buckets
from fathom_sim.mesh import CLIENTS, by_client, local_rows, put, replicated
from fathom_sim.round import make_round
from fathom_sim.run import Run, batch_moves
from fathom_sim.types import BATCH, EPOCHS, CohortPlan, RoundMetrics, ServerState

# On a CPU platform, cohorts are sampled this many rounds at a time, up to
# COHORT_BLOCK_ELEMENTS random keys (a block shuffles the whole population once per round:
# Stack Overflow's 342k clients take 12). See Rounds._cohorts.
COHORT_BLOCK, COHORT_BLOCK_ELEMENTS = 64, 1 << 22


def _compile_ahead_workers() -> int:
  """Compile threads beside the main one: XLA compiles a program on about one core, and each
  thread should leave the host's input pipeline (reading threads, planning) cores to run on."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  return max(1, min(3, (cores or 1) // 4))


@dataclasses.dataclass
class _Fed:
  """Round t's plan(s), and its arrays on the devices (table, slots, stream, source, B_int)."""
  t: int
  plans: CohortPlan | list[CohortPlan]
  args: tuple
  batch_pad: int
  longest: int  # the longest lane's real steps
  lengths_before: tuple | None = None  # planned ahead: the planner's padded lengths before


def _sent(plans: CohortPlan | list[CohortPlan]) -> CohortPlan | list[CohortPlan]:
  """Dispatched plans as the caller keeps them: their example buffers, on the devices now,
  replaced by stand-ins of the same shape and no bytes, so that the host does not hold a
  cohort's examples past its round (with the next round's planned ahead, it held three
  rounds' of each seed's)."""
  def one(plan: CohortPlan) -> CohortPlan:
    if plan.lanes.source is None:
      return plan
    source = {k: np.broadcast_to(np.zeros((), a.dtype), a.shape)
              for k, a in plan.lanes.source.items()}
    return dataclasses.replace(plan, lanes=plan.lanes._replace(source=source))
  return [one(p) for p in plans] if isinstance(plans, list) else one(plans)


class Rounds:
  """Runs round t on the devices: samples and plans the cohort, feeds it, steps the state.

  With `seeds`, runs those seeds of the same config as one vectorised program: the state,
  hyperparameters and metrics carry a leading seed axis, and a call returns every seed's plan.
  Round t+1's clients are read, and its plan made and sent under round t's (E, B), while the
  devices compute round t. `prefetch=False` does both on the critical path (to measure what
  that saves); the results are the same.
  """

  def __init__(self, run: Run, seeds: list[int] | None = None, prefetch: bool = True):
    c, mesh = run.config, run.mesh
    self.run = run
    self.seeds = None if seeds is None else [int(s) for s in seeds]
    self.num_devices = mesh.devices.size
    self.round_fn = make_round(loss_fn=run.model.loss, server_opt=run.server_opt,
                               tuner=run.tuner, mesh=mesh,
                               source_per_device=not run.resident,
                               vectorized=self.seeds is not None, local_loop=run.local_loop,
                               loop_chunk=run.loop_chunk)
    lanes = self.num_devices * run.lanes_per_device
    options = dict(resident=run.resident, batch_per_octave=c.batch_pad_per_octave,
                   exact_batch=not batch_moves(c), local_lanes=local_rows(mesh, lanes),
                   lanes_per_buffer=run.lanes_per_device)
    train = run.task.train
    # Examples read per round (generated, prepared) are read for round t+1 while round t
    # computes. Not across hosts: there a process reads only its own lanes' clients, and which
    # lanes a client lands in depends on round t's B.
    self._prefetch = None
    if (prefetch and not run.resident and not isinstance(train, ArrayClientDataset)
        and options['local_lanes'] is None):
      train = self._prefetch = Prefetcher(train)
    if self.seeds is None:
      self.planner = Planner(train, c.cohort_size, lanes, c.seed, **options)
      self._lanes = by_client(mesh)
    else:
      self.planner = SeedPlanners(train, c.cohort_size, lanes, self.seeds, **options)
      self._lanes = NamedSharding(mesh, P(None, CLIENTS))
    self._cohorts_memo: tuple[int, list[np.ndarray]] | None = None
    self._sample_before_dispatch = mesh.devices.flat[0].platform == 'cpu'
    self._resident = (put(run.task.train.features, replicated(mesh))
                      if run.resident else None)
    self.last_host_s = self.last_device_s = self.last_ahead_s = 0.0
    # Also when only the evaluation compiles ahead: the rounds then are not (round_fn None).
    self.compile_ahead = (CompileAhead(self.round_fn if run.compile_ahead else None,
                                       self._neighbour_pads, reach=2,
                                       workers=_compile_ahead_workers())
                          if run.compile_ahead or run.evaluation_ahead else None)
    self._plan_ahead = prefetch
    self._next: _Fed | None = None
    self._read_warned = self._plan_warned = False  # reading / planning ahead failed once
    self.stopped: frozenset[int] = frozenset()  # seeds (positions) planned idle: stop_seed
    self.planned_ahead = self.replanned = 0  # rounds whose plan made ahead was used / not
    self.replanned_seeds = 0  # seeds' plans made again on time (vectorised: only those changed)

  def stop_seed(self, s: int) -> None:
    """Vectorised seed s (its position) has stopped (max_rejected_rounds) while the others
    go on: from the next round its cohort runs no step (Planner.idle_plan), so that it no
    longer sets the longest lane or B_pad the others compute, nor has its clients read."""
    self.stopped = self.stopped | {s}

  def initial_hparams(self, state: ServerState) -> np.ndarray:
    """(E, eta, B) of the next round, read from the state (once, at start or resume)."""
    return np.asarray(jax.device_get(self.run.tuner.values(state.hyper)))

  def __call__(self, state: ServerState, t: int, hp: np.ndarray
               ) -> tuple[ServerState, RoundMetrics, CohortPlan | list[CohortPlan]]:
    """Round t with hyperparameters hp = (E, eta, B) (as the device will compute them)."""
    c = self.run.config
    start = time.perf_counter()
    fed, self._next = self._next, None
    kept = self._kept(fed, t, hp)
    if kept and all(kept):
      self.planned_ahead += 1
    else:
      reuse = None
      if fed is not None:
        # The padded lengths grow as if the plans made again had never been made: no shape
        # (and compile) that planning on time would not have made. A seed whose plan made
        # ahead is still on time keeps it, and the lengths it left (vectorised seeds).
        if self.seeds is None:
          self.planner.restore_padded_lengths(fed.lengths_before)
        else:
          self.planner.restore_padded_lengths(fed.lengths_before, keep=kept)
          if kept is not None:
            reuse = [p if k else None for p, k in zip(fed.plans, kept, strict=True)]
        self.replanned += 1
        self.replanned_seeds += len(self.seeds or [0]) - sum(kept or [])
      fed = self._feed(t, hp, reuse)
    if t < c.num_rounds and self._sample_before_dispatch:
      self._cohorts(t + 1)  # now, while the devices are idle (see _cohorts)
    dispatched = time.perf_counter()
    args = (state,) + fed.args
    if self.compile_ahead is not None:
      self.compile_ahead.before(args, fed.batch_pad)
    state, m = self.round_fn(*args, batch_pad=fed.batch_pad,
                             num_iterations=fed.longest if self.run.local_loop == 'host'
                             else None)
    ahead_start = time.perf_counter()
    if t < c.num_rounds:
      if self._prefetch is not None:
        try:
          read = [cohort for s, cohort in enumerate(self._cohorts(t + 1))
                  if s not in self.stopped]
          if read:
            self._prefetch.fetch(np.concatenate(read))
        except Exception as e:  # noqa: BLE001 - not round t's: round t+1 samples and reads
          # again, and raises it there, after round t has returned its state (donated above).
          if not self._read_warned:  # once: a lasting cause would repeat every round
            logging.warning('reading round %d\'s clients ahead failed (%s: %s); they are read '
                            'on time', t + 1, type(e).__name__, e)
          self._read_warned = True
      if self._plan_ahead:
        # Round t+1's plan under this round's (E, B), made and sent while the devices compute
        # round t. B_int and the K_i mostly stay the same from one round to the next; when
        # they do not, or the padded lengths would grow otherwise, round t+1 plans again,
        # vectorised seeds only those whose plan no longer holds (_kept).
        lengths = self.planner.padded_lengths()
        try:
          self._next = self._feed(t + 1, hp)
          self._next.lengths_before = lengths
        except Exception as e:  # noqa: BLE001
          # E.g. a client that cannot be read: round t+1 plans again, and raises it there,
          # after round t has returned its state.
          self.planner.restore_padded_lengths(lengths)
          if not self._plan_warned:  # once: a lasting cause would repeat every round
            # Bad input (data, or a cohort past the round's indices) is reported in one line
            # when round t+1 meets it; anything else is unexpected here, and its traceback is
            # what explains it.
            logging.warning('planning round %d ahead failed (%s: %s); it plans on time',
                            t + 1, type(e).__name__, e, exc_info=not isinstance(e, InputError))
          self._plan_warned = True
          self.replanned += 1  # round t+1 will plan on time
          self.replanned_seeds += len(self.seeds or [0])
    ahead_end = time.perf_counter()
    m = jax.device_get(m)
    # Host: sampling, planning, transfers issued on the critical path. Device: from dispatch
    # until the metrics are back; it includes compiling when the round meets a new padded
    # shape, and is an upper bound of the devices' time: the host plans round t+1 ahead in
    # that window (ahead), so a device that finishes first waits for the host.
    self.last_host_s, self.last_device_s = dispatched - start, time.perf_counter() - dispatched
    self.last_ahead_s = ahead_end - ahead_start
    return state, m, _sent(fed.plans)

  def _feed(self, t: int, hp: np.ndarray, reuse: list[CohortPlan | None] | None = None
            ) -> _Fed:
    """Plans round t under hp and sends its arrays to the devices; vectorised seeds keep
    their plans in `reuse` (see SeedPlanners.plan)."""
    mesh = self.run.mesh
    cohorts = self._cohorts(t)
    if self.seeds is None:
      plan = self.planner.plan(cohorts[0], t, hp[EPOCHS], hp[BATCH])
      lanes, batch_size, batch_pad = plan.lanes, jnp.int32(plan.batch_size), plan.batch_pad
      table, plans, longest = plan.table, plan, int(plan.lane_steps.max())
    else:
      stacked = self.planner.plan(cohorts, t, hp, reuse, self.stopped)
      lanes, batch_size = stacked.lanes, jnp.asarray(stacked.batch_size)
      batch_pad = stacked.batch_pad
      table, plans = stacked.table, stacked.plans
      longest = max(int(p.lane_steps.max()) for p in plans)
    table = put(table, replicated(mesh))
    slots, stream = put((lanes.slots, lanes.stream), self._lanes)
    source = self._resident if self.run.resident else put(lanes.source, self._lanes)
    return _Fed(t, plans, (table, slots, stream, source, batch_size), batch_pad, longest)

  def _kept(self, fed: _Fed | None, t: int, hp: np.ndarray) -> list[bool] | None:
    """For each seed, whether its plan made ahead (fed) is the plan round t makes on time
    under hp: a plan depends on (E, B) only through B_int and the K_i (data/plan.py), and its
    padded lengths must grow as planning on time grows them (with the same B_int and K_i, the
    stream's lookahead for the dataset's largest client can still differ with E). None: no
    plan made ahead for round t."""
    if fed is None or fed.t != t:
      return None
    one = self.seeds is None
    plans, hps = ([fed.plans], [hp]) if one else (fed.plans, hp)
    planners = [self.planner] if one else self.planner.planners
    before = [fed.lengths_before] if one else fed.lengths_before[2]
    kept = []
    for s, (planner, plan, h, b) in enumerate(zip(planners, plans, hps, before, strict=True)):
      if s in self.stopped:  # (not with seeds None: a solo run stops with its seed)
        kept.append(plan.idle)
        continue
      b_int, num_steps = fathom.integer_schedule(h[EPOCHS], h[BATCH], plan.num_examples)
      kept.append(b_int == plan.batch_size and np.array_equal(num_steps, plan.num_steps)
                  and planner.padded_lengths_on_time(plan, h[EPOCHS], h[BATCH], b)
                  == planner.padded_lengths())
    return kept

  def _neighbour_pads(self, batch_pad: int) -> list[int]:
    planner = self.planner if self.seeds is None else self.planner.planners[0]
    if planner.exact_batch:
      return []
    largest = fathom.batch_size_int(min(self.run.upper[BATCH], 2**30))
    return neighbour_buckets(batch_pad, self.run.config.batch_pad_per_octave,
                             min_batch_pad=planner.min_batch_pad, max_batch_size=largest)

  def close(self) -> None:
    """A run's end: drops a plan made ahead and the reads made ahead, cancels compiles queued
    ahead and waits for those running (CompileAhead.close); a second call does nothing."""
    self._next = None
    if self._prefetch is not None:
      self._prefetch.close()
    if self.compile_ahead is not None:
      self.compile_ahead.close()

  @property
  def prefetching(self) -> bool:
    """Whether round t+1's clients are read while round t computes."""
    return self._prefetch is not None

  def _cohorts(self, t: int) -> list[np.ndarray]:
    """Round t's cohort for each seed.

    Sampling is a JAX program on the host's CPU device. On an accelerator that device is idle,
    and round t+1's cohort is sampled while round t computes. On a CPU platform it also runs
    the rounds, so a cohort sampled while a round is in flight waits for it (and the planning
    of round t+1 with it): there __call__ asks for round t+1's before it dispatches round t,
    and cohorts come a block of rounds at a time (one program, the same bits).
    """
    if self._cohorts_memo is None or not (
        self._cohorts_memo[0] <= t < self._cohorts_memo[0] + len(self._cohorts_memo[1][0])):
      c = self.run.config
      seeds = [c.seed] if self.seeds is None else self.seeds
      population = len(self.run.task.train.num_examples)
      block = max(1, min(COHORT_BLOCK, COHORT_BLOCK_ELEMENTS // max(population, 1))) if (
          self._sample_before_dispatch) else 1
      self._cohorts_memo = (t, [sample_cohorts(self.run.task.train, s, t, block,
                                               c.cohort_size) for s in seeds])
    first, blocks = self._cohorts_memo
    return [block[t - first] for block in blocks]

  @property
  def compiles(self) -> int:
    """Programs compiled for the round so far: one per padded shape seen with the device
    loop; with the host loop, its broadcast and three programs per padded shape."""
    return self.round_fn._cache_size()
