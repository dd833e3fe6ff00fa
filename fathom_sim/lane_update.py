"""A lane's passes over its model at every local step: the SGD step with FATHOM's sums for c_k,
and a client's end (its update added to the lane's sum, the lane reset to the server model).

`step` and `finish` are the same functions either way; `PALLAS` chooses how a large leaf (the
CNN's 9216 x 128 dense kernel: 98 % of its parameters) is computed in a program compiled for
an NVIDIA GPU. False (the default): jnp, XLA's fusions. True: two Pallas kernels (Triton), for
a candidate that a GPU has not timed yet (benchmarks: `launch/benchmark.py --lane_update`).

Why kernels: under vmap a lane's `cond` at the end of a client runs as selects at every step,
and XLA makes four passes over every lane's model of the step's elementwise work (the SGD step
writing p_k and d_k; the finiteness check with <g, d_k> and |d_k|^2; |g|^2; the select of the
lane's sum): 2.4 GB of a 50-lane step's 8.8 (benchmarks/gpu_aot.py, docs/benchmarks.md,
seventh session). The kernels read p, g and x once and write p_k, returning the sums as a few
floats a block, and pass over the sum only in the lanes whose client ends at this step (a
branch per lane, which vmap cannot make of a cond): by the same account about 0.8 GB.

Outside a GPU program, and for leaves the kernels do not take (`_takes`), the jnp form runs;
on a CPU device (one lane, unbatched) `finish` is a cond, so the sum is touched once a client.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from fathom_sim import tree
from fathom_sim.types import Params

PALLAS = False  # read when a program is traced (above)
# Tests only: where the program is not for a GPU, run the kernels interpreted instead of jnp.
INTERPRET = False
BLOCK = 4096    # elements of a leaf a program takes (a power of 2, as Triton's loads require)
# 16 elements a thread: ptxas gives the step's kernel 64 registers, 32 warps an SM (4 warps:
# 114 registers, 16 warps; compiled for an H100 without one, docs/benchmarks.md).
WARPS = 8
_LEAST = 1 << 16  # smaller leaves stay jnp: a launch costs more than their passes


def _takes(leaf: jax.Array) -> bool:
  return PALLAS and leaf.size >= _LEAST and leaf.size % BLOCK == 0


def _scalar(v, dtype) -> jax.Array:
  return jnp.reshape(v, (1,)).astype(dtype)


def _step_kernel(p_ref, g_ref, x_ref, eta_ref, real_ref, out_ref, sums_ref):
  p = p_ref[...]
  g = g_ref[...]
  stepped = p - eta_ref[...] * g
  d = x_ref[...] - stepped
  out_ref[...] = jnp.where(real_ref[...] != 0, stepped, p)
  g, d = g.astype(jnp.float32), d.astype(jnp.float32)
  bad = jnp.sum(jnp.where(d - d == 0, 0.0, 1.0))  # d - d is 0 where d is finite, else NaN
  which = jax.lax.broadcasted_iota(jnp.int32, (4,), 0)
  sums_ref[...] = jnp.where(which == 0, jnp.sum(g * d), jnp.where(
      which == 1, jnp.sum(g * g), jnp.where(which == 2, jnp.sum(d * d), bad)))


def _blocks(kernel, n: int, out_specs: list, out_shape: list, aliases: dict, interpret: bool):
  """pallas_call of `kernel` over a flat leaf of n entries, a program a BLOCK: three
  leaf-sized inputs, then two (1,)-shaped scalars every program reads."""
  block = pl.BlockSpec((BLOCK,), lambda i: (i,))
  one = pl.BlockSpec((1,), lambda i: (0,))
  return pl.pallas_call(
      kernel, grid=(n // BLOCK,), in_specs=[block, block, block, one, one],
      out_specs=[block if s is None else s for s in out_specs], out_shape=out_shape,
      input_output_aliases=aliases,
      compiler_params=plt.CompilerParams(num_warps=WARPS, num_stages=1), interpret=interpret)


def _step_kernels(p, g, x, eta, real, *, interpret: bool = False):
  """_step_jnp_leaf's results from a Pallas kernel: a program a BLOCK of the flat leaf, each
  writing its block of p_k and its 4 partial sums (added here)."""
  n = p.size
  out, sums = _blocks(
      _step_kernel, n, [None, pl.BlockSpec((None, 4), lambda i: (i, 0))],
      [jax.ShapeDtypeStruct((n,), p.dtype), jax.ShapeDtypeStruct((n // BLOCK, 4), jnp.float32)],
      # p_k over p, block by block (each program reads its block first): in the local loop the
      # lane's params then stay in one buffer, with no copy a step.
      {0: 0}, interpret,
  # eta in the params' dtype, float32 as the jnp form's p - eta g computes it (the params are
  # float32 in every compute dtype).
  )(p.reshape(-1), g.reshape(-1), x.reshape(-1), _scalar(eta, p.dtype),
    _scalar(real, jnp.int32))
  return out.reshape(p.shape), jnp.sum(sums, axis=0)


def _sums(g, d) -> jax.Array:
  """<g, d>, |g|^2, |d|^2 of one leaf, float32."""
  g, d = g.astype(jnp.float32), d.astype(jnp.float32)
  return jnp.stack([jnp.vdot(g, d), jnp.vdot(g, g), jnp.vdot(d, d)])


def _step_jnp_leaf(p, g, x, eta, real):
  """What _step_kernels computes: p_k, and _sums with d's non-finite entries counted."""
  stepped = p - eta * g
  d = x - stepped
  bad = jnp.sum(~jnp.isfinite(d)).astype(jnp.float32)
  return jnp.where(real, stepped, p), jnp.concatenate([_sums(g, d), bad[None]])


