"""Each pass of the CNN's second convolution on its own, vmapped over L lanes (run by hand).

  python benchmarks/conv_passes.py --lanes=50 [--forms=matmul,pallas,gemm] [--tiles=128x4x4x2,...]
      [--trace] [--json=FILE]

Times the forward pass, the input's gradient and the kernel's gradient of a 3x3 convolution of
[B, 26, 26, 32] by [3, 3, 32, 64] in every lane (the EMNIST CNN's second, B 20), each one jitted
program on its own (the median of `repeats` calls after a warm-up): the 'matmul' form's passes
(im2col, as models._mixed_conv takes them, each the transpose of the form's linear map) and the
'pallas' kernels (fathom_sim/conv_kernels.py) at each tile setting ROWSxSPLITSxWARPSxSTAGES
(xloop appended: the taps in a loop, TAP_LOOP; xspanN: N row tiles a program, SPAN), and 'gemm':
each pass's matrix product alone, on operands already in memory (the patches [B*24*24, 288],
the kernel [288, 64], dy [B*24*24, 64]), with no im2col copy or col2im sum around it. That is
what the GPU's matrix units give at this layer's shapes, the ceiling of any im2col form (its
passes are these products plus a copy); with XLA_FLAGS=--xla_gpu_enable_triton_gemm=false the
same products run as cuBLAS's instead of Triton's (`gpu.sh gemm` runs both).
In each of `dtypes` and, for float32, each of `precisions`.
Also the bytes each pass must move at the least (its inputs and outputs once) and the rates
that gives, of bytes and of arithmetic (on an H200 every pass of this layer ran far from both
limits: docs/benchmarks.md, "Eleventh session").

A call's wall time also holds its dispatch and the XLA fusions around the kernels (the
padding of x and dy, the slice of the output; im2col's copy). With --trace each pass is run
`repeats` times more under jax.profiler, and the device's own time per call is split by
kernel (benchmarks/trace_ops.py's self times): what the Pallas kernel itself takes, against
what surrounds it.
"""

import glob
import gzip
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_LANES = flags.DEFINE_list('lanes', ['50'], 'Lanes side by side.')
_BATCH = flags.DEFINE_integer('batch_size', 20, 'Examples a lane.')
_FORMS = flags.DEFINE_list('forms', ['matmul', 'pallas'], 'Forms timed (above): matmul, gemm, '
                           'pallas.')
_TILES = flags.DEFINE_list('tiles', ['128x4x4x2', '64x4x4x2', '128x4x8x2', '128x4x4x3',
                                     '128x16x4x2', '64x4x2x2'],
                           'Kernel settings ROWSxSPLITSxWARPSxSTAGES, then xloop for '
                           'TAP_LOOP=True or xspanN for SPAN=N (conv_kernels.parse_tile).')
_DTYPES = flags.DEFINE_list('dtypes', ['float32'], 'Dtypes of x, the kernel and dy.')
_PRECISIONS = flags.DEFINE_list('precisions', ['default'], 'jax_default_matmul_precision for '
                                'float32 (default: TF32 on a GPU; highest: float32 products).')
_REPEATS = flags.DEFINE_integer('repeats', 20, 'Timed calls; the median is reported.')
_JSON = flags.DEFINE_string('json', None, 'Also write the rows here.')
_TRACE = flags.DEFINE_bool('trace', False, 'Also trace each pass and split its device time '
                           'by kernel (above).')
_KERNELS_LISTED = 4  # a pass's kernels printed with --trace, by device time


FORMS = ('matmul', 'gemm', 'pallas')


def device_split(f, args, calls: int) -> dict[str, float]:
  """ms a call of the device's own time, by kernel (operation), over `calls` traced calls of
  the already compiled f."""
  import jax
  from benchmarks.trace_ops import device_threads, self_times
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(calls):
        jax.block_until_ready(f(*args))
    found, = glob.glob(os.path.join(tmp, '**', 'perfetto_trace.json.gz'), recursive=True)
    with gzip.open(found, 'rt') as fh:
      trace = json.load(fh)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  times = self_times(events, device_threads(events))
  return {name: t / calls / 1e3 for name, (t, _) in
          sorted(times.items(), key=lambda kv: -kv[1][0])}


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np
  from fathom_sim import conv_kernels as ck
  from fathom_sim.models import _conv_matmul

  from benchmarks.lane_forms import tiles
  tiles(_TILES.value)
  unknown = sorted(set(_FORMS.value) - set(FORMS))
  if unknown:
    raise app.UsageError(f'--forms: {unknown} unknown; accepted: {", ".join(FORMS)}')

  def timed(f, *args):
    """(median ms a call, and with --trace its device time by kernel, None if not traced)."""
    f = jax.jit(f)
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(_REPEATS.value):
      start = time.perf_counter()
      jax.block_until_ready(f(*args))
      times.append(time.perf_counter() - start)
    split = None
    if _TRACE.value:
      try:
        split = device_split(f, args, _REPEATS.value)
      except Exception as e:  # noqa: BLE001  (the timing stands without its split)
        print(f'trace: {type(e).__name__}: {str(e)[:200]}', flush=True)
    return float(np.median(times)) * 1e3, split

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
    # Every pass moves x and dy once at the least: reads one and writes the other, or reads
    # both (a gemm pass: its three matrices, gemm_passes).

    def passes(form):
      if form == 'gemm':
        from benchmarks.lane_forms import gemm_passes
        return gemm_passes(x, k, dy)
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

    forms = [(f, None) for f in ('matmul', 'gemm') if f in _FORMS.value] + [
        ('pallas', t) for t in _TILES.value if 'pallas' in _FORMS.value]
    for form, tile in forms:
      if tile:
        ck.set_tile(tile)
      line, splits = {}, {}
      todo = passes(form)
      least = x.nbytes + dy.nbytes
      if form == 'gemm':  # the patches, the kernel and dy as matrices
        m = _BATCH.value * 24 * 24
        least = lanes * x.dtype.itemsize * (m * 9 * 32 + 9 * 32 * 64 + m * 64)
      for name, (f, *args) in todo.items():
        try:
          line[name], split = timed(f, *args)
        except Exception as e:  # noqa: BLE001  (a setting Triton refuses: say so, go on)
          print(f'{form} {tile} {name}: {type(e).__name__}: {str(e)[:200]}', flush=True)
          line[name], split = float('nan'), None
        if split is not None:
          splits[name] = split
      rows.append({'lanes': lanes, 'dtype': dtype, 'precision': precision, 'form': form,
                   'tile': tile, 'ms': line, 'least_bytes': least,
                   **({'device_ms_by_kernel': splits} if _TRACE.value else {})})
      print(f'{lanes:>4} {dtype:>8} {precision:>7} {form:>7} {tile or "":>15} ' + ' '.join(
          f'{n} {ms:6.3f} ms ({least / ms / 1e9:5.2f} TB/s, {flops / ms / 1e9:5.1f} TFLOP/s)'
          for n, ms in line.items()), flush=True)
      for name, split in splits.items():
        print(f'{"":>31} {name}: device {sum(split.values()):.3f} ms = ' + ', '.join(
            f'{op[:48]} {ms:.3f}' for op, ms in list(split.items())[:_KERNELS_LISTED]),
            flush=True)
      if _JSON.value:
        with open(_JSON.value, 'w') as f:
          json.dump(rows, f, indent=1)


if __name__ == '__main__':
  app.run(main)
