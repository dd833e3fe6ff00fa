"""claim_femnist.py with an MLP (784-128-62) in place of the EMNIST CNN and 300 rounds, the
generated clients held in memory: the same data, grid, seeds and FATHOM defaults.

  XLA_FLAGS=--xla_force_host_platform_device_count=2 bash experiments/claim.sh femnist_cpu

76 minutes on a 2-core CPU with 2 host devices (docs/results.md has the results, recorded with
2 devices: another device count sums in another order and gives other numbers).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from claim_femnist import FIXED  # noqa: E402
from claim_grid import FEMNIST_GRID  # noqa: E402


def get_sweep():
  fixed = dict(FIXED, num_rounds=300, **{'model.name': 'mlp', 'model.hidden': (128,),
                                        'data.in_memory': True})
  return {'config': '../configs/femnist.py', 'fixed': fixed, 'overrides': FEMNIST_GRID,
          'seeds': 5}
