"""The paper's claim on the quickstart task: FATHOM (reference defaults) against FedAvg with
static (eta, E, B) tuned by a 3 x 3 x 3 grid around the reference values, 5 seeds each.

  bash experiments/claim.sh quickstart     # sweep (seeds vectorised) + report, ~20 min on CPU
"""

import itertools

ETAS = (0.03, 0.1, 0.3)
EPOCHS = (0.5, 1.0, 2.0)
BATCH_SIZES = (10.0, 20.0, 50.0)


def get_sweep():
  settings = [{'algorithm': 'fathom'}]
  settings += [{'algorithm': 'fedavg', 'eta': eta, 'epochs': e, 'batch_size': b}
               for eta, e, b in itertools.product(ETAS, EPOCHS, BATCH_SIZES)]
  return {'config': '../configs/quickstart.py', 'overrides': settings, 'seeds': 5}
