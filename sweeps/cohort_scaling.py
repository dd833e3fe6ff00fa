"""Cohort-size scaling: clients per round from 10 up to the whole quickstart population (1,000).

The report puts accuracy per round next to time per round (median of wall_s between rows).
Both algorithms, so the cost of FATHOM's hypergradients shows too. Fewer rounds than the
quickstart: the large cohorts are what cost here.
"""


def get_sweep():
  return {
      'config': '../configs/quickstart.py',
      'fixed': {'num_rounds': 100},
      'overrides': [{'algorithm': a, 'cohort_size': n}
                    for a in ('fathom', 'fedavg') for n in (10, 20, 50, 100, 200, 500, 1000)],
      'seeds': 2,
  }
