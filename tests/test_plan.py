"""Cohort planning: batches, buckets, lane packing, and padding that changes nothing."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fathom_sim import fathom, rng
from fathom_sim.client import lane_train
from fathom_sim.data.federated import ArrayClientDataset
from fathom_sim.data.plan import (Planner, SeedPlanners, bucket, client_batches, fewest_lanes,
                                  grow, longest_lane, pack_lanes)
from fathom_sim.models import get_model
from fathom_sim.types import BATCH, EPOCHS, CohortTable
from tests.common import assert_trees_close, run_rounds, tiny_config, tiny_task


def test_bucket_grid():
  assert [bucket(n, 2) for n in range(1, 14)] == [1, 2, 3, 4, 6, 6, 8, 8, 12, 12, 12, 12, 16]
  assert [bucket(n, 1) for n in (1, 3, 5, 9, 17)] == [1, 4, 8, 16, 32]
  for per_octave in (1, 2, 4, 8):
    values = [bucket(n, per_octave) for n in range(1, 600)]
    assert all(v >= n for n, v in zip(range(1, 600), values))
    assert values == sorted(values)
    assert all(v <= n * (1 + 1 / per_octave) for n, v in zip(range(1, 600), values))
    assert len(set(values)) <= per_octave * 10 + 1  # a few values per doubling


def test_integer_schedule_follows_the_spec():
  b_int, k = fathom.integer_schedule(1.5, 2.5, np.array([1, 4, 5, 10]))
  # A half goes up, as the reference's int(B + 0.5) (Python's round() would give 2 here).
  assert b_int == 3
  np.testing.assert_array_equal(k, [1, 2, 3, 5])  # max(1, ceil(E n / B_int))
  assert fathom.integer_schedule(1.0, 3.5, np.array([7]))[0] == 4
  assert [fathom.batch_size_int(b) for b in (0.2, 0.5, 1.49, 4.5, 20.5, np.float32(20.5))] == [
      1, 1, 1, 5, 21, 21]
  # exp(log(B)) in float32, as a round computes B from phi: x.5 goes up whether it comes back
  # just above the half (4.5) or just below it (3.5 is 3.4999998, 19.5 is 19.499998).
  halves = np.arange(0.5, 300, 1.0)
  back = np.exp(np.log(halves.astype(np.float32)))
  assert np.sum(back < halves) > 50  # the case is common, not hypothetical
  assert [fathom.batch_size_int(b) for b in back] == list(range(1, 301))
  # Below the tolerance's reach a B under the half is under it: 3.49 is 3 examples.
  assert fathom.batch_size_int(3.49) == 3 and fathom.batch_size_int(3.5 - 1e-5) == 3
  assert fathom.integer_schedule(1.0, 0.2, np.array([7]))[0] == 1
  np.testing.assert_array_equal(fathom.integer_schedule(0.01, 20, np.array([3, 50]))[1], [1, 1])


@pytest.mark.parametrize('epochs,batch,n,steps', [
    (np.float32(0.2), 1.0, 5, 1),    # 0.20000000298 * 5 = 1.0000000149
    (np.float32(0.1), 3.0, 30, 1),
    (np.float32(1.1), 11.0, 10, 1),
    (0.7, 7.0, 10, 1),               # float64: 0.7 * 10 = 7.000000000000001
    (np.float32(0.2), 1.0, 6, 2),    # 1.2: a fraction of a step is a whole step
    (np.float32(1.0000024), 1000.0, 1000, 2),  # E above 1 by more than float rounding
    # Past 2^20 steps a relative allowance alone took whole steps away:
    (5.0, 1.0, 300000, 1500000),
    (1.0, 1.0, 2**21, 2**21),
    (2.5, 1.0, 1000001, 2500003),    # 2500002.5: a real half step
])
def test_a_whole_number_of_steps_is_not_rounded_up_by_float_rounding(epochs, batch, n, steps):
  """FedAvg with E 0.2, B 1 ran 2 steps on a client of 5 examples: E is float32, and
  E n / B_int came out 1.0000000149. The spec's K_i is of the real numbers."""
  assert fathom.integer_schedule(epochs, batch, np.array([n]))[1][0] == steps


