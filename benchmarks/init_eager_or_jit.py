"""Why run.init_state draws the initial model op by op rather than jitted (run by hand, not in
CI):

  python benchmarks/init_eager_or_jit.py

Times `model.init` of the quickstart's MLP both ways, each in a fresh process sharing one
compilation cache (JAX's, as a command uses it: programs of 0.2 s or more kept) that starts
empty, so the second process of each way shows what every later command pays; then says, for
each model and init of the package and three seeds, whether the jitted draw equals the eager
one bit for bit. A jitted init would change a run's initial parameters where it does not.
"""

import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_TIME = '''
import sys, time
import jax, numpy as np
jax.config.update('jax_compilation_cache_dir', sys.argv[1])
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)
from fathom_sim import rng
from fathom_sim.models import get_model
model = get_model('mlp', num_classes=10, hidden=(64,))
batch = {'x': np.zeros((1, 60), np.float32), 'y': np.zeros(1, np.int32)}
init = model.init if sys.argv[2] == 'eager' else jax.jit(model.init)
start = time.perf_counter()
jax.block_until_ready(init(rng.init_key(0), batch))
print(f'{time.perf_counter() - start:.2f}')
'''


def _equal_bits() -> list[str]:
  import jax
  import numpy as np
  from fathom_sim import rng
  from fathom_sim.models import get_model
  sample = {'mlp': (np.zeros((1, 60), np.float32), np.zeros(1, np.int32)),
            'emnist_cnn': (np.zeros((1, 28, 28), np.float32), np.zeros(1, np.int32)),
            'lstm': (np.zeros((1, 20), np.int32), np.zeros((1, 20), np.int32))}
  kwargs = {'mlp': {'num_classes': 10, 'hidden': (64,)}, 'emnist_cnn': {'num_classes': 62},
            'lstm': {'num_classes': 10004, 'hidden': (96, 670, 96)}}
  lines = []
  for name in ('mlp', 'emnist_cnn', 'lstm'):
    for init in ('flax', 'fedjax'):
      model = get_model(name, init=init, **kwargs[name])
      x, y = sample[name]
      same = []
      for seed in (0, 1, 12345):
        eager = model.init(rng.init_key(seed), {'x': x, 'y': y})
        jitted = jax.jit(model.init)(rng.init_key(seed), {'x': x, 'y': y})
        same.append(all(np.array_equal(a, b) for a, b in
                        zip(jax.tree.leaves(eager), jax.tree.leaves(jitted))))
      lines.append(f'{name:10} init={init:6}: jitted equals eager bit for bit in '
                   f'{sum(same)} of {len(same)} seeds')
  return lines


def main() -> None:
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT,
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  for way in ('eager', 'jit'):
    with tempfile.TemporaryDirectory(prefix='fathom_init_') as cache:
      seconds = [subprocess.run([sys.executable, '-c', _TIME, cache, way], env=env, cwd=ROOT,
                                check=True, capture_output=True, text=True).stdout.strip()
                 for _ in range(2)]
    print(f'MLP model.init {way:5}: {seconds[0]} s with an empty cache, {seconds[1]} s after')
  os.environ.update(JAX_PLATFORMS='cpu')
  sys.path.insert(0, ROOT)
  print('\n'.join(_equal_bits()))


if __name__ == '__main__':
  main()
