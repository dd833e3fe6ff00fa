"""The Pallas convolution (fathom_sim/conv_kernels.py) against XLA's, run interpreted here; the
GPU's lowering checked without a GPU."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fathom_sim import conv_kernels


def _xla_conv(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), 'VALID',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      precision='highest')


def _value_and_grads(conv, x, kernel, dy):
  y, vjp = jax.vjp(conv, x, kernel)
  return (y,) + vjp(dy)


@pytest.fixture
def highest():
  with jax.default_matmul_precision('highest'):
    yield


# The kernels' three code paths: taps unrolled (the default), in a loop, and several row tiles
# a program (SPAN: one that SPLITS' 4 does not divide, and one that divides it).
_PATHS = {'unrolled': (False, 1), 'tap_loop': (True, 1), 'span': (False, 3),
          'span2': (False, 2)}


def _use_path(monkeypatch, path):
  tap_loop, span = _PATHS[path]
  monkeypatch.setattr(conv_kernels, 'TAP_LOOP', tap_loop)
  monkeypatch.setattr(conv_kernels, 'SPAN', span)


@pytest.mark.parametrize('path', list(_PATHS))
@pytest.mark.parametrize('shape,cout', [((3, 26, 26, 32), 64), ((2, 7, 9, 16), 16),
                                        ((1, 3, 3, 16), 32)])
def test_kernels_equal_xla_convolution_and_both_gradients(highest, monkeypatch, shape, cout,
                                                          path):
  """The output, the input's and the kernel's gradients equal XLA's convolution's (float32
  products), at the CNN's shape, at a non-square one whose rows do not fill a tile, and at the
  smallest (one output position); along each of the kernels' code paths."""
  _use_path(monkeypatch, path)
  r = np.random.default_rng(0)
  x = jnp.asarray(r.standard_normal(shape), jnp.float32)
  kernel = jnp.asarray(r.standard_normal((3, 3, shape[-1], cout)) / 10, jnp.float32)
  dy = jnp.asarray(r.standard_normal((shape[0], shape[1] - 2, shape[2] - 2, cout)), jnp.float32)
  got = _value_and_grads(conv_kernels.conv3x3, x, kernel, dy)
  want = _value_and_grads(_xla_conv, x, kernel, dy)
  for name, a, b in zip(('y', 'dx', 'dkernel'), got, want):
    assert a.shape == b.shape and a.dtype == b.dtype, name
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))),
                               err_msg=name)


