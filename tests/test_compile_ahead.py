"""Compiling the round ahead for the neighbouring padded batch sizes (compile_ahead.py)."""

import functools
import threading
import time

import jax
import numpy as np
import pytest
from jax import monitoring

from fathom_sim import compile_cache
from fathom_sim.compile_ahead import CompileAhead
from fathom_sim.config import base_config
from fathom_sim.data.plan import bucket, neighbour_buckets
from fathom_sim.driver import Rounds
from fathom_sim.mesh import make_mesh
from fathom_sim.run import build, init_state
from fathom_sim.types import BATCH
from launch.benchmark import BACKEND_COMPILE  # the event the benchmark counts compiles by
from tests.common import tiny_config, tiny_task


@pytest.mark.parametrize('per_octave', [1, 2, 4])
@pytest.mark.parametrize('min_batch_pad', [1, 5])
def test_neighbour_buckets_are_the_adjacent_reachable_padded_sizes(per_octave, min_batch_pad):
  max_b = 100
  reachable = sorted({bucket(max(b, min_batch_pad), per_octave) for b in range(1, max_b + 1)})
  for i, pad in enumerate(reachable):
    expected = reachable[max(i - 1, 0):i] + reachable[i + 1:i + 2]
    assert neighbour_buckets(pad, per_octave, min_batch_pad=min_batch_pad,
                             max_batch_size=max_b) == expected, pad


def _grid_neighbours(pad):
  grid = [3, 4, 6, 8, 12, 16]
  i = grid.index(pad)
  return grid[max(i - 1, 0):i] + grid[i + 1:i + 2]


@pytest.mark.parametrize('reach, expected', [(1, [4, 8]), (2, [4, 8, 3, 12]),
                                             (3, [4, 8, 3, 12, 16])])
def test_the_sizes_around_a_pad_come_nearest_first_within_reach(reach, expected):
  ahead = CompileAhead(None, _grid_neighbours, reach=reach)
  assert ahead._around(6) == expected
  ahead.close()


class _SlowLowering:
  """A lower() thunk whose compile() takes `seconds` and records that it ran."""

  def __init__(self, seconds: float):
    self.seconds, self.started, self.compiled = seconds, threading.Event(), threading.Event()
    self.release = threading.Event()  # ends the compile before `seconds`

  def __call__(self):
    return self

  def compile(self):
    self.started.set()
    self.release.wait(self.seconds)
    self.compiled.set()


class _Lowering:
  """A lower() thunk whose compile() records a persistent-cache hit on its own thread (a
  load) or on another thread meanwhile (the main thread loading a program of its own)."""

  def __init__(self, hit_on_own_thread: bool):
    self.own = hit_on_own_thread

  def __call__(self):
    return self

  def compile(self):
    hit = functools.partial(monitoring.record_event, compile_cache.CACHE_HIT)
    if self.own:
      hit()
    else:
      other = threading.Thread(target=hit)
      other.start()
      other.join()


def test_a_program_is_loaded_ahead_only_when_its_own_thread_loads_it():
  ahead = CompileAhead(None, lambda pad: [])
  ahead.also('other thread loads', _Lowering(hit_on_own_thread=False))
  ahead.also('loaded', _Lowering(hit_on_own_thread=True))
  ahead.wait()  # both run (ready drops a job that has not started)
  ahead.close()
  assert (ahead.compiled, ahead.loaded) == (1, 1)


def test_close_drops_queued_compiles_and_waits_for_running_ones():
  """After close() a run's counts are final: the compile that was running has finished (and is
  counted), the one queued behind it never runs."""
  ahead = CompileAhead(None, lambda pad: [], workers=1)
  running, queued = _SlowLowering(60.0), _SlowLowering(0.0)
  ahead.also('running', running)
  assert running.started.wait(timeout=60)
  job = ahead._other_pool.submit(ahead._compile, 'queued', queued)  # behind it on the one thread

  def release_once_dropped():  # not before: a loaded machine may not reach close() in time
    deadline = time.time() + 60
    while not job.cancelled() and time.time() < deadline:
      time.sleep(0.01)
    running.release.set()

  threading.Thread(target=release_once_dropped, daemon=True).start()
  ahead.close()
  assert running.compiled.is_set() and ahead.compiled == 1
  assert not queued.compiled.is_set()
  ahead.before((), 4)  # round_fn None: no round is compiled ahead, nothing is queued
  assert ahead._jobs == {}


