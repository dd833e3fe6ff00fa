"""One federated round as one jitted, donating function: the only place that wires client
training, aggregation, the server update and the FATHOM hyper update together.

Read `round_step` top to bottom next to spec/fathom.md's "One round, exactly".
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from fathom_sim import fathom, rng, server, tree
from fathom_sim.client import LossFn
from fathom_sim.cohort import make_cohort_train
from fathom_sim.mesh import replicated
from fathom_sim.types import ETA, Batch, CohortTable, RoundMetrics, ServerState

# round(state, table, slots, stream, source, batch_size, batch_pad=...) -> (state, metrics)
RoundFn = Callable[..., tuple[ServerState, RoundMetrics]]


def make_round(*, loss_fn: LossFn, server_opt: optax.GradientTransformation,
               tuner: fathom.HyperTuner, upper: tuple[float, float, float], mesh: Mesh,
               source_per_lane: bool, vectorized: bool = False) -> RoundFn:
  """Builds the jitted round; `state` is donated.

  `batch_size` is B_int as an int32 value, so B moving within a padded size does not
  recompile; `batch_pad` and the arrays' shapes select the compiled program.
  vectorized: every argument but a shared (device-resident) source has a leading seed axis,
  and the round runs for all seeds at once (vmap): S runs, one program.
  """
  upper = jnp.asarray(upper, jnp.float32)

  def round_step(state: ServerState, table: CohortTable, slots: jax.Array, stream: jax.Array,
                 source: Batch, batch_size: jax.Array, *,
                 batch_pad: int) -> tuple[ServerState, RoundMetrics]:
    t = state.round + 1
    cohort_train = make_cohort_train(loss_fn, mesh, batch_pad=batch_pad,
                                     source_per_lane=source_per_lane)

    # 1. Broadcast: (E, eta, B) = clip(exp(phi)); E and B_int already shaped the plan on the host.
    hp = fathom.hparams(state.hyper.log_hparams, upper)

    # 2. Local training of every client, lanes sharded over the clients axis.
    out = cohort_train(state.params, hp[ETA], batch_size, rng.round_key(state.rng, t, rng.TRAIN),
                       table, slots, stream, source)
    n = table.num_examples[:-1]  # drop the sentinel
    finite = out.finite > 0
    client_loss = out.loss / jnp.maximum(table.num_steps[:-1], 1)

    # 3. Aggregate, weighting by n_i; clients with a non-finite update are left out.
    w = jnp.where(finite, n, 0.0)
    total = w.sum()
    accepted = total > 0
    safe_total = jnp.where(accepted, total, 1.0)
    delta = tree.scale(1.0 / safe_total, out.weighted_sum)
    h_local = jnp.where(finite, out.h, 0.0) @ w / safe_total
    train_loss = jnp.where(finite, client_loss, 0.0) @ w / safe_total

    # 4. Server model update: Delta is the server optimizer's gradient.
    params, opt_state = server.apply(server_opt, state.params, state.opt_state, delta)

    # 5-6. Global hypergradient and hyper update of phi.
    hyper, h_glob = tuner.update(state.hyper, delta, h_local)

    # Never keep non-finite params: a round with no finite client update, or whose server
    # step is not finite, leaves the model as it was (and FATHOM halves eta).
    accepted = accepted & tree.all_finite(params)
    params, opt_state, hyper = tree.select(
        accepted, (params, opt_state, hyper),
        (state.params, state.opt_state, tuner.rejected(state.hyper)))
    new_state = ServerState(params=params, opt_state=opt_state, hyper=hyper, round=t,
                            rng=state.rng)
    metrics = RoundMetrics(
        hparams=hp, next_hparams=fathom.hparams(hyper.log_hparams, upper),
        h_glob=jnp.where(accepted, h_glob, 0.0), h_local=h_local, train_loss=train_loss,
        accepted=accepted, dropped_clients=jnp.sum(~finite & (n > 0)).astype(jnp.int32),
        client_h=jnp.where(finite, out.h, jnp.nan), client_loss=client_loss,
        client_finite=finite)
    return new_state, metrics

  def seeds_step(state, table, slots, stream, source, batch_size, *, batch_pad):
    one_seed = functools.partial(round_step, batch_pad=batch_pad)
    return jax.vmap(one_seed, in_axes=(0, 0, 0, 0, 0 if source_per_lane else None, 0))(
        state, table, slots, stream, source, batch_size)

  everywhere = replicated(mesh)
  return jax.jit(seeds_step if vectorized else round_step, donate_argnums=0, static_argnames=('batch_pad',),
                 out_shardings=(everywhere, everywhere))
