"""Local steps of the EMNIST CNN on one device, L lanes side by side, three ways (run by hand):

  python benchmarks/lane_step.py --steps=40 --repeats=12            # one lane (CPU's layout)
  python benchmarks/lane_step.py --lanes=10,50 --trace_dir=/tmp/t   # an accelerator's layouts

- `branch` (one lane only): lane_train called directly, as cohort.py does for one lane per CPU
  device: the end-of-client work (weighted sum, finiteness check, reset to the server model) is
  a cond that runs once per client.
- `selects`: lane_train under a vmap of L lanes, as on accelerators: the cond runs both sides
  and selects, a pass over every lane's model at every step.
- `chunkN`: `selects` (`branch` at one lane) with the loop's bound checked every N steps
  (config.loop_chunk): an inner loop of N steps has a known trip count, so XLA:GPU runs it
  without reading a predicate back; with N not dividing the steps, its padding steps count.
- `bare_scan`: plain SGD steps of L lanes in a scan (one lane unbatched), no cosine, h_i or
  aggregation: a floor.
  What `selects` costs above it is the round's own work per step (gathers, cosines, selects).

Each lane runs `clients_per_lane` clients of equal length, B 20 (--conv, default 'matmul'), on
random pixels and labels. Prints the minimum over interleaved repeats (a machine's speed drifts
between runs), and at one lane how far the two lane forms' weighted sums are apart: ~4e-7 up to
10 steps a client; on this random data float rounding differences then grow fast
(benchmarks/conv_vmap.py sees the same between conv forms). With --trace_dir, each form at each
L is run again under jax.profiler for a Perfetto trace, its optimized HLO beside it
(program.hlo.txt); benchmarks/trace_ops.py sums its device time by operation and by HLO
instruction, with each kernel's bytes and arithmetic. Last, XLA's own estimate of the memory
traffic and arithmetic of one
step of `selects` and of `bare_scan` (the cost analysis of each compiled on its own): on a GPU
the step is bound by memory traffic, and their difference is the round's own passes over the
lanes' models.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from benchmarks.lane_forms import forms_for  # noqa: E402
from benchmarks.xla_cost import xla_cost  # noqa: E402

_LANES = flags.DEFINE_list('lanes', ['1'], 'Lanes side by side on the device.')
_STEPS = flags.DEFINE_integer('steps', 40, 'Local steps per lane per timed call.')
_CLIENTS = flags.DEFINE_integer('clients_per_lane', 2, 'Clients each lane runs in turn.')
_REPEATS = flags.DEFINE_integer('repeats', 12, 'Interleaved timed calls per form.')
_BATCH = flags.DEFINE_integer('batch_size', 20, 'Examples per step.')
_CHUNKS = flags.DEFINE_list('chunks', ['4', '16'], 'Loop chunks to time besides 1 (chunkN forms).')
_DTYPE = flags.DEFINE_enum('compute_dtype', 'float32', ['float32', 'bfloat16'],
                           'The CNN\'s activations and matrix products '
                           '(config.model.compute_dtype).')
_CONV = flags.DEFINE_string('conv', 'matmul', 'The CNN\'s convolution form (config.model.conv, '
                            'models.CONV_FORMS).')
_TRACE = flags.DEFINE_string('trace_dir', None, 'Also write a profiler trace of each form here '
                             '(<dir>/<form>_L<lanes>/plugins/profile/*/perfetto_trace.json.gz).')


def main(argv):
  del argv
  import jax
  import numpy as np

  b = _BATCH.value
  print('jax', jax.__version__, jax.devices()[0].device_kind, f'B {b}', _DTYPE.value,
        f'conv {_CONV.value}', flush=True)
  print(f'{"lanes":>5} {"form":>9} {"ms/step":>8} {"examples/s":>10}')
  for lanes in map(int, _LANES.value):
    chunks = tuple(c for c in map(int, _CHUNKS.value) if c > 1)
    forms, args, k, one_step = forms_for(lanes, _STEPS.value, _CLIENTS.value, b, chunks,
                                         _DTYPE.value, _CONV.value)
    out = {name: jax.block_until_ready(f(*args)) for name, f in forms.items()}
    best = dict.fromkeys(forms, float('inf'))
    for _ in range(_REPEATS.value):
      for name, f in forms.items():
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        best[name] = min(best[name], time.perf_counter() - start)
    for name, seconds in best.items():
      print(f'{lanes:>5} {name:>9} {seconds / k * 1e3:8.2f} {lanes * k * b / seconds:10.0f}',
            flush=True)
    for name, f in one_step.items():
      moved, flops = xla_cost(f, *args[:2])
      print(f'{lanes:>5} {name:>9} one step, XLA\'s estimate: {moved / 1e6:.0f} MB, '
            f'{flops / 1e9:.1f} GFLOP', flush=True)
    if 'branch' in out:
      flat = lambda r: np.concatenate([np.ravel(a) for a in jax.tree.leaves(r.weighted_sum)])
      a, c = flat(out['branch']), flat(out['selects'])
      print(f'branch vs selects: relative difference of the weighted sums '
            f'{float(np.linalg.norm(a - c) / np.linalg.norm(c)):.1e}')
    if _TRACE.value:
      for name, f in forms.items():
        try:
          where = os.path.join(_TRACE.value, f'{name}_L{lanes}')
          os.makedirs(where, exist_ok=True)
          # The program the trace runs (the same executable: jit's cache), for trace_ops.py's
          # bytes and arithmetic of each kernel beside its time.
          with open(os.path.join(where, 'program.hlo.txt'), 'w') as hlo:
            hlo.write(f.lower(*args).compile().as_text())
          with jax.profiler.trace(where, create_perfetto_trace=True):
            for _ in range(3):
              jax.block_until_ready(f(*args))
        except Exception as e:  # noqa: BLE001  (e.g. no CUPTI): the timings above still stand
          print(f'trace of {name} at {lanes} lanes failed: {type(e).__name__}: {e}', flush=True)


if __name__ == '__main__':
  app.run(main)
