"""Flash attention for TPU in Pallas (Mosaic TPU): softmax and sigmoid as one kernel family.

Registered as `impl="pallas"` (TPU backend) and `impl="pallas_interpret"` (the same kernels in
TPU interpret mode, on CPU) of `attention` and `sigmoid_attention`; see `kernels/attention.py`
for the API, the float32 reference and the XLA path. Every option of the op: causal with the
bottom-right offset, GQA, window, sinks, softcap, segment ids, ragged T / S, return_lse.
Also of `block_sparse_attention` (`kernels/sparse_attention.py`): the same kernels, walking
the block mask's on blocks (see "Block-sparse" below).

Layout inside the kernels is head-major: q [B, H, T, D], k / v [B, Hkv, S, D] (the op
transposes), T and S padded to the blocks (padded keys masked, padded query rows dropped).

Forward: grid (B, H, query blocks, steps); the last axis is "arbitrary" and walks the key
blocks a query block sees, read from scalar-prefetched tables (`_forward_steps`): the key
block of each step and its kind (0: past the block's list, nothing to do; 1: masked; 2: every
pair visible, no mask). A step past the list repeats the last key block, so its DMA is
skipped. The score function is a parameter: softmax keeps a running max and normaliser in
VMEM scratch, sigmoid (FlashSigmoid) adds sigmoid(s + bias) straight into the f32 accumulator.
Backward (`jax.custom_vjp`), both recomputing P from the saved log-sum-exp:
  dq:   grid (B, H, query blocks, steps) over the same key-block tables;
  dk/dv: grid (B, Hkv, key blocks, G * steps): one KV head accumulates the query blocks of
        every query head of its group (no K/V repeat, no post-sum); scores are computed
        transposed ([keys, queries]) so every matmul is a plain or NT one.

The dk/dv table (`_backward_steps`) lists, per key block, entries gi * nq + qb: query block qb
of the group's query head gi, so steps no head needs are skipped across the whole group.

Visibility is `visibility.visible_pairs` on [rows, cols] position tiles; the tables come from
`visibility.key_blocks` / `visibility.query_blocks` (evaluated at trace time: positions are the
defaults, so the tables are static, one row per grid block shared by every batch and head).

Block-sparse: a kernel block is one block of the op's mask (block_q / block_kv = the op's
block_q / block_k, forward and backward). The tables are built in XLA from the bool mask
[Bm, Hm, nq, nk] (`_mask_lists`, `_compact`), so a traced mask works: a row per (batch, head,
block) where the mask has those axes (`_Rows`); a block is listed where its bit is on and the
causal rule leaves it a visible pair, kind 1 where it crosses the diagonal or holds padded keys,
2 otherwise. Table widths are static: the longest list of a concrete mask, else every block;
with traced block indices [.., n] the forward / dq tables come from them, n wide
(`_index_steps`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from longax.kernels._checks import concrete
from longax.kernels._vma import same_vma
from longax.kernels.tpu import VMEM_LIMIT, pallas_call, fit, interpret_params, not_on_tpu, round_up
from longax.kernels.visibility import key_blocks, query_blocks, visible_pairs

F32 = jnp.float32
NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Query / key rows per grid step, forward (block_*) and backward (bwd_block_*)."""
  block_q: int = 512
  block_kv: int = 512
  bwd_block_q: int = 256
  bwd_block_kv: int = 256

  def __post_init__(self):
    for name, value in dataclasses.asdict(self).items():
      if value < 8 or value % 8:
        raise ValueError(f"Blocks.{name}={value} must be a multiple of 8")


# Defaults per head dim, sized for v5e's 16 MiB scoped VMEM (see `vmem_bytes`); untuned.
DEFAULTS: dict[int, Blocks] = {
    64: Blocks(512, 512, 512, 512),
    128: Blocks(512, 512, 512, 512),
    256: Blocks(256, 512, 256, 512),
}


def blocks_for(head_dim: int) -> Blocks:
  return DEFAULTS.get(head_dim) or DEFAULTS[min(DEFAULTS, key=lambda d: abs(d - head_dim))]


def vmem_bytes(blocks: Blocks, d: int, dv: int, itemsize: int = 2) -> dict[str, int]:
  """VMEM one grid step holds, per kernel: double-buffered input / output blocks, f32 scratch
  and the f32 [rows, cols] score-sized temporaries (s, p, and dp / ds in the backward). Lanes
  pad to 128 (a [rows, 1] column costs [rows, 128])."""
  lane = lambda n: round_up(n, 128)
  bq, bk, d, dv = blocks.block_q, blocks.block_kv, lane(d), lane(dv)
  col = lambda rows: rows * 128 * 4  # f32 [rows, 1] column
  fwd = (2 * itemsize * (bq * d + bk * d + bk * dv + bq * dv) + 2 * col(bq)  # q k v o, lse
         + 4 * bq * dv + 2 * col(bq) + 3 * 4 * bq * bk)  # acc, m, l; s, p, mask
  bq, bk = blocks.bwd_block_q, blocks.bwd_block_kv
  blocks_io = 2 * itemsize * (bq * d + bk * d + bk * dv + bq * dv)  # q k v do
  dq = blocks_io + 2 * 2 * col(bq) + 2 * itemsize * bq * d + 4 * bq * d + 5 * 4 * bq * bk
  dkv = (blocks_io + 2 * 2 * 8 * lane(bq) * 4 + 2 * itemsize * bk * (d + dv) + 4 * bk * (d + dv)
         + 5 * 4 * bq * bk)  # lse / delta rows [1, bq] pad to [8, bq]
  return {"forward": fwd, "dq": dq, "dkv": dkv}