def test_client_batches_shuffle_and_repeat():
  r = np.random.default_rng(0)
  idx = client_batches(r, 5, 4, 3)  # 12 rows from passes of 5: wraps across passes
  assert idx.shape == (4, 3)
  flat = idx.ravel()
  assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))
  assert len(set(flat[10:])) == 2
  big = client_batches(np.random.default_rng(1), 3, 2, 7)  # B_int > n repeats examples
  assert big.shape == (2, 7) and sorted(big.ravel()[:3]) == [0, 1, 2]
  again = client_batches(np.random.default_rng(0), 5, 4, 3)
  np.testing.assert_array_equal(idx, again)


@pytest.mark.parametrize('seed', range(5))
def test_pack_lanes_assigns_every_client_once_and_balances(seed):
  r = np.random.default_rng(seed)
  steps = r.integers(1, 50, size=int(r.integers(1, 40)))
  for num_lanes in (1, 3, 8):
    lanes = pack_lanes(steps, num_lanes)
    assert len(lanes) == num_lanes
    assert sorted(i for lane in lanes for i in lane) == list(range(len(steps)))
    loads = [steps[lane].sum() for lane in lanes]
    # Longest-first onto the least loaded lane: no lane exceeds another by more than one client.
    assert max(loads) - min(loads) <= steps.max()
    assert max(loads) <= steps.sum() / num_lanes + steps.max()


def test_pack_lanes_places_the_longest_client_first():
  """The bounds above hold for clients packed in any order; the order is what balances."""
  assert sorted(map(sorted, pack_lanes(np.array([1, 1, 2]), 2))) == [[0, 1], [2]]  # not {3, 1}
  r = np.random.default_rng(0)
  for _ in range(20):  # a plain re-statement: descending steps (ties by position), least
    steps = r.integers(1, 9, size=int(r.integers(1, 25)))  # loaded lane (ties: lowest)
    num_lanes = int(r.integers(1, 6))
    want, loads = [[] for _ in range(num_lanes)], [0] * num_lanes
    for i in sorted(range(len(steps)), key=lambda i: (-steps[i], i)):
      lane = loads.index(min(loads))
      want[lane].append(i)
      loads[lane] += int(steps[i])
    assert pack_lanes(steps, num_lanes) == want


def test_the_lane_estimate_packs_as_the_plan_does():
  """longest_lane, which auto lanes estimate from, is the longest lane of the round's plan."""
  task = tiny_task()
  for lanes, clients in ((2, [0, 4, 2, 9, 11]), (5, [3, 1, 7, 8, 10]), (1, [5, 6, 10, 11, 2])):
    plan = Planner(task.train, 5, lanes, seed=7).plan(np.array(clients), 3, epochs=1.5,
                                                       batch_size=3.2)
    _, steps = fathom.integer_schedule(1.5, 3.2, task.train.num_examples[clients])
    assert longest_lane(steps, lanes) == plan.lane_steps.max() > 0


def test_fewest_lanes_is_the_first_lane_count_within_the_slack():
  # One long client: 2 lanes run as many steps as 10 (the long one alone, the rest beside).
  assert fewest_lanes([np.array([10] + [1] * 9)], 1, 10, 0.1) == 2
  assert fewest_lanes([np.full(10, 3)], 1, 10, 0.1) == 10  # equal clients: one a lane
  assert fewest_lanes([np.full(10, 3)], 1, 10, 1.0) == 5
  r = np.random.default_rng(0)
  for devices, most, slack in ((1, 50, 0.1), (1, 20, 0.0), (4, 13, 0.1), (2, 25, 0.3)):
    cohorts = [np.ceil(r.lognormal(2.5, 1.0, size=devices * most)).astype(int)
               for _ in range(6)]
    # The reference: every lane count from 1, by the same longest-lane average.
    mean = [np.mean([longest_lane(c, devices * k) for c in cohorts]) for k in range(1, most + 1)]
    want = next(k for k in range(1, most + 1) if mean[k - 1] <= (1 + slack) * mean[-1])
    assert fewest_lanes(cohorts, devices, most, slack) == want


