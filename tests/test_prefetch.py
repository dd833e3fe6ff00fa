"""Reading round t+1's clients while round t computes: same examples, same run, read early."""

from __future__ import annotations

import threading

import jax
import numpy as np
import pytest

from fathom_sim.config import ConfigError
from fathom_sim.data import DataError
from fathom_sim.data.federated import GeneratedClientDataset, Prefetcher
from fathom_sim.data.sampling import sample_cohort

from tests.common import run_rounds, tiny_config, tiny_task


class _Recorder:
  """make(k) of a generated dataset that records which thread read which client."""

  def __init__(self, source, fail_on=None, error=OSError):
    self.source, self.fail_on, self.error = source, fail_on, error
    self.reads: list[tuple[int, str]] = []
    self.threads: set[threading.Thread] = set()
    self.lock = threading.Lock()

  def __call__(self, k: int) -> dict:
    with self.lock:
      self.reads.append((k, threading.current_thread().name))
      self.threads.add(threading.current_thread())
    if k == self.fail_on:
      raise self.error(f'client {k}: unreadable')
    return {name: a.copy() for name, a in self.source.client(k).items()}


def _generated(task, **kwargs):
  recorder = _Recorder(task.train, **kwargs)
  train = GeneratedClientDataset(task.train.client_ids, task.train.num_examples, recorder)
  return task._replace(train=train), recorder


def test_prefetcher_reads_each_fetched_client_once_and_returns_its_examples():
  task, recorder = _generated(tiny_task())
  data = Prefetcher(task.train)
  np.testing.assert_array_equal(data.num_examples, task.train.num_examples)
  data.fetch([3, 5, 3])
  for k in (3, 5, 3, 5):  # two seeds' cohorts may name the same client
    got, want = data.client(k), task.train.make.source.client(k)
    assert sorted(got) == sorted(want)
    for name in want:
      np.testing.assert_array_equal(got[name], want[name])
  on_pool = lambda r: r[1].startswith('prefetch_')
  assert sorted(k for k, _ in recorder.reads) == [3, 5] and all(map(on_pool, recorder.reads))
  data.fetch([5, 7])  # 5 is kept, 3 dropped, 7 read
  data.client(5), data.client(7), data.client(3)
  assert [r for r in recorder.reads[2:] if not on_pool(r)] == [(3, 'MainThread')]
  assert sorted(k for k, _ in recorder.reads[2:]) == [3, 7]


def test_prefetcher_raises_the_read_error_where_the_client_is_used():
  task, _ = _generated(tiny_task(), fail_on=4)
  data = Prefetcher(task.train)
  data.fetch([2, 4])
  data.client(2)
  with pytest.raises(OSError, match='client 4: unreadable'):
    data.client(4)


class _Held:
  """A dataset whose reads wait until `go` is set, recording the clients and threads."""

  def __init__(self, source):
    self.source, self.go = source, threading.Event()
    self.started: list[tuple[int, threading.Thread]] = []
    self.lock = threading.Lock()
    self.client_ids, self.num_examples = source.client_ids, source.num_examples

  def client(self, k: int) -> dict:
    with self.lock:
      self.started.append((k, threading.current_thread()))
    if threading.current_thread() is not threading.main_thread():
      assert self.go.wait(timeout=60)
    return self.source.client(k)


def _every_thread_reading(fetched: int):
  """A Prefetcher over 40 held clients that has fetched the first `fetched`, once every read
  thread holds one of them: (task, held, prefetcher, threads)."""
  import time
  from fathom_sim.data.federated import read_workers
  task = tiny_task(num_clients=40)
  held = _Held(task.train)
  data = Prefetcher(held)
  data.fetch(range(fetched))
  workers = read_workers()
  deadline = time.monotonic() + 60
  while len(held.started) < min(workers, fetched):
    assert time.monotonic() < deadline, held.started
    threading.Event().wait(0.01)
  return task, held, data, workers