class Update(NamedTuple):
  """d_k = x - (p - eta g), as `step` leaves it for `finish`: the jnp leaves' d_k (None where a
  kernel took the leaf) and how many entries of the kernels' leaves are not finite."""
  d: list
  bad: jax.Array

  def finite(self) -> jax.Array:
    """Whether every entry of d_k is finite: a pass over the jnp leaves, so called where it is
    needed (in `finish`'s cond, once a client on a CPU device)."""
    ok = self.bad == 0
    for d in self.d:
      if d is not None:
        ok = ok & jnp.all(jnp.isfinite(d))
    return ok


def step(params: Params, grad: Params, server: Params, eta: jax.Array, real: jax.Array
         ) -> tuple[Params, jax.Array, Update]:
  """p_k = p - eta g where `real` (else p), c_k = cos(g, d_k), and d_k = x - (p - eta g) for
  `finish`; d_k is of the step, real or not."""
  new, sums, ds = [], [], []
  for p, g, x in zip(jax.tree.leaves(params), jax.tree.leaves(grad), jax.tree.leaves(server)):
    if _takes(p):
      p_k, leaf_sums = jax.lax.platform_dependent(
          p, g, x, eta, real, cuda=_step_kernels, default=functools.partial(
              _step_kernels, interpret=True) if INTERPRET else _step_jnp_leaf)
      d = None
    else:
      stepped = p - eta * g
      p_k, d = jnp.where(real, stepped, p), x - stepped
      # d_k kept for finish, whose cond checks it: no count of non-finite entries here.
      leaf_sums = jnp.concatenate([_sums(g, d), jnp.zeros(1, jnp.float32)])
    new.append(p_k)
    ds.append(d)
    sums.append(leaf_sums)
  # Summed leaf by leaf, in order, as tree.vdot sums its parts.
  total = functools.reduce(jnp.add, sums, jnp.zeros(4, jnp.float32))
  return (jax.tree.unflatten(jax.tree.structure(params), new),
          tree.cosine_of(total[0], total[1], total[2]), Update(ds, total[3]))


