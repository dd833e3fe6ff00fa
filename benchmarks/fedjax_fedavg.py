r"""FedJAX 0.0.17's FedAvg on the benchmark workload: client examples/s (run in the FedJAX venv).

  .venv-fedjax/bin/python benchmarks/fedjax_fedavg.py --sizes=sizes.json --cohort=50 \
      --rounds=3 --backend=jit

The EMNIST CNN of fedjax.models.emnist, client SGD lr 0.1, B 20, E 1, server SGD lr 1.0, on
clients with the given sizes (FEMNIST-shaped: 28x28 images, 62 classes; pixel values do not
change the cost). Prints one JSON object. Called by compare_fedjax.py; never by CI.
"""

import argparse
import importlib.metadata
import json
import os
import sys
import time

import fedjax
import jax
import numpy as np


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launch import timing  # noqa: E402  (imports no jax: timed as fathom_sim's ceiling is)


def centralized(model, clients: dict, batch_size: int, steps: int = 200) -> dict:
  """This stack's own ceiling: one jitted SGD step (lr 0.1) of the same model per batch of
  `batch_size` pooled examples, on one device. Beside fathom_sim's (same model, same batch,
  its own jax), it tells how much of a speedup is the newer jax rather than the simulator."""
  grad = fedjax.model_grad(model)

  @jax.jit
  def step(params, batch, key):
    return jax.tree_util.tree_map(lambda w, g: w - 0.1 * g, params, grad(params, batch, key))

  pool = list(clients.values())[:64]
  xs, ys = np.concatenate([c['x'] for c in pool]), np.concatenate([c['y'] for c in pool])
  order = np.random.default_rng(0).permutation(np.resize(np.arange(len(ys)),
                                                         (steps + 1) * batch_size))
  batches = [{'x': jax.device_put(xs[order[i * batch_size:(i + 1) * batch_size]]),
              'y': jax.device_put(ys[order[i * batch_size:(i + 1) * batch_size]])}
             for i in range(steps + 1)]
  keys = list(jax.random.split(jax.random.PRNGKey(0), steps + 1))
  ready = lambda p: jax.tree_util.tree_map(lambda a: a.block_until_ready(), p)
  held = [ready(step(model.init(jax.random.PRNGKey(0)), batches[0], keys[0]))]  # compile

  def one(i):
    held[0] = step(held[0], batches[i], keys[i])

  rates = timing.chunk_rates(one, lambda: ready(held[0]), steps, batch_size)
  return {'median': rates['median'], 'min': rates['min'], 'max': rates['max'],
          'batch_size': batch_size}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--sizes', required=True, help='JSON list of client sizes')
  parser.add_argument('--cohort', type=int, default=10)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--warmup', type=int, default=1)
  parser.add_argument('--backend', default='jit', choices=['jit', 'pmap'])
  parser.add_argument('--centralized', action='store_true',
                      help='also time the same model trained centrally on this jax')
  args = parser.parse_args()
  if args.backend == 'pmap':
    jax.config.update('jax_pmap_no_rank_reduction', False)  # FedJAX 0.0.17 on jax 0.4.38
  fedjax.set_for_each_client_backend(args.backend)

  with open(args.sizes) as f:
    sizes = json.load(f)
  rng = np.random.default_rng(0)
  clients = {
      f'{i:05d}'.encode(): {
          'x': rng.random((n, 28, 28, 1), dtype=np.float32),
          'y': rng.integers(0, 62, n).astype(np.int32)}
      for i, n in enumerate(sizes)}
  data = fedjax.InMemoryFederatedData(clients)
  ids = list(clients)

  model = fedjax.models.emnist.create_conv_model(only_digits=False)
  algorithm = fedjax.algorithms.fed_avg.federated_averaging(
      fedjax.model_grad(model), fedjax.optimizers.sgd(0.1), fedjax.optimizers.sgd(1.0),
      fedjax.ShuffleRepeatBatchHParams(batch_size=20, num_epochs=1))
  state = algorithm.init(model.init(jax.random.PRNGKey(0)))

  def one_round(t):
    chosen = rng.choice(len(ids), args.cohort, replace=False)
    cohort = [(cid, cds, jax.random.PRNGKey(t * 1000 + j))
              for j, (cid, cds) in enumerate(data.get_clients([ids[i] for i in chosen]))]
    new_state, _ = algorithm.apply(state, cohort)
    jax.tree_util.tree_map(lambda a: a.block_until_ready(), new_state.params)
    return new_state, sum(len(cds) for _, cds, _ in cohort)

  ceiling = centralized(model, clients, 20) if args.centralized else None
  for t in range(args.warmup):
    state, _ = one_round(t)
  examples = 0
  start = time.perf_counter()
  for t in range(args.warmup, args.warmup + args.rounds):
    state, n = one_round(t)
    examples += n
  wall = time.perf_counter() - start
  print(json.dumps({'side': 'fedjax', 'backend': args.backend, 'cohort_size': args.cohort,
                    'rounds': args.rounds, 'examples': examples, 'wall_s': wall,
                    'examples_per_s': examples / wall, 'centralized': ceiling,
                    'jax': jax.__version__,
                    'fedjax': importlib.metadata.version('fedjax')}))


if __name__ == '__main__':
  main()
