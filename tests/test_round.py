"""The sharded round against the independent slow reference, on 1 and 8 devices."""

import fractions
import math

import jax
import numpy as np
import pytest

from tests.common import (assert_trees_close, reference_rounds, run_rounds, tiny_config,
                          tiny_task)


@pytest.mark.parametrize('num_devices', [1, 8])
@pytest.mark.parametrize('algorithm,local_loop,lanes,chunk', [
    ('fedavg', 'device', 1, 0), ('fathom', 'device', 1, 0), ('fathom', 'device', 3, 0),
    ('fathom', 'device', 1, 3), ('fathom', 'device', 3, 4),
    ('fedavg', 'host', 1, 0), ('fathom', 'host', 1, 0)])
def test_round_matches_slow_reference(algorithm, local_loop, lanes, chunk, num_devices):
  # Fractional E and B_int = 3 make K_i vary and batches wrap across passes. The local loop on
  # the device and the one driven by the host step by step must both match; so must one lane
  # per device (lane_step's end-of-client cond runs as a branch) and several side by side
  # (vmapped, the cond runs as selects), and a device loop that checks its bound every few
  # steps (the padding steps past it change nothing). alpha is not 0.5, where alpha and
  # 1 - alpha are the same.
  config = tiny_config(algorithm=algorithm, num_devices=num_devices, local_loop=local_loop,
                       lanes_per_device=lanes, loop_chunk=chunk, alpha=0.8)
  task = tiny_task()
  state, history, _ = run_rounds(config, task, 3)
  ref = reference_rounds(config, task, 3)
  for (m, plan), r in zip(history, ref):
    np.testing.assert_array_equal(plan.num_steps, r['num_steps'])
    assert plan.batch_size == r['b_int']
    np.testing.assert_allclose(m.hparams, r['hparams'], rtol=1e-6)
    np.testing.assert_allclose(m.client_h, r['client_h'], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m.h_local, r['h_local'], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m.h_glob, r['h_glob'], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m.client_loss, r['client_loss'], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m.train_loss, r['train_loss'], rtol=1e-5, atol=1e-6)
  assert_trees_close(state.params, ref[-1]['params'])
  assert_trees_close(state.hyper.ema, ref[-1]['ema'])
  np.testing.assert_allclose(state.hyper.log_hparams, ref[-1]['phi'], rtol=1e-5, atol=1e-6)
  assert int(state.round) == 3


