"""The Pallas convolution kernels compiled for an H100 without one: what each tile setting asks
of an SM (registers, spills, shared memory, occupancy) and which instructions it issues.

  python benchmarks/kernel_ptx.py [--lanes=50] [--tiles=64x4x2x2,128x4x4x2xloop,...]
      [--dtypes=float32,bfloat16] [--json=FILE]
  python benchmarks/kernel_ptx.py --lane_update=4096x8,4096x4   # fathom_sim/lane_update.py's

Needs the CUDA plugin of the pinned jax (`pip install "jax[cuda12]==0.10.2"`, ~6 GB, which
brings ptxas), not a GPU: each pass of fathom_sim/conv_kernels.py (vmapped over `lanes`, B 20,
the CNN's second convolution) is compiled for benchmarks/h100.py's H100 description with
XLA's dump on; the Triton kernel's launch (grid, threads, shared memory) is read from the
dumped thunk sequence and its PTX is assembled by ptxas -v for its registers and spills. From
those, the CTAs and warps an SM holds at once (the sm_90 limits: 64 warps, 32 CTAs, 64 K
registers allocated 256 a warp, 228 KB of shared memory less 1 KB a CTA) and the count of
tensor-core instructions (mma.sync: Ampere's warp-level MMA; wgmma: Hopper's warpgroup MMA),
asynchronous copies (cp.async, what a pipelined load is) and barriers in the PTX text (a loop's
body counted once: xloop tiles' counts are one tap's, xspanN tiles' one row tile's). Last, the
bytes the whole pass moves (benchmarks/hlo_traffic.py) and the Pallas kernel's share of them.
With --lane_update=BLOCKxWARPS,... the same account of lane_update's two kernels instead (its
BLOCK and WARPS; passes `step` and `finish`), vmapped over `lanes` at the CNN's 9216 x 128 dense
kernel, float32.

It is a static account, not a timing (benchmarks/conv_passes.py times the same settings on a
GPU): a kernel whose warps are few and whose loads are not pipelined waits on memory latency
whatever its bytes; docs/benchmarks.md (twelfth session) sets the two side by side.
"""

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', '1')

from absl import app, flags  # noqa: E402

from benchmarks.hlo_traffic import kernels  # noqa: E402
from benchmarks.xla_dump import account  # noqa: E402

_LANES = flags.DEFINE_integer('lanes', 50, 'Lanes side by side (the grid\'s second axis).')
_BATCH = flags.DEFINE_integer('batch_size', 20, 'Examples a lane.')
_TILES = flags.DEFINE_list('tiles', ['64x4x2x2', '128x4x4x2', '64x4x2x2xloop',
                                     '128x4x4x2xloop'],
                           'ROWSxSPLITSxWARPSxSTAGES, then xloop or xspanN '
                           '(conv_kernels.parse_tile, as benchmarks/conv_passes.py reads them).')
_DTYPES = flags.DEFINE_list('dtypes', ['float32'], 'Dtypes of x, the kernel and dy.')
_LANE_UPDATE = flags.DEFINE_list('lane_update', [], 'BLOCKxWARPS settings of lane_update\'s '
                                  'kernels to account instead of the convolution\'s (above).')
_JSON = flags.DEFINE_string('json', None, 'Also write the rows here.')


