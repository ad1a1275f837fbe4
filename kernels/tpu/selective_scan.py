"""Mamba-1 selective scan for TPU in Pallas (Mosaic TPU).

Registered as `impl="pallas"` (TPU backend) and `impl="pallas_interpret"` (TPU interpret mode,
on CPU) of `selective_scan`; see `kernels/selective_scan.py` for the API, the float32 reference
and the XLA path, whose chunk function (`chunk_step`) this kernel's backward shares.

    h_t = exp(dt_t A) * h_{t-1} + dt_t u_t B_t,      y_t = C_t . h_t

Forward: grid (B, D / block_d, L / C), the chunk axis "arbitrary"; the state is held
transposed, h^T [N, block_d] float32 in VMEM scratch (channels on the 128 lanes, the N states on
sublanes), and a loop over the chunk's tokens updates it (token t's u, dt rows are dynamic
sublane reads; its B, C columns are picked from the chunk's [N, C] tiles by a lane mask, no
dynamic lane index). y rows go back by dynamic sublane stores. The state entering every chunk
is stored for the backward.

Backward (`jax.custom_vjp`): a reverse state pass kernel (chunks and tokens walked last to first,
dh^T in f32 VMEM scratch) gives the gradient of the state leaving every chunk and of the initial
state:  dh_{t-1} = exp(dt_t A) * (dh_t + C_t dy_t);  then du, d dt, dA, dB, dC are the VJP of
the XLA path's `chunk_step` over all chunks at once with their entering states held fixed.
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from longax.kernels._vma import same_vma
from longax.kernels.tpu import not_on_tpu, pallas_call, round_up, scan_params

F32 = jnp.float32
BLOCK_D = 512  # channels per grid step
CHUNK = 128  # tokens per grid step (the op's chunk_size is taken up to this)


def vmem_bytes(block_d: int, chunk: int, n: int, itemsize: int = 2) -> int:
  """VMEM one forward grid step holds: double-buffered u, dt (input dtype), B^T, C^T, resets,
  y (f32) blocks, A^T, and the f32 state (scratch, entering-state output, loop temporaries)."""
  lane = lambda x: round_up(x, 128)
  sub = lambda x: round_up(x, 8)
  io = 2 * (2 * itemsize * chunk * block_d + 2 * itemsize * sub(n) * lane(chunk)
            + 4 * chunk * 128 + 4 * chunk * block_d)
  return io + 2 * 4 * sub(n) * block_d + 6 * 4 * sub(n) * block_d


@dataclasses.dataclass(frozen=True)
class _Config:
  chunk: int
  block_d: int
  resets: bool
  interpret: bool


def _column(tile, t):
  """Column t [N, 1] of an [N, C] tile (a lane mask and a sum: no dynamic lane index)."""
  lanes = lax.broadcasted_iota(jnp.int32, tile.shape, 1)
  return jnp.sum(jnp.where(lanes == t, tile, 0.0), axis=1, keepdims=True)


def _decay(at_ref, dt_ref, r_ref, t):
  """exp(dt_t A)^T [N, block_d] (0 where the state resets before token t)."""
  a = jnp.exp(at_ref[...] * dt_ref[0, pl.ds(t, 1), :].astype(F32))
  if r_ref is not None:
    a = a * (1.0 - r_ref[0, pl.ds(t, 1), :])
  return a


def _forward_kernel(u_ref, dt_ref, bt_ref, ct_ref, at_ref, h0_ref, *refs, cfg: _Config):
  r_ref = None
  if cfg.resets:
    r_ref, *refs = refs
  y_ref, ent_ref, final_ref, h_ref = refs
  i = pl.program_id(2)

  @pl.when(i == 0)
  def _init():
    h_ref[...] = h0_ref[0]

  ent_ref[0, 0] = h_ref[...]
  b_tile, c_tile = bt_ref[0].astype(F32), ct_ref[0].astype(F32)  # [N, C]

  def token(t, h):
    dtu = (dt_ref[0, pl.ds(t, 1), :].astype(F32) * u_ref[0, pl.ds(t, 1), :].astype(F32))
    h = _decay(at_ref, dt_ref, r_ref, t) * h + _column(b_tile, t) * dtu
    y_ref[0, pl.ds(t, 1), :] = jnp.sum(_column(c_tile, t) * h, axis=0, keepdims=True)
    return h

  h_ref[...] = lax.fori_loop(0, cfg.chunk, token, h_ref[...])

  @pl.when(i == pl.num_programs(2) - 1)
  def _finish():
    final_ref[0] = h_ref[...]


def _forward(u, dt, bt, ct, at, h0t, r, cfg: _Config):
  """u, dt [B, Lp, D]; bt, ct [B, N, Lp]; at [N, D]; h0t [B, N, D]; r [B, Lp, 1] f32 or None
  -> (y [B, Lp, D] f32, entering [NC, B, N, D], final h^T [B, N, D])."""
  b, lp, d = u.shape
  n = at.shape[0]
  c, bd = cfg.chunk, cfg.block_d
  nc = lp // c
  tok = pl.BlockSpec((1, c, bd), lambda b, j, i: (b, i, j))
  state = pl.BlockSpec((1, n, bd), lambda b, j, i: (b, 0, j))
  cols = pl.BlockSpec((1, n, c), lambda b, j, i: (b, 0, i))
  in_specs = [tok, tok, cols, cols, pl.BlockSpec((n, bd), lambda b, j, i: (0, j)), state]
  args = [u, dt, bt, ct, at, h0t]
  if r is not None:
    in_specs.append(pl.BlockSpec((1, c, 1), lambda b, j, i: (b, i, 0)))
    args.append(r)
  return pallas_call(
      functools.partial(_forward_kernel, cfg=cfg),
      grid=(b, d // bd, nc), in_specs=in_specs,
      out_specs=[tok, pl.BlockSpec((1, 1, n, bd), lambda b, j, i: (i, b, 0, j)), state],
      out_shape=[jax.ShapeDtypeStruct((b, lp, d), F32), jax.ShapeDtypeStruct((nc, b, n, d), F32),
                 jax.ShapeDtypeStruct((b, n, d), F32)],
      scratch_shapes=[pltpu.VMEM((n, bd), F32)], **scan_params(cfg.interpret))(*args)


def _reverse_kernel(dt_ref, ct_ref, at_ref, dy_ref, dfinal_ref, *refs, cfg: _Config):
  r_ref = None
  if cfg.resets:
    r_ref, *refs = refs
  dleave_ref, dh0_ref, dh_ref = refs
  i = pl.program_id(2)

  @pl.when(i == 0)
  def _init():
    dh_ref[...] = dfinal_ref[0]

  dleave_ref[0, 0] = dh_ref[...]
  c_tile = ct_ref[0].astype(F32)

  def token(s, dh):
    t = cfg.chunk - 1 - s
    dh = dh + _column(c_tile, t) * dy_ref[0, pl.ds(t, 1), :]
    return _decay(at_ref, dt_ref, r_ref, t) * dh

  dh_ref[...] = lax.fori_loop(0, cfg.chunk, token, dh_ref[...])

  @pl.when(i == pl.num_programs(2) - 1)
  def _finish():
    dh0_ref[0] = dh_ref[...]


def _reverse_states(dt, ct, at, dy, dfinal_t, r, cfg: _Config):
  """-> (d state leaving each chunk [NC, B, N, D] (transposed), d initial state [B, N, D])."""
  b, lp, d = dt.shape
  n = at.shape[0]
  c, bd = cfg.chunk, cfg.block_d
  nc = lp // c
  rev = lambda i: nc - 1 - i
  tok = pl.BlockSpec((1, c, bd), lambda b, j, i: (b, rev(i), j))
  state = pl.BlockSpec((1, n, bd), lambda b, j, i: (b, 0, j))
  in_specs = [tok, pl.BlockSpec((1, n, c), lambda b, j, i: (b, 0, rev(i))),
              pl.BlockSpec((n, bd), lambda b, j, i: (0, j)), tok, state]
  args = [dt, ct, at, dy, dfinal_t]
  if r is not None:
    in_specs.append(pl.BlockSpec((1, c, 1), lambda b, j, i: (b, rev(i), 0)))
    args.append(r)
  return pallas_call(
      functools.partial(_reverse_kernel, cfg=cfg),
      grid=(b, d // bd, nc), in_specs=in_specs,
      out_specs=[pl.BlockSpec((1, 1, n, bd), lambda b, j, i: (rev(i), b, 0, j)), state],
      out_shape=[jax.ShapeDtypeStruct((nc, b, n, d), F32), jax.ShapeDtypeStruct((b, n, d), F32)],
      scratch_shapes=[pltpu.VMEM((n, bd), F32)], **scan_params(cfg.interpret))(*args)


# ---------------------------------------------------------------------------- the op


def _layout(dt, Bm, Cm, A, resets):
  """The kernels' operands: B^T, C^T [B, N, Lp], A^T [N, D], resets [B, Lp, 1] f32."""
  r = None if resets is None else resets.astype(F32)[..., None]
  return jnp.swapaxes(Bm, 1, 2), jnp.swapaxes(Cm, 1, 2), A.T, r


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _scan(u, dt, A, Bm, Cm, h0, resets, cfg: _Config):
  """Padded inputs (Lp a multiple of the chunk) -> (y [B, Lp, D] f32, final state [B, D, N])."""
  return _scan_fwd(u, dt, A, Bm, Cm, h0, resets, cfg)[0]


