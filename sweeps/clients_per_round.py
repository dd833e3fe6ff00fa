"""Sensitivity of FATHOM to the clients per round, as in the paper (10, 100, 200).

The paper runs 50 seeds per setting; 5 here (--seeds=50 for the paper's count).
"""


def get_sweep():
  return {
      'config': '../configs/quickstart.py',
      'overrides': [{'cohort_size': n} for n in (10, 100, 200)],
      'seeds': 5,
  }