def test_a_closed_prefetcher_cancels_its_queued_reads_and_its_threads_exit():
  """With every thread holding a read and more queued: close cancels the queued ones, the
  threads exit once their reads end, and `client` then reads on the caller's thread."""
  task, held, data, workers = _every_thread_reading(40)
  data.close()
  held.go.set()
  for _, thread in held.started:
    thread.join(timeout=30)
    assert not thread.is_alive()
  assert len(held.started) == workers  # the queued reads never ran
  got, want = data.client(39), task.train.client(39)  # read now, on this thread
  assert held.started[-1] == (39, threading.main_thread())
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name])


def test_a_fetch_cancels_the_queued_reads_of_clients_it_no_longer_names():
  """Reads the last fetch queued for other clients (after a round that read ahead and then
  failed) no longer run ahead of this fetch's."""
  _, held, data, workers = _every_thread_reading(20)
  data.fetch(range(20, 40))
  held.go.set()
  for i in range(20, 40):
    data.client(i)
  data.close()
  read = sorted(i for i, _ in held.started)
  assert read == sorted(list(range(workers)) + list(range(20, 40)))


def test_rounds_close_stops_the_reads_of_the_next_round():
  """A run that stops (its last round, a preemption) closes its Rounds: the reads of round
  t+1's cohort started during round t must not outlive it on their threads."""
  from fathom_sim.driver import Rounds
  from fathom_sim.run import build, init_state
  task, recorder = _generated(tiny_task())
  run = build(tiny_config(num_rounds=5), task)
  rounds = Rounds(run)
  assert rounds.prefetching
  state = init_state(run)
  hp = rounds.initial_hparams(state)
  for t in (1, 2):
    state, _, _ = rounds(state, t, hp)
  rounds.close()
  pool = recorder.threads - {threading.main_thread()}
  assert pool  # rounds 2 and 3's cohorts were read ahead
  for thread in pool:  # idle threads of a pool still open would wait for work for good
    thread.join(timeout=30)
    assert not thread.is_alive()


@pytest.mark.parametrize('algorithm', ['fedavg', 'fathom'])
def test_rounds_on_read_per_round_data_equal_in_memory_and_read_a_round_early(algorithm):
  config = tiny_config(num_rounds=4, algorithm=algorithm, num_devices=2, data_on_device='no')
  task = tiny_task()
  generated, recorder = _generated(task)
  want_state, want, _ = run_rounds(config, task, 4)
  got_state, got, rounds = run_rounds(config, generated, 4)
  assert rounds.prefetching
  for (m_want, _), (m_got, _) in zip(want, got):
    np.testing.assert_array_equal(m_got.next_hparams, m_want.next_hparams)
    np.testing.assert_array_equal(m_got.train_loss, m_want.train_loss)
  jax.tree.map(np.testing.assert_array_equal, got_state.params, want_state.params)
  # Rounds 2..4's clients were read on the prefetch threads during the round before; the main
  # thread read only round 1's (and the one client that tells the planner the feature shapes).
  main = {k for k, name in recorder.reads if name == 'MainThread'}
  first = set(sample_cohort(task.train, config.seed, 1, config.cohort_size).tolist())
  assert main - first <= {int(np.flatnonzero(task.train.num_examples)[0])}
  later = set().union(*(sample_cohort(task.train, config.seed, t, config.cohort_size).tolist()
                        for t in (2, 3, 4)))
  assert later <= {k for k, name in recorder.reads if name.startswith('prefetch')}


def test_vectorised_seeds_on_generated_data_equal_the_same_data_held_in_memory(tmp_path):
  from fathom_sim.train import train_seeds

  def configs(in_memory):
    out = []
    for seed in (0, 1):
      c = tiny_config(algorithm='fathom', num_rounds=3, eval_every=3, cohort_size=4,
                      num_devices=2, data_on_device='no', eta_h2=30.0)
      c.seed = seed
      c.data.name, c.data.num_clients, c.data.in_memory = 'femnist_synthetic', 12, in_memory
      out.append(c)
    return out

  got = train_seeds(configs(False), [str(tmp_path / f'gen{s}') for s in (0, 1)])
  want = train_seeds(configs(True), [str(tmp_path / f'mem{s}') for s in (0, 1)])
  assert [s['final']['params_sha256'] for s in got] == [s['final']['params_sha256']
                                                        for s in want]
  assert got[0]['final']['params_sha256'] != got[1]['final']['params_sha256']


