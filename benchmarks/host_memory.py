"""Host memory of a long run, round by round, and of resuming it (run by hand, not in CI):

  python benchmarks/host_memory.py --rounds=60000 --workdir=/tmp/fathom_host_memory

1. runs the quickstart (FedAvg by default: ~200-300 rounds/s on a 2-core CPU, so many rounds
   pass quickly) for --rounds rounds in its own process, sampling its resident memory (VmRSS)
   and the rows of its metrics.jsonl every --every seconds;
2. fits RSS against rounds over the samples past the first tenth of the run (start-up and
   compiles are done by then): the slope is what each round leaves behind on the host;
3. runs the same command with --extra more rounds, which resumes from the last checkpoint and
   reads and rewrites the run's metrics.jsonl, and reports that process's peak RSS;
4. writes a metrics.jsonl of --file_rows copies of the run's last row (rounds renumbered) and
   reports the peak RSS of a process that cuts it at its last round with metrics.keep_rows (what
   a resume does), less that of the same process without the call.
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
from fathom_sim import provenance  # noqa: E402
from launch.timing import peak_measured  # noqa: E402
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/fathom_host_memory', 'Scratch run folder '
                               '(emptied first).')
_ROUNDS = flags.DEFINE_integer('rounds', 60000, 'Rounds of the long run.')
_EXTRA = flags.DEFINE_integer('extra', 10, 'Rounds of the resumed run beyond --rounds.')
_ALGORITHM = flags.DEFINE_enum('algorithm', 'fedavg', ['fedavg', 'fathom'], 'The run\'s.')
_EVERY = flags.DEFINE_float('every', 2.0, 'Seconds between samples.')
_FILE_ROWS = flags.DEFINE_integer('file_rows', 1_000_000, 'Rows of the file keep_rows cuts.')
_CHECKPOINT_EVERY = flags.DEFINE_integer(
    'checkpoint_every', 0, 'The run\'s checkpoint_every (0: a tenth of --rounds, as the '
    'figures before 2026-12-07 were taken, which saved 10 times and so could not see what a '
    'save leaves behind).')

_KEEP_ROWS = '''
import sys
sys.path.insert(0, sys.argv[1])
from fathom_sim import metrics
if sys.argv[3] == '1':
  metrics.keep_rows(sys.argv[2], int(sys.argv[4]))
'''


def _rss_kib(pid: int) -> int | None:
  try:
    with open(f'/proc/{pid}/status') as f:
      return next(int(line.split()[1]) for line in f if line.startswith('VmRSS:'))
  except (OSError, StopIteration):
    return None


def _rows(path: str) -> int:
  try:
    with open(path, 'rb') as f:
      return sum(1 for _ in f)
  except OSError:
    return 0


def run(num_rounds: int, samples: list | None) -> tuple[int, float, int]:
  """(exit status, seconds, peak RSS in KiB) of one launch/main.py; appends (rows, RSS KiB)
  to `samples` while it runs."""
  workdir = _WORKDIR.value
  every = max(num_rounds // 10, 1)
  cmd, peak = peak_measured([
      os.path.join(ROOT, 'launch', 'main.py'),
      f'--config={os.path.join(ROOT, "configs", "quickstart.py")}', f'--workdir={workdir}',
      f'--config.algorithm={_ALGORITHM.value}', f'--config.num_rounds={num_rounds}',
      f'--config.eval_every={every}',
      f'--config.checkpoint_every={_CHECKPOINT_EVERY.value or every}',
      f'--config.log_every={every}'])
  start = time.time()
  with open(os.path.join(os.path.dirname(workdir), 'host_memory.log'), 'ab') as log:
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    while True:
      if process.poll() is not None:
        gib = peak()  # (its own: the rusage of a child carries this process's peak)
        return process.returncode, time.time() - start, round((gib or 0) * 2**20)
      rss = _rss_kib(process.pid)
      if samples is not None and rss is not None:
        samples.append((_rows(os.path.join(workdir, 'metrics.jsonl')), rss))
      time.sleep(_EVERY.value)


def main(argv):
  del argv
  shutil.rmtree(_WORKDIR.value, ignore_errors=True)
  os.makedirs(os.path.dirname(os.path.abspath(_WORKDIR.value)), exist_ok=True)
  samples: list = []
  code, seconds, peak = run(_ROUNDS.value, samples)
  if code:
    sys.exit(f'the long run failed ({code}); see host_memory.log next to {_WORKDIR.value}')
  settled = [(r, m) for r, m in samples if r >= _ROUNDS.value / 10]
  if len(settled) < 3:
    sys.exit('too few samples past the first tenth of the run: raise --rounds')
  rows, rss = np.array(settled, dtype=float).T
  slope = np.polyfit(rows, rss, 1)[0] * 1024  # bytes per round
  size = os.path.getsize(os.path.join(_WORKDIR.value, 'metrics.jsonl'))
  code, resume_s, resume_peak = run(_ROUNDS.value + _EXTRA.value, None)
  if code:
    sys.exit(f'the resumed run failed ({code}); see host_memory.log')
  scratch = os.path.join(os.path.dirname(os.path.abspath(_WORKDIR.value)), 'keep_rows')
  shutil.rmtree(scratch, ignore_errors=True)
  os.makedirs(scratch)
  with open(os.path.join(_WORKDIR.value, 'metrics.jsonl')) as f:
    last = json.loads(f.readlines()[-1])
  with open(os.path.join(scratch, 'metrics.jsonl'), 'w') as f:
    for t in range(1, _FILE_ROWS.value + 1):
      f.write(json.dumps({**last, 'round': t}) + '\n')
  file_mib = os.path.getsize(os.path.join(scratch, 'metrics.jsonl')) / 2**20
  peaks = []
  for call in ('0', '1'):
    cmd, read_peak = peak_measured(['-c', _KEEP_ROWS, ROOT, scratch, call,
                                    str(_FILE_ROWS.value)])
    subprocess.run(cmd, capture_output=True, check=True)
    peaks.append(read_peak() * 2**20)  # KiB
  shutil.rmtree(scratch)
  result = {
      'algorithm': _ALGORITHM.value, 'rounds': _ROUNDS.value,
      'checkpoint_every': _CHECKPOINT_EVERY.value or max(_ROUNDS.value // 10, 1),
      'seconds': round(seconds, 1),
      'rss_mib_at_tenth': round(rss[0] / 1024, 1), 'rss_mib_at_end': round(rss[-1] / 1024, 1),
      'peak_rss_mib': round(peak / 1024, 1), 'bytes_per_round': round(slope),
      'metrics_mib': round(size / 2**20, 1), 'resume_peak_rss_mib': round(resume_peak / 1024, 1),
      'resume_seconds': round(resume_s, 1), 'file_rows': _FILE_ROWS.value,
      'file_mib': round(file_mib, 1),
      'keep_rows_base_peak_mib': round(peaks[0] / 1024, 1),
      'keep_rows_extra_peak_mib': round((peaks[1] - peaks[0]) / 1024, 1)}
  print(json.dumps(result))
  import jax
  print(f'machine: {platform.platform()}, {os.cpu_count()} cores; python '
        f'{platform.python_version()}, jax {jax.__version__}; '
        f'{time.strftime("%Y-%m-%d")}; commit {provenance.source_commit()}')


if __name__ == '__main__':
  app.run(main)
