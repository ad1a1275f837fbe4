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

LOG2E = math.log2(math.e)
C = 64  # tokens per chunk: the M of every wgmma tile
BV = 64  # value columns per CTA
HEAD_DIMS = (64, 128)  # Dk and Dv the GPU tests cover
F32 = jnp.float32
_WG = plgpu.Layout.WGMMA
_ROWS = _WG.reduce(1)  # one value per row of a WGMMA tile
_COLS = _WG.reduce(0)  # one value per column


@dataclasses.dataclass(frozen=True)
class Config:
  """Pipeline depth of the forward and of the reverse state pass."""
  stages: int = 2
  bwd_stages: int = 2


TUNED = Config()

# ----------------------------------------------------------------------------- tile math


def _tiles(dtype, *shape):
  """SMEM tiled and swizzled for TMA and wgmma (16-bit, minor dim a multiple of 64)."""
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


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


def _scores_mask(g_row, g_col, seg_rows=None, seg_cols=None):
  """[C, C] exp2(G_i - G_j) on visible pairs (j <= i, same run), 0 elsewhere."""
  shape = (C, C)
  rows = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=_WG)
  cols = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=_WG)
  keep = rows >= cols
  if seg_rows is not None:
    keep = keep & (_bcast(seg_rows, shape, 0) == _bcast(seg_cols, shape, 1))
  return jnp.exp2(jnp.where(keep, _bcast(g_row, shape, 0) - _bcast(g_col, shape, 1), -jnp.inf))


class Segs(NamedTuple):
  run: jax.Array  # [B, Tp] float32 chunk-local run id
  cin: jax.Array  # [B, Tp] float32 1: sees the incoming state
  tail: jax.Array  # [B, Tp] float32 1: writes the outgoing state