def _finish_kernel(acc_ref, p_ref, x_ref, weight_ref, end_ref, acc_out, p_out):
  @pl.when(end_ref[0] != 0)
  def _():
    x = x_ref[...]

    @pl.when(weight_ref[0] != 0)
    def _():
      acc_out[...] = acc_ref[...] + weight_ref[...] * (x - p_ref[...])

    p_out[...] = x


def _finish_kernels(acc, p, x, weight, end, *, interpret: bool = False):
  """_finish_jnp_leaf's results from a Pallas kernel whose programs return at once in a lane
  whose client goes on: acc and p are aliased to its outputs, so unwritten blocks keep them."""
  n = p.size
  acc_new, p_new = _blocks(
      _finish_kernel, n, [None, None],
      [jax.ShapeDtypeStruct((n,), acc.dtype), jax.ShapeDtypeStruct((n,), p.dtype)],
      {0: 0, 1: 1}, interpret,
  )(acc.reshape(-1), p.reshape(-1), x.reshape(-1), _scalar(weight, acc.dtype),
    _scalar(end, jnp.int32))
  return acc_new.reshape(acc.shape), p_new.reshape(p.shape)


def _add(acc, d, ok, n):
  """The sum plus n d where ok: a client's update d, as round.py weighs it."""
  return acc + jnp.where(ok, n * d, 0.0)


def _finish_jnp_leaf(acc, p, x, weight, end):
  """What _finish_kernels computes, for its tests."""
  return jnp.where(end, _add(acc, x - p, weight != 0, weight), acc), jnp.where(end, x, p)


def finish(weighted_sum: Params, params: Params, server: Params, update: Update,
           n: jax.Array, h_finite: jax.Array, end: jax.Array) -> tuple[Params, Params, jax.Array]:
  """At a client's last step (`end`, so params = p_k): the lane's sum plus n d_k if d_k and h_i
  are finite (else unchanged: a client left out), and params reset to the server model x.
  Elsewhere both unchanged. Also returns whether the client was added."""
  def in_a_cond(s, p):
    def added(s, p):
      ok = update.finite() & h_finite
      # p = p_k here: a kernel's leaf (no d_k kept) has d_k = x - p.
      leaves = [_add(a, x - q if d is None else d, ok, n) for a, q, x, d in zip(
          jax.tree.leaves(s), jax.tree.leaves(p), jax.tree.leaves(server), update.d)]
      return jax.tree.unflatten(jax.tree.structure(s), leaves), server, ok

    # Unbatched (a CPU device's one lane) the cond passes over the model once a client; under
    # vmap it runs both sides and selects, at every step.
    return jax.lax.cond(end, added, lambda s, p: (s, p, jnp.bool_(False)), s, p)

  if not any(_takes(p) for p in jax.tree.leaves(params)):
    return in_a_cond(weighted_sum, params)

  def by_kernels(s, p, *, interpret: bool):
    ok = end & update.finite() & h_finite
    weight = jnp.where(ok, n, 0).astype(jnp.float32)

    def leaf(a, q, x, d):
      if d is None:
        return _finish_kernels(a, q, x, weight, end, interpret=interpret)
      return _add(a, d, ok, n), jnp.where(end, x, q)  # ok only where end

    outs = [leaf(*leaves) for leaves in zip(jax.tree.leaves(s), jax.tree.leaves(p),
                                             jax.tree.leaves(server), update.d)]
    treedef = jax.tree.structure(s)
    return (jax.tree.unflatten(treedef, [o[0] for o in outs]),
            jax.tree.unflatten(treedef, [o[1] for o in outs]), ok)

  return jax.lax.platform_dependent(
      weighted_sum, params, cuda=functools.partial(by_kernels, interpret=False),
      default=functools.partial(by_kernels, interpret=True) if INTERPRET else in_a_cond)
