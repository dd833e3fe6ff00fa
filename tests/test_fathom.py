"""FATHOM: the hyper update, the hypergradients against the reference, bucket crossings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fathom_sim import fathom, tree
from fathom_sim.data.federated import ArrayClientDataset, Task
from tests.common import (assert_trees_close, reference_rounds, run_rounds, tiny_config,
                          tiny_task)

UPPER = (10.0, 0.5, 5096.0)


def _params(seed):
  r = np.random.default_rng(seed)
  return {'a': jnp.asarray(r.normal(size=(3, 4)), jnp.float32),
          'b': jnp.asarray(r.normal(size=5), jnp.float32)}


def test_hyper_update_is_the_spec_formula():
  # alpha away from 0.5, where g <- alpha g + (1 - alpha) Delta cannot tell alpha from 1 - alpha.
  tuner = fathom.hyper_tuner(alpha=0.9, eta_h=0.01, scales=(1.0, 2.0, 10.0), upper=UPPER)
  state = tuner.init(_params(0), (1.0, 0.1, 20.0))
  np.testing.assert_allclose(state.log_hparams, np.log([1.0, 0.1, 20.0]), rtol=1e-6)
  d1, d2 = _params(1), _params(2)
  state, h_glob = tuner.update(state, d1, jnp.float32(0.3))
  assert float(h_glob) == 0.0  # g starts at zero: round 1 has no global hypergradient
  np.testing.assert_allclose(state.log_hparams,
                             np.log([1.0, 0.1, 20.0]) + 0.01 * np.array([0.3, 0, -10 * 0.3]),
                             rtol=1e-6)
  assert_trees_close(state.ema, tree.scale(0.1, d1))
  phi = np.asarray(state.log_hparams)
  state, h_glob = tuner.update(state, d2, jnp.float32(-0.2))
  expected_cos = float(tree.vdot(d1, d2) / (tree.l2_norm(d1) * tree.l2_norm(d2)))
  np.testing.assert_allclose(h_glob, expected_cos, rtol=1e-6)
  step = np.array([expected_cos - 0.2, 2 * expected_cos, -10 * -0.2])
  np.testing.assert_allclose(state.log_hparams, phi + 0.01 * step, rtol=1e-5)
  assert_trees_close(state.ema, jax.tree.map(lambda a, b: 0.09 * a + 0.1 * b, d1, d2))


def test_hparams_clip_values_but_not_phi_unless_asked():
  phi = jnp.log(jnp.array([20.0, 0.05, 9000.0]))
  np.testing.assert_allclose(fathom.hparams(phi, jnp.array(UPPER)), [10.0, 0.05, 5096.0],
                             rtol=1e-6)
  for clip in (False, True):
    tuner = fathom.hyper_tuner(alpha=0.5, eta_h=1.0, scales=(1, 1, 1), upper=UPPER,
                               clip_log_params=clip)
    state = tuner.init(_params(0), (9.9, 0.49, 5000.0))
    state, _ = tuner.update(state, _params(1), jnp.float32(-1.0))  # pushes B up by e^1
    state, _ = tuner.update(state, _params(1), jnp.float32(1.0))   # h_glob = 1: E, eta up
    over = np.asarray(state.log_hparams) > np.log(UPPER) + 1e-6
    assert over.any() != clip


def test_a_rejected_round_halves_the_eta_it_used_even_with_phi_above_its_bound():
  """phi is unclipped: with exp(phi_eta) at 4x its bound the round used the bound, and the
  next one uses half of it (halving phi alone would leave it at 2x, clipped to the same eta).
  E and B stay; a frozen tuner (FedAvg) changes nothing."""
  tuner = fathom.hyper_tuner(alpha=0.5, eta_h=0.01, scales=(1, 1, 1), upper=UPPER)
  upper = jnp.array(UPPER)
  for eta, want in ((4 * UPPER[1], UPPER[1] / 2), (UPPER[1] / 4, UPPER[1] / 8)):
    state = tuner.init(_params(0), (2.0, eta, 30.0))
    after = tuner.rejected(state)
    np.testing.assert_allclose(fathom.hparams(after.log_hparams, upper),
                               [2.0, want, 30.0], rtol=1e-6)
  frozen = fathom.hyper_tuner(alpha=0.5, eta_h=0.01, scales=(1, 1, 1), upper=UPPER, frozen=True)
  state = frozen.init(_params(0), (2.0, 4 * UPPER[1], 30.0))
  np.testing.assert_array_equal(frozen.rejected(state).log_hparams, state.log_hparams)


def test_frozen_tuner_keeps_phi_and_tracks_h_glob():
  tuner = fathom.hyper_tuner(alpha=0.5, eta_h=0.01, scales=(1, 1, 10), upper=UPPER,
                             frozen=True)
  state = tuner.init(_params(0), (1.0, 0.1, 20.0))
  phi = np.asarray(state.log_hparams)
  state, _ = tuner.update(state, _params(1), jnp.float32(0.5))
  state, h_glob = tuner.update(state, _params(1), jnp.float32(0.5))
  np.testing.assert_array_equal(state.log_hparams, phi)
  np.testing.assert_allclose(h_glob, 1.0, rtol=1e-6)


def test_adam_hyper_optimizer_moves_phi_by_eta_h_in_the_hypergradients_sign():
  tuner = fathom.hyper_tuner(alpha=0.5, eta_h=0.01, scales=(1, 1, 10), upper=UPPER,
                             optimizer='adam')
  state = tuner.init(_params(0), (1.0, 0.1, 20.0))
  phi = np.asarray(state.log_hparams)
  state, _ = tuner.update(state, _params(1), jnp.float32(0.4))
  np.testing.assert_allclose(np.asarray(state.log_hparams) - phi, [0.01, 0.0, -0.01],
                             atol=1e-4)


def test_adam_hyper_optimizer_carries_its_moments_across_rounds():
  """Adam's first step is +-lr whatever its state; three rounds whose hypergradients change
  sign and size tell moments carried from moments dropped, and b1 from b2. The reference is
  Adam written out in float64 with optax's defaults (b1 0.9, b2 0.999, eps 1e-8)."""
  tuner = fathom.hyper_tuner(alpha=0.5, eta_h=0.01, scales=(1, 2, 10), upper=UPPER,
                             optimizer='adam')
  state = tuner.init(_params(0), (1.0, 0.1, 20.0))
  phi = np.log([1.0, 0.1, 20.0])
  m, v = np.zeros(3), np.zeros(3)
  ema = jax.tree.map(lambda a: np.zeros(a.shape), _params(0))
  for t, (seed, h_local) in enumerate(((1, 0.4), (1, -0.3), (2, 0.05)), start=1):
    delta = _params(seed)
    d, e = (np.concatenate([np.ravel(a) for a in jax.tree.leaves(x)]) for x in (delta, ema))
    h_glob = 0.0 if not e.any() else float(d @ e / np.linalg.norm(d) / np.linalg.norm(e))
    ema = jax.tree.map(lambda a, b: 0.5 * a + 0.5 * np.asarray(b, np.float64), ema, delta)
    g = -np.array([h_glob + h_local, h_glob, -h_local]) * [1, 2, 10]
    m = 0.9 * m + 0.1 * g
    v = 0.999 * v + 0.001 * g * g
    phi = phi - 0.01 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    state, got_h = tuner.update(state, delta, jnp.float32(h_local))
    np.testing.assert_allclose(got_h, h_glob, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.log_hparams, phi, rtol=1e-5, atol=1e-6)
  assert abs(h_glob) > 0.01  # round 3 moves eta: its h_glob is not 0


