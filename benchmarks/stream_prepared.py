"""Memory of a prepared dataset far larger than what a run holds: generate, prepare, stream.

  python benchmarks/stream_prepared.py --workdir=/tmp/fathom_stream --gigabytes=2.2

1. writes a FedJAX-format EMNIST SQLite file of random (incompressible) pixels, --gigabytes big;
2. prepares it (launch/prepare_data.py, its own process);
3. reads every training client once through the lazy dataset (its own process);
4. trains a few rounds on it (launch/main.py, its own process; an MLP, since the point is the
   data path, not the CNN).
Prints each phase's peak RSS (the child's own: launch/timing.peak_measured) and time. Run by
hand, not in CI.
"""

import os
import platform
import sqlite3
import subprocess
import sys
import time
import zlib

import msgpack
import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from launch.timing import peak_measured  # noqa: E402
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/fathom_stream', 'Scratch directory.')
_GB = flags.DEFINE_float('gigabytes', 2.2, 'Size of the generated training file.')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Training rounds streamed.')


def _ndarray(a: np.ndarray) -> msgpack.ExtType:
  return msgpack.ExtType(1, msgpack.packb([list(a.shape), a.dtype.name, a.tobytes()]))


def generate(path: str, gigabytes: float, seed: int) -> tuple[int, int]:
  """Writers of 50..400 random 28x28 images until the file holds `gigabytes`."""
  r = np.random.default_rng(seed)
  db = sqlite3.connect(path)
  db.execute('CREATE TABLE federated_data (client_id BLOB NOT NULL PRIMARY KEY, data BLOB NOT '
             'NULL, num_examples INTEGER NOT NULL)')
  written = clients = examples = 0
  while written < gigabytes * 2**30:
    n = int(r.integers(50, 400))
    data = {'pixels': _ndarray(r.random((n, 28, 28), np.float32)),
            'label': _ndarray(r.integers(0, 62, n).astype(np.int32))}
    blob = zlib.compress(msgpack.packb(data), 1)
    db.execute('INSERT INTO federated_data VALUES (?, ?, ?)',
               (f'{clients:016x}:w{clients:06d}'.encode(), blob, n))
    written += len(blob)
    clients += 1
    examples += n
  db.commit()
  db.close()
  return clients, examples


def child(args: list[str]) -> tuple[float, float, str]:
  """(peak RSS in GiB, seconds, last output lines) of one child process (its own peak: the
  rusage of a child carries this process's, which generated the data)."""
  start = time.time()
  log = os.path.join(_WORKDIR.value, 'child.log')
  cmd, peak = peak_measured(args)
  with open(log, 'w') as f:
    status = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
  gib = peak()
  with open(log) as f:
    out = [l for l in f.read().splitlines() if 'WARNING' not in l]
  if status:
    raise SystemExit(f'{args} failed:\n' + '\n'.join(out[-30:]))
  return gib, time.time() - start, '\n'.join(out[-4:])


SWEEP = """
import sys, time, resource
sys.path.insert(0, '.')
from fathom_sim.data.tfds_store import PreparedClientDataset
d = PreparedClientDataset(sys.argv[1], 'train')
total, t = 0, time.time()
for i in range(len(d.client_ids)):
    total += d.client(i)['x'].nbytes
print(f'read {len(d.client_ids)} clients, {total / 2**30:.2f} GiB of float32 pixels in '
      f'{time.time() - t:.0f}s')
"""


def main(argv):
  del argv
  work = _WORKDIR.value
  os.makedirs(work, exist_ok=True)
  src = os.path.join(work, 'fedjax')
  os.makedirs(src, exist_ok=True)
  start = time.time()
  train = os.path.join(src, 'federated_emnist_train.sqlite')
  if not os.path.exists(train):
    c, n = generate(train, _GB.value, 0)
    generate(os.path.join(src, 'federated_emnist_test.sqlite'), 0.02, 1)
    print(f'generated {c} clients, {n} examples: {os.path.getsize(train) / 2**30:.2f} GiB '
          f'in {time.time() - start:.0f}s')
  out = os.path.join(work, 'prepared')
  if not os.path.exists(os.path.join(out, 'meta.json')):
    rss, secs, tail = child(['launch/prepare_data.py', '--format=fedjax_sqlite', '--task=emnist',
                             f'--source={src}', f'--out={out}'])
    print(f'prepare: peak RSS {rss:.2f} GiB, {secs:.0f}s\n{tail}')
  rss, secs, tail = child(['-c', SWEEP, out])
  print(f'read every client: peak RSS {rss:.2f} GiB, {secs:.0f}s\n{tail}')
  run = os.path.join(work, f'run_{int(time.time())}')
  rss, secs, tail = child(['launch/main.py', '--config=configs/femnist.py', f'--workdir={run}',
                           f'--config.data.data_dir={out}', '--config.model.name=mlp',
                           f'--config.num_rounds={_ROUNDS.value}', '--config.eval_every=1000',
                           '--config.eval_clients=5', '--config.cohort_size=10'])
  print(f'train {_ROUNDS.value} rounds: peak RSS {rss:.2f} GiB, {secs:.0f}s\n{tail}')
  import jax
  import tensorflow_datasets as tfds
  print(f'machine: {platform.platform()}, {os.cpu_count()} cores, '
        f'{os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30:.0f} GiB RAM; '
        f'python {platform.python_version()}, jax {jax.__version__}, tfds {tfds.__version__}; '
        f'{time.strftime("%Y-%m-%d")}')


if __name__ == '__main__':
  app.run(main)