def _lane_update_jobs(lanes: int, sharding):
  """(tile, pass, f, args) of lane_update's two kernels at each --lane_update setting."""
  import jax
  import jax.numpy as jnp
  from fathom_sim import lane_update as lu
  n = 9216 * 128

  def a(*shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

  for setting in _LANE_UPDATE.value:
    block, warps = (int(v) for v in setting.split('x'))
    lu.BLOCK, lu.WARPS = block, warps
    yield (setting, 'step', jax.vmap(lu._step_kernels, in_axes=(0, 0, None, None, 0)),
           (a(lanes, n), a(lanes, n), a(n), a(), a(lanes, dtype=jnp.bool_)))
    yield (setting, 'finish', jax.vmap(lu._finish_kernels, in_axes=(0, 0, None, 0, 0)),
           (a(lanes, n), a(lanes, n), a(n), a(lanes), a(lanes, dtype=jnp.bool_)))


def _conv_jobs(lanes: int, b: int, dtype: str, sharding):
  """(tile, pass, f, args) of the convolution's three passes at each --tiles setting."""
  import jax
  import jax.numpy as jnp
  from fathom_sim import conv_kernels as ck

  def shape(*s):
    return jax.ShapeDtypeStruct((lanes,) + s, jnp.dtype(dtype), sharding=sharding)
  x, k, dy = shape(b, 26, 26, 32), shape(3, 3, 32, 64), shape(b, 24, 24, 64)
  for tile in _TILES.value:
    ck.set_tile(tile)
    passes = ck.passes(x.shape[1:], k.shape[1:])
    for name, args in (('forward', (x, k)), ('input_grad', (dy, k)), ('kernel_grad', (x, dy))):
      yield tile, name, jax.vmap(passes[name]), args


def main(argv):
  del argv
  import jax
  from benchmarks.h100 import h100_mesh
  from benchmarks.lane_forms import tiles
  tiles(_TILES.value)
  for setting in _LANE_UPDATE.value:
    parts = setting.split('x')
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() and int(p) > 0 for p in parts):
      raise app.UsageError(f'--lane_update: {setting!r}: expected BLOCKxWARPS, e.g. 4096x8')
  mesh = h100_mesh()
  on_h100 = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  lanes, b = _LANES.value, _BATCH.value
  print('jax', jax.__version__, 'compiled for', mesh.devices.flat[0].device_kind,
        f'(deviceless); {lanes} lanes of B {b}', flush=True)
  print(f'{"dtype":>8} {"tile":>15} {"pass":>11} {"grid":>6} {"thr":>4} {"smem":>6} '
        f'{"regs":>4} {"spill":>5} {"CTA/SM":>6} {"warps":>5} {"bound":>9} {"waves":>6} '
        f'{"mma":>5} {"wgmma":>5} {"cp.async":>8} {"bar":>4} {"MB":>5} {"kernel":>6}')
  rows = []
  for dtype in ['float32'] if _LANE_UPDATE.value else _DTYPES.value:
    jobs = (_lane_update_jobs(lanes, on_h100) if _LANE_UPDATE.value
            else _conv_jobs(lanes, b, dtype, on_h100))
    for tile, name, f, args in jobs:
      with tempfile.TemporaryDirectory() as dump:
        try:
          compiled = jax.jit(f).lower(*args).compile(compiler_options={'xla_dump_to': dump})
          row = account(dump)
          moved = kernels(compiled.as_text())
        except Exception as e:  # noqa: BLE001  (a setting Triton refuses: say so, go on)
          print(f'{dtype:>8} {tile:>15} {name:>11}: {type(e).__name__}: {str(e)[:160]}',
                flush=True)
          continue
      # The pass's bytes, and the Pallas kernel's share (the rest: XLA's padding and slicing).
      row.update(dtype=dtype, tile=tile, lanes=lanes, **{'pass': name},
                 pass_mb=sum(m.bytes for m in moved) / 1e6,
                 kernel_mb=sum(m.bytes for m in moved if m.kind == 'custom-call') / 1e6)
      rows.append(row)
      print(f'{dtype:>8} {tile:>15} {name:>11} {row["grid"]:>6} {row["threads"]:>4} '
            f'{row["shared"]:>6} {row["registers"]:>4} {row["spill_stores"]:>5} '
            f'{row["ctas_per_sm"]:>6} {row["warps_per_sm"]:>5} {row["bound_by"]:>9} '
            f'{row["waves"]:>6.1f} {row["mma_sync"]:>5} {row["wgmma"]:>5} '
            f'{row["cp_async"]:>8} {row["barriers"]:>4} {row["pass_mb"]:>5.0f} '
            f'{row["kernel_mb"]:>6.0f}', flush=True)
      if _JSON.value:
        with open(_JSON.value, 'w') as fh:
          json.dump(rows, fh, indent=1)


if __name__ == '__main__':
  app.run(main)
