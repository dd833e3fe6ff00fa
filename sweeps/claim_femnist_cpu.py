"""claim_femnist.py sized for a 2-core CPU: the same FEMNIST-shaped data, grid, seeds and
FATHOM defaults, but an MLP (784-128-62) in place of the EMNIST CNN and 300 rounds.

  bash experiments/claim.sh femnist_cpu
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from claim_femnist import settings  # noqa: E402


def get_sweep():
  return {
      'config': '../configs/femnist.py',
      'fixed': {'data.name': 'femnist_synthetic', 'data.num_clients': 3400, 'num_rounds': 300,
                'eval_every': 10,
                'eval_clients': 340, 'model.name': 'mlp', 'model.hidden': (128,),
                'data.in_memory': True},
      'overrides': settings(),
      'seeds': 5,
  }
