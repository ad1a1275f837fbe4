"""Chunked linear attention for Hopper in Mosaic GPU (scalar decay forms).

Registered as `impl="pallas"` of `linear_attention` (see `kernels/linear_attention.py` for the
API, the float32 reference and the XLA path). Per chunk of C = 64 tokens, with G the chunk-local
cumulative log decay (log2 units here), S the state entering the chunk (held transposed,
S^T [Dv, Dk], float32), `cin` / `tail` the packed-document masks (below):

    o     = scale * ((q k^T) * exp2(G_i - G_j) [j <= i, same run]) v + scale * exp2(G) cin q S
    S^T' = exp2(G_last) cin_last S^T + (v * exp2(G_last - G) tail)^T k

Forward: one CTA per (batch, head, 64 value columns) walks the chunks in order with three
warpgroups: a memory warpgroup streams q, k, v and the decay through an SMEM ring (TMA), the
state warpgroup runs only the serial chain (publishes S^T per chunk, updates it on the tensor
cores), the output warpgroup forms the chunk's scores and output meanwhile. Every exponent is
<= 0 on the pairs it is used for (masked before exp2), so no decay, however strong, overflows.

Backward (`jax.custom_vjp`): the forward also stores S^T entering every chunk (input dtype);
a reverse state pass (same structure, q and dO in place of k and v) gives dS^T leaving every
chunk and the initial state's gradient; the chunk-parallel rest (dq, dk, dv, the decay
gradient) is batched XLA over chunks.

Packed documents (resets) as three [B, Tp] float32 vectors: `run` (chunk-local run id; pairs
of one run see each other), `cin` (the token belongs to the run active when its chunk starts:
it sees the incoming state), `tail` (the token belongs to its chunk's last run: it writes the
outgoing state). The state survives a chunk iff `cin` of its last token is 1.

Keys and values may have fewer heads than queries (GQA): query head h reads head h // group.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from longax.kernels._vma import same_vma, vary_like
from longax.kernels.gpu import kernel, not_on_hopper

LOG2E = math.log2(math.e)
C = 64  # tokens per chunk: the M of every wgmma tile
BV = 64  # value columns per CTA
HEAD_DIMS = (64, 128)  # Dk and Dv the GPU tests cover
MIN_PIECE_CHUNKS = 8  # the sequence split's shortest piece
MAX_SPLIT_CTAS = 16  # the sequence split runs only with this few (batch, head, value block) rows
PER_KEY_BOUND = 20.0  # per-key decay: a chunk decaying less (nats) runs on the scalar kernels (at 60, dG lost bf16 tolerance)
F32 = jnp.float32
_WG = plgpu.Layout.WGMMA
_ROWS = _WG.reduce(1)  # one value per row of a WGMMA tile
_COLS = _WG.reduce(0)  # one value per column


@dataclasses.dataclass(frozen=True)
class Config:
  """Pipeline depth of the forward and of the reverse state pass; the backward's
  chunk-parallel part as a kernel (True) or batched XLA."""
  stages: int = 2
  bwd_stages: int = 2
  grads_kernel: bool = True
  pieces: int | None = None  # sequence split of the state passes (None: `pieces_for`)
  bounded_per_key: bool = True  # per-key decay on the scalar kernels where chunks allow


TUNED = Config()

# ----------------------------------------------------------------------------- tile math


def _tiles(dtype, *shape):
  """SMEM tiled and swizzled for TMA and wgmma (16-bit, minor dim a multiple of 64)."""
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


def _stream(issue, n: int, stages: int, free):
  """A memory warpgroup's ring: issue(i, slot) loads chunk i (0..n-1) into one of `stages`
  SMEM slots, a slot refilled once its readers arrive on free[slot]; then it waits for the
  last releases (the CTA's SMEM must outlive every read)."""
  for i in range(min(stages, n)):
    issue(i, i)

  @pl.loop(stages, n)
  def _refill(i):
    slot = lax.rem(i, stages)
    plgpu.barrier_wait(free.at[slot])
    issue(i, slot)

  for i in range(max(n - stages, 0), n):
    plgpu.barrier_wait(free.at[i % stages])


def _pad_time(x, tp: int):
  """x [B, T, ...] zero-padded along T to tp tokens."""
  return jnp.pad(x, [(0, 0), (0, tp - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def _bcast(vec, shape, dim):
  """A row (dim=0) or column (dim=1) vector broadcast to a WGMMA tile."""
  return plgpu.layout_cast(lax.broadcast_in_dim(vec, shape, [dim]), _WG)


def _mm(a, b, shape, init=None):
  """init + a @ b on the tensor cores (a: SMEM ref or 16-bit WGMMA registers, b: SMEM ref).
  The optimization barrier keeps LLVM from reading the accumulator before its wgmma wait."""
  if init is None:
    def scoped(acc):
      plgpu.wgmma(acc, a, b)
      return acc[...]
    out = pl.run_scoped(scoped, plgpu.ACC(shape, F32))
  else:
    def body(acc):
      plgpu.wgmma(acc, a, b)
    out = pl.run_state(body)(plgpu.ACC.init(init))
  return lax.optimization_barrier(out)


def _decay_tile(g_row, g_col, seg_rows=None, seg_cols=None, *, transposed=False):
  """[C, C] exp2(G_i - G_j) on visible pairs (j <= i, same run), 0 elsewhere; rows are i
  (or j when `transposed`). Masked before exp2: nothing overflows."""
  shape = (C, C)
  rows = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=_WG)
  cols = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=_WG)
  keep = rows <= cols if transposed else rows >= cols
  if seg_rows is not None:
    keep = keep & (_bcast(seg_rows, shape, 0) == _bcast(seg_cols, shape, 1))
  diff = _bcast(g_row, shape, 0) - _bcast(g_col, shape, 1)
  return jnp.exp2(jnp.where(keep, -diff if transposed else diff, -jnp.inf))


class Segs(NamedTuple):
  run: jax.Array  # [B, Tp] float32 chunk-local run id
  cin: jax.Array  # [B, Tp] float32 1: sees the incoming state
  tail: jax.Array  # [B, Tp] float32 1: writes the outgoing state


def segment_vectors(resets, tp: int, span: int = C) -> Segs:
  """Segs from resets [B, T] bool (the state is zeroed before token t) for spans of `span`
  tokens (a chunk, or a piece of the sequence split); padding joins the last run."""
  b = resets.shape[0]
  r = _pad_time(resets, tp).astype(jnp.int32).reshape(b, tp // span, span)
  runs = jnp.cumsum(r.reshape(b, tp), axis=1).reshape(b, tp // span, span)
  entering = runs[:, :, :1] - r[:, :, :1]  # the run of the token before the chunk
  flat = lambda x: x.astype(F32).reshape(b, tp)
  return Segs(flat(runs - entering), flat(runs == entering), flat(runs == runs[:, :, -1:]))


# ------------------------------------------------------------------------------- forward


def _forward(q, k, v, decay, segs: Segs | None, h0t, *, scale: float, store_states: bool,
             stages: int, pieces: int = 1, gamma_after=None):
  """q [B, Tp, H, Dk], k [B, Tp, Hk, Dk], v [B, Tp, Hv, Dv] (Tp % C == 0, H % Hk = H % Hv =
  0); h0t [B, H, Dv, Dk] float32. `decay` is either
    g2 [B, H, Tp] float32, the chunk-local cumulative log2 decay (scalar forms), or
    (gamma [B, H, Tp / C, Dk] float32, a [B, H, Tp, C]) for per-key decay: the decay is
      folded into q and k by the caller (q exp(G) cin scale, k exp(G_last - G) tail), a holds
      each chunk's scores (scaled, masked) and gamma the chunk's decay per key; segs is None.
  `gamma_after` [B, H, Tp / C, Dk] float32 (scalar form only): the state update ends with a
  per-key decay, S^T' = (scalar update) * gamma (per column): per-key decay whose chunks fit
  exp's range, with q = q exp(G), k = k exp(-G) (see `_bounded_fwd`).
  With `pieces` P > 1 every sequence is cut into P pieces that run in parallel CTAs, each from
  its own initial state: h0t is then [B * P, H, Dv, Dk] (row b * P + p: piece p of batch b)
  and so is the final state returned (each piece's end).
  Returns o [B, Tp, H, Dv], the final state S^T [B, H, Dv, Dk] float32 and, with
  `store_states`, S^T entering every chunk [B, H, Tp / C, Dv, Dk] (input dtype)."""
  bsz, tp, heads, dk = q.shape
  dv = v.shape[-1]
  k_group, v_group, n_chunks, dtype = heads // k.shape[2], heads // v.shape[2], tp // C, q.dtype
  npc = n_chunks // pieces  # chunks per piece
  per_key = isinstance(decay, tuple)
  has_segs = segs is not None
  after = gamma_after is not None
  n_copies = 5 + 4 * has_segs + after

  def body(*refs):
    q_ref, k_ref, v_ref = refs[:3]
    g_ref, gamma_ref, a_ref = (None, *refs[3:5]) if per_key else (refs[3], None, None)
    refs = refs[4 + per_key:]
    run_ref, cin_ref, tail_ref = refs[:3] if has_segs else (None,) * 3
    refs = refs[3 * has_segs:]
    after_ref = refs[0] if after else None
    refs = refs[after:]
    h0_ref, o_ref, final_ref = refs[:3]
    refs = refs[3:]
    states_ref = refs[0] if store_states else None
    # A vector read in two layouts (rows, columns) has one SMEM copy per layout: Mosaic GPU's
    # layout inference fails on one buffer loaded both ways.
    # (per-key: g_s holds gamma [Dk], g_r the scores [C, C])
    (q_s, k_s, v_s, g_s, g_r, run_r, run_c, cin_s, tail_s, s_pub, o_out, s32, after_s), bars = refs[-2:]
    in_bar, in_free, s_ready, s_free, h0_bar, done = bars
    bp, h, iv = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("v")
    b, c0 = lax.div(bp, pieces), lax.rem(bp, pieces) * npc  # batch row, the piece's first chunk
    hk, hv, v0, wg = lax.div(h, k_group), lax.div(h, v_group), iv * BV, lax.axis_index("wg")

    @pl.when(wg == 2)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")

      def issue(n, slot):
        rows, bar = pl.ds((c0 + n) * C, C), in_bar.at[slot]
        plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_s.at[slot], bar)
        plgpu.copy_gmem_to_smem(k_ref.at[b, rows, hk], k_s.at[slot], bar)
        plgpu.copy_gmem_to_smem(v_ref.at[b, rows, hv, pl.ds(v0, BV)], v_s.at[slot], bar)
        if per_key:
          plgpu.copy_gmem_to_smem(gamma_ref.at[b, h, c0 + n], g_s.at[slot], bar)
          plgpu.copy_gmem_to_smem(a_ref.at[b, h, rows], g_r.at[slot], bar)
        else:
          plgpu.copy_gmem_to_smem(g_ref.at[b, h, rows], g_s.at[slot], bar)
          plgpu.copy_gmem_to_smem(g_ref.at[b, h, rows], g_r.at[slot], bar)
        if has_segs:
          for src, dst in ((run_ref, run_r), (run_ref, run_c), (cin_ref, cin_s),
                           (tail_ref, tail_s)):
            plgpu.copy_gmem_to_smem(src.at[b, rows], dst.at[slot], bar)
        if after:
          plgpu.copy_gmem_to_smem(after_ref.at[b, h, c0 + n], after_s.at[slot], bar)

      _stream(issue, npc, stages, in_free)

    @pl.when(wg == 0)
    def _state():
      plgpu.set_max_registers(232, action="increase")
      plgpu.copy_gmem_to_smem(h0_ref.at[bp, h, pl.ds(v0, BV)], s32, h0_bar)
      plgpu.barrier_wait(h0_bar)
      s0 = plgpu.load(s32, layout=_WG)

      def step(n, s_t):  # s_t: S^T [BV, Dk] float32 entering chunk n
        slot, half = lax.rem(n, stages), lax.rem(n, 2)
        plgpu.barrier_wait(in_bar.at[slot])

        @pl.when(n >= 2)
        def _():  # the output warpgroup has read the state published two chunks ago
          plgpu.barrier_wait(s_free.at[half])

        if store_states:
          plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # chunk n - 2's state was sent
        s_pub.at[half][...] = s_t.astype(dtype)
        plgpu.commit_smem()
        plgpu.barrier_arrive(s_ready.at[half])
        if store_states:
          plgpu.copy_smem_to_gmem(s_pub.at[half], states_ref.at[b, h, c0 + n, pl.ds(v0, BV)])
        if per_key:  # S^T' = S^T gamma (per column) + v^T k~
          gamma = _bcast(plgpu.load(g_s.at[slot], layout=_COLS), (BV, dk), 1)
          vd = plgpu.load(v_s.at[slot].T, layout=_WG)
          s_new = _mm(vd, k_s.at[slot], (BV, dk), init=s_t * gamma)
        else:
          g_last = g_s[slot, C - 1]
          v_decay = jnp.exp2(g_last - plgpu.load(g_s.at[slot], layout=_COLS))
          s_decay = jnp.exp2(g_last)
          if has_segs:
            v_decay = v_decay * plgpu.load(tail_s.at[slot], layout=_COLS)
            s_decay = s_decay * cin_s[slot, C - 1]
          v_t = plgpu.load(v_s.at[slot].T, layout=_WG).astype(F32)  # [BV, C]
          vd = (v_t * _bcast(v_decay, (BV, C), 1)).astype(dtype)
          s_new = _mm(vd, k_s.at[slot], (BV, dk), init=s_t * s_decay)
          if after:
            s_new = s_new * _bcast(plgpu.load(after_s.at[slot], layout=_COLS), (BV, dk), 1)
        plgpu.barrier_arrive(in_free.at[slot])
        return s_new

      s_t = lax.fori_loop(0, npc, step, s0)
      for n in range(max(npc - 2, 0), npc):  # the last releases of s_pub
        plgpu.barrier_wait(s_free.at[n % 2])
      s32[...] = s_t
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(s32, final_ref.at[bp, h, pl.ds(v0, BV)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 1)
    def _output():
      plgpu.set_max_registers(232, action="increase")

      def step(n, carry):
        slot, half = lax.rem(n, stages), lax.rem(n, 2)
        plgpu.barrier_wait(in_bar.at[slot])
        if per_key:  # o = q~ S + a v, scale folded in by the caller
          plgpu.barrier_wait(s_ready.at[half])
          o = _mm(q_s.at[slot], s_pub.at[half].T, (C, BV))
          o = _mm(g_r.at[slot], v_s.at[slot], (C, BV), init=o)
          finish(n, slot, half, o)
          return carry
        g_row = plgpu.load(g_r.at[slot], layout=_ROWS)
        g_col = plgpu.load(g_s.at[slot], layout=_COLS)
        q_decay = jnp.exp2(g_row)
        seg_rows = seg_cols = None
        if has_segs:
          seg_rows = plgpu.load(run_r.at[slot], layout=_ROWS)
          seg_cols = plgpu.load(run_c.at[slot], layout=_COLS)
          q_decay = q_decay * plgpu.load(cin_s.at[slot], layout=_ROWS)
        p = _mm(q_s.at[slot], k_s.at[slot].T, (C, C))
        p16 = (p * _decay_tile(g_row, g_col, seg_rows, seg_cols)).astype(dtype)
        plgpu.barrier_wait(s_ready.at[half])
        o = _mm(q_s.at[slot], s_pub.at[half].T, (C, BV))
        o = _mm(p16, v_s.at[slot], (C, BV), init=o * _bcast(q_decay, (C, BV), 0))
        finish(n, slot, half, o * scale)
        return carry

      def finish(n, slot, half, o):
        plgpu.barrier_arrive(s_free.at[half])
        plgpu.barrier_arrive(in_free.at[slot])
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # o_out[half] of chunk n - 2 was sent
        o_out.at[half][...] = o.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_out.at[half], o_ref.at[b, pl.ds((c0 + n) * C, C), h, pl.ds(v0, BV)])

      lax.fori_loop(0, npc, step, None)
      plgpu.wait_smem_to_gmem(0)

    # Every warpgroup waits for the others before it exits.
    plgpu.barrier_arrive(done)
    plgpu.barrier_wait(done)

  vec = plgpu.SMEM((stages, C), F32)
  g_bufs = ((plgpu.SMEM((stages, dk), F32), _tiles(dtype, stages, C, C)) if per_key
            else (vec, vec))
  smem = (_tiles(dtype, stages, C, dk), _tiles(dtype, stages, C, dk), _tiles(dtype, stages, C, BV),
          *g_bufs, vec, vec, vec, vec, _tiles(dtype, 2, BV, dk), _tiles(dtype, 2, C, BV),
          plgpu.SMEM((BV, dk), F32), plgpu.SMEM((stages, dk), F32))
  bars = (plgpu.Barrier(num_arrivals=n_copies, num_barriers=stages),
          plgpu.Barrier(num_arrivals=2, num_barriers=stages),
          plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=2),
          plgpu.Barrier(), plgpu.Barrier(num_arrivals=3))
  out_type = [jax.ShapeDtypeStruct((bsz, tp, heads, dv), dtype),
              jax.ShapeDtypeStruct((bsz * pieces, heads, dv, dk), F32)]
  if store_states:
    out_type.append(jax.ShapeDtypeStruct((bsz, heads, n_chunks, dv, dk), dtype))
  args = [q, k, v, *(decay if per_key else [decay])] + (list(segs) if has_segs else [])
  args += ([gamma_after] if after else []) + [h0t]
  outs = kernel(
      body, out_type=out_type, scratch_types=[smem, bars], grid=(bsz * pieces, heads, dv // BV),
      grid_names=("b", "h", "v"), num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(*args)
  return outs[0], outs[1], (outs[2] if store_states else None)


# ------------------------------------------------------------------------------ backward


def _reverse_states(q, do, decay, segs: Segs | None, dfinal_t, *, scale: float, stages: int,
                    pieces: int = 1):
  """The reverse state pass: D^T = dL/dS^T leaving each chunk, walking the chunks backwards,

      D^T_{c-1} = exp2(G_last) cin_last D^T_c + scale (dO * exp2(G) cin)^T q     (chunk c)

  q [B, Tp, H, Dk], do [B, Tp, H, Dv], decay: g2 [B, H, Tp] (scalar forms) or, per-key,
  gamma [B, H, Tp / C, Dk] with q = q~ (decay, segments and scale folded in: D^T_{c-1} =
  D^T_c gamma_c + dO^T q~); dfinal_t [B, H, Dv, Dk] float32.
  With `pieces` P > 1: dfinal_t [B * P, H, Dv, Dk] is D^T leaving each piece, and the second
  result is each piece's gradient at its start (as `_forward`'s pieces).
  Returns (D^T leaving every chunk [B, H, Tp / C, Dv, Dk] input dtype, the initial state's
  gradient, transposed, [B, H, Dv, Dk] float32)."""
  bsz, tp, heads, dk = q.shape
  dv = do.shape[-1]
  n_chunks, dtype = tp // C, q.dtype
  npc = n_chunks // pieces
  per_key = decay.ndim == 4
  has_segs = segs is not None
  n_copies = 3 + has_segs

  def body(*refs):
    q_ref, do_ref, g_ref = refs[:3]  # g_ref: gamma when per_key
    refs = refs[3:]
    cin_ref = refs[0] if has_segs else None
    refs = refs[has_segs:]
    df_ref, d_ref, dh0_ref = refs[:3]
    (q_s, do_s, g_s, cin_s, d_pub, s32), (in_bar, in_free, d_bar) = refs[-2:]
    bp, h, iv = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("v")
    b, c_last = lax.div(bp, pieces), lax.rem(bp, pieces) * npc + npc - 1  # the piece's last chunk
    v0, wg = iv * BV, lax.axis_index("wg")

    @pl.when(wg == 1)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")

      def issue(i, slot):  # i: steps taken; chunk c_last - i
        rows, bar = pl.ds((c_last - i) * C, C), in_bar.at[slot]
        plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_s.at[slot], bar)
        plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h, pl.ds(v0, BV)], do_s.at[slot], bar)
        plgpu.copy_gmem_to_smem(g_ref.at[b, h, c_last - i] if per_key
                                else g_ref.at[b, h, rows], g_s.at[slot], bar)
        if has_segs:
          plgpu.copy_gmem_to_smem(cin_ref.at[b, rows], cin_s.at[slot], bar)

      _stream(issue, npc, stages, in_free)

    @pl.when(wg == 0)
    def _state():
      plgpu.set_max_registers(232, action="increase")
      plgpu.copy_gmem_to_smem(df_ref.at[bp, h, pl.ds(v0, BV)], s32, d_bar)
      plgpu.barrier_wait(d_bar)
      d0 = plgpu.load(s32, layout=_WG)

      def step(i, d_t):
        slot, half = lax.rem(i, stages), lax.rem(i, 2)
        n = c_last - i
        plgpu.barrier_wait(in_bar.at[slot])
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # step i - 2's tile was sent
        d_pub.at[half][...] = d_t.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(d_pub.at[half], d_ref.at[b, h, n, pl.ds(v0, BV)])
        if per_key:
          gamma = _bcast(plgpu.load(g_s.at[slot], layout=_COLS), (BV, dk), 1)
          dw = plgpu.load(do_s.at[slot].T, layout=_WG)
          d_new = _mm(dw, q_s.at[slot], (BV, dk), init=d_t * gamma)
          plgpu.barrier_arrive(in_free.at[slot])
          return d_new
        g = plgpu.load(g_s.at[slot], layout=_COLS)
        w = jnp.exp2(g) * scale
        carry = jnp.exp2(g_s[slot, C - 1])
        if has_segs:
          w = w * plgpu.load(cin_s.at[slot], layout=_COLS)
          carry = carry * cin_s[slot, C - 1]
        do_t = plgpu.load(do_s.at[slot].T, layout=_WG).astype(F32)  # [BV, C]
        dw = (do_t * _bcast(w, (BV, C), 1)).astype(dtype)
        d_new = _mm(dw, q_s.at[slot], (BV, dk), init=d_t * carry)
        plgpu.barrier_arrive(in_free.at[slot])
        return d_new

      d_t = lax.fori_loop(0, npc, step, d0)
      s32[...] = d_t
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(s32, dh0_ref.at[bp, h, pl.ds(v0, BV)])
      plgpu.wait_smem_to_gmem(0)

  vec = plgpu.SMEM((stages, C), F32)
  smem = (_tiles(dtype, stages, C, dk), _tiles(dtype, stages, C, BV),
          plgpu.SMEM((stages, dk), F32) if per_key else vec, vec,
          _tiles(dtype, 2, BV, dk), plgpu.SMEM((BV, dk), F32))
  bars = (plgpu.Barrier(num_arrivals=n_copies, num_barriers=stages),
          plgpu.Barrier(num_barriers=stages), plgpu.Barrier())
  args = [q, do, decay] + ([segs.cin] if has_segs else []) + [dfinal_t]
  d, dh0 = kernel(
      body,
      out_type=[jax.ShapeDtypeStruct((bsz, heads, n_chunks, dv, dk), dtype),
                jax.ShapeDtypeStruct((bsz * pieces, heads, dv, dk), F32)],
      scratch_types=[smem, bars], grid=(bsz * pieces, heads, dv // BV), grid_names=("b", "h", "v"),
      num_threads=2, thread_name="wg", compiler_params=plgpu.CompilerParams(approx_math=True),
  )(*args)
  return d, dh0


def _chunk_grads_kernel(q, k, v, do, g2, segs: Segs | None, states_t, d_t, *, scale: float,
                        late=None):
  """The chunk-parallel backward, one CTA per (chunk, head, batch), one warpgroup:

      dq = (dO v^T * M) k + scale exp2(G) cin (dO S^T)
      dk = (v dO^T * M^T) q + exp2(G_last - G) tail (v D^T)
      dv = (k q^T * M^T) dO + exp2(G_last - G) tail (k D)

  M = scale exp2(G_i - G_j) on visible pairs. q, k, v, do [B, Tp, H, D] (k, v per query
  head); states_t (S^T entering) and d_t (D^T leaving) [B, H, N, Dv, Dk]. Returns dq, dk, dv
  (input dtype), dG2 without the chunk-decay term [B, H, Tp] (q.dq - k.dk, log2 units / ln2
  applied by the caller) and k.dk_state [B, H, Tp] (the caller's chunk-decay term).
  `late` (the split backward, `split_grads`): (Gamma [B, H, Tp] float32, each chunk's value
  on its tokens; dF^T [B, H, Dv, Dk] input dtype): chunk c's D^T is d_t + Gamma_c dF^T."""
  bsz, tp, heads, dk = q.shape
  dv = v.shape[-1]
  n_chunks, dtype = tp // C, q.dtype
  has_segs, has_late = segs is not None, late is not None

  def body(*refs):
    q_ref, k_ref, v_ref, do_ref, g_ref, s_ref, d_ref = refs[:7]
    refs = refs[7:]
    run_ref, cin_ref, tail_ref = refs[:3] if has_segs else (None,) * 3
    refs = refs[3 * has_segs:]
    gam_ref, f_ref = refs[:2] if has_late else (None, None)
    refs = refs[2 * has_late:]
    dq_ref, dk_ref, dv_ref, dg_ref, kd_ref = refs[:5]
    (q_s, k_s, v_s, do_s, s_s, d_s, g_r, g_c, run_r, run_c, cin_r, tail_r, dqk_out, dv_out,
     dg_s, kd_s, gam_s, f_s), (bar, bar_d) = refs[-2:]
    n, h, b = lax.axis_index("n"), lax.axis_index("h"), lax.axis_index("b")
    rows = pl.ds(n * C, C)
    copies = [(q_ref.at[b, rows, h], q_s), (k_ref.at[b, rows, h], k_s),
              (v_ref.at[b, rows, h], v_s), (do_ref.at[b, rows, h], do_s),
              (s_ref.at[b, h, n], s_s), (g_ref.at[b, h, rows], g_r), (g_ref.at[b, h, rows], g_c)]
    if has_segs:
      copies += [(run_ref.at[b, rows], run_r), (run_ref.at[b, rows], run_c),
                 (cin_ref.at[b, rows], cin_r), (tail_ref.at[b, rows], tail_r)]
    later = [(d_ref.at[b, h, n], d_s)]  # needed from dk on: their loads overlap dq's math
    if has_late:
      later += [(gam_ref.at[b, h, rows], gam_s), (f_ref.at[b, h], f_s)]
    for src, dst in copies:
      plgpu.copy_gmem_to_smem(src, dst, bar)
    for src, dst in later:
      plgpu.copy_gmem_to_smem(src, dst, bar_d)
    plgpu.barrier_wait(bar)

    g_row = plgpu.load(g_r, layout=_ROWS)
    g_col = plgpu.load(g_c, layout=_COLS)
    g_last = g_r[C - 1]
    q_w = jnp.exp2(g_row) * scale
    k_w = jnp.exp2(g_last - g_row)
    seg_rows = seg_cols = None
    if has_segs:
      seg_rows, seg_cols = plgpu.load(run_r, layout=_ROWS), plgpu.load(run_c, layout=_COLS)
      q_w = q_w * plgpu.load(cin_r, layout=_ROWS)
      k_w = k_w * plgpu.load(tail_r, layout=_ROWS)

    def send(tile, out_s, dst):
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # out_s's previous tile was sent
      out_s[...] = tile.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(out_s, dst)

    # dq
    m = _decay_tile(g_row, g_col, seg_rows, seg_cols) * scale
    dp16 = (_mm(do_s, v_s.T, (C, C)) * m).astype(dtype)
    dq = _mm(dp16, k_s, (C, dk), init=_mm(do_s, s_s, (C, dk)) * _bcast(q_w, (C, dk), 0))
    dg = (plgpu.load(q_s, layout=_WG).astype(F32) * dq).sum(axis=1)
    send(dq, dqk_out, dq_ref.at[b, rows, h])
    # dk
    mt = _decay_tile(g_row, g_col, seg_rows, seg_cols, transposed=True) * scale
    dpt16 = (_mm(v_s, do_s.T, (C, C)) * mt).astype(dtype)
    plgpu.barrier_wait(bar_d)
    late_mm = lambda a, b_, shape: _mm(a, b_, shape) * gam_s[0] if has_late else None
    dk_state = _mm(v_s, d_s, (C, dk), init=late_mm(v_s, f_s, (C, dk))) * _bcast(k_w, (C, dk), 0)
    k_f = plgpu.load(k_s, layout=_WG).astype(F32)
    kd = (k_f * dk_state).sum(axis=1)
    dk_t = _mm(dpt16, q_s, (C, dk), init=dk_state)
    dg = dg - (k_f * dk_t).sum(axis=1)
    send(dk_t, dqk_out, dk_ref.at[b, rows, h])
    # dv
    at16 = (_mm(k_s, q_s.T, (C, C)) * mt).astype(dtype)
    dv_state = _mm(k_s, d_s.T, (C, dv), init=late_mm(k_s, f_s.T, (C, dv)))
    dv_t = _mm(at16, do_s, (C, dv), init=dv_state * _bcast(k_w, (C, dv), 0))
    send(dv_t, dv_out, dv_ref.at[b, rows, h])
    dg_s[...] = dg
    kd_s[...] = kd
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dg_s, dg_ref.at[b, h, rows])
    plgpu.copy_smem_to_gmem(kd_s, kd_ref.at[b, h, rows])
    plgpu.wait_smem_to_gmem(0)

  vec = plgpu.SMEM((C,), F32)
  smem = (_tiles(dtype, C, dk), _tiles(dtype, C, dk), _tiles(dtype, C, dv), _tiles(dtype, C, dv),
          _tiles(dtype, dv, dk), _tiles(dtype, dv, dk), vec, vec, vec, vec, vec, vec,
          _tiles(dtype, C, dk), _tiles(dtype, C, dv), vec, vec, vec,
          _tiles(dtype, dv, dk) if has_late else vec)
  bar = (plgpu.Barrier(num_arrivals=7 + 4 * has_segs),
         plgpu.Barrier(num_arrivals=1 + 2 * has_late))
  args = ([q, k, v, do, g2, states_t, d_t] + (list(segs) if has_segs else [])
          + (list(late) if has_late else []))
  tok = lambda d: jax.ShapeDtypeStruct((bsz, tp, heads, d), dtype)
  vec_out = jax.ShapeDtypeStruct((bsz, heads, tp), F32)
  return kernel(
      body, out_type=[tok(dk), tok(dk), tok(dv), vec_out, vec_out], scratch_types=[smem, bar],
      grid=(n_chunks, heads, bsz), grid_names=("n", "h", "b"),
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(*args)


def _with_late(d_t, late):
  """D^T leaving every chunk [B, H, N, Dv, Dk] float32 with `late`'s Gamma_c dF^T added."""
  gam, f_t = late
  b, h, n = d_t.shape[:3]
  return (d_t.astype(F32)
          + gam.reshape(b, h, n, C)[..., 0, None, None] * f_t.astype(F32)[:, :, None])


def _state_dot(states_t, d_t, late):
  """<S_c, D_c> per chunk [B, H, N] float32 (D_c with `late`'s Gamma_c dF added)."""
  if late is None:
    return jnp.einsum("bhned,bhned->bhn", states_t, d_t, preferred_element_type=F32)
  return jnp.sum(states_t.astype(F32) * _with_late(d_t, late), axis=(-1, -2))


def kernel_chunk_grads(q, k, v, do, g2, segs: Segs | None, states_t, d_t, scale: float,
                       late=None):
  """`chunk_grads` with the chunk-parallel part in the kernel above; the chunk-decay term
  (sum_j k_j.dk_state_j + gamma <S, D> at each chunk's last token) in XLA."""
  dq, dk, dv, dg, kd = _chunk_grads_kernel(q, k, v, do, g2, segs, states_t, d_t, scale=scale,
                                           late=late)
  b, h, tp = dg.shape
  n = tp // C
  g_last = g2.reshape(b, h, n, C)[..., -1]
  gamma = jnp.exp2(g_last)
  if segs is not None:
    gamma = gamma * segs.cin.reshape(b, 1, n, C)[..., -1]
  last = kd.reshape(b, h, n, C).sum(-1) + gamma * _state_dot(states_t, d_t, late)
  dg = dg.reshape(b, h, n, C).at[..., -1].add(last)
  return dq, dk, dv, dg.reshape(b, h, tp) / LOG2E


def _chunks(x):
  """[B, Tp, H, D] -> [B, H, N, C, D]."""
  b, tp, h, d = x.shape
  return jnp.moveaxis(x.reshape(b, tp // C, C, h, d), 3, 1)


def _unchunk(x):
  b, h, n, c, d = x.shape
  return jnp.moveaxis(x, 1, 3).reshape(b, n * c, h, d)


def chunk_grads(q, k, v, do, g2, segs: Segs | None, states_t, d_t, scale: float, late=None):
  """dq, dk, dv [B, Tp, H, D] (per query head) and dG2 [B, H, Tp] from the per-chunk states
  S^T (entering) and D^T (gradient leaving), batched over chunks: the chunk-parallel part of
  the backward. k, v already per query head. Operands in the input dtype, sums in float32.
  `late`: as `_chunk_grads_kernel`'s."""
  dtype = q.dtype
  if late is not None:
    d_t = _with_late(d_t, late).astype(d_t.dtype)
  mm = functools.partial(jnp.einsum, preferred_element_type=F32)
  qc, kc, vc, doc = (_chunks(x) for x in (q, k, v, do))  # [B, H, N, C, D]
  b, h, n = qc.shape[:3]
  g = g2.reshape(b, h, n, C)
  causal = jnp.tril(jnp.ones((C, C), bool))
  if segs is None:
    keep = causal
    cin = tail = carry = 1.0
  else:
    run = segs.run.reshape(b, 1, n, C)
    keep = causal & (run[..., :, None] == run[..., None, :])
    cin, tail = (x.reshape(b, 1, n, C) for x in (segs.cin, segs.tail))
    carry = cin[..., -1:]
  decay = jnp.exp2(jnp.where(keep, g[..., :, None] - g[..., None, :], -jnp.inf)) * scale
  q_w = jnp.exp2(g) * cin * scale  # [B, H, N, C]: weight of the incoming state for row i
  k_w = jnp.exp2(g[..., -1:] - g) * tail  # weight of token j in the outgoing state
  gamma = jnp.exp2(g[..., -1]) * carry[..., 0] if segs is not None else jnp.exp2(g[..., -1])

  a = mm("bhnid,bhnjd->bhnij", qc, kc) * decay  # scores
  dp = mm("bhnie,bhnje->bhnij", doc, vc) * decay
  a16, dp16 = a.astype(dtype), dp.astype(dtype)
  dq = mm("bhnij,bhnjd->bhnid", dp16, kc) + q_w[..., None] * mm("bhnie,bhned->bhnid", doc, states_t)
  dk_intra = mm("bhnij,bhnid->bhnjd", dp16, qc)
  dk_state = k_w[..., None] * mm("bhnje,bhned->bhnjd", vc, d_t)
  dk = dk_intra + dk_state
  dv = mm("bhnij,bhnie->bhnje", a16, doc) + k_w[..., None] * mm("bhned,bhnjd->bhnje", d_t, kc)
  # dL/dG_i (natural units) = q_i.dq_i - k_i.dk_i, and at the chunk's last token the decay of
  # the whole chunk: sum_j k_j.dk_state_j + gamma <S, D>.
  dg = (qc.astype(F32) * dq).sum(-1) - (kc.astype(F32) * dk).sum(-1)
  last = (kc.astype(F32) * dk_state).sum((-1, -2)) + gamma * mm(
      "bhned,bhned->bhn", states_t, d_t)
  dg = dg.at[..., -1].add(last)
  return (_unchunk(dq).astype(dtype), _unchunk(dk), _unchunk(dv),
          dg.reshape(b, h, n * C) / LOG2E)


# ---------------------------------------------------------------------------- the op


class _Static(NamedTuple):
  scale: float
  group: int
  config: Config
  pieces: int = 1


# ------------------------------------------------------------------------- sequence split
# With few (batch, head, value block) rows the serial passes leave most of the GPU idle; the
# sequence is then cut into P pieces that run in parallel (FlashQLA's intra-card split, as in
# jla). A piece maps the state entering it affinely, S_end = M S_start + E (M its total decay,
# E its state from zero); a scan over the P pieces in XLA gives every piece its true start,
# and the backward's reverse pass splits the same way. Exact.


def pieces_for(b: int, h: int, dv: int, t: int) -> int:
  """Pieces per sequence: a power of two, only when there are at most MAX_SPLIT_CTAS rows
  (B * H * Dv / 64), as many as fit one wave, each at least MIN_PIECE_CHUNKS chunks. Measured
  on an H100 (NOTES.md): 8 pieces at 16 rows 1.13x faster fwd+bwd; at 32 rows 4 pieces 5%
  slower, at 64 rows 2 pieces 26% slower."""
  ctas = b * h * (dv // BV)
  try:
    sms = int(getattr(jax.devices()[0], "core_count", 0) or 132)
  except RuntimeError:
    sms = 132
  p = 1
  if ctas > MAX_SPLIT_CTAS:
    return 1
  while ctas * 2 * p <= sms and -(-t // C) // (2 * p) >= MIN_PIECE_CHUNKS:
    p *= 2
  return p


def _piece_log2_decay(g2, pieces: int):
  """g2 [B, H, Tp] chunk-local inclusive cumsum -> the piece-local one (log2, <= 0)."""
  b, h, tp = g2.shape
  n = tp // C
  x = g2.reshape(b, h, pieces, n // pieces, C)
  before = jnp.cumsum(x[..., -1], axis=-1) - x[..., -1]  # earlier chunks of the piece
  return (x + before[..., None]).reshape(b, h, tp)


def _piece_sums(x, y, w, pieces: int):
  """sum over each piece's tokens of w_t y_t^T x_t: x [B, Tp, H, Dk], y [B, Tp, H, Dv], w [B,
  H, Tp] float32 -> [B, P, H, Dv, Dk] float32 (operands in the input dtype)."""
  b, tp, h, _ = x.shape
  yw = (y.astype(F32) * jnp.moveaxis(w, 1, 2)[..., None]).astype(x.dtype)
  split = lambda z: z.reshape(b, pieces, tp // pieces, h, z.shape[-1])
  return jnp.einsum("bpthe,bpthd->bphed", split(yw), split(x), preferred_element_type=F32)


def _piece_maps(g2, psegs: Segs | None, pieces: int):
  """(the piece-local cumulative log2 decay [B, H, Tp], M [B, P, H]: each piece's total decay,
  0 where a document starts in it)."""
  gp = _piece_log2_decay(g2, pieces)
  b, h, tp = gp.shape
  m = jnp.exp2(gp.reshape(b, h, pieces, -1)[..., -1])  # [B, H, P]
  if psegs is not None:
    m = m * psegs.cin.reshape(b, 1, pieces, -1)[..., -1]
  return gp, jnp.swapaxes(m, 1, 2)


def _piece_starts(k, v, g2, psegs, h0t, group: int, pieces: int):
  """The true state entering every piece, [B * P, H, Dv, Dk] float32."""
  gp, m = _piece_maps(g2, psegs, pieces)
  b, h, tp = gp.shape
  w = jnp.exp2(gp.reshape(b, h, pieces, -1)[..., -1:] - gp.reshape(b, h, pieces, -1))
  if psegs is not None:
    w = w * psegs.tail.reshape(b, 1, pieces, -1)
  kr, vr = (jnp.repeat(x, group, axis=2) for x in (k, v))
  e = _piece_sums(kr, vr, w.reshape(b, h, tp), pieces)

  def step(s, xs):
    m_p, e_p = xs
    return m_p[..., None, None] * s + e_p, s

  _, starts = lax.scan(step, h0t, (jnp.moveaxis(m, 1, 0), jnp.moveaxis(e, 1, 0)))
  return jnp.moveaxis(starts, 0, 1).reshape(b * pieces, *h0t.shape[1:])


def _piece_ends_grad(q, do, g2, psegs, dfinal_t, scale: float, pieces: int):
  """dL/dS^T leaving every piece, [B * P, H, Dv, Dk] float32 (the reverse of `_piece_starts`:
  D_end(p - 1) = M_p D_end(p) + sum_{i in p} exp2(G_i) cin_i scale dO_i^T q_i)."""
  gp, m = _piece_maps(g2, psegs, pieces)
  b, h, tp = gp.shape
  w = jnp.exp2(gp) * scale
  if psegs is not None:
    w = w * psegs.cin[:, None]
  f = _piece_sums(q, do, w, pieces)

  def step(d, xs):
    m_p, f_p = xs
    return m_p[..., None, None] * d + f_p, d

  _, ends = lax.scan(step, dfinal_t, (jnp.moveaxis(m, 1, 0), jnp.moveaxis(f, 1, 0)),
                     reverse=True)
  return jnp.moveaxis(ends, 0, 1).reshape(b * pieces, *dfinal_t.shape[1:])


def _split_forward(q, k, v, g2, segs, psegs, h0t, st: _Static, store_states: bool):
  p = st.pieces
  starts = h0t if p == 1 else _piece_starts(k, v, g2, psegs, h0t, st.group, p)
  o, finals, states = _forward(q, k, v, g2, segs, starts, scale=st.scale,
                               store_states=store_states, stages=st.config.stages, pieces=p)
  final = finals.reshape(q.shape[0], p, *finals.shape[1:])[:, -1]
  return o, final, states


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _chunked(q, k, v, g2, segs, psegs, h0t, st: _Static):
  o, final, _ = _split_forward(q, k, v, g2, segs, psegs, h0t, st, store_states=False)
  return o, final


def _chunked_fwd(q, k, v, g2, segs, psegs, h0t, st: _Static):
  o, final, states = _split_forward(q, k, v, g2, segs, psegs, h0t, st, store_states=True)
  return (o, final), (q, k, v, g2, segs, psegs, states)


def _reverse(q, do, g2, segs, psegs, dfinal_t, st: _Static):
  """The reverse state pass over the pieces: (D^T leaving every chunk, the initial state's
  gradient, transposed, [B, H, Dv, Dk] float32)."""
  p = st.pieces
  ends = dfinal_t if p == 1 else _piece_ends_grad(q, do, g2, psegs, dfinal_t, st.scale, p)
  d_t, dstarts = _reverse_states(q, do, g2, segs, ends, scale=st.scale,
                                 stages=st.config.bwd_stages, pieces=p)
  return d_t, dstarts.reshape(q.shape[0], p, *dstarts.shape[1:])[:, 0]


def _grads(q, k, v, do, g2, segs, states, d_t, st: _Static, late=None):
  """The chunk-parallel part: dq, dk, dv (K/V heads summed over their groups, input dtypes),
  dG2 [B, H, Tp] float32."""
  kr, vr = (jnp.repeat(x, st.group, axis=2) for x in (k, v))
  grads = kernel_chunk_grads if st.config.grads_kernel else chunk_grads
  dq, dk, dv, dg2 = grads(q, kr, vr, do, g2, segs, states, d_t, st.scale, late=late)
  dk, dv = (_group_sum(x, st.group).astype(k.dtype) for x in (dk, dv))
  return dq, dk, dv, dg2


def _chunked_bwd(st: _Static, res, cts):
  q, k, v, g2, segs, psegs, states = res
  do, dfinal = cts
  do = do.astype(q.dtype)
  d_t, dh0t = _reverse(q, do, g2, segs, psegs, dfinal, st)
  dq, dk, dv, dg2 = _grads(q, k, v, do, g2, segs, states, d_t, st)
  zeros = lambda x: None if x is None else jax.tree.map(jnp.zeros_like, x)
  return dq, dk, dv, dg2, zeros(segs), zeros(psegs), dh0t


def _group_sum(x, group):
  b, t, h, d = x.shape
  return x.reshape(b, t, h // group, group, d).sum(3) if group > 1 else x


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


# ------------------------------------------------------------- the backward split (LASP-2)
# LASP-2 needs the gradient at the state entering a device's shard before it knows the
# cotangent dF of the shard's final state (that comes from the later devices, through the
# state combine). The reverse pass is linear in dF: D leaving chunk c is D_c(0) + Gamma_c dF,
# Gamma_c the product of the carries of the chunks after c. So (1) `split_grad_in` runs the
# reverse pass from dF = 0; its initial-state gradient is LASP-2's dS_in; (2) `split_grads`
# runs the chunk-parallel part with Gamma_c dF added to each chunk's D as the kernel loads it.
# Scalar decay forms (the per-key ones fold their decay into the operands).


def split_supported(g) -> bool:
  """Whether `split_forward` takes this decay (g [B, T, H, 1|Dk] or None)."""
  return g is None or g.shape[-1] == 1


def _static(q, k, v, t: int, scale: float, cfg: Config, per_key: bool = False):
  """(_Static, the padded length Tp) of a call with T = t."""
  b, _, h, _ = q.shape
  p = 1 if per_key else cfg.pieces or pieces_for(b, h, v.shape[-1], t)
  return _Static(float(scale), h // k.shape[2], cfg, p), -(-t // (C * p)) * C * p


def _scalar_inputs(q, k, v, g, resets, st: _Static, tp: int):
  """A scalar-decay call's kernel inputs: q, k, v padded to Tp, g2, segs, psegs."""
  b, _, h, _ = q.shape
  g2 = jnp.zeros((b, h, tp), F32) if g is None else chunk_log2_decay(g, tp)
  segs = psegs = None
  if resets is not None:
    segs = segment_vectors(resets, tp)
    psegs = segment_vectors(resets, tp, tp // st.pieces) if st.pieces > 1 else None
  return _pad_time(q, tp), _pad_time(k, tp), _pad_time(v, tp), g2, segs, psegs


def _pad_do(do, tp: int, dtype):
  return _pad_time(do.astype(dtype), tp)


def split_forward(q, k, v, g, h0, resets, scale):
  """`linear_attention_pallas`'s forward (scalar decay) keeping what the split backward needs.
  Returns (o [B, T, H, Dv], final [B, H, Dk, Dv] float32, residuals)."""
  q, k, v, g, h0, resets = same_vma(q, k, v, g, h0, resets)
  t = q.shape[1]
  st, tp = _static(q, k, v, t, scale, TUNED)
  q, k, v, g2, segs, psegs = _scalar_inputs(q, k, v, g, resets, st, tp)
  o, final_t, states = _split_forward(q, k, v, g2, segs, psegs, jnp.swapaxes(h0, -1, -2), st,
                                      store_states=True)
  return o[:, :t], jnp.swapaxes(final_t, -1, -2), (q, k, v, g, g2, segs, psegs, states)


def split_grad_in(res, do, scale):
  """Phase 1: the reverse pass from a zero final cotangent. do [B, T, H, Dv] -> (the initial
  state's gradient [B, H, Dk, Dv] float32, D^T(0) leaving every chunk for `split_grads`)."""
  q, k, v, g, g2, segs, psegs, states = res
  st, tp = _static(q, k, v, do.shape[1], scale, TUNED)
  do = _pad_do(do, tp, q.dtype)
  zero = vary_like(jnp.zeros((q.shape[0], q.shape[2], do.shape[-1], q.shape[-1]), F32), q, do)
  d0, dh0t = _reverse(q, do, g2, segs, psegs, zero, st)
  return jnp.swapaxes(dh0t, -1, -2), d0


def _later_carries(g2, segs):
  """Gamma [B, H, Tp]: per chunk (on its tokens), the product of the carries of the chunks
  after it (what a final-state cotangent is multiplied by on its way back to that chunk)."""
  b, h, tp = g2.shape
  n = tp // C
  carry = jnp.exp2(g2.reshape(b, h, n, C)[..., -1])
  if segs is not None:
    carry = carry * segs.cin.reshape(b, 1, n, C)[..., -1]
  after = jnp.flip(jnp.cumprod(jnp.flip(carry, -1), -1), -1)  # chunks c..n-1
  gam = jnp.concatenate([after[..., 1:], jnp.ones_like(after[..., :1])], -1)
  return jnp.repeat(gam, C, axis=-1)


def split_grads(res, d0, do, dfinal, scale):
  """Phase 2, once the final state's cotangent dfinal [B, H, Dk, Dv] is known: (dq, dk, dv,
  dg [B, T, H, 1] float32 or None), as the kernel's backward with that cotangent gives."""
  q, k, v, g, g2, segs, psegs, states = res
  t = do.shape[1]
  st, tp = _static(q, k, v, t, scale, TUNED)
  late = (_later_carries(g2, segs), jnp.swapaxes(dfinal, -1, -2).astype(q.dtype))
  dq, dk, dv, dg2 = _grads(q, k, v, _pad_do(do, tp, q.dtype), g2, segs, states, d0, st, late)
  dg = None if g is None else jax.vjp(lambda g: chunk_log2_decay(g, tp), g)[1](dg2)[0]
  return dq[:, :t], dk[:, :t], dv[:, :t], dg


def _sm_count(default: int = 132) -> int:
  """The GPU's SM count (132 on an H100 / H200 SXM; the default where the device does not say,
  e.g. lowering for a GPU on a CPU host)."""
  return getattr(jax.devices()[0], "core_count", None) or default


def _shard_splits(rows: int, n: int) -> int:
  """The split of n chunks for `rows` (batch x head) CTAs: the largest divisor of n (no
  padding copy) with rows x splits within one wave (one CTA per SM: its output tile is 64 KB)
  and >= 4 chunks per split."""
  sms = _sm_count()
  return max([s for s in range(1, n // 4 + 1) if n % s == 0 and rows * s <= sms], default=1)


def shard_state(k, v, w, heads: int, *, stages: int = 4, splits: int | None = None):
  """LASP-2's state of a shard from zero, S = sum_t w_t k_t^T v_t per query head, on the
  tensor cores with the weights applied on the way in (XLA materialises k w first: as much
  memory traffic again as the GEMM). k [B, T, Hk, Dk], v [B, T, Hk, Dv], w [B, heads, T]
  float32 (query head h reads K/V head h // (heads / Hk)) -> [B, heads, Dk, Dv] float32.
  One CTA per (batch, head, split of T) with a warpgroup per 64 value columns, each summing
  (v^T w) k over its chunks; the splits' partial states are summed in XLA."""
  b, t, hk, dk = k.shape
  dv, dtype, group = v.shape[-1], k.dtype, heads // hk
  n_wg = dv // BV
  n = -(-t // C)
  splits = splits or _shard_splits(b * heads, n)
  npc = -(-n // splits)
  tp = npc * splits * C
  if tp != t:  # (a copy of k and v: LASP-2's shards are whole chunks, see `_shard_splits`)
    k, v = _pad_time(k, tp), _pad_time(v, tp)
    w = jnp.pad(w, [(0, 0), (0, 0), (0, tp - t)])  # padding weighs 0
  w = w.astype(F32)

  def body(k_ref, v_ref, w_ref, out_ref, scratch, bars):
    k_s, v_s, w_s, s32 = scratch
    in_bar, in_free, done = bars
    bi, h, sp, wg = (lax.axis_index(a) for a in ("b", "h", "s", "wg"))
    c0, kh = sp * npc, lax.div(h, group)

    @pl.when(wg == n_wg)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")

      def issue(i, slot):
        rows, bar = pl.ds((c0 + i) * C, C), in_bar.at[slot]
        plgpu.copy_gmem_to_smem(k_ref.at[bi, rows, kh], k_s.at[slot], bar)
        for j in range(n_wg):  # one tile per summing warpgroup
          plgpu.copy_gmem_to_smem(v_ref.at[bi, rows, kh, pl.ds(j * BV, BV)], v_s.at[j, slot], bar)
        plgpu.copy_gmem_to_smem(w_ref.at[bi, h, rows], w_s.at[slot], bar)

      _stream(issue, npc, stages, in_free)

    @pl.when(wg < n_wg)
    def _sum():
      plgpu.set_max_registers(232, action="increase")
      v0 = wg * BV

      def step(i, s_t):  # s_t: S^T [BV, Dk] float32
        slot = lax.rem(i, stages)
        plgpu.barrier_wait(in_bar.at[slot])
        wt = plgpu.load(w_s.at[slot], layout=_COLS)
        v_t = plgpu.load(v_s.at[wg, slot].T, layout=_WG).astype(F32)  # [BV, C]
        vw = (v_t * _bcast(wt, (BV, C), 1)).astype(dtype)
        s_t = _mm(vw, k_s.at[slot], (BV, dk), init=s_t)
        plgpu.barrier_arrive(in_free.at[slot])
        return s_t

      zero = plgpu.layout_cast(jnp.zeros((BV, dk), F32), _WG)
      s32.at[wg][...] = lax.fori_loop(0, npc, step, zero)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(s32.at[wg], out_ref.at[bi, h, sp, pl.ds(v0, BV)])
      plgpu.wait_smem_to_gmem(0)

    plgpu.barrier_arrive(done)
    plgpu.barrier_wait(done)

  smem = (_tiles(dtype, stages, C, dk), _tiles(dtype, n_wg, stages, C, BV),
          plgpu.SMEM((stages, C), F32), plgpu.SMEM((n_wg, BV, dk), F32))
  bars = (plgpu.Barrier(num_arrivals=2 + n_wg, num_barriers=stages),
          plgpu.Barrier(num_arrivals=n_wg, num_barriers=stages),
          plgpu.Barrier(num_arrivals=n_wg + 1))
  part = kernel(
      body, out_type=jax.ShapeDtypeStruct((b, heads, splits, dv, dk), F32),
      scratch_types=[smem, bars], grid=(b, heads, splits), grid_names=("b", "h", "s"),
      num_threads=n_wg + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(k, v, w)
  return jnp.swapaxes(jnp.sum(part, axis=2), -1, -2)


def _chunked_per_key_fwd(qt, kt, v, gamma, a, h0t, st: _Static, store_states: bool):
  """o = a v + q~ S, S' = gamma S + k~^T v per chunk (decay folded into the operands by
  `per_key_factors`). Returns o, the final S^T and S^T entering every chunk (or None)."""
  return _forward(qt, kt, v, (gamma, a), None, h0t, scale=1.0, store_states=store_states,
                  stages=st.config.stages)


def _chunked_per_key_bwd(st: _Static, res, cts):
  """The reverse state pass (kernel), then batched XLA for the chunk-parallel products.
  Returns the gradients of (qt, kt, v, gamma, a, h0t)."""
  qt, kt, v, gamma, a, states = res
  do, dfinal = cts
  do = do.astype(qt.dtype)
  d_t, dh0t = _reverse_states(qt, do, gamma, None, dfinal, scale=1.0,
                              stages=st.config.bwd_stages)
  mm = functools.partial(jnp.einsum, preferred_element_type=F32)
  vr = jnp.repeat(v, st.group, axis=2)
  qc, kc, vc, doc = (_chunks(x) for x in (qt, kt, vr, do))  # [B, H, N, C, D]
  b, h, n = qc.shape[:3]
  ac = a.reshape(b, h, n, C, C)
  da = mm("bhnie,bhnje->bhnij", doc, vc).reshape(a.shape)
  dqt = mm("bhnie,bhned->bhnid", doc, states)
  dkt = mm("bhnje,bhned->bhnjd", vc, d_t)
  dv = mm("bhnij,bhnie->bhnje", ac, doc) + mm("bhned,bhnjd->bhnje", d_t, kc)
  dgamma = mm("bhned,bhned->bhnd", states, d_t)
  dv = _group_sum(_unchunk(dv), st.group).astype(v.dtype)
  return (_unchunk(dqt).astype(qt.dtype), _unchunk(dkt).astype(kt.dtype), dv, dgamma,
          da.astype(a.dtype), dh0t)


def _bounded_fwd(qh, kh, v, gamma, h0t, st: _Static, store_states: bool):
  """Per-key decay whose every chunk decays less than PER_KEY_BOUND nats (no segments) on the
  scalar kernels: with qh = q exp(G), kh = k exp(-G) (G chunk-local, per key),
    o = scale ((qh kh^T) [j <= i] v + qh S),   S' = gamma (S + kh^T v)   (gamma = exp(G_last)),
  i.e. the no-decay kernel whose state update ends with the per-key decay."""
  b, tp, h, _ = qh.shape
  zeros = jnp.zeros((b, h, tp), F32)
  return _forward(qh, kh, v, zeros, None, h0t, scale=st.scale, store_states=store_states,
                  stages=st.config.stages, gamma_after=gamma)


def _bounded_bwd(st: _Static, res, cts):
  """Gradients of (qh, kh, v, gamma, h0t) of `_bounded_fwd`."""
  qh, kh, v, gamma, states = res
  do, dfinal = cts
  do = do.astype(qh.dtype)
  b, tp, h, _ = qh.shape
  # D^T_{c-1} = D^T_c gamma + scale dO^T qh: the per-key reverse pass with q~ = scale qh.
  d_t, dh0t = _reverse_states((qh.astype(F32) * st.scale).astype(qh.dtype), do, gamma, None,
                              dfinal, scale=1.0, stages=st.config.bwd_stages)
  d_gamma = (d_t.astype(F32) * gamma[..., None, :]).astype(d_t.dtype)  # dL/d(S + kh^T v)
  vr = jnp.repeat(v, st.group, axis=2)
  zeros = jnp.zeros((b, h, tp), F32)
  grads = kernel_chunk_grads if st.config.grads_kernel else chunk_grads
  dqh, dkh, dv, _ = grads(qh, kh, vr, do, zeros, None, states, d_gamma, st.scale)
  mm = functools.partial(jnp.einsum, preferred_element_type=F32)
  vd = mm("bhnje,bhned->bhnjd", _chunks(vr), d_t)  # v_j D^T
  dg = mm("bhned,bhned->bhnd", states, d_t) + (_chunks(kh).astype(F32) * vd).sum(3)
  dv = _group_sum(dv, st.group).astype(v.dtype)
  return dqh.astype(qh.dtype), dkh.astype(kh.dtype), dv, dg, dh0t


# Per-key decay: three forms of one computation, each a pair (factors in differentiable XLA,
# kernels with their own backward):
#   "bounded":  every chunk decays < PER_KEY_BOUND nats, no segments: q exp(G), k exp(-G) on
#               the scalar kernels (`_bounded_fwd`);
#   "one_matmul": bounded, with segments: the scores as one matmul of q exp(G) . k exp(-G),
#               the per-key kernels (`_chunked_per_key_fwd`);
#   "sub_chunks": any decay: the scores from XLA's sub-chunked `_intra`, the per-key kernels.
# One `lax.cond` on the bound picks the form in the forward and again in the backward. Each
# branch recomputes its factors and runs its whole backward inside the branch, so no
# residual crosses the cond: autodiff of a cond would store every branch's residuals (the
# untaken ones as zeros), which cost 0.84 of 3.2 ms fwd+bwd at B2 T8k H16 D128 (NOTES.md).


def _form_fns(form: str, segs, st: _Static, tp: int):
  """The form's (factors(q, k, g) -> ops, forward(ops, v, h0t, store_states) -> (o, final,
  states), backward(ops, v, states, cts) -> (d_ops, dv, dh0t))."""
  if form == "bounded":  # ops = (qh, kh, gamma)

    def backward(ops, v, states, cts):
      dqh, dkh, dv, dgamma, dh0t = _bounded_bwd(st, (ops[0], ops[1], v, ops[2], states), cts)
      return (dqh, dkh, dgamma), dv, dh0t

    return (lambda q, k, g: bounded_factors(q, k, g, tp),
            lambda ops, v, h0t, store: _bounded_fwd(ops[0], ops[1], v, ops[2], h0t, st, store),
            backward)

  def backward(ops, v, states, cts):  # ops = (qt, kt, gamma, a)
    qt, kt, gamma, a = ops
    dqt, dkt, dv, dgamma, da, dh0t = _chunked_per_key_bwd(st, (qt, kt, v, gamma, a, states),
                                                          cts)
    return (dqt, dkt, dgamma, da), dv, dh0t

  return (lambda q, k, g: per_key_factors(q, k, g, segs, st.scale, tp, form),
          lambda ops, v, h0t, store: _chunked_per_key_fwd(ops[0], ops[1], v, ops[2], ops[3],
                                                          h0t, st, store),
          backward)


def _forms(segs, st: _Static):
  """(form when every chunk is within PER_KEY_BOUND, form otherwise)."""
  return ("bounded" if segs is None and st.config.bounded_per_key else "one_matmul",
          "sub_chunks")


def _per_key_run(q, k, v, g, h0t, segs, ok, st: _Static, store_states: bool):
  """The forward of the form `ok` (`chunks_bounded`) picks: (o, final S^T, states or None)."""
  tp = v.shape[1]

  def branch(form):
    factors, forward, _ = _form_fns(form, segs, st, tp)
    return lambda: forward(factors(q, k, g), v, h0t, store_states)

  return lax.cond(ok, *map(branch, _forms(segs, st)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _per_key(q, k, v, g, h0t, segs, st: _Static):
  """q [B, T, H, Dk], k [B, T, Hkv, Dk], g [B, T, H, Dk] float32, v [B, Tp, Hkv, Dv] (padded),
  h0t [B, H, Dv, Dk]; segs: `Segs` of the padded length or None. Returns o [B, Tp, H, Dv] and
  the final S^T."""
  ok = chunks_bounded(g, v.shape[1])
  o, final, _ = _per_key_run(q, k, v, g, h0t, segs, ok, st, store_states=False)
  return o, final


def _per_key_fwd(q, k, v, g, h0t, segs, st: _Static):
  ok = chunks_bounded(g, v.shape[1])
  o, final, states = _per_key_run(q, k, v, g, h0t, segs, ok, st, store_states=True)
  return (o, final), (q, k, v, g, segs, ok, states)


def _per_key_bwd(st: _Static, res, cts):
  q, k, v, g, segs, ok, states = res
  tp = v.shape[1]

  def branch(form):
    factors, _, backward = _form_fns(form, segs, st, tp)

    def run():
      ops, pull = jax.vjp(factors, q, k, g)
      d_ops, dv, dh0t = backward(ops, v, states, cts)
      d_ops = tuple(d.astype(o.dtype) for d, o in zip(d_ops, ops))
      dq, dk, dg = pull(d_ops)
      return dq, dk, dv.astype(v.dtype), dg, dh0t.astype(F32)

    return run

  dq, dk, dv, dg, dh0t = lax.cond(ok, *map(branch, _forms(segs, st)))
  zeros = None if segs is None else jax.tree.map(jnp.zeros_like, segs)
  return dq, dk, dv, dg, dh0t, zeros


_per_key.defvjp(_per_key_fwd, _per_key_bwd)


def _chunk_decay_sums(g, tp: int):
  """g [B, T, H, Dk] -> each chunk's total log decay per key [B, H, Tp / C, Dk] float32."""
  b, _, h, dk = g.shape
  g = _pad_time(g.astype(F32), tp)
  return jnp.moveaxis(g.reshape(b, tp // C, C, h, dk).sum(2), 2, 1)


def chunks_bounded(g, tp: int):
  """Whether every chunk decays less than PER_KEY_BOUND nats (per key): scalar bool."""
  return jnp.all(_chunk_decay_sums(g, tp) > -PER_KEY_BOUND)


def bounded_factors(q, k, g, tp: int):
  """qh = q exp(G), kh = k exp(-G) [B, Tp, H, Dk] (k per query head), gamma = exp(G_last)
  [B, H, Tp / C, Dk] float32; for chunks within PER_KEY_BOUND nats (`chunks_bounded`)."""
  h = q.shape[2]
  padt = functools.partial(_pad_time, tp=tp)
  k = jnp.repeat(k, h // k.shape[2], axis=2)
  gc = jnp.cumsum(_chunks(padt(g.astype(F32))), axis=3)  # [B, H, N, C, Dk], <= 0
  qh = _unchunk(_chunks(padt(q)).astype(F32) * jnp.exp(gc)).astype(q.dtype)
  kh = _unchunk(_chunks(padt(k)).astype(F32) * jnp.exp(-gc)).astype(q.dtype)
  return qh, kh, jnp.exp(gc[..., -1, :])


def per_key_factors(q, k, g, segs: Segs | None, scale: float, tp: int, scores: str):
  """Per-key decay folded into the operands (differentiable XLA; the kernel's inputs):
  q~ = q exp(G) cin scale, k~ = k exp(G_last - G) tail [B, Tp, H, Dk] (k per query head),
  gamma = exp(G_last) carry [B, H, Tp / C, Dk] float32, a = the chunk's scores [B, H, Tp, C]:
  `scores` "one_matmul" (q exp(G) . k exp(-G); chunks within PER_KEY_BOUND nats) or
  "sub_chunks" (XLA's sub-chunked `_intra`: safe however strong the decay).
  g [B, T, H, Dk] float32."""
  import sys
  xla = sys.modules["longax.kernels.linear_attention"]  # the op's module (it imports this one)
  b, _, h, dk = q.shape
  padt = functools.partial(_pad_time, tp=tp)
  k = jnp.repeat(k, h // k.shape[2], axis=2)
  qc, kc = _chunks(padt(q)), _chunks(padt(k))  # [B, H, N, C, Dk]
  gc = jnp.cumsum(_chunks(padt(g.astype(F32))), axis=3)  # inclusive, <= 0
  n = tp // C
  visible = jnp.tril(jnp.ones((C, C), bool))
  cin = tail = 1.0
  carry = jnp.ones((b, 1, n, 1))
  if segs is not None:
    run = segs.run.reshape(b, 1, n, C)
    visible = visible & (run[..., :, None] == run[..., None, :])
    cin, tail = (x.reshape(b, 1, n, C, 1) for x in (segs.cin, segs.tail))
    carry = cin[..., -1, :]
  qt = qc.astype(F32) * jnp.exp(gc) * cin * scale
  kt = kc.astype(F32) * jnp.exp(gc[..., -1:, :] - gc) * tail
  gamma = jnp.exp(gc[..., -1, :]) * carry
  dtype = q.dtype
  if scores == "one_matmul":
    qh = (qc.astype(F32) * jnp.exp(gc)).astype(dtype)
    kh = (kc.astype(F32) * jnp.exp(-gc)).astype(dtype)
    a = jnp.einsum("bhnid,bhnjd->bhnij", qh, kh, preferred_element_type=F32) * visible
  else:
    a = xla._intra(qc, kc, gc, visible, exact=True)  # bf16 products: NaN in some GPU runs
  return (_unchunk(qt).astype(dtype), _unchunk(kt).astype(dtype), gamma,
          (a * scale).reshape(b, h, tp, C).astype(dtype))


def chunk_log2_decay(g, tp: int):
  """g [B, T, H, 1] natural log decay (or None) -> [B, H, Tp] chunk-local inclusive cumsum in
  log2 units (padding decays by nothing)."""
  b, _, h, _ = g.shape
  g = _pad_time(g[..., 0].astype(F32), tp)
  g = jnp.cumsum(g.reshape(b, tp // C, C, h), axis=2) * LOG2E
  return jnp.moveaxis(g.reshape(b, tp, h), 2, 1)


def unsupported(call: dict) -> str | None:
  """Why the kernel does not take this call (None: it does). A call without arrays (ssd
  asking whether the impl exists) is judged when linear_attention makes it."""
  if "q" not in call:
    return None
  q, v = call["q"], call["v"]
  if (why := not_on_hopper(call)) is not None:
    return why
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"dtype {q.dtype} (the kernel takes bfloat16 and float16)"
  if q.shape[-1] not in HEAD_DIMS or v.shape[-1] not in HEAD_DIMS:
    return f"Dk={q.shape[-1]}, Dv={v.shape[-1]} (the kernel takes {HEAD_DIMS})"
  return None


def linear_attention_pallas(q, k, v, g, h0, resets, scale, chunk: int = C, config=None):
  """The kernel under the op's signature (its chunk is always C = 64: `chunk_size` sets the
  XLA path's; the math does not depend on it): q [B, T, H, Dk], k [B, T, Hkv, Dk], v [B, T, Hkv,
  Dv]; g [B, T, H, 1] float32 or None; h0 [B, H, Dk, Dv] float32; resets [B, T] or None.
  Returns (o [B, T, H, Dv], final state [B, H, Dk, Dv] float32)."""
  del chunk
  q, k, v, g, h0, resets = same_vma(q, k, v, g, h0, resets)
  t = q.shape[1]
  per_key = g is not None and g.shape[-1] > 1
  st, tp = _static(q, k, v, t, scale, config or TUNED, per_key)
  h0t = jnp.swapaxes(h0, -1, -2)
  if per_key:  # per-key decay: folded into the operands
    segs = None if resets is None else segment_vectors(resets, tp)
    o, final_t = _per_key(q, k, _pad_time(v, tp), g.astype(F32), h0t, segs, st)
    return o[:, :t], jnp.swapaxes(final_t, -1, -2)
  o, final_t = _chunked(*_scalar_inputs(q, k, v, g, resets, st, tp), h0t, st)
  return o[:, :t], jnp.swapaxes(final_t, -1, -2)
