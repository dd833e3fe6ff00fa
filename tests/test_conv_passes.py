"""benchmarks/conv_passes.py's 'gemm' form (lane_forms.gemm_passes): each product is the pass
it stands for.

The gemm rows are read as the ceiling of every im2col form, so they must be the same
arithmetic as the convolution's passes, not merely products of the same sizes.
"""

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.lane_forms import gemm_passes


def _conv(x, k):
  return jax.lax.conv_general_dilated(x, k, (1, 1), 'VALID',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      precision=jax.lax.Precision.HIGHEST)


def test_gemm_passes_are_the_convolutions_passes():
  lanes, batch, h, w, cin, cout = 2, 3, 7, 6, 4, 5
  r = np.random.default_rng(0)
  x = jnp.asarray(r.standard_normal((lanes, batch, h, w, cin)), jnp.float32)
  k = jnp.asarray(r.standard_normal((lanes, 3, 3, cin, cout)), jnp.float32)
  dy = jnp.asarray(r.standard_normal((lanes, batch, h - 2, w - 2, cout)), jnp.float32)
  with jax.default_matmul_precision('highest'):
    passes = {name: f(*args) for name, (f, *args) in gemm_passes(x, k, dy).items()}
  y, vjp = jax.vmap(lambda x, k: jax.vjp(_conv, x, k))(x, k)
  dx, dk = jax.vmap(lambda f, d: f(d))(vjp, dy)

  np.testing.assert_allclose(passes['forward'].reshape(y.shape), y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(passes['kernel_grad'].reshape(dk.shape), dk, rtol=1e-5, atol=1e-4)
  # The patches' gradient, summed back onto x tap by tap (what im2col's transpose adds to it).
  dpatches = np.asarray(passes['input_grad']).reshape(lanes, batch, h - 2, w - 2, 9, cin)
  summed = np.zeros(x.shape, np.float32)
  for tap in range(9):
    i, j = divmod(tap, 3)
    summed[:, :, i:i + h - 2, j:j + w - 2, :] += dpatches[..., tap, :]
  np.testing.assert_allclose(summed, dx, rtol=1e-5, atol=1e-4)