def _scan_fwd(u, dt, A, Bm, Cm, h0, resets, cfg: _Config):
  bt, ct, at, r = _layout(dt, Bm, Cm, A, resets)
  y, entering, final = _forward(u, dt, bt, ct, at, jnp.swapaxes(h0, 1, 2), r, cfg)
  return (y, jnp.swapaxes(final, 1, 2)), (u, dt, A, Bm, Cm, resets, entering)


def _scan_bwd(cfg: _Config, res, cts):
  u, dt, A, Bm, Cm, resets, entering = res
  dy, dfinal = cts
  ss = sys.modules["longax.kernels.selective_scan"]
  _, ct, at, r = _layout(dt, Bm, Cm, A, resets)
  dleave, dh0 = _reverse_states(dt, ct, at, dy, jnp.swapaxes(dfinal, 1, 2), r, cfg)
  entering = jnp.swapaxes(entering, 2, 3)  # [NC, B, D, N]

  def local(u, dt, A, Bm, Cm):  # every chunk at once, its entering state held fixed
    xs = [ss.split_chunks(x.astype(F32), cfg.chunk) for x in (u, dt, Bm, Cm)]
    xs.append(None if resets is None else ss.split_chunks(resets, cfg.chunk))
    return jax.vmap(lambda h, xs: ss.chunk_step(A, h, xs))(entering, xs)

  _, vjp = jax.vjp(local, u, dt, A, Bm, Cm)
  grads = vjp((jnp.swapaxes(dleave, 2, 3), ss.split_chunks(dy, cfg.chunk)))
  dr = None if resets is None else jnp.zeros(resets.shape, jax.dtypes.float0)
  return (*grads, jnp.swapaxes(dh0, 1, 2), dr)


