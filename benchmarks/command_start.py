"""What a short training command spends outside its rounds (run by hand, not in CI):

  python benchmarks/command_start.py --repeats=3

Runs launch/main.py on the quickstart, shrunk to `--rounds` rounds of 10 clients with a
checkpoint and an evaluation every 2 rounds, `--repeats` times in a row into fresh workdirs,
all with one compilation cache that starts empty: the first run compiles everything, the
others load what the cache kept. 8 CPU devices, as the tests run it. Prints each run's wall
seconds (the process's whole life) and what its summary says: compiles, programs loaded.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_ROUNDS = flags.DEFINE_integer('rounds', 4, 'Rounds of each run.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Runs, one after another.')


def main(argv):
  del argv
  with tempfile.TemporaryDirectory(prefix='fathom_command_start_') as work:
    env = dict(os.environ, JAX_PLATFORMS='cpu',
               XLA_FLAGS='--xla_force_host_platform_device_count=8')
    env.pop('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', None)  # the command's own default
    for i in range(_REPEATS.value):
      workdir = os.path.join(work, f'run{i}')
      start = time.perf_counter()
      p = subprocess.run(
          [sys.executable, os.path.join(ROOT, 'launch', 'main.py'),
           f'--config={os.path.join(ROOT, "configs", "quickstart.py")}', f'--workdir={workdir}',
           f'--compilation_cache={os.path.join(work, "cache")}',
           f'--config.num_rounds={_ROUNDS.value}', '--config.cohort_size=10',
           '--config.data.num_clients=60', '--config.eval_every=2',
           '--config.checkpoint_every=2'],
          cwd=ROOT, env=env, capture_output=True, text=True)
      seconds = time.perf_counter() - start
      if p.returncode != 0:
        sys.exit(f'run {i} failed (exit {p.returncode}):\n{p.stderr[-3000:]}')
      with open(os.path.join(workdir, 'summary.json')) as f:
        summary = json.load(f)
      print(f'run {i}: {seconds:5.2f} s  compiles {summary["compiles"]}, loaded '
            f'{summary["compile_cache_hits"]}, rounds {summary["rounds"]}', flush=True)


if __name__ == '__main__':
  app.run(main)
