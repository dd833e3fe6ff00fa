"""Several hosts, one run: joining JAX's distributed runtime, and who writes the run's files.

Every process runs the same program on the same config. Each samples and plans the same
cohorts (they are functions of seed and round alone) but loads and sends to its devices only
the examples of the lanes its own devices hold; the mesh spans all processes' devices, and the
collectives of the round cross hosts. Process 0 writes metrics, summary and config; all
processes take part in checkpoints (orbax writes each array once), so the workdir must be a
folder every host sees (a GCS bucket on a Cloud TPU pod).
"""

from __future__ import annotations

import importlib

import jax
from absl import flags, logging


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Joins the distributed runtime before any computation.

  On a Cloud TPU pod (or under Slurm / Open MPI) every argument may be None: JAX detects them.
  Elsewhere give all three, the same coordinator_address (host:port of process 0) on every
  process. CPU devices use gloo for their cross-process collectives.
  """
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  _orbax_syncs_on_the_coordination_service()


# orbax's absl flag (orbax.checkpoint._src.multihost): barriers through jax.distributed's client.
ORBAX_BARRIER_FLAG = 'experimental_orbax_use_distributed_barrier'


def _orbax_syncs_on_the_coordination_service() -> None:
  """Makes orbax's checkpoint syncs wait at the distributed runtime's barrier (up to orbax's
  300 s) instead of running a collective over every device.

  On CPU that collective goes through gloo, which fails when the processes reach it more than
  30 s apart (the first contact's key-value lookup times out): a process that reached the
  first checkpoint sync that late failed a test run once. On accelerators the barrier also
  keeps checkpoint syncs off the devices.
  """
  importlib.import_module('orbax.checkpoint')  # defines the flag
  if ORBAX_BARRIER_FLAG in flags.FLAGS:
    flags.FLAGS[ORBAX_BARRIER_FLAG].value = True
  else:
    logging.warning('orbax has no --%s flag: its checkpoint syncs run as collectives',
                    ORBAX_BARRIER_FLAG)


def is_writer() -> bool:
  """True on the one process that writes the run's files (metrics, summary, config)."""
  return jax.process_index() == 0
