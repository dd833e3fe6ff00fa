"""Models as pure functions, evaluation batching, and the run's output helpers."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fathom_sim import metrics
from fathom_sim.data.federated import ArrayClientDataset
from fathom_sim.evaluation import _batches, make_evaluator
from fathom_sim.mesh import make_mesh
from fathom_sim.models import CONV_FORMS, NextWordLSTM, conv3x3, get_model, max_pool_2x2
from tests.common import jaxpr_eqns


def _count(params):
  return sum(x.size for x in jax.tree.leaves(params))


def test_emnist_cnn_is_the_papers_architecture():
  model = get_model('emnist_cnn', num_classes=62)
  batch = {'x': jnp.ones((4, 28, 28)), 'y': jnp.arange(4)}
  # (Jitted: run op by op, the init, losses and sums compiled 129 programs, 17 s.)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), batch)
  # conv 3x3x32 + conv 3x3x64 + dense 9216x128 + dense 128x62, with biases.
  assert _count(params) == 320 + 18_496 + 1_179_776 + 7_998
  mask = jnp.ones(4, bool)
  loss, eval_sums = jax.jit(model.loss), jax.jit(model.eval_sums)
  a = loss(params, batch, mask, jax.random.PRNGKey(1))
  b = loss(params, batch, mask, jax.random.PRNGKey(2))
  assert float(a) != float(b)  # dropout is on while training, keyed by the step's key
  # ... and off in evaluation: a sum over examples then does not depend on their order (masks
  # drawn per row would; the same call twice is equal whatever a fixed key does).
  varied = {'x': jax.random.uniform(jax.random.PRNGKey(3), (8, 28, 28)), 'y': jnp.arange(8)}
  flipped = jax.tree.map(lambda a: a[::-1], varied)
  mask = jnp.ones(8, bool)
  np.testing.assert_allclose(eval_sums(params, varied, mask)['loss'],
                             eval_sums(params, flipped, mask)['loss'], rtol=1e-5)


@pytest.mark.parametrize('shape', [(3, 24, 24, 5), (2, 7, 9, 3), (4, 2, 26, 26, 8)])
def test_max_pool_is_flax_max_pool_with_its_gradient(shape):
  """max_pool_2x2 is nn.max_pool(x, (2, 2), strides=(2, 2)) ('VALID': odd edges dropped), with
  leading axes (a vmap's lanes) of any rank, and so is its gradient after a ReLU (whose zeros
  tie in a window)."""
  import flax.linen as nn
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)

  def flax_pool(x):
    out = nn.max_pool(x.reshape((-1,) + x.shape[-3:]), (2, 2), strides=(2, 2))
    return out.reshape(x.shape[:-3] + out.shape[-3:])

  np.testing.assert_array_equal(max_pool_2x2(x), flax_pool(x))
  g = jnp.asarray(np.random.default_rng(1).normal(size=flax_pool(x).shape), jnp.float32)
  grads = [jax.grad(lambda x: jnp.sum(pool(jax.nn.relu(x)) * g))(x)
           for pool in (max_pool_2x2, flax_pool)]
  np.testing.assert_array_equal(grads[0], grads[1])


def test_max_pool_shares_a_tied_window_s_gradient():
  """Where a window's maximum is there twice, both places get half of its gradient (a
  subgradient of the max, as select-and-scatter's all to the first one is)."""
  x = jnp.array([[1.0, 3.0], [3.0, 2.0]])[None, :, :, None]
  grad = jax.grad(lambda x: 4.0 * max_pool_2x2(x).sum())(x)
  np.testing.assert_array_equal(grad[0, :, :, 0], [[0.0, 2.0], [2.0, 0.0]])


