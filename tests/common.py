"""Shared builders for tests: tiny configs and tasks, and running rounds without a workdir."""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys

import jax
import numpy as np

from fathom_sim.config import base_config
from fathom_sim.data.synthetic import synthetic_alpha_beta
from fathom_sim.driver import Rounds
from fathom_sim.run import build, init_state

from tests import reference


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
  """`code` run by a Python process of its own in the repository's root, on one CPU device
  (absl's flags, parsed there, would change the logging of the tests after it)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  return subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, timeout=timeout,
                        capture_output=True, text=True)


def uncreatable_path(tmp_path, name: str) -> str:
  """A folder path this process cannot create: under /proc for root (whom permissions do not
  stop), else under a read-only folder."""
  if os.geteuid() == 0:
    return f'/proc/fathom_sim_{name}'
  locked = tmp_path / 'locked'
  locked.mkdir(mode=0o500, exist_ok=True)
  return str(locked / name)


def tiny_config(**overrides):
  """A few small clients and a small MLP: rounds take milliseconds."""
  c = base_config()
  c.num_rounds = 3
  c.cohort_size = 5
  c.seed = 3
  c.eta = 0.05
  c.epochs = 1.5
  c.batch_size = 3.0
  c.model.hidden = (8,)
  c.data.num_clients = 12
  c.data.size_log_mean = 2.0
  c.data.size_log_sigma = 0.8
  c.data.min_examples = 3
  c.data.max_examples = 40
  for key, value in overrides.items():
    node = c
    *path, leaf = key.split('.')
    for part in path:
      node = node[part]
    node[leaf] = value
  return c


@functools.lru_cache(maxsize=None)
def tiny_task(num_clients: int = 12, seed: int = 0):
  return synthetic_alpha_beta(num_clients=num_clients, size_log_mean=2.0, size_log_sigma=0.8,
                              min_examples=3, max_examples=40, seed=seed)


def run_rounds(config, task, num_rounds: int, *, planner_overrides: dict | None = None):
  """Runs rounds 1..num_rounds through the engine; returns (final state, per-round metrics)."""
  run = build(config, task)
  state = init_state(run)
  rounds = Rounds(run)
  for key, value in (planner_overrides or {}).items():
    setattr(rounds.planner, key, value)
  hp = rounds.initial_hparams(state)
  history = []
  for t in range(1, num_rounds + 1):
    state, m, plan = rounds(state, t, hp)
    hp = np.asarray(m.next_hparams)
    history.append((m, plan))
  return jax.device_get(state), history, rounds


def reference_rounds(config, task, num_rounds: int, leave_out: tuple = ()):
  """The same rounds through tests/reference.py, from the same initial state; the clients of
  `leave_out` (ids) left out of each cohort, as the engine leaves out a non-finite one."""
  run = build(config, task)
  state = jax.device_get(init_state(run))
  params = state.params
  # phi and the bounds from the config's fields, not from the engine's state: a mistake in how
  # the engine orders or reads them must show here.
  static = (config.epochs, config.eta, config.batch_size)
  phi = np.log(np.asarray(static, np.float64))
  np.testing.assert_allclose(state.hyper.log_hparams, phi, rtol=1e-6, atol=1e-7)
  upper = ((math.inf,) * 3 if config.algorithm == 'fedavg' else
           (config.upper_epochs, config.upper_eta, config.upper_batch_size))
  ema = jax.tree.map(np.zeros_like, params)
  from fathom_sim.data.sampling import sample_cohort
  out = []
  server_step = reference.ServerStep(
      config.server_optimizer, config.server_lr, momentum=config.server_momentum,
      b1=config.server_b1, b2=config.server_b2, eps=config.server_eps)
  for t in range(1, num_rounds + 1):
    cohort = [c for c in sample_cohort(task.train, config.seed, t, config.cohort_size)
              if int(c) not in leave_out]
    r = reference.reference_round(
        run.model.loss, params, phi, ema, task.train, cohort, seed=config.seed, round_index=t,
        upper=upper, alpha=config.alpha, eta_h=config.eta_h,
        scales=(config.eta_h0, config.eta_h1, config.eta_h2),
        frozen=config.algorithm == 'fedavg', static=static, server_step=server_step)
    params, phi, ema = r['params'], r['phi'], r['ema']
    out.append(r)
  return out


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                               rtol=rtol, atol=atol)


def jaxpr_eqns(jaxpr):
  """Every equation of a jaxpr, those of the jaxprs nested in it (loops, jits, custom rules)
  too."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, 'jaxpr', sub)
        if hasattr(sub, 'eqns'):
          yield from jaxpr_eqns(sub)