def test_bounds_that_bind_match_the_slow_reference():
  """E and eta pushed past their bounds by large hyper scales: the rounds use the clipped
  values while phi goes on unclipped (spec/fathom.md), bound by bound in the config's order."""
  config = tiny_config(eta_h0=30.0, eta_h1=300.0, upper_epochs=1.7, upper_eta=0.06,
                       upper_batch_size=3.2)
  task = tiny_task()
  state, history, _ = run_rounds(config, task, 3)
  ref = reference_rounds(config, task, 3)
  for (m, plan), r in zip(history, ref):
    np.testing.assert_array_equal(plan.num_steps, r['num_steps'])
    np.testing.assert_allclose(m.hparams, r['hparams'], rtol=1e-6)
  used = np.asarray([m.hparams for m, _ in history])
  np.testing.assert_allclose(used[-1, :2], [1.7, 0.06], rtol=1e-6)  # both bind by round 3
  assert np.exp(state.hyper.log_hparams[0]) > 1.7  # phi itself is not clipped
  assert_trees_close(state.params, ref[-1]['params'])
  np.testing.assert_allclose(state.hyper.log_hparams, ref[-1]['phi'], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('conv', ['matmul', 'xla', 'pallas'])
def test_the_cnn_with_dropout_matches_the_slow_reference_step_for_step(conv):
  """The MLP tests above have no dropout and no padding rows. The EMNIST CNN has both: each
  client's dropout masks come from (seed, round, client, step), not from its lane or the
  padded batch (B 20 runs as 24 rows here, by min_batch_pad: FedAvg's own plans compute
  exactly B_int rows). One local step per client (E n_i < B), so that float
  rounding cannot send a ReLU unit to its other side and the paths apart (a few steps can,
  in either conv form: README, model.conv)."""
  from fathom_sim.data import load_task
  config = tiny_config(algorithm='fedavg', num_devices=2, cohort_size=3, eta=0.1, epochs=0.05,
                       batch_size=20.0)
  config.model.name, config.model.conv = 'emnist_cnn', conv
  config.data.name, config.data.num_clients = 'femnist_synthetic', 8
  task = load_task(config.data)
  state, history, _ = run_rounds(config, task, 2, planner_overrides=dict(min_batch_pad=24))
  ref = reference_rounds(config, task, 2)
  for (m, plan), r in zip(history, ref):
    np.testing.assert_array_equal(plan.num_steps, r['num_steps'])
    assert set(np.asarray(r['num_steps'])) == {1} and plan.batch_pad == 24
  assert_trees_close(state.params, ref[-1]['params'])


def test_each_local_step_draws_its_own_dropout_masks():
  """The test above runs one step per client, so a key that ignored the step (the same masks
  at every step) passed it. Here clients run 3-4 steps at a small eta, so the paths stay
  close (no ReLU unit rounds to its other side), and the round's update must match the
  reference's to 1 % of its norm (3e-5 measured; one step's masks reused at every step: 72 %)."""
  from fathom_sim.data import load_task
  config = tiny_config(algorithm='fedavg', num_devices=2, cohort_size=3, eta=1e-3,
                       epochs=0.3, batch_size=20.0)
  config.model.name, config.model.conv = 'emnist_cnn', 'xla'
  config.data.name, config.data.num_clients = 'femnist_synthetic', 8
  task = load_task(config.data)
  from tests.common import build, init_state
  start = jax.device_get(init_state(build(config, task)).params)
  state, history, _ = run_rounds(config, task, 1)
  [r] = reference_rounds(config, task, 1)
  assert max(r['num_steps']) >= 2 and list(history[0][1].num_steps) == list(r['num_steps'])
  got = np.concatenate([np.ravel(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                        for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(state.params))])
  want = np.concatenate([np.ravel(d) for d in jax.tree.leaves(r['delta'])])
  assert np.linalg.norm(got - want) < 0.01 * np.linalg.norm(want)


@pytest.mark.parametrize('algorithm', ['fathom', 'fedavg'])
def test_a_half_batch_size_goes_up_in_round_one(algorithm):
  """B 3.5 is 4 examples (a half goes up). FATHOM's round 1 takes B from exp(log 3.5), which
  is 3.4999998 in float32: it ran 3 examples a step while the reference (B from the config
  in float64) runs 4."""
  config = tiny_config(algorithm=algorithm, batch_size=3.5)
  task = tiny_task()
  state, history, _ = run_rounds(config, task, 2)
  ref = reference_rounds(config, task, 2)
  assert history[0][1].batch_size == ref[0]['b_int'] == 4
  for (m, plan), r in zip(history, ref):
    np.testing.assert_array_equal(plan.num_steps, r['num_steps'])
  assert_trees_close(state.params, ref[-1]['params'])


def test_fedavg_with_an_e_float32_cannot_hold_runs_the_specs_steps():
  """E 0.2 is 0.20000000298 in float32: a client of 5 examples ran 2 steps of B 1, not
  ceil(0.2 * 5) = 1 (and so did every client whose n is a multiple of 5)."""
  config = tiny_config(algorithm='fedavg', epochs=0.2, batch_size=1.0, num_devices=1)
  _, history, _ = run_rounds(config, tiny_task(), 3)
  whole = 0
  for _, plan in history:
    for n, k in zip(np.asarray(plan.num_examples), np.asarray(plan.num_steps)):
      if n > 0:
        assert k == max(1, math.ceil(fractions.Fraction(1, 5) * int(n))), (n, k)
        whole += int(n) % 5 == 0
  assert whole > 0  # the case that went wrong was met


def test_same_result_on_1_and_8_devices_with_cohort_not_dividing_devices():
  task = tiny_task()
  results = {}
  for n in (1, 8):
    config = tiny_config(algorithm='fathom', num_devices=n, cohort_size=5)
    results[n] = run_rounds(config, task, 4)
  (s1, h1, _), (s8, h8, _) = results[1], results[8]
  assert_trees_close(s1.params, s8.params, rtol=1e-5, atol=1e-7)
  for (m1, _), (m8, _) in zip(h1, h8):
    np.testing.assert_allclose(m1.next_hparams, m8.next_hparams, rtol=1e-6)
    np.testing.assert_allclose(m1.client_h, m8.client_h, rtol=1e-5, atol=1e-6)


def test_params_actually_change_and_stay_finite():
  from tests.common import build, init_state
  config, task = tiny_config(), tiny_task()
  start = jax.device_get(init_state(build(config, task)).params)
  state, history, _ = run_rounds(config, task, 2)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
  assert all(np.abs(x - y).max() > 1e-4 for x, y in zip(jax.tree.leaves(state.params),
                                                          jax.tree.leaves(start)))
  assert all(m.accepted and m.dropped_clients == 0 for m, _ in history)
  assert float(np.abs(history[1][0].h_glob)) > 0  # round 2 compares with round 1's update


def test_the_rows_count_each_clients_steps_and_examples_as_the_reference_takes_them(tmp_path):
  """metrics.jsonl's cumulative `local_steps` (sum of K_i) and `examples` (sum of K_i B_int),
  and summary.json's totals, against tests/reference.py's clients. (Checked before only to
  grow, and to agree between runs of this code: counting clients for steps passed.)"""
  from fathom_sim.data import load_task
  from fathom_sim.train import train_and_evaluate
  from tests.test_cli import read_rows
  config = tiny_config(algorithm='fathom', num_rounds=3, eta_h=0.5)  # (B_int moves)
  summary = train_and_evaluate(config, str(tmp_path / 'run'))
  rows = [r for r in read_rows(str(tmp_path / 'run')) if 'train_loss' in r]
  refs = reference_rounds(config, load_task(config.data), 3)
  steps = np.cumsum([sum(r['num_steps']) for r in refs])
  examples = np.cumsum([sum(r['num_steps']) * r['b_int'] for r in refs])
  assert len({r['b_int'] for r in refs}) > 1  # (a step counted for B_int examples would pass)
  assert [r['local_steps'] for r in rows] == steps.tolist()
  assert [r['examples'] for r in rows] == examples.tolist()
  assert [r['batch_size_int'] for r in rows] == [r['b_int'] for r in refs]
  assert (summary['total_local_steps'], summary['total_examples']) == (steps[-1], examples[-1])


def test_a_non_finite_client_is_left_out_as_if_it_had_not_been_drawn(tmp_path):
  """Delta, h_local and the train loss are n_i-weighted means over the finite clients alone:
  tests/reference.py's rounds of the cohort without the poisoned client. (The tests of a
  dropped client compared runs of this code with each other: a mean divided by every client's
  examples, the dropped one's among them, passed.)"""
  from fathom_sim.data import load_task
  from tests.test_resume import _npz_with_bad_clients
  data = str(tmp_path / 'data')
  _npz_with_bad_clients(data, bad=[2])  # 4 clients; client 2 has a NaN example
  config = tiny_config(algorithm='fathom', cohort_size=4, batch_size=4.0)
  config.data.name, config.data.path, config.data.num_classes = 'npz', data, 10
  task = load_task(config.data)
  state, history, _ = run_rounds(config, task, 2)
  refs = reference_rounds(config, task, 2, leave_out=(2,))
  for (m, _), r in zip(history, refs):
    assert int(m.dropped_clients) == 1 and bool(m.accepted)
    np.testing.assert_allclose(m.h_local, r['h_local'], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m.train_loss, r['train_loss'], rtol=1e-5)
    np.testing.assert_allclose(m.h_glob, r['h_glob'], rtol=1e-4, atol=1e-6)
  assert_trees_close(state.params, refs[-1]['params'], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(state.hyper.log_hparams, refs[-1]['phi'], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('server_optimizer', ['sgd', 'momentum', 'adam', 'yogi', 'adagrad'])
@pytest.mark.parametrize('algorithm', ['fedavg', 'fathom'])
def test_server_optimizers_take_delta_as_gradient(server_optimizer, algorithm):
  """Three rounds against tests/reference.py's numpy server steps (optax's rules written out):
  one round could not tell a state carried from one dropped (momentum's first step is SGD's,
  Adam's bias correction cancels b1 and b2), nor b1 from b2. Under FATHOM, h_glob and g follow
  the clients' aggregate Delta, not the server's step (the same only for SGD at lr 1)."""
  config = tiny_config(algorithm=algorithm, server_optimizer=server_optimizer, server_lr=0.5,
                       server_b1=0.8, server_b2=0.95, server_momentum=0.7)
  task = tiny_task()
  state, history, _ = run_rounds(config, task, 3)
  refs = reference_rounds(config, task, 3)
  assert_trees_close(state.params, refs[-1]['params'], rtol=1e-4, atol=1e-5)
  if algorithm == 'fathom':
    for (m, _), r in zip(history, refs):
      np.testing.assert_allclose(m.h_glob, r['h_glob'], rtol=1e-4, atol=1e-6)
    assert_trees_close(state.hyper.ema, refs[-1]['ema'], rtol=1e-4, atol=1e-6)
    # log eta moves with h_glob alone. (log E and log B move with h_local too, and Adam's and
    # Yogi's steps of 0.5 leave a client here where its steps are below float32's rounding of
    # its params: d_k = 0 and c_k = 0 in float32, rounding noise in the float64 reference.)
    np.testing.assert_allclose(state.hyper.log_hparams[1], refs[-1]['phi'][1], rtol=1e-5)


def _task_of_sizes(sizes, num_classes=10, seed=0):
  """A task whose clients hold `sizes` examples (features of 60, as tiny_task's)."""
  from fathom_sim.data.federated import ArrayClientDataset, Task
  r = np.random.default_rng(seed)
  clients = [{'x': r.normal(size=(n, 60)).astype(np.float32),
              'y': r.integers(0, num_classes, n).astype(np.int32)} for n in sizes]
  data = ArrayClientDataset.from_clients([f'c{k}' for k in range(len(sizes))], clients)
  return Task('sizes', data, data, num_classes)


@pytest.mark.parametrize('batch_size,epochs', [(5.0, 3.0), (9.0, 7.0)])
def test_a_batch_larger_than_the_client_matches_the_slow_reference(batch_size, epochs):
  """B_int above n_i: a client of 1, 2 or 3 examples reads its data over several passes within
  one batch (examples repeat in it), and its K_i = ceil(E n_i / B_int) may still be 2 or more.
  The test above has every n_i >= B_int = 3. The reference repeats whole permutations; the
  engine's padded rows (B 5 runs as 6, 9 as 12) must stay out of the mean."""
  sizes = (1, 2, 3, 1, 2, 3, 7)
  task = _task_of_sizes(sizes)
  # eta_h2 2: B moves, but not off its B_int in 3 rounds (a smaller one pads no rows).
  config = tiny_config(algorithm='fathom', cohort_size=len(sizes), epochs=epochs,
                       batch_size=batch_size, eta=0.1, alpha=0.8, eta_h2=2.0, num_devices=2,
                       lanes_per_device=2)
  state, history, _ = run_rounds(config, task, 3)
  ref = reference_rounds(config, task, 3)
  for (m, plan), r in zip(history, ref):
    n = np.asarray(plan.num_examples)
    assert plan.batch_size == r['b_int'] == batch_size  # two passes and more of n 2 a batch
    assert plan.batch_pad > plan.batch_size  # padded rows are there to leave out
    assert (np.asarray(plan.num_steps)[n <= 3] > 1).any()  # and a small client steps again
    np.testing.assert_array_equal(plan.num_steps, r['num_steps'])
    np.testing.assert_allclose(m.client_h, r['client_h'], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m.h_local, r['h_local'], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m.h_glob, r['h_glob'], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m.train_loss, r['train_loss'], rtol=1e-5, atol=1e-6)
  assert abs(ref[-1]['h_glob']) > 0.01  # rounds 2 and 3 compare with the moving average
  assert_trees_close(state.params, ref[-1]['params'])
  assert_trees_close(state.hyper.ema, ref[-1]['ema'])
  np.testing.assert_allclose(state.hyper.log_hparams, ref[-1]['phi'], rtol=1e-5, atol=1e-6)


def test_zero_gradients_leave_the_model_and_phi_where_they_were():
  """One class: softmax cross-entropy is 0 whatever the params, so every g_k is exactly 0.
  The spec makes c_k = 0 when a norm is 0, so h_i = h_local = 0, Delta = 0, g stays 0, h_glob
  = 0, and phi does not move; the clients are finite, not left out (a 0/0 cosine read as NaN
  would drop them all and reject the round, one read as 1 would move log E and log B)."""
  sizes = (3, 5, 7, 4)
  task = _task_of_sizes(sizes, num_classes=1)
  config = tiny_config(algorithm='fathom', cohort_size=len(sizes), epochs=1.0, batch_size=2.0,
                       eta=0.3, num_devices=2)
  from tests.common import build, init_state
  start = jax.device_get(init_state(build(config, task)))
  state, history, _ = run_rounds(config, task, 2)
  ref = reference_rounds(config, task, 2)
  for (m, plan), r in zip(history, ref):
    assert bool(m.accepted) and int(m.dropped_clients) == 0
    assert (np.asarray(plan.num_steps) >= 2).all()  # c_2 and on, not c_1 alone
    assert r['h_local'] == r['h_glob'] == 0 and r['client_h'] == [0.0] * len(sizes)
    np.testing.assert_array_equal(m.client_h, 0.0)
    assert float(m.h_local) == 0.0 and float(m.h_glob) == 0.0
    np.testing.assert_array_equal(m.next_hparams, m.hparams)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(start.params)):
    np.testing.assert_array_equal(a, b)  # Delta = 0
  for a in jax.tree.leaves(state.hyper.ema):
    np.testing.assert_array_equal(a, 0.0)
  np.testing.assert_array_equal(state.hyper.log_hparams, start.hyper.log_hparams)
  np.testing.assert_allclose(state.hyper.log_hparams, ref[-1]['phi'], rtol=1e-6)


def test_a_batch_size_below_one_runs_one_example_a_step_in_the_rows(tmp_path):
  """FATHOM's hyper step may take B below 1 (phi is not clipped from below); a step still
  uses B_int = max(1, round(B)) = 1 example. metrics.jsonl logs the real B under 1 with
  batch_size_int 1, and counts examples as K_i * 1, as tests/reference.py's rounds take them."""
  from fathom_sim.data import load_task
  from fathom_sim.train import train_and_evaluate
  from tests.test_cli import read_rows
  config = tiny_config(algorithm='fathom', num_rounds=3, batch_size=2.6, epochs=1.0,
                       eta_h=0.5, eta_h2=10.0)
  train_and_evaluate(config, str(tmp_path / 'run'))
  rows = [r for r in read_rows(str(tmp_path / 'run')) if 'train_loss' in r]
  refs = reference_rounds(config, load_task(config.data), 3)
  assert rows[0]['batch_size_int'] == 3 and rows[-1]['batch_size'] < 1  # B fell below 1
  steps = np.cumsum([sum(r['num_steps']) for r in refs])
  assert [r['batch_size_int'] for r in rows] == [r['b_int'] for r in refs]
  np.testing.assert_allclose([r['batch_size'] for r in rows], [r['hparams'][2] for r in refs],
                             rtol=1e-5)
  below = [t for t, row in enumerate(rows) if row['batch_size'] < 1]
  assert below and all(rows[t]['batch_size_int'] == 1 for t in below)
  assert [r['local_steps'] for r in rows] == steps.tolist()
  examples = np.cumsum([sum(r['num_steps']) * r['b_int'] for r in refs])
  assert [r['examples'] for r in rows] == examples.tolist()


def test_each_pass_over_a_clients_data_is_a_new_permutation_and_batches_run_on():
  """The engine's index stream, read client by client from the round's lanes, against the
  spec's batching alone (not tests/reference.py's shuffle recipe, which the tests above share
  with the engine): K_i B_int indices into the client's own examples, cut into passes of n_i
  from the start; each full pass a permutation of them, the last (partial) one without
  repeats, and consecutive passes not the same permutation (a new one per pass). A batch that
  dropped a pass's remainder, or started each pass afresh, misaligns the passes; one
  permutation tiled repeats them."""
  task = tiny_task()
  config = tiny_config(algorithm='fedavg', epochs=3.5, batch_size=4.0, data_on_device='yes',
                       num_devices=2, lanes_per_device=2)
  _, history, _ = run_rounds(config, task, 2)
  offsets = np.asarray(task.train.offsets)
  straddles = compared = 0
  for _, plan in history:
    assert plan.lanes.source is None  # resident: the stream holds dataset rows
    b, c = plan.batch_size, len(plan.clients)
    seen = []
    for lane, slots in enumerate(plan.lanes.slots):
      pos = 0
      for s in (s for s in slots if s < c):
        client, k = int(plan.clients[s]), int(plan.num_steps[s])
        n = int(task.train.num_examples[client])
        assert k == max(1, math.ceil(fractions.Fraction(7, 2) * n / b))
        idx = plan.lanes.stream[lane, pos:pos + k * b].astype(np.int64) - offsets[client]
        pos += k * b
        seen.append(s)
        assert ((idx >= 0) & (idx < n)).all(), (client, idx)
        passes = [idx[i:i + n] for i in range(0, len(idx), n)]
        for p in passes[:-1]:
          np.testing.assert_array_equal(np.sort(p), np.arange(n))
        assert len(set(passes[-1].tolist())) == len(passes[-1])
        # Two draws of a permutation of n >= 6 agree by chance once in 720 or fewer.
        full = [p for p in passes if len(p) == n] if n >= 6 else []
        for p, q in zip(full, full[1:]):
          assert not np.array_equal(p, q), (client, n)
          compared += 1
        straddles += n % b != 0
    assert sorted(seen) == list(range(c))  # every client's batches found in one lane
  assert straddles > 0 and compared >= 10  # batches did cross pass boundaries
