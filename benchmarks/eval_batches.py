"""Milliseconds an evaluation takes on the mesh's devices: 19,000 MLP examples (1,000 test
clients of 19) in batches of --batch kept on the devices, 20 evaluations after a first one.
Run by hand (not in CI), old and new code alternating, e.g.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu PYTHONPATH=. \
      python benchmarks/eval_batches.py --batch=1024
"""

import time

import jax
import numpy as np
from absl import app, flags

from fathom_sim.data.federated import ArrayClientDataset
from fathom_sim.evaluation import make_evaluator
from fathom_sim.mesh import make_mesh, put, replicated
from fathom_sim.models import get_model

_BATCH = flags.DEFINE_integer('batch', 1024, 'Rows of an evaluation batch.')
_TIMES = flags.DEFINE_integer('times', 20, 'Evaluations timed.')


def main(argv):
  del argv
  counts = [19] * 1000
  r = np.random.default_rng(0)
  n = sum(counts)
  data = ArrayClientDataset({'x': r.normal(size=(n, 60)).astype(np.float32),
                             'y': r.integers(0, 10, n).astype(np.int32)},
                            np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                            np.array([str(i) for i in range(len(counts))]))
  model = get_model('mlp', num_classes=10, hidden=(64,))
  mesh = make_mesh(len(jax.devices()))
  params = put(model.init(jax.random.PRNGKey(3), data.client(0)), replicated(mesh))
  evaluate = make_evaluator(model, mesh, batch_size=_BATCH.value, keep_bytes=64 << 20)
  clients = list(range(len(counts)))
  evaluate(params, data, clients)  # compiles, and keeps the batches on the devices
  start = time.perf_counter()
  for _ in range(_TIMES.value):
    evaluate(params, data, clients)
  took = (time.perf_counter() - start) / _TIMES.value
  print(f'{mesh.devices.size} device(s), batch {_BATCH.value}: {took * 1000:.1f} ms an '
        'evaluation')


if __name__ == '__main__':
  app.run(main)
