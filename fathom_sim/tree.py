"""Small pure functions over params pytrees, used by client, server and hyper updates."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fathom_sim.types import Params


def vdot(a: Params, b: Params) -> jax.Array:
  """<a, b> over all leaves, accumulated in float32."""
  parts = jax.tree.leaves(jax.tree.map(
      lambda u, v: jnp.vdot(u.astype(jnp.float32), v.astype(jnp.float32)), a, b))
  return sum(parts, jnp.float32(0.0))


def cosine(a: Params, b: Params) -> jax.Array:
  """cos(a, b) = <a, b> / (|a| |b|), and 0 when either norm is 0 (the spec's convention).

  The norms are float32 like the params: a vector whose entries are all below ~1e-19 (a
  gradient of a batch fitted to float32's precision) has |a|^2 = 0 and counts as zero, as in
  any float32 implementation of the reference's formula.
  """
  # Three dots, not one variadic reduce that reads a and b once: XLA:CPU's float32 sum of
  # that drifts with the length, 1e-4..1e-3 off at the CNN's 1.2 M parameters (tested).
  return cosine_of(vdot(a, b), vdot(a, a), vdot(b, b))


def cosine_of(ab: jax.Array, aa: jax.Array, bb: jax.Array) -> jax.Array:
  """cosine's value from <a, b>, |a|^2 and |b|^2; NaN when any of the three is not finite.

  A sum that overflowed float32 leaves the cosine unknown, not 0: |a|^2 = inf with a finite
  <a, b> (a gradient of norm ~1e19 against a step 0.1 times as long) would otherwise read as
  orthogonal. A NaN c_k leaves its client out (client.py); a NaN h_glob makes FATHOM's phi
  non-finite, so the round is rejected, and under FedAvg is logged as null.

  Clipped to [-1, 1], where the true cosine lies: float32 sums that lose part of a norm read
  past it (squares below ~1.2e-38 flush to 0, so a vector with some entries under ~1e-19 gave
  cos(a, 2a) = 5.7, and c_1 of such a gradient 1.48, making h_i > 1 possible).
  """
  denom = jnp.sqrt(aa) * jnp.sqrt(bb)
  cos = jnp.where(denom > 0, jnp.clip(ab / jnp.where(denom > 0, denom, 1.0), -1.0, 1.0), 0.0)
  return jnp.where(jnp.isfinite(ab) & jnp.isfinite(aa) & jnp.isfinite(bb), cos, jnp.nan)


def all_finite(a: Params) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(a)]))


def select(pred: jax.Array, a: Params, b: Params) -> Params:
  """a where pred else b, leaf by leaf (pred is a scalar)."""
  return jax.tree.map(lambda u, v: jnp.where(pred, u, v), a, b)


def axpy(alpha, x: Params, y: Params) -> Params:
  """alpha * x + y."""
  return jax.tree.map(lambda u, v: alpha * u + v, x, y)


def sub(a: Params, b: Params) -> Params:
  return jax.tree.map(jnp.subtract, a, b)


def scale(alpha, a: Params) -> Params:
  return jax.tree.map(lambda u: alpha * u, a)


def zeros_like(a: Params) -> Params:
  return jax.tree.map(jnp.zeros_like, a)


def l2_norm(a: Params) -> jax.Array:
  return jnp.sqrt(vdot(a, a))
