"""Sensitivity to FATHOM's initial batch size B, as in the paper (B in {4, 8, 20, 256}).

The paper runs 50 seeds per setting; 5 here keep a CPU sweep practical (--seeds=50 for the
paper's count).
"""


def get_sweep():
  return {
      'config': '../configs/quickstart.py',
      'overrides': [{'batch_size': b} for b in (4.0, 8.0, 20.0, 256.0)],
      'seeds': 5,
  }