# The two mixed forms take every pass once from each form (the pass test below checks the
# wiring of all ten).
@pytest.mark.parametrize('form', ['matmul', 'xla/matmul/xla', 'matmul/xla/matmul', 'pallas'])
def test_cnn_convolution_forms_equal_xla_ones_per_client_under_vmap(form):
  """Every conv form has nn.Conv's parameter tree and function, also vmapped over clients'
  own parameters (how a cohort runs it), gradients included: the mixed forms' custom
  gradients among them (each of their passes from the other form in one of these cases), and
  the Pallas kernels' (interpreted here)."""
  xla, mm = (get_model('emnist_cnn', num_classes=62, conv=c) for c in ('xla', form))
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
  grads = [jax.jit(jax.vmap(jax.value_and_grad(m.loss), in_axes=(0, 0, None, None)))(
      params, batch, mask, key) for m in (xla, mm)]
  np.testing.assert_allclose(grads[0][0], grads[1][0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads[0][1]), jax.tree.leaves(grads[1][1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match='model.conv must be one of'):
    get_model('emnist_cnn', num_classes=62, conv='fft')


_PRODUCTS = ('dot_general', 'conv_general_dilated')


def _operand_dtypes(jaxpr, primitives=_PRODUCTS) -> set:
  """The operand dtypes of every `primitives` operation in a jaxpr, nested ones too."""
  return {str(v.aval.dtype) for eqn in jaxpr_eqns(jaxpr) if eqn.primitive.name in primitives
          for v in eqn.invars}


def _bfloat16_sum_terms(jaxpr) -> list[int]:
  """Terms summed into each output of every reduce_sum over bfloat16 operands in a jaxpr,
  nested ones too."""
  return [int(np.prod([eqn.invars[0].aval.shape[a] for a in eqn.params['axes']]))
          for eqn in jaxpr_eqns(jaxpr) if eqn.primitive.name == 'reduce_sum'
          and str(eqn.invars[0].aval.dtype) == 'bfloat16']


def _products(jaxpr) -> list[tuple[str, int]]:
  """(primitive, output size) of every matrix product and convolution in a jaxpr, nested ones
  too."""
  return [(eqn.primitive.name, eqn.outvars[0].aval.size) for eqn in jaxpr_eqns(jaxpr)
          if eqn.primitive.name in _PRODUCTS]


@pytest.mark.parametrize('form', [f for f in CONV_FORMS if f != 'pallas'])
def test_conv_forms_take_each_pass_from_the_form_they_name(form):
  """A mixed form 'F/X/W' computes its forward pass, input gradient and kernel gradient with
  the forms it names (XLA's convolution or one matrix product each), the plain forms all
  three with their own: the gradient's program holds exactly one product per pass, told apart
  by what it computes (its output's size), made by the primitive of the form named for it."""
  passes = form.split('/') if '/' in form else [form] * 3
  x, kernel = jnp.ones((2, 6, 6, 3)), jnp.ones((3, 3, 3, 4))
  # Output sizes, all distinct: y 2*4*4*4; x's gradient 2*6*6*3, or 2*4*4*27 for the matmul
  # form (the shifted views' gradient, summed into x's after the product); the kernel's 3*3*3*4.
  which = {128: 'forward', 216: 'input', 864: 'input', 108: 'kernel'}
  primitive = {'xla': 'conv_general_dilated', 'matmul': 'dot_general'}
  jaxpr = jax.make_jaxpr(jax.grad(lambda x, k: jnp.sum(conv3x3(x, k, form) ** 2),
                                  argnums=(0, 1)))(x, kernel).jaxpr
  found = sorted((which[size], name) for name, size in _products(jaxpr))
  assert found == [('forward', primitive[passes[0]]), ('input', primitive[passes[1]]),
                   ('kernel', primitive[passes[2]])]


def test_the_pallas_form_runs_kernels_where_the_channels_allow_and_im2col_elsewhere():
  """conv='pallas': the CNN's second convolution (32 -> 64 channels) is the Pallas kernels'
  forward pass and two gradients (three pallas_calls, no convolution of XLA's); the first
  (1 -> 32 channels, too few for Triton's dot) is the matmul form's one product a pass."""
  model = get_model('emnist_cnn', num_classes=62, conv='pallas')
  batch = {'x': jnp.ones((2, 28, 28)), 'y': jnp.arange(2)}
  params = model.init(jax.random.PRNGKey(0), batch)
  jaxpr = jax.make_jaxpr(jax.grad(model.loss))(params, batch, jnp.ones(2, bool),
                                               jax.random.PRNGKey(1)).jaxpr
  names = [eqn.primitive.name for eqn in jaxpr_eqns(jaxpr)]
  assert names.count('pallas_call') == 3 * 2  # each pass on the GPU's branch and the CPU's
  assert 'conv_general_dilated' not in names
  # The first convolution's forward pass: one product over its 9 views (output 2 x 26 x 26
  # x 32), as in the matmul form.
  assert [n for n, size in _products(jaxpr) if size == 2 * 26 * 26 * 32] == ['dot_general']


@pytest.mark.parametrize('name,kwargs', [
    ('mlp', {'hidden': (16,)}), ('emnist_cnn', {'conv': 'matmul'}),
    ('emnist_cnn', {'conv': 'xla'}), ('emnist_cnn', {'conv': 'matmul/xla/matmul'}),
    ('lstm', {'hidden': (8, 12, 8)})])
def test_bfloat16_compute_keeps_float32_parameters_and_gradients(name, kwargs):
  """compute_dtype='bfloat16' multiplies in bfloat16 (every matrix product and convolution,
  the backward pass included) but takes the softmax and the sums over examples in float32; the
  parameters, the loss and the gradients are float32, within bfloat16's rounding of the
  float32 model's."""
  r = np.random.default_rng(0)
  if name == 'lstm':
    num_classes = 20
    batch = {'x': jnp.asarray(r.integers(1, 20, (6, 7))),
             'y': jnp.asarray(r.integers(1, 20, (6, 7)))}
  else:
    num_classes = 62
    batch = {'x': jnp.asarray(r.random((6, 28, 28)), jnp.float32),
             'y': jnp.asarray(r.integers(0, 62, 6))}
  f32, bf16 = (get_model(name, num_classes=num_classes, compute_dtype=d, **kwargs)
               for d in ('float32', 'bfloat16'))
  params = jax.jit(f32.init)(jax.random.PRNGKey(0), batch)
  assert jax.tree.structure(jax.eval_shape(bf16.init, jax.random.PRNGKey(0), batch)) == (
      jax.tree.structure(params))
  mask = jnp.arange(6) < 5
  key = jax.random.PRNGKey(1)
  grad = jax.value_and_grad(bf16.loss)
  jaxpr = jax.make_jaxpr(grad)(params, batch, mask, key).jaxpr
  assert _operand_dtypes(jaxpr) == {'bfloat16'}
  # The softmax (its exp and log) in float32: in bfloat16 it would lose small probabilities.
  assert _operand_dtypes(jaxpr, ('exp', 'log')) == {'float32'}
  # Sums over examples and positions (biases' gradients, the embedding's scatter-add) in
  # float32; flax's LSTM cell sums its gates' bias gradient over a step's batch in bfloat16.
  # The CNN's max-pool sums in bfloat16, over its 2x2 windows only (the gradient of a max,
  # shared among a window's tied maxima).
  assert 'bfloat16' not in _operand_dtypes(jaxpr, ('scatter-add',))
  if name != 'lstm':
    assert max(_bfloat16_sum_terms(jaxpr), default=0) <= 4
  (loss, g), (loss32, g32) = (jax.jit(jax.value_and_grad(m.loss))(params, batch, mask, key)
                              for m in (bf16, f32))
  assert loss.dtype == jnp.float32
  assert {str(x.dtype) for x in jax.tree.leaves(g)} == {'float32'}
  flat, flat32 = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]) for t in (g, g32))
  rel = np.linalg.norm(flat - flat32) / np.linalg.norm(flat32)
  assert 0 < rel < 0.05, rel  # bfloat16 keeps 8 significant bits: ~0.4 % per rounding
  np.testing.assert_allclose(loss, loss32, rtol=1e-2)
  sums = jax.eval_shape(bf16.eval_sums, params, batch, mask)
  assert {str(v.dtype) for v in sums.values()} <= {'float32', 'int32'}
  with pytest.raises(ValueError, match='model.compute_dtype must be one of'):
    get_model(name, num_classes=num_classes, compute_dtype='float16', **kwargs)


