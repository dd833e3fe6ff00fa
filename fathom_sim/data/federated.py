"""Client-grouped datasets: the one interface every source serves, and reading them ahead.

Any source (generated, bring-your-own, FEMNIST, Stack Overflow) is a `ClientDataset`: client
ids, per-client example counts, and random access to one client's examples as a dict of numpy
arrays (features `x` and `y` with a leading example axis).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import os
from typing import Callable, Iterator, NamedTuple, Protocol, Sequence

import numpy as np

from fathom_sim.types import Batch


class ClientDataset(Protocol):
  """Examples grouped by client, with random access by client index."""

  @property
  def client_ids(self) -> np.ndarray: ...  # [num_clients] str

  @property
  def num_examples(self) -> np.ndarray: ...  # [num_clients] int64

  def client(self, index: int) -> Batch: ...  # feature -> [n_i, ...]


class Task(NamedTuple):
  """What a run trains on: train and test clients and the label space."""
  name: str
  train: ClientDataset
  test: ClientDataset
  num_classes: int


@dataclasses.dataclass(frozen=True)
class ArrayClientDataset:
  """In-memory clients: client i owns rows offsets[i]:offsets[i+1] of every feature array.
  `examples_sha256`: a digest of the file they were read from (fingerprint), if any."""
  features: dict
  offsets: np.ndarray
  client_ids: np.ndarray
  examples_sha256: str | None = None

  def __post_init__(self):
    n = len(self.offsets) - 1
    if len(self.client_ids) != n:
      raise ValueError(f'{len(self.client_ids)} client ids for {n} clients')
    for name, array in self.features.items():
      if len(array) != self.offsets[-1]:
        raise ValueError(f'feature {name!r} has {len(array)} rows, counts add up to '
                         f'{self.offsets[-1]}')

  @classmethod
  def from_clients(cls, client_ids: Sequence[str],
                   clients: Sequence[Batch]) -> 'ArrayClientDataset':
    counts = [len(next(iter(c.values()))) for c in clients]
    names = list(clients[0]) if clients else []
    for cid, c, n in zip(client_ids, clients, counts):
      if sorted(c) != sorted(names) or any(len(a) != n for a in c.values()):
        # (else one client's rows would shift into the next one's labels)
        raise ValueError(f'client {cid}: features {({k: len(a) for k, a in c.items()})} are '
                         f'not {names} of one length')
    features = {k: np.concatenate([c[k] for c in clients]) for k in names}
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return cls(features, offsets, np.asarray(client_ids, dtype=str))

  @property
  def num_examples(self) -> np.ndarray:
    return np.diff(self.offsets)

  def client(self, index: int) -> Batch:
    if not 0 <= index < len(self.offsets) - 1:  # (-1 read an empty client, not the last)
      raise IndexError(f'client {index} of {len(self.offsets) - 1}')
    lo, hi = self.offsets[index], self.offsets[index + 1]
    return {k: v[lo:hi] for k, v in self.features.items()}


@dataclasses.dataclass(frozen=True)
class GeneratedClientDataset:
  """Clients whose examples are made on demand by `make(index)`, deterministically.

  For generated data far larger than memory (the FEMNIST-shaped throughput task).
  """
  client_ids: np.ndarray
  num_examples: np.ndarray
  make: Callable[[int], Batch]

  def client(self, index: int) -> Batch:
    return self.make(index)


class _Over:
  """A ClientDataset over `self.dataset`: the same clients, ids and sizes."""
  dataset: ClientDataset

  @property
  def client_ids(self) -> np.ndarray:
    return self.dataset.client_ids

  @property
  def num_examples(self) -> np.ndarray:
    return self.dataset.num_examples

  @property
  def identity(self):
    return getattr(self.dataset, 'identity', None)

  @property
  def examples_sha256(self) -> str | None:
    return getattr(self.dataset, 'examples_sha256', None)


@dataclasses.dataclass(frozen=True)
class MappedClientDataset(_Over):
  """`dataset`'s clients, each passed through `fn` as it is read (a per-example transform
  that the loaders of the public copies apply, such as FedJAX's flip of EMNIST's pixels)."""
  dataset: ClientDataset
  fn: Callable[[Batch], Batch]

  def client(self, index: int) -> Batch:
    return self.fn(self.dataset.client(index))


class Prefetcher(_Over):
  """A ClientDataset that reads the clients named by `fetch` on background threads.

  The cohorts of round t+1 are known while round t computes (they do not depend on the
  hyperparameters), so their examples (generated images, rows of a prepared dataset) are read
  in that time instead of on the critical path. `client(i)` returns exactly what the wrapped
  dataset's `client(i)` returns, waiting for it if it is still being read.
  """

  def __init__(self, dataset: ClientDataset):
    self.dataset = dataset
    self._pool = concurrent.futures.ThreadPoolExecutor(read_workers(),
                                                       thread_name_prefix='prefetch')
    self._pending: dict[int, concurrent.futures.Future] = {}

  def fetch(self, clients: Sequence[int]) -> None:
    """Starts reading `clients` (once each, however many seeds' cohorts name them) and drops
    what the previous fetch held for other clients."""
    pending = {}
    for i in map(int, clients):
      if i not in pending:
        pending[i] = self._pending.get(i) or self._pool.submit(self.dataset.client, i)
    for i, future in self._pending.items():
      if i not in pending:  # still queued (reading ahead failed): not ahead of these reads
        future.cancel()
    self._pending = pending

  def client(self, index: int) -> Batch:
    future = self._pending.get(int(index))
    if future is not None:
      try:
        return future.result()
      except Exception:  # noqa: BLE001 - read again below, where any error is raised anew
        # Its read failed: read here, as without a prefetcher (a transient error is tried
        # again; a lasting one is raised fresh from this thread, not the worker's again).
        self._pending.pop(int(index), None)
    return self.dataset.client(index)

  def close(self) -> None:
    """Drops the reads held and ends the threads: a read still queued is cancelled; one
    running finishes on its thread, unwaited (a run that stops must not keep threads, or
    examples, for a cohort it will not train). `client` then reads on the caller's thread;
    `fetch` raises."""
    self._pending = {}
    self._pool.shutdown(wait=False, cancel_futures=True)


def fingerprint(task: Task, examples: bool = True) -> str:
  """A digest of the data a run trains and evaluates on: the task's name and classes, each
  split's client ids and example counts in order, what a dataset says decides its examples
  beyond them (a prepared one's format and vocabulary: its `identity`), and, with `examples`,
  the digest of the examples a dataset read from a file keeps (`examples_sha256`: a prepared
  split's records, an npz file's arrays). Data prepared again from the same files has the same
  fingerprint; from other files, another, even with the same clients and sizes.

  Without `examples`: the fingerprint checkpoints kept before the examples' digest was part of
  it (and still the whole of it for data generated from the config)."""
  digest = hashlib.sha256(json.dumps([task.name, int(task.num_classes)]).encode())
  for split in (task.train, task.test):
    digest.update(json.dumps([[str(i) for i in split.client_ids],
                              np.asarray(split.num_examples, np.int64).tolist(),
                              getattr(split, 'identity', None)], sort_keys=True).encode())
  if examples:
    for split in (task.train, task.test):
      sha = getattr(split, 'examples_sha256', None)
      if sha is not None:
        digest.update(f'examples {sha}'.encode())
  return digest.hexdigest()[:16]


def read_workers() -> int:
  """Threads that read clients at once: the cores this process may use, at most 8. Generating
  (numpy) and reading records (ArrayRecord) release the GIL, so reads scale with them."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  return max(1, min(8, cores or 1))


def read_ahead(dataset: ClientDataset, clients: Sequence[int],
               depth: int | None = None) -> Iterator[Batch]:
  """dataset.client(i) for each of `clients`, in order, read on worker threads: at most
  `depth` clients (default 2 per worker) are being read or held, the one yielded included."""
  clients = [int(i) for i in clients]
  if depth is not None and depth < 1:
    raise ValueError(f'read_ahead: depth must be at least 1, got {depth}')
  if isinstance(dataset, ArrayClientDataset):  # slices of arrays in memory: nothing to hide
    yield from map(dataset.client, clients)
    return
  depth = depth or 2 * read_workers()
  pool = concurrent.futures.ThreadPoolExecutor(read_workers(), thread_name_prefix='read_ahead')
  try:
    pending = collections.deque(pool.submit(dataset.client, i) for i in clients[:depth])
    for i in clients[depth:]:
      yield pending.popleft().result()
      pending.append(pool.submit(dataset.client, i))
    while pending:
      yield pending.popleft().result()
  finally:  # a consumer that stops early (or fails) does not wait for reads it will not use
    pool.shutdown(wait=False, cancel_futures=True)


def materialize(dataset: ClientDataset) -> ArrayClientDataset:
  """Every client's examples made once and held in memory (the same examples, client by
  client)."""
  if isinstance(dataset, ArrayClientDataset):
    return dataset
  return ArrayClientDataset.from_clients(
      dataset.client_ids, list(read_ahead(dataset, range(len(dataset.client_ids)))))


def concat_clients(dataset: ClientDataset, clients: Sequence[int]) -> Batch:
  parts = [dataset.client(int(i)) for i in clients]
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
