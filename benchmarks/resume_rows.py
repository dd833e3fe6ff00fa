"""What a resume spends on metrics.jsonl (run by hand, not in CI):

  python benchmarks/resume_rows.py --rows=1000000

Writes a metrics.jsonl of `--rows` rows shaped as a run's (its evaluation every 10th row) into
a temporary folder, then times metrics.keep_rows as a resume calls it, keeping all but the last
100 rows: the cut in place (no kept row changes, the common resume), and the copy through a
replacing file (a kept row changes: an evaluation dropped), each `--repeats` times, alternating.
Prints the seconds of each and the file's size.
"""

import json
import os
import shutil
import statistics
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fathom_sim import metrics  # noqa: E402

_ROWS = flags.DEFINE_integer('rows', 1_000_000, 'Rows in the file.')
_REPEATS = flags.DEFINE_integer('repeats', 2, 'Timings of each way.')


def _write(path: str, rows: int) -> None:
  row = {'round': 0, 'train_loss': 2.3456789, 'eta': 0.0999999, 'epochs': 1.0312, 'batch_size':
         19.87654, 'batch_size_int': 20, 'h_glob': 0.0123, 'h_local': 0.4567, 'examples': 1940,
         'local_steps': 97, 'dropped_clients': 0, 'accepted': True,
         'padding_efficiency': 0.9512, 'wall_s': 1.2345678}
  with open(path, 'w', encoding='utf-8') as f:
    for t in range(1, rows + 1):
      extra = {'test_accuracy': 0.5, 'test_loss': 1.5} if t % 10 == 0 else {}
      f.write(json.dumps({**row, 'round': t, **extra}) + '\n')


def main(argv):
  del argv
  work = tempfile.mkdtemp(prefix='fathom_resume_rows_')
  try:
    path = os.path.join(work, metrics.METRICS_FILE)
    last = _ROWS.value - 100
    last -= last % 10  # an evaluated row: dropping its evaluation changes it
    times = {'cut in place': [], 'copied': []}
    for _ in range(_REPEATS.value):
      for way in times:
        _write(path, _ROWS.value)
        size = os.path.getsize(path)
        start = time.perf_counter()
        metrics.keep_rows(work, last, drop_eval_at=last if way == 'copied' else None,
                          into=metrics.RowLog(0.4))
        times[way].append(time.perf_counter() - start)
    print(f'{_ROWS.value} rows, {size / 1e6:.0f} MB; keep_rows to round {last}:')
    for way, seconds in times.items():
      print(f'  {way:12} median {statistics.median(seconds):6.2f} s  '
            f'({", ".join(f"{s:.2f}" for s in seconds)})')
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
  app.run(main)