@pytest.mark.parametrize('data_on_device', ['no', 'yes'])
def test_a_round_planned_ahead_equals_one_planned_on_time_and_replans_when_b_or_k_change(
    data_on_device):
  """Round t+1 is planned under round t's (E, B) while round t computes. Rounds 1-2 keep
  (E, B): the plan made ahead is used. Round 3 changes B_int and round 4 the K_i: both plan
  again. Every round must equal the same round planned on the critical path."""
  from fathom_sim.driver import Rounds
  from fathom_sim.run import build, init_state
  from fathom_sim.types import BATCH, EPOCHS
  config = tiny_config(num_rounds=4, algorithm='fathom', num_devices=2,
                       data_on_device=data_on_device)
  run = build(config, tiny_task())
  hp0 = Rounds(run, prefetch=False).initial_hparams(init_state(run))
  hps = [hp0, hp0, hp0.copy(), hp0.copy()]
  hps[2][BATCH] = hp0[BATCH] + 1.0
  hps[3][BATCH], hps[3][EPOCHS] = hp0[BATCH] + 1.0, hp0[EPOCHS] * 2.0
  results = {}
  for ahead in (True, False):
    rounds, state, metrics, plans = Rounds(run, prefetch=ahead), init_state(run), [], []
    for t, hp in enumerate(hps, start=1):
      state, m, plan = rounds(state, t, hp)
      metrics.append(m)
      plans.append(plan)
    results[ahead] = (jax.device_get(state), metrics, plans, rounds)
  (state, metrics, plans, rounds), (want_state, want_metrics, want_plans, _) = (
      results[True], results[False])
  assert (rounds.planned_ahead, rounds.replanned, rounds.replanned_seeds) == (1, 2, 2)
  assert [p.batch_size for p in plans] == [p.batch_size for p in want_plans]
  assert plans[2].batch_size != plans[1].batch_size
  assert not np.array_equal(plans[3].num_steps, plans[2].num_steps)
  for p, q in zip(plans, want_plans):
    np.testing.assert_array_equal(p.num_steps, q.num_steps)
    # A plan made ahead and then dropped leaves the padded lengths as planning on time does.
    assert p.shape == q.shape
  assert rounds.compiles == results[False][3].compiles
  for m, want in zip(metrics, want_metrics):
    np.testing.assert_array_equal(m.client_h, want.client_h)
    np.testing.assert_array_equal(m.next_hparams, want.next_hparams)
  jax.tree.map(np.testing.assert_array_equal, state.params, want_state.params)


def _seeds_state(run, seeds: list[int]):
  """Each seed's initial state, stacked on a leading axis and replicated: a vectorised run's."""
  import dataclasses
  from fathom_sim.mesh import put, replicated
  from fathom_sim.run import init_state
  states = []
  for s in seeds:
    c = run.config.copy_and_resolve_references()
    c.seed = s
    states.append(jax.device_get(init_state(dataclasses.replace(run, config=c))))
  return put(jax.tree.map(lambda *x: np.stack(x), *states), replicated(run.mesh))