def test_masked_rows_do_not_enter_the_loss():
  model = get_model('mlp', num_classes=3, hidden=(5,))
  x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
  y = np.array([0, 1, 2, 0, 1, 2])
  params = jax.jit(model.init)(jax.random.PRNGKey(0), {'x': x, 'y': y})
  # (Jitted: run op by op, this test compiled 137 programs.)
  loss, grad = jax.jit(model.loss), jax.jit(jax.grad(model.loss))
  full = loss(params, {'x': x[:4], 'y': y[:4]}, jnp.ones(4, bool), None)
  garbage = x.copy()
  garbage[4:] = 1e6
  masked = loss(params, {'x': garbage, 'y': y}, jnp.arange(6) < 4, None)
  np.testing.assert_allclose(masked, full, rtol=1e-6)
  g_full = grad(params, {'x': x[:4], 'y': y[:4]}, jnp.ones(4, bool), None)
  g_masked = grad(params, {'x': garbage, 'y': y}, jnp.arange(6) < 4, None)
  for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_masked)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_sequence_training_loss_per_token_or_per_sentence_over_an_expected_length():
  """Default: the mean over the batch's non-pad target tokens. expected_length 13.3: FedJAX's
  stackoverflow_word loss, each sentence's summed token loss / 13.3, mean over sentences.
  Checked against per-token cross-entropies computed here from the model's logits."""
  r = np.random.default_rng(0)
  lengths = np.array([3, 7, 1, 5, 6])  # target tokens per sentence; row 4 is a padding row
  y = np.zeros((5, 8), np.int32)
  for i, n in enumerate(lengths):
    y[i, :n] = r.integers(1, 20, n)
  x = np.concatenate([np.ones((5, 1), np.int32), y[:, :-1]], axis=1)
  batch, mask = {'x': x, 'y': y}, jnp.arange(5) < 4
  per_token = get_model('lstm', num_classes=20, hidden=(4, 6, 5))
  fedjax = get_model('lstm', num_classes=20, hidden=(4, 6, 5), expected_length=13.3)
  params = jax.jit(per_token.init)(jax.random.PRNGKey(0), batch)
  module = NextWordLSTM(20, 4, 6, 5)
  # (Jitted: run op by op, the LSTM's scans compiled 80 programs.)
  logits = np.asarray(jax.jit(module.apply)({'params': params}, x), np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  token_loss = -np.take_along_axis(logp, y[..., None], -1)[..., 0] * (y != 0)
  sentence_loss = token_loss.sum(1)[:4]
  np.testing.assert_allclose(jax.jit(per_token.loss)(params, batch, mask, None),
                             sentence_loss.sum() / lengths[:4].sum(), rtol=1e-5)
  np.testing.assert_allclose(jax.jit(fedjax.loss)(params, batch, mask, None),
                             np.mean(sentence_loss / 13.3), rtol=1e-5)


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
  x = np.concatenate([data.client(i)['x'] for i in (0, 2, 3)]).astype(np.float64)
  y = np.concatenate([data.client(i)['y'] for i in (0, 2, 3)])
  # The MLP written out in float64 numpy (relu(x W0 + b0) W1 + b1), softmax cross-entropy and
  # argmax: none of the model's own loss or eval code.
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), jax.device_get(params))
  hidden = np.maximum(x @ p['Dense_0']['kernel'] + p['Dense_0']['bias'], 0)
  logits = hidden @ p['Dense_1']['kernel'] + p['Dense_1']['bias']
  top = logits.max(1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))
  assert got['count'] == len(y) == 82
  np.testing.assert_allclose(got['accuracy'], np.mean(logits.argmax(1) == y), rtol=1e-6)
  np.testing.assert_allclose(got['loss'], -np.mean(logp[np.arange(len(y)), y]), rtol=1e-5)


