"""A run's parts, built from its config: mesh, model, optimizers, and the choices made per
platform (convolution form, lanes, local loop, data on the devices, compiling ahead).

build(config) checks the config against the data and the devices; init_state(run) is round 0.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from fathom_sim import distributed, evaluation, fathom, models, provenance, rng, server
from fathom_sim.config import ConfigError, check_config
from fathom_sim.data import DataError, DatasetError, Task, load_task
from fathom_sim.data.federated import ArrayClientDataset
from fathom_sim.data.plan import MAX_INDICES, fewest_lanes, host_memory, plan_bytes
from fathom_sim.errors import first_line
from fathom_sim.mesh import make_mesh, put, replicated
from fathom_sim.types import ServerState

# 'auto' keeps an in-memory training set on the devices (a copy on each) up to RESIDENT_BYTES
# of host memory on CPU (all the CPU devices' copies together), and up to RESIDENT_FRACTION of
# one accelerator's memory: then no examples travel per round (a FEMNIST-shaped round at
# cohort 10 on one GPU sends one padded buffer of ~12 MiB).
RESIDENT_BYTES = 1 << 30
RESIDENT_FRACTION = 0.25
# Lanes per accelerator when config.lanes_per_device is 0. On one H100 the EMNIST CNN's step
# at B 20 stops gaining from more lanes at ~50 (docs/benchmarks.md), and at cohort 200 the
# CNN and LSTM rounds ran 1.2x and 2.5x faster with 50 lanes than with 200.
MAX_ACCELERATOR_LANES = 50
# ... and fewer, where packing several clients a lane costs at most LANE_STEP_SLACK more local
# steps a round (estimated over LANE_COHORTS sampled cohorts): a step's cost grows with its
# lanes (H200, 4-67 lanes: 0.54 + 0.051 ms a lane for the CNN, 1.71 + 0.469 for the LSTM as it
# was before lstm.py wrote its backward pass out and padded its gates), and
# with one client a lane every lane runs to the cohort's longest client (the LSTM at cohort 50:
# padding 0.24). docs/benchmarks.md, "Ninth session"; timed in the "Tenth": 1.03-3.25x the
# rounds/s of one client a lane at every cohort of both tasks.
LANE_STEP_SLACK = 0.1
LANE_COHORTS = 64


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
      frozen=config.algorithm == 'fedavg', static=(config.epochs, config.eta, config.batch_size))
  return tuner, upper


def batch_moves(config) -> bool:
  """Whether B can change during the run. FATHOM's hyper-gradient on log B is scaled by eta_h2
  and its step by eta_h, so with either at 0 log B stays put under SGD and Adam alike; FedAvg's
  B is static. Where B cannot move, a step computes exactly B_int rows and nothing compiles
  ahead: padding B_int up to a grid of sizes saves compiles only while B moves."""
  return config.algorithm == 'fathom' and config.eta_h * config.eta_h2 != 0


def build(config: ml_collections.ConfigDict, task: Task | None = None) -> Run:
  """Checks the config against itself, the data and the devices; builds the run's parts."""
  check_config(config)
  if not jax.config.jax_threefry_partitionable:
    # Off, a batch's random bits (dropout) depend on the batch's padded size, so a client's
    # masks would change with the buckets, config.min_batch_pad and other seeds' B; and
    # split(key, n)[i] is no longer fold_in(key, i), which the initial values rely on.
    raise ConfigError('JAX_THREEFRY_PARTITIONABLE=0 (jax_threefry_partitionable off) is not '
                      'supported: random bits would then depend on how batches are padded; '
                      "unset it (on is JAX's default)")
  try:
    task = task if task is not None else load_task(config.data)
  except DataError as e:  # the whole dataset: a sweep need not try its other runs on it
    raise DatasetError(str(e)) from None
  eligible = int(np.sum(np.asarray(task.train.num_examples) > 0))
  if config.cohort_size > eligible:
    raise ConfigError(f'config.cohort_size must be at most the number of training clients '
                      f'with data ({eligible}), got {config.cohort_size}')
  if config.num_devices > len(jax.devices()):
    raise ConfigError(f'config.num_devices must be at most the {len(jax.devices())} devices '
                      f'present (0 = all), got {config.num_devices}')
  if jax.process_count() > 1:
    # Every process runs the rounds' program; one that holds no device of the mesh cannot
    # fetch its results (they span devices it cannot address).
    taken = jax.devices()[:config.num_devices or len(jax.devices())]
    left = sorted(set(range(jax.process_count())) - {d.process_index for d in taken})
    if left:
      raise ConfigError(
          f'config.num_devices={config.num_devices} takes the first {len(taken)} of the '
          f'{len(jax.devices())} devices, none of process(es) {", ".join(map(str, left))}; on '
          'several hosts every process needs devices of the run: use 0 (all devices)')
  _set_matmul_precision(config.matmul_precision)
  mesh = make_mesh(config.num_devices)
  conv = _auto_conv(config, mesh)
  model = models.get_model(config.model.name, num_classes=task.num_classes,
                           hidden=config.model.hidden, conv=conv,
                           compute_dtype=config.model.compute_dtype,
                           expected_length=config.model.expected_length,
                           init=config.model.init)
  _check_params_fit(_check_model_fits(model, config.model.name, task), mesh,
                    _model_sized_by(config, task))
  _warn_integer_inputs(config.model.name, task)
  server_opt = server.server_optimizer(
      config.server_optimizer, config.server_lr, momentum=config.server_momentum,
      b1=config.server_b1, b2=config.server_b2, eps=config.server_eps)
  tuner, upper = hyper_setup(config)
  lanes = _auto_lanes(config, mesh, task.train.num_examples)
  _check_first_round_fits(config, task, mesh, lanes)

  in_memory = isinstance(task.train, ArrayClientDataset)
  if config.data_on_device == 'yes' and not in_memory:
    hint = (' (or set config.data.in_memory=True, which makes every client once and keeps '
            'them)' if config.data.name == 'femnist_synthetic' else '')
    raise ConfigError("config.data_on_device='yes' needs an in-memory training set; "
                      f'{task.name} is read client by client, use auto or no{hint}')
  size = sum(a.nbytes for a in task.train.features.values()) if in_memory else math.inf
  # A step's rows are int32 indices into a resident set (data/plan.py's stream). A set of 2^31
  # rows or more is past them: numpy's assignment wraps an index over 2^31 - 1 to a negative
  # one, which JAX reads from the end, and a real step would read other rows, silently.
  addressable = in_memory and int(task.train.offsets[-1]) < 2**31
  if config.data_on_device == 'yes' and in_memory and not addressable:
    raise ConfigError(f"config.data_on_device='yes': {task.name}'s training set has "
                      f'{int(task.train.offsets[-1])} rows; a set kept on the devices must have '
                      'fewer than 2^31 (its rows are int32 indices); use auto or no (its clients '
                      'are then sent per round)')
  resident = addressable and (config.data_on_device == 'yes' or (
      config.data_on_device == 'auto' and size <= _resident_bytes(mesh)))
  local_loop = _local_loop(config, mesh, conv)
  return Run(config, task, mesh, model, server_opt, tuner, upper, resident,
             lanes, local_loop, conv,
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
  precision than the round's). Why a field: at the default, an H100 multiplies in TF32, which
  results may need to rule out; float32 products cost ~16 % a round there. (The FEMNIST-shaped
  runs that diverged on GPUs did so at both precisions, and plain FedAvg does on a CPU:
  docs/benchmarks.md, "Fifteenth session".)"""
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


def execution(run: Run, config: ml_collections.ConfigDict) -> dict:
  """How this command executes the run's rounds (provenance.EXECUTION_FIELDS)."""
  return {'platform': run.mesh.devices.flat[0].platform, 'devices': int(run.mesh.devices.size),
          'processes': jax.process_count(), 'lanes_per_device': run.lanes_per_device,
          'batch_pad_per_octave': config.batch_pad_per_octave,
          'conv': run.conv if config.model.name == 'emnist_cnn' else None,
          'matmul_precision': matmul_precision(), 'local_loop': run.local_loop,
          'xla_flags': provenance.xla_flags()}


def _auto_conv(config, mesh) -> str:
  """config.model.conv, or by platform when 'auto'. Measured (docs/benchmarks.md): nn.Conv
  runs slowly in a device loop on CPU and as grouped convolutions under vmap on CPU and GPU;
  other platforms keep nn.Conv until measured."""
  platform = mesh.devices.flat[0].platform
  if config.model.conv == 'pallas' and platform != 'gpu':
    logging.warning("config.model.conv='pallas': its kernels are Triton's, for a GPU; on %s "
                    "they run interpreted (right, for tests; 'matmul' is this platform's fast "
                    "form)", platform)
  if config.model.conv != 'auto':
    return config.model.conv
  return 'matmul' if platform in ('cpu', 'gpu') else 'xla'


def _auto_lanes(config, mesh, num_examples: np.ndarray) -> int:
  """Lanes per device: config.lanes_per_device, or by platform when it is 0.

  CPU: one (a core gains nothing from side-by-side clients). Accelerators:
  accelerator_lanes. Never more than the cohort fills: a lane without a client computes
  padding only.
  """
  fill = -(-config.cohort_size // mesh.devices.size)
  if config.lanes_per_device > fill:
    logging.warning('config.lanes_per_device=%d: a cohort of %d clients over %d device(s) fills '
                    '%d lanes per device; running %d (a lane without a client computes padding '
                    'only)', config.lanes_per_device, config.cohort_size, mesh.devices.size,
                    fill, fill)
    return fill
  if config.lanes_per_device:
    return config.lanes_per_device
  if mesh.devices.flat[0].platform == 'cpu':
    return 1
  return accelerator_lanes(config, mesh.devices.size, num_examples)


def accelerator_lanes(config, devices: int, num_examples: np.ndarray) -> int:
  """lanes_per_device auto on accelerators: up to every client of a device side by side, at
  most MAX_ACCELERATOR_LANES (past that the device is already full and more lanes only pad
  more steps, each lane running to its longest), and of those the fewest whose rounds run at
  most LANE_STEP_SLACK more local steps (plan.fewest_lanes), for the training clients' sizes
  `num_examples` at the config's first E and B."""
  most = min(-(-config.cohort_size // devices), MAX_ACCELERATOR_LANES)
  # The estimate's cohorts are its own (a fixed seed): every seed of a setting, run alone or
  # vectorised, gets the same lanes and so the same programs.
  num_examples = np.asarray(num_examples)
  eligible = np.flatnonzero(num_examples > 0)
  draw = np.random.default_rng(0)
  cohorts = [fathom.integer_schedule(config.epochs, config.batch_size, num_examples[
      draw.choice(eligible, config.cohort_size, replace=False)])[1] for _ in range(LANE_COHORTS)]
  lanes = fewest_lanes(cohorts, devices, most, LANE_STEP_SLACK)
  if lanes < most:
    logging.info('lanes per device: %d, of the %d the cohort fills: its clients packed longest '
                 'first run at most %d%% more local steps on them (config.lanes_per_device '
                 'sets it)', lanes, most, round(100 * LANE_STEP_SLACK))
  return lanes


# Models whose local-step loop runs far slower inside a device loop than as a program per step
# on XLA:CPU when any pass of their convolutions is XLA's (docs/benchmarks.md: the EMNIST CNN
# at ~0.1x of its centralized speed); with conv='matmul' the device loop is the faster one.
HOST_LOOP_ON_CPU = frozenset({'emnist_cnn'})


def _local_devices(mesh) -> int:
  """The mesh's devices that this process drives."""
  return sum(d.process_index == jax.process_index() for d in mesh.devices.flat)


def _device_memory(mesh) -> int:
  """An accelerator's memory in bytes (0 on CPU, or where the runtime does not say), the same
  on every process: each asks a device it drives (a pod's or several GPUs' runtime refuses the
  stats of another process's device, or reports zeros), and all take the smallest, since the
  choices made from it shape every process's programs."""
  device = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
  limit = 0
  if device.platform != 'cpu':
    limit = int((device.memory_stats() or {}).get('bytes_limit', 0))
  return distributed.smallest(min(limit >> 20, 2**31 - 1)) << 20  # (in MiB: an int32)


def _resident_bytes(mesh) -> int:
  """The largest training set that data_on_device='auto' keeps on each device."""
  if mesh.devices.flat[0].platform == 'cpu':
    # Every CPU device's copy lives in the host's memory, which the limit is there to spare.
    return RESIDENT_BYTES // max(_local_devices(mesh), 1)
  return max(RESIDENT_BYTES, int(_device_memory(mesh) * RESIDENT_FRACTION))


def _local_loop(config, mesh, conv: str) -> str:
  if config.local_loop != 'auto':
    return config.local_loop
  cpu = mesh.devices.flat[0].platform == 'cpu'
  slow_in_loop = config.model.name in HOST_LOOP_ON_CPU and 'xla' in conv.split('/')
  return 'host' if cpu and slow_in_loop else 'device'


def _loop_chunk(config, local_loop: str) -> int:
  """config.loop_chunk resolved: 'auto' (0) checks the device loop's bound at every step, the
  one form measured so far. The host-driven loop calls one step at a time up to the longest
  lane, so it has no chunk: a chunk set for it is said to change nothing."""
  if local_loop == 'host':
    if config.loop_chunk > 1:
      logging.warning('config.loop_chunk=%d is not read: the local loop is driven by the '
                      'host (%s), one step a call', config.loop_chunk, _host_chosen(config))
    return 1
  return config.loop_chunk or 1


def _host_chosen(config) -> str:
  # 'auto' picks the host loop by platform, model and convolution: the config alone cannot
  # tell, so a message about the host loop says who chose it.
  return ("config.local_loop='host'" if config.local_loop == 'host' else
          "config.local_loop='auto' chose it for this model and platform")


def _compile_ahead(config, mesh, local_loop: str) -> bool:
  """config.compile_ahead resolved. Only the device loop's round is one program to compile
  ahead. 'auto': on accelerators, where B can move (FATHOM; FedAvg's B never does); on CPU a
  compile on a thread takes a core from training and saves little (a CPU round program
  compiles in ~1-3 s)."""
  if local_loop != 'device':
    if config.compile_ahead == 'yes':
      logging.warning("config.compile_ahead='yes' compiles only the evaluation ahead: the "
                      'local loop is driven by the host (%s), one jitted step a call, with no '
                      'round program to compile ahead', _host_chosen(config))
    return False
  if config.compile_ahead == 'no':
    return False
  if config.compile_ahead == 'yes':
    return True
  return batch_moves(config) and mesh.devices.flat[0].platform != 'cpu'


def _evaluation_ahead(config, mesh) -> bool:
  """config.compile_ahead resolved for the evaluation's program: one program whatever the
  algorithm and local loop, so 'auto' compiles it ahead on every accelerator (FedAvg's first
  evaluation would otherwise wait for its compile, seconds on a GPU), 'yes' everywhere."""
  if config.compile_ahead == 'auto':
    return mesh.devices.flat[0].platform != 'cpu'
  return config.compile_ahead == 'yes'


def _first_examples(task: Task, n: int) -> dict:
  """Up to n training examples of the first client that has any (for shapes)."""
  first = int(np.flatnonzero(np.asarray(task.train.num_examples) > 0)[0])
  return {k: v[:n] for k, v in task.train.client(first).items()}


def _check_model_fits(model: models.Model, name: str, task: Task) -> int:
  """Traces init and loss on two examples (no compute), so a mismatch fails with one line;
  returns the bytes of the model's parameters."""
  sample = _first_examples(task, 2)
  key = jax.random.PRNGKey(0)
  try:
    def init_and_loss():
      params = model.init(key, sample)
      return params, model.loss(params, sample, jnp.ones(len(sample['y']), bool), key)

    params, _ = jax.eval_shape(init_and_loss)  # (one trace of init, not two)
    return sum(math.prod(p.shape) * p.dtype.itemsize for p in jax.tree.leaves(params))
  except Exception as e:  # whatever the model's own error, report it against the data
    shapes = ', '.join(f'{k} {v.shape[1:]} {v.dtype}' for k, v in sample.items())
    raise DatasetError(f'{task.name}: examples ({shapes}) do not fit '
                       f'config.model.name={name!r}, which takes {models.TAKES[name]} per '
                       f'example ({first_line(e)})') from None


def _warn_integer_inputs(name: str, task: Task) -> None:
  """Says so when a model of float inputs is given integers above 1 (images saved as 0..255):
  they are used as they are, which trains at up to 255x the input scale the public image sets
  (FEMNIST's [0, 1]) and their learning rates assume. Integers may be meant (counts), so no
  error; token ids are the sequence models' own input."""
  x = getattr(task.train, 'features', {}).get('x')
  if name in models.SEQUENCE_MODELS or x is None or not np.issubdtype(x.dtype, np.integer):
    return
  top = int(x.max()) if x.size else 0
  if top > 1:
    logging.warning('%s: x holds integers (%s) up to %d, which config.model.name=%r takes as '
                    'inputs as they are; if they are pixel intensities, scale them to [0, 1] '
                    'first, as the public image datasets hold them', task.name, x.dtype, top,
                    name)


def _memory_bytes(mesh) -> tuple[int, str]:
  """The memory one device's step can use at most, and what it is: an accelerator's own, or
  the host's for CPU devices (which all share it)."""
  limit = _device_memory(mesh)
  if limit:
    return limit, f'one {mesh.devices.flat[0].platform} device\'s memory'
  return host_memory(), "the host's memory"


def _model_sized_by(config, task: Task) -> str:
  """What sizes the model, said where it is too big: npz data sets its classes too, from its
  largest label where data.num_classes is 0 (one stray label of 10^9 made a 242 GiB model,
  blamed on config.model alone)."""
  fields = '(config.model.hidden, config.model.name)'
  if config.data.name != 'npz':
    return fields
  taken = (f'the largest label of {config.data.path} + 1, as data.num_classes is 0'
           if not config.data.num_classes else 'config.data.num_classes')
  return f'{fields}, or fewer classes ({task.num_classes:,}: {taken})'


def _check_params_fit(param_bytes: int, mesh, sized_by: str) -> None:
  """Refuses, before the workdir is touched, a model whose parameters alone exceed a device's
  memory (on CPU, the host's, which holds every device's copy): its first state ran out of
  memory after config.json and the lock were made."""
  copies = _local_devices(mesh) if mesh.devices.flat[0].platform == 'cpu' else 1
  limit, what = _memory_bytes(mesh)
  if param_bytes * copies > limit:
    raise ConfigError(f'config.model: its parameters alone take {param_bytes / 2**30:.1f} GiB'
                      + (f' (x{copies} devices\' copies)' if copies > 1 else '')
                      + f', more than {what} ({limit / 2**30:.1f} GiB); a smaller model '
                      + sized_by)


def _check_first_round_fits(config, task: Task, mesh, lanes: int) -> None:
  """Refuses an (E, B) whose first round cannot run, before the workdir is touched: a client's
  batch indices past int32, one local step whose input batches alone (a lower bound of what
  the step needs) exceed the memory, or a round's plan of the largest client's batch indices
  past the host's memory. FedAvg runs these values every round; FATHOM starts from them
  (config.upper_* bound where it may go)."""
  n_max = int(np.max(task.train.num_examples))
  b_int = _check_addressable(n_max, config.epochs, config.batch_size, 'epochs', 'batch_size')
  fields = f'config.epochs={config.epochs:g}, config.batch_size={config.batch_size:g}'
  example = sum(v.nbytes for v in _first_examples(task, 1).values())
  cpu = mesh.devices.flat[0].platform == 'cpu'  # CPU devices of a host share its memory
  on_one = lanes * (_local_devices(mesh) if cpu else 1)
  need = b_int * example * on_one
  limit, what = _memory_bytes(mesh)
  if need > limit:
    raise ConfigError(f'{fields}: one local step of {b_int} examples ({example} bytes each) on '
                      f'{on_one} client(s) side by side needs {need / 2**30:.1f} GiB for its '
                      f'inputs alone, more than {what} ({limit / 2**30:.1f} GiB); lower '
                      'config.batch_size')
  # The evaluation's batches are made whole on the host, then split over the devices.
  test_examples = int(np.sum(task.test.num_examples))
  rows = evaluation.batch_rows(config.eval_batch_size, task.test.num_examples)
  eval_need = rows * example // (1 if cpu else mesh.devices.size)
  if eval_need > limit:
    raise ConfigError(f'config.eval_batch_size={config.eval_batch_size}: one evaluation batch '
                      f'of {rows} examples ({example} bytes each, the test set holds '
                      f'{test_examples}) needs {eval_need / 2**30:.1f} GiB for its inputs alone, '
                      f'more than {what} ({limit / 2**30:.1f} GiB); lower it (1024 by default)')
  # A round with the largest client plans each lane's row of indices at least that long; so
  # does the first round, its cohort (no smaller than the smallest clients) spread evenly over
  # the lanes (all 20 of the quickstart's clients share the one lane of a 2-core CPU).
  all_lanes = lanes * mesh.devices.size
  steps = fathom.integer_schedule(config.epochs, config.batch_size, task.train.num_examples)[1]
  largest = int(steps.max()) * b_int
  cohort = min(config.cohort_size, len(steps))
  spread = -(-int(np.sort(steps)[:cohort].sum()) // all_lanes) * b_int
  indices = max(largest, spread)
  held = plan_bytes(indices, all_lanes)
  why = (f'a round with the largest client ({n_max} examples) plans' if largest >= spread else
         f'the first round\'s {cohort} clients over {all_lanes} lane(s) plan at least')
  fix = 'lower config.epochs or raise config.batch_size'
  if spread >= MAX_INDICES:  # (the largest client alone is _check_addressable's)
    raise ConfigError(f'{fields}: {why} {indices} example indices in a lane, past the '
                      f'{MAX_INDICES} a round can address; {fix}, or spread the cohort over '
                      'more lanes (config.lanes_per_device, devices)')
  if held > host_memory():
    raise ConfigError(f'{fields}: {why} {indices} example indices for each of its '
                      f'{all_lanes} lane(s), {held / 2**30:.1f} GiB, more than the host\'s '
                      f'memory ({host_memory() / 2**30:.1f} GiB); {fix}')
  if config.algorithm == 'fathom':
    # Where FATHOM may take E and B: past this, a round would fail mid-run in planning.
    _check_addressable(n_max, config.upper_epochs, config.upper_batch_size, 'upper_epochs',
                       'upper_batch_size', 'FATHOM may move E and B up to these bounds, where ')


def _check_addressable(n_max: int, epochs: float, batch_size: float, e_field: str,
                       b_field: str, why: str = '') -> int:
  """B_int for (E, B); refuses them when the largest client's round would take 2^31 example
  indices or more."""
  b_int = fathom.batch_size_int(batch_size)
  steps = np.ceil(np.float64(epochs) * n_max / b_int)
  # Far past the limit, integer_schedule's int64 steps would wrap around (negative, E 1e20).
  if steps * b_int < 2 * MAX_INDICES:
    steps = int(fathom.integer_schedule(epochs, batch_size, [n_max])[1][0])
  if steps * b_int >= MAX_INDICES:
    raise ConfigError(f'config.{e_field}={epochs:g}, config.{b_field}={batch_size:g}: {why}the '
                      f'largest client ({n_max} examples) would take {steps:.0f} local steps '
                      f'of {b_int} examples in a round, past the 2^31 example indices a round '
                      'can address; lower them')
  return b_int


def init_state(run: Run) -> ServerState:
  """Round 0: fresh model from the seed, optimizer states, phi = log of the initial values."""
  c = run.config
  params = run.model.init(rng.init_key(c.seed), _first_examples(run.task, 1))
  state = ServerState(params=params, opt_state=run.server_opt.init(params),
                      hyper=run.tuner.init(params, (c.epochs, c.eta, c.batch_size)),
                      round=jnp.int32(0), rng=rng.base_key(c.seed))
  return put(state, replicated(run.mesh))
