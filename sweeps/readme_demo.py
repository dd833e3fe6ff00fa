"""The README's report: FATHOM against a small FedAvg grid on the quickstart, 2 seeds, 300 rounds.

  python launch/sweep.py --sweep=sweeps/readme_demo.py --out=runs/readme_demo
  python launch/report.py runs/readme_demo --out=docs/readme_demo --targets=0.25,0.3,0.4
"""


def get_sweep():
  settings = [{'algorithm': 'fathom'}]
  settings += [{'algorithm': 'fedavg', 'eta': eta, 'batch_size': b}
               for eta in (0.05, 0.1, 0.2) for b in (20.0, 50.0)]
  return {
      'config': '../configs/quickstart.py',
      'fixed': {'num_rounds': 300},
      'overrides': settings,
      'seeds': 2,
  }
