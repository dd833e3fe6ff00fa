"""fathom_sim/lane_update.py: the Pallas kernels (interpreted here) against the jnp forms, the
round with them against the slow reference, and what a GPU program of them lowers to."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.check_lane_update import check
from fathom_sim import lane_update
from tests.common import assert_trees_close, reference_rounds, run_rounds, tiny_config, tiny_task


def _kernels_on(monkeypatch, interpret=True, block=16, least=64):
  """The kernels for every leaf of at least `least` entries that `block` divides (the tiny
  MLP's two kernels, not its biases), interpreted where the program is not for a GPU."""
  monkeypatch.setattr(lane_update, 'PALLAS', True)
  monkeypatch.setattr(lane_update, 'INTERPRET', interpret)
  monkeypatch.setattr(lane_update, 'BLOCK', block)
  monkeypatch.setattr(lane_update, '_LEAST', least)


def test_the_step_kernel_is_the_jnp_step_lane_by_lane(monkeypatch):
  _kernels_on(monkeypatch)
  r = np.random.default_rng(0)
  lanes, n = 4, 64
  p = jnp.asarray(r.standard_normal((lanes, n)), jnp.float32)
  g = jnp.asarray(r.standard_normal((lanes, n)), jnp.float32).at[2, 5].set(jnp.inf)
  x = jnp.asarray(r.standard_normal(n), jnp.float32)
  real = jnp.array([True, False, True, True])
  args = (p, g, x, jnp.float32(0.1), real)
  axes = (0, 0, None, None, 0)
  new, sums = jax.vmap(functools.partial(lane_update._step_kernels, interpret=True),
                       in_axes=axes)(*args)
  want_new, want_sums = jax.vmap(lane_update._step_jnp_leaf, in_axes=axes)(*args)
  # p - eta g (to a rounding: either side may fuse it into one multiply-add), p in lane 1.
  np.testing.assert_allclose(new, want_new, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(new[1], p[1])
  np.testing.assert_allclose(sums, want_sums, rtol=1e-6)
  # The non-finite entry of d_k is counted in its lane only.
  np.testing.assert_array_equal(sums[:, 3], [0, 0, 1, 0])


def test_the_finish_kernel_touches_only_the_lanes_whose_client_ends(monkeypatch):
  _kernels_on(monkeypatch)
  r = np.random.default_rng(1)
  lanes, n = 4, 64
  acc = jnp.asarray(r.standard_normal((lanes, n)), jnp.float32)
  # Lane 1's client ends left out (weight 0) with a NaN in its params: its sum stays as it was.
  p = jnp.asarray(r.standard_normal((lanes, n)), jnp.float32).at[1, 3].set(jnp.nan)
  x = jnp.asarray(r.standard_normal(n), jnp.float32)
  weight = jnp.array([3.0, 0.0, 5.0, 0.0])
  end = jnp.array([True, True, False, False])
  args, axes = (acc, p, x, weight, end), (0, 0, None, 0, 0)
  new_acc, new_p = jax.vmap(functools.partial(lane_update._finish_kernels, interpret=True),
                            in_axes=axes)(*args)
  np.testing.assert_allclose(new_acc[0], acc[0] + 3.0 * (x - p[0]), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(new_acc[1:], acc[1:])
  np.testing.assert_array_equal(new_p[:2], jnp.stack([x, x]))
  np.testing.assert_array_equal(new_p[2:], p[2:])


@pytest.mark.parametrize('batched', [False, True])
def test_with_the_kernels_a_client_with_a_non_finite_update_is_left_out(monkeypatch, batched):
  """An inf in a kernel's leaf of the gradient at a client's last step: not added, the sum
  untouched, the lane reset to x; a finite client in the same step is added."""
  _kernels_on(monkeypatch)
  r = np.random.default_rng(2)
  params = {'w': jnp.asarray(r.standard_normal((2, 64)), jnp.float32),
            'b': jnp.asarray(r.standard_normal((2, 4)), jnp.float32)}
  grad = jax.tree.map(lambda a: a + 1.0, params)
  grad['w'] = grad['w'].at[0, 3].set(jnp.inf)
  acc = jax.tree.map(lambda a: a * 0.5, params)
  server = {'w': jnp.zeros(64, jnp.float32), 'b': jnp.zeros(4, jnp.float32)}

  def one_lane(p, g, a):
    new, _, update = lane_update.step(p, g, server, jnp.float32(0.1), jnp.bool_(True))
    return lane_update.finish(a, new, server, update, jnp.float32(5.0), jnp.bool_(True),
                              jnp.bool_(True))

  if batched:
    new_acc, new_p, added = jax.vmap(one_lane)(params, grad, acc)
  else:
    outs = [one_lane(*(jax.tree.map(lambda a: a[i], t) for t in (params, grad, acc)))
            for i in range(2)]
    new_acc, new_p, added = jax.tree.map(lambda *a: jnp.stack(a), *outs)
  np.testing.assert_array_equal(added, [False, True])
  for name in ('w', 'b'):
    np.testing.assert_array_equal(new_acc[name][0], acc[name][0])
    stepped = params[name][1] - 0.1 * grad[name][1]
    np.testing.assert_allclose(new_acc[name][1], acc[name][1] + 5.0 * (server[name] - stepped),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(new_p[name], jnp.zeros_like(new_p[name]))


def test_the_gpu_check_passes_the_kernels_and_fails_a_wrong_one(monkeypatch):
  """benchmarks/check_lane_update.py, what a GPU call runs before timing the kernels, here
  with the kernels interpreted: it passes them, and says what differs in one that resets
  every lane's params whether its client ends or not."""
  _kernels_on(monkeypatch)
  assert check(lanes=6, size=64, interpret=True) == []

  def resets_always(acc_ref, p_ref, x_ref, weight_ref, end_ref, acc_out, p_out):
    p_out[...] = x_ref[...]

  monkeypatch.setattr(lane_update, '_finish_kernel', resets_always)
  failures = check(lanes=6, size=64, interpret=True)
  assert any(f.startswith('finish: params') for f in failures)


@pytest.mark.parametrize('lanes,local_loop', [(1, 'device'), (3, 'device'), (3, 'host')])
def test_the_round_with_the_kernels_matches_the_slow_reference(monkeypatch, lanes, local_loop):
  """FATHOM's h values, its hyperparameters and the server model, with the kernels for the
  MLP's two kernels: one lane a device (unbatched) and three (vmapped), the loop on the device
  and driven by the host."""
  _kernels_on(monkeypatch)
  config = tiny_config(algorithm='fathom', num_devices=1, local_loop=local_loop,
                       lanes_per_device=lanes)
  task = tiny_task()
  state, history, _ = run_rounds(config, task, 3)
  ref = reference_rounds(config, task, 3)
  for (m, _), r in zip(history, ref):
    np.testing.assert_allclose(m.client_h, r['client_h'], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m.hparams, r['hparams'], rtol=1e-6)
  assert_trees_close(state.params, ref[-1]['params'])
  np.testing.assert_allclose(state.hyper.log_hparams, ref[-1]['phi'], rtol=1e-5, atol=1e-6)


def _lowered_lane_step(platform: str | None) -> str:
  """StableHLO of step then finish of 3 vmapped lanes of a two-leaf model."""
  params = {'w': jax.ShapeDtypeStruct((3, 32, 8), jnp.float32),
            'b': jax.ShapeDtypeStruct((3, 8), jnp.float32)}

  def one_lane(p, g, acc, x, real, end):
    new, cos, update = lane_update.step(p, g, x, jnp.float32(0.1), real)
    acc, new, added = lane_update.finish(acc, new, x, update, jnp.float32(7.0),
                                         jnp.bool_(True), end)
    return new, acc, cos, added

  f = jax.jit(jax.vmap(one_lane, in_axes=(0, 0, 0, None, 0, 0)))
  lane = jax.ShapeDtypeStruct((3,), jnp.bool_)
  server = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), params)
  traced = f.trace(params, params, params, server, lane, lane)
  return (traced.lower(lowering_platforms=(platform,)) if platform else traced.lower()).as_text()


def test_a_gpu_program_runs_the_two_kernels_and_a_cpu_one_none(monkeypatch):
  _kernels_on(monkeypatch, interpret=False, block=64, least=64)
  gpu, cpu = (_lowered_lane_step(platform) for platform in ('cuda', None))
  assert gpu.count('custom_call @__gpu$xla.gpu.triton') == 2
  assert 'custom_call' not in cpu


def test_without_pallas_the_step_is_jnp_everywhere():
  assert not lane_update.PALLAS
  assert 'custom_call @__gpu$xla.gpu.triton' not in _lowered_lane_step('cuda')