def test_compiles_queued_for_arguments_that_have_since_grown_are_dropped():
  """Padded stream and buffer lengths only grow: programs queued for the old shapes will
  never be used, and held the compile thread ahead of the new shapes' neighbours."""
  import jax.numpy as jnp
  lowered, first = [], _SlowLowering(60.0)

  class Round:
    def lower(self, x, *, batch_pad, num_iterations):
      lowered.append((x.shape, batch_pad))
      return first if len(lowered) == 1 else _SlowLowering(0.0)

  ahead = CompileAhead(Round(), _grid_neighbours, workers=1)
  short, grown = jnp.zeros(3), jnp.zeros(5)
  ahead.before((short,), 6)  # queues 4 (compiling, held) and 8 for the short stream
  assert first.started.wait(timeout=60)
  ahead.before((grown,), 6)  # the stream grew: 8 for the short one is dropped
  first.release.set()
  ahead.wait()
  ahead.close()
  assert lowered == [((3,), 4), ((5,), 4), ((5,), 8)]


def test_reach_and_workers_below_one_are_refused():
  with pytest.raises(ValueError, match='reach and workers'):
    CompileAhead(None, _grid_neighbours, reach=0)
  with pytest.raises(ValueError, match='reach and workers'):
    CompileAhead(None, _grid_neighbours, workers=0)


class _CompileLog:
  """Counts the XLA compiles on the main thread (the ones a round waits for)."""

  def __init__(self):
    self.main_thread = 0

  def __call__(self, event, duration, **kwargs):
    if event == BACKEND_COMPILE and threading.current_thread() is threading.main_thread():
      self.main_thread += 1

  def __enter__(self):
    monitoring.register_event_duration_secs_listener(self)
    return self

  def __exit__(self, *exc):
    monitoring.unregister_event_duration_listener(self)


def _crossing_rounds(compile_ahead: str):
  """Round 1 at B_int 6, then round 2 at B_int 4: the next padded size below (per octave 2:
  3, 4, 6, 8). Returns the final state, the compiles round 2 waited for, and the Rounds."""
  config = tiny_config(algorithm='fathom', num_devices=2, compile_ahead=compile_ahead,
                       batch_size=6.0)
  run = build(config, tiny_task())
  rounds = Rounds(run)
  state = init_state(run)
  hp = rounds.initial_hparams(state)
  state, m, plan = rounds(state, 1, hp)
  assert plan.batch_pad == 6
  if rounds.compile_ahead is not None:
    rounds.compile_ahead.wait()
  hp = np.array(m.next_hparams)
  hp[BATCH] = 4.0
  with _CompileLog() as log:
    state, _, plan = rounds(state, 2, hp)
  assert plan.batch_pad == 4
  if rounds.compile_ahead is not None:
    rounds.compile_ahead.wait()
  rounds.close()
  return jax.device_get(state), log.main_thread, rounds


def test_the_next_padded_size_is_compiled_ahead_and_used_with_the_same_result():
  ahead_state, ahead_waited, ahead = _crossing_rounds('yes')
  plain_state, plain_waited, plain = _crossing_rounds('no')
  # Without compiling ahead the round that crosses compiles its program itself; with it, that
  # program was ready and the round compiles nothing.
  assert plain.compile_ahead is None and plain_waited >= 1
  assert ahead_waited == 0
  assert ahead.compile_ahead.used == 1
  # Two padded sizes each way around 6, queued before round 1 compiled its own program; then
  # those around 4 that were not queued yet (a size compiled ahead gets its surroundings too).
  neighbours = ahead._neighbour_pads
  around_6 = {*neighbours(6), *(p for q in neighbours(6) for p in neighbours(q))} - {6}
  around_4 = {*neighbours(4), *(p for q in neighbours(4) for p in neighbours(q))} - {4, 6}
  assert 4 in around_6 and around_4 - around_6
  # (compiled, or loaded from the test session's cache where an earlier test built it)
  made = ahead.compile_ahead.compiled + ahead.compile_ahead.loaded
  assert made == len(around_6 | around_4)
  assert ahead.compiles == plain.compiles == 2
  for a, b in zip(jax.tree.leaves(ahead_state), jax.tree.leaves(plain_state), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_evaluation_compiled_ahead_is_the_program_the_evaluation_runs():
  """Evaluator.lower(...).compile() from parameter shapes and shardings alone, on another thread: the
  evaluation then compiles nothing, and gives what an evaluator that compiled itself gives."""
  from fathom_sim.evaluation import make_evaluator
  run = build(tiny_config(num_devices=2), tiny_task())
  params = init_state(run).params
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                        params)
  clients = np.flatnonzero(np.asarray(run.task.test.num_examples) > 0)
  ahead, plain = (make_evaluator(run.model, run.mesh, 7) for _ in range(2))
  thread = threading.Thread(target=lambda: ahead.lower(shapes, run.task.test, clients[-1])
                            .compile())
  thread.start()
  thread.join()
  with _CompileLog() as ahead_log:
    a = ahead(params, run.task.test, clients)
  with _CompileLog() as plain_log:
    b = plain(params, run.task.test, clients)
  assert ahead_log.main_thread == 0 and plain_log.main_thread >= 1
  assert a == b and a['count'] == int(np.sum(run.task.test.num_examples))