def test_cosine_is_zero_when_a_norm_is_zero():
  zero = jax.tree.map(jnp.zeros_like, _params(0))
  assert float(tree.cosine(zero, _params(1))) == 0.0
  assert float(tree.cosine(_params(1), zero)) == 0.0
  np.testing.assert_allclose(tree.cosine(_params(1), tree.scale(-3.0, _params(1))), -1.0,
                             rtol=1e-6)


def test_cosine_of_a_sum_that_overflowed_is_nan_not_zero():
  # |a|^2 overflows float32 while <a, 0.1 a> and |0.1 a|^2 do not: the true cosine is 1, and 0
  # would pass for an orthogonal pair. NaN lets the client (client.py) or the round (round.py's
  # finite check of phi) be left out instead.
  a = {'w': jnp.full((2,), 2e19, jnp.float32)}
  assert np.isnan(float(tree.cosine(a, tree.scale(0.1, a))))
  assert np.isnan(float(tree.cosine_of(jnp.float32(1.0), jnp.float32(1.0), jnp.float32(np.inf))))
  assert np.isnan(float(tree.cosine_of(jnp.float32(np.nan), jnp.float32(1.0), jnp.float32(1.0))))
  big = {'w': jnp.full((2,), 1e18, jnp.float32)}  # |big|^2 = 2e36: still finite, still 1
  np.testing.assert_allclose(float(tree.cosine(big, tree.scale(0.1, big))), 1.0, rtol=1e-6)


