"""One lane's local steps of the EMNIST CNN on one device, three ways (run by hand):

  python benchmarks/lane_step.py --steps=40 --repeats=12

- `branch`: lane_train called directly, as cohort.py does for one lane per CPU device: the
  end-of-client work (weighted sum, finiteness check, reset to the server model) is a cond
  that runs once per client.
- `selects`: the same lane_train under a vmap of one lane, as on accelerators: the cond runs
  both sides and selects, a pass over the model at every step (what every step cost before).
- `bare_scan`: plain SGD steps in a scan, no cosine, h_i or aggregation: a floor.

Two clients of steps/2 steps each, B 20 (conv='matmul'), random pixels and labels. Prints the
minimum over interleaved repeats (this machine's speed drifts between runs), and how far the two
lane forms' weighted sums are apart: ~4e-7 up to 10 steps a client; on this random data float
rounding differences then grow fast (benchmarks/conv_vmap.py sees the same between conv forms).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_STEPS = flags.DEFINE_integer('steps', 40, 'Local steps per timed call (two clients).')
_REPEATS = flags.DEFINE_integer('repeats', 12, 'Interleaved timed calls per form.')
_BATCH = flags.DEFINE_integer('batch_size', 20, 'Examples per step.')


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np
  from fathom_sim.client import lane_train
  from fathom_sim.models import EmnistCNN, classifier
  from fathom_sim.types import CohortTable

  b, k = _BATCH.value, _STEPS.value - _STEPS.value % 2
  model = classifier('emnist_cnn', EmnistCNN(conv='matmul'))
  data = np.random.default_rng(0)
  source = {'x': jnp.asarray(data.random((k * b, 28, 28), np.float32)),
            'y': jnp.asarray(data.integers(0, 62, k * b), jnp.int32)}
  params = model.init(jax.random.PRNGKey(0), {'x': source['x'][:1]})
  table = CohortTable(client=jnp.arange(3, dtype=jnp.int32),
                      num_examples=jnp.array([k * b / 2] * 2 + [0], jnp.float32),
                      num_steps=jnp.array([k // 2] * 2 + [0], jnp.int32))
  slots = jnp.arange(2, dtype=jnp.int32)
  stream = jnp.arange(k * b + b, dtype=jnp.int32) % (k * b)
  mask = jnp.ones(b, bool)

  def lane(p, src):
    return lane_train(model.loss, p, jnp.float32(0.05), jnp.int32(b), jax.random.PRNGKey(2),
                      table, jnp.int32(k), slots, stream, src, batch_pad=b)

  def bare_scan(p, src):
    def step(p, i):
      batch = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, i * b, b), src)
      g = jax.grad(model.loss)(p, batch, mask, jax.random.PRNGKey(1))
      return jax.tree.map(lambda w, gw: w - 0.05 * gw, p, g), None
    return jax.lax.scan(step, p, jnp.arange(k))[0]

  one = lambda f: lambda p, src: jax.tree.map(lambda a: a[0], jax.vmap(f)(
      jax.tree.map(lambda a: a[None], p), jax.tree.map(lambda a: a[None], src)))
  forms = {'branch': jax.jit(lane), 'selects': jax.jit(one(lane)), 'bare_scan': jax.jit(bare_scan)}
  out = {name: jax.block_until_ready(f(params, source)) for name, f in forms.items()}
  flat = lambda r: np.concatenate([np.ravel(a) for a in jax.tree.leaves(r.weighted_sum)])
  a, c = flat(out['branch']), flat(out['selects'])
  gap = float(np.linalg.norm(a - c) / np.linalg.norm(c))
  best = dict.fromkeys(forms, float('inf'))
  for _ in range(_REPEATS.value):
    for name, f in forms.items():
      start = time.perf_counter()
      jax.block_until_ready(f(params, source))
      best[name] = min(best[name], time.perf_counter() - start)
  print('jax', jax.__version__, jax.devices()[0].device_kind, f'B {b}, {k} steps')
  for name, seconds in best.items():
    print(f'{name:>9} {seconds / k * 1e3:7.2f} ms/step {k * b / seconds:7.0f} ex/s')
  print(f'branch vs selects: relative difference of the weighted sums {gap:.1e}')


if __name__ == '__main__':
  app.run(main)
