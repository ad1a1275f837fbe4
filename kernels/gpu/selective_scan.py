"""Mamba-1 selective scan for Hopper in Mosaic GPU: `selective_scan(impl="pallas")`.

Registered in `kernels/selective_scan.py` (the API, the float32 reference and the XLA path).
The kernel computes the core recurrence on a biased/softplussed `dt` (float32):

    h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t,   y_t = C_t . h_t          (h [B, D, N] f32)

and the wrapper's autodiff handles softplus, bias, the D skip and the z gate around it.

Layout: one CTA per (block of 128 channels, batch row, sequence segment), one channel per
thread, the channel's N states in registers. A CTA walks its segment in TMA tiles of
`CHUNK` tokens (dt, u as [CHUNK, 128] tiles, B/C as [CHUNK, N] tiles read as warp-uniform
scalars from shared memory) through a ring of `STAGES` slots; the output row of a token
goes straight to GMEM. [B, L, D, N] is never written: the forward saves only the state
entering each tile ([B, L / CHUNK, N, D]).

Sequence parallelism: a (channel block, batch row) pair alone gives D / 128 * B CTAs (16 at
B=2, D=1024: most SMs idle), and each walks L tokens in series. So the sequence is split
into `S` segments. Forward: a first pass scans every segment but the last from a zero state
and returns its final state and its total decay exp(A sum dt) (0 across a reset); XLA chains
them into the state entering each segment; the second pass scans every segment from its
entering state and writes y. Backward: the mirror image, a first pass runs the adjoint over
every segment but the first from a zero cotangent, XLA chains them with the forward's segment
decays, and the main backward kernel walks each segment's tiles in reverse: per tile it
recomputes the state entering every sub-tile of `SUB` tokens (kept in the thread's own
column of shared memory), then per sub-tile (last first) the sub-tile's states and decays in
registers, and runs the adjoint over them. dB and dC (sums over channels) are reduced within
each warp by a butterfly reduce-scatter (lane l ends with the warp's sum of product l), the
four warps' rows added per tile and written per channel block; XLA adds the blocks.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.experimental.mosaic.gpu as mgpu
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, memref, vector

from longax.kernels._vma import same_vma
from longax.kernels.gpu import kernel, not_on_hopper

CHUNK = 16  # tokens per TMA tile (and per saved state)
BLOCK_D = 128  # channels per CTA: one per thread of the warpgroup
STAGES = 3  # forward TMA ring depth
BWD_STAGES = 2  # backward TMA ring depth
SUB = 2  # backward: tokens per register sub-tile
UNROLL = 4  # forward: tokens per loop iteration
D_STATES = (8, 16)  # d_state the backward's channel reduction is written for (2N vs 32 lanes)
NUM_SMS = 132
MAX_SEGMENTS = 16
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_F32 = jnp.float32
_WARP = 32
_WARPS = BLOCK_D // _WARP
_VEC = plgpu.Layout.WG_STRIDED((BLOCK_D,), vec_size=1)  # thread i holds channel i


@dataclasses.dataclass(frozen=True)
class Cfg:
  batch: int
  num_chunks: int  # tiles of CHUNK tokens (after padding)
  dim: int
  dstate: int
  segments: int  # sequence segments (divides num_chunks)
  resets: bool
  dtypes: tuple[str, ...]  # of u, dt, A, B, C, h0 (the cotangents')

  @property
  def nblk(self):
    return self.dim // BLOCK_D

  @property
  def per(self):  # tiles per segment
    return self.num_chunks // self.segments

  @property
  def seq_len(self):
    return self.num_chunks * CHUNK


def num_segments(nblk: int, batch: int, num_chunks: int) -> int:
  """Sequence segments: enough CTAs for about two per SM, each segment at least 4 tiles."""
  ctas = nblk * batch
  best = 1
  for s in range(1, MAX_SEGMENTS + 1):
    if num_chunks % s or num_chunks // s < 4:
      continue
    best = s
    if ctas * s >= 2 * NUM_SMS:
      break
  return best


def _launch(grid, grid_names, name, body, **kwargs):
  # No automatic barriers: every thread touches only its own channel's column of the shared
  # tiles; the cross-thread hazards (refilling a slot, the dB/dC rows) are fenced explicitly.
  return kernel(
      body, grid=grid, grid_names=grid_names, kernel_name=name,
      compiler_params=plgpu.CompilerParams(approx_math=True, unsafe_no_auto_barriers=True),
      **kwargs)


def _vec(ref):
  return plgpu.load(ref, layout=_VEC, optimized=False)


def _fetch(refs, names, b, rows, cols, slot, bar):
  """TMA loads of one tile: `names` ([B, L, D] arrays: a [CHUNK, 128] tile), B/C ([CHUNK, N]),
  resets ([CHUNK])."""
  for k in names:
    if k == "keep":  # slots padded to 128 bytes
      plgpu.copy_gmem_to_smem(refs[k].at[b, rows], refs[k + "_s"].at[slot, pl.ds(0, CHUNK)], bar)
    elif k in ("bm", "cm"):
      plgpu.copy_gmem_to_smem(refs[k].at[b, rows], refs[k + "_s"].at[slot], bar)
    else:
      plgpu.copy_gmem_to_smem(refs[k].at[b, rows, cols], refs[k + "_s"].at[slot], bar)


def _smem(cfg: Cfg, names, dtypes, stages):
  out = {}
  for k in names:
    if k in ("bm", "cm"):
      out[k + "_s"] = plgpu.SMEM((stages, CHUNK, cfg.dstate), _F32)
    elif k == "keep":
      out[k + "_s"] = plgpu.SMEM((stages, 32), _F32)
    else:
      out[k + "_s"] = plgpu.SMEM((stages, CHUNK, BLOCK_D), dtypes[k])
  out["bars"] = plgpu.Barrier(num_arrivals=len(names), num_barriers=stages)
  return out


# ----------------------------------------------------------------------------- forward


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward_call(cfg: Cfg, local: bool, dt, u, bm, cm, keep, a2t, hin):
  """local=True: scan segments 0 .. S-2 from zero; returns hloc, dec [B, S-1, N, D] (the
  final state and the total decay exp(A sum dt), 0 across a reset).
  local=False: scan every segment from hin [B, S, N, D]; returns y [B, Lp, D] f32, the state
  entering every tile [B, nc, N, D] and the state at each segment's end [B, S, N, D]."""
  n_state, per = cfg.dstate, cfg.per
  tiles = ["dt", "u", "bm", "cm"] + (["keep"] if cfg.resets else [])
  ins = tiles + ["a2t"] + ([] if local else ["hin"])
  arrays = dict(dt=dt, u=u, bm=bm, cm=cm, keep=keep, a2t=a2t, hin=hin)
  nseg = cfg.segments - 1 if local else cfg.segments
  st = jax.ShapeDtypeStruct((cfg.batch, nseg, n_state, cfg.dim), _F32)
  if local:
    outs, out_types = ["hloc", "dec"], (st, st)
  else:
    outs = ["y", "states", "hend"]
    out_types = (jax.ShapeDtypeStruct((cfg.batch, cfg.seq_len, cfg.dim), _F32),
                 jax.ShapeDtypeStruct((cfg.batch, cfg.num_chunks, n_state, cfg.dim), _F32), st)
  stages = min(STAGES, per)
  smem = _smem(cfg, tiles, dict(dt=dt.dtype, u=u.dtype), stages)

  def body(*refs_in, **scratch):
    refs = dict(zip(ins + outs, refs_in))
    refs.update(scratch)
    bars = scratch["bars"]
    di, b, seg = lax.axis_index("d"), lax.axis_index("b"), lax.axis_index("s")
    cols = pl.ds(di * BLOCK_D, BLOCK_D)
    first = seg * per

    def fetch(step, slot):
      _fetch(refs, tiles, b, pl.ds((first + step) * CHUNK, CHUNK), cols, slot, bars.at[slot])

    for i in range(stages):
      fetch(i, i)
    a2 = [_vec(refs["a2t"].at[j, cols]) for j in range(n_state)]
    zero = 0.0 * a2[0]
    if local:
      h0 = tuple(zero for _ in range(n_state))
    else:
      h0 = tuple(_vec(refs["hin"].at[b, seg, j, cols]) for j in range(n_state))

    def tile(step, carry):
      h, sumd, kp = carry
      n = first + step
      slot = lax.rem(step, stages)
      if not local:
        for j in range(n_state):
          refs["states"][b, n, j, cols] = h[j]
      plgpu.barrier_wait(bars.at[slot])
      dt_s, u_s, bm_s, cm_s = (refs[k + "_s"].at[slot] for k in ("dt", "u", "bm", "cm"))

      def token(t, carry):
        h, sumd, kp = carry
        h = list(h)
        delta = _vec(dt_s.at[t])
        du = delta * _vec(u_s.at[t]).astype(_F32)
        keep_t = refs["keep_s"][slot, t] if cfg.resets else None
        y = zero
        for j in range(n_state):
          a = jnp.exp2(delta * a2[j])
          if cfg.resets:
            a = a * keep_t
          h[j] = a * h[j] + du * bm_s[t, j]
          if not local:
            y = y + h[j] * cm_s[t, j]
        if not local:
          refs["y"][b, n * CHUNK + t, cols] = y
        if local:
          sumd = sumd + delta
          if cfg.resets:
            kp = kp * keep_t
        return tuple(h), sumd, kp

      def group(i, carry):
        for r in range(UNROLL):
          carry = token(i * UNROLL + r, carry)
        return carry

      carry = lax.fori_loop(0, CHUNK // UNROLL, group, (h, sumd, kp))
      plgpu.commit_smem()  # every thread is done reading this slot

      @pl.when(step + stages < per)
      def _():
        fetch(step + stages, slot)

      return carry

    h, sumd, kp = lax.fori_loop(0, per, tile, (h0, zero, zero + 1.0))
    if local:
      for j in range(n_state):
        refs["hloc"][b, seg, j, cols] = h[j]
        refs["dec"][b, seg, j, cols] = jnp.exp2(a2[j] * sumd) * kp
    else:
      for j in range(n_state):
        refs["hend"][b, seg, j, cols] = h[j]

  call = _launch((cfg.nblk, cfg.batch, nseg), ("d", "b", "s"),
                 "selective_scan_local" if local else "selective_scan_fwd", body,
                 out_type=out_types, scratch_types=smem)
  return call(*(arrays[k] for k in ins))


# ----------------------------------------------------------------------------- backward


def _c(value: int):
  return mgpu_utils.c(value, ir.IntegerType.get_signless(32))


def _scalar(x):
  return vector.extract(x.registers.flat[0], dynamic_position=[],
                        static_position=ir.DenseI64ArrayAttr.get([0]))


@plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) + (_VEC,) * _WARP)
def _warp_sums_store(ctx, ref, *vals):
  """Butterfly reduce-scatter of 32 per-thread values over each warp's 32 lanes: lane l ends
  with the warp's sum of value l and stores it at ref[warp, l] (ref: [4, 32] f32)."""
  del ctx
  tid = mgpu_utils.thread_idx()
  lane = arith.andi(tid, _c(_WARP - 1))
  xs = [_scalar(v) for v in vals]
  half = _WARP // 2
  while half:
    upper = arith.cmpi(arith.CmpIPredicate.ne, arith.andi(lane, _c(half)), _c(0))
    nxt = []
    for i in range(half):
      lo, hi = xs[i], xs[i + half]
      keep = arith.select(upper, hi, lo)  # this lane keeps the half its bit selects
      send = arith.select(upper, lo, hi)  # and hands the other half to lane ^ half
      nxt.append(arith.addf(keep, mgpu_utils.shfl_bfly(send, half)))
    xs = nxt
    half //= 2
  warp = arith.andi(arith.shrui(tid, _c(5)), _c(_WARPS - 1))
  idx = ir.IndexType.get()
  memref.store(xs[0], ref, [arith.index_cast(idx, warp), arith.index_cast(idx, lane)])