def test_evaluating_the_same_clients_again_reuses_their_batches_on_the_devices():
  """The quickstart batched and sent its whole test set again at every evaluation (12-15 %
  of its rounds' time). Kept within keep_bytes, the same clients of the same dataset are read
  once, with a fresh evaluator's results; other clients, or a set past keep_bytes, are read
  again."""
  data = _dataset([30, 11, 50, 2])
  reads = []

  class Counted(ArrayClientDataset):
    def client(self, i):
      reads.append(i)
      return super().client(i)

  counted = Counted(data.features, data.offsets, data.client_ids)
  model = get_model('mlp', num_classes=3, hidden=(6,))
  params = model.init(jax.random.PRNGKey(3), data.client(0))
  other = jax.tree.map(lambda a: a + 0.1, params)
  mesh = make_mesh(2)
  evaluate = make_evaluator(model, mesh, batch_size=16, keep_bytes=1 << 20)
  for p in (params, other):
    fresh = make_evaluator(model, mesh, batch_size=16)(p, data, [0, 2, 3])
    reads.clear()
    assert evaluate(p, counted, np.array([0, 2, 3])) == fresh
    assert reads == ([0, 2, 3] if p is params else [])  # the second time, nothing read
  evaluate(params, counted, [0, 2])
  evaluate(params, counted, [0, 2])
  assert reads == [0, 2]
  evaluate(params, data, [0, 2])  # another dataset's clients, kept in their place
  reads.clear()
  evaluate(params, counted, [0, 2])
  assert reads == [0, 2]
  # Room for one batch of 16 rows (4 + 1 values of 4 bytes a row), not the set's 6.
  small = make_evaluator(model, mesh, batch_size=16, keep_bytes=16 * 5 * 4)
  reads.clear()
  for _ in range(2):
    small(params, counted, [0, 2, 3])
  assert reads == [0, 2, 3] * 2


