"""Each pass of the CNN's second convolution on its own, vmapped over L lanes (run by hand).

  python benchmarks/conv_passes.py --lanes=50 [--tiles=128x4x4x2,...] [--json=FILE]

Times the forward pass, the input's gradient and the kernel's gradient of a 3x3 convolution of
[B, 26, 26, 32] by [3, 3, 32, 64] in every lane (the EMNIST CNN's second, B 20), each one jitted
program on its own (the median of `repeats` calls after a warm-up): the 'matmul' form's passes
(im2col, as models._mixed_conv takes them, each the transpose of the form's linear map) and the
'pallas' kernels (fathom_sim/conv_kernels.py) at each tile setting ROWSxSPLITSxWARPSxSTAGES
(xloop appended: the taps in a loop, TAP_LOOP).
In each of `dtypes` and, for float32, each of `precisions`.
Also the bytes each pass must move at the least (its inputs and outputs once) and the rate
that gives: on a GPU every pass of this layer is bound by memory traffic.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_LANES = flags.DEFINE_list('lanes', ['50'], 'Lanes side by side.')
_BATCH = flags.DEFINE_integer('batch_size', 20, 'Examples a lane.')
_TILES = flags.DEFINE_list('tiles', ['128x4x4x2', '64x4x4x2', '128x4x8x2', '128x4x4x3',
                                     '128x16x4x2', '64x4x2x2'],
                           'Kernel settings ROWSxSPLITSxWARPSxSTAGES, and xloop for '
                           'TAP_LOOP=True (conv_kernels globals).')
_DTYPES = flags.DEFINE_list('dtypes', ['float32'], 'Dtypes of x, the kernel and dy.')
_PRECISIONS = flags.DEFINE_list('precisions', ['default'], 'jax_default_matmul_precision for '
                                'float32 (default: TF32 on a GPU; highest: float32 products).')
_REPEATS = flags.DEFINE_integer('repeats', 20, 'Timed calls; the median is reported.')
_JSON = flags.DEFINE_string('json', None, 'Also write the rows here.')


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np
  from fathom_sim import conv_kernels as ck
  from fathom_sim.models import _conv_matmul

  def timed(f, *args):
    f = jax.jit(f)
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(_REPEATS.value):
      start = time.perf_counter()
      jax.block_until_ready(f(*args))
      times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3

  print('jax', jax.__version__, jax.devices()[0].device_kind, flush=True)
  rows = []
  settings = [(lanes, dtype, precision) for lanes in map(int, _LANES.value)
              for dtype in _DTYPES.value for precision in _PRECISIONS.value
              if dtype == 'float32' or precision == 'default']
  for lanes, dtype, precision in settings:
    jax.config.update('jax_default_matmul_precision',
                      None if precision == 'default' else precision)
    r = np.random.default_rng(0)
    x = jnp.asarray(r.standard_normal((lanes, _BATCH.value, 26, 26, 32)), dtype)
    k = jnp.asarray(r.standard_normal((lanes, 3, 3, 32, 64)) / 24, dtype)
    dy = jnp.asarray(r.standard_normal((lanes, _BATCH.value, 24, 24, 64)), dtype)
    flops = 2 * lanes * _BATCH.value * 24 * 24 * 64 * 9 * 32  # each pass's multiply-adds, x2
    # Every pass moves x and dy once at the least: reads one and writes the other, or reads both.
    least = x.nbytes + dy.nbytes

    def passes(form):
      if form == 'pallas':
        f = ck.passes(x.shape[1:], k.shape[1:])
        return {'forward': (jax.vmap(f['forward']), x, k),
                'input_grad': (jax.vmap(f['input_grad']), dy, k),
                'kernel_grad': (jax.vmap(f['kernel_grad']), x, dy)}
      # The matmul form's passes as models._mixed_conv takes them: transposes of its map.
      def input_grad(dy, k):
        return jax.linear_transpose(lambda x: _conv_matmul(x, k), x[0])(dy)[0]

      def kernel_grad(x, dy):
        return jax.linear_transpose(lambda k: _conv_matmul(x, k), k[0])(dy)[0]
      return {'forward': (jax.vmap(_conv_matmul), x, k),
              'input_grad': (jax.vmap(input_grad), dy, k),
              'kernel_grad': (jax.vmap(kernel_grad), x, dy)}

    forms = [('matmul', None)] + [('pallas', t) for t in _TILES.value]
    for form, tile in forms:
      if tile:
        fields = tile.split('x')
        ck.ROWS, ck.SPLITS, ck.WARPS, ck.STAGES = map(int, fields[:4])
        ck.TAP_LOOP = fields[4:] == ['loop']
      line = {}
      for name, (f, *args) in passes(form).items():
        try:
          line[name] = timed(f, *args)
        except Exception as e:  # noqa: BLE001  (a setting Triton refuses: say so, go on)
          print(f'{form} {tile} {name}: {type(e).__name__}: {str(e)[:200]}', flush=True)
          line[name] = float('nan')
      rows.append({'lanes': lanes, 'dtype': dtype, 'precision': precision, 'form': form,
                   'tile': tile, 'ms': line, 'least_bytes': least})
      print(f'{lanes:>4} {dtype:>8} {precision:>7} {form:>7} {tile or "":>12} ' + ' '.join(
          f'{n} {ms:6.3f} ms ({least / ms / 1e9:5.2f} TB/s, {flops / ms / 1e9:5.1f} TFLOP/s)'
          for n, ms in line.items()), flush=True)
      if _JSON.value:
        with open(_JSON.value, 'w') as f:
          json.dump(rows, f, indent=1)


if __name__ == '__main__':
  app.run(main)
