"""Peak memory and time of `launch/report.py` over long runs (run by hand, not in CI):

  python benchmarks/report_memory.py --rows=1000000 --seeds=2 --scratch=/tmp/report_memory

Writes --seeds FATHOM run folders of one setting, each a metrics.jsonl of --rows rows shaped
as a FATHOM run's (every field a row holds, a test evaluation every --eval_every rounds) and a
summary.json, then runs the report over them in a process of its own and prints its peak RSS
(its own: launch/timing.peak_measured), its seconds and the bytes of the files read. Rerun it
in a checkout of another commit (--root) to compare.
"""

import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from launch.timing import peak_measured  # noqa: E402
_ROWS = flags.DEFINE_integer('rows', 1_000_000, 'Rows (rounds) of each run.')
_SEEDS = flags.DEFINE_integer('seeds', 2, 'Runs (seeds) of the setting.')
_EVAL_EVERY = flags.DEFINE_integer('eval_every', 100, 'Rounds between test evaluations.')
_SCRATCH = flags.DEFINE_string('scratch', '/tmp/report_memory', 'Scratch folder (emptied).')
_CHECKOUT = flags.DEFINE_string('root', ROOT, 'The checkout whose launch/report.py runs.')


def write_run(workdir: str, seed: int) -> int:
  """A FATHOM run's files with _ROWS rows; returns the bytes of its metrics.jsonl."""
  os.makedirs(workdir)
  rng = np.random.default_rng(seed)
  n = _ROWS.value
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump({'algorithm': 'fathom', 'num_rounds': n, 'seed': seed}, f)
  noise = rng.normal(size=(n, 4))
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    for i in range(n):
      t = i + 1
      row = {'round': t, 'train_loss': 2.0 / (1 + t / 1000) + 0.01 * noise[i, 0],
             'accepted': True, 'dropped_clients': 0, 'eta': 0.1 + 0.001 * noise[i, 1],
             'epochs': 1.0 + 0.01 * noise[i, 2], 'batch_size': 20.0 + 0.1 * noise[i, 3],
             'batch_size_int': 20, 'h_glob': 0.01 * noise[i, 1], 'h_local': 0.01 * noise[i, 2],
             'examples': 2000 * t, 'local_steps': 100 * t, 'padding_efficiency': 0.9,
             'wall_s': 0.02 * t}
      if t % _EVAL_EVERY.value == 0:
        row['test_accuracy'] = min(0.9, t / n)
      f.write(json.dumps(row) + '\n')
  with open(os.path.join(workdir, 'summary.json'), 'w') as f:
    json.dump({'rounds': n, 'total_examples': 2000 * n, 'total_local_steps': 100 * n,
               'final': {'test_accuracy': 0.9}}, f)
  return os.path.getsize(os.path.join(workdir, 'metrics.jsonl'))


def main(argv):
  del argv
  scratch = _SCRATCH.value
  shutil.rmtree(scratch, ignore_errors=True)
  size = sum(write_run(os.path.join(scratch, 'runs', 'fathom', f'seed={s}'), s)
             for s in range(_SEEDS.value))
  start = time.time()
  # (Its own peak: the rusage of a child carries this process's, which wrote the runs.)
  cmd, peak = peak_measured([os.path.join(_CHECKOUT.value, 'launch', 'report.py'),
                             os.path.join(scratch, 'runs'), f'--out={os.path.join(scratch, "out")}',
                             '--targets=0.5'])
  done = subprocess.run(cmd, capture_output=True, text=True)
  seconds = time.time() - start
  if done.returncode:
    sys.exit(f'report.py failed ({done.returncode}):\n{done.stderr[-2000:]}')
  peak_mib = peak() * 1024
  print(json.dumps({'rows': _ROWS.value, 'seeds': _SEEDS.value,
                    'metrics_mib': round(size / 2**20, 1), 'report_seconds': round(seconds, 1),
                    'report_peak_rss_mib': round(peak_mib, 1)}))
  commit = subprocess.run(['git', '-C', _CHECKOUT.value, 'rev-parse', '--short', 'HEAD'],
                          capture_output=True, text=True).stdout.strip() or '?'
  print(f'machine: {platform.platform()}, {os.cpu_count()} cores; python '
        f'{platform.python_version()}; {time.strftime("%Y-%m-%d")}; report.py of {commit} '
        f'({_CHECKOUT.value})')
  shutil.rmtree(scratch)


if __name__ == '__main__':
  app.run(main)