def test_cosine_stays_in_its_range_where_float32_loses_part_of_a_norm():
  """Squares below float32's normal range flush to 0, so a vector with some entries under
  ~1e-19 (a saturated softmax's gradient tail) lost part of its norm: cos(a, 2a) read 5.7 and a
  first step's c_1 1.48, where the spec has c_1 = 1 and h_i <= 1."""
  from fathom_sim import lane_update
  r = np.random.default_rng(0)
  g = (r.lognormal(size=4096) * 1e-19 * r.choice([-1, 1], 4096)).astype(np.float32)
  a = {'w': jnp.asarray((r.normal(size=1000) * 1e-17).astype(np.float32))}
  assert float(jax.jit(tree.cosine)(a, tree.scale(2.0, a))) == 1.0
  assert float(jax.jit(tree.cosine)(a, tree.scale(-0.1, a))) == -1.0
  x = {'b': jnp.zeros(4096, jnp.float32)}
  _, c1, _ = jax.jit(lane_update.step)(x, {'b': jnp.asarray(g)}, x, jnp.float32(0.1), True)
  assert float(c1) == 1.0
  assert float(tree.cosine_of(jnp.float32(3.0), jnp.float32(1.0), jnp.float32(1.0))) == 1.0


def test_cosine_is_accurate_at_the_cnn_size():
  # h_i and h_glob are cosines over every parameter: 1.2 M of them for the EMNIST CNN. A
  # float32 sum whose error drifts with the length is off by 1e-4 to 1e-3 there (XLA:CPU's
  # variadic reduce, tried in a fusion experiment: docs/benchmarks.md); the jitted cosine must stay
  # within 1e-5 of float64, here on a gradient-like and an update-like (offset) pair.
  r = np.random.default_rng(0)
  shapes = [(3, 3, 1, 32), (32,), (3, 3, 32, 64), (64,), (9216, 128), (128,), (128, 62), (62,)]
  g = [r.standard_normal(s).astype(np.float32) for s in shapes]
  pairs = ([(x * 0.9 + 0.1 * r.standard_normal(x.shape)).astype(np.float32) for x in g],
           [(-0.01 + 0.03 * x).astype(np.float32) for x in g])
  flat = lambda t: np.concatenate([np.ravel(x) for x in t]).astype(np.float64)
  cosine = jax.jit(tree.cosine)
  for d in pairs:
    a, b = flat(g), flat(d)
    expected = a @ b / np.sqrt((a @ a) * (b @ b))
    assert abs(float(cosine(g, d)) - expected) < 1e-5


