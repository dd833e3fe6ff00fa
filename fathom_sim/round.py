"""One federated round: the only place that wires client training, aggregation, the server
update and the FATHOM hyper update together.

Read `round_step` top to bottom next to spec/fathom.md's "One round, exactly". Its local
training runs as a loop on the devices (local_loop='device': the whole round is one jitted,
donating program) or as one jitted cohort-wide step per local step, driven by the host
(local_loop='host': XLA:CPU runs convolutions far slower inside a loop body than as programs
of their own; see docs/benchmarks.md). Both compute the same thing.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fathom_sim import fathom, rng, server, tree
from fathom_sim.client import LaneResult, LossFn
from fathom_sim.cohort import make_cohort_steps, make_cohort_train
from fathom_sim.mesh import CLIENTS, replicated
from fathom_sim.types import ETA, Batch, CohortTable, RoundMetrics, ServerState

# round(state, table, slots, stream, source, batch_size, batch_pad=..., num_iterations=...)
#   -> (state, metrics)
RoundFn = Callable[..., tuple[ServerState, RoundMetrics]]
LOCAL_LOOPS = ('device', 'host')


def make_round(*, loss_fn: LossFn, server_opt: optax.GradientTransformation,
               tuner: fathom.HyperTuner, mesh: Mesh,
               source_per_device: bool, vectorized: bool = False,
               local_loop: str = 'device', loop_chunk: int = 1) -> RoundFn:
  """Builds the round; `state` is donated.

  `batch_size` is B_int as an int32 value, so B moving within a padded size does not
  recompile; `batch_pad` and the arrays' shapes select the compiled program. `num_iterations`
  (the longest lane's real steps, known to the host) bounds the host-driven loop; the device
  loop finds its own bound per device and checks it every `loop_chunk` steps.
  vectorized: every argument but a shared (device-resident) source has a leading seed axis,
  and the round runs for all seeds at once (vmap): S runs, one program.
  """
  if local_loop not in LOCAL_LOOPS:
    raise ValueError(f'local_loop must be one of {LOCAL_LOOPS}, got {local_loop!r}')
  if loop_chunk < 1:
    raise ValueError(f'loop_chunk must be at least 1, got {loop_chunk!r}')

  def round_step(state: ServerState, table: CohortTable, slots: jax.Array, stream: jax.Array,
                 source: Batch, batch_size: jax.Array, *,
                 batch_pad: int) -> tuple[ServerState, RoundMetrics]:
    cohort_train = make_cohort_train(loss_fn, mesh, batch_pad=batch_pad,
                                     source_per_device=source_per_device, chunk=loop_chunk)
    # 1. Broadcast: (E, eta, B) = clip(exp(phi)); E and B_int already shaped the plan on the host.
    hp, round_key = broadcast(state)
    # 2. Local training of every client, lanes sharded over the clients axis.
    out = cohort_train(state.params, hp[ETA], batch_size, round_key, table, slots, stream,
                       source)
    # 3-6. Aggregation, server update, hypergradients and the hyper update.
    return aggregate_and_update(state, hp, out, table)

  def broadcast(state: ServerState) -> tuple[jax.Array, jax.Array]:
    return tuner.values(state.hyper), rng.round_key(state.rng, state.round + 1, rng.TRAIN)

  def aggregate_and_update(state: ServerState, hp: jax.Array, out: LaneResult,
                           table: CohortTable) -> tuple[ServerState, RoundMetrics]:
    n = table.num_examples[:-1]  # drop the sentinel
    finite = out.finite > 0  # a finite update and a finite h_i (client.lane_step)
    client_loss = out.loss / jnp.maximum(table.num_steps[:-1], 1)

    # 3. Aggregate, weighting by n_i; clients with a non-finite update or h_i are left out.
    w = jnp.where(finite, n, 0.0)
    total = w.sum()
    counted = total > 0
    safe_total = jnp.where(counted, total, 1.0)
    delta = tree.scale(1.0 / safe_total, out.weighted_sum)
    h_local = jnp.where(finite, out.h, 0.0) @ w / safe_total
    train_loss = jnp.where(finite, client_loss, 0.0) @ w / safe_total

    # 4. Server model update: Delta is the server optimizer's gradient.
    params, opt_state = server.apply(server_opt, state.params, state.opt_state, delta)

    # 5-6. Global hypergradient and hyper update of phi.
    hyper, h_glob = tuner.update(state.hyper, delta, h_local)

    # Never keep a non-finite state: a round with no finite client update, or whose server or
    # hyper step is not finite (params, phi, g, or an optimizer's moments: Adam's second
    # moment overflows where Delta^2 does while its step stays finite), leaves the model as it
    # was (and FATHOM halves eta).
    accepted = counted & tree.all_finite((params, opt_state, hyper))
    params, opt_state, hyper = tree.select(
        accepted, (params, opt_state, hyper),
        (state.params, state.opt_state, tuner.rejected(state.hyper)))
    new_state = ServerState(params=params, opt_state=opt_state, hyper=hyper,
                            round=state.round + 1, rng=state.rng)
    # With no client counted there is no h_local or training loss to report (0 would read as
    # a perfect loss): NaN, written as null.
    metrics = RoundMetrics(
        hparams=hp, next_hparams=tuner.values(hyper),
        h_glob=jnp.where(accepted, h_glob, 0.0), h_local=jnp.where(counted, h_local, jnp.nan),
        train_loss=jnp.where(counted, train_loss, jnp.nan),
        accepted=accepted, dropped_clients=jnp.sum(~finite & (n > 0)).astype(jnp.int32),
        client_h=jnp.where(finite, out.h, jnp.nan), client_loss=client_loss,
        client_finite=finite)
    return new_state, metrics

  everywhere = replicated(mesh)
  source_axis = 0 if source_per_device else None

  def seeds(f, in_axes):
    """f over a leading seed axis of its arguments (those with in_axes 0)."""
    return jax.vmap(f, in_axes=in_axes) if vectorized else f

  if local_loop == 'device':
    def device_round(state, table, slots, stream, source, batch_size, *, batch_pad,
                     num_iterations=None):
      del num_iterations  # each device's loop runs to its own longest lane
      one_seed = functools.partial(round_step, batch_pad=batch_pad)
      return seeds(one_seed, (0, 0, 0, 0, source_axis, 0))(
          state, table, slots, stream, source, batch_size)

    return jax.jit(device_round, donate_argnums=0,
                   static_argnames=('batch_pad', 'num_iterations'),
                   out_shardings=(everywhere, everywhere))

  return _HostDrivenRound(broadcast, aggregate_and_update, loss_fn, mesh, source_per_device,
                          seeds, vectorized)


class _HostDrivenRound:
  """round_step with its local-training loop on the host: broadcast, then `num_iterations`
  calls of one jitted cohort-wide local step (its carry donated), then aggregate_and_update."""

  def __init__(self, broadcast, aggregate_and_update, loss_fn, mesh, source_per_device, seeds,
               vectorized):
    everywhere = replicated(mesh)
    lanes = NamedSharding(mesh, P(None, CLIENTS) if vectorized else P(CLIENTS))
    source_axis = 0 if source_per_device else None
    # Named functions: compile logs and profiles name the four programs.
    def round_finish(state, hp, carry, table, steps):
      return aggregate_and_update(state, hp, steps.result(carry), table)

    def round_start(params, slots, steps):
      return seeds(steps.init, (0, 0))(params, slots)

    def local_step(carry, params, eta, b, key, table, slots, stream, source, steps):
      return seeds(steps.step, (0, 0, 0, 0, 0, 0, 0, 0, source_axis))(
          carry, params, eta, b, key, table, slots, stream, source)

    self._broadcast = jax.jit(seeds(broadcast, (0,)), out_shardings=everywhere)
    self._finish = jax.jit(seeds(round_finish, (0, 0, 0, 0, None)), donate_argnums=0,
                           static_argnums=4, out_shardings=(everywhere, everywhere))
    self._steps = functools.lru_cache(maxsize=None)(
        lambda batch_pad: make_cohort_steps(loss_fn, mesh, batch_pad=batch_pad,
                                            source_per_device=source_per_device))
    self._init = jax.jit(round_start, static_argnums=2, out_shardings=lanes)
    self._step = jax.jit(local_step, donate_argnums=0, static_argnums=9, out_shardings=lanes)

  def __call__(self, state, table, slots, stream, source, batch_size, *, batch_pad,
               num_iterations):
    steps = self._steps(batch_pad)
    hp, round_key = self._broadcast(state)
    eta = hp[..., ETA]
    carry = self._init(state.params, slots, steps)
    for _ in range(num_iterations):
      carry = self._step(carry, state.params, eta, batch_size, round_key, table, slots, stream,
                         source, steps)
    return self._finish(state, hp, carry, table, steps)

  def _cache_size(self) -> int:
    """Programs compiled for the round so far: the broadcast, and the start, local step and
    finish of each padded batch size."""
    return sum(f._cache_size() for f in (self._broadcast, self._init, self._step, self._finish))
