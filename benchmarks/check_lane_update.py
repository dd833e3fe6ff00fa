"""fathom_sim/lane_update.py's two Pallas kernels against their jnp forms on this machine's
device, at the CNN's dense kernel (run by hand; `gpu.sh update` runs it before timing them).

  python benchmarks/check_lane_update.py

The CPU tests run the kernels interpreted (tests/test_lane_update.py); only a GPU runs what
Triton makes of them, with the GPU image's jax. 50 lanes of 9216 x 128 entries, vmapped as in
the round: one lane's gradient holds an inf and one a NaN, one lane's step is padding, one
ending lane is left out with a NaN in its params. Prints the largest differences; exits 1 if
the kernels' results differ from jnp's beyond float32 rounding.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def check(lanes: int = 50, size: int = 9216 * 128, interpret: bool = False) -> list[str]:
  """What differs between the kernels and the jnp forms (empty: nothing), on the default
  device."""
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np

  from fathom_sim import lane_update as lu

  r = np.random.default_rng(0)

  def normal(*shape):
    return jnp.asarray(r.standard_normal(shape), jnp.float32)

  p, g, x, acc = normal(lanes, size), normal(lanes, size), normal(size), normal(lanes, size)
  g = g.at[1, 5].set(jnp.inf).at[2, 7].set(jnp.nan)
  real = jnp.arange(lanes) != 3
  eta = jnp.float32(0.1)
  failures = []

  def compare(name, got, want, rtol, atol=0.0):
    got, want = np.asarray(got), np.asarray(want)
    finite = np.isfinite(want)
    if not np.array_equal(got[~finite], want[~finite], equal_nan=True) or not np.all(
        np.isfinite(got[finite])):
      failures.append(f'{name}: inf or NaN in other places')
      return
    diff = np.abs(got[finite] - want[finite])
    beyond = int(np.count_nonzero(diff > atol + rtol * np.abs(want[finite])))
    print(f'{name}: largest difference {diff.max(initial=0.0):.3g}, {beyond} entries beyond '
          f'rtol {rtol:g} atol {atol:g}', flush=True)
    if beyond:
      failures.append(f'{name}: {beyond} entries beyond the tolerance')

  axes = (0, 0, None, None, 0)
  kernel = jax.jit(jax.vmap(functools.partial(lu._step_kernels, interpret=interpret),
                            in_axes=axes))
  new, sums = kernel(p, g, x, eta, real)
  want_new, want_sums = jax.jit(jax.vmap(lu._step_jnp_leaf, in_axes=axes))(p, g, x, eta, real)
  compare('step: p_k', new, want_new, rtol=1e-6, atol=1e-6)
  compare('step: <g, d>, |g|^2, |d|^2', sums[:, :3], want_sums[:, :3], rtol=1e-4)
  compare('step: non-finite entries of d', sums[:, 3], want_sums[:, 3], rtol=0.0)

  weight = jnp.where(jnp.arange(lanes) % 3 == 0, 0.0, 1.0 + jnp.arange(lanes))
  end = jnp.arange(lanes) % 2 == 0
  p_end = p.at[0, 9].set(jnp.nan)  # lane 0 ends left out (weight 0): its sum stays
  axes = (0, 0, None, 0, 0)
  kernel = jax.jit(jax.vmap(functools.partial(lu._finish_kernels, interpret=interpret),
                            in_axes=axes))
  got = kernel(acc, p_end, x, weight, end)
  want = jax.jit(jax.vmap(lu._finish_jnp_leaf, in_axes=axes))(acc, p_end, x, weight, end)
  compare('finish: the sum', got[0], want[0], rtol=1e-6, atol=1e-6)
  compare('finish: params', got[1], want[1], rtol=0.0)
  return failures


def main() -> int:
  import jax
  print('jax', jax.__version__, jax.devices()[0].device_kind, flush=True)
  if jax.default_backend() != 'gpu':
    print('check_lane_update.py: needs a GPU (on a CPU the tests run the kernels interpreted: '
          'tests/test_lane_update.py)', file=sys.stderr)
    return 2
  failures = check()
  for f in failures:
    print('FAILED', f, flush=True)
  print('the kernels match jnp' if not failures else 'the kernels differ from jnp', flush=True)
  return 1 if failures else 0


if __name__ == '__main__':
  sys.exit(main())
