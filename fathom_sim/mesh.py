"""The device mesh: one `clients` axis over the devices a run uses, and its shardings."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from fathom_sim.errors import first_line

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


def queue_bound(mesh: Mesh) -> int | None:
  """How many programs ending in a collective (an all-reduce) the host may send to `mesh`
  back to back before waiting for them; None: any number.

  XLA:CPU keeps at most 32 programs in flight per device, and sends a multi-device program
  from tasks on the pool that also runs the programs: max(cores, devices) threads, 8 for 8
  devices on 2 cores. A 33rd program's task holds a thread while it waits for room, and the
  all-reduce of an earlier program, which needs all 8 at once, never gets its last one: the
  process aborts after 40 s ("Expected 8 threads to join the rendezvous, but only 7 of them
  arrived"). Measured with benchmarks/cpu_rendezvous.py, no simulator: 32 programs queued
  pass, 40 and 48 abort (docs/benchmarks.md, forty-fourth session)."""
  if mesh.devices.flat[0].platform == 'cpu' and mesh.devices.size > 1:
    return 16  # (half the 32: room for what else the host has sent)
  return None


def local_rows(mesh: Mesh, num_rows: int) -> np.ndarray | None:
  """Which of `num_rows` lanes this process's devices hold under `by_client` (None: all, as on
  one host)."""
  if jax.process_count() == 1:
    return None
  mask = np.zeros(num_rows, bool)
  for index in by_client(mesh).addressable_devices_indices_map((num_rows,)).values():
    mask[index[0]] = True
  return mask


def put(tree, sharding: NamedSharding):
  """Host arrays onto the devices. On several hosts each process supplies only the shards its
  own devices hold (no cross-host check that the processes agree, and no transfer of what
  another host feeds)."""
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  def one(a):
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])
  return jax.tree.map(one, tree)


def out_of_memory(e: BaseException) -> str | None:
  """What ran out, and its first line, when `e` says a device (or, for CPU devices, the host)
  ran out of memory: 'XLA: RESOURCE_EXHAUSTED: ...' from a program, or from an eager
  operation (which raises it as a plain ValueError), or 'host: Unable to allocate ...' from
  numpy; else None."""
  xla = isinstance(e, jax.errors.JaxRuntimeError) or type(e) is ValueError
  if xla and 'RESOURCE_EXHAUSTED' in str(e):
    return 'XLA: ' + first_line(e)
  if isinstance(e, MemoryError):
    return 'host: ' + (str(e).strip().splitlines() or ['MemoryError'])[0][:200]
  return None