@pytest.mark.parametrize('seeds', [1, 2])
def test_a_run_compiles_its_evaluation_ahead_and_its_results_do_not_change(tmp_path, seeds,
                                                                           monkeypatch):
  """In a run (and in a run of vectorised seeds), the evaluation's program compiles on its own
  thread from before round 1: the main thread then compiles one program fewer (FedAvg: no round
  program is compiled ahead, its B never moves), with the same metrics. So it does with 'auto'
  on an accelerator (emulated), where FedAvg compiles no round ahead, only the evaluation."""
  import copy
  from fathom_sim import run as run_lib
  from fathom_sim.train import train_seeds
  from tests.test_cli import read_rows

  def run(name, compile_ahead):
    config = tiny_config(algorithm='fedavg', num_devices=2, compile_ahead=compile_ahead,
                         eval_every=2, num_rounds=3)
    configs = [copy.deepcopy(config) for _ in range(seeds)]
    for i, c in enumerate(configs):
      c.seed += i
    workdirs = [str(tmp_path / f'{name}{i}') for i in range(seeds)]
    with _CompileLog() as log:
      summary = train_seeds(configs, workdirs)[-1]
    rows = [{k: v for k, v in r.items() if k != 'wall_s'} for r in read_rows(workdirs[-1])]
    return log.main_thread, summary, rows

  run('warm', 'no')  # programs that module-level jits keep between runs
  plain_compiles, plain, plain_rows = run('plain', 'no')
  ahead_compiles, ahead, ahead_rows = run('ahead', 'yes')
  assert plain['compiled_ahead'] is None
  # The evaluation's program was used (the first evaluation waits for it if need be); the
  # sizes around B compile on other threads, maybe not before the run ends. (A program the
  # test session built before is loaded from its cache: `loaded`, not `compiled`.)
  made = lambda summary: summary['compiled_ahead']['compiled'] + summary['compiled_ahead'][
      'loaded']
  assert ahead['compiled_ahead']['used'] == 1 and made(ahead) >= 1
  assert ahead_compiles == plain_compiles - 1
  assert ahead_rows == plain_rows and 'test_accuracy' in ahead_rows[1]
  assert ahead['final'] == plain['final']
  if seeds > 1:
    return  # 'auto' below picks per platform, not per seed count: one seed shows it
  on_cpu = run_lib._evaluation_ahead
  assert not on_cpu(base_config(), make_mesh(2))  # auto on CPU: nothing ahead
  monkeypatch.setattr(run_lib, '_evaluation_ahead', lambda config, mesh: config.compile_ahead
                      in ('auto', 'yes'))
  auto_compiles, auto, auto_rows = run('auto', 'auto')
  assert made(auto) == auto['compiled_ahead']['used'] == 1  # the evaluation's, no round's
  assert auto_compiles == plain_compiles - 1
  assert auto_rows == plain_rows and auto['final'] == plain['final']


ROUND_PROGRAMS = {'jit(device_round)', 'jit(broadcast)', 'jit(round_start)', 'jit(local_step)',
                  'jit(round_finish)'}


@pytest.mark.parametrize('local_loop', ['device', 'host'])
def test_compiles_counts_every_program_the_round_compiled(local_loop):
  """Rounds.compiles (summary.json's `compiles`) equals XLA's own count of the round's
  compiles, with the host-driven loop's four programs as with the device loop's one, while B
  crosses padded sizes."""
  names = []

  def listen(event, duration, **kwargs):
    if event == BACKEND_COMPILE:
      names.append(kwargs.get('fun_name'))

  config = tiny_config(algorithm='fathom', num_devices=1, local_loop=local_loop, eta_h2=30.0,
                       batch_size=4.0, cohort_size=4)
  run = build(config, tiny_task())
  state = init_state(run)
  rounds = Rounds(run)
  hp = rounds.initial_hparams(state)
  monitoring.register_event_duration_secs_listener(listen)
  try:
    pads = set()
    for t in range(1, 7):
      state, m, plan = rounds(state, t, hp)
      hp = np.asarray(m.next_hparams)
      pads.add(plan.batch_pad)
  finally:
    monitoring.unregister_event_duration_listener(listen)
    rounds.close()
  assert len(pads) >= 3
  round_compiles = sum(name in ROUND_PROGRAMS for name in names)
  assert rounds.compiles == round_compiles == (
      len(pads) if local_loop == 'device' else 1 + 3 * len(pads)), names
