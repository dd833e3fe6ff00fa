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
