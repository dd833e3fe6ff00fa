"""Throughput of the simulator against centralized training of the same model (run by hand).

  python launch/benchmark.py --tasks=cnn,lstm --cohort_sizes=10,50,100,200 --json=bench.json

For each (task, cohort size): FedAvg rounds with static (eta, E, B) after warm-up rounds, then
the same model trained centrally with the same per-step batch over the same clients' examples
(the ceiling), measured right after, so both sides share the machine's state. The ceiling runs
on one device (the mesh's first), one jitted step per batch, timed in chunks: its rate is their
median (the JSON keeps the slowest and fastest). Reports rounds/s, client examples/s (Σ K_i·B_int
over the timed rounds), the ratio to centralized, padding efficiency (real over computed
example-gradients), the round programs compiled (`compiles`, as summary.json counts them; not
init, evaluation or the ceiling), host and device seconds per round, and the peaks of RSS and
device memory up to the end of the rounds, each row measured in a process of its own
(--isolate_rows).

Each measured round is timed alone; one that compiles any program is left out of the rates
and counted (`timed` k/n in the table), and its padding is counted with every measured
round's. Per round: `host s` is the host's work before the round is dispatched (sampling,
planning, sending, when not done ahead); `device s` runs from dispatch until the round's
metrics are back, an upper bound of the devices' time, since the host plans and sends the next
round in that window (`ahead s`, its part of `device s`).
"""

import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from launch import cli  # noqa: E402
from launch.timing import peak_rss_gib  # noqa: E402

TASKS = ('mlp', 'cnn', 'lstm')
_TASKS = flags.DEFINE_list('tasks', ['cnn'], f'Tasks among {TASKS}: mlp = Synthetic(1,1) with '
                           'the quickstart MLP, cnn = FEMNIST-shaped data with the EMNIST CNN, '
                           'lstm = Stack-Overflow-shaped tokens with the paper\'s LSTM.')
_COHORTS = flags.DEFINE_list('cohort_sizes', ['10', '50', '100', '200'], 'Clients per round.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Measured rounds per cohort size.')
_WARMUP = flags.DEFINE_integer('warmup', 1, 'Rounds before measuring (compilation).')
_NUM_CLIENTS = flags.DEFINE_integer('num_clients', 1000, 'Clients of the generated data.')
_NUM_DEVICES = flags.DEFINE_integer('num_devices', 0, 'Devices of the clients mesh (0 = all).')
_LANES = flags.DEFINE_integer('lanes_per_device', 0, 'Lanes per device (0 = auto).')
_LOCAL_LOOP = flags.DEFINE_enum('local_loop', 'auto', ['auto', 'device', 'host'],
                                'Local steps: a loop on the device, or one program per step '
                                'driven by the host (auto: per platform and model).')
_LOOP_CHUNK = flags.DEFINE_integer(
    'loop_chunk', 0, 'Local steps the device loop runs between checks of its bound '
    '(config.loop_chunk; 0 = auto).')
_CONV = flags.DEFINE_string('conv', 'auto', 'The CNN\'s convolutions (config.model.conv: '
                            'auto, xla, matmul or a mix F/X/W; auto: matmul on CPU and GPU).')
_DTYPE = flags.DEFINE_enum(
    'compute_dtype', 'float32', ['float32', 'bfloat16'], 'The models\' activations and matrix '
    'products, in the rounds and in the centralized ceiling alike (config.model.compute_dtype).')
_PREFETCH = flags.DEFINE_bool(
    'prefetch', True, 'Read round t+1\'s clients (data read per round), plan it and send it to '
    'the devices while round t computes.')
_IN_MEMORY = flags.DEFINE_bool(
    'in_memory', False, 'Make every client once and hold the training set in memory (then on '
    'the devices, config.data_on_device auto) instead of making each round\'s clients.')
_LANE_UPDATE = flags.DEFINE_enum(
    'lane_update', 'xla', ['xla', 'pallas'], 'A lane\'s passes over its model at every local '
    'step (the SGD step, the sums for c_k, a client\'s end) as XLA\'s fusions or, on a GPU, as '
    'fathom_sim/lane_update.py\'s Pallas kernels (untimed yet: a candidate for benchmarks).')
_JSON = flags.DEFINE_string(
    'json', None, 'Write a JSON list here, one object per (task, cohort) row, rewritten after '
    'each row (an existing file is kept until the first row is measured, then replaced).')
