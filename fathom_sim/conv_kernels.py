"""A 3x3 'VALID' convolution as three Pallas kernels (forward, input gradient, kernel gradient)
that read the input in place: no im2col copy (config.model.conv='pallas', for a GPU).

Why: under vmap (one model per lane) the im2col form's 9 shifted views of the CNN's second
convolution's input are 46 % of the bytes of a 50-lane step (docs/benchmarks.md, sixth
session). Here every shifted view is a load from the flat input at an offset, so the forward
pass reads x and writes y, the input's gradient reads dy and writes dx, the kernel's gradient
reads x and dy: a 50-lane round step moves 30 % fewer bytes. Measured on an H200 (eleventh
session) the rounds take only 4-10 % less time in float32: every pass of this layer, in either
form, runs at 20-37 TFLOP/s and 0.2-0.4 TB/s, far from both the tensor cores' and the
memory's limits: how these small products are issued bounds it, not the bytes. In
bfloat16 the kernels' passes are 1.5x im2col's. At matmul_precision='highest' they are slower
than im2col (their float32 products are not on tensor cores).

The flat form: with x [B, H, W, C] flattened to rows q = (b H + r) W + c, tap (i, j) of the
output at row q reads input row q + i W + j. Computing every row q (not only r < H - 2, c < W
- 2) keeps each tap a contiguous block of rows; the rows that wrap into the next column or
image are discarded (15 % at 26 x 26). Loads never leave the arrays: they are padded, so
interpret mode (CPU tests) and the GPU compute the same thing.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

# Tile settings: the fastest over the three passes at 50 lanes of 8 tried, in both of two
# device calls on an H200 (benchmarks/conv_passes.py; docs/benchmarks.md, eleventh session).
# Read when a program is traced: a benchmark that sets them builds its programs after.
ROWS = 64       # output rows a program computes (a power of 2, as Triton's loads require)
SPLITS = 4      # programs that share one tap of the kernel's gradient, each over 1/SPLITS rows
WARPS, STAGES = 2, 2  # Triton's num_warps and num_stages
# The forward pass and the input's gradient sum their 9 taps unrolled (False), or in a loop
# (True), which Triton can software-pipeline over STAGES (the next tap's rows loading while
# this tap's product runs). Untimed yet: benchmarks/conv_passes.py's 5th tile field.
TAP_LOOP = False
# Row tiles a program of the forward pass and the input's gradient computes in turn (1: one).
# Above 1 it loads the kernel's 9 taps once and keeps them (in shared memory, as Triton
# places them) for all its tiles, pipelining the rows' loads over the tiles, where one tile a
# program loads the 9 taps again for every ROWS rows (benchmarks/kernel_ptx.py, twelfth
# session); its taps are unrolled (TAP_LOOP does not apply). Untimed yet: a tile name's
# 'spanN' field.
SPAN = 1


_TILE = re.compile(r'([1-9]\d*)x([1-9]\d*)x([1-9]\d*)x([1-9]\d*)(?:x(loop|span[1-9]\d*))?',
                   re.ASCII)


def _power_of_2(n: int) -> bool:
  return n & (n - 1) == 0


def parse_tile(spec: str) -> tuple[int, int, int, int, bool, int]:
  """(ROWS, SPLITS, WARPS, STAGES, TAP_LOOP, SPAN) of 'ROWSxSPLITSxWARPSxSTAGES', with 'xloop'
  appended for TAP_LOOP=True or 'xspanN' for SPAN=N >= 2 (how benchmarks name a setting)."""
  match = _TILE.fullmatch(spec)
  extra = match and match[5] or ''
  if (not match or extra == 'span1' or int(match[1]) < 16
      or not _power_of_2(int(match[1])) or not _power_of_2(int(match[3]))):
    raise ValueError(f'conv_kernels tile {spec!r}: expected ROWSxSPLITSxWARPSxSTAGES, then '
                     'optionally xloop or xspanN (N >= 2); positive integers, ROWS a power of '
                     '2 >= 16 (Triton\'s products) and WARPS a power of 2 (e.g. 64x4x2x2, '
                     '128x4x4x3xloop, 32x4x4x2xspan8)')
  rows, splits, warps, stages = (int(match[i]) for i in range(1, 5))
  return (rows, splits, warps, stages, extra == 'loop',
          int(extra[4:]) if extra.startswith('span') else 1)


def check_tiles(specs: list[str]) -> None:
  """parse_tile of every spec, before anything compiles: the first bad one raises."""
  for spec in specs:
    parse_tile(spec)


def set_tile(spec: str) -> None:
  """Sets the tile globals from a parse_tile spec; programs traced after use it."""
  global ROWS, SPLITS, WARPS, STAGES, TAP_LOOP, SPAN
  ROWS, SPLITS, WARPS, STAGES, TAP_LOOP, SPAN = parse_tile(spec)


def supported(cin: int, cout: int) -> bool:
  """Whether these channel counts run as kernels: Triton's dot wants both sides' dimensions
  powers of 2 and at least 16 (the CNN's second convolution: 32 -> 64)."""
  return all(c >= 16 and c & (c - 1) == 0 for c in (cin, cout))


def _on_gpu(call, *args):
  """call(*args, interpret=False) in a program compiled for an NVIDIA GPU, interpret=True
  elsewhere (a ROCm GPU included: untested there). Decided where the program is lowered, not by
  the default backend: a program can be compiled for a GPU on a machine without one
  (benchmarks/gpu_aot.py)."""
  return jax.lax.platform_dependent(
      *args, cuda=functools.partial(call, interpret=False),
      default=functools.partial(call, interpret=True))


def _dot(a, b, a_axis: int, b_axis: int):
  """a @ b contracting a's `a_axis` with b's `b_axis`, accumulated in float32. lax.dot_general
  rather than a Pallas helper: Triton's lowering transposes either side itself, and it reads
  the precision from JAX's default (config.matmul_precision: TF32 unless 'highest')."""
  return jax.lax.dot_general(a, b, (((a_axis,), (b_axis,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _compiler_params():
  return plt.CompilerParams(num_warps=WARPS, num_stages=STAGES)


def _tap_offset(t, width: int):
  """Row offset of tap t = (i, j) = (t // 3, t % 3) in the flat form (the kernel's (row,
  column) order); t a Python or a traced int >= 0. lax.div and lax.rem for a traced one:
  jnp's floor-rounding // and % lower to Triton with a sign fix-up its lowering refuses in a
  loop."""
  if isinstance(t, int):
    return t // 3 * width + t % 3
  return jax.lax.div(t, 3) * width + jax.lax.rem(t, 3)


def _shifted_sum_kernel(base, sign, width, x_ref, k_ref, y_ref):
  """y rows [m, m + ROWS) = sum over taps t of x rows [m + offset_t, ...) @ k[t], offset_t =
  base + sign * _tap_offset(t, width)."""
  if SPAN > 1:
    if TAP_LOOP:
      raise ValueError('conv_kernels: SPAN > 1 unrolls the taps; TAP_LOOP must be False')
    return _shifted_sum_span(base, sign, width, x_ref, k_ref, y_ref)
  m = pl.program_id(0) * ROWS

  def tap(t, acc):
    rows = x_ref[pl.ds(m + base + sign * _tap_offset(t, width), ROWS), :]
    return acc + _dot(rows, k_ref[t], 1, 0)

  acc = jnp.zeros(y_ref.shape, jnp.float32)
  if TAP_LOOP:
    acc = jax.lax.fori_loop(0, 9, tap, acc)
  else:
    for t in range(9):
      acc = tap(t, acc)
  y_ref[...] = acc.astype(y_ref.dtype)


def _shifted_sum_span(base, sign, width, x_ref, k_ref, y_ref):
  """_shifted_sum_kernel over this program's SPAN tiles of ROWS rows, in turn, the 9 taps of the
  kernel loaded once for all of them (y_ref is the program's SPAN x ROWS rows)."""
  first = pl.program_id(0) * SPAN * ROWS
  taps = [k_ref[t] for t in range(9)]

  def tile(s, carry):
    m = first + s * ROWS
    acc = jnp.zeros((ROWS, y_ref.shape[1]), jnp.float32)
    for t in range(9):
      rows = x_ref[pl.ds(m + base + sign * _tap_offset(t, width), ROWS), :]
      acc = acc + _dot(rows, taps[t], 1, 0)
    y_ref[pl.ds(s * ROWS, ROWS), :] = acc.astype(y_ref.dtype)
    return carry

  jax.lax.fori_loop(0, SPAN, tile, 0)


def _shifted_sum(x, kernel, base, sign, width, out_rows):
  """The first `out_rows` rows (a multiple of ROWS x SPAN) of sum_t x[offset_t:][:out_rows] @
  kernel[t], kernel [9, K, N]."""
  return _on_gpu(functools.partial(_shifted_sum_call, base, sign, width, out_rows,
                                   kernel.shape[2]), x, kernel)


def _shifted_sum_call(base, sign, width, out_rows, cout, x, kernel, *, interpret):
  return pl.pallas_call(
      functools.partial(_shifted_sum_kernel, base, sign, width),
      out_shape=jax.ShapeDtypeStruct((out_rows, cout), x.dtype),
      grid=(out_rows // (ROWS * SPAN),),
      out_specs=pl.BlockSpec((ROWS * SPAN, cout), lambda i: (i, 0)),
      compiler_params=_compiler_params(),
      interpret=interpret,
  )(x, kernel)


def _kernel_grad_kernel(width, halo, steps, x_ref, dy_ref, dk_ref):
  """dk[split, t] = sum over this split's row blocks m of x rows [m + offset_t, ...)^T @ dy rows
  [m + halo, ...) (dy is stored shifted down by the halo: _dy_shifted)."""
  t, split = pl.program_id(0), pl.program_id(1)
  offset = _tap_offset(t, width)

  def body(s, acc):
    m = (split * steps + s) * ROWS
    rows = x_ref[pl.ds(m + offset, ROWS), :]
    return acc + _dot(rows, dy_ref[pl.ds(m + halo, ROWS), :], 0, 0)

  acc = jax.lax.fori_loop(0, steps, body, jnp.zeros(dk_ref.shape, jnp.float32))
  dk_ref[...] = acc.astype(dk_ref.dtype)


def _kernel_grad_call(width, halo, rows, x, dy, *, interpret):
  cin, cout = x.shape[1], dy.shape[1]
  return pl.pallas_call(
      functools.partial(_kernel_grad_kernel, width, halo, rows // ROWS // SPLITS),
      out_shape=jax.ShapeDtypeStruct((SPLITS, 9, cin, cout), jnp.float32),
      grid=(9, SPLITS),
      out_specs=pl.BlockSpec((None, None, cin, cout), lambda t, s: (s, t, 0, 0)),
      compiler_params=_compiler_params(),
      interpret=interpret,
  )(x, dy)


def _layout(shape):
  """(rows of the flat input, rows computed: a multiple of ROWS x SPLITS and of ROWS x SPAN,
  halo rows)."""
  b, h, w, _ = shape
  rows = b * h * w
  unit = ROWS * math.lcm(SPLITS, SPAN)
  computed = -(-rows // unit) * unit
  return rows, computed, 2 * w + 2


def _x_flat(x):
  """x [B, H, W, C] as flat rows, zero rows after them so that every tap's load is in bounds."""
  rows, computed, halo = _layout(x.shape)
  return jnp.pad(x.reshape(rows, x.shape[-1]), ((0, computed - rows + halo), (0, 0)))


def _dy_shifted(dy, x_shape):
  """dy [B, H-2, W-2, C] as flat rows of the full H x W grid (zero where no output is), after
  `halo` zero rows: the input's gradient at row p reads dy rows p - offset_t, which then start
  at row >= 0. One pad, which XLA fuses into one pass."""
  b, h, w, _ = x_shape
  rows, computed, halo = _layout(x_shape)
  full = jnp.pad(dy, ((0, 0), (0, 2), (0, 2), (0, 0))).reshape(rows, dy.shape[-1])
  return jnp.pad(full, ((halo, computed - rows), (0, 0)))


def _forward(x_flat, kernel, x_shape):
  b, h, w, cin = x_shape
  rows, computed, _ = _layout(x_shape)
  y = _shifted_sum(x_flat, kernel.reshape(9, cin, -1), 0, 1, w, computed)
  return y[:rows].reshape(b, h, w, -1)[:, :h - 2, :w - 2]


def _input_grad(dy_shifted, kernel, x_shape):
  """dx row p = sum_t dy row (p - offset_t) @ k[t]^T: a shifted sum like the forward pass."""
  b, h, w, cin = x_shape
  rows, computed, halo = _layout(x_shape)
  # Transposed here, once: inside the kernel every program transposed every tap through shared
  # memory (93 barriers against the forward pass's 39; docs/benchmarks.md, twelfth session).
  taps = kernel.reshape(9, cin, -1).transpose(0, 2, 1)
  dx = _shifted_sum(dy_shifted, taps, halo, -1, w, computed)
  return dx[:rows].reshape(x_shape)


def _kernel_grad_of(x_flat, dy_shifted, kernel_shape, x_shape):
  """dk[t] = sum over rows q of x_flat[q + offset_t]^T dy_shifted[q + halo]: the SPLITS
  programs' partial sums of each tap, added."""
  _, computed, halo = _layout(x_shape)
  partial = _on_gpu(functools.partial(_kernel_grad_call, x_shape[2], halo, computed),
                    x_flat, dy_shifted)
  return partial.sum(0).reshape(kernel_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _conv(x_shape, x, kernel):
  return _forward(_x_flat(x), kernel, x_shape)


def _conv_fwd(x_shape, x, kernel):
  x_flat = _x_flat(x)
  # The padded rows are the residual, so that the backward pass does not pad x again.
  return _forward(x_flat, kernel, x_shape), (x_flat, kernel)


def _conv_bwd(x_shape, residuals, dy):
  x_flat, kernel = residuals
  dy_shifted = _dy_shifted(dy, x_shape)
  return (_input_grad(dy_shifted, kernel, x_shape),
          _kernel_grad_of(x_flat, dy_shifted, kernel.shape, x_shape).astype(kernel.dtype))


def passes(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...]) -> dict:
  """The three passes as separate functions (for benchmarks/conv_passes.py): forward(x, k),
  input_grad(dy, k) and kernel_grad(x, dy), each with its own padding."""
  return {'forward': lambda x, k: _conv(x_shape, x, k),
          'input_grad': lambda dy, k: _input_grad(_dy_shifted(dy, x_shape), k, x_shape),
          'kernel_grad': lambda x, dy: _kernel_grad_of(_x_flat(x), _dy_shifted(dy, x_shape),
                                                        kernel_shape, x_shape)}


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """3x3 'VALID' convolution of x [B, H, W, Cin] with kernel [3, 3, Cin, Cout] (HWIO), as
  Pallas kernels (Triton on a GPU, interpreted elsewhere: for tests, slowly). Reverse-mode
  differentiable (a custom_vjp); vmap adds a grid axis. Needs supported(Cin, Cout)."""
  if x.ndim != 4 or kernel.shape[:2] != (3, 3) or not supported(*kernel.shape[2:]):
    raise ValueError(f'conv_kernels.conv3x3: x [B, H, W, C] and kernel [3, 3, C, C\'] with '
                     f'channel counts powers of 2, >= 16; got {x.shape} and {kernel.shape}')
  return _conv(x.shape, x, kernel)
