"""Host memory left behind by reading the multi-host stop key (run by hand, not in CI):

  python benchmarks/stop_watch_memory.py --reads=3000

Every process of a multi-host run reads distributed.STOP_KEY from a thread twice a second
for the whole run (distributed._watch_loop). This starts two processes on the distributed
runtime (JAX's coordination service, process 0 its server) and times --reads reads of a key
nobody sets in each, first as blocking gets with a 1 ms timeout (what the watcher did), then as
plain reads (`key_value_try_get`, what it does), and prints each process's resident memory
(VmRSS) growth per read style. A second run of a style in the same process reads the same key
again, so warm-up is counted once, in the first style's figures.
"""

import os
import platform
import socket
import subprocess
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_READS = flags.DEFINE_integer('reads', 3000, 'Reads of the unset key per style and process.')

_PROCESS = '''
import sys, time
import jax
process, address, reads = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
jax.distributed.initialize(address, num_processes=2, process_id=process)
from jax._src import distributed as jax_distributed
client = jax_distributed.global_state.client

def rss_kb():
  with open('/proc/self/status') as f:
    return next(int(line.split()[1]) for line in f if line.startswith('VmRSS'))

styles = {'blocking get, 1 ms timeout': lambda: client.blocking_key_value_get('unset', 1),
          'key_value_try_get': lambda: client.key_value_try_get('unset')}
for name, read in reversed(list(styles.items())) if '--try_first' in sys.argv else styles.items():
  client.wait_at_barrier(f'start {name}', 60_000)
  before, start = rss_kb(), time.time()
  for _ in range(reads):
    try:
      read()
    except Exception:  # NOT_FOUND or DEADLINE_EXCEEDED: nobody set the key
      pass
  print(f'process {process}: {name:28s} {reads} reads in {time.time() - start:5.1f} s, '
        f'VmRSS +{(rss_kb() - before) / 1024:7.1f} MB', flush=True)
client.wait_at_barrier('done', 60_000)
jax.distributed.shutdown()
'''


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def main(argv):
  del argv
  import jax
  print(f'{platform.node()} {platform.processor() or platform.machine()}, '
        f'{os.cpu_count()} CPUs, jax {jax.__version__}, python {platform.python_version()}')
  for order in ([], ['--try_first']):
    address = f'localhost:{_free_port()}'
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    procs = [subprocess.Popen([sys.executable, '-c', _PROCESS, str(i), address,
                               str(_READS.value), *order], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for i in range(2)]
    print(f'-- {"plain reads first" if order else "blocking gets first"}')
    for p in procs:
      out, _ = p.communicate(timeout=600)
      print(out, end='')
      if p.returncode:
        sys.exit(f'a process exited with status {p.returncode}')


if __name__ == '__main__':
  app.run(main)
