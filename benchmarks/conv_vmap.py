"""The EMNIST CNN's local step vmapped over L clients, with each convolution form (run by hand).

  python benchmarks/conv_vmap.py --lanes=10,50,200 --batch_size=20 --steps=10 \
      [--dtypes=float32,bfloat16]

Each client (lane) holds its own parameters, as in a cohort's local training. Times `steps`
SGD steps of every lane inside one jitted scan, after a warm-up call, for EmnistCNN(conv='xla')
(nn.Conv, which vmap turns into a grouped convolution) and conv='matmul' (Conv3x3, a batched
matrix product), in each compute dtype (config.model.compute_dtype; the parameters stay
float32), and prints how far each one's final parameters are from the first form's.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_LANES = flags.DEFINE_list('lanes', ['10', '50', '200'], 'Clients computed side by side.')
_BATCH = flags.DEFINE_integer('batch_size', 20, 'Examples per client per step.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Local steps per timed call.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls; the median is reported.')
_DTYPES = flags.DEFINE_list('dtypes', ['float32'], 'Compute dtypes (float32, bfloat16).')


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np
  from fathom_sim.models import COMPUTE_DTYPES, CONV_IMPLS, EmnistCNN, classifier

  print('jax', jax.__version__, jax.devices()[0].device_kind, flush=True)
  print(f'{"lanes":>5} {"conv":>6} {"dtype":>8} {"ms/step":>8} {"examples/s":>11} '
        f'{"rel. diff":>9}')
  b, k = _BATCH.value, _STEPS.value
  for lanes in map(int, _LANES.value):
    data = np.random.default_rng(0)
    batch = {'x': jnp.asarray(data.random((k, lanes, b, 28, 28), np.float32)),
             'y': jnp.asarray(data.integers(0, 62, (k, lanes, b)), jnp.int32)}
    mask = jnp.ones(b, bool)
    finals = {}
    for impl, dtype in ((i, d) for d in _DTYPES.value for i in CONV_IMPLS):
      model = classifier('emnist_cnn', EmnistCNN(conv=impl, dtype=COMPUTE_DTYPES[dtype]))
      init = model.init(jax.random.PRNGKey(0), {'x': batch['x'][0, 0]})
      params = jax.tree.map(lambda p: jnp.broadcast_to(p, (lanes,) + p.shape), init)
      grad = jax.vmap(jax.grad(model.loss), in_axes=(0, 0, None, None))

      @jax.jit
      def local_steps(params, batch):
        def step(p, xs):
          g = grad(p, xs, mask, jax.random.PRNGKey(1))
          return jax.tree.map(lambda w, gw: w - 0.05 * gw, p, g), None
        return jax.lax.scan(step, params, batch)[0]

      jax.block_until_ready(local_steps(params, batch))
      times = []
      for _ in range(_REPEATS.value):
        start = time.perf_counter()
        out = jax.block_until_ready(local_steps(params, batch))
        times.append(time.perf_counter() - start)
      finals[impl, dtype] = out
      ms = float(np.median(times)) / k * 1e3
      diff = ''
      first = next(iter(finals))
      if (impl, dtype) != first:
        ref, new = (np.concatenate([np.ravel(a) for a in jax.tree.leaves(finals[f])])
                    for f in (first, (impl, dtype)))
        diff = f'{np.linalg.norm(new - ref) / np.linalg.norm(ref):.1e}'
      print(f'{lanes:>5} {impl:>6} {dtype:>8} {ms:>8.2f} {lanes * b / ms * 1e3:>11.0f} '
            f'{diff:>9}', flush=True)


if __name__ == '__main__':
  app.run(main)