_ISOLATE = flags.DEFINE_bool(
    'isolate_rows', True, 'Measure each (task, cohort) row in a process of its own. Peak RSS '
    'and device memory are peaks over a process\'s life: rows measured in one process would '
    'each show the largest peak of the rows before them (the data is then made once per row).')


def task_config(name: str, cohort_size: int):
  """FedAvg with the reference static values of the paper's tasks."""
  from fathom_sim.config import base_config
  c = base_config()
  c.algorithm = 'fedavg'
  c.cohort_size = cohort_size
  # One round past the measured ones, so that every measured round plans the next one ahead
  # (as in a run) and none finds its plan made during the warm-up only.
  c.num_rounds = _WARMUP.value + _ROUNDS.value + 1
  c.num_devices = _NUM_DEVICES.value
  c.lanes_per_device = _LANES.value
  c.local_loop = _LOCAL_LOOP.value
  c.loop_chunk = _LOOP_CHUNK.value
  c.model.conv = _CONV.value
  c.model.compute_dtype = _DTYPE.value
  c.data.num_clients = _NUM_CLIENTS.value
  c.data.in_memory = _IN_MEMORY.value  # femnist_synthetic; the LSTM's data: load()
  if name == 'mlp':
    c.data.name, c.model.name = 'synthetic', 'mlp'
  elif name == 'cnn':
    c.data.name, c.model.name = 'femnist_synthetic', 'emnist_cnn'
  elif name == 'lstm':
    c.eta, c.batch_size = 0.32, 16.0
    c.model.name = 'stackoverflow_lstm'
  else:
    raise ValueError(f'--tasks: unknown task {name!r}; choose from {TASKS}')
  return c


def load(name: str, config):
  """The task's data. With --in_memory it is made once per process and kept for every cohort
  size (for the CNN by load_task's own cache of data.in_memory)."""
  if name == 'lstm':
    return _stackoverflow_like(config.data.num_clients, config.data.seed, _IN_MEMORY.value)
  from fathom_sim.data import load_task
  return load_task(config.data)


@functools.lru_cache(maxsize=1)
def _stackoverflow_like(num_clients: int, seed: int, in_memory: bool):
  from fathom_sim.data.federated import materialize
  from fathom_sim.data.synthetic import stackoverflow_like
  task = stackoverflow_like(num_clients=num_clients, seed=seed)
  if in_memory:
    task = task._replace(train=materialize(task.train), test=materialize(task.test))
  return task




