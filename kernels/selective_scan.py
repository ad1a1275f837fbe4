"""Mamba-1 selective scan.

    dt_t = softplus?(delta_t + delta_bias)                       [B, L, D]
    h_t  = exp(dt_t A) * h_{t-1} + dt_t B_t u_t                   [B, D, N]
    y_t  = C_t . h_t + D * u_t,      y *= silu(z)                 [B, L, D]

u, delta, z [B, L, D]; A [D, N]; B, C [B, L, N]; state [B, D, N] float32. `segment_ids`
[B, L] zero the state wherever the id changes.

The XLA path scans over chunks of `chunk_size` tokens carrying h [B, D, N]; inside a chunk
an associative scan on [B, C, D, N]. The chunk body is rematerialised in the backward
pass, so [B, L, D, N] never exists for the whole length, forward or backward.
`impl="pallas"` is the Mosaic GPU kernel for Hopper (`kernels/gpu/selective_scan.py`), taken by
`auto` where its GPU tests cover the call (D a multiple of 128, d_state 8 or 16, bf16/f32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from einops import rearrange

from longax.kernels import _checks
from longax.kernels._dispatch import register, register_kernels, resolve
from longax.kernels._vma import vary_like
from longax.kernels.linear_attention import _resets

CHUNK = 64


def selective_scan_reference(u, dt, A, Bm, Cm, h0, resets, **_blocks):
  """Token-by-token recurrence in float32; dt already biased/softplussed.
  Returns (C.h [B, L, D] float32, final state [B, D, N])."""

  def step(h, xs):
    u_t, dt_t, b_t, c_t, r_t = xs  # [B,D], [B,D], [B,N], [B,N], [B]
    h = jnp.where(r_t[:, None, None], 0.0, h)
    h = jnp.exp(dt_t[..., None] * A) * h + (dt_t * u_t)[..., None] * b_t[:, None, :]
    return h, jnp.einsum("bdn,bn->bd", h, c_t)

  resets = jnp.zeros(u.shape[:2], bool) if resets is None else resets
  xs = [jnp.moveaxis(x, 1, 0).astype(jnp.float32) for x in (u, dt, Bm, Cm)]
  xs = (*xs, jnp.moveaxis(resets, 1, 0))
  h, y = jax.lax.scan(step, vary_like(h0, xs, A), xs)
  return jnp.moveaxis(y, 0, 1), h


register("selective_scan", "reference")(selective_scan_reference)


def _combine(x, y):
  """Composition of h -> a h + b maps (x first, then y)."""
  return x[0] * y[0], y[0] * x[1] + y[1]


def split_chunks(x, chunk: int):
  """[B, L, ...] -> [N, B, C, ...], L padded with zeros to a multiple of `chunk`."""
  pad = -x.shape[1] % chunk
  x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  return rearrange(x, "b (n c) ... -> n b c ...", c=chunk)


@jax.checkpoint
def chunk_step(A, h, xs):
  """One chunk: state h [B, D, N] entering it, xs = (u, dt [B, C, D], B, C [B, C, N], resets
  [B, C] or None), float32 -> (the state leaving it, y [B, C, D]). An associative scan inside."""
  u_c, dt_c, b_c, c_c, r_c = xs
  a = jnp.exp(dt_c[..., None] * A)  # [B,C,D,N]
  if r_c is not None:
    a = jnp.where(r_c[..., None, None], 0.0, a)
  bu = (dt_c * u_c)[..., None] * b_c[:, :, None, :]
  a_cum, b_cum = jax.lax.associative_scan(_combine, (a, bu), axis=1)
  hs = a_cum * h[:, None] + b_cum
  return hs[:, -1], jnp.einsum("bcdn,bcn->bcd", hs, c_c)


def _selective_scan_xla(u, dt, A, Bm, Cm, h0, resets, chunk: int = CHUNK):
  l = u.shape[1]
  xs = [split_chunks(x.astype(jnp.float32), chunk) for x in (u, dt, Bm, Cm)]
  xs.append(None if resets is None else split_chunks(resets, chunk))
  h, y = jax.lax.scan(lambda h, xs: chunk_step(A, h, xs), vary_like(h0, xs, A), xs)
  return rearrange(y, "n b c d -> b (n c) d")[:, :l], h


register("selective_scan", "xla")(_selective_scan_xla)

# The Mosaic GPU kernel (Hopper) is impl="pallas" off TPU; the Pallas TPU kernel impl="pallas" on
# TPU and impl="pallas_interpret" anywhere (CPU). Each asks `unsupported` which calls it takes.
from longax.kernels.gpu import selective_scan as _gpu  # noqa: E402
from longax.kernels.tpu import selective_scan as _tpu  # noqa: E402

register_kernels("selective_scan", gpu=(_gpu.selective_scan_pallas, _gpu.unsupported),
                 tpu=(_tpu.selective_scan_pallas, _tpu.unsupported),
                 interpret=(functools.partial(_tpu.selective_scan_pallas, interpret=True),
                            functools.partial(_tpu.unsupported, interpret=True)))


def _prepare_dt(delta, delta_bias, delta_softplus):
  dt = delta.astype(jnp.float32)
  if delta_bias is not None:
    dt = dt + delta_bias.astype(jnp.float32)
  return jax.nn.softplus(dt) if delta_softplus else dt


def _epilogue(y, u, D, z):
  if D is not None:
    y = y + D.astype(jnp.float32) * u.astype(jnp.float32)
  if z is not None:
    y = y * jax.nn.silu(z.astype(jnp.float32))
  return y.astype(u.dtype)


def _check(op, u, delta, A, Bm, Cm, D, z, delta_bias, state, state_name, time_axis):
  lead = "B, L, " if time_axis else "B, "
  r = 3 if time_axis else 2
  _checks.rank(op, "u", u, r, f"[{lead}D]")
  _checks.floating(op, "u", u)
  _checks.rank(op, "A", A, 2, "[D, N]")
  d, n = u.shape[-1], A.shape[-1]
  _checks.shape_is(op, "A", A, (d, n), f"[D, N] with D={d} from u [{lead}D]")
  _checks.shape_is(op, "delta", delta, u.shape, f"[{lead}D]")
  for name, x in (("B", Bm), ("C", Cm)):
    _checks.shape_is(op, name, x, u.shape[:-1] + (n,), f"[{lead}N]")
  if z is not None:
    _checks.shape_is(op, "z", z, u.shape, f"[{lead}D]")
  for name, x in (("D", D), ("delta_bias", delta_bias)):
    if x is not None:
      _checks.shape_is(op, name, x, (d,), "[D]")
  _checks.same_dtype(op, u=u, delta=delta, B=Bm, C=Cm, z=z)
  if state is not None:
    _checks.shape_is(op, state_name, state, (u.shape[0], d, n), "[B, D, N]")


def selective_scan(u, delta, A, B, C, *, D=None, z=None, delta_bias=None,
                   delta_softplus: bool = False, initial_state=None, segment_ids=None,
                   return_final_state: bool = False, chunk_size: int = CHUNK,
                   impl: str = "auto"):
  """Mamba-1 selective scan; see the module docstring. Returns y [B, L, D] (dtype of u)
  or (y, final_state [B, D, N] float32)."""
  op = "selective_scan"
  _check(op, u, delta, A, B, C, D, z, delta_bias, initial_state, "initial_state", True)
  _checks.positive_int(op, "chunk_size", chunk_size)
  b, l, d = u.shape
  if segment_ids is not None:
    _checks.shape_is(op, "segment_ids", segment_ids, (b, l), "[B, L]")
  h0 = (jnp.zeros((b, d, A.shape[1]), jnp.float32) if initial_state is None
        else initial_state.astype(jnp.float32))
  dt = _prepare_dt(delta, delta_bias, delta_softplus)
  fn = resolve(op, impl, dict(u=u, A=A))
  y, h = fn(u, dt, A.astype(jnp.float32), B, C, h0, _resets(segment_ids, b, l), chunk=chunk_size)
  y = _epilogue(y, u, D, z)
  return (y, h) if return_final_state else y


def selective_scan_step(u_t, delta_t, A, B_t, C_t, state, *, D=None, z_t=None,
                        delta_bias=None, delta_softplus: bool = False):
  """One decoding step: u_t, delta_t, z_t [B, D]; B_t, C_t [B, N]; state [B, D, N].
  Returns (y_t [B, D], new state float32)."""
  op = "selective_scan_step"
  _check(op, u_t, delta_t, A, B_t, C_t, D, z_t, delta_bias, state, "state", False)
  dt = _prepare_dt(delta_t, delta_bias, delta_softplus)
  f32 = lambda x: x.astype(jnp.float32)
  state = (jnp.exp(dt[..., None] * f32(A)) * f32(state)
           + (dt * f32(u_t))[..., None] * f32(B_t)[:, None, :])
  y = jnp.einsum("bdn,bn->bd", state, f32(C_t))
  return _epilogue(y, u_t, D, z_t), state
