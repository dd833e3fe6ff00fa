"""XLA:CPU's deadlock with many collective programs queued (run by hand, not in CI; without
the simulator, to report upstream):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
      python benchmarks/cpu_rendezvous.py --programs=200 [--wait_every=16]

Sends --programs programs, each a batch split over the devices summed into a replicated total
(an all-reduce), back to back from batches already on the devices, --tries times. On a 2-core
machine with 8 devices more than 32 of them queued abort the process after 40 s (exit 134:
"Expected 8 threads to join the rendezvous, but only 7 of them arrived"); waiting for the
total every --wait_every programs (at most 32) does not. fathom_sim.mesh.queue_bound says why.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

_PROGRAMS = flags.DEFINE_integer('programs', 200, 'Programs sent back to back.')
_ROWS = flags.DEFINE_integer('rows', 104, 'Rows of each batch (split over the devices).')
_WAIT_EVERY = flags.DEFINE_integer('wait_every', 0, 'Wait for the total every this many '
                                   'programs (0: never, until the last).')
_TRIES = flags.DEFINE_integer('tries', 10, 'Times the programs are sent.')


def main(argv):
  del argv
  mesh = Mesh(np.array(jax.devices()), ('d',))
  split, everywhere = NamedSharding(mesh, P('d')), NamedSharding(mesh, P())

  @jax.jit
  def add(total, w, x):
    return total + jnp.sum(jnp.tanh(x @ w))

  r = np.random.default_rng(0)
  w = jax.device_put(r.normal(size=(60, 64)).astype(np.float32), everywhere)
  batches = [jax.device_put(r.normal(size=(_ROWS.value, 60)).astype(np.float32), split)
             for _ in range(_PROGRAMS.value)]
  jax.block_until_ready(batches)
  print(f'{len(jax.devices())} devices, {_PROGRAMS.value} programs, wait every '
        f'{_WAIT_EVERY.value or "-"}', flush=True)
  for attempt in range(_TRIES.value):
    start = time.perf_counter()
    total = jax.device_put(np.float32(0), everywhere)
    for i, x in enumerate(batches, 1):
      total = add(total, w, x)
      if _WAIT_EVERY.value and i % _WAIT_EVERY.value == 0:
        total = jax.block_until_ready(total)
    print(f'try {attempt}: {float(total):.3f} in {time.perf_counter() - start:.3f} s', flush=True)


if __name__ == '__main__':
  app.run(main)