def segment_vectors(resets, tp: int) -> Segs:
  """Segs from resets [B, T] bool (the state is zeroed before token t); padding joins the
  last run."""
  b, t = resets.shape
  r = jnp.pad(resets, [(0, 0), (0, tp - t)]).astype(jnp.int32).reshape(b, tp // C, C)
  runs = jnp.cumsum(r.reshape(b, tp), axis=1).reshape(b, tp // C, C)
  entering = runs[:, :, :1] - r[:, :, :1]  # the run of the token before the chunk
  flat = lambda x: x.astype(F32).reshape(b, tp)
  return Segs(flat(runs - entering), flat(runs == entering), flat(runs == runs[:, :, -1:]))


# ------------------------------------------------------------------------------- forward


def _forward(q, k, v, g2, segs: Segs | None, h0t, *, scale: float, store_states: bool,
             stages: int):
  """q [B, Tp, H, Dk], k [B, Tp, Hkv, Dk], v [B, Tp, Hkv, Dv] (Tp % C == 0); g2 [B, H, Tp]
  float32 chunk-local cumulative log2 decay; h0t [B, H, Dv, Dk] float32.
  Returns o [B, Tp, H, Dv], the final state S^T [B, H, Dv, Dk] float32 and, with
  `store_states`, S^T entering every chunk [B, H, Tp / C, Dv, Dk] (input dtype)."""
  bsz, tp, heads, dk = q.shape
  kv_heads, dv = k.shape[2], v.shape[-1]
  group, n_chunks, dtype = heads // kv_heads, tp // C, q.dtype
  has_segs = segs is not None
  n_copies = 5 + 4 * has_segs

  def body(*refs):
    q_ref, k_ref, v_ref, g_ref = refs[:4]
    refs = refs[4:]
    run_ref, cin_ref, tail_ref = refs[:3] if has_segs else (None,) * 3
    refs = refs[3 * has_segs:]
    h0_ref, o_ref, final_ref = refs[:3]
    refs = refs[3:]
    states_ref = refs[0] if store_states else None
    # A vector read in two layouts (rows, columns) has one SMEM copy per layout: Mosaic GPU's
    # layout inference fails on one buffer loaded both ways.
    (q_s, k_s, v_s, g_s, g_r, run_r, run_c, cin_s, tail_s, s_pub, o_out, s32), bars = refs[-2:]
    in_bar, in_free, s_ready, s_free, h0_bar, done = bars
    b, h, iv = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("v")
    hk, v0, wg = lax.div(h, group), iv * BV, lax.axis_index("wg")

    @pl.when(wg == 2)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")

      def issue(n, slot):
        rows, bar = pl.ds(n * C, C), in_bar.at[slot]
        plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_s.at[slot], bar)
        plgpu.copy_gmem_to_smem(k_ref.at[b, rows, hk], k_s.at[slot], bar)
        plgpu.copy_gmem_to_smem(v_ref.at[b, rows, hk, pl.ds(v0, BV)], v_s.at[slot], bar)
        plgpu.copy_gmem_to_smem(g_ref.at[b, h, rows], g_s.at[slot], bar)
        plgpu.copy_gmem_to_smem(g_ref.at[b, h, rows], g_r.at[slot], bar)
        if has_segs:
          for src, dst in ((run_ref, run_r), (run_ref, run_c), (cin_ref, cin_s),
                           (tail_ref, tail_s)):
            plgpu.copy_gmem_to_smem(src.at[b, rows], dst.at[slot], bar)

      for n in range(min(stages, n_chunks)):
        issue(n, n)

      @pl.loop(stages, n_chunks)
      def _refill(n):
        slot = lax.rem(n, stages)
        plgpu.barrier_wait(in_free.at[slot])
        issue(n, slot)

      for n in range(max(n_chunks - stages, 0), n_chunks):  # the last releases
        plgpu.barrier_wait(in_free.at[n % stages])

    @pl.when(wg == 0)
    def _state():
      plgpu.set_max_registers(232, action="increase")
      plgpu.copy_gmem_to_smem(h0_ref.at[b, h, pl.ds(v0, BV)], s32, h0_bar)
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
          plgpu.copy_smem_to_gmem(s_pub.at[half], states_ref.at[b, h, n, pl.ds(v0, BV)])
        g_last = g_s[slot, C - 1]
        v_decay = jnp.exp2(g_last - plgpu.load(g_s.at[slot], layout=_COLS))
        s_decay = jnp.exp2(g_last)
        if has_segs:
          v_decay = v_decay * plgpu.load(tail_s.at[slot], layout=_COLS)
          s_decay = s_decay * cin_s[slot, C - 1]
        v_t = plgpu.load(v_s.at[slot].T, layout=_WG).astype(F32)  # [BV, C]
        vd = (v_t * _bcast(v_decay, (BV, C), 1)).astype(dtype)
        s_new = _mm(vd, k_s.at[slot], (BV, dk), init=s_t * s_decay)
        plgpu.barrier_arrive(in_free.at[slot])
        return s_new

      s_t = lax.fori_loop(0, n_chunks, step, s0)
      for n in range(max(n_chunks - 2, 0), n_chunks):  # the last releases of s_pub
        plgpu.barrier_wait(s_free.at[n % 2])
      s32[...] = s_t
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(s32, final_ref.at[b, h, pl.ds(v0, BV)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 1)
    def _output():
      plgpu.set_max_registers(232, action="increase")

      def step(n, carry):
        slot, half = lax.rem(n, stages), lax.rem(n, 2)
        plgpu.barrier_wait(in_bar.at[slot])
        g_row = plgpu.load(g_r.at[slot], layout=_ROWS)
        g_col = plgpu.load(g_s.at[slot], layout=_COLS)
        q_decay = jnp.exp2(g_row)
        seg_rows = seg_cols = None
        if has_segs:
          seg_rows = plgpu.load(run_r.at[slot], layout=_ROWS)
          seg_cols = plgpu.load(run_c.at[slot], layout=_COLS)
          q_decay = q_decay * plgpu.load(cin_s.at[slot], layout=_ROWS)
        p = _mm(q_s.at[slot], k_s.at[slot].T, (C, C))
        p16 = (p * _scores_mask(g_row, g_col, seg_rows, seg_cols)).astype(dtype)
        plgpu.barrier_wait(s_ready.at[half])
        o = _mm(q_s.at[slot], s_pub.at[half].T, (C, BV))
        o = _mm(p16, v_s.at[slot], (C, BV), init=o * _bcast(q_decay, (C, BV), 0))
        plgpu.barrier_arrive(s_free.at[half])
        plgpu.barrier_arrive(in_free.at[slot])
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # o_out[half] of chunk n - 2 was sent
        o_out.at[half][...] = (o * scale).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_out.at[half], o_ref.at[b, pl.ds(n * C, C), h, pl.ds(v0, BV)])
        return carry

      lax.fori_loop(0, n_chunks, step, None)
      plgpu.wait_smem_to_gmem(0)

    # Every warpgroup waits for the others before it exits.
    plgpu.barrier_arrive(done)
    plgpu.barrier_wait(done)

  vec = plgpu.SMEM((stages, C), F32)
  smem = (_tiles(dtype, stages, C, dk), _tiles(dtype, stages, C, dk), _tiles(dtype, stages, C, BV),
          vec, vec, vec, vec, vec, vec, _tiles(dtype, 2, BV, dk), _tiles(dtype, 2, C, BV),
          plgpu.SMEM((BV, dk), F32))
  bars = (plgpu.Barrier(num_arrivals=n_copies, num_barriers=stages),
          plgpu.Barrier(num_arrivals=2, num_barriers=stages),
          plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=2),
          plgpu.Barrier(), plgpu.Barrier(num_arrivals=3))
  out_type = [jax.ShapeDtypeStruct((bsz, tp, heads, dv), dtype),
              jax.ShapeDtypeStruct((bsz, heads, dv, dk), F32)]
  if store_states:
    out_type.append(jax.ShapeDtypeStruct((bsz, heads, n_chunks, dv, dk), dtype))
  args = [q, k, v, g2] + (list(segs) if has_segs else []) + [h0t]
  outs = plgpu.kernel(
      body, out_type=out_type, scratch_types=[smem, bars], grid=(bsz, heads, dv // BV),
      grid_names=("b", "h", "v"), num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(*args)
  return outs[0], outs[1], (outs[2] if store_states else None)


# ------------------------------------------------------------------------------ backward


def _reverse_states(q, do, g2, segs: Segs | None, dfinal_t, *, scale: float, stages: int):
  """The reverse state pass: D^T = dL/dS^T leaving each chunk, walking the chunks backwards,

      D^T_{c-1} = exp2(G_last) cin_last D^T_c + scale (dO * exp2(G) cin)^T q     (chunk c)

  q [B, Tp, H, Dk], do [B, Tp, H, Dv], g2 [B, H, Tp], dfinal_t [B, H, Dv, Dk] float32.
  Returns (D^T leaving every chunk [B, H, Tp / C, Dv, Dk] input dtype, the initial state's
  gradient, transposed, [B, H, Dv, Dk] float32)."""
  bsz, tp, heads, dk = q.shape
  dv = do.shape[-1]
  n_chunks, dtype = tp // C, q.dtype
  has_segs = segs is not None
  n_copies = 3 + has_segs

  def body(*refs):
    q_ref, do_ref, g_ref = refs[:3]
    refs = refs[3:]
    cin_ref = refs[0] if has_segs else None
    refs = refs[has_segs:]
    df_ref, d_ref, dh0_ref = refs[:3]
    (q_s, do_s, g_s, cin_s, d_pub, s32), (in_bar, in_free, d_bar) = refs[-2:]
    b, h, iv = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("v")
    v0, wg = iv * BV, lax.axis_index("wg")

    @pl.when(wg == 1)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")

      def issue(i, slot):  # i: steps taken; chunk n_chunks - 1 - i
        rows, bar = pl.ds((n_chunks - 1 - i) * C, C), in_bar.at[slot]
        plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_s.at[slot], bar)
        plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h, pl.ds(v0, BV)], do_s.at[slot], bar)
        plgpu.copy_gmem_to_smem(g_ref.at[b, h, rows], g_s.at[slot], bar)
        if has_segs:
          plgpu.copy_gmem_to_smem(cin_ref.at[b, rows], cin_s.at[slot], bar)

      for i in range(min(stages, n_chunks)):
        issue(i, i)

      @pl.loop(stages, n_chunks)
      def _refill(i):
        slot = lax.rem(i, stages)
        plgpu.barrier_wait(in_free.at[slot])
        issue(i, slot)

      for i in range(max(n_chunks - stages, 0), n_chunks):
        plgpu.barrier_wait(in_free.at[i % stages])

    @pl.when(wg == 0)
    def _state():
      plgpu.set_max_registers(232, action="increase")
      plgpu.copy_gmem_to_smem(df_ref.at[b, h, pl.ds(v0, BV)], s32, d_bar)
      plgpu.barrier_wait(d_bar)
      d0 = plgpu.load(s32, layout=_WG)

      def step(i, d_t):
        slot, half = lax.rem(i, stages), lax.rem(i, 2)
        n = n_chunks - 1 - i
        plgpu.barrier_wait(in_bar.at[slot])
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # step i - 2's tile was sent
        d_pub.at[half][...] = d_t.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(d_pub.at[half], d_ref.at[b, h, n, pl.ds(v0, BV)])
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

      d_t = lax.fori_loop(0, n_chunks, step, d0)
      s32[...] = d_t
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(s32, dh0_ref.at[b, h, pl.ds(v0, BV)])
      plgpu.wait_smem_to_gmem(0)

  vec = plgpu.SMEM((stages, C), F32)
  smem = (_tiles(dtype, stages, C, dk), _tiles(dtype, stages, C, BV), vec, vec,
          _tiles(dtype, 2, BV, dk), plgpu.SMEM((BV, dk), F32))
  bars = (plgpu.Barrier(num_arrivals=n_copies, num_barriers=stages),
          plgpu.Barrier(num_barriers=stages), plgpu.Barrier())
  args = [q, do, g2] + ([segs.cin] if has_segs else []) + [dfinal_t]
  d, dh0 = plgpu.kernel(
      body,
      out_type=[jax.ShapeDtypeStruct((bsz, heads, n_chunks, dv, dk), dtype),
                jax.ShapeDtypeStruct((bsz, heads, dv, dk), F32)],
      scratch_types=[smem, bars], grid=(bsz, heads, dv // BV), grid_names=("b", "h", "v"),
      num_threads=2, thread_name="wg", compiler_params=plgpu.CompilerParams(approx_math=True),
  )(*args)
  return d, dh0


def _chunks(x):
  """[B, Tp, H, D] -> [B, H, N, C, D]."""
  b, tp, h, d = x.shape
  return jnp.moveaxis(x.reshape(b, tp // C, C, h, d), 3, 1)


def _unchunk(x):
  b, h, n, c, d = x.shape
  return jnp.moveaxis(x, 1, 3).reshape(b, n * c, h, d)


def chunk_grads(q, k, v, do, g2, segs: Segs | None, states_t, d_t, scale: float):
  """dq, dk, dv [B, Tp, H, D] (per query head) and dG2 [B, H, Tp] from the per-chunk states
  S^T (entering) and D^T (gradient leaving), batched over chunks: the chunk-parallel part of
  the backward. k, v already per query head. Operands in the input dtype, sums in float32."""
  dtype = q.dtype
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _chunked(q, k, v, g2, segs, h0t, st: _Static):
  o, final, _ = _forward(q, k, v, g2, segs, h0t, scale=st.scale, store_states=False,
                         stages=st.config.stages)
  return o, final


def _chunked_fwd(q, k, v, g2, segs, h0t, st: _Static):
  o, final, states = _forward(q, k, v, g2, segs, h0t, scale=st.scale, store_states=True,
                              stages=st.config.stages)
  return (o, final), (q, k, v, g2, segs, states)


def _chunked_bwd(st: _Static, res, cts):
  q, k, v, g2, segs, states = res
  do, dfinal = cts
  do = do.astype(q.dtype)
  d_t, dh0t = _reverse_states(q, do, g2, segs, dfinal, scale=st.scale,
                              stages=st.config.bwd_stages)
  kr, vr = (jnp.repeat(x, st.group, axis=2) for x in (k, v))
  dq, dk, dv, dg2 = chunk_grads(q, kr, vr, do, g2, segs, states, d_t, st.scale)
  dk, dv = (_group_sum(x, st.group).astype(k.dtype) for x in (dk, dv))
  dsegs = None if segs is None else jax.tree.map(jnp.zeros_like, segs)
  return dq, dk, dv, dg2, dsegs, dh0t


def _group_sum(x, group):
  b, t, h, d = x.shape
  return x.reshape(b, t, h // group, group, d).sum(3) if group > 1 else x


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def chunk_log2_decay(g, tp: int):
  """g [B, T, H, 1] natural log decay (or None) -> [B, H, Tp] chunk-local inclusive cumsum in
  log2 units (padding decays by nothing)."""
  b, t, h, _ = g.shape
  g = jnp.pad(g[..., 0].astype(F32), [(0, 0), (0, tp - t), (0, 0)])
  g = jnp.cumsum(g.reshape(b, tp // C, C, h), axis=2) * LOG2E
  return jnp.moveaxis(g.reshape(b, tp, h), 2, 1)


def unsupported(call: dict) -> str | None:
  """Why the kernel does not take this call (None: it does)."""
  q, k, v, g = call["q"], call["k"], call["v"], call.get("g")
  backend = call.get("backend", jax.default_backend())
  if backend != "gpu":
    return f"the Mosaic GPU kernel needs a GPU backend, not {backend!r}"
  try:
    cc = getattr(jax.devices()[0], "compute_capability", "")
  except RuntimeError:
    cc = ""
  if not str(cc).startswith("9"):
    return f"the Mosaic GPU kernel needs a Hopper GPU (compute capability 9.x), got {cc!r}"
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"dtype {q.dtype} (the kernel takes bfloat16 and float16)"
  if q.shape[-1] not in HEAD_DIMS or v.shape[-1] not in HEAD_DIMS:
    return f"Dk={q.shape[-1]}, Dv={v.shape[-1]} (the kernel takes {HEAD_DIMS})"
  if g is not None and g.shape[-1] != 1:
    return "per-key decay [B, T, H, Dk] (the kernel takes none, per-head and per-token scalar decay)"
  if call.get("chunk", C) != C:
    return f"chunk_size={call['chunk']} (the kernel's chunk is {C})"
  return None


def linear_attention_pallas(q, k, v, g, h0, resets, scale, chunk: int = C, config=None):
  """The kernel under the op's signature: q [B, T, H, Dk], k [B, T, Hkv, Dk], v [B, T, Hkv,
  Dv]; g [B, T, H, 1] float32 or None; h0 [B, H, Dk, Dv] float32; resets [B, T] or None.
  Returns (o [B, T, H, Dv], final state [B, H, Dk, Dv] float32)."""
  del chunk
  b, t, h, _ = q.shape
  tp = -(-t // C) * C
  pad = lambda x: jnp.pad(x, [(0, 0), (0, tp - t), (0, 0), (0, 0)])
  g2 = (jnp.zeros((b, h, tp), F32) if g is None else chunk_log2_decay(g, tp))
  segs = None if resets is None else segment_vectors(resets, tp)
  st = _Static(float(scale), h // k.shape[2], config or TUNED)
  o, final_t = _chunked(pad(q), pad(k), pad(v), g2, segs, jnp.swapaxes(h0, -1, -2), st)
  return o[:, :t], jnp.swapaxes(final_t, -1, -2)
