"""Which clients a round trains and evaluates: uniform picks without replacement, keyed by
(seed, round, stream) so that every platform and process draws the same bits.

Apart from federated.py: JAX draws them, and the commands that only read or convert data
(prepare_data, report) import the data package without JAX.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from fathom_sim import rng
from fathom_sim.data.federated import ClientDataset


@functools.cache
def _host_cpu() -> jax.Device:
  return jax.local_devices(backend='cpu')[0]


@functools.partial(jax.jit, static_argnums=(1, 2))
def _choice(key: jax.Array, population: int, size: int) -> jax.Array:
  return jax.random.choice(key, population, (size,), replace=False)


def sample_clients(seed: int, round_index: int, stream: int, population: np.ndarray,
                   size: int) -> np.ndarray:
  """`size` distinct members of `population`, uniformly, keyed by fold_in(seed, round)."""
  if size > len(population):
    raise ValueError(f'cannot sample {size} clients out of {len(population)}')
  # All of it on the host's CPU device: a key made on an accelerator would queue behind the
  # round in flight there, and reading the picks back would wait for that round to finish
  # (which stalled the prefetch of round t+1 on GPU). The same bits on any platform.
  with jax.default_device(_host_cpu()):
    key = rng.round_key(rng.base_key(seed), round_index, stream)
    picks = np.asarray(_choice(key, len(population), size))
  return np.asarray(population)[picks]


def sample_cohort(dataset: ClientDataset, seed: int, round_index: int,
                  cohort_size: int) -> np.ndarray:
  """Round t's cohort: distinct clients with at least one example, uniformly at random."""
  eligible = np.flatnonzero(np.asarray(dataset.num_examples) > 0)
  return sample_clients(seed, round_index, rng.COHORT, eligible, cohort_size)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _choice_rounds(base: jax.Array, rounds: jax.Array, stream: int, population: int,
                   size: int) -> jax.Array:
  # Each round's bits depend on its key alone, so these are _choice's, round by round.
  return jax.vmap(lambda r: jax.random.choice(rng.round_key(base, r, stream), population,
                                              (size,), replace=False))(rounds)


def sample_cohorts(dataset: ClientDataset, seed: int, first_round: int, num_rounds: int,
                   cohort_size: int) -> np.ndarray:
  """The cohorts of rounds first_round .. first_round + num_rounds - 1 in one program:
  [num_rounds, cohort_size], row i what sample_cohort gives for round first_round + i."""
  eligible = np.flatnonzero(np.asarray(dataset.num_examples) > 0)
  if cohort_size > len(eligible):
    raise ValueError(f'cannot sample {cohort_size} clients out of {len(eligible)}')
  with jax.default_device(_host_cpu()):  # as sample_clients: never behind a round in flight
    rounds = np.arange(first_round, first_round + num_rounds, dtype=np.int32)
    picks = np.asarray(_choice_rounds(rng.base_key(seed), rounds, rng.COHORT, len(eligible),
                                      cohort_size))
  return eligible[picks]
