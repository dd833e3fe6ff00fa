"""The whole cohort's local training, sharded: lanes over the `clients` mesh axis.

Each device vmaps `lane_train` over its own lanes (on CPU it calls it when it holds one) for
as many steps as its longest lane needs (a device with no work runs none), then the weighted
updates and per-client statistics are reduced across lanes and devices with psum / pmin / pmax.
Every client lives in exactly one lane, so the result is the same on any number of devices up
to float rounding.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
from jax.sharding import Mesh, PartitionSpec as P

from fathom_sim.client import LaneResult, LossFn, lane_init, lane_result, lane_step, lane_train
from fathom_sim.mesh import CLIENTS

CohortTrain = Callable[..., LaneResult]


def make_cohort_train(loss_fn: LossFn, mesh: Mesh, *, batch_pad: int,
                      source_per_device: bool, chunk: int = 1) -> CohortTrain:
  """Returns f(server_params, eta, batch_size, round_key, table, slots, stream, source).

  `chunk`: each device checks its loop's bound every `chunk` local steps (client.lane_train).
  `source` holds the examples that `stream` indexes: [D, R_buf, ...], one buffer per device
  that its lanes share (source_per_device), or the whole dataset, replicated on every device.
  """
  # Measured on CPU only (docs/benchmarks.md): there a branch skips three passes over the model
  # per step. XLA:GPU may read a conditional's predicate back to the host at every step, so
  # accelerators keep the vmap (the cond runs both sides and selects) until measured.
  unbatched_cond = mesh.devices.flat[0].platform == 'cpu'
  one_lane = functools.partial(lane_train, loss_fn, batch_pad=batch_pad, chunk=chunk)
  lanes_train = jax.vmap(one_lane, in_axes=(None, None, None, None, None, None, 0, 0, None))

  def per_device(server_params, eta, batch_size, round_key, table, slots, stream, source):
    source = _device_source(source, source_per_device)
    lane_steps = table.num_steps[slots].sum(axis=1)  # the sentinel slot has 0 steps
    if slots.shape[0] == 1 and unbatched_cond:
      # No vmap of one lane, so lane_step's end-of-client cond stays a branch.
      r = one_lane(server_params, eta, batch_size, round_key, table, lane_steps[0], slots[0],
                   stream[0], source)
      r = jax.tree.map(lambda a: a[None], r)
    else:
      r = lanes_train(server_params, eta, batch_size, round_key, table, lane_steps.max(),
                      slots, stream, source)
    return LaneResult(
        weighted_sum=jax.tree.map(lambda s: jax.lax.psum(s.sum(axis=0), CLIENTS),
                                  r.weighted_sum),
        h=jax.lax.pmin(r.h.min(axis=0), CLIENTS),
        loss=jax.lax.psum(r.loss.sum(axis=0), CLIENTS),
        finite=jax.lax.pmax(r.finite.max(axis=0), CLIENTS))

  source_spec = P(CLIENTS) if source_per_device else P()
  # check_vma=False: lane_train is written per lane, unaware of mesh axes, and its loop state
  # starts replicated and becomes per-device; the outputs are made replicated by the
  # collectives above.
  return jax.shard_map(
      per_device, mesh=mesh,
      in_specs=(P(), P(), P(), P(), P(), P(CLIENTS), P(CLIENTS), source_spec),
      out_specs=P(), check_vma=False)


def _device_source(source, per_device: bool):
  """The examples this device's lanes index: its own buffer (its shard of [D, R_buf, ...]), or
  the replicated dataset."""
  if not per_device:
    return source

  def own(a):
    if a.shape[0] != 1:  # a plan made with other than one buffer per device (Planner)
      raise ValueError(f'each device needs exactly one example buffer, got {a.shape[0]}')
    return a[0]
  return jax.tree.map(own, source)


class CohortSteps(NamedTuple):
  """The cohort's local training one step at a time, for a loop driven by the host.

  init(server_params, slots) -> carry, every lane at the server model ([L, ...] over devices);
  step(carry, server_params, eta, batch_size, round_key, table, slots, stream, source) -> carry,
  one local step of every lane; result(carry) -> LaneResult summed over lanes and devices.
  Running `step` max-lane-steps times gives what make_cohort_train's loop gives.
  """
  init: Callable
  step: Callable
  result: Callable


def make_cohort_steps(loss_fn: LossFn, mesh: Mesh, *, batch_pad: int,
                      source_per_device: bool) -> CohortSteps:
  one_step = jax.vmap(
      functools.partial(lane_step, loss_fn, batch_pad=batch_pad),
      in_axes=(0, None, None, None, None, None, 0, 0, None))

  def lanes_step(*args):
    return one_step(*args[:-1], _device_source(args[-1], source_per_device))

  lanes = P(CLIENTS)

  def init(server_params, slots):
    return jax.vmap(lane_init, in_axes=(None, None), axis_size=slots.shape[0])(
        server_params, slots.shape[1])

  source_spec = P(CLIENTS) if source_per_device else P()
  step = jax.shard_map(
      lanes_step, mesh=mesh,
      in_specs=(lanes, P(), P(), P(), P(), P(), lanes, lanes, source_spec), out_specs=lanes,
      check_vma=False)

  def result(carry) -> LaneResult:
    r = lane_result(carry)
    return LaneResult(weighted_sum=jax.tree.map(lambda s: s.sum(axis=0), r.weighted_sum),
                      h=r.h.min(axis=0), loss=r.loss.sum(axis=0), finite=r.finite.max(axis=0))

  return CohortSteps(init, step, result)