@pytest.mark.parametrize('data_on_device', ['no', 'yes'])
@pytest.mark.parametrize('seeds', [None, [3, 4]], ids=['one seed', 'two seeds'])
def test_a_plan_made_ahead_replans_when_e_would_size_the_stream_otherwise(seeds,
                                                                          data_on_device):
  """Forty clients of 3 examples and one of 60, B 10: a cohort of small clients keeps K_i 1 and
  B_int 10 while E moves, but the stream is also sized for the largest client's K under E.
  Round 6's E (2.68, from 0.95) grows it where round 5's did not: the plan made under round
  5's E must be made again, or the shapes (and compiles) would depend on planning ahead."""
  from fathom_sim.data.federated import ArrayClientDataset
  from fathom_sim.driver import Rounds
  from fathom_sim.run import build, init_state
  from fathom_sim.types import BATCH, EPOCHS
  train = tiny_task(num_clients=60).train
  sizes = np.array([3] * 40 + [60])
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  assert offsets[-1] <= train.offsets[-1]
  features = {k: v[:offsets[-1]] for k, v in train.features.items()}
  task = tiny_task()._replace(train=ArrayClientDataset(features, offsets,
                                                       np.arange(len(sizes)).astype(str)))
  config = tiny_config(num_rounds=6, algorithm='fathom', num_devices=2,
                       data_on_device=data_on_device, batch_size=10.0)
  run = build(config, task)
  initial = lambda: init_state(run) if seeds is None else _seeds_state(run, seeds)
  hp0 = Rounds(run, seeds, prefetch=False).initial_hparams(initial())
  hps = []
  for e in (0.38, 0.53, 0.71, 0.75, 0.95, 2.68):
    hp = hp0.copy()
    hp[..., EPOCHS], hp[..., BATCH] = e, 10.0
    hps.append(hp)
  results = {}
  for ahead in (True, False):
    rounds, state, shapes = Rounds(run, seeds, prefetch=ahead), initial(), []
    for t, hp in enumerate(hps, start=1):
      state, _, plan = rounds(state, t, hp)
      shapes.append(rounds.planner.padded_lengths())
      for p in [plan] if seeds is None else plan:
        assert p.batch_size == 10 and set(p.num_steps) == {1}  # only small clients drawn
    results[ahead] = (jax.device_get(state), shapes, rounds)
  (state, shapes, rounds), (want_state, want_shapes, want_rounds) = (results[True],
                                                                     results[False])
  assert shapes == want_shapes
  assert shapes[5] != shapes[4]  # round 6 grew the stream
  assert (rounds.planned_ahead, rounds.replanned) == (4, 1)
  assert rounds.replanned_seeds == len(seeds or [0])  # every seed's E grew its stream
  assert rounds.compiles == want_rounds.compiles == 2
  jax.tree.map(np.testing.assert_array_equal, state.params, want_state.params)


@pytest.mark.parametrize('data_on_device', ['no', 'yes'])
def test_vectorised_seeds_plan_again_only_the_seed_whose_b_changed(data_on_device):
  """Seeds share one program: when only seed 1's B_int changes (round 3), seed 1 plans again
  and seed 0 keeps its plan made ahead (the stacked arrays are made again, padded to what the
  new plan needs); every seed's rounds equal the rounds planned on time."""
  from fathom_sim.driver import Rounds
  from fathom_sim.run import build
  from fathom_sim.types import BATCH
  config = tiny_config(num_rounds=4, algorithm='fathom', num_devices=2,
                       data_on_device=data_on_device)
  run = build(config, tiny_task())
  seeds = [3, 4]
  initial = lambda: _seeds_state(run, seeds)
  hp0 = Rounds(run, seeds, prefetch=False).initial_hparams(initial())
  assert hp0.shape == (2, 3)
  changed = hp0.copy()
  changed[1, BATCH] = hp0[1, BATCH] + 1.0
  hps = [hp0, hp0, changed, changed]
  results = {}
  for ahead in (True, False):
    rounds, state, metrics, plans = Rounds(run, seeds, prefetch=ahead), initial(), [], []
    for t, hp in enumerate(hps, start=1):
      state, m, plan = rounds(state, t, hp)
      metrics.append(jax.device_get(m))
      plans.append(plan)
    results[ahead] = (jax.device_get(state), metrics, plans, rounds)
  (state, metrics, plans, rounds), (want_state, want_metrics, want_plans, want_rounds) = (
      results[True], results[False])
  assert (rounds.planned_ahead, rounds.replanned, rounds.replanned_seeds) == (2, 1, 1)
  assert (want_rounds.planned_ahead, want_rounds.replanned_seeds) == (0, 0)
  assert [p.batch_size for p in plans[2]] == [plans[1][0].batch_size,
                                              plans[1][1].batch_size + 1]
  for seed_plans, seed_want in zip(plans, want_plans):
    for p, q in zip(seed_plans, seed_want, strict=True):
      assert p.batch_size == q.batch_size and p.shape == q.shape
      # Sent, a round's examples are no longer held on the host (stand-ins of no bytes).
      assert (p.lanes.source is None) == (data_on_device == 'yes')
      assert all(a.strides == (0,) * a.ndim for a in (p.lanes.source or {}).values())
      np.testing.assert_array_equal(p.num_steps, q.num_steps)
      np.testing.assert_array_equal(p.lanes.stream, q.lanes.stream)
  assert rounds.compiles == want_rounds.compiles
  for m, want in zip(metrics, want_metrics):
    np.testing.assert_array_equal(m.client_h, want.client_h)
    np.testing.assert_array_equal(m.next_hparams, want.next_hparams)
  jax.tree.map(np.testing.assert_array_equal, state.params, want_state.params)


