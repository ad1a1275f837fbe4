"""Mamba-2 SSD, written on top of `linear_attention` (no second copy of the math).

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t^T B_t,     y_t = C_t h_t + D x_t

x [B, T, H, P], dt [B, T, H] (already positive), A [H] (negative), B, C [B, T, G, N] with
H % G == 0; state [B, H, P, N] float32 (mamba_ssm's layout). In linear-attention terms:
q = C, k = B * dt, v = x, log_decay = dt * A, scale = 1, state transposed to [B, H, N, P].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from longax.kernels import _checks
from longax.kernels._dispatch import resolve
from longax.kernels.linear_attention import CHUNK, linear_attention, linear_attention_step


def _check(op, x, dt, A, Bm, Cm, D, lead: str):
  r = len(lead.split(",")) + 2
  _checks.rank(op, "x", x, r, f"[{lead}, H, P]")
  _checks.floating(op, "x", x)
  h = x.shape[-2]
  _checks.shape_is(op, "dt", dt, x.shape[:-1], f"[{lead}, H]")
  _checks.shape_is(op, "A", A, (h,), "[H]")
  _checks.rank(op, "B", Bm, r, f"[{lead}, G, N]")
  _checks.shape_is(op, "B", Bm, x.shape[:-2] + Bm.shape[-2:], f"[{lead}, G, N]")
  _checks.shape_is(op, "C", Cm, Bm.shape, f"[{lead}, G, N] like B")
  _checks.divides(op, f"heads H={h} vs groups G={Bm.shape[-2]}", Bm.shape[-2], h)
  if D is not None:
    _checks.shape_is(op, "D", D, (h,), "[H]")
  _checks.same_dtype(op, x=x, B=Bm, C=Cm)


def _as_qkv(x, dt, A, Bm, Cm):
  """SSD inputs -> (q, k, v, log_decay) of linear attention, heads on axis -2."""
  rep = x.shape[-2] // Bm.shape[-2]
  q = jnp.repeat(Cm, rep, axis=-2)
  k = (jnp.repeat(Bm, rep, axis=-2).astype(jnp.float32) * dt[..., None]).astype(x.dtype)
  return q, k, x, dt.astype(jnp.float32) * A.astype(jnp.float32)


def _skip(y, x, D):
  if D is None:
    return y
  return (y.astype(jnp.float32) + D.astype(jnp.float32)[:, None] * x.astype(jnp.float32)).astype(x.dtype)


def ssd(x, dt, A, B, C, *, D=None, initial_state=None, segment_ids=None,
        chunk_size: int = CHUNK, return_final_state: bool = False, impl: str = "auto"):
  """Mamba-2 state-space duality. Returns y [B, T, H, P] or (y, state [B, H, P, N])."""
  op = "ssd"
  _check(op, x, dt, A, B, C, D, "B, T")
  b, t, h, p = x.shape
  like = lambda *s: jax.ShapeDtypeStruct(s, x.dtype)  # the call linear_attention will get
  resolve("linear_attention", impl, dict(q=like(b, t, h, B.shape[-1]), k=like(b, t, h, B.shape[-1]),
                                         v=x, g=like(b, t, h, 1), chunk=chunk_size),
          name=op)  # an impl or call linear_attention does not take fails as ssd's
  h0 = None
  if initial_state is not None:
    _checks.shape_is(op, "initial_state", initial_state, (b, h, p, B.shape[-1]), "[B, H, P, N]")
    h0 = jnp.swapaxes(initial_state, -1, -2)
  q, k, v, g = _as_qkv(x, dt, A, B, C)
  y, state = linear_attention(q, k, v, log_decay=g, initial_state=h0, segment_ids=segment_ids,
                              scale=1.0, chunk_size=chunk_size, return_final_state=True,
                              impl=impl)
  y = _skip(y, x, D)
  return (y, jnp.swapaxes(state, -1, -2)) if return_final_state else y


def ssd_step(x_t, dt_t, A, B_t, C_t, state, *, D=None):
  """One decoding step: x_t [B, H, P], dt_t [B, H], B_t, C_t [B, G, N], state [B, H, P, N].
  Returns (y_t [B, H, P], new state float32)."""
  op = "ssd_step"
  _check(op, x_t, dt_t, A, B_t, C_t, D, "B")
  _checks.shape_is(op, "state", state, x_t.shape + B_t.shape[-1:], "[B, H, P, N]")
  q, k, v, g = _as_qkv(x_t, dt_t, A, B_t, C_t)
  y, s = linear_attention_step(q, k, v, jnp.swapaxes(state, -1, -2), log_decay_t=g, scale=1.0)
  return _skip(y, x_t, D), jnp.swapaxes(s, -1, -2)
