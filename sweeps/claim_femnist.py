"""The paper's claim on FEMNIST-shaped data with the paper's EMNIST CNN: FATHOM (reference
defaults of the paper's FEMNIST runs) against FedAvg with static (eta, E, B) tuned by a
3 x 3 x 3 grid around the reference values, 5 seeds each, 10 clients per round, 500 rounds.

Generated FEMNIST-shaped data (3,400 writers, 62 classes, 28 x 28 images, lognormal sizes):
140 runs of about 1M client examples each, an accelerator's job (docs/results.md has the cost
on a 2-core CPU); claim_femnist_cpu.py is the same with an MLP.

  bash experiments/claim.sh femnist
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from claim_grid import FEMNIST_GRID  # noqa: E402

# model.init 'flax' (configs/femnist.py now says 'fedjax'): the recorded runs (docs/results.md)
# started from flax's initial values, and rerunning them must give them again.
FIXED = {'data.name': 'femnist_synthetic', 'data.num_clients': 3400, 'num_rounds': 500,
         'eval_every': 10, 'eval_clients': 340, 'model.init': 'flax'}


def get_sweep():
  return {'config': '../configs/femnist.py', 'fixed': FIXED, 'overrides': FEMNIST_GRID,
          'seeds': 5}