@pytest.mark.parametrize('data_on_device', ['no', 'yes'])
def test_a_stopped_vectorised_seed_runs_idle_and_sets_no_longer_the_others_work(data_on_device):
  """Seed 1 (B 24, where seed 0 has B 3) stops before round 3 (as max_rejected_rounds stops
  it): from then on its plan runs no step, so seed 0 computes its own B_pad and longest lane
  only; seed 0's rounds are those it runs beside a seed that never stops (up to the float
  rounding of padding), planned ahead or on time alike (the plan made ahead for round 3 is
  made again for seed 1 alone)."""
  from fathom_sim.driver import Rounds
  from fathom_sim.run import build
  from fathom_sim.types import BATCH
  config = tiny_config(num_rounds=4, algorithm='fathom', num_devices=2,
                       data_on_device=data_on_device)
  run = build(config, tiny_task())
  seeds = [3, 4]
  initial = lambda: _seeds_state(run, seeds)
  hp = Rounds(run, seeds, prefetch=False).initial_hparams(initial()).copy()
  hp[1, BATCH] = 24.0
  results = {}
  for ahead, stop in ((True, True), (False, True), (True, False)):
    rounds, state, metrics, plans = Rounds(run, seeds, prefetch=ahead), initial(), [], []
    for t in range(1, 5):
      if stop and t == 3:
        rounds.stop_seed(1)
      state, m, plan = rounds(state, t, hp)
      metrics.append(jax.device_get(m))
      plans.append(plan)
    results[ahead, stop] = (jax.device_get(state), metrics, plans, rounds)
  state, metrics, plans, rounds = results[True, True]
  assert [p[1].idle for p in plans] == [False, False, True, True]
  assert not any(p[0].idle for p in plans)
  assert not metrics[2].accepted[1] and metrics[2].accepted[0]
  for t, (p0, p1) in enumerate(plans):
    alone = p0.computed_rows(2)
    assert (p0.computed_rows(2, alongside=(p1,)) == alone) == (t >= 2), t
  assert (rounds.planned_ahead, rounds.replanned, rounds.replanned_seeds) == (2, 1, 1)
  on_time, beside = results[False, True], results[True, False]
  first = lambda tree: jax.tree.map(lambda a: np.asarray(a)[0], tree)
  jax.tree.map(np.testing.assert_array_equal, first(state.params), first(on_time[0].params))
  for m, want in zip(metrics, beside[1]):
    np.testing.assert_allclose(m.client_h[0], want.client_h[0], rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               first(state.params), first(beside[0].params))


