"""Stateless randomness: every random choice of round t derives from fold_in(seed, t).

Streams keep the uses apart, so adding one never shifts another. Host-side shuffles use numpy's
generator seeded by the (seed, round, client) triple, which is equally stateless.
"""

from __future__ import annotations

import jax
import numpy as np

COHORT, TRAIN, EVAL = 0, 1, 2  # a round's streams
# Under the init key (below), the stream FedJAX-style per-leaf draws hang from
# (models.fedjax_init); no round uses it.
INIT_LEAVES = 3


def base_key(seed: int) -> jax.Array:
  """The run's base key as raw uint32[2] (plain data for checkpoints)."""
  return jax.random.PRNGKey(seed)


def init_key(seed: int) -> jax.Array:
  """The key the model's initial values are drawn from. It is fold_in(base, 0x1417), which is
  also round 5143's (kept: it made every initial model so far). Flax folds hashed names into
  it, and fedjax_init draws under INIT_LEAVES, a stream no round has, so no draw of the
  initial values repeats one of a round's."""
  return jax.random.fold_in(base_key(seed), 0x1417)


def round_key(base: jax.Array, round_index, stream: int) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(base, round_index), stream)


def client_shuffler(seed: int, round_index: int, client: int) -> np.random.Generator:
  """The generator for one client's batch shuffles in one round."""
  # SeedSequence hashes the triple, so nearby (round, client) pairs give unrelated streams.
  return np.random.default_rng([seed, round_index, client])
