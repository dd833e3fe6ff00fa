"""train_and_evaluate(config, workdir): set up, run the rounds, evaluate, write the outputs.

The host only samples cohorts, plans them, feeds the devices and logs; each round's
computation is the one jitted function of round.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from fathom_sim import compile_cache, distributed, fathom, metrics, models, rng, server
from fathom_sim.checkpoint import CHECKPOINTS, Checkpointer
from fathom_sim.config import ConfigError, base_config, check_config
from fathom_sim.data import DataError, Task, load_task
from fathom_sim.data.federated import (ArrayClientDataset, Prefetcher, sample_clients,
                                       sample_cohort)
from fathom_sim.compile_ahead import CompileAhead
from fathom_sim.data.plan import Planner, SeedPlanners, neighbour_buckets
from fathom_sim.evaluation import make_evaluator
from fathom_sim.mesh import CLIENTS, by_client, local_rows, make_mesh, put, replicated
from fathom_sim.round import make_round
from fathom_sim.types import BATCH, EPOCHS, ETA, CohortPlan, RoundMetrics, ServerState

# 'auto' keeps an in-memory training set on the devices (a copy on each) up to RESIDENT_BYTES
# on CPU, and up to RESIDENT_FRACTION of one accelerator's memory: then no examples travel
# per round (a FEMNIST-shaped round at cohort 10 on one GPU sends one padded buffer of ~12 MiB).
RESIDENT_BYTES = 1 << 30
RESIDENT_FRACTION = 0.25
# Lanes per accelerator when config.lanes_per_device is 0. On one H100 the EMNIST CNN's step
# at B 20 stops gaining from more lanes at ~50 (docs/benchmarks.md), and at cohort 200 the
# CNN and LSTM rounds ran 1.2x and 2.5x faster with 50 lanes than with 200.
MAX_ACCELERATOR_LANES = 50
CONFIG_FILE = 'config.json'


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
  local_loop: str
  conv: str  # emnist_cnn's convolution form, as resolved from config.model.conv
  compile_ahead: bool = False  # padded batch sizes around the current one compile on threads
  evaluation_ahead: bool = False  # the evaluation's program compiles on a thread from round 1
  loop_chunk: int = 1  # the device loop checks its bound every loop_chunk local steps


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
  _set_matmul_precision(config.matmul_precision)
  mesh = make_mesh(config.num_devices)
  conv = _auto_conv(config, mesh)
  model = models.get_model(config.model.name, num_classes=task.num_classes,
                           hidden=config.model.hidden, conv=conv,
                           compute_dtype=config.model.compute_dtype)
  _check_model_fits(model, config.model.name, task)
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
      config.data_on_device == 'auto' and size <= _resident_bytes(mesh)))
  local_loop = _local_loop(config, mesh, conv)
  return Run(config, task, mesh, model, server_opt, tuner, upper, resident,
             _auto_lanes(config, mesh), local_loop, conv,
             _compile_ahead(config, mesh, local_loop), _evaluation_ahead(config, mesh),
             _loop_chunk(config, local_loop))


# JAX's matmul precision as it was before the first run that set one, if a run did: what
# matmul_precision='auto' puts back, so that runs in one process (a sweep, tests) do not
# inherit the setting of the run before, while a setting made outside any run (the
# JAX_DEFAULT_MATMUL_PRECISION variable, or jax.config in a notebook) stands.
_PRECISION_BEFORE_RUNS: list = []


def _set_matmul_precision(precision: str) -> None:
  """Sets JAX's float32 matmul and convolution precision for the whole process, the compile
  threads included (a thread-local context would leave compile_ahead's programs at another
  precision than the round's). Why a field: at the default, an H100 multiplies in TF32, and a
  FEMNIST-shaped seed diverged there that did not in float32 (docs/benchmarks.md)."""
  if precision == 'auto':
    if _PRECISION_BEFORE_RUNS:
      jax.config.update('jax_default_matmul_precision', _PRECISION_BEFORE_RUNS.pop())
    return
  if not _PRECISION_BEFORE_RUNS:
    _PRECISION_BEFORE_RUNS.append(jax.config.jax_default_matmul_precision)
  jax.config.update('jax_default_matmul_precision', precision)


def matmul_precision() -> str:
  """The precision runs now compile with: 'default' unless set."""
  return jax.config.jax_default_matmul_precision or 'default'


def _auto_conv(config, mesh) -> str:
  """config.model.conv, or by platform when 'auto'. Measured (docs/benchmarks.md): nn.Conv
  runs slowly in a device loop on CPU and as grouped convolutions under vmap on CPU and GPU;
  other platforms keep nn.Conv until measured."""
  if config.model.conv != 'auto':
    return config.model.conv
  return 'matmul' if mesh.devices.flat[0].platform in ('cpu', 'gpu') else 'xla'


def _auto_lanes(config, mesh) -> int:
  """Lanes per device: config.lanes_per_device, or by platform when it is 0.

  CPU: one (a core gains nothing from side-by-side clients). Accelerators: every client of the
  device side by side, up to MAX_ACCELERATOR_LANES; past that the device is already full and
  more lanes only pad more steps (each lane runs to its longest).
  """
  if config.lanes_per_device:
    return config.lanes_per_device
  if mesh.devices.flat[0].platform == 'cpu':
    return 1
  return min(-(-config.cohort_size // mesh.devices.size), MAX_ACCELERATOR_LANES)


# Models whose local-step loop runs far slower inside a device loop than as a program per step
# on XLA:CPU when any pass of their convolutions is XLA's (docs/benchmarks.md: the EMNIST CNN
# at ~0.1x of its centralized speed); with conv='matmul' the device loop is the faster one.
HOST_LOOP_ON_CPU = frozenset({'emnist_cnn'})


def _resident_bytes(mesh) -> int:
  """The largest training set that data_on_device='auto' keeps on each device."""
  device = mesh.devices.flat[0]
  if device.platform == 'cpu':
    return RESIDENT_BYTES
  limit = (device.memory_stats() or {}).get('bytes_limit', 0)
  return max(RESIDENT_BYTES, int(limit * RESIDENT_FRACTION))


def _local_loop(config, mesh, conv: str) -> str:
  if config.local_loop != 'auto':
    return config.local_loop
  cpu = mesh.devices.flat[0].platform == 'cpu'
  slow_in_loop = config.model.name in HOST_LOOP_ON_CPU and 'xla' in conv.split('/')
  return 'host' if cpu and slow_in_loop else 'device'


def _loop_chunk(config, local_loop: str) -> int:
  """config.loop_chunk resolved: 'auto' (0) checks the device loop's bound at every step, the
  one form measured so far; the host-driven loop knows its bound and runs no padding steps."""
  if local_loop == 'host':
    return 1
  return config.loop_chunk or 1


def _compile_ahead(config, mesh, local_loop: str) -> bool:
  """config.compile_ahead resolved. Only the device loop's round is one program to compile
  ahead. 'auto': FATHOM (FedAvg's B never moves) on accelerators; on CPU a compile on a thread
  takes a core from training and saves little (a CPU round program compiles in ~1-3 s)."""
  if config.compile_ahead == 'no' or local_loop != 'device':
    return False
  if config.compile_ahead == 'yes':
    return True
  return config.algorithm == 'fathom' and mesh.devices.flat[0].platform != 'cpu'


def _evaluation_ahead(config, mesh) -> bool:
  """config.compile_ahead resolved for the evaluation's program: one program whatever the
  algorithm and local loop, so 'auto' compiles it ahead on every accelerator (FedAvg's first
  evaluation would otherwise wait for its compile, seconds on a GPU), 'yes' everywhere."""
  if config.compile_ahead == 'auto':
    return mesh.devices.flat[0].platform != 'cpu'
  return config.compile_ahead == 'yes'


def _compile_ahead_workers() -> int:
  """Compile threads beside the main one: XLA compiles a program on about one core, and each
  thread should leave the host's input pipeline (reading threads, planning) cores to run on."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  return max(1, min(3, (cores or 1) // 4))


def _first_examples(task: Task, n: int) -> dict:
  """Up to n training examples of the first client that has any (for shapes)."""
  first = int(np.flatnonzero(np.asarray(task.train.num_examples) > 0)[0])
  return {k: v[:n] for k, v in task.train.client(first).items()}


def _check_model_fits(model: models.Model, name: str, task: Task) -> None:
  """Traces init and loss on two examples (no compute), so a mismatch fails with one line."""
  sample = _first_examples(task, 2)
  key = jax.random.PRNGKey(0)
  try:
    jax.eval_shape(lambda: model.loss(model.init(key, sample), sample,
                                      jnp.ones(len(sample['y']), bool), key))
  except Exception as e:  # whatever the model's own error, report it against the data
    shapes = ', '.join(f'{k} {v.shape[1:]} {v.dtype}' for k, v in sample.items())
    reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    raise DataError(f'{task.name}: examples ({shapes}) do not fit config.model.name={name!r}: '
                    f'{reason}') from None


def init_state(run: Run) -> ServerState:
  """Round 0: fresh model from the seed, optimizer states, phi = log of the initial values."""
  c = run.config
  params = run.model.init(jax.random.fold_in(rng.base_key(c.seed), 0x1417),
                          _first_examples(run.task, 1))
  state = ServerState(params=params, opt_state=run.server_opt.init(params),
                      hyper=run.tuner.init(params, (c.epochs, c.eta, c.batch_size)),
                      round=jnp.int32(0), rng=rng.base_key(c.seed))
  return put(state, replicated(run.mesh))


@dataclasses.dataclass
class _Fed:
  """Round t's plan(s), and its arrays on the devices (table, slots, stream, source, B_int)."""
  t: int
  plans: CohortPlan | list[CohortPlan]
  args: tuple
  batch_pad: int
  longest: int  # the longest lane's real steps
  lengths_before: tuple | None = None  # planned ahead: the planner's padded lengths before


class Rounds:
  """Runs round t on the devices: samples and plans the cohort, feeds it, steps the state.

  With `seeds`, runs those seeds of the same config as one vectorised program: the state,
  hyperparameters and metrics carry a leading seed axis, and a call returns every seed's plan.
  Round t+1's clients are read, and its plan made and sent under round t's (E, B), while the
  devices compute round t. `prefetch=False` does both on the critical path (to measure what
  that saves); the results are the same.
  """

  def __init__(self, run: Run, seeds: list[int] | None = None, prefetch: bool = True):
    c, mesh = run.config, run.mesh
    self.run = run
    self.seeds = None if seeds is None else [int(s) for s in seeds]
    self.num_devices = mesh.devices.size
    self.round_fn = make_round(loss_fn=run.model.loss, server_opt=run.server_opt,
                               tuner=run.tuner, upper=run.upper, mesh=mesh,
                               source_per_device=not run.resident,
                               vectorized=self.seeds is not None, local_loop=run.local_loop,
                               loop_chunk=run.loop_chunk)
    lanes = self.num_devices * run.lanes_per_device
    options = dict(resident=run.resident, batch_per_octave=c.batch_pad_per_octave,
                   local_lanes=local_rows(mesh, lanes), lanes_per_buffer=run.lanes_per_device)
    train = run.task.train
    # Examples read per round (generated, prepared) are read for round t+1 while round t
    # computes. Not across hosts: there a process reads only its own lanes' clients, and which
    # lanes a client lands in depends on round t's B.
    self._prefetch = None
    if (prefetch and not run.resident and not isinstance(train, ArrayClientDataset)
        and options['local_lanes'] is None):
      train = self._prefetch = Prefetcher(train)
    if self.seeds is None:
      self.planner = Planner(train, c.cohort_size, lanes, c.seed, **options)
      self._lanes = by_client(mesh)
    else:
      self.planner = SeedPlanners(train, c.cohort_size, lanes, self.seeds, **options)
      self._lanes = NamedSharding(mesh, P(None, CLIENTS))
    self._cohorts_memo: tuple[int, list[np.ndarray]] | None = None
    self._resident = (put(run.task.train.features, replicated(mesh))
                      if run.resident else None)
    self.last_host_s = self.last_device_s = 0.0
    # Also when only the evaluation compiles ahead: the rounds then are not (round_fn None).
    self.compile_ahead = (CompileAhead(self.round_fn if run.compile_ahead else None,
                                       self._neighbour_pads, reach=2,
                                       workers=_compile_ahead_workers())
                          if run.compile_ahead or run.evaluation_ahead else None)
    self._plan_ahead = prefetch
    self._next: _Fed | None = None
    self._ahead_warned = False
    self.planned_ahead = self.replanned = 0  # rounds whose plan made ahead was used / not

  def initial_hparams(self, state: ServerState) -> np.ndarray:
    """(E, eta, B) of the next round, read from the state (once, at start or resume)."""
    upper = jnp.asarray(self.run.upper, jnp.float32)
    return np.asarray(jax.device_get(fathom.hparams(state.hyper.log_hparams, upper)))

  def __call__(self, state: ServerState, t: int, hp: np.ndarray
               ) -> tuple[ServerState, RoundMetrics, CohortPlan | list[CohortPlan]]:
    """Round t with hyperparameters hp = (E, eta, B) (as the device will compute them)."""
    c = self.run.config
    start = time.perf_counter()
    fed, self._next = self._next, None
    if fed is not None and fed.t == t and self._same_schedule(fed.plans, hp):
      self.planned_ahead += 1
    else:
      if fed is not None:
        # The padded lengths grow as if that plan had never been made: no shape (and compile)
        # that planning on time would not have made.
        self.planner.restore_padded_lengths(fed.lengths_before)
        self.replanned += 1
      fed = self._feed(t, hp)
    dispatched = time.perf_counter()
    args = (state,) + fed.args
    if self.compile_ahead is not None:
      self.compile_ahead.before(args, fed.batch_pad)
    state, m = self.round_fn(*args, batch_pad=fed.batch_pad,
                             num_iterations=fed.longest if self.run.local_loop == 'host'
                             else None)
    if t < c.num_rounds:
      if self._prefetch is not None:
        self._prefetch.fetch(np.concatenate(self._cohorts(t + 1)))
      if self._plan_ahead:
        # Round t+1's plan under this round's (E, B), made and sent while the devices compute
        # round t. B_int and the K_i mostly stay the same from one round to the next; when
        # they do not, round t+1 plans again (_same_schedule).
        lengths = self.planner.padded_lengths()
        try:
          self._next = self._feed(t + 1, hp)
          self._next.lengths_before = lengths
        except Exception:  # noqa: BLE001
          # E.g. a client that cannot be read: round t+1 plans again, and raises it there,
          # after round t has returned its state.
          self.planner.restore_padded_lengths(lengths)
          if not self._ahead_warned:  # once: a lasting cause would repeat every round
            logging.warning('planning round %d ahead failed; it plans on time', t + 1,
                            exc_info=True)
          self._ahead_warned = True
          self.replanned += 1  # round t+1 will plan on time
    m = jax.device_get(m)
    # Host: sampling, planning, transfers issued on the critical path; device: from dispatch
    # until the metrics are back (includes compiling when the round meets a new padded shape,
    # and planning round t+1 ahead, which the host does while the devices compute).
    self.last_host_s, self.last_device_s = dispatched - start, time.perf_counter() - dispatched
    return state, m, fed.plans

  def _feed(self, t: int, hp: np.ndarray) -> _Fed:
    """Plans round t under hp and sends its arrays to the devices."""
    mesh = self.run.mesh
    cohorts = self._cohorts(t)
    if self.seeds is None:
      plan = self.planner.plan(cohorts[0], t, hp[EPOCHS], hp[BATCH])
      lanes, batch_size, batch_pad = plan.lanes, jnp.int32(plan.batch_size), plan.batch_pad
      table, plans, longest = plan.table, plan, int(plan.lane_steps.max())
    else:
      stacked = self.planner.plan(cohorts, t, hp)
      lanes, batch_size = stacked.lanes, jnp.asarray(stacked.batch_size)
      batch_pad = stacked.batch_pad
      table, plans = stacked.table, stacked.plans
      longest = max(int(p.lane_steps.max()) for p in plans)
    table = put(table, replicated(mesh))
    slots, stream = put((lanes.slots, lanes.stream), self._lanes)
    source = self._resident if self.run.resident else put(lanes.source, self._lanes)
    return _Fed(t, plans, (table, slots, stream, source, batch_size), batch_pad, longest)

  def _same_schedule(self, plans: CohortPlan | list[CohortPlan], hp: np.ndarray) -> bool:
    """Whether hp gives every seed's plan the B_int and K_i it was made with: a plan depends
    on (E, B) through those alone (data/plan.py)."""
    plans, hps = ([plans], [hp]) if self.seeds is None else (plans, hp)
    for plan, h in zip(plans, hps, strict=True):
      b_int, num_steps = fathom.integer_schedule(h[EPOCHS], h[BATCH], plan.num_examples)
      if b_int != plan.batch_size or not np.array_equal(num_steps, plan.num_steps):
        return False
    return True

  def _neighbour_pads(self, batch_pad: int) -> list[int]:
    planner = self.planner if self.seeds is None else self.planner.planners[0]
    return neighbour_buckets(batch_pad, self.run.config.batch_pad_per_octave,
                             min_batch_pad=planner.min_batch_pad,
                             max_batch_size=max(1, round(min(self.run.upper[BATCH], 2**30))))

  def close(self) -> None:
    """Drops a plan made ahead and compiles queued ahead (a run's end)."""
    self._next = None
    if self.compile_ahead is not None:
      self.compile_ahead.close()

  @property
  def prefetching(self) -> bool:
    """Whether round t+1's clients are read while round t computes."""
    return self._prefetch is not None

  def _cohorts(self, t: int) -> list[np.ndarray]:
    """Round t's cohort for each seed (sampled once, though the prefetch asks a round early)."""
    if self._cohorts_memo is None or self._cohorts_memo[0] != t:
      c = self.run.config
      seeds = [c.seed] if self.seeds is None else self.seeds
      self._cohorts_memo = (t, [sample_cohort(self.run.task.train, s, t, c.cohort_size)
                                for s in seeds])
    return self._cohorts_memo[1]

  @property
  def compiles(self) -> int:
    """Programs compiled for the round so far (one per padded shape seen)."""
    return self.round_fn._cache_size()


# Fields that may differ between a run and its resumption: they change how a run is executed,
# logged or evaluated, never the model it trains, but for float rounding: device and lane
# counts, the conv form and matmul_precision change how products round (TF32 against float32
# is enough to send an unstable run another way; resuming at 'highest' is how to steady one).
# Every other field is part of the run's identity.
RESUMABLE_FIELDS = frozenset({
    'num_rounds', 'log_every', 'checkpoint_every', 'keep_checkpoints', 'eval_every',
    'eval_clients', 'eval_batch_size', 'target_accuracy', 'num_devices', 'lanes_per_device',
    'data_on_device', 'batch_pad_per_octave', 'local_loop', 'loop_chunk', 'model.conv',
    'compile_ahead', 'matmul_precision'})


class Preempted(Exception):
  """The run received SIGTERM or SIGINT and stopped after checkpointing its last round."""

  def __init__(self, signum: int, round_index: int):
    super().__init__(f'stopped by signal {signum} after round {round_index} (checkpointed)')
    self.signum = signum


def _flatten(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _config_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def check_same_run(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Raises WorkdirError when `workdir` holds a run of a config that differs from `config` in a
  field that changes the result (or whose config.json is unreadable); else does nothing."""
  saved_path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(saved_path):
    return
  try:
    with open(saved_path, encoding='utf-8') as f:
      saved = _flatten(json.load(f))
  except (OSError, ValueError) as e:
    raise WorkdirError(f'{saved_path} is unreadable ({e}); it describes the run this workdir '
                       'holds, so the run cannot be resumed safely') from None
  new = _flatten(_config_dict(config))
  # A field added to the simulator after the run was saved stands at its default there.
  defaults = _flatten(_config_dict(base_config()))
  saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
  changed = sorted(k for k in set(saved) | set(new)
                   if k not in RESUMABLE_FIELDS and saved.get(k) != new.get(k))
  if changed:
    details = ', '.join(f'{k} ({saved.get(k)!r} -> {new.get(k)!r})' for k in changed)
    raise WorkdirError(f'--workdir {workdir!r} holds a run with a different config; fields '
                       f'that change the result differ: {details}. Use another workdir.')


def _prepare_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Creates the workdir, or checks that the run it holds is this config's run; saves config."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f'--workdir {workdir!r} cannot be created: {e.strerror}') from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise WorkdirError(f'--workdir {workdir!r} is not writable')
  saved_path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(saved_path):
    check_same_run(workdir, config)
  elif any(os.path.exists(os.path.join(workdir, f))
           for f in (metrics.METRICS_FILE, CHECKPOINTS)):
    raise WorkdirError(f'--workdir {workdir!r} holds run files but no {CONFIG_FILE}; '
                       'choose another workdir')
  # Written before any checkpoint or metric, so run files never exist without it.
  if distributed.is_writer():
    with open(saved_path, 'w', encoding='utf-8') as f:
      f.write(config.to_json_best_effort(indent=2) + '\n')


@contextlib.contextmanager
def _stop_signals():
  """Turns SIGTERM / SIGINT (what a TPU preemption sends) into a flag read between rounds."""
  received: list[int] = []
  if threading.current_thread() is not threading.main_thread():
    yield received
    return
  previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  for s in previous:
    signal.signal(s, lambda signum, frame: received.append(signum))
  try:
    yield received
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def _agreed_stop(signals: list[int]) -> int:
  """The signal to stop on after this round (0: go on). On several hosts the processes agree
  (one receiving it stops all), so that all stop after the same round."""
  mine = signals[0] if signals else 0
  if jax.process_count() == 1:
    return mine
  return int(np.max(multihost_utils.process_allgather(np.int32(mine))))


def _extra_accuracies(result: dict) -> dict:
  """A model's further accuracies (e.g. Stack Overflow's without OOV) as test_* fields."""
  return {f'test_{k}': v for k, v in result.items() if k.startswith('accuracy_')}


def _first_reaching(rows: list[dict], target: float) -> dict | None:
  return next((r for r in rows if r.get('test_accuracy') is not None
               and r['test_accuracy'] >= target), None)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs `config` into `workdir`, resuming the run already there; returns the summary.

  Raises Preempted after checkpointing when SIGTERM or SIGINT arrives.
  """
  return _train([config], [workdir], vectorized=False)[0]


def train_seeds(configs: list[ml_collections.ConfigDict], workdirs: list[str]) -> list[dict]:
  """Runs configs that differ only in `seed` as one vectorised program (vmap over seeds).

  Each workdir gets exactly what a solo run of its config writes (metrics, checkpoints,
  summary), with the same numbers up to float rounding: one compilation and one start-up
  serve all the seeds. Seeds whose checkpoints stand at different rounds are run one by one.
  """
  if len(configs) != len(workdirs) or not configs:
    raise ValueError('train_seeds needs one workdir per config, and at least one config')
  base = _flatten(_config_dict(configs[0]))
  for c in configs[1:]:
    other = _flatten(_config_dict(c))
    differ = sorted(k for k in set(base) | set(other)
                    if k != 'seed' and base.get(k) != other.get(k))
    if differ:
      raise ConfigError('vectorised seeds need configs that differ only in config.seed; '
                        f'these differ too: {", ".join(differ)}')
  if len({c.seed for c in configs}) != len(configs):
    raise ConfigError('vectorised seeds need distinct config.seed values')
  if len(configs) == 1:
    return [train_and_evaluate(configs[0], workdirs[0])]
  return _train(configs, workdirs, vectorized=True)


@dataclasses.dataclass
class _Book:
  """One run's host-side record: its files, counters and the rows it has written."""
  config: ml_collections.ConfigDict
  workdir: str
  checkpointer: Checkpointer
  done: int
  meta: dict
  rows: list = dataclasses.field(default_factory=list)
  writer: metrics.MetricsWriter | None = None
  last_eval: tuple | None = None
  start: float = 0.0
  cache_hits: int = 0  # compile_cache.hits() when the run started

  def bookkeeping(self, t: int, hp: np.ndarray) -> dict:
    return {'round': t, 'hp': [float(v) for v in hp], 'total_examples': self.meta['total_examples'],
            'total_steps': self.meta['total_steps'], 'computed': self.meta['computed'],
            'wall_s': time.time() - self.start, 'config': _config_dict(self.config)}


def _seed(tree, s: int | None):
  """Seed s's slice of a stacked pytree (the tree itself when not vectorised)."""
  return tree if s is None else jax.tree.map(lambda x: x[s], tree)


def _train(configs: list[ml_collections.ConfigDict], workdirs: list[str], *,
           vectorized: bool) -> list[dict]:
  cache_hits = compile_cache.hits()
  run = build(configs[0])
  for config, workdir in zip(configs, workdirs):
    _prepare_workdir(workdir, config)
  c, task, mesh = configs[0], run.task, run.mesh
  n_dev = mesh.devices.size
  logging.info('task %s: %d train clients (%d examples), %d test clients; %d device(s) '
               '(%s), %d lane(s) per device, training set %s%s', task.name,
               len(task.train.num_examples), int(np.sum(task.train.num_examples)),
               len(task.test.num_examples), n_dev, mesh.devices.flat[0].platform,
               run.lanes_per_device, 'on device' if run.resident else 'fed per round',
               f'; {len(configs)} seeds vectorised' if vectorized else '')

  books, states, hps = [], [], []
  for config, workdir in zip(configs, workdirs):
    state = init_state(dataclasses.replace(run, config=config))
    checkpointer = Checkpointer(workdir, config.keep_checkpoints)
    restored = checkpointer.restore_newest(state)
    if restored is None:
      meta = {'total_examples': 0, 'total_steps': 0, 'computed': 0, 'wall_s': 0.0}
      done, hp = 0, None
    else:
      state, meta = restored
      done, hp = int(meta['round']), np.asarray(meta['hp'], np.float32)
      logging.info('%s: resuming from the checkpoint of round %d', workdir, done)
    books.append(_Book(config, workdir, checkpointer, done, meta, cache_hits=cache_hits))
    states.append(state)
    hps.append(hp)
  for book in books:
    if book.done > c.num_rounds:
      for b in books:
        b.checkpointer.close()
      raise WorkdirError(f'--workdir {book.workdir!r} holds a run already at round '
                         f'{book.done}; config.num_rounds must be at least that, '
                         f'got {c.num_rounds}')
  if vectorized and len({b.done for b in books}) > 1:
    for b in books:
      b.checkpointer.close()
    logging.warning('the seeds\' checkpoints stand at rounds %s; running them one by one',
                    [b.done for b in books])
    return [train_and_evaluate(cf, wd) for cf, wd in zip(configs, workdirs)]
  done = books[0].done

  rounds = Rounds(run, [cf.seed for cf in configs] if vectorized else None)
  if vectorized:
    state = put(jax.device_get(jax.tree.map(lambda *x: jnp.stack(x), *states)),
                replicated(mesh))
  else:
    state = states[0]
  fresh = rounds.initial_hparams(state)  # [S, 3] when vectorised
  if vectorized:
    hp = np.stack([fresh[i] if h is None else h for i, h in enumerate(hps)])
  else:
    hp = fresh if hps[0] is None else hps[0]
  seeds = list(range(len(books))) if vectorized else [None]
  for book in books:
    if distributed.is_writer():  # on several hosts, process 0 alone writes the run's files
      book.rows = metrics.keep_rows(book.workdir, done)  # rows past the checkpoint are redone
      book.writer = metrics.MetricsWriter(book.workdir)
    book.start = time.time() - float(book.meta['wall_s'])

  evaluate = make_evaluator(run.model, mesh, c.eval_batch_size)
  host_loop = run.local_loop == 'host'
  test_clients = np.flatnonzero(np.asarray(task.test.num_examples) > 0)
  last_log = (time.time(), done)

  if rounds.compile_ahead is not None and len(test_clients) and done < c.num_rounds:
    # The evaluation's program compiles while round 1's does and the rounds before the first
    # evaluation run (on an H100 it made round 100 wait 4-15 s). It evaluates one seed's
    # parameters as the rounds return them: replicated.
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        a.shape[1:] if vectorized else a.shape, a.dtype, sharding=replicated(mesh)),
        state.params)
    rounds.compile_ahead.also('evaluation', functools.partial(
        evaluate.lower, params, task.test, int(test_clients[0])))

  def evaluate_on_test(params, clients) -> dict:
    if rounds.compile_ahead is not None:
      rounds.compile_ahead.ready('evaluation')  # waits for its compile if still running
    return evaluate(params, task.test, clients)

  # closing: compiles queued ahead are dropped however the loop ends, and those running waited
  # for, after the signal handlers are restored: a second Ctrl-C still ends that wait.
  with contextlib.closing(rounds), _stop_signals() as signals:
    for t in range(done + 1, c.num_rounds + 1):
      state, m, plans = rounds(state, t, hp)
      stop = _agreed_stop(signals)
      used_all, hp = np.asarray(m.hparams), np.asarray(m.next_hparams)
      for s, book in zip(seeds, books):
        ms, plan = _seed(m, s), plans if s is None else plans[s]
        used, meta = _seed(used_all, s), book.meta
        steps = int(plan.num_steps.sum())
        meta['total_steps'] += steps
        meta['total_examples'] += steps * plan.batch_size
        meta['computed'] += (plan.computed_steps(n_dev, host_loop, run.loop_chunk)
                             * plan.batch_pad)
        row = {'round': t, 'train_loss': float(ms.train_loss), 'eta': float(used[ETA]),
               'epochs': float(used[EPOCHS]), 'batch_size': float(used[BATCH]),
               'batch_size_int': plan.batch_size, 'h_glob': float(ms.h_glob),
               'h_local': float(ms.h_local), 'examples': meta['total_examples'],
               'local_steps': meta['total_steps'], 'dropped_clients': int(ms.dropped_clients),
               'accepted': bool(ms.accepted),
               'padding_efficiency': plan.useful_fraction(n_dev, host_loop, run.loop_chunk)}
        if not ms.accepted:
          dropped = int(ms.dropped_clients)
          why = ('no client returned a finite update'
                 if dropped >= int(np.sum(np.asarray(plan.num_examples) > 0))
                 else 'the server or hyper step was not finite')
          logging.warning('%sround %d rejected: %s (%d clients dropped); the model is '
                          'unchanged%s', _tag(book, vectorized), t, why, dropped,
                          '' if c.algorithm == 'fedavg' else ' and the eta it used is halved')
        jump = metrics.loss_jump(book.rows, row, metrics.LOSS_JUMP)
        if jump is not None:
          logging.warning('%sround %d: the training loss rose %.3gx in one round (%.4g -> %.4g) '
                          'and the round was accepted; the run may be diverging (on a GPU, '
                          'config.matmul_precision=highest computes as the CPU does)',
                          _tag(book, vectorized), t, jump[1], jump[0], row['train_loss'])
        if t % c.eval_every == 0 or t == c.num_rounds:
          if c.eval_clients and c.eval_clients < len(test_clients):
            chosen = sample_clients(book.config.seed, t, rng.EVAL, test_clients, c.eval_clients)
          else:
            chosen = test_clients
          result = evaluate_on_test(_seed(state.params, s), chosen)
          book.last_eval = (t, len(chosen) == len(test_clients), result)
          row['test_accuracy'], row['test_loss'] = result['accuracy'], result['loss']
          row.update(_extra_accuracies(result))
        row['wall_s'] = time.time() - book.start
        if book.writer:
          book.writer.write(row)
        book.rows.append(row)
        if stop or t % c.checkpoint_every == 0 or t == c.num_rounds:
          book.checkpointer.save(_seed(state, s), book.bookkeeping(t, _seed(hp, s)),
                                 wait=bool(stop) or t == c.num_rounds)
      if t % c.log_every == 0 or t == c.num_rounds:
        now = time.time()
        speed = (t - last_log[1]) / max(now - last_log[0], 1e-9)
        for book in books:
          logging.info(_tag(book, vectorized) + metrics.progress_line(book.rows[-1],
                                                                      c.num_rounds, speed))
        last_log = (now, t)
      if stop:
        for book in books:
          if book.writer:
            book.writer.close()
          book.checkpointer.close()
        logging.warning('signal %d: stopped after round %d, checkpoint saved; run the same '
                        'command again to resume', stop, t)
        raise Preempted(stop, t)
  for book in books:
    if book.writer:
      book.writer.close()
    book.checkpointer.close()

  summaries = []
  for s, book in zip(seeds, books):
    params = _seed(state.params, s)
    # Final evaluation on the whole test set (reusing the last round's if it was already whole).
    if book.last_eval is not None and book.last_eval[0] == c.num_rounds and book.last_eval[1]:
      final = book.last_eval[2]
    else:
      final = evaluate_on_test(params, test_clients)
    summaries.append(_summary(book, final, params, _seed(hp, s), rounds, run,
                              vectorized=len(books) if vectorized else 0))
  return summaries


def _tag(book: _Book, vectorized: bool) -> str:
  return f'seed {book.config.seed}: ' if vectorized else ''


def _summary(book: _Book, final: dict, params, hp: np.ndarray, rounds: Rounds, run: Run, *,
             vectorized: int) -> dict:
  """Writes and returns the run's summary.json."""
  c, meta = book.config, book.meta
  compiles, ahead = rounds.compiles, rounds.compile_ahead
  l2, sha = metrics.params_digest(params)
  summary = {
      'algorithm': c.algorithm, 'task': run.task.name, 'rounds': c.num_rounds,
      'devices': run.mesh.devices.size, 'processes': jax.process_count(), 'platform': run.mesh.devices.flat[0].platform,
      'local_loop': run.local_loop, 'loop_chunk': run.loop_chunk,
      'lanes_per_device': run.lanes_per_device, 'matmul_precision': matmul_precision(),
      'conv': run.conv if c.model.name == 'emnist_cnn' else None,
      'compute_dtype': c.model.compute_dtype,
      'compiles': compiles,
      # Every program (rounds, evaluation, set-up) loaded from the persistent cache; in a
      # vectorised group, the group's.
      'compile_cache_hits': compile_cache.hits() - book.cache_hits,
      'compiled_ahead': None if ahead is None else {'compiled': ahead.compiled,
                                                    'used': ahead.used},
      'planned_ahead': rounds.planned_ahead, 'replanned': rounds.replanned,
      'vectorized_seeds': vectorized, 'resumed_from': book.done,
      'wall_s': time.time() - book.start, 'total_examples': meta['total_examples'],
      'total_local_steps': meta['total_steps'],
      'padding_efficiency': meta['total_examples'] / max(meta['computed'], 1),
      'final': {'test_accuracy': final['accuracy'], 'test_loss': final['loss'],
                'test_examples': final['count'], 'params_l2': l2, 'params_sha256': sha,
                **_extra_accuracies(final)},
      'final_hparams': {'eta': float(hp[ETA]), 'epochs': float(hp[EPOCHS]),
                        'batch_size': float(hp[BATCH])},
  }
  if c.target_accuracy:
    reached = _first_reaching(book.rows, c.target_accuracy)
    summary['target_accuracy'] = c.target_accuracy
    summary['rounds_to_target'] = reached['round'] if reached else None
    summary['examples_to_target'] = reached['examples'] if reached else None
    summary['local_steps_to_target'] = reached['local_steps'] if reached else None
  if distributed.is_writer():
    metrics.write_json(os.path.join(book.workdir, metrics.SUMMARY_FILE), summary)
  loaded = summary['compile_cache_hits']
  logging.info('%sdone: %d rounds in %.1fs, %d compiles%s; final test accuracy %.4f, loss %.4f',
               _tag(book, bool(vectorized)), c.num_rounds, summary['wall_s'], compiles,
               f' ({loaded} programs loaded from the compilation cache)' if loaded else '',
               final['accuracy'], final['loss'])
  return summary
