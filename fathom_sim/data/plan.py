"""Cohort planning: each client's batches, packed into lanes, with padded shapes that recompile
rarely.

Client i of the cohort runs K_i = max(1, ceil(E n_i / B_int)) steps of B_int examples each,
taken from its data shuffled and repeated (a new permutation per pass) and cut into consecutive
batches, so a batch may wrap across passes. Clients are spread over a fixed number of lanes,
longest first onto the least loaded lane, and a lane runs its clients back to back: the step
count is a loop bound on the device, never a compiled shape. What does compile is the rows
computed per step (B_pad, a few sizes per octave) and the lengths of the index stream and
example buffers, which only grow (to a power of two with headroom) and so settle within a few
rounds; the stream is sized from the first round for the dataset's largest client too.

Data sent per round go in one example buffer per device, shared by that device's lanes: its
padding is that of one sum over the device's clients, not of each lane's, and a sum over
several clients varies less from round to round (fewer bytes sent, fewer buffer growths).
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import os

import numpy as np

from fathom_sim import fathom, rng
from fathom_sim.data.federated import ArrayClientDataset, ClientDataset
from fathom_sim.types import BATCH, EPOCHS, CohortPlan, CohortTable, Lanes


def bucket(n: int, per_octave: int) -> int:
  """The smallest value >= n on a grid with `per_octave` evenly spaced points per doubling.

  With 2 per octave: 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, ...
  """
  if n <= 1:
    return 1
  base = 1 << (int(n).bit_length() - 1)  # largest power of two <= n
  spacing = max(1, base // per_octave)
  return base + -(-(n - base) // spacing) * spacing


def neighbour_buckets(batch_pad: int, per_octave: int, *, min_batch_pad: int,
                      max_batch_size: int) -> list[int]:
  """The padded sizes next to `batch_pad` (below, then above) that a plan can use, where B_int
  is at most `max_batch_size` and the padded size is bucket(max(B_int, min_batch_pad))."""
  lowest = bucket(max(1, min_batch_pad), per_octave)
  highest = bucket(max(max_batch_size, min_batch_pad), per_octave)
  below = 0
  if batch_pad > 1:  # the grid point at or under batch_pad - 1, within its octave
    b = batch_pad - 1
    base = 1 << (b.bit_length() - 1)
    spacing = max(1, base // per_octave)
    below = base + (b - base) // spacing * spacing
  above = bucket(batch_pad + 1, per_octave)
  return [pad for pad, ok in ((below, below >= lowest), (above, above <= highest)) if ok]


# The index stream is sized ahead for the dataset's largest client up to this many times what
# the cohort at hand needs (an outlier client must not make every round's stream huge).
STREAM_LOOKAHEAD = 4
# Example indices a lane's round may address: the device computes a step's start as
# step * B_int in int32, which wraps past this, and a step would then read another client's
# rows without a word. (run.py checks the largest client against it before the run.)
MAX_INDICES = 2**31
# Host bytes an example index of a round's longest lane takes while the round is planned:
# 4 in each lane's int32 row of the stream (every row is as long as the longest lane's), and
# 16 for the int64 permutations of one client and their concatenation, at most that long.
STREAM_BYTES, CUT_BYTES = 4, 16


def host_memory() -> int:
  """The host's physical memory, in bytes."""
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def plan_bytes(need: int, lanes: int, streams: int = 1) -> int:
  """Host bytes of planning a round whose longest lane reads `need` example indices, over
  `lanes` lanes, `streams` copies of the stream held at once."""
  return need * (lanes * STREAM_BYTES * streams + CUT_BYTES)


def _check_indices(need: int, lanes: int, epochs: float, batch_size: float,
                   streams: int = 1) -> None:
  """Refuses a cohort whose longest lane reads `need` example indices, or more, than a round
  can address (a lane joins several clients), or whose plan alone would not fit in the host's
  memory (E 1e6 took 16 GB and more, growing, before its first round)."""
  from fathom_sim.config import ConfigError  # (config imports the data package)
  fix = ('lower E (config.epochs, and for FATHOM config.upper_epochs) or raise B '
         '(config.batch_size)')
  if need >= MAX_INDICES:
    raise ConfigError(f'E={epochs:g}, B={batch_size:g}: a lane of this cohort reads {need} '
                      f'example indices in the round, past the {MAX_INDICES} a round can '
                      f'address; {fix}, or spread the cohort over more lanes '
                      '(config.lanes_per_device, devices)')
  held = plan_bytes(need, lanes, streams)
  if held > host_memory():
    copies = f' (x{streams} copies: vectorised seeds\' own and stacked)' if streams > 1 else ''
    raise ConfigError(f'E={epochs:g}, B={batch_size:g}: this cohort\'s plan holds {need} '
                      f'example indices for each of its {lanes} lane(s){copies}, '
                      f'{held / 2**30:.1f} GiB, more than the host\'s memory '
                      f'({host_memory() / 2**30:.1f} GiB); {fix}')


