"""Peak host memory (RSS) of a short run at a given cohort size (run by hand, not in CI):

  python benchmarks/cohort_rss.py --cohort_size=300 --repeats=2

Runs launch/main.py on the FEMNIST-shaped generated data (3,400 writers) with a small MLP and
the examples sent per round (data_on_device=no, what a dataset too large for the devices does),
each time in a fresh process, and prints each process's peak RSS. What it shows is what the
host holds of the cohorts' examples around a round (its plan, the next one planned ahead).
"""

import os
import shutil
import subprocess
import sys
import tempfile

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from launch.timing import peak_measured  # noqa: E402
_COHORT = flags.DEFINE_integer('cohort_size', 300, 'Clients per round.')
_ROUNDS = flags.DEFINE_integer('rounds', 12, 'Rounds of each run.')
_REPEATS = flags.DEFINE_integer('repeats', 2, 'Runs, each in a process of its own.')


def main(argv):
  del argv
  for _ in range(_REPEATS.value):
    work = tempfile.mkdtemp(prefix='fathom_cohort_rss_')
    try:
      cmd, peak = peak_measured([
          os.path.join(ROOT, 'launch', 'main.py'),
          f'--config={os.path.join(ROOT, "configs", "quickstart.py")}', f'--workdir={work}',
          '--config.data.name=femnist_synthetic', '--config.data.num_clients=3400',
          '--config.model.name=mlp', '--config.model.hidden=(32,)',
          f'--config.cohort_size={_COHORT.value}', f'--config.num_rounds={_ROUNDS.value}',
          '--config.eval_every=1000', '--config.data_on_device=no', '--compilation_cache='])
      with open(os.path.join(work, 'log.txt'), 'w+') as log:
        status = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
        gib = peak()  # (its own: the rusage of a child carries this process's peak)
        if status:
          log.seek(0)
          sys.exit(log.read()[-3000:])
      print(f'cohort {_COHORT.value}: peak RSS {gib * 1024:.0f} MiB')
    finally:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
  app.run(main)
