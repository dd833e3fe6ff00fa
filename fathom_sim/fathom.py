"""FATHOM's hyper state and its update (steps 1, 5 and 6 of a round in spec/fathom.md).

In optax's shape: `hyper_tuner(...)` returns a pure `(init, update)` pair whose state is a
`HyperState` holding phi = (log E, log eta, log B), the hyper-optimizer state and the moving
average g of aggregated updates. FedAvg uses the same pair with `frozen=True`: phi stays put
while g and h_glob are still tracked as diagnostics.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fathom_sim import tree
from fathom_sim.types import ETA, HyperState, Params

HYPER_OPTIMIZERS = ('sgd', 'adam')


def hparams(log_hparams: jax.Array, upper: jax.Array) -> jax.Array:
  """(E, eta, B) = clip(exp(phi), max=upper): the real-valued hyperparameters of a round."""
  return jnp.minimum(jnp.exp(log_hparams), upper)


def batch_size_int(batch_size: float) -> int:
  """B_int = max(1, round(B)), a half rounded up as the reference does (int(B + 0.5)): B 2.5
  is 3 examples, where Python's round() would give 2.

  A B within WHOLE_TOLERANCE (relative; at most MAX_FORGIVEN) below a half counts as the half:
  a round's B is exp(log B) in float32, which put an initial B 3.5 at 3.4999998 (and 19.5 at
  19.499998, a third of all halves up to 300), one example short of what the config says.
  """
  b = np.float64(batch_size)
  up = np.floor(b + 0.5)
  if up + 1 - (b + 0.5) <= min(b * WHOLE_TOLERANCE, MAX_FORGIVEN):
    up += 1
  return max(1, int(up))


def integer_schedule(epochs: float, batch_size: float,
                     num_examples: np.ndarray) -> tuple[int, np.ndarray]:
  """B_int = max(1, round(B)) and K_i = max(1, ceil(E * n_i / B_int)) for each client.

  Host-side, from the float32 values the device used; see batch_size_int. E n_i / B_int
  within WHOLE_TOLERANCE (relative; at most MAX_FORGIVEN of a step) above a whole number
  counts as that number: E 0.2 is
  0.20000000298 in float32 (and E 0.7 times 10 is 7.000000000000001 in float64), which gave
  FedAvg with E 0.2, B 1 two steps on a client of 5 examples, where the spec says one.
  """
  b_int = batch_size_int(batch_size)
  work = np.float64(epochs) * np.asarray(num_examples, np.float64) / b_int
  whole = np.floor(work)
  # Only a fraction above a whole number is forgiven, and never more than MAX_FORGIVEN of a
  # step: past 2^10 steps the relative allowance would otherwise swallow real fractions.
  noise = (work > whole) & (work - whole <= np.minimum(work * WHOLE_TOLERANCE, MAX_FORGIVEN))
  return b_int, np.maximum(1, np.where(noise, whole, np.ceil(work))).astype(np.int64)


# Above float32's rounding of E (2^-24 relative) and the few ulps by which exp(phi) differs
# between backends; far below any change of E that FATHOM's hyper step makes.
WHOLE_TOLERANCE = 2.0**-20
MAX_FORGIVEN = 2.0**-10


class HyperTuner(NamedTuple):
  init: Callable[[Params, Sequence[float]], HyperState]
  update: Callable[[HyperState, Params, jax.Array], tuple[HyperState, jax.Array]]
  # For a round with no usable update: FATHOM halves the eta it used; a frozen tuner changes
  # nothing.
  rejected: Callable[[HyperState], HyperState]
  # (E, eta, B) of the round a state starts: clip(exp(phi)), or a frozen tuner's static values.
  values: Callable[[HyperState], jax.Array]


def hyper_tuner(*, alpha: float, eta_h: float, scales: Sequence[float],
                upper: Sequence[float], optimizer: str = 'sgd',
                clip_log_params: bool = False, frozen: bool = False,
                static: Sequence[float] | None = None) -> HyperTuner:
  """FATHOM's hyper update.

  Args:
    alpha: decay of the moving average g of aggregated updates.
    eta_h: learning rate of the hyper-optimizer.
    scales: (eta_h0, eta_h1, eta_h2), per-hyperparameter multipliers of the hypergradient.
    upper: upper bounds on (E, eta, B); used here only when `clip_log_params`.
    optimizer: 'sgd' (the paper's) or 'adam', applied to phi.
    clip_log_params: also clip phi itself to log(upper) (the reference does not).
    frozen: keep phi fixed (static FedAvg); h_glob and g are still computed.
    static: a frozen tuner's (E, eta, B), used as given. exp(log(x)) is not always x in
      float32: eta 0.1 came back 0.099999994, and E 50 as 50.000004, which made
      ceil(E n_i / B_int) one local step more than the spec's whenever E n_i / B_int is whole.
  """
  if optimizer == 'sgd':
    opt = optax.sgd(eta_h)
  elif optimizer == 'adam':
    opt = optax.adam(eta_h)
  else:
    raise ValueError(f'hyper_optimizer must be one of {HYPER_OPTIMIZERS}, got {optimizer!r}')
  scales = jnp.asarray(scales, jnp.float32)
  log_upper = jnp.log(jnp.asarray(upper, jnp.float32))

  def init(params: Params, initial: Sequence[float]) -> HyperState:
    phi = jnp.log(jnp.asarray(initial, jnp.float32))
    return HyperState(log_hparams=phi, opt_state=opt.init(phi), ema=tree.zeros_like(params))

  def update(state: HyperState, delta: Params,
             h_local: jax.Array) -> tuple[HyperState, jax.Array]:
    # h_glob compares this round's update with the average of the *previous* ones.
    h_glob = tree.cosine(state.ema, delta)
    ema = tree.axpy(alpha, state.ema, tree.scale(1.0 - alpha, delta))
    if frozen:
      return state._replace(ema=ema), h_glob
    # The descent direction on phi: ascend E with h_glob + h_local, eta with h_glob,
    # and descend B with h_local.
    hypergrad = -jnp.stack([h_glob + h_local, h_glob, -h_local]) * scales
    updates, opt_state = opt.update(hypergrad, state.opt_state, state.log_hparams)
    phi = optax.apply_updates(state.log_hparams, updates)
    if clip_log_params:
      phi = jnp.minimum(phi, log_upper)
    return HyperState(log_hparams=phi, opt_state=opt_state, ema=ema), h_glob

  def rejected(state: HyperState) -> HyperState:
    # Half the eta the round used: phi is unclipped, so halving phi's eta above its bound
    # would leave the clipped eta, and the next round's step, as they were.
    if frozen:
      return state
    used = jnp.minimum(state.log_hparams[ETA], log_upper[ETA])
    return state._replace(log_hparams=state.log_hparams.at[ETA].set(used - jnp.log(2.0)))

  upper_values = jnp.asarray(upper, jnp.float32)
  fixed = None if not frozen or static is None else jnp.asarray(static, jnp.float32)

  def values(state: HyperState) -> jax.Array:
    if fixed is not None:
      return jnp.broadcast_to(fixed, jnp.shape(state.log_hparams))
    return hparams(state.log_hparams, upper_values)

  return HyperTuner(init, update, rejected, values)
