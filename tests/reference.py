"""An independent, slow reference of one FedAvg / FATHOM round, straight from spec/fathom.md.

Plain Python loops over clients and local steps; every batch has exactly B_int rows (no padding,
no lanes, no vmap, scan or shard_map); norms and cosines in float64 numpy. Only the model's
loss function and the shuffle recipe (a stateless numpy generator per (seed, round, client))
are shared with the engine.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def _cos(a: np.ndarray, b: np.ndarray) -> float:
  na, nb = np.linalg.norm(a), np.linalg.norm(b)
  return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))


def _dropout_key(seed: int, round_index: int, client: int, step: int):
  key = jax.random.PRNGKey(seed)
  for value in (round_index, 1, client, step):  # 1: the training stream
    key = jax.random.fold_in(key, value)
  return key


@functools.lru_cache(maxsize=16)
def _value_and_grad(loss_fn):
  """One jitted value-and-gradient per loss function: a new one per client traced and
  compiled (or loaded) the model's step again for each (docs/benchmarks.md, "Thirty-sixth
  session")."""
  return jax.jit(jax.value_and_grad(loss_fn))


def local_train(loss_fn, params, examples: dict, *, epochs: float, eta: float, b_int: int,
                seed: int, round_index: int, client: int) -> dict:
  """One client's local SGD; returns its delta, h_i, K_i, the cosines c_k and the mean of its
  step losses (each at p_{k-1} on batch_k, the loss g_k is the gradient of)."""
  n = len(examples['y'])
  # ceil(E n / B_int) of the real numbers E and n / B_int stand for: float rounding may put
  # the product of a whole one just above it (E 0.2 is 0.20000000298 in float32), and within
  # 2^-20 (relative, at most 2^-10 of a step) it is that whole number, as
  # fathom.integer_schedule reads the spec.
  work = float(np.float64(epochs) * n / b_int)
  whole = math.floor(work)
  noise = 0 < work - whole <= min(work * 2.0**-20, 2.0**-10)
  k_steps = max(1, whole if noise else math.ceil(work))
  shuffler = np.random.default_rng([seed, round_index, client])
  order = []
  while len(order) < k_steps * b_int:  # shuffled and repeated, a new permutation per pass
    order.extend(shuffler.permutation(n).tolist())
  grad = _value_and_grad(loss_fn)
  p = params
  cosines, losses = [], []
  for k in range(k_steps):
    idx = np.asarray(order[k * b_int:(k + 1) * b_int])
    batch = {name: a[idx] for name, a in examples.items()}
    loss, g = grad(p, batch, jnp.ones(b_int, bool), _dropout_key(seed, round_index, client, k))
    losses.append(float(loss))
    p = jax.tree.map(lambda w, gw: w - eta * gw, p, g)
    d = _flat(params) - _flat(p)
    cosines.append(_cos(_flat(g), d))
  delta = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                       params, p)
  return {'delta': delta, 'h': min(cosines), 'k': k_steps, 'cosines': cosines,
          'loss': float(np.mean(losses))}


class ServerStep:
  """The server optimizers' steps with Delta as the gradient, written from optax's documented
  update rules (what fathom_sim/server.py names), in float64, carrying their state across
  rounds: x <- x - lr * u, with u per optimizer."""

  def __init__(self, name: str, lr: float, *, momentum: float, b1: float, b2: float,
               eps: float):
    self.name, self.lr, self.mu, self.b1, self.b2, self.eps = name, lr, momentum, b1, b2, eps
    self.t, self.m, self.v = 0, None, None

  def __call__(self, params, delta):
    x, g = _flat(params), _flat(delta)
    self.t += 1
    if self.m is None:  # optax's initial accumulators
      start = {'yogi': (1e-6, 1e-6), 'adagrad': (0.0, 0.1)}.get(self.name, (0.0, 0.0))
      self.m, self.v = np.full_like(x, start[0]), np.full_like(x, start[1])
    if self.name == 'sgd':
      u = g
    elif self.name == 'momentum':  # a trace, not an average: m = g + mu m
      self.m = g + self.mu * self.m
      u = self.m
    elif self.name in ('adam', 'yogi'):
      self.m = self.b1 * self.m + (1 - self.b1) * g
      if self.name == 'adam':
        self.v = self.b2 * self.v + (1 - self.b2) * g * g
      else:  # Yogi: v moves towards g^2 by (1 - b2) g^2, whichever side it is on
        self.v = self.v - (1 - self.b2) * np.sign(self.v - g * g) * g * g
      m_hat, v_hat = self.m / (1 - self.b1 ** self.t), self.v / (1 - self.b2 ** self.t)
      u = m_hat / (np.sqrt(v_hat) + self.eps)
    elif self.name == 'adagrad':
      self.v = self.v + g * g
      u = g / np.sqrt(self.v + self.eps)
    else:
      raise ValueError(self.name)
    flat = x - self.lr * u
    out, i = [], 0
    for leaf in jax.tree.leaves(params):
      out.append(flat[i:i + np.size(leaf)].reshape(np.shape(leaf)))
      i += np.size(leaf)
    return jax.tree.unflatten(jax.tree.structure(params), out)


def reference_round(loss_fn, params, phi: np.ndarray, ema, dataset, clients, *, seed: int,
                    round_index: int, upper, alpha: float, eta_h: float, scales,
                    frozen: bool = False, static=None, server_lr: float = 1.0,
                    server_step: ServerStep | None = None) -> dict:
  """One round: local training, n_i-weighted aggregation, server step (SGD at server_lr, or
  `server_step`), hyper update."""
  # FedAvg uses its static values as the config gives them; FATHOM clip(exp(phi)).
  hp = (np.asarray(static, np.float64) if frozen else
        np.minimum(np.exp(np.asarray(phi, np.float64)), np.asarray(upper, np.float64)))
  epochs, eta, batch = (float(v) for v in hp)
  b_int = max(1, int(batch + 0.5))  # the reference's rounding: a half goes up
  results, weights = [], []
  for c in clients:
    examples = dataset.client(int(c))
    results.append(local_train(loss_fn, params, examples, epochs=epochs, eta=eta, b_int=b_int,
                               seed=seed, round_index=round_index, client=int(c)))
    weights.append(float(len(examples['y'])))
  w = np.asarray(weights) / np.sum(weights)
  delta = jax.tree.map(lambda *ds: sum(wi * d for wi, d in zip(w, ds)),
                       *[r['delta'] for r in results])
  h_local = float(np.dot(w, [r['h'] for r in results]))
  train_loss = float(np.dot(w, [r['loss'] for r in results]))  # weighted by n_i, as Delta
  new_params = (server_step(params, delta) if server_step is not None else
                jax.tree.map(lambda x, d: np.asarray(x, np.float64) - server_lr * d,
                             params, delta))
  h_glob = _cos(_flat(ema), _flat(delta))
  new_ema = jax.tree.map(lambda g, d: alpha * np.asarray(g, np.float64) + (1 - alpha) * d,
                         ema, delta)
  step = np.array([h_glob + h_local, h_glob, -h_local]) * np.asarray(scales, np.float64)
  new_phi = np.asarray(phi, np.float64) + (0.0 if frozen else eta_h) * step
  return {'params': new_params, 'phi': new_phi, 'ema': new_ema, 'h_glob': h_glob,
          'h_local': h_local, 'client_h': [r['h'] for r in results],
          'train_loss': train_loss, 'client_loss': [r['loss'] for r in results],
          'num_steps': [r['k'] for r in results], 'hparams': hp, 'b_int': b_int,
          'delta': delta}
