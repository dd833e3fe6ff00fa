"""The paper's claim on the quickstart task: FATHOM (reference defaults) against FedAvg with
static (eta, E, B) tuned by a 3 x 3 x 3 grid around the reference values, 5 seeds each.

  bash experiments/claim.sh quickstart     # sweep (seeds vectorised) + report; docs/results.md
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from claim_grid import FEMNIST_GRID  # noqa: E402


def get_sweep():
  return {'config': '../configs/quickstart.py', 'overrides': FEMNIST_GRID, 'seeds': 5}
