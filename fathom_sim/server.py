"""The server optimizer: the aggregated client update Delta is its gradient (step 4 of a round)."""

from __future__ import annotations

import optax

from fathom_sim.types import Params

SERVER_OPTIMIZERS = ('sgd', 'momentum', 'adam', 'yogi', 'adagrad')


def server_optimizer(name: str, learning_rate: float, *, momentum: float = 0.9,
                     b1: float = 0.9, b2: float = 0.99,
                     eps: float = 1e-3) -> optax.GradientTransformation:
  """An optax optimizer by name. SGD with learning rate 1.0 is plain FedAvg: x <- x - Delta."""
  if name == 'sgd':
    return optax.sgd(learning_rate)
  if name == 'momentum':
    return optax.sgd(learning_rate, momentum=momentum)
  if name == 'adam':
    return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
  if name == 'yogi':
    return optax.yogi(learning_rate, b1=b1, b2=b2, eps=eps)
  if name == 'adagrad':
    return optax.adagrad(learning_rate, eps=eps)
  raise ValueError(f'server_optimizer must be one of {SERVER_OPTIMIZERS}, got {name!r}')


def apply(opt: optax.GradientTransformation, params: Params, opt_state,
          delta: Params) -> tuple[Params, object]:
  updates, opt_state = opt.update(delta, opt_state, params)
  return optax.apply_updates(params, updates), opt_state