def grow(current: int, needed: int) -> int:
  """A padded length that only grows: `current` while it suffices, else 1.5x `needed` rounded
  up to a power of two (headroom, so that the next cohorts' small variations do not each cost a
  compile)."""
  return current if needed <= current else bucket(-(-3 * needed // 2), 1)


def stream_length(current: int, want: int, need: int, room: int) -> int:
  """An index stream's padded length from `current`: grown for `want` indices (>= `need`, what
  the round reads), its headroom stopped at `room` (stream_room) and below MAX_INDICES, never
  below `need`."""
  return min(grow(current, want), max(need, current, room), max(need, MAX_INDICES - 1))


def client_batches(shuffler: np.random.Generator, num_examples: int, num_steps: int,
                   batch_size: int) -> np.ndarray:
  """[K, B] example indices: permutations of range(n), one per pass, cut into batches."""
  needed = num_steps * batch_size
  passes = -(-needed // num_examples)
  order = np.concatenate([shuffler.permutation(num_examples) for _ in range(passes)])
  return order[:needed].reshape(num_steps, batch_size)


def pack_lanes(num_steps: np.ndarray, num_lanes: int) -> list[list[int]]:
  """Longest-first onto the least loaded lane: client positions per lane, balanced by steps."""
  heap = [(0, lane) for lane in range(num_lanes)]
  lanes: list[list[int]] = [[] for _ in range(num_lanes)]
  for i in sorted(range(len(num_steps)), key=lambda i: (-int(num_steps[i]), i)):
    load, lane = heapq.heappop(heap)
    lanes[lane].append(i)
    heapq.heappush(heap, (load + int(num_steps[i]), lane))
  return lanes


def lane_steps(num_steps: np.ndarray, lanes: list[list[int]]) -> np.ndarray:
  """[L] int64: the local steps of each lane of pack_lanes' `lanes` (its clients' in turn)."""
  num_steps = np.asarray(num_steps)
  return np.array([num_steps[lane].sum() for lane in lanes], np.int64)


def longest_lane(num_steps: np.ndarray, num_lanes: int) -> int:
  """The local steps of a round whose clients take `num_steps`, packed as plan() packs them:
  its longest lane's, which the whole round runs to."""
  return int(lane_steps(num_steps, pack_lanes(num_steps, num_lanes)).max())


def fewest_lanes(cohorts: list[np.ndarray], devices: int, most: int, slack: float) -> int:
  """The fewest lanes per device, 1 .. `most`, whose rounds run on average at most (1 + slack)
  times the local steps they run on `most` lanes per device; `cohorts` holds the clients'
  local steps of sampled cohorts, each packed onto devices * lanes lanes as plan() packs it.

  Why: a step costs more the more lanes it computes (on an accelerator past a few lanes, about
  in proportion), and a round runs to its longest lane: one client a lane runs every lane to
  the cohort's longest client, fewer lanes of several clients each about as far.
  """
  def mean_steps(lanes: int) -> float:
    return float(np.mean([longest_lane(c, devices * lanes) for c in cohorts]))
  bound = (1 + slack) * mean_steps(most)
  # A lane runs at least its share of the cohort's steps: no fewer lanes can meet the bound.
  first = max(1, int(np.mean([np.sum(c) for c in cohorts]) / (devices * bound)))
  return next(k for k in range(first, most + 1) if k == most or mean_steps(k) <= bound)


@dataclasses.dataclass
class Planner:
  """Turns a sampled cohort into a `CohortPlan`; remembers the padded lengths it has used.

  resident: the training set lives on the devices (`stream` holds dataset row indices and no
  examples travel per round); otherwise each run of `lanes_per_buffer` consecutive lanes (a
  device's) shares a buffer of its clients' examples, which its streams index.
  exact_batch: a step computes max(B_int, min_batch_pad) rows, not that padded up to the grid
  of `batch_per_octave` sizes: for a run whose B never moves, where the grid saves no compile
  and only adds rows (FedAvg's B 20 would run as 24).
  """
  dataset: ClientDataset
  cohort_size: int
  num_lanes: int
  seed: int
  resident: bool = False
  lanes_per_buffer: int = 1
  batch_per_octave: int = 2
  exact_batch: bool = False
  min_batch_pad: int = 1
  stream_pad: int = 0
  buffer_pad: int = 0
  # Lanes whose examples this process loads (None: all). On several hosts, a process feeds
  # only the lanes of its own devices; the others' buffers stay zero and are never sent.
  local_lanes: np.ndarray | None = None
  # Streams of this length the host holds at once: 1 alone; vectorised seeds, each seed's
  # and the stacked copy of all of them (SeedPlanners), whose size the memory bounds count.
  streams_held: int = 1

  def padded_lengths(self) -> tuple:
    """The stream and buffer lengths so far (they only grow), to restore after a plan that is
    dropped."""
    return self.stream_pad, self.buffer_pad

  def restore_padded_lengths(self, lengths: tuple) -> None:
    self.stream_pad, self.buffer_pad = lengths

  def __post_init__(self):
    if self.resident and not isinstance(self.dataset, ArrayClientDataset):
      raise ValueError('a device-resident training set must be held in memory')
    if self.lanes_per_buffer < 1 or self.num_lanes % self.lanes_per_buffer:
      raise ValueError(f'lanes_per_buffer must divide the {self.num_lanes} lanes, got '
                       f'{self.lanes_per_buffer}')

  @functools.cached_property
  def _largest_client(self) -> int:
    return int(np.max(self.dataset.num_examples))

  @functools.cached_property
  def _example_spec(self) -> dict:
    """feature -> (shape of one example, dtype), read from the first client with data."""
    first = int(np.flatnonzero(np.asarray(self.dataset.num_examples) > 0)[0])
    return {k: (a.shape[1:], a.dtype) for k, a in self.dataset.client(first).items()}

  def _stream_length(self, current: int, longest_lane: int, b_int: int, batch_pad: int,
                     epochs: float, batch_size: float) -> int:
    """The stream's padded length after a cohort whose longest lane runs `longest_lane`
    steps, from `current`. A step reads batch_pad rows from its start, so the stream needs
    that much slack. It (only indices) is also sized for the dataset's largest client (up to
    STREAM_LOOKAHEAD times this cohort's need), so that a later cohort that draws it compiles
    nothing."""
    slack = batch_pad - b_int
    need = longest_lane * b_int + slack
    _, (largest_steps,) = fathom.integer_schedule(epochs, batch_size, [self._largest_client])
    largest = int(largest_steps) * b_int + slack
    return stream_length(current, max(need, min(largest, STREAM_LOOKAHEAD * need)), need,
                         self.stream_room())

  def stream_room(self) -> int:
    """The longest stream the padding may make past what a cohort needs: the streams_held
    copies of the lanes' streams in half the host's memory."""
    return host_memory() // (2 * STREAM_BYTES * self.num_lanes * self.streams_held)

  def padded_lengths_on_time(self, plan: CohortPlan, epochs: float, batch_size: float,
                             before: tuple) -> tuple:
    """The padded lengths that planning `plan`'s cohort under (epochs, batch_size) would leave
    from `before`, for a plan made from `before` under another E with the same B_int and K_i:
    its lanes, and so its buffer, are the same; the stream's lookahead follows the largest
    client's K under E."""
    stream = self._stream_length(before[0], int(plan.lane_steps.max()), plan.batch_size,
                                 plan.batch_pad, epochs, batch_size)
    return stream, before[1] if plan.shape[1] is None else plan.shape[1][1]

  def _batch_pad(self, b_int: int) -> int:
    """The rows a step computes for B_int: at least min_batch_pad, on the grid unless exact."""
    batch_pad = max(b_int, self.min_batch_pad)
    return batch_pad if self.exact_batch else bucket(batch_pad, self.batch_per_octave)

  def plan(self, clients: np.ndarray, round_index: int, epochs: float,
           batch_size: float) -> CohortPlan:
    """Round `round_index`'s plan for cohort `clients` under the (E, B) the device will use."""
    clients = np.asarray(clients, np.int64)
    c = len(clients)
    if c != self.cohort_size:
      raise ValueError(f'cohort of {c} clients, planner built for {self.cohort_size}')
    num_examples = np.asarray(self.dataset.num_examples)[clients].astype(np.int64)
    b_int, num_steps = fathom.integer_schedule(epochs, batch_size, num_examples)
    batch_pad = self._batch_pad(b_int)
    lanes = pack_lanes(num_steps, self.num_lanes)
    steps_per_lane = lane_steps(num_steps, lanes)
    _check_indices(int(steps_per_lane.max()) * b_int + batch_pad - b_int, self.num_lanes,
                   epochs, batch_size, self.streams_held)
    self.stream_pad = self._stream_length(self.stream_pad, int(steps_per_lane.max()), b_int,
                                          batch_pad, epochs, batch_size)
    per = self.lanes_per_buffer
    if not self.resident:
      self.buffer_pad = grow(self.buffer_pad, max(
          sum(int(num_examples[m].sum()) for m in lanes[b:b + per])
          for b in range(0, self.num_lanes, per)))

    slots = np.full((self.num_lanes, c), c, np.int32)
    stream = np.zeros((self.num_lanes, self.stream_pad), np.int32)
    source = None
    offset = 0  # the next free row of the buffer of the lane's device
    for lane, members in enumerate(lanes):
      slots[lane, :len(members)] = members
      pos = 0
      if lane % per == 0:
        offset = 0
      buf = lane // per
      for i in members:
        k, n, client = int(num_steps[i]), int(num_examples[i]), int(clients[i])
        idx = client_batches(rng.client_shuffler(self.seed, round_index, client), n, k, b_int)
        if self.resident:
          base = int(self.dataset.offsets[client])
        else:
          if source is None:
            source = {name: np.zeros((self.num_lanes // per, self.buffer_pad) + shape, dtype)
                      for name, (shape, dtype) in self._example_spec.items()}
          if self.local_lanes is None or self.local_lanes[lane]:
            for name, a in self.dataset.client(client).items():
              source[name][buf, offset:offset + n] = a
          base = offset
          offset += n
        stream[lane, pos:pos + k * b_int] = base + idx.reshape(-1)
        pos += k * b_int

    sentinel = lambda a, v, dtype: np.append(a, v).astype(dtype)
    table = CohortTable(client=sentinel(clients, 0, np.int32),
                        num_examples=sentinel(num_examples, 0, np.float32),
                        num_steps=sentinel(num_steps, 0, np.int32))
    return CohortPlan(lanes=Lanes(slots=slots, stream=stream, source=source), table=table,
                      batch_size=b_int, batch_pad=batch_pad, clients=clients,
                      num_examples=num_examples, num_steps=num_steps, lane_steps=steps_per_lane)

  def idle_plan(self, clients: np.ndarray) -> CohortPlan:
    """A plan in which cohort `clients` run no step, for a seed that has stopped while the
    others of its vectorised program go on: it reads no example, weighs nothing (its round is
    rejected, unseen) and sets neither the longest lane nor B_pad the others compute."""
    clients = np.asarray(clients, np.int64)
    c, none = len(clients), np.zeros(len(clients), np.int64)
    source = None
    if not self.resident:
      source = {name: np.zeros((self.num_lanes // self.lanes_per_buffer, 0) + shape, dtype)
                for name, (shape, dtype) in self._example_spec.items()}
    table = CohortTable(client=np.append(clients, 0).astype(np.int32),
                        num_examples=np.zeros(c + 1, np.float32),
                        num_steps=np.zeros(c + 1, np.int32))
    return CohortPlan(lanes=Lanes(slots=np.full((self.num_lanes, c), c, np.int32),
                                  stream=np.zeros((self.num_lanes, 0), np.int32),
                                  source=source),
                      table=table, batch_size=1, batch_pad=self._batch_pad(1),
                      clients=clients, num_examples=none, num_steps=none,
                      lane_steps=np.zeros(self.num_lanes, np.int64))


@dataclasses.dataclass
class StackedPlans:
  """S seeds' plans of one round, padded to common shapes and stacked on a leading seed axis."""
  plans: list[CohortPlan]
  table: CohortTable           # [S, C+1] fields
  lanes: Lanes                 # slots [S, L, C], stream [S, L, R_pad], source [S, D, R_buf, ...]
  batch_size: np.ndarray       # [S] int32 B_int
  batch_pad: int               # the largest of the seeds' B_pad


class SeedPlanners:
  """One Planner per seed (each with its own shuffles), and the shared padded lengths.

  Seeds of a vectorised run share one program, so they share B_pad (the largest) and the
  stream and buffer lengths; like a Planner's, those only grow. A seed's plan is exactly the
  plan it gets alone, up to padding that no real step reads.
  """

  def __init__(self, dataset: ClientDataset, cohort_size: int, num_lanes: int,
               seeds: list[int], **kwargs):
    self.planners = [Planner(dataset, cohort_size, num_lanes, s, streams_held=2 * len(seeds),
                             **kwargs) for s in seeds]
    self.stream_pad = self.buffer_pad = 0
    # The example buffers this process fills (None: all): the seeds' planners share the lanes.
    first = self.planners[0]
    self._local_buffers = None if first.local_lanes is None else np.flatnonzero(
        first.local_lanes.reshape(-1, first.lanes_per_buffer).any(axis=1))

  def padded_lengths(self) -> tuple:
    return self.stream_pad, self.buffer_pad, [p.padded_lengths() for p in self.planners]

  def restore_padded_lengths(self, lengths: tuple, keep: list[bool] | None = None) -> None:
    """Back to `lengths` (padded_lengths()), but for the seeds in `keep`: they keep theirs."""
    self.stream_pad, self.buffer_pad, each = lengths
    keep = keep or [False] * len(self.planners)
    for planner, own, k in zip(self.planners, each, keep, strict=True):
      if not k:
        planner.restore_padded_lengths(own)

  @staticmethod
  def _shared(lengths: tuple, plans: list[CohortPlan], own: list[tuple], room: int) -> tuple:
    """The shared stream and buffer lengths from `lengths`, after each seed's planner left
    its own (`own`) planning `plans`; the stream's headroom stops at `room` (stream_room)."""
    stream_pad, buffer_pad = lengths
    batch_pad = max(p.batch_pad for p in plans)
    # Seed s reads batch_pad rows where it alone read p.batch_pad: that much more slack. The
    # headroom grow() adds on top keeps the stream (indices only) one shape when the seeds' B
    # first part: without it FATHOM's 5 seeds compiled once more (10 against 9); like a
    # seed's own, it stops at the stream room. A stopped seed's idle plan reads nothing.
    need = max([stream + batch_pad - p.batch_pad for (stream, _), p
                in zip(own, plans, strict=True) if not p.idle], default=0)
    stream_pad = stream_length(stream_pad, need, need, room)
    if plans[0].lanes.source is not None:
      # The seeds' own buffers already hold grow()'s headroom: grown again, the examples held
      # (and, read per round, sent each round) doubled.
      buffer_pad = max(buffer_pad, *(buffer for _, buffer in own))
    return stream_pad, buffer_pad

  def plan(self, cohorts: list[np.ndarray], round_index: int, hparams: np.ndarray,
           reuse: list[CohortPlan | None] | None = None,
           idle: frozenset[int] = frozenset()) -> StackedPlans:
    """Plans seed s's cohort under its (E, B) = hparams[s][EPOCHS], hparams[s][BATCH], or
    takes reuse[s]: its plan made ahead that planning now would make again, its planner
    left with the lengths that plan left (see Rounds._kept). A seed in `idle` (stopped) gets
    an idle plan."""
    reuse = reuse or [None] * len(self.planners)
    plans = [r if r is not None
             else p.idle_plan(c) if s in idle
             else p.plan(c, round_index, float(hp[EPOCHS]), float(hp[BATCH]))
             for s, (p, c, hp, r) in enumerate(zip(self.planners, cohorts, hparams, reuse,
                                                   strict=True))]
    self.stream_pad, self.buffer_pad = self._shared(
        (self.stream_pad, self.buffer_pad), plans, [p.padded_lengths() for p in self.planners],
        self.planners[0].stream_room())
    stream = _stacked([p.lanes.stream for p in plans], self.stream_pad)
    batch_pad = max(p.batch_pad for p in plans)
    source = None
    if plans[0].lanes.source is not None:
      source = {k: _stacked([p.lanes.source[k] for p in plans], self.buffer_pad,
                            self._local_buffers)
                for k in plans[0].lanes.source}
    table = CohortTable(*(np.stack(f) for f in zip(*(p.table for p in plans))))
    slots = np.stack([p.lanes.slots for p in plans])
    return StackedPlans(plans=plans, table=table, lanes=Lanes(slots, stream, source),
                        batch_size=np.array([p.batch_size for p in plans], np.int32),
                        batch_pad=batch_pad)


def _stacked(arrays: list[np.ndarray], length: int,
             rows: np.ndarray | None = None) -> np.ndarray:
  """The seeds' arrays on a leading axis, axis 1 zero-padded to `length` (index 0 / zero
  examples: read by no real step). Each is copied once into its place: padded and then
  stacked, the buffers were copied twice (half of planning 5 seeds' FEMNIST-shaped cohorts).
  With `rows`, only those of axis 0 are copied (a process's own devices' buffers: the others
  are never sent, and copying their zeros made every host hold every host's examples)."""
  first = arrays[0]
  out = np.zeros((len(arrays), first.shape[0], length) + first.shape[2:], first.dtype)
  for place, a in zip(out, arrays):
    if rows is None:
      place[:, :a.shape[1]] = a
    else:
      place[rows, :a.shape[1]] = a[rows]
  return out
