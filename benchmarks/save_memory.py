"""Host memory a checkpoint save leaves behind, with and without checkpoint.py's answer to
TensorStore's leaking to_json (run by hand, not in CI):

  python benchmarks/save_memory.py --saves=1500 --pairs=2

Each side runs in a process of its own: it builds the quickstart's state (its MLP, one
device, as launch/main.py would) and saves it --saves times through checkpoint.Checkpointer
(keeping 2, each save waited for), sampling its resident memory (VmRSS) 100 times; with
--trace, its Python allocations too (tracemalloc, which sees the strings TensorStore keeps but
gc does not; it slows each save 2-3 times, and the RSS then grows faster on both
sides). The slopes over the saves past the first quarter are the bytes each save leaves.
'tensorstore' is the side whose orbax resolves folder specs through TensorStore's own to_json,
as before e36a745; the two sides alternate, --pairs times, so that drift hits both alike.
"""

import json
import os
import platform
import subprocess
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SAVES = flags.DEFINE_integer('saves', 1500, 'Saves per side.')
_PAIRS = flags.DEFINE_integer('pairs', 2, 'Runs of each side, alternating.')
_TRACE = flags.DEFINE_bool('trace', False, 'Also fit the Python allocations (tracemalloc).')
_FOLDER = flags.DEFINE_string('folder', '/tmp/fathom_save_memory', 'Scratch folder (emptied).')

_SIDE = r'''
import gc, json, os, shutil, sys, time, tracemalloc
import numpy as np
sys.path.insert(0, sys.argv[1])
from fathom_sim import checkpoint, run as run_lib
from fathom_sim.config import call_user_file
saves, folder, side, trace = int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5] == '1'
if side == 'tensorstore':
  checkpoint._resolve_file_specs_in_python = lambda: None
shutil.rmtree(folder, ignore_errors=True)
config = call_user_file(os.path.join(sys.argv[1], 'configs', 'quickstart.py'), 'get_config',
                        'config')
config.num_devices = 1
state = run_lib.init_state(run_lib.build(config))


def rss() -> int:
  with open('/proc/self/status') as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmRSS:'))


saver = checkpoint.Checkpointer(folder, 2)
if trace:
  tracemalloc.start()
every, samples, start = max(saves // 100, 1), [], time.perf_counter()
for t in range(saves):
  saver.save(state._replace(round=state.round + t), {'round': t, 'wall_s': 0.0}, wait=True)
  if t % every == 0 or t == saves - 1:
    gc.collect()
    samples.append((t, rss(), tracemalloc.get_traced_memory()[0]))
seconds = time.perf_counter() - start
saver.close()
shutil.rmtree(folder, ignore_errors=True)
x, r, p = map(np.asarray, zip(*samples))
late = x >= saves // 4
slope = lambda y: round(float(np.polyfit(x[late], y[late], 1)[0]))
print(json.dumps({'side': side, 'saves': saves, 'rss_bytes_per_save': slope(r),
                  **({'python_bytes_per_save': slope(p)} if trace else {}),
                  'rss_mib_end': round(r[-1] / 2**20, 1),
                  'ms_per_save': round(1e3 * seconds / saves, 1)}))
'''


def main(argv):
  del argv
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  from importlib import metadata
  with open('/proc/cpuinfo') as f:
    cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')),
               platform.machine())
  print(json.dumps({'machine': f'{cpu}, {os.cpu_count()} cores',
                    'python': platform.python_version(),
                    **{p: metadata.version(p) for p in ('orbax-checkpoint', 'tensorstore')}}))
  for _ in range(_PAIRS.value):
    for side in ('python', 'tensorstore'):
      p = subprocess.run([sys.executable, '-c', _SIDE, ROOT, str(_SAVES.value),
                          os.path.join(_FOLDER.value, side), side, str(int(_TRACE.value))],
                         env=env, capture_output=True, text=True)
      if p.returncode != 0:
        raise SystemExit(f'{side}: exit {p.returncode}\n{p.stderr[-3000:]}')
      print(p.stdout.strip().splitlines()[-1], flush=True)


if __name__ == '__main__':
  app.run(main)
