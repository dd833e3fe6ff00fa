"""launch/main.py on a disk that fills up during the run: from round FULL_ROUND on, the rows of
metrics.jsonl go to /dev/full, whose writes fail with ENOSPC as a full disk's do. Run as a
script by test_cli."""

import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fathom_sim import metrics  # noqa: E402

_write = metrics.MetricsWriter.write


def _filling_write(self, row):
  if row.get('round', 0) >= int(os.environ['FULL_ROUND']) and not getattr(self, 'full', False):
    self._file.close()
    self._file, self.full = open('/dev/full', 'a', encoding='utf-8'), True
  return _write(self, row)


metrics.MetricsWriter.write = _filling_write
sys.argv[0] = os.path.join(ROOT, 'launch', 'main.py')
runpy.run_path(sys.argv[0], run_name='__main__')