@pytest.mark.parametrize('resident,lanes,lanes_per_buffer',
                         [(True, 3, 1), (False, 3, 1), (False, 3, 3), (False, 4, 2)])
def test_plan_streams_each_clients_batches_in_order(resident, lanes, lanes_per_buffer):
  task = tiny_task()
  planner = Planner(task.train, 5, lanes, seed=7, resident=resident,
                    lanes_per_buffer=lanes_per_buffer)
  clients = np.array([0, 4, 2, 9, 11])
  plan = planner.plan(clients, 3, epochs=1.5, batch_size=3.2)
  b = plan.batch_size
  assert b == 3 and plan.batch_pad >= b
  x_all = task.train.features['x']
  if not resident:
    # One buffer per device (lanes_per_buffer lanes), each client's examples in it once.
    n_all = np.asarray(task.train.num_examples)
    assert plan.lanes.source['x'].shape[0] == lanes // lanes_per_buffer
    per_buffer = [sum(n_all[clients[s]] for lane in range(b0, b0 + lanes_per_buffer)
                      for s in plan.lanes.slots[lane] if s < 5)
                  for b0 in range(0, lanes, lanes_per_buffer)]
    assert planner.buffer_pad == grow(0, max(per_buffer))
  for lane in range(lanes):
    slots = [s for s in plan.lanes.slots[lane] if s < 5]
    pos = 0
    for s in slots:
      c, k = int(clients[s]), int(plan.num_steps[s])
      n = task.train.num_examples[c]
      expected = client_batches(rng.client_shuffler(7, 3, c), n, k, b)
      rows = plan.lanes.stream[lane, pos:pos + k * b]
      got = x_all[rows] if resident else plan.lanes.source['x'][lane // lanes_per_buffer][rows]
      np.testing.assert_array_equal(got, task.train.client(c)['x'][expected.ravel()])
      pos += k * b
    assert pos == plan.lane_steps[lane] * b
  assert plan.lanes.stream.shape[1] >= plan.lane_steps.max() * b + plan.batch_pad - b
  np.testing.assert_array_equal(plan.table.num_steps[:-1], plan.num_steps)
  assert plan.table.num_steps[-1] == 0  # the sentinel slot never steps


def test_lanes_per_buffer_must_divide_the_lanes():
  for bad in (0, 2):
    with pytest.raises(ValueError, match='lanes_per_buffer must divide the 3 lanes'):
      Planner(tiny_task().train, 5, 3, seed=0, lanes_per_buffer=bad)


def test_a_device_given_other_than_one_example_buffer_is_refused():
  from fathom_sim.cohort import _device_source
  with pytest.raises(ValueError, match='exactly one example buffer, got 2'):
    _device_source({'x': np.zeros((2, 4))}, True)
  np.testing.assert_array_equal(_device_source({'x': np.ones((1, 4))}, True)['x'], np.ones(4))


def test_padding_is_inert_in_the_round():
  """Bigger padded batches, longer streams and buffers, more (partly empty) lanes, and the
  on-device vs fed-per-round data paths all give the same round results."""
  task = tiny_task()
  base_state, base_hist, _ = run_rounds(tiny_config(algorithm='fathom', num_devices=2), task, 3)
  variants = [
      (dict(num_devices=2), dict(min_batch_pad=16)),
      (dict(num_devices=2), dict(stream_pad=1024, buffer_pad=256)),
      (dict(num_devices=4, lanes_per_device=2), {}),  # 8 lanes for 5 clients
      (dict(num_devices=2, lanes_per_device=4), {}),  # capped to the 3 lanes a device fills
      (dict(num_devices=2, data_on_device='no'), {}),
      # A device's 3 lanes share one example buffer.
      (dict(num_devices=2, lanes_per_device=3, data_on_device='no'), {}),
      (dict(num_devices=2, lanes_per_device=3, data_on_device='no', local_loop='host'), {}),
      (dict(num_devices=2, data_on_device='yes', batch_pad_per_octave=1), {}),
  ]
  for overrides, planner in variants:
    state, hist, _ = run_rounds(tiny_config(algorithm='fathom', **overrides), task, 3,
                                planner_overrides=planner)
    assert_trees_close(state.params, base_state.params, rtol=1e-5, atol=1e-7)
    for (m, _), (m0, _) in zip(hist, base_hist):
      np.testing.assert_allclose(m.client_h, m0.client_h, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(m.next_hparams, m0.next_hparams, rtol=1e-6)


@pytest.mark.parametrize('algorithm, eta_h, eta_h2, moves', [
    ('fedavg', 0.01, 10.0, False), ('fathom', 0.01, 0.0, False), ('fathom', 0.0, 10.0, False),
    ('fathom', 0.01, 10.0, True)])
def test_a_static_b_is_computed_exactly_and_a_moving_one_on_the_grid(
    algorithm, eta_h, eta_h2, moves):
  """B 5 on the grid of 2 sizes per octave is 6 rows. A run whose B never moves computes 5
  (a grid saves compiles only while B moves) and compiles no neighbouring size ahead; the
  result is the padded run's."""
  task = tiny_task()
  config = tiny_config(algorithm=algorithm, eta_h=eta_h, eta_h2=eta_h2, batch_size=5.0,
                       batch_pad_per_octave=2, num_devices=2)
  state, history, rounds = run_rounds(config, task, 3)
  pad = 6 if moves else 5
  assert history[0][1].batch_pad == pad
  if moves:  # FATHOM's hyper step moved B
    assert history[-1][1].batch_size != 5
  else:
    assert [(plan.batch_size, plan.batch_pad) for _, plan in history] == [(5, 5)] * 3
  assert (rounds._neighbour_pads(pad) != []) == moves
  padded, padded_history, _ = run_rounds(config, task, 3, planner_overrides=dict(min_batch_pad=6))
  assert padded_history[0][1].batch_pad == 6
  assert_trees_close(state.params, padded.params, rtol=1e-5, atol=1e-7)
  for (m, _), (m0, _) in zip(history, padded_history):
    np.testing.assert_allclose(m.next_hparams, m0.next_hparams, rtol=1e-6)


def _one_client_lane():
  """A lane whose only client (slot 0) has K=3 real steps of B 2: lane_train(loss, ...) args."""
  model = get_model('mlp', num_classes=10, hidden=(8,))
  data = tiny_task().train.client(1)
  n = len(data['y'])
  params = model.init(jax.random.PRNGKey(0), data)
  table = CohortTable(client=np.array([1, 0], np.int32), num_examples=np.array([n, 0], np.float32),
                      num_steps=np.array([3, 0], np.int32))
  stream = np.zeros(64, np.int32)
  stream[:6] = client_batches(np.random.default_rng(0), n, 3, 2).ravel()
  return (model.loss, params, jnp.float32(0.1), jnp.int32(2), jax.random.PRNGKey(1),
          jax.tree.map(jnp.asarray, table)), (jnp.array([0], jnp.int32), jnp.asarray(stream),
                                              jax.tree.map(jnp.asarray, data))


def test_padded_steps_after_a_clients_last_step_change_nothing():
  """The lane run for 3 or for 8 loop iterations, its bound checked at every step or every 2,
  3 or 5 (so 4, 5 or 9 iterations)."""
  head, tail = _one_client_lane()
  results = [lane_train(*head, jnp.int32(iters), *tail, batch_pad=batch_pad, chunk=chunk)
             for iters, batch_pad, chunk in ((3, 2, 1), (8, 2, 1), (8, 5, 1), (3, 2, 2),
                                             (3, 2, 5), (8, 5, 3))]
  for r in results[1:]:
    assert_trees_close(r.weighted_sum, results[0].weighted_sum, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(r.h, results[0].h, rtol=1e-6)
    np.testing.assert_allclose(r.loss, results[0].loss, rtol=1e-6)
  assert int(results[0].finite[0]) == 1


def test_chunked_loop_runs_its_chunks_with_a_known_trip_count():
  """What config.loop_chunk is for: the compiler knows the inner loop's trip count (XLA:GPU
  then runs it without reading a predicate back to the host); the outer bound stays data."""
  head, tail = _one_client_lane()

  def compiled(chunk: int) -> str:
    f = jax.jit(lambda n: lane_train(*head, n, *tail, batch_pad=2, chunk=chunk))
    return f.lower(jnp.int32(3)).compile().as_text()

  assert '"known_trip_count":{"n":"4"}' in compiled(4)
  assert '"known_trip_count"' not in compiled(1)


def test_computed_steps_count_what_each_loop_runs():
  from fathom_sim.types import CohortPlan, Lanes
  plan = CohortPlan(lanes=Lanes(None, None, None), table=None, batch_size=2, batch_pad=3,
                    clients=np.arange(3), num_examples=np.array([9, 6, 4]),
                    num_steps=np.array([5, 3, 2]), lane_steps=np.array([5, 3, 0, 2]))
  # Device loop on 2 devices: each device runs its own longest lane, on both its lanes.
  assert plan.computed_steps(2) == (5 + 2) * 2
  # Host-driven loop: every lane runs as long as the longest lane of all.
  assert plan.computed_steps(2, host_loop=True) == 5 * 4
  assert plan.useful_fraction(2, host_loop=True) == pytest.approx(10 * 2 / (20 * 3))
  # Device loop checking its bound every 4 steps: each device's longest lane rounded up to 4s;
  # a device with no steps runs none.
  assert plan.computed_steps(2, chunk=4) == (8 + 4) * 2
  assert plan.useful_fraction(2, chunk=4) == pytest.approx(10 * 2 / (24 * 3))
  idle = dataclasses.replace(plan, lane_steps=np.array([5, 3, 0, 0]))
  assert idle.computed_steps(2, chunk=4) == 8 * 2
  # Lockstep: every device held as long as the longest, its bound rounded to the chunk (the
  # lanes [5, 5] on 2 devices, chunk 4, run 8 steps each: never fewer rows than computed).
  assert plan.lockstep_rows(2) == 5 * 4 * 3 == plan.lockstep_rows(2, host_loop=True)
  assert plan.lockstep_rows(2, chunk=4) == 8 * 4 * 3 >= plan.computed_rows(2, chunk=4)
  even = dataclasses.replace(plan, lane_steps=np.array([5, 0, 5, 0]))
  assert even.lockstep_rows(2, chunk=4) == even.computed_rows(2, chunk=4) == 8 * 4 * 3


def _sized_dataset(sizes) -> ArrayClientDataset:
  offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
  return ArrayClientDataset({'x': np.zeros((int(offsets[-1]), 1), np.float32)}, offsets,
                            np.arange(len(sizes)).astype(str))


@pytest.mark.parametrize('resident', [True, False])
def test_stream_is_sized_ahead_for_the_largest_client_within_a_bound(resident):
  """Drawing the dataset's largest client later compiles nothing new (the stream was sized for
  it), unless it needs more than STREAM_LOOKAHEAD times what the first cohort did."""
  from fathom_sim.data.plan import STREAM_LOOKAHEAD
  small = np.arange(4)
  # E 1, B 5: each small client takes 2 steps of 5; the largest 30 rows, within 4 x 10.
  planner = Planner(_sized_dataset([10] * 8 + [30]), 4, 4, 0, resident=resident)
  first = planner.plan(small, 1, 1.0, 5.0).lanes.stream.shape
  assert planner.plan(np.array([0, 1, 2, 8]), 2, 1.0, 5.0).lanes.stream.shape == first
  # An outlier of 200 rows: the stream stays at the bound, then grows when it is drawn.
  planner = Planner(_sized_dataset([10] * 8 + [200]), 4, 4, 0, resident=resident)
  plan = planner.plan(small, 1, 1.0, 5.0)
  need = 10 + plan.batch_pad - 5  # 2 steps of 5, and a padded step's slack
  assert plan.lanes.stream.shape[1] == grow(0, STREAM_LOOKAHEAD * need) < 200
  assert planner.plan(np.array([0, 1, 2, 8]), 2, 1.0, 5.0).lanes.stream.shape[1] >= 200


def test_seeds_in_one_program_hold_the_largest_seeds_example_buffer_not_twice_it():
  """Vectorised seeds grew their own buffers (each already padded, 1.5x up to a power of two)
  again: the examples held on the devices, and sent each round, were twice the largest
  seed's. The stream of indices keeps its headroom: at least each seed's own stream and the
  slack of the largest B_pad on it."""
  cohorts = [np.array([0, 1, 2]), np.array([3, 4, 5])]
  hparams = np.zeros((2, 3), np.float32)
  hparams[:, EPOCHS] = 1.0
  for batch_sizes, pads in (((5.0, 5.0), [6, 6]), ((5.0, 7.0), [6, 8])):
    hparams[:, BATCH] = batch_sizes
    seeds = SeedPlanners(_sized_dataset([10, 20, 30, 40, 50, 60]), 3, 2, [0, 1])
    stacked = seeds.plan(cohorts, 1, hparams)
    own = [p.padded_lengths() for p in seeds.planners]
    assert [p.batch_pad for p in stacked.plans] == pads and stacked.batch_pad == max(pads)
    assert stacked.lanes.source['x'].shape[2] == max(b for _, b in own) > min(b for _, b in own)
    need = max(s + stacked.batch_pad - pad for (s, _), pad in zip(own, pads))
    assert stacked.lanes.stream.shape[-1] == grow(0, need)
    for plan, stream, source in zip(stacked.plans, stacked.lanes.stream, stacked.lanes.source['x']):
      rows = plan.lanes.source['x'].shape[1]  # each seed's own rows, as it plans them alone
      np.testing.assert_array_equal(stream[:, :plan.lanes.stream.shape[1]], plan.lanes.stream)
      np.testing.assert_array_equal(source[:, :rows], plan.lanes.source['x'])


def test_seeds_in_one_program_copy_only_this_processs_example_buffers():
  """On several hosts a process fills its own devices' buffers; stacking the seeds copied every
  buffer, the others' zeros too, so every host held (and copied each round) every host's
  share. Rows of other processes' buffers are left unwritten: never sent, never touched."""
  from fathom_sim.data.plan import _stacked
  arrays = [np.full((4, 3, 2), s + 1.0, np.float32) for s in range(2)]  # [D, R, ...] a seed
  out = _stacked(arrays, 5, np.array([1, 3]))
  assert out.shape == (2, 4, 5, 2)
  np.testing.assert_array_equal(out[:, [1, 3], :3], np.stack([a[[1, 3]] for a in arrays]))
  assert not out[:, [0, 2]].any() and not out[:, :, 3:].any()
  cohorts = [np.array([0, 1, 2]), np.array([3, 4, 5])]
  hparams = np.zeros((2, 3), np.float32)
  hparams[:, EPOCHS], hparams[:, BATCH] = 1.0, 5.0
  local = np.array([False, False, True, True])  # 4 lanes, 2 a buffer: this process's 2nd
  seeds = SeedPlanners(_sized_dataset([10, 20, 30, 40, 50, 60]), 3, 4, [0, 1],
                       lanes_per_buffer=2, local_lanes=local)
  stacked = seeds.plan(cohorts, 1, hparams)
  for plan, source in zip(stacked.plans, stacked.lanes.source['x']):
    np.testing.assert_array_equal(source[:, :plan.lanes.source['x'].shape[1]],
                                  plan.lanes.source['x'])


def test_a_lane_past_the_example_indices_a_round_addresses_is_refused(monkeypatch):
  """Each client fits the limit alone (what run.py checks before the run), but a lane that
  joins them reads past it: the device's int32 step * B_int would wrap (at 2^31; here the
  limit is lowered, so that a planner without the check fails, not fills the host's memory)."""
  from fathom_sim.config import ConfigError
  from fathom_sim.data import plan as plan_lib
  monkeypatch.setattr(plan_lib, 'MAX_INDICES', 1000)
  sizes = [400] * 3
  planner = Planner(_sized_dataset(sizes), 3, 1, 0, resident=True, exact_batch=True)
  with pytest.raises(ConfigError, match=r'^E=1, B=1: a lane of this cohort reads 1200 example '
                     r'indices in the round, past the 1000 a round can address'):
    planner.plan(np.arange(3), 1, 1.0, 1.0)
  assert planner.stream_pad == 0  # refused before the stream was sized
  # A lane a client: within the limit, and the stream's padding stays under it.
  plan = Planner(_sized_dataset(sizes), 3, 3, 0, resident=True, exact_batch=True).plan(
      np.arange(3), 1, 1.0, 1.0)
  assert 400 <= plan.lanes.stream.shape[1] < 1000


def test_a_plan_past_the_hosts_memory_is_refused_and_its_lookahead_kept_within_it(monkeypatch):
  """E 1e6 planned a round of 2e9 indices: 16 GB of the host's memory and growing, for hours,
  before an error or the OOM killer. Here the host's memory is lowered instead."""
  from fathom_sim.config import ConfigError
  from fathom_sim.data import plan as plan_lib
  monkeypatch.setattr(plan_lib, 'host_memory', lambda: 20_000)
  sizes = [400] * 3
  planner = Planner(_sized_dataset(sizes), 3, 1, 0, resident=True, exact_batch=True)
  # One lane of 1200 indices: 4 bytes each in the stream, 16 while a client's are cut.
  with pytest.raises(ConfigError, match=r"^E=1, B=1: this cohort's plan holds 1200 example "
                     r"indices for each of its 1 lane\(s\), 0.0 GiB, more than the host's "
                     r"memory \(0.0 GiB\); lower E \(config.epochs"):
    planner.plan(np.arange(3), 1, 1.0, 1.0)
  assert planner.stream_pad == 0
  # Three lanes of 400 (11,200 bytes) fit; the stream's headroom, 1024 unbounded, stops at
  # half the memory: 20,000 / 2 / 4 bytes / 3 lanes.
  plan = Planner(_sized_dataset(sizes), 3, 3, 0, resident=True, exact_batch=True).plan(
      np.arange(3), 1, 1.0, 1.0)
  assert plan.lanes.stream.shape[1] == 833
  # Two vectorised seeds hold four such streams (each seed's and the stacked copy): 25,600.
  seeds = SeedPlanners(_sized_dataset(sizes), 3, 3, [0, 1], resident=True, exact_batch=True)
  with pytest.raises(ConfigError, match=r"lane\(s\) \(x4 copies: vectorised seeds' own and "
                                        r"stacked\), 0.0 GiB, more than the host's memory"):
    seeds.plan([np.arange(3)] * 2, 1, np.ones((2, 3), np.float32))
  monkeypatch.setattr(plan_lib, 'host_memory', lambda: 1 << 40)
  plan = Planner(_sized_dataset(sizes), 3, 3, 0, resident=True, exact_batch=True).plan(
      np.arange(3), 1, 1.0, 1.0)
  assert plan.lanes.stream.shape[1] > 833


def test_the_seeds_stacked_stream_keeps_its_headroom_within_the_room(monkeypatch):
  """The stacked stream of vectorised seeds grew 1.5x past each seed's own, to a power of two,
  with no bound: each seed's stream stopped at the room (half the host's memory over its
  2 x seeds copies) and the stacked one went on to 1024, past it."""
  from fathom_sim.data import plan as plan_lib
  monkeypatch.setattr(plan_lib, 'host_memory', lambda: 60_000)
  seeds = SeedPlanners(_sized_dataset([400] * 3), 3, 3, [0, 1], resident=True,
                       exact_batch=True)
  stacked = seeds.plan([np.arange(3)] * 2, 1, np.ones((2, 3), np.float32))
  room = 60_000 // (2 * 4 * 3 * 4)  # 4 bytes an index, 3 lanes, 2 seeds x 2 copies: 625
  assert [p.lanes.stream.shape[1] for p in stacked.plans] == [room] * 2
  assert stacked.lanes.stream.shape == (2, 3, room)
  # With room to spare, the headroom is grow()'s, as before.
  monkeypatch.setattr(plan_lib, 'host_memory', lambda: 1 << 40)
  seeds = SeedPlanners(_sized_dataset([400] * 3), 3, 3, [0, 1], resident=True,
                       exact_batch=True)
  assert seeds.plan([np.arange(3)] * 2, 1, np.ones((2, 3), np.float32)).lanes.stream.shape[2] \
      == 2048


def _lanes_plan(lane_steps, batch_pad, batch_size=3):
  """A plan with only what computed_steps and useful_fraction read (one client a lane)."""
  from fathom_sim.types import CohortPlan
  steps = np.asarray(lane_steps)
  return CohortPlan(lanes=None, table=None, batch_size=batch_size, batch_pad=batch_pad,
                    clients=None, num_examples=None, num_steps=steps, lane_steps=steps)


def test_computed_steps_of_seeds_in_one_program_by_hand():
  """2 devices x 2 lanes. Seeds vmapped in one program run each device's loop as long as its
  longest lane of any seed (chunks rounded up per device; the host loop as long as the longest
  lane of all), at the largest B_pad of any seed."""
  a, b = _lanes_plan([3, 1, 2, 2], batch_pad=4), _lanes_plan([1, 1, 5, 0], batch_pad=6)
  assert a.computed_steps(2) == (3 + 2) * 2
  assert a.computed_steps(2, alongside=(b,)) == (3 + 5) * 2
  assert b.computed_steps(2, alongside=(a,)) == (3 + 5) * 2
  assert a.computed_steps(2, chunk=4, alongside=(b,)) == (4 + 8) * 2
  assert a.computed_steps(2, host_loop=True) == 3 * 4
  assert a.computed_steps(2, host_loop=True, alongside=(b,)) == 5 * 4
  # 8 real steps of 3 examples: against 10 steps of 4 rows alone, 16 steps of 6 rows together.
  assert a.useful_fraction(2) == 24 / 40
  assert a.useful_fraction(2, alongside=(b,)) == 24 / 96
  assert b.useful_fraction(2, alongside=(a,)) == 21 / 96


def test_the_host_and_device_loops_compute_the_same_bits_on_cpu():
  """Issue 8 asks the local-step strategies for identical results; the test above holds them
  to 1e-5. On the CPU they train bitwise the same (a resume may switch local_loop): the final
  params and every round's hyperparameters and hypergradients. The logged losses, each
  client's mean over its steps, are summed in another order (1 ulp apart here)."""
  task = tiny_task()
  (a, a_hist, _), (b, b_hist, _) = [
      run_rounds(tiny_config(algorithm='fathom', num_devices=2, lanes_per_device=2,
                             local_loop=loop), task, 3) for loop in ('device', 'host')]
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(x, y)
  for (m, _), (n, _) in zip(a_hist, b_hist):
    for field in m._fields:
      if field in ('client_loss', 'train_loss'):
        np.testing.assert_allclose(getattr(m, field), getattr(n, field), rtol=1e-6)
      else:
        np.testing.assert_array_equal(getattr(m, field), getattr(n, field), err_msg=field)
