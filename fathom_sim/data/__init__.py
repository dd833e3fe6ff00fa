"""Federated datasets: sources, cohort sampling and cohort planning."""

from __future__ import annotations

import functools

from fathom_sim.data.byo import DataError, DatasetError, load_npz
from fathom_sim.data.federated import ClientDataset, MappedClientDataset, Task, materialize
from fathom_sim.data.prepared import load_prepared
from fathom_sim.data.synthetic import femnist_like, synthetic_alpha_beta

DATASETS = ('synthetic', 'femnist_synthetic', 'npz', 'femnist', 'stackoverflow')


def load_task(data_config) -> Task:
  """The task named by `config.data.name`, built from the rest of `config.data`."""
  c = data_config
  if c.name == 'synthetic':
    return synthetic_alpha_beta(num_clients=c.num_clients, alpha=c.alpha, beta=c.beta,
                                size_log_mean=c.size_log_mean, size_log_sigma=c.size_log_sigma,
                                min_examples=c.min_examples, max_examples=c.max_examples,
                                test_fraction=c.test_fraction, seed=c.seed)
  if c.name == 'femnist_synthetic':
    if c.in_memory:
      return _femnist_like_in_memory(c.num_clients, c.test_fraction, c.seed, c.shared_glyphs)
    return femnist_like(num_clients=c.num_clients, test_fraction=c.test_fraction, seed=c.seed,
                        shared_glyphs=c.shared_glyphs)
  if c.name == 'npz':
    return load_npz(c.path, num_classes=c.num_classes, test_fraction=c.test_fraction,
                    seed=c.seed)
  if c.name == 'femnist':
    return _flipped(load_prepared(c.name, c.data_dir), c.flip_pixels)
  if c.name == 'stackoverflow':
    return load_prepared(c.name, c.data_dir)
  raise DataError(f'data.name must be one of {DATASETS}, got {c.name!r}')


def flip_pixels(batch: dict) -> dict:
  """x -> 1 - x: EMNIST's ink 1 on a background of 0, as FedJAX's EMNIST loader gives it to
  the model (and so the paper's runs trained on it); the public files store ink 0 on 1."""
  return {**batch, 'x': 1.0 - batch['x']}


def _flipped(task: Task, flip: bool) -> Task:
  if not flip:
    return task
  return task._replace(train=MappedClientDataset(task.train, flip_pixels),
                       test=MappedClientDataset(task.test, flip_pixels))


@functools.lru_cache(maxsize=1)
def _femnist_like_in_memory(num_clients: int, test_fraction: float, seed: int,
                            shared_glyphs: bool) -> Task:
  """FEMNIST-shaped clients made once per process and held in memory: a sweep of small models
  stops paying for image generation every round, and its settings share one copy (generating
  3,400 writers takes ~30 s on 2 cores). Read-only, since every run sees the same arrays."""
  task = femnist_like(num_clients=num_clients, test_fraction=test_fraction, seed=seed,
                      shared_glyphs=shared_glyphs)
  task = task._replace(train=materialize(task.train), test=materialize(task.test))
  for split in (task.train, task.test):
    for a in (*split.features.values(), split.offsets):
      a.flags.writeable = False
  return task


__all__ = ['ClientDataset', 'DataError', 'DatasetError', 'Task', 'load_task', 'DATASETS']
