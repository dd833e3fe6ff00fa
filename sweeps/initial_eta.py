"""Sensitivity to FATHOM's initial client learning rate eta, as in the paper (0.1, 0.05).

The paper runs 50 seeds per setting; 5 here (--seeds=50 for the paper's count).
"""


def get_sweep():
  return {
      'config': '../configs/quickstart.py',
      'overrides': [{'eta': e} for e in (0.1, 0.05)],
      'seeds': 5,
  }