@pytest.mark.parametrize('error', [OSError, DataError, ConfigError])
def test_a_client_that_cannot_be_read_fails_its_own_round_not_the_one_before(error, caplog):
  """Round 2's plan is made during round 1; a read error there must not cost round 1. Bad
  input (DataError; a ConfigError, as the planner's for a lane past int32's indices) is said in
  one line when round 2 raises it: planning ahead warns without a traceback; any other error
  keeps it."""
  from fathom_sim.driver import Rounds
  from fathom_sim.run import build, init_state
  config = tiny_config(num_rounds=3, algorithm='fathom', num_devices=2, data_on_device='no')
  task = tiny_task()
  first = set(sample_cohort(task.train, config.seed, 1, config.cohort_size).tolist())
  bad = next(k for k in sample_cohort(task.train, config.seed, 2, config.cohort_size).tolist()
             if k not in first)
  generated, recorder = _generated(task, fail_on=bad, error=error)
  run = build(config, generated)
  rounds = Rounds(run)
  state = init_state(run)
  hp = rounds.initial_hparams(state)
  state, m, _ = rounds(state, 1, hp)
  # Round 2's plan, made during round 1, met the error and was dropped; round 1 returned.
  assert bad in {k for k, _ in recorder.reads} and rounds._next is None
  [warning] = [r for r in caplog.records if 'planning round 2 ahead failed' in r.getMessage()]
  assert f'client {bad}: unreadable' in warning.getMessage()
  assert (not warning.exc_info) == (error is not OSError)
  with pytest.raises(error, match=f'client {bad}: unreadable'):
    rounds(state, 2, np.asarray(m.next_hparams))


def test_reading_ahead_that_fails_does_not_cost_the_round_that_computes(monkeypatch, caplog):
  """Round 2's clients are sampled and their reads started after round 1 is dispatched, its
  state donated: an error there (the host out of memory, say) left round 1 with its state and
  metrics lost, blamed for it. Round 2 reads on time instead, and equals a run held in
  memory."""
  config = tiny_config(num_rounds=3, algorithm='fathom', num_devices=2, data_on_device='no')
  task = tiny_task()
  generated, _ = _generated(task)
  fetch = Prefetcher.fetch

  def fails_once(self, clients):
    if not getattr(self, 'failed', False):
      self.failed = True
      raise MemoryError('no memory for the reads ahead')
    return fetch(self, clients)

  monkeypatch.setattr(Prefetcher, 'fetch', fails_once)
  want_state, want, _ = run_rounds(config, task, 3)
  got_state, got, rounds = run_rounds(config, generated, 3)
  assert rounds.prefetching
  assert ("reading round 2's clients ahead failed (MemoryError: no memory for the reads "
          "ahead); they are read on time") in caplog.text
  for (m_want, _), (m_got, _) in zip(want, got):
    np.testing.assert_array_equal(m_got.next_hparams, m_want.next_hparams)
  jax.tree.map(np.testing.assert_array_equal, got_state.params, want_state.params)


def test_cohort_sampling_never_touches_the_default_device():
  """Its key is made on the host CPU: a key on an accelerator would wait behind the round in
  flight there, and round t+1's clients would be read only after round t ended."""
  from fathom_sim.data.sampling import sample_clients
  ref = sample_clients(3, 7, 0, np.arange(100), 10)
  # A default device other than the host CPU device stands in for an accelerator.
  with jax.default_device(jax.devices()[-1]), jax.transfer_guard_device_to_device('disallow'):
    got = sample_clients(3, 7, 0, np.arange(100), 10)
  np.testing.assert_array_equal(got, ref)


def test_read_ahead_yields_clients_in_order_with_bounded_reads_in_flight():
  from fathom_sim.data.federated import read_ahead
  task, recorder = _generated(tiny_task())
  order = [5, 0, 3, 3, 9, 1, 7]
  seen = []
  for k, examples in zip(order, read_ahead(task.train, order, depth=2)):
    want = tiny_task().train.client(k)
    for name in want:
      np.testing.assert_array_equal(examples[name], want[name])
    seen.append(k)
    # At most `depth` clients read or held, the one in hand included.
    assert len(recorder.reads) <= len(seen) + 1
  assert seen == order
  assert all(name.startswith('read_ahead') for _, name in recorder.reads)


