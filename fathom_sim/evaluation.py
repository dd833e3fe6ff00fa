"""Test-set evaluation: accuracy and loss over the examples of chosen test clients.

Examples are streamed client by client into fixed-size batches (split over the devices, padded
rows masked out), so the test set never has to fit in memory at once and one program serves
every evaluation. A run that evaluates the same clients every time keeps their batches on the
devices when they are small (KEEP_BYTES).
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from fathom_sim.data.federated import ClientDataset, read_ahead
from fathom_sim.mesh import by_client, put, queue_bound, replicated
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


# The quickstart evaluates its 1,000 test clients (4.5 MB) every 5 rounds: batched and sent
# again each time, they took 2.3-2.9 s of its 500 rounds' 16-22 s on 2 CPU cores
# (docs/benchmarks.md). A larger test set is sent each time: kept, it would take device memory
# from the rounds.
KEEP_BYTES = 64 << 20


def batch_rows(eval_batch_size: int, num_examples: Sequence[int]) -> int:
  """An evaluation batch's rows: config.eval_batch_size, but no more than the test clients'
  `num_examples` hold together (4,000,000 rows for the quickstart's 18,818 examples took 9x
  the host memory of 1024, all of it padding, and a larger value ran out of it at its first
  evaluation, rounds after the start)."""
  return max(1, min(eval_batch_size, int(np.sum(num_examples))))


class Evaluator:
  """evaluate(params, dataset, clients) -> {'accuracy', 'loss', 'count'}: one program, fixed
  batches split over the devices.

  A model's extra sums `correct_NAME` (over `count_NAME` if it has one, else over `count`) add
  `accuracy_NAME` to the result; `loss` is over `count_loss` if the model has one.
  """

  def __init__(self, model: Model, mesh: Mesh, batch_size: int, keep_bytes: int = 0):
    n_dev = mesh.devices.size
    self._keep_bytes = keep_bytes
    self._kept = None  # (dataset, clients, [(batch, real) on the devices]) of the last call
    self.batch_size = -(-batch_size // n_dev) * n_dev  # split evenly over devices
    self._rows, self._everywhere = by_client(mesh), replicated(mesh)
    # Each batch's program ends in an all-reduce (the totals are everywhere): on several CPU
    # devices the host waits every `queue_bound` batches, or XLA:CPU deadlocks and aborts once
    # more than 32 are queued (the quickstart on 8 with eval_batch_size 100: ~190 programs an
    # evaluation, sent back to back from batches kept on the devices).
    self._wait_every = queue_bound(mesh)
    rows = self.batch_size

    def sums(params, batch, num_real):
      return model.eval_sums(params, batch, jnp.arange(rows) < num_real)

    # The running totals go through the one program, so that an evaluation runs that program
    # alone (a separate add would be one more compile, and one more dispatch a batch).
    @jax.jit
    def add_sums(totals, params, batch, num_real):
      return jax.tree.map(jnp.add, totals, sums(params, batch, num_real))

    self._sums, self._add_sums = sums, add_sums
    self._zero_totals = None  # numpy zeros shaped as the totals, made at the first batch

  def _placed(self, batch: Batch, real: int) -> tuple:
    """A batch and its count of real rows, on the devices as the program takes them."""
    return put(batch, self._rows), put(np.int32(real), self._everywhere)

  def _zeros(self, args: tuple):
    """Zero totals, placed as the program returns its totals."""
    if self._zero_totals is None:
      self._zero_totals = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                                       jax.eval_shape(self._sums, *args))
    return put(self._zero_totals, self._everywhere)

  def _on_devices(self, dataset: ClientDataset, clients: list[int]) -> Iterable[tuple]:
    """(batch, real rows) on the devices: those kept when the last call evaluated the same
    clients of the same dataset; else made and sent, and kept if within keep_bytes."""
    if self._kept is not None and self._kept[0] is dataset and self._kept[1] == clients:
      yield from self._kept[2]
      return
    self._kept, kept, size = None, [], 0
    for batch, real in _batches(dataset, clients, self.batch_size):
      placed = self._placed(batch, real)
      size += sum(v.nbytes for v in batch.values())
      if kept is not None and size <= self._keep_bytes:
        kept.append(placed)
      else:
        kept = None
      yield placed
    if kept:
      self._kept = (dataset, clients, kept)

  def __call__(self, params: Params, dataset: ClientDataset, clients: Sequence[int]) -> dict:
    totals = None
    for sent, (batch, real) in enumerate(
        self._on_devices(dataset, [int(i) for i in clients]), 1):
      args = (params, batch, real)
      totals = self._add_sums(self._zeros(args) if totals is None else totals, *args)
      if self._wait_every and sent % self._wait_every == 0:
        totals = jax.block_until_ready(totals)
    if totals is None:
      return {'accuracy': float('nan'), 'loss': float('nan'), 'count': 0}  # no extras known
    t = jax.device_get(totals)
    count = float(t['count'])
    out = {'accuracy': _ratio(t['correct'], count),
           'loss': _ratio(t['loss'], t.get('count_loss', count)),
           'count': int(count)}
    for key in t:
      if key.startswith('correct_'):
        name = key[len('correct_'):]
        out[f'accuracy_{name}'] = _ratio(t[key], t.get(f'count_{name}', count))
    return out

  def lower(self, params: Params, dataset: ClientDataset, client: int):
    """The program that evaluating `params` runs, lowered, to compile ahead (jit finds the
    compiled program in its cache then): `params` may be arrays or jax.ShapeDtypeStructs with
    their shardings, `client` is one client with examples (only its features' shapes and
    dtypes count)."""
    batch, real = next(_batches(dataset, [client], self.batch_size))
    args = (params, *self._placed(batch, real))
    return self._add_sums.lower(self._zeros(args), *args)


def extra_accuracies(result: dict) -> dict:
  """A model's further accuracies (e.g. Stack Overflow's without OOV) as test_* fields."""
  return {f'test_{k}': v for k, v in result.items() if k.startswith('accuracy_')}


def _ratio(total, count) -> float:
  """total / count, NaN when nothing was counted (e.g. sampled test clients whose every target
  is eos or out of vocabulary), as for an evaluation of no clients."""
  return float(total) / float(count) if float(count) else float('nan')


def make_evaluator(model: Model, mesh: Mesh, batch_size: int, keep_bytes: int = 0
                   ) -> Evaluator:
  """The evaluator of `model` over `mesh`, `batch_size` examples a batch (rounded up to a
  multiple of the devices); it keeps the batches of clients it evaluates again on the devices
  up to `keep_bytes` (KEEP_BYTES for a run whose evaluations take the same clients)."""
  return Evaluator(model, mesh, batch_size, keep_bytes)
