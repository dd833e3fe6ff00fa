"""train_and_evaluate(config, workdir): set up, run the rounds, evaluate, write the outputs.

The host only samples cohorts, plans them, feeds the devices and logs; each round's
computation is the one jitted function of round.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from fathom_sim import fathom, metrics, models, rng, server
from fathom_sim.config import ConfigError, check_config
from fathom_sim.data import Task, load_task
from fathom_sim.data.federated import ArrayClientDataset, sample_clients, sample_cohort
from fathom_sim.data.plan import Planner
from fathom_sim.evaluation import make_evaluator
from fathom_sim.mesh import by_client, make_mesh, replicated
from fathom_sim.round import make_round
from fathom_sim.types import BATCH, EPOCHS, ETA, CohortPlan, RoundMetrics, ServerState

RESIDENT_BYTES = 1 << 30  # 'auto' keeps a training set on the devices up to this size


class WorkdirError(ValueError):
  """The workdir cannot be used; nothing in it was changed."""


@dataclasses.dataclass
class Run:
  """Everything built from a config before the first round."""
  config: ml_collections.ConfigDict
  task: Task
  mesh: jax.sharding.Mesh
  model: models.Model
  server_opt: object
  tuner: fathom.HyperTuner
  upper: tuple[float, float, float]
  resident: bool
  lanes_per_device: int


def hyper_setup(config) -> tuple[fathom.HyperTuner, tuple[float, float, float]]:
  """FATHOM's tuner and bounds; FedAvg freezes phi and applies no bounds to its static values."""
  if config.algorithm == 'fedavg':
    upper = (math.inf, math.inf, math.inf)
  else:
    upper = (config.upper_epochs, config.upper_eta, config.upper_batch_size)
  tuner = fathom.hyper_tuner(
      alpha=config.alpha, eta_h=config.eta_h,
      scales=(config.eta_h0, config.eta_h1, config.eta_h2), upper=upper,
      optimizer=config.hyper_optimizer, clip_log_params=config.clip_log_params,
      frozen=config.algorithm == 'fedavg')
  return tuner, upper