def test_read_ahead_refuses_a_depth_below_one():
  from fathom_sim.data.federated import read_ahead
  with pytest.raises(ValueError, match='depth must be at least 1, got 0'):
    next(read_ahead(tiny_task().train, [0, 1], depth=0))


def test_read_ahead_raises_the_read_error_at_that_client():
  from fathom_sim.data.federated import read_ahead
  task, _ = _generated(tiny_task(), fail_on=3)
  it = read_ahead(task.train, [1, 2, 3, 4], depth=3)
  assert len(next(it)['y']) == task.train.num_examples[1]
  next(it)
  with pytest.raises(OSError, match='client 3'):
    next(it)


@pytest.mark.parametrize('population,size', [(12, 12), (37, 5), (3400, 10), (3400, 200)])
def test_cohorts_sampled_in_a_block_are_each_rounds_own(population, size):
  """One program for a block of rounds gives, row by row, what sampling each round alone
  gives (the vmap changes nothing in the bits)."""
  from fathom_sim.data.federated import ArrayClientDataset
  from fathom_sim.data.sampling import sample_cohorts
  sizes = np.arange(population) % 4  # every 4th client has no example: never sampled
  sizes[:size + 2] = 1
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  data = ArrayClientDataset({'x': np.zeros((offsets[-1], 1)), 'y': np.zeros(offsets[-1])},
                            offsets, np.arange(population).astype(str))
  for seed in (0, 5):
    block = sample_cohorts(data, seed, 7, 9, size)
    assert block.shape == (9, size)
    for i in range(9):
      np.testing.assert_array_equal(block[i], sample_cohort(data, seed, 7 + i, size))


@pytest.mark.parametrize('before_dispatch', [True, False])
def test_the_rounds_cohorts_cross_blocks_as_sampled_round_by_round(monkeypatch,
                                                                    before_dispatch):
  """On CPU the driver samples cohorts a block of rounds at a time (3 here) before it
  dispatches a round; on an accelerator one round at a time while the previous computes.
  Either way each round trains sample_cohort's clients, across the blocks' edges too."""
  from fathom_sim import driver
  from fathom_sim.run import build, init_state
  monkeypatch.setattr(driver, 'COHORT_BLOCK', 3)
  task = tiny_task()
  config = tiny_config(num_devices=1, cohort_size=4)
  run = build(config, task)
  state = init_state(run)
  rounds = driver.Rounds(run)
  rounds._sample_before_dispatch = before_dispatch
  hp = rounds.initial_hparams(state)
  for t in range(1, 9):
    state, m, plan = rounds(state, t, hp)
    hp = np.asarray(m.next_hparams)
    np.testing.assert_array_equal(np.sort(plan.clients),
                                  np.sort(sample_cohort(task.train, config.seed, t, 4)))
    assert len(rounds._cohorts_memo[1][0]) == (3 if before_dispatch else 1)
  rounds.close()


def test_a_read_that_failed_on_a_thread_is_read_again_on_the_callers():
  """A failed read was kept and raised again at every call for that client, the same exception
  object each time (its traceback growing), a transient error never tried again; without a
  prefetcher each call reads anew, and so does the prefetcher now."""
  task = tiny_task(num_clients=12)

  class FailsOnce:
    num_examples = task.train.num_examples
    failed: list = []

    def client(self, index):
      if index == 3 and not self.failed:
        self.failed.append(threading.current_thread())
        raise OSError('transient read error')
      return task.train.client(index)

  source = FailsOnce()
  data = Prefetcher(source)
  data.fetch([3, 4])
  got = data.client(3)
  assert source.failed and source.failed[0] is not threading.main_thread()
  for name, want in task.train.client(3).items():
    np.testing.assert_array_equal(got[name], want)
  data.close()
