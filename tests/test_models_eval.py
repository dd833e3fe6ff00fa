"""Models as pure functions, evaluation batching, and the run's output helpers."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fathom_sim import metrics
from fathom_sim.data.federated import ArrayClientDataset
from fathom_sim.evaluation import _batches, make_evaluator
from fathom_sim.mesh import make_mesh
from fathom_sim.models import get_model


def _count(params):
  return sum(x.size for x in jax.tree.leaves(params))


def test_emnist_cnn_is_the_papers_architecture():
  model = get_model('emnist_cnn', num_classes=62)
  batch = {'x': jnp.ones((4, 28, 28)), 'y': jnp.arange(4)}
  params = model.init(jax.random.PRNGKey(0), batch)
  # conv 3x3x32 + conv 3x3x64 + dense 9216x128 + dense 128x62, with biases.
  assert _count(params) == 320 + 18_496 + 1_179_776 + 7_998
  mask = jnp.ones(4, bool)
  a = model.loss(params, batch, mask, jax.random.PRNGKey(1))
  b = model.loss(params, batch, mask, jax.random.PRNGKey(2))
  assert float(a) != float(b)  # dropout is on while training, keyed by the step's key
  e1 = model.eval_sums(params, batch, mask)
  e2 = model.eval_sums(params, batch, mask)
  assert float(e1['loss']) == float(e2['loss'])  # and off in evaluation


def test_cnn_matmul_convolutions_equal_xla_ones_per_client_under_vmap():
  """conv='matmul' has nn.Conv's parameter tree and function, also vmapped over clients'
  own parameters (how a cohort runs it), gradients included."""
  xla, mm = (get_model('emnist_cnn', num_classes=62, conv=c) for c in ('xla', 'matmul'))
  r = np.random.default_rng(0)
  batch = {'x': jnp.asarray(r.random((3, 5, 28, 28)), jnp.float32),
           'y': jnp.asarray(r.integers(0, 62, (3, 5)))}
  one = {k: v[0] for k, v in batch.items()}
  p_xla, p_mm = (m.init(jax.random.PRNGKey(0), one) for m in (xla, mm))
  assert jax.tree.structure(p_xla) == jax.tree.structure(p_mm)
  for a, b in zip(jax.tree.leaves(p_xla), jax.tree.leaves(p_mm)):
    np.testing.assert_array_equal(a, b)
  # Three clients, each with its own parameters (perturbed differently).
  params = jax.tree.map(lambda p: p * jnp.asarray([1.0, 0.7, 1.3]).reshape((3,) + (1,) * p.ndim),
                        p_xla)
  mask = jnp.ones(5, bool)
  key = jax.random.PRNGKey(1)
  grads = [jax.vmap(jax.value_and_grad(m.loss), in_axes=(0, 0, None, None))(
      params, batch, mask, key) for m in (xla, mm)]
  np.testing.assert_allclose(grads[0][0], grads[1][0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads[0][1]), jax.tree.leaves(grads[1][1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match='model.conv must be one of'):
    get_model('emnist_cnn', num_classes=62, conv='fft')


def test_masked_rows_do_not_enter_the_loss():
  model = get_model('mlp', num_classes=3, hidden=(5,))
  x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
  y = np.array([0, 1, 2, 0, 1, 2])
  params = model.init(jax.random.PRNGKey(0), {'x': x, 'y': y})
  full = model.loss(params, {'x': x[:4], 'y': y[:4]}, jnp.ones(4, bool), None)
  garbage = x.copy()
  garbage[4:] = 1e6
  masked = model.loss(params, {'x': garbage, 'y': y}, jnp.arange(6) < 4, None)
  np.testing.assert_allclose(masked, full, rtol=1e-6)
  g_full = jax.grad(model.loss)(params, {'x': x[:4], 'y': y[:4]}, jnp.ones(4, bool), None)
  g_masked = jax.grad(model.loss)(params, {'x': garbage, 'y': y}, jnp.arange(6) < 4, None)
  for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_masked)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _dataset(counts, seed=0):
  r = np.random.default_rng(seed)
  n = int(sum(counts))
  return ArrayClientDataset({'x': r.normal(size=(n, 4)).astype(np.float32),
                             'y': r.integers(0, 3, n).astype(np.int32)},
                            np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                            np.array([str(i) for i in range(len(counts))]))


def test_eval_batches_cover_every_example_once():
  data = _dataset([3, 0, 7, 1, 5])
  rows = []
  for batch, real in _batches(data, [0, 1, 2, 3, 4], 4):
    assert batch['x'].shape == (4, 4) and 1 <= real <= 4
    rows.append(batch['x'][:real])
  np.testing.assert_array_equal(np.concatenate(rows), data.features['x'])


@pytest.mark.parametrize('num_devices', [1, 8])
def test_evaluator_matches_direct_computation(num_devices):
  data = _dataset([30, 11, 50, 2])
  model = get_model('mlp', num_classes=3, hidden=(6,))
  params = model.init(jax.random.PRNGKey(3), data.client(0))
  evaluate = make_evaluator(model, make_mesh(num_devices), batch_size=16)
  got = evaluate(params, data, [0, 2, 3])
  x = np.concatenate([data.client(i)['x'] for i in (0, 2, 3)])
  y = np.concatenate([data.client(i)['y'] for i in (0, 2, 3)])
  sums = model.eval_sums(params, {'x': x, 'y': y}, jnp.ones(len(y), bool))
  assert got['count'] == len(y) == 82
  np.testing.assert_allclose(got['accuracy'], float(sums['correct']) / len(y), rtol=1e-6)
  np.testing.assert_allclose(got['loss'], float(sums['loss']) / len(y), rtol=1e-5)


def test_params_digest_and_json_outputs(tmp_path):
  params = {'w': np.arange(6, dtype=np.float32).reshape(2, 3), 'b': np.ones(2, np.float32)}
  l2, sha = metrics.params_digest(params)
  np.testing.assert_allclose(l2, np.sqrt(55 + 2))
  assert sha == metrics.params_digest(jax.tree.map(np.copy, params))[1]
  params['b'][0] = np.nextafter(np.float32(1), np.float32(2))
  assert sha != metrics.params_digest(params)[1]  # one ulp changes the digest
  metrics.write_json(str(tmp_path / 's.json'), {'a': np.float32(1.5), 'n': float('nan'),
                                                'v': np.arange(2)})
  assert json.loads((tmp_path / 's.json').read_text()) == {'a': 1.5, 'n': None, 'v': [0, 1]}
