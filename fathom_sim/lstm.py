"""The LSTM layer of the sequence models, with its backward pass written out.

It computes what `nn.RNN(nn.OptimizedLSTMCell(H))` computes from the same parameters (gates i, f,
g, o; zero initial state; the same sums in the same order), but its gradient is not autodiff's
of that scan. Autodiff adds each time step's share of the kernels' gradients, an [F + H, 4H]
product of n rows, into the backward loop's carry: T reads and writes of both gradients (at
H 670, ~8 MB each time, per client lane). Here the backward loop carries only (dh, dc) and
emits each step's gate gradient dz_t; the kernels', the bias's and the inputs' gradients are
then one product or sum each over all T·n rows. The forward keeps flax's per-step products:
on XLA:CPU one hoisted [T·n, F] @ [F, 4H] product made the layer's forward over 256 sentences
1.3–1.6× slower (docs/benchmarks.md, "Eighteenth session"). A custom_vjp, so reverse mode
only (jax.jvp, jacfwd and hessian refuse it; training needs none of them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fathom_sim.types import Params

GATES = ('i', 'f', 'g', 'o')  # flax's order of the concatenated gates
# The concatenated gates' width 4H is padded with zero columns to a multiple of this. Why: in
# the backward loop, dh = dz @ w_h^T contracts over 4H, and at few lanes XLA:GPU splits that
# contraction (split-K), padding it to a multiple of the split's tiles: unpadded (2680 at H
# 670), it copies the whole recurrent kernel, padded, at every time step, ~30 % of a local
# step's bytes at 4 and 10 lanes in float32. 128 covers the split XLA picks without autotuning
# (8 ways, 16-wide tiles); a GPU's autotuned split could need another multiple
# (docs/benchmarks.md, "Nineteenth session").
ALIGN = 128


def _gates(z: jax.Array, hidden: int) -> tuple[jax.Array, ...]:
  i, f, g, o = jnp.split(z[..., :4 * hidden], 4, axis=-1)  # the padding's columns dropped
  return jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)


def _recurrence(x, w_i, w_h, bias, keep: bool):
  """Runs the cell over x [T, n, F] (in the products' dtype): the outputs h_t [T, n, H] and,
  if `keep`, the backward pass's residuals (the gates' activations [T, n, 4H], unpadded, c and
  h). The gates' arrays are padded (w_i [F, G], w_h [H, G], bias [G], G = 4H rounded up to a
  multiple of ALIGN); H is w_h's rows. c and h stay float32, as flax's carry does."""
  dtype = x.dtype
  w_i, w_h, b = w_i.astype(dtype), w_h.astype(dtype), bias.astype(dtype)
  zero = jnp.zeros(x.shape[1:-1] + (w_h.shape[0],), jnp.float32)

  def step(carry, x_t):
    c, h = carry
    i, f, g, o = _gates(h.astype(dtype) @ w_h + b + x_t @ w_i, w_h.shape[0])  # flax's order
    c = f * c + i * g
    h = o * jnp.tanh(c)
    return (c, h), ((jnp.concatenate([i, f, g, o], axis=-1), c, h) if keep else h)

  _, out = jax.lax.scan(step, (zero, zero), x)
  return out


@jax.custom_vjp
def _lstm_time_major(x: jax.Array, w_i: jax.Array, w_h: jax.Array,
                     bias: jax.Array) -> jax.Array:
  return _recurrence(x, w_i, w_h, bias, keep=False)


def _forward(x, w_i, w_h, bias):
  acts, cs, hs = _recurrence(x, w_i, w_h, bias, keep=True)
  return hs, (x, w_i, w_h, bias, acts, cs, hs)


def _backward(residuals, d_hs):
  x, w_i, w_h, bias, acts, cs, hs = residuals
  dtype = x.dtype
  zero = jnp.zeros_like(cs[0])
  c_prev = jnp.concatenate([zero[None], cs[:-1]])
  w = w_h.astype(dtype)

  def step(carry, t):
    dh_next, dc_next = carry
    acts_t, c, c_before, d_out = t
    i, f, g, o = (a.astype(jnp.float32) for a in jnp.split(acts_t, 4, axis=-1))
    dh = d_out + dh_next
    tanh_c = jnp.tanh(c)
    dc = dc_next + dh * o * (1 - tanh_c * tanh_c)
    padding = jnp.zeros(dc.shape[:-1] + (w.shape[-1] - 4 * w.shape[0],), dc.dtype)
    dz = jnp.concatenate([dc * g * i * (1 - i), dc * c_before * f * (1 - f),
                          dc * i * (1 - g * g), dh * tanh_c * o * (1 - o), padding], axis=-1)
    dz = dz.astype(dtype)  # the products' operand dtype, as autodiff of flax's cell feeds them
    return (jnp.matmul(dz, w.T, preferred_element_type=jnp.float32), dc * f), dz

  _, dz = jax.lax.scan(step, (zero, zero), (acts, cs, c_prev, d_hs.astype(jnp.float32)),
                       reverse=True)
  h_prev = jnp.concatenate([zero[None], hs[:-1]]).astype(dtype)
  f32 = dict(preferred_element_type=jnp.float32)
  d_x = jnp.einsum('tng,fg->tnf', dz, w_i.astype(dtype), **f32).astype(dtype)
  d_w_i = jnp.einsum('tnf,tng->fg', x, dz, **f32)
  d_w_h = jnp.einsum('tnh,tng->hg', h_prev, dz, **f32)
  d_bias = jnp.sum(dz.astype(jnp.float32), axis=(0, 1))
  # Each cotangent in its primal's dtype (JAX would accept float32 for a bfloat16 parameter and
  # hand it on silently).
  return d_x, d_w_i.astype(w_i.dtype), d_w_h.astype(w_h.dtype), d_bias.astype(bias.dtype)


_lstm_time_major.defvjp(_forward, _backward)


def lstm_layer(cell: Params, x: jax.Array, dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """h_t for every step of x [n, T, F]: [n, T, H], float32, from flax OptimizedLSTMCell's
  parameters `cell` ({ii, if, ig, io}: kernel [F, H]; {hi, hf, hg, ho}: kernel [H, H], bias
  [H]); products in `dtype`."""
  if x.ndim != 3:
    # flax's RNN takes any leading axes; this layer scans axis 1 and would scan the wrong one.
    raise ValueError(f'lstm_layer takes x as [n, T, F], got shape {x.shape}')
  hidden = cell['hi']['kernel'].shape[0]

  def gates(name, leaf):  # the four gates' arrays side by side, then zero columns (ALIGN)
    parts = [cell[name + g][leaf] for g in GATES]
    # result_type: parameters given as numpy float64 concatenate to JAX's float32 anyway
    zeros = jnp.zeros(parts[0].shape[:-1] + (-4 * hidden % ALIGN,), jnp.result_type(*parts))
    return jnp.concatenate(parts + [zeros], axis=-1)

  w_i, w_h, bias = gates('i', 'kernel'), gates('h', 'kernel'), gates('h', 'bias')
  hs = _lstm_time_major(jnp.swapaxes(x.astype(dtype), 0, 1), w_i, w_h, bias)
  return jnp.swapaxes(hs, 0, 1)