@pytest.mark.parametrize('name', ['mlp', 'emnist_cnn', 'lstm'])
def test_evaluation_counts_are_integers(name):
  """The evaluator adds the counts up over the whole test set: float32 totals stop counting
  at 2^24 (16.8M examples; float32(2**24) + 1 == 2**24)."""
  kwargs = {'hidden': (4, 8, 4)} if name == 'lstm' else {}
  model = get_model(name, num_classes=12, **kwargs)
  if name == 'lstm':
    batch = {'x': np.ones((3, 5), np.int32), 'y': np.ones((3, 5), np.int32)}
  else:
    batch = {'x': np.zeros((3, 28, 28), np.float32), 'y': np.zeros(3, np.int32)}
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), batch)  # (dtypes alone matter)
  sums = jax.eval_shape(model.eval_sums, params, batch, jnp.ones(3, bool))
  counts = {k: v.dtype for k, v in sums.items() if k.startswith(('count', 'correct'))}
  assert counts and all(jnp.issubdtype(d, jnp.integer) for d in counts.values()), counts


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


def test_loss_jump_compares_with_the_last_accepted_round():
  log = metrics.RowLog()
  assert log.accepted_loss is None
  for row in [{'train_loss': 0.05, 'accepted': True}, {'train_loss': 0.0, 'accepted': False}]:
    log.add(row)
  before = log.accepted_loss
  assert before == 0.05  # the rejected round's 0 is skipped
  assert metrics.loss_jump(before, {'train_loss': 1e11, 'accepted': True}) == (
      0.05, pytest.approx(2e12))
  assert metrics.loss_jump(before, {'train_loss': 4.0, 'accepted': True}) is None  # 80x
  assert metrics.loss_jump(before, {'train_loss': 5.0, 'accepted': True}) == (0.05, 100.0)
  assert metrics.loss_jump(before, {'train_loss': 1e11, 'accepted': False}) is None
  assert metrics.loss_jump(None, {'train_loss': 1e11, 'accepted': True}) is None
  assert metrics.loss_jump(before, {'train_loss': float('inf'), 'accepted': True})[1] == np.inf
  # Rows read back from metrics.jsonl write a non-finite loss as null; rows written before
  # `accepted` was logged count as accepted. Neither a null loss nor a 0 (a round whose
  # counted clients fitted their batches) is one to be times of: the last positive stays (a
  # rise to 2e30 after a round at 0 went unwarned).
  log.add({'train_loss': None})
  log.add({'train_loss': 0.0, 'accepted': True})
  assert log.accepted_loss == 0.05
  assert metrics.loss_jump(log.accepted_loss, {'train_loss': 2e30, 'accepted': True}) == (
      0.05, pytest.approx(4e31))
  assert metrics.loss_jump(log.accepted_loss, {'train_loss': 3.0, 'accepted': True}) is None


def test_the_row_log_keeps_the_last_row_and_the_first_evaluation_at_the_target():
  log = metrics.RowLog(target=0.5)
  rows = [{'round': 1, 'train_loss': 1.0}, {'round': 2, 'train_loss': 0.9, 'test_accuracy': 0.4},
          {'round': 3, 'train_loss': 0.8, 'test_accuracy': 0.5},
          {'round': 4, 'train_loss': 0.7, 'test_accuracy': 0.3},
          {'round': 5, 'train_loss': 0.6, 'test_accuracy': 0.9}]
  for row in rows:
    log.add(row)
  assert log.last is rows[-1] and log.reached is rows[2] and log.accepted_loss == 0.6
  untargeted = metrics.RowLog()
  for row in rows:
    untargeted.add(row)
  assert untargeted.reached is None  # no target: nothing to reach


