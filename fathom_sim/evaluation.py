"""Test-set evaluation: accuracy and loss over the examples of chosen test clients.

Examples are streamed client by client into fixed-size batches (split over the devices, padded
rows masked out), so the test set never has to fit in memory at once and one program serves
every evaluation.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from fathom_sim.data.federated import ClientDataset, read_ahead
from fathom_sim.mesh import by_client, put, replicated
from fathom_sim.models import Model
from fathom_sim.types import Batch, Params


def _batches(dataset: ClientDataset, clients: Sequence[int],
             batch_size: int) -> Iterator[tuple[Batch, int]]:
  """(batch padded to batch_size rows, real rows) over the clients' examples, in order."""

  def padded(parts: list) -> tuple[Batch, int]:
    joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    real = len(next(iter(joined.values())))
    return {k: np.concatenate([v, np.zeros((batch_size - real,) + v.shape[1:], v.dtype)])
            for k, v in joined.items()}, real

  pending, count = [], 0
  for examples in read_ahead(dataset, clients):
    n = len(next(iter(examples.values())))
    start = 0
    while n - start > 0:
      take = min(batch_size - count, n - start)
      pending.append({k: v[start:start + take] for k, v in examples.items()})
      count += take
      start += take
      if count == batch_size:
        yield padded(pending)
        pending, count = [], 0
  if count:
    yield padded(pending)


def make_evaluator(model: Model, mesh: Mesh,
                   batch_size: int) -> Callable[[Params, ClientDataset, Sequence[int]], dict]:
  """Returns evaluate(params, dataset, clients) -> {'accuracy', 'loss', 'count'}.

  A model's extra sums `correct_NAME` (over `count_NAME` if it has one, else over `count`) add
  `accuracy_NAME` to the result.
  """
  n_dev = mesh.devices.size
  batch_size = -(-batch_size // n_dev) * n_dev  # split evenly over devices
  rows, everywhere = by_client(mesh), replicated(mesh)

  @jax.jit
  def sums(params, batch, num_real):
    mask = jnp.arange(batch_size) < num_real
    return model.eval_sums(params, batch, mask)

  def evaluate(params: Params, dataset: ClientDataset, clients: Sequence[int]) -> dict:
    totals = None
    for batch, real in _batches(dataset, list(clients), batch_size):
      s = sums(params, put(batch, rows), put(np.int32(real), everywhere))
      totals = s if totals is None else jax.tree.map(jnp.add, totals, s)
    if totals is None:
      return {'accuracy': float('nan'), 'loss': float('nan'), 'count': 0}  # no extras known
    t = jax.device_get(totals)
    count = float(t['count'])
    out = {'accuracy': float(t['correct']) / count, 'loss': float(t['loss']) / count,
           'count': int(count)}
    for key in t:
      if key.startswith('correct_'):
        name = key[len('correct_'):]
        out[f'accuracy_{name}'] = float(t[key]) / float(t.get(f'count_{name}', count))
    return out

  return evaluate
