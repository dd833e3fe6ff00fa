"""Local training of one lane: the local SGD steps of its clients, one after another (step 2).

For each real step k of a client that starts from the server model x = p_0:
  g_k = grad loss(p_{k-1}; batch_k),  p_k = p_{k-1} - eta g_k,  d_k = p_0 - p_k,
  c_k = cos(g_k, d_k),  h_i = min over the client's steps of c_k.
At the client's last step its update Delta_i = d_K is added, weighted by n_i, to the lane's sum
(unless it or h_i is non-finite) and the lane restarts from x for its next client. Steps past the
lane's last client are padding: they change nothing.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from fathom_sim import lane_update, tree
from fathom_sim.types import Batch, CohortTable, Params

# loss_fn(params, batch, example_mask, rng) -> mean loss over the masked-in examples.
LossFn = Callable[[Params, Batch, jax.Array, jax.Array], jax.Array]


class LaneResult(NamedTuple):
  """One lane's contribution. Per-client arrays are [C], neutral on other lanes' slots."""
  weighted_sum: Params   # sum over the lane's clients of n_i Delta_i (finite ones only)
  h: jax.Array           # min_k c_k per client (+inf elsewhere)
  loss: jax.Array        # sum of the client's step losses (0 elsewhere)
  finite: jax.Array      # int32: 1 if the client's update was finite (0 elsewhere)


def step_key(round_key: jax.Array, client: jax.Array, step: jax.Array) -> jax.Array:
  """The dropout key of one local step: a function of round, client and step alone."""
  return jax.random.fold_in(jax.random.fold_in(round_key, client), step)


def _keep_rows(a: jax.Array, keep: jax.Array) -> jax.Array:
  """`a` with the rows where `keep` is False set to zero."""
  return jnp.where(keep.reshape(keep.shape + (1,) * (a.ndim - 1)), a, jnp.zeros((), a.dtype))


def lane_init(server_params: Params, cohort_size: int) -> tuple:
  """A lane's loop state before its first step."""
  zero = jnp.int32(0)
  return (zero, zero, zero, server_params, tree.zeros_like(server_params),
          jnp.full(cohort_size, jnp.inf, jnp.float32), jnp.zeros(cohort_size, jnp.float32),
          jnp.zeros(cohort_size, jnp.int32))


def lane_step(loss_fn: LossFn, carry: tuple, server_params: Params, eta: jax.Array,
              batch_size: jax.Array, round_key: jax.Array, table: CohortTable,
              slots: jax.Array, stream: jax.Array, source: Batch, *, batch_pad: int) -> tuple:
  """One local step of a lane: a pure function of the loop state, so that the loop may run on
  the device (lane_train) or be driven from the host one step at a time (cohort.py)."""
  grad_fn = jax.value_and_grad(loss_fn)
  cohort_size = slots.shape[0]
  # Every real step uses exactly batch_size examples; rows past it are padding.
  example_mask = jnp.arange(batch_pad) < batch_size
  it, j, k, params, weighted_sum, h, loss_sum, finite_any = carry
  slot = slots[jnp.minimum(j, cohort_size - 1)]
  slot = jnp.where(j < cohort_size, slot, cohort_size)  # past the lane's last client
  real = slot < cohort_size
  rows = jax.lax.dynamic_slice(stream, (it * batch_size,), (batch_pad,))
  # Padding rows hold real examples (the next batch's, another client's, or row 0): zeroed,
  # since a mask applied to the loss still backpropagates 0 * x, NaN for an x of inf or NaN,
  # into the params of a client that never uses that example.
  batch = jax.tree.map(lambda a: _keep_rows(a[rows], example_mask), source)
  loss, grad = grad_fn(params, batch, example_mask, step_key(round_key, table.client[slot], k))
  # p_k = p - eta g_k (a padding step keeps p), c_k = cos(g_k, d_k) with d_k = x - p_k.
  params, cos, update = lane_update.step(params, grad, server_params, eta, real)
  # |g|^2 or <g, d> can overflow float32 while the update stays finite: c_k is then NaN
  # (tree.cosine_of). It becomes -inf, which every backend's min keeps, so h_i is -inf and the
  # client is left out below.
  cos = jnp.where(jnp.isnan(cos), -jnp.inf, cos)
  end = real & (k == table.num_steps[slot] - 1)
  h = h.at[slot].min(jnp.where(real, cos, jnp.inf), mode='drop')
  loss_sum = loss_sum.at[slot].add(jnp.where(real, loss, 0.0), mode='drop')
  # A client counts only with a finite update and a finite h_i (one -inf h_i would make
  # h_local, then phi, non-finite). The lane then starts its next client from the server model.
  weighted_sum, params, added = lane_update.finish(
      weighted_sum, params, server_params, update, table.num_examples[slot],
      jnp.isfinite(h[jnp.minimum(slot, cohort_size - 1)]), end)
  finite_any = finite_any.at[slot].max(added.astype(jnp.int32), mode='drop')
  j = j + end.astype(j.dtype)
  k = jnp.where(end, 0, k + 1)
  return it + 1, j, k, params, weighted_sum, h, loss_sum, finite_any


def lane_result(carry: tuple) -> LaneResult:
  return LaneResult(*carry[4:])


def lane_train(loss_fn: LossFn, server_params: Params, eta: jax.Array, batch_size: jax.Array,
               round_key: jax.Array, table: CohortTable, num_iterations: jax.Array,
               slots: jax.Array, stream: jax.Array, source: Batch,
               *, batch_pad: int, chunk: int = 1) -> LaneResult:
  """Runs one lane's steps in a while loop until `num_iterations` (at least its real ones) have
  run, checking that bound every `chunk` steps: up to chunk - 1 padding steps run past it.

  Why chunks: a bound read from data gives XLA:GPU a loop of unknown trip count, whose predicate
  it reads back to the host at every iteration; an inner loop of `chunk` steps has a known trip
  count and runs without that round trip.
  """
  def step(carry):
    return lane_step(loss_fn, carry, server_params, eta, batch_size, round_key, table, slots,
                     stream, source, batch_pad=batch_pad)

  def body(carry):
    if chunk == 1:
      return step(carry)
    return jax.lax.fori_loop(0, chunk, lambda _, c: step(c), carry)

  out = jax.lax.while_loop(lambda c: c[0] < num_iterations, body,
                           lane_init(server_params, slots.shape[0]))
  return lane_result(out)
