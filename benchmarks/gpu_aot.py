"""The CNN's round compiled for an H100 on a machine without one: what each local step moves.

  python benchmarks/gpu_aot.py --cohort_sizes=10,200 [--convs=matmul] [--dtypes=float32]
      [--top=12] [--hlo_dir=DIR]
  python benchmarks/gpu_aot.py --program=sgd --lanes=10,50,200   # bare vmapped SGD steps
  python benchmarks/gpu_aot.py --program=sgd --task=lstm --lanes=4,27 [--by_op=12]  # the LSTM

Needs the CUDA plugin of the pinned jax (`pip install "jax[cuda12]==0.10.2"`, ~6 GB), not a
GPU: XLA compiles for the device that benchmarks/h100.py describes (deviceless, ahead of time).
It does not autotune there, so its tile sizes are defaults, while its fusions, and so the bytes
each kernel moves, are those a GPU run gets (up to the GPU image's newer XLA).

`round` (the default) builds round 1's program itself, as launch/benchmark.py's cohort sweep
runs it on one H100 (benchmarks/lane_forms.round_hlo: round.make_round; FedAvg, eta 0.1, E 1,
B 20 computed as 20 rows; the FEMNIST-shaped training set on the device; 50 lanes at most),
and reads its local-step loop: the loop body is one local step of every lane. `sgd` compiles
benchmarks/lane_step.py's bare_scan (plain SGD of L lanes, what benchmarks/conv_vmap.py
times) and reads its loop body the same way.

Per program it prints the kernels of one local step, the bytes they move
(benchmarks/hlo_traffic.py) and their arithmetic, and two floors of that step on an H100 SXM:
the bytes at 3.35 TB/s, and 2 us a kernel launch; for a round, also its steps (the longest
lane) and the whole round's bytes floor. Then the `top` kernels by bytes, with the JAX
operation each came from. It is an account of the compiled program, not a timing: the device
calls (benchmarks/gpu.sh) time it, and docs/benchmarks.md sets the two side by side.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The plugin must not look for a GPU (there is none); XLA is told the device's description.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', '1')

from absl import app, flags  # noqa: E402

from benchmarks.h100 import h100_mesh  # noqa: E402
from benchmarks.hlo_traffic import Kernel, kernels, loop_bodies, run_kernels  # noqa: E402

BANDWIDTH = 3.35e12  # bytes/s, H100 SXM HBM3
LAUNCH_S = 2e-6      # a kernel launch's floor, about

_PROGRAM = flags.DEFINE_enum('program', 'round', ['round', 'sgd'], 'What to compile (above).')
_COHORTS = flags.DEFINE_list('cohort_sizes', ['10', '200'], 'round: clients per round.')
_LANES = flags.DEFINE_list('lanes', ['10', '50', '200'], 'sgd: lanes side by side.')
_TASK = flags.DEFINE_enum('task', 'cnn', ['cnn', 'lstm'], 'sgd: the EMNIST CNN (B 20) or the '
                          'Stack Overflow LSTM (B 16, 20 tokens; --convs does not apply).')
_CONVS = flags.DEFINE_list('convs', ['matmul'],
                           'Convolution forms (models.CONV_FORMS), or all of them: all.')
_DTYPES = flags.DEFINE_list('dtypes', ['float32'], 'Compute dtypes (float32, bfloat16).')
_NUM_CLIENTS = flags.DEFINE_integer('num_clients', 1000, 'round: FEMNIST-shaped clients made '
                                    '(as launch/benchmark.py makes them).')
_LANE_UPDATE = flags.DEFINE_enum('lane_update', 'xla', ['xla', 'pallas'], 'round: the lane\'s '
                                  'passes over its model as XLA\'s fusions or as '
                                  'fathom_sim/lane_update.py\'s kernels (its PALLAS).')
_TOP = flags.DEFINE_integer('top', 12, 'Kernels listed per program, by bytes (0: none).')
_BY_OP = flags.DEFINE_integer('by_op', 0, 'Also the step\'s kernels summed by kind and JAX '
                              'operation: the N largest groups by bytes (0: none).')
_HLO_DIR = flags.DEFINE_string('hlo_dir', None, 'Also write each optimized HLO text here.')


def sgd_hlo(lanes: int, conv: str, dtype: str, mesh) -> str:
  """Optimized HLO of bare_scan on `mesh`'s device: 8 SGD steps of B 20 in each of `lanes`."""
  import jax
  from benchmarks.lane_forms import abstract, forms_for
  with jax.default_device(jax.devices('cpu')[0]):
    forms, args, _, _ = forms_for(lanes, 8, 2, 20, (), dtype, conv)
  return forms['bare_scan'].lower(*abstract(args, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()))).compile().as_text()


