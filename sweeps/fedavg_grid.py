"""The baseline: FedAvg with static (eta, E, B) chosen by grid search.

3 x 3 x 3 around the reference values (0.1, 1, 20). The report names the best static setting
per target accuracy and the grid's total cost (examples over all its runs).
"""

import itertools


def get_sweep():
  grid = itertools.product((0.03, 0.1, 0.3), (0.5, 1.0, 2.0), (10.0, 20.0, 50.0))
  return {
      'config': '../configs/quickstart.py',
      'fixed': {'algorithm': 'fedavg'},
      'overrides': [{'eta': eta, 'epochs': e, 'batch_size': b} for eta, e, b in grid],
      'seeds': 5,
  }