def _equal_clients_task(num_clients=6, n=8, seed=0):
  r = np.random.default_rng(seed)
  clients = []
  for k in range(num_clients):
    centre = r.normal(size=60)
    x = (centre + r.normal(size=(n, 60))).astype(np.float32)
    clients.append({'x': x, 'y': r.integers(0, 10, n).astype(np.int32)})
  ids = [f'c{k}' for k in range(num_clients)]
  data = ArrayClientDataset.from_clients(ids, clients)
  return Task('equal', data, data, 10)


@pytest.mark.parametrize('num_devices', [1, 8])
def test_deterministic_trajectory_matches_reference_over_10_rounds(num_devices):
  """Equal client sizes, the whole population every round, B = n (full batches), eta_h2 = 0."""
  task = _equal_clients_task()
  config = tiny_config(algorithm='fathom', num_devices=num_devices, cohort_size=6,
                       batch_size=8.0, epochs=1.0, eta=0.2, eta_h=0.05, eta_h2=0.0)
  _, history, _ = run_rounds(config, task, 10)
  ref = reference_rounds(config, task, 10)
  got = np.array([[*m.hparams, m.h_glob, m.h_local] for m, _ in history])
  want = np.array([[*r['hparams'], r['h_glob'], r['h_local']] for r in ref])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert np.ptp(got[:, 0]) > 1e-3 and np.ptp(got[:, 1]) > 1e-3  # E and eta did move
  np.testing.assert_allclose(got[:, 2], 8.0)  # eta_h2 = 0: B stays


def test_crossing_padded_size_buckets_changes_no_result():
  """B drifts over several rounds; coarser or finer padded batch sizes give the same run."""
  task = tiny_task()
  runs = {}
  for per_octave in (1, 2, 8):
    config = tiny_config(algorithm='fathom', batch_size=6.0, eta_h=0.5, eta_h2=1.0,
                         num_devices=2, batch_pad_per_octave=per_octave)
    runs[per_octave] = run_rounds(config, task, 6)
  b_ints = [plan.batch_size for _, plan in runs[2][1]]
  assert len(set(b_ints)) >= 3, b_ints  # B really moved across sizes
  pads = {k: [plan.batch_pad for _, plan in r[1]] for k, r in runs.items()}
  assert pads[1] != pads[8]
  for k in (1, 8):
    assert_trees_close(runs[k][0].params, runs[2][0].params, rtol=1e-5, atol=1e-7)
    for (m, _), (m0, _) in zip(runs[k][1], runs[2][1]):
      np.testing.assert_allclose(m.next_hparams, m0.next_hparams, rtol=1e-6)


def test_fedavg_uses_its_static_values_exactly():
  """exp(log(x)) is not x in float32 for every x (0.1 -> 0.099999994, 50 -> 50.000004): a
  frozen tuner's values are the static ones as given, so FedAvg logs eta 0.1 and runs
  K_i = ceil(E n_i / B_int) steps, not one more whenever E n_i / B_int is whole (E 50 and B 10
  make it whole for every client)."""
  frozen = fathom.hyper_tuner(alpha=0.5, eta_h=0.01, scales=(1, 1, 1), upper=UPPER,
                              frozen=True, static=(50.0, 0.1, 10.0))
  state = frozen.init(_params(0), (50.0, 0.1, 10.0))
  np.testing.assert_array_equal(frozen.values(state), np.float32([50.0, 0.1, 10.0]))
  config = tiny_config(algorithm='fedavg', eta=0.1, epochs=50.0, batch_size=10.0,
                       num_rounds=1, cohort_size=2)
  _, [(metrics, plan)], _ = run_rounds(config, tiny_task(), 1)
  real = np.asarray(plan.num_examples) > 0
  np.testing.assert_array_equal(np.asarray(plan.num_steps)[real],
                                5 * np.asarray(plan.num_examples)[real])
  assert np.float32(metrics.hparams[1]) == np.float32(0.1)