@pytest.mark.parametrize('path', ['unrolled', 'span'])
def test_vmapped_lanes_each_use_their_own_kernel(highest, monkeypatch, path):
  """Under vmap (a cohort's lanes) every lane convolves its own input with its own kernel, in
  both directions: a grid axis of the lanes, not a shared kernel (with SPAN, several programs
  of several tiles each in a lane)."""
  _use_path(monkeypatch, path)
  r = np.random.default_rng(1)
  x = jnp.asarray(r.standard_normal((3, 2, 26, 14, 16)), jnp.float32)  # 728 rows a lane
  kernel = jnp.asarray(r.standard_normal((3, 3, 3, 16, 32)) / 10, jnp.float32)

  def loss(conv):
    return lambda x, k: jnp.sum(jnp.sin(jax.vmap(conv)(x, k)))

  got = jax.value_and_grad(loss(conv_kernels.conv3x3), (0, 1))(x, kernel)
  want = jax.value_and_grad(loss(_xla_conv), (0, 1))(x, kernel)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for a, b in zip(got[1], want[1]):
    # atol: a gradient near 0 is a difference of O(1) float32 sums (one of 13,824 is 1.1e-5 off
    # in either path); a wrong tap or lane would be off by O(0.1).
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5)
  # Lane 1 alone gives lane 1's result.
  np.testing.assert_allclose(jax.vmap(conv_kernels.conv3x3)(x, kernel)[1],
                             _xla_conv(x[1], kernel[1]), rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs_accumulate_in_float32():
  """bfloat16 x and kernel: the output within bfloat16's rounding of the float32 result (the
  products summed in float32, not rounded at each of the 288 terms), returned in bfloat16."""
  r = np.random.default_rng(2)
  x = jnp.asarray(r.standard_normal((2, 10, 10, 32)), jnp.float32)
  kernel = jnp.asarray(r.standard_normal((3, 3, 32, 32)) / 17, jnp.float32)
  y = conv_kernels.conv3x3(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
  assert y.dtype == jnp.bfloat16
  want = _xla_conv(x.astype(jnp.bfloat16).astype(jnp.float32),
                   kernel.astype(jnp.bfloat16).astype(jnp.float32))
  # One rounding to bfloat16 at the end: half a bfloat16 ulp (2^-8) of the exact sum. Summed
  # in bfloat16, the error reaches 5x |y| near zero here.
  assert np.all(np.abs(np.asarray(y, np.float32) - want) <= 2.0**-8 * np.abs(want) + 1e-3)


@pytest.mark.parametrize('x_shape,k_shape', [((2, 6, 6, 1), (3, 3, 1, 32)),
                                             ((2, 6, 6, 24), (3, 3, 24, 32)),
                                             ((6, 6, 16), (3, 3, 16, 16)),
                                             ((2, 6, 6, 16), (5, 5, 16, 16))])
def test_shapes_the_kernels_cannot_take_are_refused_by_name(x_shape, k_shape):
  with pytest.raises(ValueError, match=r'conv_kernels.conv3x3: .*powers of 2, >= 16'):
    conv_kernels.conv3x3(jnp.ones(x_shape), jnp.ones(k_shape))


def _lowered_gradient(batch: int, platform: str | None) -> str:
  """StableHLO of the gradient of 4 vmapped lanes' convolutions of [batch, 26, 26, 32] by
  [3, 3, 32, 64], lowered for `platform` (None: this machine's)."""
  x = jax.ShapeDtypeStruct((4, batch, 26, 26, 32), jnp.float32)
  kernel = jax.ShapeDtypeStruct((4, 3, 3, 32, 64), jnp.float32)
  grad = jax.jit(jax.grad(lambda x, k: jnp.sum(jax.vmap(conv_kernels.conv3x3)(x, k) ** 2),
                          (0, 1)))
  lowered = grad.trace(x, kernel)
  return (lowered.lower(lowering_platforms=(platform,)) if platform else lowered.lower()).as_text()


@pytest.mark.parametrize('path', list(_PATHS))
def test_a_gpu_program_runs_the_three_passes_as_triton_kernels_and_a_cpu_one_interprets(
    monkeypatch, path):
  """Lowered for a GPU (no GPU needed to lower), the gradient of a vmapped convolution is three
  Triton kernels and no interpreter loop; lowered for this CPU, no kernel at all."""
  _use_path(monkeypatch, path)
  gpu, cpu = (_lowered_gradient(2, platform) for platform in ('cuda', None))
  assert gpu.count('custom_call @__gpu$xla.gpu.triton') == 3
  assert 'stablehlo.while' not in gpu
  assert 'custom_call' not in cpu and 'stablehlo.while' in cpu


_TILE_GLOBALS = ('ROWS', 'SPLITS', 'WARPS', 'STAGES', 'TAP_LOOP', 'SPAN')


def _restore_tile_after(monkeypatch):
  for name in _TILE_GLOBALS:
    monkeypatch.setattr(conv_kernels, name, getattr(conv_kernels, name))


def test_set_tile_reads_the_benchmarks_tile_names_and_refuses_what_triton_cannot_run(
    monkeypatch):
  """A benchmark's tile name sets the kernels' globals; a malformed name, or one Triton would
  refuse (ROWS under 16 or not a power of 2, WARPS not a power of 2), is refused by name and
  leaves them as they were."""
  _restore_tile_after(monkeypatch)

  def tile():
    return tuple(getattr(conv_kernels, name) for name in _TILE_GLOBALS)

  conv_kernels.set_tile('128x16x4x3xloop')
  assert tile() == (128, 16, 4, 3, True, 1)
  conv_kernels.set_tile('64x4x2x2')
  assert tile() == (64, 4, 2, 2, False, 1)
  conv_kernels.set_tile('32x4x8x2xspan8')
  assert tile() == (32, 4, 8, 2, False, 8)
  for bad in ('64x4x2', '96x4x2x2', '8x4x2x2', '64x4x3x2', '064x4x2x2', '\uff16\uff14x4x2x2',
              '64x4x2x\u00b2', '64x4x2x2xunroll', '64x0x2x2', '64x4x2x2xloopx1',
              '64x4x2x2xspan0', '64x4x2x2xspan1', '64x4x2x2xspan', '64x4x2x2xspan2xloop',
              '64x4x2x2xspan\u00b2'):
    with pytest.raises(ValueError, match='ROWSxSPLITSxWARPSxSTAGES'):
      conv_kernels.set_tile(bad)
  assert tile() == (32, 4, 8, 2, False, 8)  # unchanged by the refusals
  conv_kernels.check_tiles(['64x4x2x2', '32x4x4x2xspan8'])
  with pytest.raises(ValueError, match="'8x4x2x2'"):
    conv_kernels.check_tiles(['64x4x2x2', '8x4x2x2'])


def _gpu_sh_tiles() -> list[str]:
  """The tiles `benchmarks/gpu.sh kernels` times by default (its TILES)."""
  script = pathlib.Path(__file__).parent.parent / 'benchmarks' / 'gpu.sh'
  found, = re.findall(r'\$\{TILES:-([^}]+)\}', script.read_text())
  return found.split(',')


@pytest.mark.parametrize('spec', _gpu_sh_tiles())
def test_the_tiles_benchmarks_gpu_sh_times_lower_to_three_triton_kernels(monkeypatch, spec):
  """What `benchmarks/gpu.sh kernels` times lowers for a GPU (no GPU needed to lower), so a
  device call does not find a tile that does not trace."""
  _restore_tile_after(monkeypatch)
  conv_kernels.set_tile(spec)
  assert _lowered_gradient(20, 'cuda').count('custom_call @__gpu$xla.gpu.triton') == 3
