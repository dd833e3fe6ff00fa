"""The claim on real FEMNIST (prepared at data/femnist, README: Real datasets) with the EMNIST
CNN: the paper's reference run (configs/femnist.py, 1500 rounds of 10 clients) for FATHOM and
the 3 x 3 x 3 static FedAvg grid, 5 seeds each.

  bash experiments/claim.sh femnist_real [OUT] [--config.data.data_dir=DIR]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from claim_grid import FEMNIST_GRID  # noqa: E402


def get_sweep():
  return {'config': '../configs/femnist.py', 'fixed': {'eval_clients': 340},
          'overrides': FEMNIST_GRID, 'seeds': 5}