def ceiling_program(run, examples: dict, batch_size: int, steps: int, model=None, *,
                    every_device: bool = False):
  """The ceiling's jitted SGD step and its inputs, on the devices: (step, params, batches,
  keys, chains). `steps` + 1 batches of `batch_size` pooled examples; with `every_device`, one
  chain a device of the run's mesh, each its own model copy, batches and keys (the leading axis
  of each input, split over the devices), else one chain on one device."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import PartitionSpec as P
  from fathom_sim.mesh import CLIENTS, by_client
  from fathom_sim.run import init_state
  params = jax.device_get(init_state(run).params)
  grad = jax.value_and_grad((model or run.model).loss)
  mask = jnp.ones(batch_size, bool)

  def one_step(p, batch, key):
    loss, g = grad(p, batch, mask, key)
    return jax.tree.map(lambda w, gw: w - 0.01 * gw, p, g), loss

  n = len(examples['y'])
  chains = run.mesh.devices.size if every_device else 1
  order = np.random.default_rng(0).permutation(
      np.resize(np.arange(n), chains * (steps + 1) * batch_size))
  rows = [order[i * batch_size:(i + 1) * batch_size] for i in range(chains * (steps + 1))]
  # The keys are made before the clock starts: a fold_in from the host is a dispatch of its
  # own (~0.1 ms), 5x the MLP's step, where the rounds fold theirs inside their programs.
  keys = jax.random.split(jax.random.PRNGKey(0), (steps + 1) * chains)
  if not every_device:
    batches = [{k: jnp.asarray(v[rows[i]]) for k, v in examples.items()}
               for i in range(steps + 1)]
    return jax.jit(one_step), params, batches, list(keys), 1

  def local(p, batch, key):  # this device's chain: its slice of the leading axis
    p, loss = one_step(*jax.tree.map(lambda a: a[0], (p, batch, key)))
    return jax.tree.map(lambda a: a[None], (p, loss))

  # check_vma off, as the rounds' own shard_map: the LSTM's scan starts its carry from zeros,
  # which the check takes as unvarying across devices and refuses against the varying output.
  step = jax.jit(jax.shard_map(local, mesh=run.mesh, in_specs=P(CLIENTS), out_specs=P(CLIENTS),
                               check_vma=False))
  shard = by_client(run.mesh)
  params = jax.device_put(jax.tree.map(lambda a: np.stack([a] * chains), params), shard)
  batches = [jax.device_put({k: np.stack([v[rows[i * chains + c]] for c in range(chains)])
                             for k, v in examples.items()}, shard) for i in range(steps + 1)]
  keys = [jax.device_put(keys[i * chains:(i + 1) * chains], shard) for i in range(steps + 1)]
  return step, params, batches, keys, chains


def centralized_examples_per_s(run, examples: dict, batch_size: int, steps: int,
                               model=None, *, every_device: bool = False) -> dict:
  """One jitted SGD step per batch of `batch_size` of the pooled examples, on one device: the
  ceiling. Returns its median rate over chunks of the steps, and the slowest and fastest.

  `model`: another implementation of the run's model (same parameters) to time instead.
  `every_device`: one such chain on each device of the run's mesh at once, each its own model
  and batches (what the rounds' lanes do, without padding or aggregation), counted together:
  the ceiling of the whole mesh at this per-step batch. On CPU the forced host devices share
  the machine's cores, so one device's chain may already use all of them.
  """
  from launch import timing
  step, params, batches, keys, chains = ceiling_program(
      run, examples, batch_size, steps, model, every_device=every_device)
  params, loss = step(params, batches[0], keys[0])  # compile
  loss.block_until_ready()
  held = [params, loss]

  def one(i):
    held[:] = step(held[0], batches[i], keys[i])

  return timing.chunk_rates(one, lambda: held[1].block_until_ready(), steps,
                            chains * batch_size)


def device_peak_gib(mesh) -> float | None:
  """The largest peak of memory in use on one of the mesh's devices since the process began
  (None where the platform keeps no such count, as on CPU)."""
  peaks = [(d.memory_stats() or {}).get('peak_bytes_in_use') for d in mesh.devices.flat]
  return None if None in peaks else max(peaks) / 2**30


BACKEND_COMPILE = '/jax/core/compile/backend_compile_duration'  # jax.monitoring's event


class CompileCounter:
  """Counts XLA compilations (any program, any thread) while in a `with` block. A program
  loaded from JAX's persistent cache (e.g. with $JAX_COMPILATION_CACHE_DIR set) fires the
  same event and counts too: a round that waits for either is not a steady-state round."""

  def __init__(self):
    self.count = 0

  def __call__(self, event: str, duration: float, **kwargs) -> None:
    if event == BACKEND_COMPILE:
      self.count += 1

  def __enter__(self):
    from jax import monitoring
    monitoring.register_event_duration_secs_listener(self)
    return self

  def __exit__(self, *exc):
    from jax import monitoring
    monitoring.unregister_event_duration_listener(self)


# The flags that set a config field build() checks against the data and devices.
_FLAG_FIELDS = (('--cohort_sizes, --num_clients', 'cohort_size'),
                ('--num_clients', 'data.num_clients'),
                ('--num_devices', 'num_devices'), ('--lanes_per_device', 'lanes_per_device'),
                ('--local_loop', 'local_loop'), ('--loop_chunk', 'loop_chunk'),
                ('--conv', 'model.conv'), ('--compute_dtype', 'model.compute_dtype'))


def _named_by_flags(e: Exception) -> str:
  """A config error in the terms of the flags that set its field."""
  flagged = [f for f, field in _FLAG_FIELDS if f'config.{field} ' in str(e)]
  return f'{e} (set by benchmark.py\'s {", ".join(flagged) or "flags"})'


def measure(name: str, cohort_size: int) -> dict:
  import jax
  from fathom_sim.data.federated import concat_clients
  from fathom_sim.driver import Rounds
  from fathom_sim import provenance
  from fathom_sim.config import ConfigError
  from fathom_sim.run import build, init_state
  config = task_config(name, cohort_size)
  try:
    run = build(config, load(name, config))
  except ConfigError as e:  # checks against the data and devices, in the config's words
    if not any(f'config.{field} ' in str(e) for _, field in _FLAG_FIELDS):
      raise
    raise ConfigError(_named_by_flags(e)) from None
  n_dev = run.mesh.devices.size
  rounds = Rounds(run, prefetch=_PREFETCH.value)
  state = init_state(run)
  hp = rounds.initial_hparams(state)
  for t in range(1, _WARMUP.value + 1):
    state, _, _ = rounds(state, t, hp)
  # Each measured round is timed on its own. A round that compiled anything (a client larger
  # than the warm-up's grew a padded length) is left out of the rates and counted: its time
  # is mostly the compile, which --warmup is there to exclude. Its padding is not a matter of
  # time, and it is counted: such a round holds the largest client seen yet, so its longest
  # lane tends to be the least balanced, and leaving it out would flatter the efficiency.
  examples = epoch_examples = real_all = computed_all = lockstep_all = 0
  wall = host = device = ahead = 0.0
  clients = []
  timed = recompiled = compiles_timed = 0
  for t in range(_WARMUP.value + 1, _WARMUP.value + _ROUNDS.value + 1):
    with CompileCounter() as counter:
      start = time.perf_counter()
      state, _, plan = rounds(state, t, hp)
      took = time.perf_counter() - start
    clients.extend(plan.clients.tolist())
    real = plan.useful_rows()
    real_all += real
    computed_all += plan.computed_rows(n_dev, run.local_loop == 'host', run.loop_chunk)
    # The round's collectives wait for the device with the longest lane: counted as if every
    # device ran that long, the waiting shows where a device runs short of the others.
    lockstep_all += plan.lockstep_rows(n_dev, run.local_loop == 'host', run.loop_chunk)
    if counter.count:
      recompiled += 1
      compiles_timed += counter.count
      continue
    timed += 1
    wall += took
    examples += real
    epoch_examples += float(plan.num_examples.sum()) * float(hp[0])  # E passes over the data
    host += rounds.last_host_s
    device += rounds.last_device_s
    ahead += rounds.last_ahead_s
  if not timed:
    from fathom_sim.config import ConfigError
    raise ConfigError(f'{name} at cohort {cohort_size}: each of the {_ROUNDS.value} measured '
                       'round(s) compiled a program; raise --warmup (or --rounds)')
  rounds.close()
  # The process's peaks up to the end of the rounds (data, init and warm-up included), before
  # the ceiling adds its own; a row's own only in a process of its own (--isolate_rows).
  peak_rss = peak_rss_gib()
  device_peak = device_peak_gib(run.mesh)
  fed = examples / wall
  pooled = concat_clients(run.task.train, sorted(set(clients)))
  b_int = plan.batch_size
  steps = max(20, min(examples // b_int, 400))
  ceiling = centralized_examples_per_s(run, pooled, b_int, steps)
  ceiling_conv = run.conv if config.model.name == 'emnist_cnn' else None
  if config.model.name == 'emnist_cnn':
    # The ceiling is the fastest of the rounds' own convolution form and the CNN's two plain
    # ones, each trained centrally (on CPU one jitted step of nn.Conv beats the matmul form).
    from fathom_sim.models import CONV_IMPLS, get_model
    for conv in CONV_IMPLS:
      if conv != run.conv:
        other = get_model('emnist_cnn', num_classes=run.task.num_classes, conv=conv,
                          compute_dtype=config.model.compute_dtype)
        timing = centralized_examples_per_s(run, pooled, b_int, steps, other)
        if timing['median'] > ceiling['median']:
          ceiling, ceiling_conv = timing, conv
  central = ceiling['median']
  whole_mesh = None
  if n_dev > 1:  # the same chain on every device at once: the mesh's own ceiling
    fastest = None
    if config.model.name == 'emnist_cnn' and ceiling_conv != run.conv:
      from fathom_sim.models import get_model
      fastest = get_model('emnist_cnn', num_classes=run.task.num_classes, conv=ceiling_conv,
                          compute_dtype=config.model.compute_dtype)
    whole_mesh = centralized_examples_per_s(run, pooled, b_int, steps, fastest,
                                            every_device=True)['median']
  r = timed
  platform = run.mesh.devices.flat[0].platform
  return {'task': name, 'cohort_size': cohort_size, 'rounds_per_s': r / wall,
          'examples_per_s': fed, 'centralized_examples_per_s': central,
          'centralized_examples_per_s_min': ceiling['min'],
          'centralized_examples_per_s_max': ceiling['max'],
          'centralized_chunks': ceiling['chunks'],
          'centralized_steps_per_chunk': ceiling['steps_per_chunk'],
          'centralized_devices': 1, 'centralized_conv': ceiling_conv,
          # One chain on each of the devices at once (None on one device: the same as above).
          'centralized_every_device_examples_per_s': whole_mesh,
          'ratio_to_centralized_every_device': None if whole_mesh is None else fed / whole_mesh,
          # E * n_i per client (what FedJAX counts): examples_per_s also counts the examples
          # a client's last step re-reads to fill its batch.
          'epoch_examples_per_s': epoch_examples / wall,
          'ratio_to_centralized': fed / central, 'padding_efficiency': real_all / computed_all,
          'lockstep_padding_efficiency': real_all / lockstep_all,
          'compiles': rounds.compiles, 'rounds_timed': timed, 'rounds_recompiled': recompiled,
          'compiles_while_measuring': compiles_timed, 'host_s_per_round': host / r,
          'device_s_per_round': device / r, 'ahead_s_per_round': ahead / r,
          'batch_size': b_int,
          'lanes': rounds.planner.num_lanes, 'devices': n_dev, 'local_loop': run.local_loop,
          'loop_chunk': run.loop_chunk,
          'conv': run.conv, 'compute_dtype': config.model.compute_dtype,
          # What ran: the kernels only in a program for a GPU (elsewhere lane_update's jnp).
          'lane_update': _LANE_UPDATE.value if platform == 'gpu' else 'xla',
          'resident': run.resident, 'prefetch': rounds.prefetching,
          'planned_ahead': rounds.planned_ahead, 'replanned': rounds.replanned,
          'replanned_seeds': rounds.replanned_seeds,
          'platform': platform,
          'device_kind': run.mesh.devices.flat[0].device_kind, 'pid': os.getpid(),
          'peak_rss_gib': peak_rss, 'device_peak_gib': device_peak,
          'jax': jax.__version__, 'date': time.strftime('%Y-%m-%d'),
          'commit': provenance.source_commit(), 'xla_flags': os.environ.get('XLA_FLAGS', '')}


def _gib(value: float | None) -> str:
  return '-' if value is None else f'{value:.2f}'


# Set for a row's own process (--isolate_rows): it measures and writes --json, and leaves the
# table to the command that started it.
_ROW_PROCESS = 'FATHOM_BENCHMARK_ROW'


def _stop_with_the_command() -> None:
  """Ends this row's process once the command that started it is gone, however it ended (a
  SIGKILL, the kernel's out-of-memory killer): that command left the row measuring for
  minutes on the device, with no one to print it. Its stdin is a pipe only that command
  writes to, closed (end of file) when it ends."""
  def watch():
    try:  # (the file descriptor, not sys.stdin: a daemon thread blocked holding sys.stdin's
      while os.read(0, 1 << 16):  # lock aborted the interpreter's shutdown, signal 6)
        pass
    except OSError:  # (no stdin to read: nothing to watch)
      return
    try:  # (the reader of the inherited stderr may be gone too: the row stops regardless)
      os.write(2, b'error: the benchmark command that started this row is gone; the row '
               b'stops\n')
    except OSError:
      pass
    finally:
      os._exit(1)

  threading.Thread(target=watch, name='row-command-watch', daemon=True).start()


def main(argv):
  cli.setup_logging()
  # The checks and imports before the rows take seconds: a SIGTERM or Ctrl-C among them is
  # said in the same line as one during a row, not as a traceback.
  cli.run_or_exit(lambda: _benchmark(argv), interrupted=lambda e: '; '.join(
      [f'stopped by {"SIGTERM" if isinstance(e, cli.Terminated) else "Ctrl-C"}']
      + _rows_kept()))


def _rows_kept() -> list[str]:
  """What --json holds when the command stops before its last row ([] where nothing)."""
  if _measured[0] and _JSON.value:
    return [f'the {_measured[0]} row(s) measured before it are in {_JSON.value}']
  return []


def _benchmark(argv) -> None:
  """Checks the flags and every row's config, then measures the rows."""
  if os.environ.get(_ROW_PROCESS):
    _stop_with_the_command()
  else:  # (a row's own process keeps the default: the command that started it says the line)
    cli.terminate_as_interrupt()
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {" ".join(argv[1:])!r}: benchmark.py takes flags only')
  if not _TASKS.value:
    cli.fail(f'--tasks must name at least one task among {", ".join(TASKS)}')
  for name in _TASKS.value:
    if name not in TASKS:
      cli.fail(f'--tasks: unknown task {name!r}; choose from {", ".join(TASKS)}')
  try:
    cohorts = [int(c) for c in _COHORTS.value]
  except ValueError:
    cohorts = []
  if not cohorts or min(cohorts) < 1:
    cli.fail(f'--cohort_sizes must be integers >= 1, got {",".join(_COHORTS.value)!r}')
  # (Each was measured again, and --json held two rows of one key.)
  for flag, values in (('--cohort_sizes', cohorts), ('--tasks', _TASKS.value)):
    twice = sorted({str(v) for v in values if values.count(v) > 1})
    if twice:
      cli.fail(f'{flag} names {", ".join(twice)} twice; give each once')
  # Checked here, in the flags' own terms, before any row runs: --rounds=0 would otherwise
  # fail after the warm-up, and a negative --warmup would silently measure fewer rounds.
  if _ROUNDS.value < 1:
    cli.fail(f'--rounds must be >= 1, got {_ROUNDS.value}')
  if _WARMUP.value < 0:
    cli.fail(f'--warmup must be >= 0, got {_WARMUP.value}')
  if _NUM_CLIENTS.value < 1:
    cli.fail(f'--num_clients must be >= 1, got {_NUM_CLIENTS.value}')
  if max(cohorts) > _NUM_CLIENTS.value:  # (found by its row, after the rows before it ran)
    cli.fail(f'--cohort_sizes: a cohort of {max(cohorts)} is more clients than --num_clients '
             f'({_NUM_CLIENTS.value}) generates; raise --num_clients or lower the cohort')
  if _JSON.value:
    _check_writable(_JSON.value)
  from fathom_sim.config import ConfigError, check_config
  try:  # every row's config, before any row runs
    for name in _TASKS.value:
      for cohort in cohorts:
        check_config(task_config(name, cohort))
  except ConfigError as e:
    cli.fail(_named_by_flags(e))
  header = (f'{"task":5} {"cohort":>6} {"rounds/s":>9} {"ex/s":>9} {"central ex/s":>12} '
            f'{"ratio":>6} {"padding":>7} {"compiles":>8} {"host s":>7} {"device s":>8} '
            f'{"ahead s":>7} {"RSS GiB":>7} {"dev GiB":>7} {"timed":>5}')
  if not os.environ.get(_ROW_PROCESS):
    print(header, flush=True)  # before the rows' processes write to the same stdout
  from fathom_sim import lane_update
  lane_update.PALLAS = _LANE_UPDATE.value == 'pallas'
  _rows(cohorts)


_measured = [0]  # rows measured so far (and written to --json)


def _check_writable(path: str) -> None:
  """Ends the command unless --json can be written, before the measurement rather than after
  it; an existing file is opened for appending, so its contents stay until the first row."""
  if os.path.isdir(path):
    cli.fail(f'--json {path!r} is a folder; give a file (in an existing, writable folder)')
  # The file is replaced whole after each row: a link would become a file, a device node
  # (/dev/null, as root) a file, and opening a FIFO here waited for a reader for ever.
  if os.path.islink(path):
    cli.fail(f'--json {path!r} is a link, which each row\'s write would replace with a file; '
             f'give its target, {os.path.realpath(path)!r}')
  if os.path.exists(path) and not os.path.isfile(path):
    cli.fail(f'--json {path!r} is not a regular file (a FIFO, a device), which each row\'s '
             'write would replace with a file; give a regular file\'s path')
  try:
    if os.path.exists(path):
      open(path, 'a', encoding='utf-8').close()
    else:
      open(path, 'x', encoding='utf-8').close()
      os.remove(path)
  except OSError as e:
    cli.fail(f'--json {path!r} cannot be written ({e.strerror or e}); give a file in an '
             'existing, writable folder')


def _rows(cohorts: list[int]) -> None:
  """Measures and prints each (task, cohort) row, rewriting --json after each."""
  results = []
  for name in _TASKS.value:
    for cohort in cohorts:
      r = _measure_in_child(name, cohort) if _ISOLATE.value else _measure_or_fail(name, cohort)
      results.append(r)
      if not os.environ.get(_ROW_PROCESS):
        _print_row(name, cohort, r)
      if _JSON.value:  # replaced whole: a kill mid-write keeps the rows measured before
        from fathom_sim import metrics
        metrics.write_text(_JSON.value, json.dumps(results, indent=2) + '\n')
      _measured[0] = len(results)


def _measure_or_fail(name: str, cohort: int) -> dict:
  """measure(), with a device running out of memory said in one line (the rows measured
  before it stay in --json)."""
  import jax
  from fathom_sim.config import ConfigError
  from fathom_sim.mesh import out_of_memory
  try:
    with CompileCounter() as everything:
      row = measure(name, cohort)
    # Every XLA program of the row, compiled or loaded from the cache: init, rounds,
    # evaluation, the ceiling's steps.
    return {**row, 'xla_compiles': everything.count}
  except (jax.errors.JaxRuntimeError, ValueError, MemoryError) as e:
    xla = out_of_memory(e)
    if xla is None:
      raise
    raise ConfigError(f'{name} at cohort {cohort} ran out of memory ({xla}); measure it on a '
                      'device with more memory, or with fewer --lanes_per_device') from None


def _print_row(name: str, cohort: int, r: dict) -> None:
  print(f'{name:5} {cohort:>6} {r["rounds_per_s"]:>9.3f} {r["examples_per_s"]:>9.1f} '
        f'{r["centralized_examples_per_s"]:>12.1f} {r["ratio_to_centralized"]:>6.3f} '
        f'{r["padding_efficiency"]:>7.3f} {r["compiles"]:>8} {r["host_s_per_round"]:>7.3f} '
        f'{r["device_s_per_round"]:>8.3f} {r["ahead_s_per_round"]:>7.3f} '
        f'{r["peak_rss_gib"]:>7.2f} {_gib(r["device_peak_gib"]):>7} '
        f'{r["rounds_timed"]:>2}/{r["rounds_timed"] + r["rounds_recompiled"]:<2}', flush=True)
  if r['centralized_every_device_examples_per_s'] is not None:
    print(f'  (ceiling with a chain on each of the {r["devices"]} devices at once: '
          f'{r["centralized_every_device_examples_per_s"]:.1f} ex/s, ratio '
          f'{r["ratio_to_centralized_every_device"]:.3f})', flush=True)
  if r['rounds_recompiled']:
    print(f'  ({r["rounds_recompiled"]} measured round(s) compiled a program and were left out '
          'of the rates; a larger --warmup measures more rounds)', flush=True)


def _measure_in_child(name: str, cohort: int) -> dict:
  """measure(name, cohort) in a child process run with this command's flags (its own
  peaks). A child that fails has said why on stderr; this process exits with its status."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'row.json')
    # absl keeps the last value of a repeated flag: these override the command's own.
    argv = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], f'--tasks={name}',
            f'--cohort_sizes={cohort}', '--noisolate_rows', f'--json={out}']
    # Its log lines (absl's, on stdout) pass through; its table row is printed here. It
    # starts with Ctrl-C ignored (Python then leaves it so): this process alone says it, and
    # ends the row (the row's own KeyboardInterrupt was a second, traceback-long message).
    child, previous = None, signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
      try:
        child = subprocess.Popen(argv, env={**os.environ, _ROW_PROCESS: '1'},
                                 stdin=subprocess.PIPE)  # (_stop_with_the_command)
      finally:
        signal.signal(signal.SIGINT, previous)
      child.wait()
    except BaseException:  # (a Ctrl-C from the moment the handler is back)
      if child is not None:
        child.kill()
        child.wait()
      raise
    if child.returncode != 0:
      if child.returncode < 0:
        killed = -child.returncode
        print(f'error: the row {name} at cohort {cohort} was ended by signal {killed}'
              + (' (SIGKILL: also what the kernel\'s out-of-memory killer sends; see dmesg)'
                 if killed == signal.SIGKILL else ''), file=sys.stderr)
      for said in _rows_kept():  # (as a signal's line says them)
        print(said, file=sys.stderr)
      sys.exit(child.returncode if child.returncode > 0 else 1)
    with open(out, encoding='utf-8') as f:
      return json.load(f)[0]


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags_or_exit)  # a bad flag: one line, exit 2