@functools.partial(jax.jit, static_argnums=(0,))
def _adjoint_local_call(cfg: Cfg, dt, dy, cm, keep, a2t):
  """gloc, dec [B, S-1, N, D]: entry s-1 for segment s (1 .. S-1): the cotangent of the state
  entering the segment from the segment's own outputs (a zero cotangent at its end), and the
  segment's decay exp(A sum dt) (0 if a reset lies inside it)."""
  n_state, per = cfg.dstate, cfg.per
  tiles = ["dt", "dy", "cm"] + (["keep"] if cfg.resets else [])
  ins = tiles + ["a2t"]
  arrays = dict(dt=dt, dy=dy, cm=cm, keep=keep, a2t=a2t)
  stages = min(BWD_STAGES, per)
  smem = _smem(cfg, tiles, dict(dt=dt.dtype, dy=dy.dtype), stages)
  st = jax.ShapeDtypeStruct((cfg.batch, cfg.segments - 1, n_state, cfg.dim), _F32)

  def body(*refs_in, **scratch):
    refs = dict(zip(ins + ["gloc", "dec"], refs_in))
    refs.update(scratch)
    bars = scratch["bars"]
    di, b, sp = lax.axis_index("d"), lax.axis_index("b"), lax.axis_index("s")
    cols = pl.ds(di * BLOCK_D, BLOCK_D)
    last = (sp + 1) * per + per - 1  # segment sp + 1, walked from its last tile

    def fetch(step, slot):
      _fetch(refs, tiles, b, pl.ds((last - step) * CHUNK, CHUNK), cols, slot, bars.at[slot])

    for i in range(stages):
      fetch(i, i)
    a2 = [_vec(refs["a2t"].at[j, cols]) for j in range(n_state)]
    zero = 0.0 * a2[0]

    def tile(step, carry):
      slot = lax.rem(step, stages)
      plgpu.barrier_wait(bars.at[slot])

      def token(t, carry):
        g, sumd, kp = carry
        g = list(g)
        delta = _vec(refs["dt_s"].at[slot, t])
        dy = _vec(refs["dy_s"].at[slot, t])
        keep_t = refs["keep_s"][slot, t] if cfg.resets else None
        for j in range(n_state):
          a = jnp.exp2(delta * a2[j])
          if cfg.resets:
            a = a * keep_t
          g[j] = (dy * refs["cm_s"][slot, t, j] + g[j]) * a
        if cfg.resets:
          kp = kp * keep_t
        return tuple(g), sumd + delta, kp

      def group(i, carry):
        for r in range(UNROLL):
          carry = token(CHUNK - 1 - (i * UNROLL + r), carry)
        return carry

      carry = lax.fori_loop(0, CHUNK // UNROLL, group, carry)
      plgpu.commit_smem()

      @pl.when(step + stages < per)
      def _():
        fetch(step + stages, slot)

      return carry

    g, sumd, kp = lax.fori_loop(0, per, tile, (tuple(zero for _ in range(n_state)), zero, zero + 1.0))
    for j in range(n_state):
      refs["gloc"][b, sp, j, cols] = g[j]
      refs["dec"][b, sp, j, cols] = jnp.exp2(a2[j] * sumd) * kp

  call = _launch((cfg.nblk, cfg.batch, cfg.segments - 1), ("d", "b", "s"),
                 "selective_scan_adjoint_local", body, out_type=(st, st), scratch_types=smem)
  return call(*(arrays[k] for k in ins))


@functools.partial(jax.jit, static_argnums=(0,))
def _backward_call(cfg: Cfg, dt, u, dy, bm, cm, keep, a2t, states, gin):
  """Returns ddt, du [B, Lp, D] f32; dbc [B, nblk, Lp * 2N] f32 (per token dC then dB, this
  block's channels); da [B, S, N, D] (w.r.t. A * log2 e, times ln 2 already: w.r.t. A);
  gstart [B, S, N, D] (the cotangent of the state entering each segment)."""
  n_state, per, nblk = cfg.dstate, cfg.per, cfg.nblk
  width = 2 * n_state
  nsub = CHUNK // SUB
  row_words = CHUNK * width
  tiles = ["dt", "u", "dy", "bm", "cm"] + (["keep"] if cfg.resets else [])
  ins = tiles + ["a2t", "states", "gin"]
  arrays = dict(dt=dt, u=u, dy=dy, bm=bm, cm=cm, keep=keep, a2t=a2t, states=states, gin=gin)
  outs = ["ddt", "du", "dbc", "da", "gstart"]
  big = jax.ShapeDtypeStruct((cfg.batch, cfg.seq_len, cfg.dim), _F32)
  st = jax.ShapeDtypeStruct((cfg.batch, cfg.segments, n_state, cfg.dim), _F32)
  out_types = (big, big, jax.ShapeDtypeStruct((cfg.batch, nblk, cfg.seq_len * width), _F32), st, st)
  stages = min(BWD_STAGES, per)
  smem = _smem(cfg, tiles, dict(dt=dt.dtype, u=u.dtype, dy=dy.dtype), stages)
  smem["subs"] = plgpu.SMEM((nsub, n_state, BLOCK_D), _F32)
  smem["part"] = plgpu.SMEM((2, _WARPS, row_words), _F32)
  red_layout = plgpu.Layout.WG_STRIDED((row_words,), vec_size=1)

  def body(*refs_in, **scratch):
    refs = dict(zip(ins + outs, refs_in))
    refs.update(scratch)
    bars, subs, part = scratch["bars"], scratch["subs"], scratch["part"]
    di, b, seg = lax.axis_index("d"), lax.axis_index("b"), lax.axis_index("s")
    cols = pl.ds(di * BLOCK_D, BLOCK_D)
    last = seg * per + per - 1

    def fetch(step, slot):
      _fetch(refs, tiles, b, pl.ds((last - step) * CHUNK, CHUNK), cols, slot, bars.at[slot])

    for i in range(stages):
      fetch(i, i)
    a2 = [_vec(refs["a2t"].at[j, cols]) for j in range(n_state)]
    zero = 0.0 * a2[0]
    g0 = tuple(_vec(refs["gin"].at[b, seg, j, cols]) for j in range(n_state))
    da0 = tuple(zero for _ in range(n_state))

    def tile(step, carry):
      n = last - step
      slot = lax.rem(step, stages)
      par = lax.rem(step, 2)
      plgpu.barrier_wait(bars.at[slot])
      tl = {k: refs[k + "_s"].at[slot] for k in ("dt", "u", "dy", "bm", "cm")}

      def inputs(t):
        delta = _vec(tl["dt"].at[t])
        uu = _vec(tl["u"].at[t]).astype(_F32)
        keep_t = refs["keep_s"][slot, t] if cfg.resets else None
        dec = []
        for j in range(n_state):
          a = jnp.exp2(delta * a2[j])
          dec.append(a * keep_t if cfg.resets else a)
        return delta, uu, delta * uu, dec

      def advance(h, t, dec, du):
        return [a * hj + du * tl["bm"][t, j] for j, (a, hj) in enumerate(zip(dec, h))]

      # Pass 1: the state entering every sub-tile, in this thread's column of `subs`.
      def sub_entry(s, h):
        h = list(h)
        for j in range(n_state):
          subs[s, j, :] = h[j]
        for r in range(SUB):
          t = s * SUB + r
          _, _, du, dec = inputs(t)
          h = advance(h, t, dec, du)
        return tuple(h)

      h = tuple(_vec(refs["states"].at[b, n, j, cols]) for j in range(n_state))
      h = lax.fori_loop(0, nsub - 1, sub_entry, h)
      for j in range(n_state):
        subs[nsub - 1, j, :] = h[j]

      # Pass 2: per sub-tile, last first: its states and decays in registers, then the adjoint.
      def sub_back(i, carry):
        g, da = (list(c) for c in carry)
        s = nsub - 1 - i
        h = [_vec(subs.at[s, j]) for j in range(n_state)]
        hist = []
        for r in range(SUB):
          t = s * SUB + r
          delta, uu, du, dec = inputs(t)
          hist.append((delta, uu, du, dec, h))
          if r + 1 < SUB:
            h = advance(h, t, dec, du)
        pending = {}
        for r in reversed(range(SUB)):
          t = s * SUB + r
          tok = n * CHUNK + t
          delta, uu, du, dec, hp = hist[r]
          hist[r] = None
          dy = _vec(tl["dy"].at[t])
          ddu = zero
          dda = zero
          for j in range(n_state):
            cj = tl["cm"][t, j]
            bj = tl["bm"][t, j]
            ht = dec[j] * hp[j] + du * bj
            gh = dy * cj + g[j]
            pending[r * width + j] = dy * ht  # dC_t[j] terms
            pending[r * width + n_state + j] = gh * du  # dB_t[j] terms
            ddu = ddu + gh * bj
            g[j] = gh * dec[j]
            gad = g[j] * hp[j]
            da[j] = da[j] + gad * delta
            dda = dda + gad * a2[j]
          refs["ddt"][b, tok, cols] = dda * _LN2 + ddu * uu
          refs["du"][b, tok, cols] = ddu * delta
          # Flush each complete row of 32 products (tokens of this sub-tile, in token order).
          lo = r * width
          if lo % _WARP == 0:
            for base in range(lo, SUB * width, _WARP):
              if all(k in pending for k in range(base, base + _WARP)):
                vals = [pending.pop(k) for k in range(base, base + _WARP)]
                off = s * (SUB * width) + base
                _warp_sums_store(part.at[par, :, pl.ds(off, _WARP)], *vals)
        assert not pending
        return tuple(g), tuple(da)

      carry = lax.fori_loop(0, nsub, sub_back, carry)
      # All threads are done with this slot and have stored their warp sums.
      plgpu.commit_smem()

      @pl.when(step + stages < per)
      def _():
        fetch(step + stages, slot)

      total = None
      for w in range(_WARPS):
        p = plgpu.load(part.at[par, w], layout=red_layout, optimized=False)
        total = p if total is None else total + p
      refs["dbc"][b, di, pl.ds(n * row_words, row_words)] = total
      return carry

    g, da = lax.fori_loop(0, per, tile, (g0, da0))
    for j in range(n_state):
      refs["gstart"][b, seg, j, cols] = g[j]
      refs["da"][b, seg, j, cols] = da[j]

  call = _launch((nblk, cfg.batch, cfg.segments), ("d", "b", "s"), "selective_scan_bwd", body,
                 out_type=out_types, scratch_types=smem)
  return call(*(arrays[k] for k in ins))


# ----------------------------------------------------------------------------- wrapper


def _chain_forward(h0t, hloc, dec):
  """State entering each segment [B, S, N, D] from h0 and the segments' local scans."""
  hin = [h0t]
  for s in range(hloc.shape[1]):
    hin.append(hloc[:, s] + dec[:, s] * hin[-1])
  return jnp.stack(hin, axis=1)


def _prepare(cfg: Cfg, l, u, dt, A, Bm, Cm, keep):
  pad = cfg.seq_len - l
  tp = lambda x, v=0.0: x if pad == 0 else jnp.pad(
      x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=v)
  # Padded tokens leave the state unchanged: dt = 0 (decay 1, input 0) and no reset (keep 1).
  return (tp(dt.astype(_F32)), tp(u), tp(Bm.astype(_F32)), tp(Cm.astype(_F32)),
          None if keep is None else tp(keep, 1.0), (A.astype(_F32) * _LOG2E).T)


def _forward(cfg: Cfg, l, u, dt, A, Bm, Cm, h0, keep):
  dt_p, u_p, bm_p, cm_p, keep_p, a2t = _prepare(cfg, l, u, dt, A, Bm, Cm, keep)
  h0t = jnp.swapaxes(h0.astype(_F32), 1, 2)
  if cfg.segments > 1:
    hloc, dec = _forward_call(cfg, True, dt_p, u_p, bm_p, cm_p, keep_p, a2t, None)
    hin = _chain_forward(h0t, hloc, dec)
  else:
    hin = h0t[:, None]
  y, states, hend = _forward_call(cfg, False, dt_p, u_p, bm_p, cm_p, keep_p, a2t, hin)
  out = (y[:, :l], jnp.swapaxes(hend[:, -1], 1, 2))
  return out, (dt_p, u_p, bm_p, cm_p, keep_p, a2t, states)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _scan(cfg, l, u, dt, A, Bm, Cm, h0, keep):
  return _forward(cfg, l, u, dt, A, Bm, Cm, h0, keep)[0]


def _scan_fwd(cfg, l, u, dt, A, Bm, Cm, h0, keep):
  out, res = _forward(cfg, l, u, dt, A, Bm, Cm, h0, keep)
  return out, (res, keep)


def _scan_bwd(cfg, l, res, cts):
  (dt_p, u_p, bm_p, cm_p, keep_p, a2t, states), keep = res
  dy, dfinal = cts
  pad = cfg.seq_len - l
  dy = dy.astype(_F32)
  dy = dy if pad == 0 else jnp.pad(dy, [(0, 0), (0, pad), (0, 0)])
  dfin_t = jnp.swapaxes(dfinal.astype(_F32), 1, 2)
  if cfg.segments > 1:
    gloc, dec = _adjoint_local_call(cfg, dt_p, dy, cm_p, keep_p, a2t)
    gin = [dfin_t]  # the cotangent at the end of segment S-1, then S-2, ...
    for s in range(cfg.segments - 1, 0, -1):  # entering segment s = ending segment s - 1
      gin.append(gloc[:, s - 1] + dec[:, s - 1] * gin[-1])
    gin = jnp.stack(gin[::-1], axis=1)
  else:
    gin = dfin_t[:, None]
  ddt, du, dbc, da, gstart = _backward_call(cfg, dt_p, u_p, dy, bm_p, cm_p, keep_p, a2t, states, gin)
  n = cfg.dstate
  dbc = jnp.sum(dbc, axis=1).reshape(cfg.batch, cfg.seq_len, 2, n)[:, :l]
  du_t, dt_t, a_t, b_t, c_t, h_t = cfg.dtypes
  dA = jnp.sum(da, axis=(0, 1)).T
  return (du[:, :l].astype(du_t), ddt[:, :l].astype(dt_t), dA.astype(a_t),
          dbc[:, :, 1].astype(b_t), dbc[:, :, 0].astype(c_t),
          jnp.swapaxes(gstart[:, 0], 1, 2).astype(h_t),
          None if keep is None else jnp.zeros_like(keep))


_scan.defvjp(_scan_fwd, _scan_bwd)


def unsupported(call: dict) -> str | None:
  """None where the GPU tests cover the call, else the reason."""
  if not_on_hopper(call) is not None:
    return "the Mosaic GPU selective scan needs a Hopper GPU (sm_90)"
  u, A = call["u"], call["A"]
  if u.shape[-1] % BLOCK_D:
    return f"D = {u.shape[-1]} (needs a multiple of {BLOCK_D})"
  if A.shape[-1] not in D_STATES:
    return f"d_state = {A.shape[-1]} (needs one of {D_STATES})"
  if u.dtype not in (jnp.bfloat16, jnp.float32):
    return f"u of dtype {u.dtype} (bf16 or f32)"
  return None


def selective_scan_pallas(u, dt, A, Bm, Cm, h0, resets, *, chunk=None, segments=None):
  """The kernel path: same contract as `selective_scan_reference` (dt biased/softplussed;
  returns C.h [B, L, D] float32 and the final state [B, D, N] float32). `chunk` is the XLA
  path's knob, ignored (the kernel tiles by CHUNK); `segments` overrides the split."""
  del chunk
  b, l, d = u.shape
  n = A.shape[1]
  if d % BLOCK_D or n not in D_STATES:
    raise ValueError(f"selective_scan pallas: D={d} (multiple of {BLOCK_D}), N={n} ({D_STATES})")
  nc = -(-l // CHUNK)
  nblk = d // BLOCK_D
  segs = num_segments(nblk, b, nc) if segments is None else segments
  # Pad to a whole number of segments of whole tiles.
  nc = -(-nc // segs) * segs
  cfg = Cfg(batch=b, num_chunks=nc, dim=d, dstate=n, segments=segs, resets=resets is not None,
            dtypes=tuple(jnp.dtype(x.dtype).name for x in (u, dt, A, Bm, Cm, h0)))
  keep = None if resets is None else jnp.where(resets, 0.0, 1.0).astype(_F32)
  return _scan(cfg, l, *same_vma(u, dt, A, Bm, Cm, h0, keep))
