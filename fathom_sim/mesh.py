"""The device mesh: one `clients` axis over the devices a run uses, and its shardings."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

CLIENTS = 'clients'


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D `clients` mesh over the first `num_devices` devices (0: all of them)."""
  devices = jax.devices()
  if num_devices < 0 or num_devices > len(devices):
    raise ValueError(f'num_devices must be in [0, {len(devices)}] (0 = all), got {num_devices}')
  devices = devices[:num_devices or len(devices)]
  # Auto axes: ops outside shard_map (segment reductions over the per-step outputs) are
  # partitioned by the compiler.
  return Mesh(np.asarray(devices), (CLIENTS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def by_client(mesh: Mesh) -> NamedSharding:
  """Leading axis split over the `clients` axis (lanes of a cohort plan)."""
  return NamedSharding(mesh, P(CLIENTS))