_scan.defvjp(_scan_fwd, _scan_bwd)


def unsupported(call: dict, *, interpret: bool = False) -> str | None:
  """Why the kernel does not take this call (None: it does)."""
  if not interpret and (why := not_on_tpu(call)) is not None:
    return why
  if not interpret and call["u"].shape[-1] % 128:
    return f"D={call['u'].shape[-1]} (the TPU kernel takes multiples of 128)"
  return None


def selective_scan_pallas(u, dt, A, Bm, Cm, h0, resets, chunk: int = CHUNK, block_d: int = BLOCK_D,
                          interpret=False):
  """The kernel under the op's signature (dt already biased / softplussed); `chunk` is taken
  up to `CHUNK`, channels `block_d` per grid step (or all D where it does not divide)."""
  l, d = u.shape[1], u.shape[2]
  c = min(chunk, CHUNK, round_up(l, 8))
  lp = round_up(l, c)
  cfg = _Config(c, block_d if d % block_d == 0 else d, resets is not None, interpret)
  pad = lambda x: None if x is None else jnp.pad(x, [(0, 0), (0, lp - l)] + [(0, 0)] * (x.ndim - 2))
  y, h = _scan(*same_vma(pad(u), pad(dt), A, pad(Bm), pad(Cm), h0), pad(resets), cfg)
  return y[:, :l], h