@dataclasses.dataclass(frozen=True)
class _Problem:
  spec: Any  # attention.AttnSpec
  t: int  # real query / key lengths (the kernels see them padded)
  s: int
  group: int  # query heads per KV head
  segments: bool
  block_q: int  # this pass's blocks
  block_kv: int
  interpret: bool
  mask_steps: tuple[int, int] | None = None  # block-sparse: widths of the mask's tables

  @property
  def offset(self):  # query row i sits at position i + offset (bottom-right alignment)
    return self.s - self.t

  @property
  def sinks(self):
    return self.spec.sinks if self.spec.window is not None else 0

  @property
  def nq(self):
    return -(-self.t // self.block_q)

  @property
  def nk(self):
    return -(-self.s // self.block_kv)

  def padded_key_block(self, blk: int) -> bool:
    return self.s % self.block_kv != 0 and blk == self.nk - 1


# ------------------------------------------------------------------------------ schedule


def _table(rows: list[list[tuple[int, int]]]):
  """Per-row lists of (block, kind) -> (block [R, n], kind [R, n]) int32, n >= 1; a row's
  tail repeats its last block (no new DMA) with kind 0."""
  n = max(1, max(len(r) for r in rows))
  blk = np.zeros((len(rows), n), np.int32)
  kind = np.zeros((len(rows), n), np.int32)
  for i, r in enumerate(rows):
    for j, (b, k) in enumerate(r):
      blk[i, j], kind[i, j] = b, k
    if r:
      blk[i, len(r):] = r[-1][0]
  return jnp.asarray(blk), jnp.asarray(kind)


def _ranges(fn, firsts, lasts):
  with jax.ensure_compile_time_eval():
    out = jax.vmap(fn)(jnp.asarray(firsts, jnp.int32), jnp.asarray(lasts, jnp.int32))
    return [np.asarray(x) for x in out]


def _key_steps(pb: _Problem):
  """For each query block, the key blocks it sees: sink blocks first (masked), then the
  window's / causal range; a block is unmasked where `key_blocks` says every pair is visible
  and it holds no padding and no segment boundary may cut it."""
  spec, bq, bk = pb.spec, pb.block_q, pb.block_kv
  first = np.arange(pb.nq) * bq + pb.offset
  lo, hi, full_lo, full_hi = _ranges(
      lambda a, b: key_blocks(a, b, bk, pb.nk, causal=spec.causal, window=spec.window),
      first, first + bq - 1)
  n_sink = -(-pb.sinks // bk)
  rows = []
  for i in range(pb.nq):
    sink = list(range(min(n_sink, hi[i])))
    rest = range(max(lo[i], len(sink)), hi[i])
    kind = lambda b: 2 if (full_lo[i] <= b < full_hi[i] and not pb.segments
                           and not pb.padded_key_block(b) and b >= n_sink) else 1
    rows.append([(b, 1) for b in sink] + [(b, kind(b)) for b in rest])
  return _table(rows)


def _query_steps(pb: _Problem):
  """For each key block, the query blocks that see it (the transpose of `_key_steps`)."""
  spec, bq, bk = pb.spec, pb.block_q, pb.block_kv
  first = np.arange(pb.nk) * bk
  last = np.minimum(first + bk - 1, pb.s - 1)
  lo, hi, full_lo, full_hi = _ranges(
      lambda a, b: query_blocks(a, b, bq, pb.nq, pb.offset, causal=spec.causal,
                                window=spec.window, sinks=pb.sinks), first, last)
  rows = []
  for kb in range(pb.nk):
    plain = not (pb.segments or pb.padded_key_block(kb) or first[kb] < pb.sinks)
    kind = lambda b: 2 if plain and full_lo[kb] <= b < full_hi[kb] else 1
    rows.append([(b, kind(b)) for b in range(lo[kb], hi[kb])])
  return _table(rows)


@dataclasses.dataclass(frozen=True)
class _Rows:
  """The row of a step table for grid block i of (batch b, head h): tables hold tb * th * r
  rows, tb / th = 1 where every batch / head shares them (static tables: one set of r)."""
  r: int
  tb: int = 1
  th: int = 1

  def __call__(self, b, h, i):
    return ((b if self.tb > 1 else 0) * self.th + (h if self.th > 1 else 0)) * self.r + i


def _mask_blocks(pb: _Problem):
  """Block-sparse: static [nq, nk] bools, (seen: the causal rule leaves query block i some
  key of key block kb; plain: it leaves every pair and kb holds no padded key)."""
  qb, kb = np.arange(pb.nq)[:, None], np.arange(pb.nk)[None, :]
  padded = np.broadcast_to((kb == pb.nk - 1) & (pb.s % pb.block_kv != 0), (pb.nq, pb.nk))
  if not pb.spec.causal:
    return np.ones((pb.nq, pb.nk), bool), ~padded
  q_first = qb * pb.block_q + pb.offset
  q_last = np.minimum((qb + 1) * pb.block_q, pb.t) - 1 + pb.offset
  return kb * pb.block_kv <= q_last, ((kb + 1) * pb.block_kv - 1 <= q_first) & ~padded


def _mask_lists(pb: _Problem, block_mask, xp=jnp):
  """The blocks the kernels visit for a bool block mask [Bm, Hm, nq, nk]: per query block
  its key blocks ([Bm, Hm, nq, nk]) and per key block of a KV head the (query head gi of its
  group, query block qb) pairs, column gi * nq + qb ([Bm, 1 | Hkv, nk, G * nq])."""
  by_query = block_mask & _mask_blocks(pb)[0]
  by_key = xp.swapaxes(by_query, -1, -2)  # [Bm, Hm, nk, nq]
  if by_key.shape[1] == 1:
    return by_query, xp.tile(by_key, (1, 1, 1, pb.group))
  return by_query, rearrange(by_key, "b (h g) k q -> b h k (g q)", g=pb.group)


def _mask_widths(pb: _Problem, block_mask, block_indices=None) -> tuple[int, int]:
  """The tables' widths (steps per row): the longest lists of a concrete mask; else the
  forward's is the traced indices' n (at most every key block), the dk/dv one all."""
  mask = concrete(block_mask)
  if mask is None:
    n = pb.nk if block_indices is None else min(block_indices.shape[-1], pb.nk)
    return n, pb.group * pb.nq
  return tuple(max(1, int(x.sum(-1).max())) for x in _mask_lists(pb, mask, np))


def _compact(on, plain, n: int, cols=None):
  """on [..., R, m] bool, plain [R | ..., R, m] bool, cols [..., R, m] int32 (default: the
  column numbers) -> (blk, kind) [..., R, n] int32: the cols of each row's on entries in
  order (kind 2 where plain, else 1), then its last one repeated with kind 0."""
  order = jnp.argsort(~on, axis=-1, stable=True)[..., :n].astype(jnp.int32)
  count = jnp.sum(on, -1, keepdims=True, dtype=jnp.int32)
  listed = jnp.arange(n) < count
  at = jnp.where(listed, order, jnp.take_along_axis(order, jnp.maximum(count - 1, 0), -1))
  blk = at if cols is None else jnp.take_along_axis(cols, at, -1)
  unmasked = jnp.take_along_axis(jnp.broadcast_to(plain, on.shape), at, -1)
  return blk, jnp.where(listed, jnp.where(unmasked, 2, 1), 0).astype(jnp.int32)


def _index_steps(pb: _Problem, block_indices):
  """Traced block_indices [Bi, Hi, nq, m] (-1 unused, repeats) -> `_compact`'s (blk, kind)
  [Bi, Hi, nq, mask_steps[0]], from a sort of each row's m indices, not of its nk mask bits."""
  seen, plain = _mask_blocks(pb)
  cand = jnp.sort(jnp.where(block_indices < 0, pb.nk, block_indices), -1)  # unused last
  col = jnp.minimum(cand, pb.nk - 1)
  qb = np.arange(pb.nq)[:, None]
  first = jnp.concatenate([jnp.ones_like(cand[..., :1], bool), cand[..., 1:] != cand[..., :-1]], -1)
  on = (cand < pb.nk) & first & jnp.asarray(seen)[qb, col]
  return _compact(on, jnp.asarray(plain)[qb, col], pb.mask_steps[0], col)


def _forward_steps(pb: _Problem, sparse=None):
  """The forward / dq tables, (blk, kind, _Rows): per query block its key blocks. sparse:
  block-sparse's (block_mask, traced block_indices or None)."""
  if sparse is None:
    return *_key_steps(pb), _Rows(pb.nq)
  block_mask, block_indices = sparse
  if block_indices is not None:
    blk, kind = _index_steps(pb, block_indices)
  else:
    blk, kind = _compact(_mask_lists(pb, block_mask)[0], _mask_blocks(pb)[1], pb.mask_steps[0])
  n = blk.shape[-1]
  return blk.reshape(-1, n), kind.reshape(-1, n), _Rows(pb.nq, *blk.shape[:2])


def _backward_steps(pb: _Problem, sparse=None):
  """The dk/dv tables, (blk, kind, _Rows): per key block of a KV head the query blocks of
  each query head of its group that see it, entry gi * nq + qb (gi: the head in the group)."""
  if sparse is None:
    blk, kind = _query_steps(pb)
    heads = np.repeat(np.arange(pb.group, dtype=np.int32) * pb.nq, blk.shape[1])
    return jnp.tile(blk, (1, pb.group)) + heads, jnp.tile(kind, (1, pb.group)), _Rows(pb.nk)
  on = _mask_lists(pb, sparse[0])[1]
  blk, kind = _compact(on, np.tile(_mask_blocks(pb)[1].T, (1, pb.group)), pb.mask_steps[1])
  n = blk.shape[-1]
  return blk.reshape(-1, n), kind.reshape(-1, n), _Rows(pb.nk, *on.shape[:2])


# ----------------------------------------------------------------------------- tile math


def _logits(spec, raw):
  s = raw * spec.scale
  if spec.softcap is not None:
    s = spec.softcap * jnp.tanh(s / spec.softcap)
  return s


def _mask(pb: _Problem, shape, q_row0, k0, q_seg=None, k_seg=None, *, keys_on_rows=False):
  """Visibility of a tile whose rows are queries (forward, dq) or keys (dk/dv); None when
  nothing is masked. Segment tiles come shaped to broadcast ([n, 1] / [1, n])."""
  qd, kd = (1, 0) if keys_on_rows else (0, 1)
  qi = lax.broadcasted_iota(jnp.int32, shape, qd) + (q_row0 + pb.offset)
  kj = lax.broadcasted_iota(jnp.int32, shape, kd) + k0
  spec = pb.spec
  ok = visible_pairs(qi, kj, causal=spec.causal, window=spec.window, sinks=pb.sinks)
  both = lambda a, b: b if a is None else a & b
  if pb.s % pb.block_kv:  # padded keys
    ok = both(ok, kj < pb.s)
  if pb.segments:
    ok = both(ok, q_seg == k_seg)
  return ok


def _probs(pb: _Problem, s, lse):
  """P recomputed in the backward: exp(s - lse) (softmax) or sigmoid(s + bias)."""
  if pb.spec.kind == "softmax":
    return jnp.exp(s - lse)
  return jax.nn.sigmoid(s + pb.spec.bias)


def _dscores(pb: _Problem, s, p, dp, delta):
  """d loss / d (q.k) from P and dP (scale and softcap's 1 - tanh^2 folded in)."""
  ds = p * (dp - delta) if pb.spec.kind == "softmax" else dp * p * (1.0 - p)
  if pb.spec.softcap is not None:
    ds = ds * (1.0 - jnp.square(s / pb.spec.softcap))
  return ds * pb.spec.scale


def _when_kind(kind, step):
  """Runs step(masked) for the step's kind (1: masked, 2: plain, 0: nothing)."""
  pl.when(kind == 1)(functools.partial(step, True))
  pl.when(kind == 2)(functools.partial(step, False))


def _params(interpret: bool):
  return dict(interpret=interpret_params(interpret),
              compiler_params=pltpu.CompilerParams(
                  dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
                  vmem_limit_bytes=VMEM_LIMIT))


# ------------------------------------------------------------------------------- forward


def _forward_kernel(blk_ref, kind_ref, q_ref, k_ref, v_ref, *refs, pb: _Problem, rows: _Rows):
  softmax = pb.spec.kind == "softmax"
  if pb.segments:
    qs_ref, ks_ref, *refs = refs
  if softmax:
    o_ref, lse_ref, acc_ref, m_ref, l_ref = refs
  else:
    o_ref, acc_ref = refs
  qb, j = pl.program_id(2), pl.program_id(3)
  r = rows(pl.program_id(0), pl.program_id(1), qb)

  @pl.when(j == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)
    if softmax:
      m_ref[...] = jnp.full_like(m_ref, -jnp.inf)
      l_ref[...] = jnp.zeros_like(l_ref)

  def step(masked):
    q, k, v = q_ref[0, 0], k_ref[0, 0], v_ref[0, 0]
    s = _logits(pb.spec, lax.dot_general(q, k, NT, preferred_element_type=F32))  # [bq, bk]
    ok = None
    if masked:
      segs = (qs_ref[0], ks_ref[0]) if pb.segments else ()
      ok = _mask(pb, s.shape, qb * pb.block_q, blk_ref[r, j] * pb.block_kv, *segs)
    if softmax:
      if ok is not None:
        s = jnp.where(ok, s, -jnp.inf)
      m_prev = m_ref[...]
      m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      p = jnp.exp(s - m_safe)
      alpha = jnp.exp(m_prev - m_safe)
      l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
      m_ref[...] = m_new
      acc = alpha * acc_ref[...]
    else:
      p = jax.nn.sigmoid(s + pb.spec.bias)
      if ok is not None:
        p = jnp.where(ok, p, 0.0)
      acc = acc_ref[...]
    acc_ref[...] = acc + lax.dot_general(p.astype(v.dtype), v, NN, preferred_element_type=F32)

  _when_kind(kind_ref[r, j], step)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    if not softmax:
      o_ref[0, 0] = acc_ref[...].astype(o_ref.dtype)
      return
    l = l_ref[...]
    o_ref[0, 0] = (acc_ref[...] / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)
    lse_ref[0, 0] = jnp.where(l > 0, m_ref[...] + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)


def _forward(q, k, v, segs, block_mask, pb: _Problem):
  """q [B, H, Tp, D], k [B, Hkv, Sp, D], v [B, Hkv, Sp, Dv], segs (q [B, Tp, 1], k [B, 1, Sp])
  or None, block_mask (block-sparse: `_forward_steps`'s sparse) or None -> (o [B, H, Tp, Dv],
  lse [B, H, Tp, 1] (+inf: a row that sees no key) or None)."""
  b, h, tp, d = q.shape
  dv = v.shape[-1]
  bq, bk, g = pb.block_q, pb.block_kv, pb.group
  blk, kind, rows = _forward_steps(pb, block_mask)
  q_spec = pl.BlockSpec((1, 1, bq, d), lambda b, h, i, j, blk, kind: (b, h, i, 0))
  kv_spec = lambda dd: pl.BlockSpec((1, 1, bk, dd), lambda b, h, i, j, blk, kind: (
      b, h // g, blk[rows(b, h, i), j], 0))
  row_spec = pl.BlockSpec((1, 1, bq, 1), lambda b, h, i, j, blk, kind: (b, h, i, 0))
  in_specs, args = [q_spec, kv_spec(d), kv_spec(dv)], [q, k, v]
  if segs is not None:
    in_specs += [pl.BlockSpec((1, bq, 1), lambda b, h, i, j, blk, kind: (b, i, 0)),
                 pl.BlockSpec((1, 1, bk), lambda b, h, i, j, blk, kind: (
                     b, 0, blk[rows(b, h, i), j]))]
    args += list(segs)
  out_specs = [pl.BlockSpec((1, 1, bq, dv), lambda b, h, i, j, blk, kind: (b, h, i, 0))]
  out_shape = [jax.ShapeDtypeStruct((b, h, tp, dv), q.dtype)]
  scratch = [pltpu.VMEM((bq, dv), F32)]
  if pb.spec.kind == "softmax":
    out_specs.append(row_spec)
    out_shape.append(jax.ShapeDtypeStruct((b, h, tp, 1), F32))
    scratch += [pltpu.VMEM((bq, 1), F32), pltpu.VMEM((bq, 1), F32)]
  out = pallas_call(
      functools.partial(_forward_kernel, pb=pb, rows=rows),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, h, tp // bq, blk.shape[1]), in_specs=in_specs,
          out_specs=out_specs, scratch_shapes=scratch),
      out_shape=out_shape, **_params(pb.interpret))(blk, kind, *args)
  return out[0], (out[1] if len(out) > 1 else None)


# ------------------------------------------------------------------------------ backward


def _dq_kernel(blk_ref, kind_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
               pb: _Problem, rows: _Rows):
  if pb.segments:
    qs_ref, ks_ref, *refs = refs
  dq_ref, acc_ref = refs
  qb, j = pl.program_id(2), pl.program_id(3)
  r = rows(pl.program_id(0), pl.program_id(1), qb)

  @pl.when(j == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  def step(masked):
    q, k, v, do = q_ref[0, 0], k_ref[0, 0], v_ref[0, 0], do_ref[0, 0]
    s = _logits(pb.spec, lax.dot_general(q, k, NT, preferred_element_type=F32))  # [bq, bk]
    p = _probs(pb, s, lse_ref[0, 0])
    if masked:
      segs = (qs_ref[0], ks_ref[0]) if pb.segments else ()
      ok = _mask(pb, s.shape, qb * pb.block_q, blk_ref[r, j] * pb.block_kv, *segs)
      if ok is not None:
        p = jnp.where(ok, p, 0.0)
    dp = lax.dot_general(do, v, NT, preferred_element_type=F32)
    ds = _dscores(pb, s, p, dp, delta_ref[0, 0])
    acc_ref[...] += lax.dot_general(ds.astype(k.dtype), k, NN, preferred_element_type=F32)

  _when_kind(kind_ref[r, j], step)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[0, 0] = acc_ref[...].astype(dq_ref.dtype)


def _backward_dq(q, k, v, do, lse, delta, segs, block_mask, pb: _Problem):
  """lse / delta: [B, H, Tp, 1] columns -> dq [B, H, Tp, D]."""
  b, h, tp, d = q.shape
  dv = v.shape[-1]
  bq, bk, g = pb.block_q, pb.block_kv, pb.group
  blk, kind, rows = _forward_steps(pb, block_mask)
  qrows = lambda dd: pl.BlockSpec((1, 1, bq, dd), lambda b, h, i, j, blk, kind: (b, h, i, 0))
  kv_spec = lambda dd: pl.BlockSpec((1, 1, bk, dd), lambda b, h, i, j, blk, kind: (
      b, h // g, blk[rows(b, h, i), j], 0))
  in_specs = [qrows(d), kv_spec(d), kv_spec(dv), qrows(dv), qrows(1), qrows(1)]
  args = [q, k, v, do, lse, delta]
  if segs is not None:
    in_specs += [pl.BlockSpec((1, bq, 1), lambda b, h, i, j, blk, kind: (b, i, 0)),
                 pl.BlockSpec((1, 1, bk), lambda b, h, i, j, blk, kind: (
                     b, 0, blk[rows(b, h, i), j]))]
    args += list(segs)
  return pallas_call(
      functools.partial(_dq_kernel, pb=pb, rows=rows),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, h, tp // bq, blk.shape[1]), in_specs=in_specs,
          out_specs=qrows(d), scratch_shapes=[pltpu.VMEM((bq, d), F32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), **_params(pb.interpret))(blk, kind, *args)


def _dkv_kernel(blk_ref, kind_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
                pb: _Problem, rows: _Rows):
  if pb.segments:
    qs_ref, ks_ref, *refs = refs
  dk_ref, dv_ref, dk_acc, dv_acc = refs
  kb, t = pl.program_id(2), pl.program_id(3)
  r = rows(pl.program_id(0), pl.program_id(1), kb)
  qb, kind = lax.rem(blk_ref[r, t], np.int32(pb.nq)), kind_ref[r, t]

  @pl.when(t == 0)
  def _init():
    dk_acc[...] = jnp.zeros_like(dk_acc)
    dv_acc[...] = jnp.zeros_like(dv_acc)

  def step(masked):
    q, k, v, do = q_ref[0, 0], k_ref[0, 0], v_ref[0, 0], do_ref[0, 0]
    s = _logits(pb.spec, lax.dot_general(k, q, NT, preferred_element_type=F32))  # [bk, bq]
    p = _probs(pb, s, lse_ref[0, 0])
    if masked:
      segs = (qs_ref[0], ks_ref[0]) if pb.segments else ()
      ok = _mask(pb, s.shape, qb * pb.block_q, kb * pb.block_kv, *segs, keys_on_rows=True)
      if ok is not None:
        p = jnp.where(ok, p, 0.0)
    dv_acc[...] += lax.dot_general(p.astype(do.dtype), do, NN, preferred_element_type=F32)
    dp = lax.dot_general(v, do, NT, preferred_element_type=F32)
    ds = _dscores(pb, s, p, dp, delta_ref[0, 0])
    dk_acc[...] += lax.dot_general(ds.astype(q.dtype), q, NN, preferred_element_type=F32)

  _when_kind(kind, step)

  @pl.when(t == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[0, 0] = dk_acc[...].astype(dk_ref.dtype)
    dv_ref[0, 0] = dv_acc[...].astype(dv_ref.dtype)


def _backward_dkv(q, k, v, do, lse, delta, segs, block_mask, pb: _Problem):
  """lse / delta: [B, H, 1, Tp] rows -> (dk [B, Hkv, Sp, D], dv [B, Hkv, Sp, Dv])."""
  b, hkv, sp, d = k.shape
  dv = v.shape[-1]
  bq, bk, g, nq = pb.block_q, pb.block_kv, pb.group, np.int32(pb.nq)
  blk, kind, rows = _backward_steps(pb, block_mask)
  # Step t of key block i of KV head h: entry e = gi * nq + qb, query head h * g + gi.
  entry = lambda b, h, i, t, blk: blk[rows(b, h, i), t]
  head = lambda b, h, i, t, blk: h * g + lax.div(entry(b, h, i, t, blk), nq)
  qblock = lambda b, h, i, t, blk: lax.rem(entry(b, h, i, t, blk), nq)
  qrows = lambda dd: pl.BlockSpec((1, 1, bq, dd), lambda b, h, i, t, blk, kind: (
      b, head(b, h, i, t, blk), qblock(b, h, i, t, blk), 0))
  keys = lambda dd: pl.BlockSpec((1, 1, bk, dd), lambda b, h, i, t, blk, kind: (b, h, i, 0))
  stat = pl.BlockSpec((1, 1, 1, bq), lambda b, h, i, t, blk, kind: (
      b, head(b, h, i, t, blk), 0, qblock(b, h, i, t, blk)))
  in_specs = [qrows(d), keys(d), keys(dv), qrows(dv), stat, stat]
  args = [q, k, v, do, lse, delta]
  if segs is not None:
    in_specs += [pl.BlockSpec((1, 1, bq), lambda b, h, i, t, blk, kind: (
                     b, 0, qblock(b, h, i, t, blk))),
                 pl.BlockSpec((1, bk, 1), lambda b, h, i, t, blk, kind: (b, i, 0))]
    args += list(segs)
  return pallas_call(
      functools.partial(_dkv_kernel, pb=pb, rows=rows),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, hkv, sp // bk, blk.shape[1]), in_specs=in_specs,
          out_specs=[keys(d), keys(dv)],
          scratch_shapes=[pltpu.VMEM((bk, d), F32), pltpu.VMEM((bk, dv), F32)]),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      **_params(pb.interpret))(blk, kind, *args)


# ---------------------------------------------------------------------------- the op


def _pad_to(x, axis, multiple, value=0):
  extra = -x.shape[axis] % multiple
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def _heads_first(x, multiple):
  """[B, T, H, D] -> [B, H, Tp, D], T padded to `multiple`."""
  return jnp.swapaxes(_pad_to(x, 1, multiple), 1, 2)


def _segments(q_seg, k_seg, tq: int, tk: int, *, query_rows: bool):
  """Segment ids padded and shaped for the kernels: queries [B, Tp, 1] and keys [B, 1, Sp]
  (query_rows) or queries [B, 1, Tp] and keys [B, Sp, 1] (dk/dv); None without segments."""
  if q_seg is None:
    return None
  qs = _pad_to(q_seg.astype(jnp.int32), 1, tq, -1)
  ks = _pad_to(k_seg.astype(jnp.int32), 1, tk, -2)
  return (qs[:, :, None], ks[:, None, :]) if query_rows else (qs[:, None, :], ks[:, :, None])


@dataclasses.dataclass(frozen=True)
class _Config:
  spec: Any
  blocks: Blocks
  interpret: bool
  mask_steps: tuple[int, int] | None = None  # block-sparse: `_mask_widths`

  def problem(self, q, k, q_seg, *, backward: bool) -> _Problem:
    t, s = q.shape[1], k.shape[1]
    blk = self.blocks
    bq, bk = (blk.bwd_block_q, blk.bwd_block_kv) if backward else (blk.block_q, blk.block_kv)
    return _Problem(self.spec, t, s, q.shape[2] // k.shape[2], q_seg is not None,
                    fit(bq, t), fit(bk, s), self.interpret, self.mask_steps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, q_seg, k_seg, block_mask, cfg: _Config):
  """-> (o [B, T, H, Dv], lse [B, H, T] (+inf: empty row) or None). block_mask: None, or
  block-sparse's (bool [Bm, Hm, nq, nk] in the kernel's blocks, traced block indices [Bm,
  Hm, nq, n] or None) (cfg.mask_steps set)."""
  return _flash_fwd(q, k, v, q_seg, k_seg, block_mask, cfg)[0]


def _flash_fwd(q, k, v, q_seg, k_seg, block_mask, cfg: _Config):
  pb = cfg.problem(q, k, q_seg, backward=False)
  t = q.shape[1]
  segs = _segments(q_seg, k_seg, pb.block_q, pb.block_kv, query_rows=True)
  o, lse = _forward(_heads_first(q, pb.block_q), _heads_first(k, pb.block_kv),
                    _heads_first(v, pb.block_kv), segs, block_mask, pb)
  o = jnp.swapaxes(o[:, :, :t], 1, 2)
  lse = None if lse is None else lse[:, :, :t, 0]
  return (o, lse), (q, k, v, q_seg, k_seg, block_mask, o, lse)


def _flash_bwd(cfg: _Config, res, cotangents):
  q, k, v, q_seg, k_seg, block_mask, o, lse = res
  do, dlse = cotangents
  pb = cfg.problem(q, k, q_seg, backward=True)
  t, s, bq, bk = q.shape[1], k.shape[1], pb.block_q, pb.block_kv
  if pb.spec.kind == "softmax":  # delta_i = do_i . o_i (minus the lse's own cotangent)
    delta = jnp.einsum("bthd,bthd->bht", do.astype(F32), o.astype(F32))
    if dlse is not None:
      delta = delta - dlse
    lse = _pad_to(lse, 2, bq)
  else:
    lse = jnp.zeros((q.shape[0], q.shape[2], t), F32)  # unused by sigmoid
    delta = lse
    lse = _pad_to(lse, 2, bq)
  delta = _pad_to(delta, 2, bq)
  qp, dop = _heads_first(q, bq), _heads_first(do, bq)
  kp, vp = _heads_first(k, bk), _heads_first(v, bk)
  dq = _backward_dq(qp, kp, vp, dop, lse[..., None], delta[..., None],
                    _segments(q_seg, k_seg, bq, bk, query_rows=True), block_mask, pb)
  dk, dv = _backward_dkv(qp, kp, vp, dop, lse[:, :, None], delta[:, :, None],
                         _segments(q_seg, k_seg, bq, bk, query_rows=False), block_mask, pb)
  grads = (jnp.swapaxes(x, 1, 2)[:, :n] for x, n in ((dq, t), (dk, s), (dv, s)))
  return (*grads, _no_grad(q_seg), _no_grad(k_seg), jax.tree.map(_no_grad, block_mask))


_flash.defvjp(_flash_fwd, _flash_bwd)


def _no_grad(x):
  """The cotangent of integer segment ids or a bool block mask."""
  return None if x is None else jnp.zeros(x.shape, jax.dtypes.float0)


def unsupported(call: dict, *, interpret: bool = False) -> str | None:
  """Why the kernel does not take this call (None: it does). `auto` asks this on TPU; under
  impl="pallas" / "pallas_interpret" the reason is the error message."""
  q, v = call["q"], call["v"]
  if not interpret and (why := not_on_tpu(call)) is not None:
    return why
  if call.get("explicit_positions"):
    return "explicit q_positions / kv_positions (the kernel takes the default bottom-right positions)"
  if not interpret:  # Mosaic TPU lays the head dim on the 128 lanes
    for name, x in (("head dim", q), ("value head dim", v)):
      if x.shape[-1] % 64:
        return f"{name} {x.shape[-1]} (the TPU kernel takes multiples of 64; 128 fills the lanes)"
  return None


def attention_pallas(q, k, v, q_pos, k_pos, q_seg, k_seg, spec, kv_block=None, blocks=None,
                     return_lse=False, interpret=False):
  """The kernels under the op's signature; positions must be the defaults (see
  `unsupported`). blocks: a `Blocks` (default `blocks_for(head dim)`); kv_block (the XLA
  path's fold) is not used."""
  del q_pos, k_pos, kv_block
  cfg = _Config(spec, blocks or blocks_for(q.shape[-1]), interpret)
  o, lse = _flash(*same_vma(q, k, v), q_seg, k_seg, None, cfg)
  return (o, _lse_public(lse)) if return_lse else o


def _lse_public(lse):
  """The kernels' lse [B, H, T] (+inf: empty row; None: sigmoid) -> [B, T, H] (-inf: empty)."""
  return None if lse is None else jnp.swapaxes(jnp.where(jnp.isposinf(lse), -jnp.inf, lse), 1, 2)


attention_interpret = functools.partial(attention_pallas, interpret=True)
unsupported_interpret = functools.partial(unsupported, interpret=True)


def block_grads_pallas(q, k, v, q_pos, k_pos, q_seg, k_seg, spec, o, lse, do, kv_block=None,
                       blocks=None, interpret=False):
  """One key block's share of the gradients of rows whose output o [B, T, H, Dv] and
  log-sum-exp lse [B, T, H] (-inf: empty row; None: sigmoid) cover more keys (ring
  attention's backward step) -> (dq, dk, dv): the dq and dk/dv kernels on those rows."""
  del q_pos, k_pos, kv_block
  cfg = _Config(spec, blocks or blocks_for(q.shape[-1]), interpret)
  if lse is not None:
    lse = jnp.swapaxes(jnp.where(jnp.isneginf(lse), jnp.inf, lse), 1, 2).astype(F32)
  return _flash_bwd(cfg, (q, k, v, q_seg, k_seg, None, o, lse), (do, None))[:3]


block_grads_interpret = functools.partial(block_grads_pallas, interpret=True)


# ---------------------------------------------------------------------- block-sparse


def block_sparse_unsupported(call: dict, *, interpret: bool = False) -> str | None:
  """`unsupported` for block_sparse_attention: the kernel's blocks are the op's blocks."""
  if (why := unsupported(call, interpret=interpret)) is not None:
    return why
  bq, bk = call["block_q"], call["block_k"]
  if bq % 8 or bk % 8:
    return f"block_q={bq} / block_k={bk} (the TPU kernel takes multiples of 8)"
  t = call["q"].shape[1]
  if not interpret and bq % 128 and bq < t:  # dk/dv lays a block's lse / delta on lanes
    return f"block_q={bq} (the TPU kernel takes multiples of 128 where T > block_q)"
  return None


def block_sparse_pallas(q, k, v, block_mask, spec, *, block_q: int, block_k: int,
                        return_lse=False, interpret=False, block_indices=None):
  """block_sparse_attention on the flash kernels: a kernel block is one mask block, and the
  step tables are the mask's on blocks (built in XLA from `block_mask`, so it may be traced;
  with a concrete mask the tables are as wide as its longest list). With traced
  block_indices [B|1, H|1, nq, n] (the mask's on blocks) the forward and dq tables come from
  them, n wide (`_index_steps`); with a traced mask alone, and for dk/dv, every block."""
  block_mask = jnp.asarray(block_mask)
  idx = block_indices if block_indices is not None and concrete(block_indices) is None else None
  cfg = _Config(spec, Blocks(block_q, block_k, block_q, block_k), interpret)
  pb = cfg.problem(q, k, None, backward=False)
  cfg = dataclasses.replace(cfg, mask_steps=_mask_widths(pb, block_mask, idx))
  o, lse = _flash(*same_vma(q, k, v), None, None, (block_mask, idx), cfg)
  return (o, _lse_public(lse)) if return_lse else o


block_sparse_interpret = functools.partial(block_sparse_pallas, interpret=True)
block_sparse_unsupported_interpret = functools.partial(block_sparse_unsupported, interpret=True)
