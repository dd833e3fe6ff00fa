"""fathom_sim/lstm.py's layer and its written-out backward pass against flax's own LSTM
(nn.RNN over nn.OptimizedLSTMCell, differentiated by autodiff), and the model built on it."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fathom_sim import lstm, models
from tests.common import jaxpr_eqns


def _cell_params(features, hidden, seed=0):
  """A cell's parameters with every bias and kernel random, so each gate's are told apart."""
  p = nn.RNN(nn.OptimizedLSTMCell(hidden)).init(jax.random.key(seed),
                                                jnp.zeros((1, 2, features)))['params']['cell']
  r = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(a + 0.4 * r.standard_normal(a.shape), a.dtype), p)


def _flax_layer(cell, x, dtype):
  return nn.RNN(nn.OptimizedLSTMCell(cell['hi']['kernel'].shape[0], dtype=dtype)).apply(
      {'params': {'cell': cell}}, x)


# (forward tolerance, gradient tolerance as a fraction of the largest gradient of its array)
@pytest.mark.parametrize('dtype,forward_tol,tol', [(jnp.float32, 1e-6, 2e-5),
                                                   (jnp.bfloat16, 1e-6, 2e-2)])
@pytest.mark.parametrize('hidden', [6, 32])  # gates 24 wide, padded to 128; 128, not padded
def test_layer_and_its_gradients_match_flax(dtype, forward_tol, tol, hidden):
  """Outputs, and gradients with respect to every parameter and the input, of a random linear
  function of the outputs (so every time step and unit is weighed differently). The forward
  computes flax's sums in flax's order and dtypes, so it matches in bfloat16 too; the bfloat16
  gradients differ from autodiff's by their roundings (~1 % of the largest), and a 5 % error
  in any one of them fails."""
  cell = _cell_params(5, hidden)
  r = np.random.default_rng(1)
  x = jnp.asarray(r.standard_normal((3, 9, 5)), jnp.float32)
  weights = jnp.asarray(r.standard_normal((3, 9, hidden)), jnp.float32)

  def objective(layer):
    return lambda cell, x: jnp.sum(layer(cell, x, dtype).astype(jnp.float32) * weights)

  got = lstm.lstm_layer(cell, x, dtype)
  want = _flax_layer(cell, x, dtype)
  assert got.dtype == jnp.float32 and got.shape == (3, 9, hidden)
  np.testing.assert_allclose(got, want.astype(jnp.float32), atol=forward_tol, rtol=forward_tol)
  got_grads = jax.jit(jax.grad(objective(lstm.lstm_layer), argnums=(0, 1)))(cell, x)
  want_grads = jax.jit(jax.grad(objective(_flax_layer), argnums=(0, 1)))(cell, x)
  assert jax.tree.structure(got_grads) == jax.tree.structure(want_grads)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    assert g.dtype == w.dtype == jnp.float32
    np.testing.assert_allclose(g, w, atol=tol * float(jnp.max(jnp.abs(w))), rtol=0)


def test_cotangents_keep_their_primals_dtypes_and_shapes_are_checked():
  """bfloat16 parameters get bfloat16 gradients (JAX would pass float32 on silently); an input
  that is not [n, T, F] is refused rather than scanned along the wrong axis."""
  cell = jax.tree.map(lambda a: a.astype(jnp.bfloat16), _cell_params(3, 4))
  x = jnp.ones((2, 5, 3), jnp.bfloat16)
  grads = jax.grad(lambda c, x: jnp.sum(lstm.lstm_layer(c, x, jnp.bfloat16)),
                   argnums=(0, 1))(cell, x)
  assert {a.dtype for a in jax.tree.leaves(grads)} == {jnp.dtype(jnp.bfloat16)}
  with pytest.raises(ValueError, match=r'\[n, T, F\]'):
    lstm.lstm_layer(cell, jnp.ones((2, 2, 5, 3)))


def _contracted_sizes(jaxpr) -> list[int]:
  """The contracted size of every dot_general in a jaxpr, nested ones too."""
  return [int(np.prod([eqn.invars[0].aval.shape[d]
                       for d in eqn.params['dimension_numbers'][0][0]]))
          for eqn in jaxpr_eqns(jaxpr) if eqn.primitive.name == 'dot_general']


def test_the_backward_loop_contracts_over_gates_padded_to_align():
  """The reason for lstm.ALIGN: the backward loop's dh = dz @ w_h^T contracts over the four
  gates' width padded to a multiple of ALIGN (4 x 670 = 2680 -> 2688 in the model), so XLA:GPU
  need not pad the recurrent kernel at every time step; so does the inputs' gradient. The
  forward loop's products contract over H and F, the kernels' gradients over the T n rows."""
  hidden, features = 67, 5
  cell = _cell_params(features, hidden)
  x = jnp.ones((2, 3, features), jnp.float32)
  jaxpr = jax.make_jaxpr(jax.grad(lambda c: jnp.sum(lstm.lstm_layer(c, x))))(cell).jaxpr
  padded = -(-4 * hidden // lstm.ALIGN) * lstm.ALIGN
  sizes = _contracted_sizes(jaxpr)
  assert padded in sizes and 4 * hidden not in sizes, sizes
  assert set(sizes) <= {padded, hidden, features, 2 * 3}, sizes  # 2 * 3: the kernels' gradients


def test_gradient_of_the_first_steps_sees_the_last_outputs():
  """A loss on the last output only: every input step but none of the outputs before it
  carries gradient, through the (dh, dc) that the backward loop carries."""
  cell = _cell_params(4, 5, seed=2)
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 6, 4)), jnp.float32)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(lstm.lstm_layer(cell, x)[:, -1])))(x)
  want = jax.jit(jax.grad(lambda x: jnp.sum(_flax_layer(cell, x, jnp.float32)[:, -1])))(x)
  assert np.all(np.abs(np.asarray(grad[:, 0])) > 0)
  np.testing.assert_allclose(grad, want, atol=1e-6, rtol=2e-5)


def test_lanes_under_vmap_are_each_the_lane_alone():
  """As client lanes run it: vmap over a leading lane axis of parameters and inputs."""
  cells = [_cell_params(3, 4, seed=s) for s in range(3)]
  xs = jnp.asarray(np.random.default_rng(4).standard_normal((3, 2, 5, 3)), jnp.float32)
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *cells)
  loss = lambda cell, x: jnp.sum(jnp.sin(lstm.lstm_layer(cell, x)))
  lanes = jax.jit(jax.vmap(jax.grad(loss)))(stacked, xs)
  for k, cell in enumerate(cells):
    alone = jax.grad(loss)(cell, xs[k])
    for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(lanes)):
      np.testing.assert_allclose(b[k], a, atol=1e-6, rtol=1e-5)


class _FlaxNextWordLSTM(nn.Module):
  """models.NextWordLSTM as written before lstm.py: flax's RNN in the forward pass too."""
  num_ids: int
  embed: int
  hidden: int
  dense: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Embed(self.num_ids, self.embed)(x.astype(jnp.int32))
    h = nn.RNN(nn.OptimizedLSTMCell(self.hidden))(h)
    h = models.Dense(self.dense)(jnp.tanh(h))
    return models.Dense(self.num_ids)(h)


