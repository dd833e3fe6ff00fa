"""Host memory of stacking vectorised seeds' example buffers on one process of several.

A process fills only its own devices' buffers (the others stay np.zeros' untouched pages);
data/plan.py's _stacked copies the seeds' buffers into one array. Copying every buffer makes
every page of the stacked array resident; copying the local ones alone leaves the others
untouched. Prints the resident memory the stacking added, in a process of its own per form.

  PYTHONPATH=. python benchmarks/stack_local.py
"""

import subprocess
import sys

CHILD = '''
import numpy as np, sys
from fathom_sim.data.plan import _stacked
def rss():
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * 4096
buffers, local = 64, np.array([0])  # 64 devices' buffers, this process drives the first
seeds = []
for s in range(2):
  a = np.zeros((buffers, 1024, 28 * 28), np.float32)  # FEMNIST-shaped examples
  a[local] = 1.0
  seeds.append(a)
before = rss()
out = _stacked(seeds, 1024, None if sys.argv[1] == 'all' else local)
print(f'{sys.argv[1]:>5} buffers copied: +{(rss() - before) / 2**20:.0f} MiB resident '
      f'(stacked array {out.nbytes / 2**20:.0f} MiB)')
'''

for form in ('all', 'local'):
  subprocess.run([sys.executable, '-c', CHILD, form], check=True)
