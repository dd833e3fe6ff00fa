r"""The EMNIST CNN's local step vmapped over L clients, with each convolution form (run by hand).

  python benchmarks/conv_vmap.py --lanes=10,50,200 --batch_size=20 --steps=10 \
      [--dtypes=float32,bfloat16] [--convs=all] [--json=FILE]

Each client (lane) holds its own parameters, as in a cohort's local training. Times `steps`
SGD steps of every lane inside one jitted scan, after a warm-up call, for each of `convs`
(config.model.conv: 'xla' is XLA's convolution, which vmap turns into a grouped convolution;
'matmul' a batched matrix product over the 9 shifted views; 'F/X/W' takes the forward pass,
the input's and the kernel's gradients from those two; 'pallas' the second convolution as
Triton kernels, once at each --pallas_rows tile height; 'all' is every form), in each compute
dtype (config.model.compute_dtype; the parameters stay float32). It prints how far each one's
final parameters are from the first form's, and XLA's own estimate of one step's memory
traffic and arithmetic (the cost analysis of the compiled one-step program, after fusion on
that platform): on a GPU the step is bound by memory traffic (docs/benchmarks.md).
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from benchmarks.xla_cost import xla_cost  # noqa: E402

_LANES = flags.DEFINE_list('lanes', ['10', '50', '200'], 'Clients computed side by side.')
_BATCH = flags.DEFINE_integer('batch_size', 20, 'Examples per client per step.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Local steps per timed call.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls; the median is reported.')
_DTYPES = flags.DEFINE_list('dtypes', ['float32'], 'Compute dtypes (float32, bfloat16).')
_CONVS = flags.DEFINE_list('convs', ['xla', 'matmul'],
                           'Convolution forms (models.CONV_FORMS), or all of them: all.')
_PALLAS_ROWS = flags.DEFINE_list('pallas_rows', [], 'The pallas form once at each of these '
                                  'tile heights (conv_kernels.ROWS, powers of 2; default its '
                                  'own).')
_JSON = flags.DEFINE_string('json', None, 'Also write the rows here (a list of objects), '
                            'rewritten after each row.')


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np
  from benchmarks.lane_forms import conv_forms
  from fathom_sim import conv_kernels
  from fathom_sim.models import COMPUTE_DTYPES, EmnistCNN, classifier

  convs = [(c, None) for c in conv_forms(_CONVS.value) if c != 'pallas']
  if 'pallas' in conv_forms(_CONVS.value):
    convs += [('pallas', int(r)) for r in _PALLAS_ROWS.value or [conv_kernels.ROWS]]

  print('jax', jax.__version__, jax.devices()[0].device_kind, flush=True)
  print(f'{"lanes":>5} {"conv":>20} {"dtype":>8} {"ms/step":>8} {"examples/s":>11} '
        f'{"rel. diff":>9} {"XLA MB/step":>11} {"GFLOP/step":>10}')
  b, k = _BATCH.value, _STEPS.value
  rows = []
  for lanes in map(int, _LANES.value):
    data = np.random.default_rng(0)
    batch = {'x': jnp.asarray(data.random((k, lanes, b, 28, 28), np.float32)),
             'y': jnp.asarray(data.integers(0, 62, (k, lanes, b)), jnp.int32)}
    mask = jnp.ones(b, bool)
    finals = {}
    for (impl, tile), dtype in ((i, d) for d in _DTYPES.value for i in convs):
      if tile:
        conv_kernels.ROWS = tile
      model = classifier('emnist_cnn', EmnistCNN(conv=impl, dtype=COMPUTE_DTYPES[dtype]))
      init = model.init(jax.random.PRNGKey(0), {'x': batch['x'][0, 0]})
      params = jax.tree.map(lambda p: jnp.broadcast_to(p, (lanes,) + p.shape), init)
      grad = jax.vmap(jax.grad(model.loss), in_axes=(0, 0, None, None))

      def step(p, xs):
        g = grad(p, xs, mask, jax.random.PRNGKey(1))
        return jax.tree.map(lambda w, gw: w - 0.05 * gw, p, g)

      @jax.jit
      def local_steps(params, batch):
        return jax.lax.scan(lambda p, xs: (step(p, xs), None), params, batch)[0]

      # Of one step on its own: a loop's cost analysis may count its body once or k times.
      moved, flops = xla_cost(jax.jit(step), params, jax.tree.map(lambda a: a[0], batch))

      jax.block_until_ready(local_steps(params, batch))
      times = []
      for _ in range(_REPEATS.value):
        start = time.perf_counter()
        out = jax.block_until_ready(local_steps(params, batch))
        times.append(time.perf_counter() - start)
      finals[impl, tile, dtype] = out
      ms = float(np.median(times)) / k * 1e3
      rel = None
      first = next(iter(finals))
      if (impl, tile, dtype) != first:
        ref, new = (np.concatenate([np.ravel(a) for a in jax.tree.leaves(finals[f])])
                    for f in (first, (impl, tile, dtype)))
        rel = float(np.linalg.norm(new - ref) / np.linalg.norm(ref))
      row = {'lanes': lanes, 'conv': impl, 'pallas_rows': tile, 'dtype': dtype,
             'ms_per_step': ms,
             'examples_per_s': lanes * b / ms * 1e3, 'rel_diff': rel,
             # null where the platform gives no estimate (JSON has no NaN)
             'xla_bytes_per_step': moved if moved == moved else None,
             'xla_flops_per_step': flops if flops == flops else None}
      rows.append(row)
      if _JSON.value:
        with open(_JSON.value, 'w') as f:
          json.dump(rows, f, indent=1)
      diff = '' if rel is None else f'{rel:.1e}'
      label = f'{impl}@{tile}' if tile else impl
      print(f'{lanes:>5} {label:>20} {dtype:>8} {ms:>8.2f} {row["examples_per_s"]:>11.0f} '
            f'{diff:>9} {moved / 1e6:>11.0f} {flops / 1e9:>10.1f}', flush=True)


if __name__ == '__main__':
  app.run(main)