def test_the_model_keeps_flax_parameters_and_their_gradients():
  """The same parameter tree and initial values as flax's RNN gives (checkpoints and recorded
  runs start alike), and the same training-loss gradients."""
  num_ids, widths = 30, (4, 7, 5)
  r = np.random.default_rng(5)
  x = r.integers(0, num_ids, (6, 8)).astype(np.int32)
  batch = {'x': x, 'y': np.roll(x, -1, axis=1)}
  model = models.get_model('lstm', num_classes=num_ids, hidden=widths)
  params = model.init(jax.random.key(7), batch)
  flax_params = models.unit_forget_bias(_FlaxNextWordLSTM(num_ids, *widths).init(
      jax.random.key(7), x[:1])['params'])
  assert jax.tree.structure(params) == jax.tree.structure(flax_params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(flax_params)):
    np.testing.assert_array_equal(a, b)

  params = jax.tree.map(lambda a: a + 0.2 * r.standard_normal(a.shape).astype(a.dtype), params)
  mask = jnp.arange(6) < 5

  def flax_loss(params):
    logits = _FlaxNextWordLSTM(num_ids, *widths).apply({'params': params}, x)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch['y'][..., None], -1)[..., 0]
    weights = (batch['y'] != models.PAD) * mask[:, None]
    return jnp.sum(ce * weights) / jnp.sum(weights)

  got = jax.jit(jax.value_and_grad(lambda p: model.loss(p, batch, mask, None)))(params)
  want = jax.jit(jax.value_and_grad(flax_loss))(params)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(g, w, atol=2e-6 * float(jnp.max(jnp.abs(w))), rtol=1e-4)
