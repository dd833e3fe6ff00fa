"""The settings of the claim experiments (claim_*.py): FATHOM with its reference defaults, and
FedAvg over a 3 x 3 x 3 grid of static (eta, E, B) around the task's reference values."""

import itertools


def settings(etas, epochs, batch_sizes) -> list[dict]:
  out = [{'algorithm': 'fathom'}]
  out += [{'algorithm': 'fedavg', 'eta': eta, 'epochs': e, 'batch_size': b}
          for eta, e, b in itertools.product(etas, epochs, batch_sizes)]
  return out


# Reference (eta, E, B) of the paper: FEMNIST and the quickstart (0.1, 1, 20); Stack Overflow
# (0.32, 1, 16).
FEMNIST_GRID = settings((0.03, 0.1, 0.3), (0.5, 1.0, 2.0), (10.0, 20.0, 50.0))
STACKOVERFLOW_GRID = settings((0.1, 0.32, 1.0), (0.5, 1.0, 2.0), (8.0, 16.0, 32.0))