def lstm_sgd_hlo(lanes: int, dtype: str, mesh) -> str:
  """Optimized HLO of 8 plain SGD steps of B 16 sentences in each of `lanes`, the Stack
  Overflow LSTM (its 10,004 ids), in a scan vmapped over the lanes as bare_scan's are."""
  import jax
  import jax.numpy as jnp
  from benchmarks.lane_forms import abstract
  from fathom_sim.models import get_model
  steps, b, length, ids = 8, 16, 20, 10004
  model = get_model('stackoverflow_lstm', num_classes=ids, compute_dtype=dtype)
  tokens = jax.ShapeDtypeStruct((lanes, steps * b, length), jnp.int32)
  with jax.default_device(jax.devices('cpu')[0]):
    init = jax.eval_shape(model.init, jax.random.key(0),
                          {'x': jnp.zeros((1, length), jnp.int32)})
  params = jax.tree.map(lambda p: jax.ShapeDtypeStruct((lanes,) + p.shape, p.dtype), init)
  mask = jnp.ones(b, bool)

  def lane(p, src):
    def step(p, i):
      batch = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, i * b, b), src)
      g = jax.grad(model.loss)(p, batch, mask, None)
      return jax.tree.map(lambda w, gw: w - 0.3 * gw, p, g), None
    return jax.lax.scan(step, p, jnp.arange(steps))[0]

  everywhere = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(jax.vmap(lane)).lower(
      *abstract((params, {'x': tokens, 'y': tokens}), everywhere)).compile().as_text()


def _op(k: Kernel) -> str:
  """The JAX operation a kernel came from, past the local-step loop's own path."""
  return k.op_name.split('/body/')[-1][-70:]


def _line(ks: list[Kernel]) -> str:
  moved, flops = sum(k.bytes for k in ks), sum(k.flops for k in ks)
  return (f'{len(ks):>7} {moved / 1e6:>8.0f} {flops / 1e9:>7.1f} '
          f'{moved / BANDWIDTH * 1e3:>8.3f} {len(ks) * LAUNCH_S * 1e3:>9.3f}')


def main(argv):
  del argv
  import jax
  from benchmarks.lane_forms import conv_forms, round_hlo
  from fathom_sim import lane_update
  lane_update.PALLAS = _LANE_UPDATE.value == 'pallas'
  convs = conv_forms(_CONVS.value)
  mesh = h100_mesh()
  print('jax', jax.__version__, 'compiled for', mesh.devices.flat[0].device_kind,
        '(deviceless: no autotuning)', flush=True)
  print('one local step of every lane: kernels, MB moved, GFLOP, MB floor ms (3.35 TB/s), '
        'launch ms (2 us each)')
  sizes = _COHORTS.value if _PROGRAM.value == 'round' else _LANES.value
  if _TASK.value == 'lstm':
    if _PROGRAM.value != 'sgd':
      raise app.UsageError('--task=lstm compiles --program=sgd only')
    convs = ['-']  # one form: the LSTM has no convolutions
  for size in map(int, sizes):
    for dtype in _DTYPES.value:
      for conv in convs:
        if _PROGRAM.value == 'round':
          hlo, lanes, steps = round_hlo(size, conv, dtype, mesh, _NUM_CLIENTS.value)
          tag = f'round_C{size}_L{lanes}_{conv.replace("/", "-")}_{dtype}'
          tag += '_lane_update_pallas' if lane_update.PALLAS else ''
        elif _TASK.value == 'lstm':
          hlo, lanes, steps = lstm_sgd_hlo(size, dtype, mesh), size, None
          tag = f'sgd_lstm_L{lanes}_{dtype}'
        else:
          hlo, lanes, steps = sgd_hlo(size, conv, dtype, mesh), size, None
          tag = f'sgd_L{lanes}_{conv.replace("/", "-")}_{dtype}'
        if _HLO_DIR.value:
          os.makedirs(_HLO_DIR.value, exist_ok=True)
          with open(os.path.join(_HLO_DIR.value, tag + '.hlo'), 'w') as f:
            f.write(hlo)
        body, = loop_bodies(hlo)  # the local-step loop; its body is one step of every lane
        # The LSTM's step holds loops over its time steps: unrolled, they are part of the step.
        step = run_kernels(hlo, body) if _TASK.value == 'lstm' else kernels(hlo, body)
        print(f'{tag}: {lanes} lanes, step {_line(step)}', flush=True)
        if steps is not None:
          once = kernels(hlo)  # the round's kernels outside the loop
          moved = sum(k.bytes for k in once) + steps * sum(k.bytes for k in step)
          print(f'    {steps} steps (the longest lane) and {len(once)} kernels once a round '
                f'({sum(k.bytes for k in once) / 1e6:.0f} MB): round floor '
                f'{moved / BANDWIDTH * 1e3:.1f} ms of bytes, '
                f'{(len(once) + steps * len(step)) * LAUNCH_S * 1e3:.1f} ms of launches')
        for k in sorted(step, key=lambda k: -k.bytes)[:_TOP.value]:
          print(f'    {k.bytes / 1e6:8.1f} MB {k.flops / 1e9:6.2f} GFLOP {k.kind:>8} '
                f'{_op(k)}')
        groups: dict[tuple[str, str], list[Kernel]] = {}
        for k in step:
          groups.setdefault((k.kind, _op(k)), []).append(k)
        for (kind, op), ks in sorted(groups.items(), key=lambda g: -sum(k.bytes for k in g[1])
                                     )[:_BY_OP.value]:
          print(f'    {sum(k.bytes for k in ks) / 1e6:8.1f} MB in {len(ks):>3} x {kind:>8} {op}')


if __name__ == '__main__':
  app.run(main)