def test_a_run_warns_of_each_accepted_round_whose_loss_jumped(tmp_path, monkeypatch, caplog):
  """The warning's wiring in a run: with the factor at 0, every round after the first (all
  accepted here) is a jump, and each is named once."""
  from fathom_sim.train import train_and_evaluate
  from tests.common import tiny_config
  monkeypatch.setattr(metrics, 'LOSS_JUMP', 0.0)
  with caplog.at_level('WARNING'):
    train_and_evaluate(tiny_config(num_rounds=3), str(tmp_path / 'run'))
  jumps = [r.getMessage() for r in caplog.records if 'may be diverging' in r.getMessage()]
  assert [m.split(':')[0] for m in jumps] == ['round 2', 'round 3']


def test_eval_clients_past_the_test_clients_evaluates_all_of_them_and_says_so(tmp_path,
                                                                               caplog):
  """0 means all; a count past the test clients is all of them too, which a user who took the
  count for another split's should hear (it ran in silence)."""
  from fathom_sim.train import train_and_evaluate
  from tests.common import tiny_config
  every = train_and_evaluate(tiny_config(eval_clients=0), str(tmp_path / 'all'))
  assert 'config.eval_clients' not in caplog.text
  with caplog.at_level('WARNING'):
    many = train_and_evaluate(tiny_config(eval_clients=10 ** 6), str(tmp_path / 'many'))
  said = [r.getMessage() for r in caplog.records if 'config.eval_clients' in r.getMessage()]
  assert len(said) == 1 and said[0].startswith('config.eval_clients=1000000 is more than the ')
  assert said[0].endswith('test clients with examples: each evaluation takes all of them')
  assert many['final'] == every['final']


