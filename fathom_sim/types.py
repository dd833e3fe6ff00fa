"""The pytrees that cross the engine's boundaries: cohort plan, server state, round metrics.

Hyperparameter vectors are always ordered as in the paper: (E, eta, B) = (epochs, client
learning rate, batch size), and the FATHOM state holds their logs phi = (log E, log eta, log B).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np

Params = Any  # a pytree of arrays
Batch = dict  # feature name -> array with leading example axes

EPOCHS, ETA, BATCH = 0, 1, 2  # positions in an (E, eta, B) vector


class CohortTable(NamedTuple):
  """Per-client facts of a cohort, indexed by cohort slot; entry C is an inert sentinel."""
  client: np.ndarray        # [C+1] int32: dataset index (keys the client's dropout)
  num_examples: np.ndarray  # [C+1] float32: n_i, the client's aggregation weight
  num_steps: np.ndarray     # [C+1] int32: K_i (0 for the sentinel)


class Lanes(NamedTuple):
  """The device-side arrays of a cohort plan; their leading axis (lanes, or devices for
  `source`) is what `clients` shards.

  A lane runs the local steps of its clients back to back: its params start at the server
  model, and at a client's last step the lane emits that client's weighted update and restarts
  from the server model. Step s of a lane (counting over its clients) trains on the examples
  `stream[s*B_int : (s+1)*B_int]`, indices into `source` (the example buffer its device's lanes
  share, or the whole device-resident dataset).
  """
  slots: np.ndarray     # [L, C] int32: cohort slots of the lane's clients in order, then C
  stream: np.ndarray    # [L, R_pad] int32: example indices, B_int per step
  source: Batch | None  # feature -> [D, R_buf_pad, ...]: each device's lanes' clients' examples


@dataclasses.dataclass(frozen=True)
class CohortPlan:
  """One round's work: device-side lanes and table, and host-side facts about the cohort."""
  lanes: Lanes
  table: CohortTable
  batch_size: int              # B_int: real examples in every real step
  batch_pad: int               # B_pad >= B_int: rows computed per step (a compiled size)
  clients: np.ndarray          # [C] dataset indices of the cohort, in slot order
  num_examples: np.ndarray     # [C] n_i
  num_steps: np.ndarray        # [C] K_i
  lane_steps: np.ndarray       # [L] real steps in each lane

  @property
  def idle(self) -> bool:
    """Whether no client steps (Planner.idle_plan: a real cohort's K_i are all >= 1)."""
    return not self.num_steps.any()

  @property
  def shape(self) -> tuple:
    """Everything that selects a compiled program."""
    buffer = None if self.lanes.source is None else next(iter(
        self.lanes.source.values())).shape[:2]
    return self.lanes.stream.shape, buffer, self.batch_pad

  def computed_steps(self, num_devices: int, host_loop: bool = False, chunk: int = 1,
                     alongside: tuple[CohortPlan, ...] = ()) -> int:
    """Steps the devices run: every lane of a device runs as long as its longest lane, rounded
    up to a whole number of `chunk`s (with the loop driven by the host, as long as the longest
    lane of all). `alongside`: the plans of the other seeds of one vectorised program, whose
    loops run as long as the longest of any seed's."""
    every = np.stack([p.lane_steps for p in (self, *alongside)])
    if host_loop:
      return int(every.max() * self.lane_steps.size)
    per_device = every.reshape(len(every), num_devices, -1)
    longest = -(-per_device.max(axis=(0, 2)) // chunk) * chunk
    return int(longest.sum() * per_device.shape[2])

  def computed_rows(self, num_devices: int, host_loop: bool = False, chunk: int = 1,
                    alongside: tuple[CohortPlan, ...] = ()) -> int:
    """Example-gradients the devices compute: computed_steps at B_pad rows a step (with
    `alongside`, the largest B_pad of the seeds)."""
    batch_pad = max(p.batch_pad for p in (self, *alongside))
    return self.computed_steps(num_devices, host_loop, chunk, alongside) * batch_pad

  def lockstep_rows(self, num_devices: int, host_loop: bool = False, chunk: int = 1) -> int:
    """computed_rows with every device held as long as the one that runs longest (the round's
    collectives wait for it): what the devices' time is worth in example-gradients."""
    if host_loop:
      return self.computed_rows(num_devices, True)
    longest = -(-int(self.lane_steps.max()) // chunk) * chunk
    return longest * self.lane_steps.size * self.batch_pad

  def useful_rows(self) -> int:
    """Real example-gradients: K_i B_int summed over the cohort."""
    return int(self.num_steps.sum()) * self.batch_size

  def useful_fraction(self, num_devices: int, host_loop: bool = False, chunk: int = 1,
                      alongside: tuple[CohortPlan, ...] = ()) -> float:
    """Real example-gradients over computed ones (padding efficiency of this round)."""
    return self.useful_rows() / max(
        self.computed_rows(num_devices, host_loop, chunk, alongside), 1)


class HyperState(NamedTuple):
  """FATHOM's server-side state."""
  log_hparams: Any      # [3] phi = (log E, log eta, log B), never clipped unless asked
  opt_state: Any        # the hyper-optimizer's state over phi
  ema: Params           # g: moving average of past aggregated client updates


class ServerState(NamedTuple):
  """Everything a round reads and writes; the whole of it is what a checkpoint holds."""
  params: Params
  opt_state: Any        # server optimizer state
  hyper: HyperState
  round: Any            # int32: rounds completed so far
  rng: Any              # uint32[2]: the run's base key; round t uses fold_in(rng, t)


class RoundMetrics(NamedTuple):
  """What a round reports. Per-client arrays are in cohort (slot) order."""
  hparams: Any          # [3] (E, eta, B) used in this round, as real numbers
  next_hparams: Any     # [3] (E, eta, B) for the next round
  h_glob: Any
  h_local: Any
  train_loss: Any       # n_i-weighted mean over clients of their mean local-step loss
  accepted: Any         # bool: False when no client returned a finite update, or the new
                        # state (params, optimizer moments, phi, g) would not be finite
  dropped_clients: Any  # int32: clients left out for a non-finite update
  client_h: Any         # [C] h_i = min_k c_k over the client's real steps
  client_loss: Any      # [C]
  client_finite: Any    # [C] bool