def build(config: ml_collections.ConfigDict, task: Task | None = None) -> Run:
  """Checks the config against itself, the data and the devices; builds the run's parts."""
  check_config(config)
  task = task if task is not None else load_task(config.data)
  eligible = int(np.sum(np.asarray(task.train.num_examples) > 0))
  if config.cohort_size > eligible:
    raise ConfigError(f'config.cohort_size must be at most the number of training clients '
                      f'with data ({eligible}), got {config.cohort_size}')
  if config.num_devices > len(jax.devices()):
    raise ConfigError(f'config.num_devices must be at most the {len(jax.devices())} devices '
                      f'present (0 = all), got {config.num_devices}')
  mesh = make_mesh(config.num_devices)
  n_dev = mesh.devices.size
  model = models.get_model(config.model.name, num_classes=task.num_classes,
                           hidden=config.model.hidden)
  server_opt = server.server_optimizer(
      config.server_optimizer, config.server_lr, momentum=config.server_momentum,
      b1=config.server_b1, b2=config.server_b2, eps=config.server_eps)
  tuner, upper = hyper_setup(config)

  in_memory = isinstance(task.train, ArrayClientDataset)
  if config.data_on_device == 'yes' and not in_memory:
    raise ConfigError("config.data_on_device='yes' needs an in-memory training set; "
                      f'{task.name} is read client by client, use auto or no')
  size = sum(a.nbytes for a in task.train.features.values()) if in_memory else math.inf
  resident = in_memory and (config.data_on_device == 'yes' or (
      config.data_on_device == 'auto' and size <= RESIDENT_BYTES))
  lanes = config.lanes_per_device or (
      1 if mesh.devices.flat[0].platform == 'cpu' else -(-config.cohort_size // n_dev))
  return Run(config, task, mesh, model, server_opt, tuner, upper, resident, lanes)


def init_state(run: Run) -> ServerState:
  """Round 0: fresh model from the seed, optimizer states, phi = log of the initial values."""
  c = run.config
  first = int(np.flatnonzero(np.asarray(run.task.train.num_examples) > 0)[0])
  sample = {k: v[:1] for k, v in run.task.train.client(first).items()}
  params = run.model.init(jax.random.fold_in(rng.base_key(c.seed), 0x1417), sample)
  state = ServerState(params=params, opt_state=run.server_opt.init(params),
                      hyper=run.tuner.init(params, (c.epochs, c.eta, c.batch_size)),
                      round=jnp.int32(0), rng=rng.base_key(c.seed))
  return jax.device_put(state, replicated(run.mesh))


class Rounds:
  """Runs round t on the devices: samples and plans the cohort, feeds it, steps the state."""

  def __init__(self, run: Run):
    c, mesh = run.config, run.mesh
    self.run = run
    self.num_devices = mesh.devices.size
    self.round_fn = make_round(loss_fn=run.model.loss, server_opt=run.server_opt,
                               tuner=run.tuner, upper=run.upper, mesh=mesh,
                               source_per_lane=not run.resident)
    self.planner = Planner(run.task.train, c.cohort_size, self.num_devices * run.lanes_per_device,
                           c.seed, resident=run.resident, batch_per_octave=c.batch_pad_per_octave)
    self._resident = (jax.device_put(run.task.train.features, replicated(mesh))
                      if run.resident else None)

  def initial_hparams(self, state: ServerState) -> np.ndarray:
    """(E, eta, B) of the next round, read from the state (once, at start or resume)."""
    upper = jnp.asarray(self.run.upper, jnp.float32)
    return np.asarray(jax.device_get(fathom.hparams(state.hyper.log_hparams, upper)))

  def __call__(self, state: ServerState, t: int,
               hp: np.ndarray) -> tuple[ServerState, RoundMetrics, CohortPlan]:
    """Round t with hyperparameters hp = (E, eta, B) (as the device will compute them)."""
    c, mesh = self.run.config, self.run.mesh
    cohort = sample_cohort(self.run.task.train, c.seed, t, c.cohort_size)
    plan = self.planner.plan(cohort, t, hp[EPOCHS], hp[BATCH])
    table = jax.device_put(plan.table, replicated(mesh))
    slots, stream = jax.device_put((plan.lanes.slots, plan.lanes.stream), by_client(mesh))
    source = (self._resident if self.run.resident
              else jax.device_put(plan.lanes.source, by_client(mesh)))
    state, m = self.round_fn(state, table, slots, stream, source, jnp.int32(plan.batch_size),
                             batch_pad=plan.batch_pad)
    return state, jax.device_get(m), plan

  @property
  def compiles(self) -> int:
    """Programs compiled for the round so far (one per padded shape seen)."""
    return self.round_fn._cache_size()


def _prepare_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f'--workdir {workdir!r} cannot be created: {e.strerror}') from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise WorkdirError(f'--workdir {workdir!r} is not writable')
  existing = os.path.join(workdir, metrics.METRICS_FILE)
  if os.path.exists(existing) and os.path.getsize(existing) > 0:
    raise WorkdirError(f'--workdir {workdir!r} already holds a run ({metrics.METRICS_FILE}); '
                       'choose another workdir or remove that one')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs `config` into `workdir`; returns the summary that it also writes."""
  run = build(config)
  _prepare_workdir(workdir)
  with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
    f.write(config.to_json_best_effort(indent=2) + '\n')
  c, task, mesh = config, run.task, run.mesh
  n_dev = mesh.devices.size
  logging.info('task %s: %d train clients (%d examples), %d test clients; %d device(s) '
               '(%s), %d lane(s) per device, training set %s', task.name,
               len(task.train.num_examples), int(np.sum(task.train.num_examples)),
               len(task.test.num_examples), n_dev, mesh.devices.flat[0].platform,
               run.lanes_per_device, 'on device' if run.resident else 'fed per round')

  state = init_state(run)
  rounds = Rounds(run)
  evaluate = make_evaluator(run.model, mesh, c.eval_batch_size)
  test_clients = np.flatnonzero(np.asarray(task.test.num_examples) > 0)
  writer = metrics.MetricsWriter(workdir)

  hp = rounds.initial_hparams(state)
  total_examples = total_steps = computed = 0
  reached = None
  last_eval = None
  start = time.time()
  last_log = (start, 0)
  for t in range(1, c.num_rounds + 1):
    state, m, plan = rounds(state, t, hp)
    used, hp = m.hparams, np.asarray(m.next_hparams)
    steps = int(plan.num_steps.sum())
    total_steps += steps
    total_examples += steps * plan.batch_size
    computed += plan.computed_steps(n_dev) * plan.batch_pad
    row = {'round': t, 'train_loss': float(m.train_loss), 'eta': float(used[ETA]),
           'epochs': float(used[EPOCHS]), 'batch_size': float(used[BATCH]),
           'batch_size_int': plan.batch_size, 'h_glob': float(m.h_glob),
           'h_local': float(m.h_local), 'examples': total_examples, 'local_steps': total_steps,
           'dropped_clients': int(m.dropped_clients), 'accepted': bool(m.accepted),
           'padding_efficiency': plan.useful_fraction(n_dev)}
    if t % c.eval_every == 0 or t == c.num_rounds:
      if c.eval_clients and c.eval_clients < len(test_clients):
        chosen = sample_clients(c.seed, t, rng.EVAL, test_clients, c.eval_clients)
      else:
        chosen = test_clients
      last_eval = (t, len(chosen) == len(test_clients), evaluate(state.params, task.test,
                                                                 chosen))
      row['test_accuracy'] = last_eval[2]['accuracy']
      row['test_loss'] = last_eval[2]['loss']
      if reached is None and c.target_accuracy and row['test_accuracy'] >= c.target_accuracy:
        reached = row
    row['wall_s'] = time.time() - start
    writer.write(row)
    if t % c.log_every == 0 or t == c.num_rounds:
      now = time.time()
      logging.info(metrics.progress_line(row, c.num_rounds,
                                         (t - last_log[1]) / max(now - last_log[0], 1e-9)))
      last_log = (now, t)
  writer.close()

  # Final evaluation on the whole test set (reusing the last round's if it was already whole).
  if last_eval is not None and last_eval[0] == c.num_rounds and last_eval[1]:
    final = last_eval[2]
  else:
    final = evaluate(state.params, task.test, test_clients)
  l2, sha = metrics.params_digest(state.params)
  summary = {
      'algorithm': c.algorithm, 'task': task.name, 'rounds': c.num_rounds, 'devices': n_dev,
      'platform': mesh.devices.flat[0].platform, 'compiles': rounds.compiles,
      'wall_s': time.time() - start, 'total_examples': total_examples,
      'total_local_steps': total_steps,
      'padding_efficiency': total_examples / max(computed, 1),
      'final': {'test_accuracy': final['accuracy'], 'test_loss': final['loss'],
                'test_examples': final['count'], 'params_l2': l2, 'params_sha256': sha},
      'final_hparams': {'eta': float(hp[ETA]), 'epochs': float(hp[EPOCHS]),
                        'batch_size': float(hp[BATCH])},
  }
  if c.target_accuracy:
    summary['target_accuracy'] = c.target_accuracy
    summary['rounds_to_target'] = reached['round'] if reached else None
    summary['examples_to_target'] = reached['examples'] if reached else None
    summary['local_steps_to_target'] = reached['local_steps'] if reached else None
  metrics.write_json(os.path.join(workdir, metrics.SUMMARY_FILE), summary)
  logging.info('done: %d rounds in %.1fs, %d compiles; final test accuracy %.4f, loss %.4f',
               c.num_rounds, summary['wall_s'], summary['compiles'], final['accuracy'],
               final['loss'])
  return summary
