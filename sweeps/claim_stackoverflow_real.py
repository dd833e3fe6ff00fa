"""The claim on real Stack Overflow (prepared at data/stackoverflow, README: Real datasets)
with the paper's LSTM: configs/stackoverflow.py (1500 rounds of 50 clients) for FATHOM and a
3 x 3 x 3 static FedAvg grid around its reference (eta, E, B) = (0.32, 1, 16), 5 seeds each.

  bash experiments/claim.sh stackoverflow_real [OUT] [--config.data.data_dir=DIR]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from claim_grid import STACKOVERFLOW_GRID  # noqa: E402


def get_sweep():
  return {'config': '../configs/stackoverflow.py', 'overrides': STACKOVERFLOW_GRID,
          'seeds': 5}