def test_an_eval_batch_size_past_the_test_set_evaluates_in_one_batch_of_the_test_set(
    tmp_path, monkeypatch):
  """Each evaluation batch was padded to config.eval_batch_size rows whatever the test set
  held: 4,000,000 rows for the quickstart's 18,818 examples took 9x the memory, and a value
  past the host's memory was refused up front, or ran out of it at the first evaluation."""
  from fathom_sim import evaluation
  from fathom_sim.train import train_and_evaluate
  from tests.common import tiny_config
  made = []
  make = evaluation.Evaluator.__init__

  def recorded(self, *args, **kwargs):
    make(self, *args, **kwargs)
    made.append(self.batch_size)

  monkeypatch.setattr(evaluation.Evaluator, '__init__', recorded)
  config = tiny_config(num_rounds=2)
  small = train_and_evaluate(config, str(tmp_path / 'small'))
  config.eval_batch_size = 2**31 - 1
  huge = train_and_evaluate(config, str(tmp_path / 'huge'))
  n, devices = huge['final']['test_examples'], huge['devices']
  assert made == [-(-n // devices) * devices] * 2  # its rows, split evenly over the devices
  assert huge['final']['test_accuracy'] == small['final']['test_accuracy']
  assert huge['final']['test_loss'] == pytest.approx(small['final']['test_loss'], rel=1e-5)


def test_an_evaluation_of_many_batches_on_several_cpu_devices_does_not_abort(tmp_path):
  """The quickstart on 8 CPU devices with eval_batch_size 100 (~190 programs an evaluation,
  each ending in an all-reduce, sent back to back from batches kept on the devices) aborted
  in XLA:CPU's rendezvous at its second or third evaluation: "Expected 8 threads to join the
  rendezvous, but only 7 of them arrived", exit status 134, in every run of 4. More than 32
  such programs queued deadlock XLA:CPU (mesh.queue_bound). (A process of its own: the abort
  would take the test worker with it.)"""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  p = subprocess.run([sys.executable, 'launch/main.py', '--config=configs/quickstart.py',
                      f'--workdir={tmp_path / "run"}', '--config.num_rounds=30',
                      '--config.eval_batch_size=100'],
                     cwd=root, env=env, timeout=600, capture_output=True, text=True)
  assert p.returncode == 0, p.stderr[-3000:]
  rows = [json.loads(line) for line in open(tmp_path / 'run' / 'metrics.jsonl')]
  assert [r['round'] for r in rows if 'test_accuracy' in r] == [5, 10, 15, 20, 25, 30]


def test_a_test_split_without_examples_is_said_at_the_start(tmp_path, caplog):
  """data.test_fraction 0 holds every example for training: nothing is evaluated, which the
  start line said as "12 test clients" alone."""
  from fathom_sim.train import train_and_evaluate
  from tests.common import tiny_config
  with caplog.at_level('INFO'):
    summary = train_and_evaluate(tiny_config(num_rounds=1, **{'data.test_fraction': 0.0}),
                                 str(tmp_path / 'run'))
  assert np.isnan(summary['final']['test_accuracy'])
  said = [r.getMessage() for r in caplog.records if 'test split holds no examples' in
          r.getMessage()]
  assert said == ['synthetic(1,1): the test split holds no examples: nothing is evaluated, and '
                  'test_accuracy, rounds_to_target are null']
  assert '12 test clients (0 examples)' in caplog.text
  caplog.clear()
  with caplog.at_level('INFO'):
    train_and_evaluate(tiny_config(num_rounds=1), str(tmp_path / 'other'))
  assert 'test split holds no examples' not in caplog.text


def test_fedjax_init_draws_as_haiku_does():
  """model.init='fedjax': kernels from a normal cut at +-2 std, std 1/sqrt(fan_in), not
  rescaled after the cut (so 0.880/sqrt(fan_in) in effect, where flax's lecun_normal gives
  1/sqrt(fan_in)); biases as flax leaves them; the same draws for the same key."""
  x = np.zeros((2, 28, 28), np.float32)
  batch = {'x': x, 'y': np.zeros(2, np.int32)}
  fedjax = get_model('emnist_cnn', num_classes=62, init='fedjax')
  flax = get_model('emnist_cnn', num_classes=62)
  key = jax.random.key(3)
  got, plain = fedjax.init(key, batch), flax.init(key, batch)
  cut = 0.8796  # the std of a standard normal cut at +-2
  for layer, fan_in in (('Conv_0', 9), ('Conv_1', 9 * 32), ('Dense_0', 9216), ('Dense_1', 128)):
    w = np.asarray(got[layer]['kernel'])
    assert np.abs(w).max() <= 2 / np.sqrt(fan_in) + 1e-7, layer
    if w.size > 10_000:  # enough draws to tell 0.88 from flax's 1.0
      np.testing.assert_allclose(w.std() * np.sqrt(fan_in), cut, rtol=0.02, err_msg=layer)
      np.testing.assert_allclose(np.asarray(plain[layer]['kernel']).std() * np.sqrt(fan_in),
                                 1.0, rtol=0.02, err_msg=layer)
    np.testing.assert_array_equal(got[layer]['bias'], plain[layer]['bias'])
  jax.tree.map(np.testing.assert_array_equal, got, fedjax.init(key, batch))


def test_a_run_with_fedjax_init_starts_from_its_draws():
  """model.init reaches the run's initial state; leaves of one shape get their own draws."""
  from fathom_sim.run import build, init_state
  from tests.common import tiny_config, tiny_task
  config = tiny_config(**{'model.init': 'fedjax', 'model.hidden': (32, 32, 32)})
  state = init_state(build(config, tiny_task()))
  params = state.params
  w = np.asarray(params['Dense_1']['kernel'])  # 32 x 32: fan_in 32
  assert np.abs(w).max() <= 2 / np.sqrt(32) + 1e-7
  assert not np.array_equal(w, np.asarray(params['Dense_2']['kernel']))  # the same shape
  config.model.init = 'flax'
  flax = init_state(build(config, tiny_task())).params
  assert np.abs(np.asarray(flax['Dense_1']['kernel'])).max() > 2 / np.sqrt(32)  # uncut


def test_fedjax_init_draws_no_kernel_a_round_draws_from():
  """The init key is also round 5143's root (rng.init_key), and split(key, n)[i] equals
  fold_in(key, i): drawn with split(init key) itself, a leaf took a round's stream key (the
  second leaf, the TRAIN stream's). No kernel equals a draw from any of that round's keys."""
  from fathom_sim import rng
  model = get_model('mlp', num_classes=10, hidden=(8,), init='fedjax')
  batch = {'x': np.zeros((2, 6), np.float32), 'y': np.zeros(2, np.int32)}
  seed = 7
  params = model.init(rng.init_key(seed), batch)
  assert rng.init_key(seed).tolist() == jax.random.fold_in(rng.base_key(seed), 5143).tolist()
  for layer in ('Dense_0', 'Dense_1'):
    w = np.asarray(params[layer]['kernel'])
    for stream in range(8):
      key = rng.round_key(rng.base_key(seed), 5143, stream)
      again = np.asarray(jax.random.truncated_normal(key, -2.0, 2.0, w.shape, w.dtype))
      assert not np.allclose(w / w.std(), again / again.std()), (layer, stream)


def test_fedjax_init_of_the_lstm_takes_fan_in_f_plus_h_and_keeps_the_forget_bias():
  num_ids, (e, h, d) = 5000, (32, 64, 16)
  x = np.zeros((2, 5), np.int32)
  model = get_model('lstm', num_classes=num_ids, hidden=(e, h, d), init='fedjax')
  params = model.init(jax.random.key(0), {'x': x, 'y': x})
  emb = np.asarray(params['Embed_0']['embedding'])
  np.testing.assert_allclose(emb.std(), 0.8796, rtol=0.02)  # Haiku's Embed: std 1, cut
  cell = params['OptimizedLSTMCell_0']
  gates = np.concatenate([np.asarray(cell[k]['kernel']).ravel()
                          for k in ('ii', 'if', 'ig', 'io', 'hi', 'hf', 'hg', 'ho')])
  # One [F + H, 4H] kernel in Haiku: the input and recurrent parts share fan_in F + H.
  np.testing.assert_allclose(gates.std() * np.sqrt(e + h), 0.8796, rtol=0.03)
  assert np.abs(gates).max() <= 2 / np.sqrt(e + h) + 1e-7
  np.testing.assert_array_equal(cell['hf']['bias'], np.ones(h))
  np.testing.assert_array_equal(cell['hi']['bias'], np.zeros(h))
  with pytest.raises(ValueError, match="model.init must be one of"):
    get_model('mlp', num_classes=3, init='haiku')


def test_the_last_round_evaluates_every_test_client_and_a_longer_run_samples_there(tmp_path):
  """Periodic evaluations sample eval_clients test clients. The last round's row held a sample
  too, while the summary's final evaluation took them all: a target the final accuracy passed
  was reported never reached. Taken further, the round it ended at holds the sample an
  uninterrupted run takes there."""
  import json
  from fathom_sim.train import train_and_evaluate
  from tests.common import tiny_config

  def rows(name):
    with open(tmp_path / name / 'metrics.jsonl') as f:
      return [{k: v for k, v in json.loads(line).items() if k != 'wall_s'} for line in f]

  sampled = dict(eval_every=2, eval_clients=3, checkpoint_every=2)
  full = train_and_evaluate(tiny_config(num_rounds=4, **{**sampled, 'eval_clients': 0}),
                            str(tmp_path / 'full'))
  part = train_and_evaluate(tiny_config(num_rounds=4, **sampled), str(tmp_path / 'part'))
  assert part['final'] == full['final']  # evaluation changes no training
  assert rows('part')[-1]['test_loss'] == part['final']['test_loss'] == rows('full')[-1]['test_loss']
  assert rows('part')[1]['test_loss'] != rows('full')[1]['test_loss']  # round 2: a sample
  four = rows('part')
  train_and_evaluate(tiny_config(num_rounds=6, **sampled), str(tmp_path / 'part'))
  train_and_evaluate(tiny_config(num_rounds=6, **sampled), str(tmp_path / 'straight'))
  assert rows('part') == rows('straight')
  assert rows('part')[3]['test_loss'] != rows('full')[3]['test_loss']  # round 4: a sample now
  # A longer run stopped after round 4 (its checkpoint of round 6 never made), then run with
  # num_rounds=4: round 4's sample becomes the final evaluation a 4-round run makes.
  shutil.rmtree(tmp_path / 'straight' / 'checkpoints' / '6')
  os.remove(tmp_path / 'straight' / 'summary.json')
  cut = train_and_evaluate(tiny_config(num_rounds=4, **sampled), str(tmp_path / 'straight'))
  assert cut['resumed_from'] == 4
  assert rows('straight') == four and cut['final'] == part['final']
