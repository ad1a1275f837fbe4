"""Flash attention for Hopper in Mosaic GPU: softmax and sigmoid as one kernel family.

Registered as `impl="pallas"` of `attention` and `sigmoid_attention` (see `kernels/attention.py`
for the API, the float32 reference and the XLA path). Layout q [B, T, H, D], k/v [B, S, Hkv, D].

Forward: a CTA holds `wgs` compute warpgroups of `block_q` query rows each and one memory
warpgroup that streams K/V blocks through an SMEM ring of `stages` slots (TMA + mbarriers);
with two compute warpgroups they take turns on the tensor cores (FlashAttention-3's ping-pong).
The score function is a parameter: softmax keeps a running max and normaliser in the log2
domain, sigmoid adds `sigmoid(s + bias)` straight into the accumulator.
Backward (`jax.custom_vjp`): a dq kernel that streams K/V over the same key blocks, and a dk/dv
kernel per KV head that streams Q, dO and the row statistics of every query head of its group
(no K/V repeat in HBM, no post-sum), both recomputing P.

Visibility is `visibility.visible_pairs` on [rows, cols] position tiles; block skipping is
`visibility.key_blocks` / `visibility.query_blocks`: blocks no query sees are never loaded, and
blocks every pair of which is visible skip the mask. Lengths that are not a multiple of the
block are padded here (padded keys are masked, padded query rows dropped).

Block-sparse attention (`block_sparse_pallas`, impl="pallas" of `block_sparse_attention`) is
the same three kernels with block lists (`_Lists`, built in XLA from the block mask) in place
of those ranges: per CTA tile, the blocks the memory warpgroup streams and each compute
warpgroup's own steps among them (unmasked first, then masked); see `_Listed`.
NSA's selected blocks (`selected_pallas`, impl="pallas" of `selected_block_attention`) are
block-sparse attention over a token's query heads folded into query rows, all at the token's
position (`_Problem.rows_per_pos`); tokens sharing a tile mask each row by its own blocks on
the steps not all of them selected (`_Lists.rows`, `_rows_select`).
NSA's block importance (`importance_pallas`, impl="pallas" of `compressed_importance`) folds a
token's heads into rows the same way and sums each token's rows with a second wgmma (R @ P);
`auto` takes it (its GPU tests pass; `IMPORTANCE_ON_AUTO` switches that off).
Block top-k's estimate (`block_max_pallas`, impl="pallas" of `block_max_scores`) streams 64-key
blocks past a CTA's rows and writes each row's max per block; `auto` takes it (its GPU tests
pass; `BLOCK_MAX_ON_AUTO` switches that off).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from longax.kernels._checks import concrete
from longax.kernels._vma import same_vma
from longax.kernels.attention import AttnSpec, merge_partials
from longax.kernels.gpu import kernel, not_on_hopper
from longax.kernels.visibility import index_mask, key_blocks, query_blocks, visible_pairs

LOG2E = math.log2(math.e)
_UNBOUNDED = 2**30  # a window wider than any sequence (int32-safe in the block arithmetic)
MAX_BWD_HEAD_DIM = 128  # above: the backward runs the XLA path (dk + dv accumulators > registers)
_WG = plgpu.Layout.WGMMA


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Tile sizes and pipeline depth (rows per compute warpgroup; `wgs` warpgroups per CTA)."""
  block_q: int = 64
  block_kv: int = 128
  stages: int = 2
  wgs: int = 2
  bwd_block_q: int = 64
  bwd_block_kv: int = 64
  bwd_stages: int = 2
  bwd_wgs: int = 2
  pingpong: bool = True  # forward with wgs=2: the warpgroups alternate on the tensor cores
  bwd_splits: int = 0  # dk/dv CTAs per key tile (each a share of its query steps, partial sums
  #   added after): 0 picks by occupancy (`_dkv_splits`)

  def __post_init__(self):
    for name in ("block_q", "block_kv", "bwd_block_q", "bwd_block_kv"):
      if getattr(self, name) % 64:
        raise ValueError(f"Blocks.{name}={getattr(self, name)} must be a multiple of 64")
    if (min(self.stages, self.bwd_stages) < 1 or self.wgs not in (1, 2) or self.bwd_wgs not in (1, 2)
        or self.bwd_splits < 0):
      raise ValueError(f"bad pipeline settings {self}")


# Tuned defaults, one row per head dim (bf16 and f16 alike): `benchmarks/autotune_attention.py`.
TUNED: dict[int, Blocks] = {
    64: Blocks(block_q=64, block_kv=128, stages=2),
    128: Blocks(block_q=64, block_kv=128, stages=2),
    256: Blocks(block_q=64, block_kv=64, stages=2),
}


@dataclasses.dataclass(frozen=True)
class _Problem:
  spec: Any  # attention.AttnSpec
  t: int  # real query / key lengths (the arrays may be padded)
  s: int
  group: int  # query heads per KV head
  segments: bool
  blocks: Blocks
  rows_per_pos: int = 1  # query rows per position (NSA's selected blocks: a token's heads)
  select_block: int | None = None  # rows list their own key blocks (`_Lists.rows`) of this size
  vs: str | None = None  # MInference's passes, "vertical" | "slash" (`vertical_slash_pallas`)
  cols: bool = False  # each query block (block_q rows) masks its own key columns (`_Lists.cols`)

  @property
  def key_vec(self):  # the forward streams an int32 vector per key block (k_seg)
    return self.segments or self.vs is not None

  @property
  def offset(self):  # query row i sits at position i // rows_per_pos + offset (bottom-right)
    return self.s - self.t // self.rows_per_pos

  def pos(self, row):
    """The position of query row `row` (a scalar or numpy array)."""
    return (row if self.rows_per_pos == 1 else row // self.rows_per_pos) + self.offset

  @property
  def sinks(self):
    return self.spec.sinks if self.spec.window is not None else 0


# ----------------------------------------------------------------------------- tile math


def _bcast(vec, shape, dim):
  """A row (dim=0) or column (dim=1) vector broadcast to a WGMMA-layout tile; the cast pins
  the layout for Mosaic GPU's inference."""
  return plgpu.layout_cast(lax.broadcast_in_dim(vec, shape, [dim]), _WG)


def _index_tile(shape, dim, base):
  """Positions base + i along axis `dim` of a WGMMA-layout tile (a vector broadcast)."""
  vec = plgpu.broadcasted_iota(jnp.int32, (shape[dim],), 0, layout=_WG.reduce(1 - dim)) + base
  return _bcast(vec, shape, dim)


def _pos_tile(pb: _Problem, shape, dim, first_row):
  """The positions of query rows first_row + i along axis `dim` of a WGMMA-layout tile."""
  if pb.rows_per_pos == 1:
    return _index_tile(shape, dim, first_row + pb.offset)
  rows = plgpu.broadcasted_iota(jnp.int32, (shape[dim],), 0, layout=_WG.reduce(1 - dim)) + first_row
  return _bcast(lax.div(rows, jnp.int32(pb.rows_per_pos)) + pb.offset, shape, dim)


def _tile_mask(pb: _Problem, shape, q_first, k_first, q_seg=None, k_seg=None, *,
               queries_on_rows=True):
  """Visibility of a tile: rows are queries (forward, dq) or keys (dk/dv)."""
  qd, kd = (0, 1) if queries_on_rows else (1, 0)
  qi = _pos_tile(pb, shape, qd, q_first)
  kj = _index_tile(shape, kd, k_first)
  spec = pb.spec
  ok = visible_pairs(qi, kj, causal=spec.causal, window=spec.window, sinks=pb.sinks)
  if pb.s % _key_multiple(pb.blocks):  # padded keys
    pad = kj < pb.s
    ok = pad if ok is None else ok & pad
  if pb.segments:
    same = _bcast(q_seg, shape, qd) == _bcast(k_seg, shape, kd)
    ok = same if ok is None else ok & same
  return ok


def _log2_logits(spec, raw):
  """Softmax logits times log2(e) (softcap c * tanh(s / c) first)."""
  if spec.softcap is None:
    return raw * (spec.scale * LOG2E)
  return jnp.tanh(raw * (spec.scale / spec.softcap)) * (spec.softcap * LOG2E)


def _sigmoid_p(spec, raw):
  """sigmoid(s + bias) as 0.5 tanh(x / 2) + 0.5: one tanh.approx on the SFU, where
  1 / (1 + exp(-x)) costs an exp and a division (the FlashSigmoid trick)."""
  return 0.5 * jnp.tanh(raw * (0.5 * spec.scale) + 0.5 * spec.bias) + 0.5


def _ds_factor(spec, raw):
  """d logits / d (scale * raw) for softcap (1 - tanh^2), else None."""
  if spec.softcap is None:
    return None
  t = jnp.tanh(raw * (spec.scale / spec.softcap))
  return 1.0 - t * t


# ------------------------------------------------------------------------------ schedule


class _Steps(NamedTuple):
  """A CTA's sequence of blocks: step i loads block `block(i)`; with sinks the sink blocks
  [0, n_sink) come first, then [first, first + n - n_sink)."""
  n: Any
  first: Any
  n_sink: Any | None

  def block(self, step):
    if self.n_sink is None:
      return step + self.first
    return jnp.where(step < self.n_sink, step, step - self.n_sink + self.first)


class _Split(NamedTuple):
  """One warpgroup's part of the CTA's steps: masked [0, p) (sink blocks), skip [p, a),
  masked [a, b), plain [b, c), masked [c, d), skip [d, n)."""
  a: Any
  b: Any
  c: Any
  d: Any
  p: Any = 0


def _kv_schedule(pb: _Problem, row0, rows_per_wg: int, wgs: int, block_kv: int):
  """Key blocks for query rows [row0, row0 + wgs * rows_per_wg): the CTA's steps and each
  warpgroup's split."""
  spec = pb.spec
  assert pb.rows_per_pos == 1, "the dense schedules take one row per position"
  first_pos = lambda r: r + pb.offset
  n_real = -(-pb.s // block_kv)  # blocks past the keys (padding) are never visited
  ranges = [key_blocks(first_pos(row0 + w * rows_per_wg), first_pos(row0 + (w + 1) * rows_per_wg - 1),
                       block_kv, n_real, causal=spec.causal, window=spec.window) for w in range(wgs)]
  full_cap = jnp.int32(pb.s // block_kv)  # blocks holding no padding
  lo_all, hi_all = ranges[0][0], ranges[-1][1]
  if pb.sinks:  # the sink blocks first (masked), then the window's blocks from `start`
    n_sink = jnp.minimum(jnp.int32(-(-pb.sinks // block_kv)), hi_all)
    start = jnp.maximum(lo_all, n_sink)
    steps = _Steps(n_sink + jnp.maximum(hi_all - start, 0), start, n_sink)
  else:
    n_sink, start = 0, lo_all
    steps = _Steps(hi_all - lo_all, lo_all, None)
  splits = []
  for lo, hi, full_lo, full_hi in ranges:
    # window blocks >= start hold no sink key, so the window's own ranges apply to them
    at = lambda blk: n_sink + jnp.maximum(blk - start, 0)
    a, d = at(lo), jnp.maximum(at(hi), at(lo))
    if pb.segments:
      b = c = d
    else:
      b = jnp.clip(at(full_lo), a, d)
      c = jnp.clip(at(jnp.minimum(full_hi, full_cap)), b, d)
    splits.append(_Split(a, b, c, d, n_sink))
  return steps, splits


def _q_schedule(pb: _Problem, key0, keys_per_wg: int, wgs: int, block_q: int, n_q: int):
  """Query blocks that see keys [key0, key0 + wgs * keys_per_wg): (lo_all, n) and each
  warpgroup's split of [0, n) (per query head of the group)."""
  spec = pb.spec
  assert pb.rows_per_pos == 1, "the dense schedules take one row per position"
  ranges = [query_blocks(key0 + w * keys_per_wg, key0 + (w + 1) * keys_per_wg - 1, block_q, n_q,
                         pb.offset, causal=spec.causal, window=spec.window, sinks=pb.sinks)
            for w in range(wgs)]
  lo_all = ranges[0][0]
  hi_all = functools.reduce(jnp.maximum, [r[1] for r in ranges])
  splits = []
  for lo, hi, full_lo, full_hi in ranges:
    a, d = lo - lo_all, hi - lo_all
    if pb.segments:  # (with sinks the window's full range stays exact: sinks only add pairs)
      b = c = d
    else:
      b = jnp.clip(full_lo - lo_all, a, d)
      c = jnp.clip(full_hi - lo_all, b, d)
    splits.append(_Split(a, b, c, d))
  return lo_all, hi_all - lo_all, splits


def _produce(n, stages: int, loads):
  """Memory warpgroup: step i's copies go to slot i % stages once its consumers freed it.
  loads: [(free_barriers, load(step, slot))] in the order the consumers free them."""
  for i in range(stages):
    @pl.when(i < n)
    def _():
      for _, load in loads:
        load(jnp.int32(i), i)

  @pl.loop(0, jnp.maximum(n - stages, 0))
  def _(step):
    slot = lax.rem(step, jnp.int32(stages))
    for free, load in loads:
      plgpu.barrier_wait(free.at[slot])
      load(step + stages, slot)


def _drain(n, stages: int, frees):
  """The memory warpgroup waits on the last steps' frees too: a thread that waits on a
  barrier must observe all its phases (what Mosaic GPU's interpreter checks)."""
  @pl.loop(jnp.maximum(n - stages, 0), n)
  def _(step):
    for free in frees:
      plgpu.barrier_wait(free.at[lax.rem(step, jnp.int32(stages))])


def _kv_producer(pb: _Problem, steps: _Steps, b, h, bkv: int, stages: int, wgs: int, refs,
                 bufs, bars):
  """The memory warpgroup of the forward and dq kernels: K blocks (with their segment ids)
  and V blocks of `steps` into the ring; K and V slots are freed separately."""
  k_ref, v_ref, ks_ref = refs
  k_smem, v_smem, ks_smem = bufs
  k_bars, v_bars, ks_bars, k_free, v_free = bars
  plgpu.set_max_registers(40 if wgs == 2 else 24, action="decrease")
  kvh = lax.div(h, jnp.int32(pb.group))

  def load_k(i, slot):
    rows = pl.ds(steps.block(i) * bkv, bkv)
    plgpu.copy_gmem_to_smem(k_ref.at[b, rows, kvh], k_smem.at[slot], k_bars.at[slot])
    if pb.key_vec:  # segment ids [B, Sp], or vertical-slash's per-head vectors [B, H, Sp]
      src = ks_ref.at[b, h, rows] if pb.vs is not None else ks_ref.at[b, rows]
      plgpu.copy_gmem_to_smem(src, ks_smem.at[slot], ks_bars.at[slot])

  def load_v(i, slot):
    rows = pl.ds(steps.block(i) * bkv, bkv)
    plgpu.copy_gmem_to_smem(v_ref.at[b, rows, kvh], v_smem.at[slot], v_bars.at[slot])

  _produce(steps.n, stages, [(k_free, load_k), (v_free, load_v)])
  if _interpreting():  # (on the GPU the CTA just ends)
    _drain(steps.n, stages, (k_free, v_free))


def _run_split(split: _Split, n, step_fn, skip_fn, carry, start=0):
  """Runs one warpgroup's steps [start, n) of a split (see `_Split`)."""
  masked, plain = (functools.partial(step_fn, masked=m) for m in (True, False))
  if not isinstance(split.p, int):  # sink blocks
    carry = lax.fori_loop(start, start + split.p, masked, carry)
  carry = lax.fori_loop(start + split.p, split.a, skip_fn, carry)
  carry = lax.fori_loop(split.a, split.b, masked, carry)
  carry = lax.fori_loop(split.b, split.c, plain, carry)
  carry = lax.fori_loop(split.c, split.d, masked, carry)
  return lax.fori_loop(split.d, n, skip_fn, carry)


class _Lists(NamedTuple):
  """Block lists of one kernel (block-sparse attention), per [B|1, heads|1, CTA tile]: the
  memory warpgroup streams `steps` [.., L] int32 (blocks: key blocks, or for dk/dv g * n_q +
  query block), the union of the compute warpgroups' own steps; warpgroup w computes the
  steps at positions `own` [.., wgs, L] (ascending) and skips the others; `counts`
  [.., 1 + 2 wgs]: (len(steps), then per warpgroup len(own) and how many of its own steps
  lead unmasked; the rest run masked)."""
  steps: Any
  own: Any
  counts: Any
  rows: Any = None  # int32 [B, Hkv, n, Tp]: each query row's key blocks (-1 unused), or None
  runs: Any = None  # vertical-slash's slash pass: int32 [.., wgs, 2, L], warpgroup w's runs
  #   of offsets crossing step i are [runs[w, 0, i], runs[w, 1, i]) of `diags`
  diags: Any = None  # int32 [B, H, 2, NR]: each (b, h)'s runs of offsets (lo, hi), ascending
  cols: Any = None  # int32 [B|1, H|1, Tp / block_q, Sp / block_kv, block_kv]: the key columns
  #   each query block sees (1) or not (0), the forward's every step masked by them


class _Listed(NamedTuple):
  """A CTA's steps from its `_Lists` refs (GMEM, read as scalars): step i loads block
  `block(i)`; `run` is a warpgroup's part, as `_run_split` is for the dense schedule."""
  n: Any
  steps: Any  # refs of this CTA: [L], [wgs, L], [1 + 2 wgs]
  own: Any
  counts: Any

  @classmethod
  def at(cls, refs: _Lists, b, h, tile):
    """The lists of CTA (b, h, tile); lists of one batch / head entry are shared."""
    counts = _cta(refs.counts, b, h, tile)
    return cls(counts[0], _cta(refs.steps, b, h, tile), _cta(refs.own, b, h, tile), counts)

  def block(self, step):
    return self.steps[step]

  def run(self, wg, step_fn, skip_fn, carry):
    """Warpgroup wg's steps: its own ones (plain, then masked), every other step skipped."""
    own = self.own.at[wg]

    def part(lo, hi, masked, state):
      def body(j, state):
        at, carry = state
        pos = own[j]
        carry = lax.fori_loop(at, pos, skip_fn, carry)
        return pos + 1, step_fn(pos, carry, masked=masked)
      return lax.fori_loop(lo, hi, body, state)

    n_own, n_plain = self.counts[1 + 2 * wg], self.counts[2 + 2 * wg]
    state = part(jnp.int32(0), n_plain, False, (jnp.int32(0), carry))
    at, carry = part(n_plain, n_own, True, state)
    return lax.fori_loop(at, self.n, skip_fn, carry)


def _cta(ref, b, h, tile):
  """A list ref [B|1, H|1, tiles, ...] at CTA (b, h, tile) (entries of size 1 shared)."""
  return ref.at[b if ref.shape[0] > 1 else 0, h if ref.shape[1] > 1 else 0, tile]


def _kv_steps(pb: _Problem, row0, rows_per_wg: int, wgs: int, block_kv: int, lists, b, h, tile):
  """The forward / dq kernel's key-block steps and `run(wg, step_fn, skip_fn, carry)`: from
  the key ranges (`_kv_schedule`), or from block lists (refs, or None)."""
  if lists is not None:
    steps = _Listed.at(lists, b, h, tile)
    return steps, steps.run
  steps, splits = _kv_schedule(pb, row0, rows_per_wg, wgs, block_kv)
  return steps, lambda wg, *a: _run_split(_pick(splits, wg), steps.n, *a)


def _heavy_first(axis: str, n: int):
  """Query tiles in reverse launch order: under causal masking the last tiles see the most
  keys, so they start first and the short ones fill the tail (longest-processing-time)."""
  return n - 1 - lax.axis_index(axis)


def _tiles(dtype, *shape):
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


def _pick(x, w):
  """x[w] for a static list indexed by the traced warpgroup index."""
  out = x[-1]
  for i in range(len(x) - 2, -1, -1):
    out = jax.tree.map(lambda a, b: a if a is b else jnp.where(w == i, a, b), x[i], out)
  return out


def _rows_smem(pb: _Problem, lists, slots: int, rows: int) -> tuple:
  """SMEM for `slots` tiles' row key-block lists [n, rows] (rows listing their own blocks)."""
  if pb.select_block is None:
    return ()
  return (plgpu.SMEM((slots, lists.rows.shape[2], rows), jnp.int32),)


def _list_args(lists: _Lists | None) -> tuple:
  """A kernel's list inputs (none for the dense schedule; `rows` only where given)."""
  return () if lists is None else tuple(x for x in lists if x is not None)


def _list_refs(refs, lists):
  """A kernel body's refs after its fixed inputs: (the `_Lists` refs or None, the rest)."""
  if lists is None:
    return None, refs
  names = [name for name, x in zip(lists._fields, lists) if x is not None]
  return _Lists(**dict(zip(names, refs))), refs[len(names):]


def _rows_select(pb: _Problem, rows_smem, first_key, shape, dim):
  """bool tile: query rows along axis `dim` (their key-block lists in rows_smem [n, rows])
  whose token selected the block of `pb.select_block` keys holding key `first_key`."""
  blk = lax.div(first_key, jnp.int32(pb.select_block))
  hits = sum((plgpu.load(rows_smem.at[j], layout=_WG.reduce(1 - dim)) == blk).astype(jnp.int32)
             for j in range(rows_smem.shape[0]))
  return _bcast(hits, shape, dim) > 0


def _and(mask, other):
  return other if mask is None else mask & other


def _vs_mask(pb: _Problem, shape, q_first, k_first, k_vec, runs=None):
  """Visibility of a forward tile of MInference's passes (`vertical_slash_pallas`).
  "vertical": keys are gathered columns at positions k_vec (padding: past S), seen where
  j <= p when causal. "slash": keys k_first + c on a run of offsets lo <= p - j <= hi (the
  warpgroup's runs at step i: runs = (its [2, L] ranges, the (b, h)'s diags [2, NR], i)) and
  not a vertical column (k_vec 1), which the vertical pass holds: a key on both counts once."""
  kv = _bcast(k_vec, shape, 1)
  if pb.vs == "vertical":  # (no unused position tile: Mosaic GPU cannot lay it out)
    ok = kv < pb.s
    return ok & (kv <= _pos_tile(pb, shape, 0, q_first)) if pb.spec.causal else ok
  ranges, diags, i = runs
  kj = _index_tile(shape, 1, k_first)
  rows = plgpu.broadcasted_iota(jnp.int32, (shape[0],), 0, layout=_WG.reduce(1))
  pos = rows + (q_first + pb.offset)  # the rows' positions (a vector, not a tile)

  def run(r, hit):  # row p holds keys p - hi <= j <= p - lo of run r: bounds per row, so no
    first = _bcast(pos - diags[1, r], shape, 0)  # [rows, keys] offset tile stays live in the
    last = _bcast(pos - diags[0, r], shape, 0)  # loop beside the scores and accumulator
    return hit | ((kj >= first) & (kj <= last))

  hit = lax.fori_loop(ranges[0, i], ranges[1, i], run, kj < 0)  # (kj < 0: none, laid out)
  return hit & (kv == 0)


def _interpreting() -> bool:
  """Whether kernels traced now run under Mosaic GPU's interpret mode
  (`plgpu.force_gpu_interpret_mode`: how the CPU tests run them)."""
  from jax._src import config
  return isinstance(config.pallas_tpu_interpret_mode_context_manager.value,
                    plgpu.InterpretGPUParams)


def _accumulate(acc, a, b, a_smem):
  """acc + a @ b on the tensor cores (a [M, K] in registers, b [K, N] in shared memory): in
  place (`pl.run_state`) on the GPU; under interpret mode, which has neither run_state nor
  register operands, through `a_smem` (a tile allocated only there: `_interpret_smem`) into a
  fresh accumulator added after."""
  if not _interpreting():
    def mma(acc_ref):
      plgpu.wgmma(acc_ref, a, b)

    return pl.run_state(mma)(plgpu.ACC.init(acc))
  a_smem[...] = a
  plgpu.commit_smem()

  def mma(acc_ref):
    plgpu.wgmma(acc_ref, a_smem, b)
    return acc_ref[...]

  return acc + pl.run_scoped(mma, plgpu.ACC(acc.shape, jnp.float32))


def _interpret_smem(dtype, *shape) -> tuple:
  """The register operands' shared-memory tiles of `_accumulate`: under interpret mode only."""
  return (_tiles(dtype, *shape),) if _interpreting() else ()


# ------------------------------------------------------------------------------- forward


def _forward(q, k, v, q_seg, k_seg, pb: _Problem, lists: _Lists | None = None):
  """q [B, Tp, H, D] (Tp a multiple of wgs * block_q), k/v [B, Sp, Hkv, D] (Sp a multiple of
  block_kv) -> (o [B, Tp, H, D], lse [B, H, Tp] float32 in log2 units, +inf for empty rows).
  lists: the key blocks of each query tile (block-sparse), else the causal / window ranges."""
  bsz, tp, heads, d = q.shape
  sp = k.shape[1]
  blk = pb.blocks
  bq, bkv, stages, wgs = blk.block_q, blk.block_kv, blk.stages, blk.wgs
  pingpong = wgs == 2 and blk.pingpong
  softmax = pb.spec.kind == "softmax"
  dtype = q.dtype
  spec = pb.spec
  select = pb.select_block is not None
  cols = pb.cols

  def body(q_ref, k_ref, v_ref, qs_ref, ks_ref, *refs):
    list_refs, (o_ref, lse_ref, smem, bars) = _list_refs(refs, lists)
    q_smem2, k_smem, v_smem, lse_smem2, qs_smem2, ks_smem, *extra = smem
    sel_smem2, cols_smem2 = extra[:select], extra[select:select + cols]
    p_smem2 = extra[select + cols:]
    q_bars, k_bars, v_bars, ks_bars, k_free, v_free, sched = bars
    b, h, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
    tile = _heavy_first("q_seq", tp // (wgs * bq))
    row0 = tile * (wgs * bq)
    steps, run = _kv_steps(pb, row0, bq, wgs, bkv, list_refs, b, h, tile)

    def ping():  # FlashAttention-3 ping-pong between the two compute warpgroups
      if pingpong:
        plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(sched)

    @pl.when(wg < wgs)
    def _compute():
      plgpu.set_max_registers(232 if wgs == 2 else 240, action="increase")
      q_smem = q_smem2.at[wg]
      q_row = row0 + wg * bq
      plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q_row, bq), h], q_smem, q_bars.at[wg])
      if pb.segments:
        plgpu.copy_gmem_to_smem(qs_ref.at[b, pl.ds(q_row, bq)], qs_smem2.at[wg], q_bars.at[wg])
      if select:
        plgpu.copy_gmem_to_smem(list_refs.rows.at[b, h, :, pl.ds(q_row, bq)], sel_smem2[0].at[wg],
                                q_bars.at[wg])
      if cols:  # this query block's column mask, [Sp / bkv, bkv]
        plgpu.copy_gmem_to_smem(_cta(list_refs.cols, b, h, lax.div(q_row, jnp.int32(bq))),
                                cols_smem2[0].at[wg], q_bars.at[wg])
      plgpu.barrier_wait(q_bars.at[wg])
      q_seg_vec = plgpu.load(qs_smem2.at[wg], layout=_WG.reduce(1)) if pb.segments else None

      def wait_keys(slot):
        plgpu.barrier_wait(k_bars.at[slot])
        if pb.key_vec:
          plgpu.barrier_wait(ks_bars.at[slot])

      def step(i, carry, masked):
        masked = masked or cols
        slot = lax.rem(i, jnp.int32(stages))
        wait_keys(slot)

        def qk(acc_ref):
          plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
          ping()
          return acc_ref[...]

        raw = pl.run_scoped(qk, plgpu.ACC((bq, bkv), jnp.float32))
        mask = None
        if masked and pb.vs is not None:
          k_vec = plgpu.load(ks_smem.at[slot], layout=_WG.reduce(0))
          runs = (_cta(list_refs.runs, b, h, tile).at[wg], list_refs.diags.at[b, h], i
                  ) if pb.vs == "slash" else None
          mask = _vs_mask(pb, (bq, bkv), q_row, steps.block(i) * bkv, k_vec, runs)
        elif masked:
          k_seg_vec = plgpu.load(ks_smem.at[slot], layout=_WG.reduce(0)) if pb.segments else None
          mask = _tile_mask(pb, (bq, bkv), q_row, steps.block(i) * bkv, q_seg_vec, k_seg_vec)
          if select:
            mask = _and(mask, _rows_select(pb, sel_smem2[0].at[wg], steps.block(i) * bkv,
                                           (bq, bkv), 0))
          if cols:
            col = plgpu.load(cols_smem2[0].at[wg, steps.block(i)], layout=_WG.reduce(0))
            mask = _and(mask, _bcast(col, (bq, bkv), 1) != 0)
        plgpu.barrier_arrive(k_free.at[slot])
        if softmax:
          acc, m_i, l_i = carry
          s = _log2_logits(spec, raw)
          if mask is not None:
            s = jnp.where(mask, s, -jnp.inf)
          m_new = jnp.maximum(m_i, s.max(axis=1))
          m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if mask is not None else m_new
          alpha = jnp.exp2(m_i - m_use)
          p = jnp.exp2(s - _bcast(m_use, s.shape, 0))
          acc = acc * _bcast(alpha, acc.shape, 0)
          l_i = l_i * alpha + p.sum(axis=1)
          p16 = p.astype(dtype)
          acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
          rest = (m_new, l_i)
        else:
          (acc,) = carry
          p = _sigmoid_p(spec, raw)
          if mask is not None:
            p = jnp.where(mask, p, 0.0)
          p16 = p.astype(dtype)
          rest = ()
        if pingpong:
          plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(v_bars.at[slot])
        if pingpong:
          plgpu.barrier_wait(sched)

        acc = _accumulate(acc, p16, v_smem.at[slot], p_smem2 and p_smem2[0].at[wg])
        plgpu.barrier_arrive(v_free.at[slot])
        return (acc, *rest)

      def skip(i, carry):
        slot = lax.rem(i, jnp.int32(stages))
        wait_keys(slot)
        plgpu.barrier_arrive(k_free.at[slot])
        ping()
        plgpu.barrier_wait(v_bars.at[slot])
        plgpu.barrier_arrive(v_free.at[slot])
        ping()
        return carry

      acc = plgpu.layout_cast(jnp.zeros((bq, d), jnp.float32), _WG)
      if softmax:
        carry = (acc, plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), _WG.reduce(1)),
                 plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), _WG.reduce(1)))
      else:
        carry = (acc,)
      pl.when(wg == 1)(ping)
      carry = run(wg, step, skip, carry)
      pl.when(wg == 0)(ping)

      if softmax:
        acc, m_i, l_i = carry
        ok = l_i > 0
        l_safe = jnp.where(ok, l_i, 1.0)
        acc = acc / _bcast(l_safe, acc.shape, 0)
        lse_smem2.at[wg][...] = jnp.where(ok, m_i + jnp.log2(l_safe), jnp.inf)
      else:
        (acc,) = carry
      q_smem[...] = acc.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b, pl.ds(q_row, bq), h])
      if softmax:
        plgpu.copy_smem_to_gmem(lse_smem2.at[wg], lse_ref.at[b, h, pl.ds(q_row, bq)])
      plgpu.wait_smem_to_gmem(0)

    pl.when(wg == wgs)(lambda: _kv_producer(
        pb, steps, b, h, bkv, stages, wgs, (k_ref, v_ref, ks_ref), (k_smem, v_smem, ks_smem),
        (k_bars, v_bars, ks_bars, k_free, v_free)))

  smem = (_tiles(dtype, wgs, bq, d), _tiles(dtype, stages, bkv, d), _tiles(dtype, stages, bkv, d),
          plgpu.SMEM((wgs, bq), jnp.float32), plgpu.SMEM((wgs, bq), jnp.int32),
          plgpu.SMEM((stages, bkv), jnp.int32)) + _rows_smem(pb, lists, wgs, bq) + (
              (plgpu.SMEM((wgs,) + lists.cols.shape[3:], jnp.int32),) if cols else ()) + (
              _interpret_smem(dtype, wgs, bq, bkv))
  bars = (plgpu.Barrier(num_arrivals=1 + pb.segments + select + cols, num_barriers=wgs),
          plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
          plgpu.Barrier(num_barriers=stages),
          plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
          plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
          plgpu.Barrier(num_arrivals=2))
  o, lse = kernel(
      body,
      out_type=[jax.ShapeDtypeStruct(q.shape, dtype),
                jax.ShapeDtypeStruct((bsz, heads, tp), jnp.float32)],
      scratch_types=[smem, bars],
      grid=(heads, tp // (wgs * bq), bsz),
      grid_names=("heads", "q_seq", "batch"),
      num_threads=wgs + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(q, k, v, q_seg, k_seg, *_list_args(lists))
  return o, lse


# ------------------------------------------------------------------------------ backward


def _backward_dq(q, k, v, do, lse, delta, q_seg, k_seg, pb: _Problem, lists: _Lists | None = None):
  """dq [B, Tp, H, D]: per query tile, stream K/V over the forward's key blocks (or `lists`)."""
  bsz, tp, heads, d = q.shape
  sp = k.shape[1]
  blk = pb.blocks
  bq, bkv, stages, wgs = blk.bwd_block_q, blk.bwd_block_kv, blk.bwd_stages, blk.bwd_wgs
  spec, dtype = pb.spec, q.dtype
  softmax = spec.kind == "softmax"
  select = pb.select_block is not None

  def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref, *refs):
    list_refs, (dq_ref, smem, bars) = _list_refs(refs, lists)
    q_smem2, do_smem2, k_smem, v_smem, stat_smem2, qs_smem2, ks_smem, *sel_smem2 = smem
    q_bars, k_bars, v_bars, ks_bars, k_free, v_free = bars
    b, h, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
    tile = _heavy_first("q_seq", tp // (wgs * bq))
    row0 = tile * (wgs * bq)
    steps, run = _kv_steps(pb, row0, bq, wgs, bkv, list_refs, b, h, tile)

    @pl.when(wg < wgs)
    def _compute():
      plgpu.set_max_registers(232 if wgs == 2 else 240, action="increase")
      q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
      q_row = row0 + wg * bq
      rows = pl.ds(q_row, bq)
      plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem, q_bars.at[wg])
      plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_smem, q_bars.at[wg])
      plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], stat_smem2.at[wg, 0], q_bars.at[wg])
      plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], stat_smem2.at[wg, 1], q_bars.at[wg])
      if pb.segments:
        plgpu.copy_gmem_to_smem(qs_ref.at[b, rows], qs_smem2.at[wg], q_bars.at[wg])
      if select:
        plgpu.copy_gmem_to_smem(list_refs.rows.at[b, h, :, rows], sel_smem2[0].at[wg], q_bars.at[wg])
      plgpu.barrier_wait(q_bars.at[wg])
      lse = plgpu.load(stat_smem2.at[wg, 0], layout=_WG.reduce(1))
      delta = plgpu.load(stat_smem2.at[wg, 1], layout=_WG.reduce(1))
      q_seg_vec = plgpu.load(qs_smem2.at[wg], layout=_WG.reduce(1)) if pb.segments else None

      def wait_keys(slot):
        plgpu.barrier_wait(k_bars.at[slot])
        if pb.segments:
          plgpu.barrier_wait(ks_bars.at[slot])

      def step(i, dq_acc, masked):
        slot = lax.rem(i, jnp.int32(stages))
        wait_keys(slot)
        plgpu.barrier_wait(v_bars.at[slot])

        def scores(refs):
          s_ref, dp_ref = refs
          plgpu.wgmma(s_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
          plgpu.wgmma(dp_ref, do_smem, v_smem.at[slot].transpose((1, 0)))

        zeros = plgpu.layout_cast(jnp.zeros((bq, bkv), jnp.float32), _WG)
        raw, dp = pl.run_state(scores)((plgpu.ACC.init(zeros), plgpu.ACC.init(zeros)))
        plgpu.barrier_arrive(v_free.at[slot])
        mask = None
        if masked:
          k_seg_vec = plgpu.load(ks_smem.at[slot], layout=_WG.reduce(0)) if pb.segments else None
          mask = _tile_mask(pb, (bq, bkv), q_row, steps.block(i) * bkv, q_seg_vec, k_seg_vec)
          if select:
            mask = _and(mask, _rows_select(pb, sel_smem2[0].at[wg], steps.block(i) * bkv,
                                           (bq, bkv), 0))
        if softmax:
          p = jnp.exp2(_log2_logits(spec, raw) - _bcast(lse, raw.shape, 0))
          if mask is not None:
            p = jnp.where(mask, p, 0.0)
          ds = p * (dp - _bcast(delta, raw.shape, 0))
        else:
          p = _sigmoid_p(spec, raw)
          if mask is not None:
            p = jnp.where(mask, p, 0.0)
          ds = dp * p * (1.0 - p)
        factor = _ds_factor(spec, raw)
        if factor is not None:
          ds = ds * factor

        def dq_mma(acc_ref):
          plgpu.wgmma(acc_ref, ds.astype(dtype), k_smem.at[slot])

        dq_acc = pl.run_state(dq_mma)(plgpu.ACC.init(dq_acc))
        plgpu.barrier_arrive(k_free.at[slot])
        return dq_acc

      def skip(i, carry):
        slot = lax.rem(i, jnp.int32(stages))
        wait_keys(slot)
        plgpu.barrier_wait(v_bars.at[slot])
        plgpu.barrier_arrive(v_free.at[slot])
        plgpu.barrier_arrive(k_free.at[slot])
        return carry

      dq = plgpu.layout_cast(jnp.zeros((bq, d), jnp.float32), _WG)
      dq = run(wg, step, skip, dq)
      q_smem[...] = (dq * spec.scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[b, rows, h])
      plgpu.wait_smem_to_gmem(0)

    pl.when(wg == wgs)(lambda: _kv_producer(
        pb, steps, b, h, bkv, stages, wgs, (k_ref, v_ref, ks_ref), (k_smem, v_smem, ks_smem),
        (k_bars, v_bars, ks_bars, k_free, v_free)))

  n_q_copies = 4 + pb.segments + select
  smem = (_tiles(dtype, wgs, bq, d), _tiles(dtype, wgs, bq, d), _tiles(dtype, stages, bkv, d),
          _tiles(dtype, stages, bkv, d), plgpu.SMEM((wgs, 2, bq), jnp.float32),
          plgpu.SMEM((wgs, bq), jnp.int32), plgpu.SMEM((stages, bkv), jnp.int32)
          ) + _rows_smem(pb, lists, wgs, bq)
  bars = (plgpu.Barrier(num_arrivals=n_q_copies, num_barriers=wgs),
          plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
          plgpu.Barrier(num_barriers=stages),
          plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
          plgpu.Barrier(num_arrivals=wgs, num_barriers=stages))
  return kernel(
      body,
      out_type=jax.ShapeDtypeStruct(q.shape, dtype),
      scratch_types=[smem, bars],
      grid=(heads, tp // (wgs * bq), bsz),
      grid_names=("heads", "q_seq", "batch"),
      num_threads=wgs + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(q, k, v, do, lse, delta, q_seg, k_seg, *_list_args(lists))


_SMS = 132  # an H100 SXM's SMs: the dk/dv split aims at a CTA per SM


def _dkv_splits(pb: _Problem, ctas: int, n: int, lists: bool) -> int:
  """dk/dv CTAs per key tile (`Blocks.bwd_splits`, else picked): ctas = B x Hkv x key tiles,
  n = G x n_q query steps a tile may take. Without lists a split takes a share of the group's
  query heads (a divisor of G): the fewest for a CTA per SM (the compressed branch of NSA,
  one KV head and T / 16 keys: 32 CTAs at 64k). With lists a split takes a range of the steps'
  numbers, and rows listing their own blocks (NSA's selected blocks, where a block every token
  selects makes one tile's list as long as the sequence) split every ~1024 numbers, at most 16."""
  want = pb.blocks.bwd_splits
  if not lists:
    divisors = [d for d in range(1, pb.group + 1) if pb.group % d == 0]
    if want:
      if want not in divisors:
        raise ValueError(f"Blocks.bwd_splits={want} must divide the {pb.group} query heads per KV head")
      return want
    return next((d for d in divisors if ctas * d >= _SMS), pb.group)
  if want:
    return max(1, min(want, n))
  occupancy = -(-_SMS // ctas)
  balance = min(16, -(-n // 1024)) if pb.select_block is not None or pb.rows_per_pos > 1 else 1
  return max(1, min(n, max(occupancy, balance)))


def _backward_dkv(q, k, v, do, lse, delta, q_seg, k_seg, pb: _Problem,
                  lists: _Lists | None = None):
  """dk, dv [B, Sp, Hkv, D]: per key tile of one KV head, stream the query blocks of every
  query head of its group that see it (or `lists`: steps g * n_q + query block). A tile's
  steps may go to several CTAs (`_dkv_splits`: query heads, or ranges of the lists' steps),
  whose partial sums are added after."""
  bsz, tp, heads, d = q.shape
  sp, kv_heads = k.shape[1], k.shape[2]
  blk = pb.blocks
  bq, bkv, stages, wgs = blk.bwd_block_q, blk.bwd_block_kv, blk.bwd_stages, blk.bwd_wgs
  n_q = -(-pb.t // bq)
  spec, dtype = pb.spec, q.dtype
  softmax = spec.kind == "softmax"
  group = pb.group
  select = pb.select_block is not None
  tiles = sp // (wgs * bkv)
  if lists is None:
    splits_n = _dkv_splits(pb, bsz * kv_heads * tiles, group * n_q, lists=False)
  else:  # the lists were cut per split: [.., tiles * splits, ..]
    splits_n = lists.steps.shape[2] // tiles
  heads_per = group // splits_n if lists is None else group

  def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref, *refs):
    list_refs, (dk_ref, dv_ref, smem, bars) = _list_refs(refs, lists)
    k_smem2, v_smem2, ks_smem2, q_smem, do_smem, stat_smem, qs_smem, *sel_smem = smem
    k_bars, q_bars, free = bars
    b, kvh, wg = lax.axis_index("batch"), lax.axis_index("kv_heads"), lax.axis_index("wg")
    cta = lax.axis_index("kv_seq")  # key tile * splits + split
    part = lax.rem(cta, jnp.int32(splits_n))
    key0 = lax.div(cta, jnp.int32(splits_n)) * (wgs * bkv)
    if list_refs is None:
      q_lo, nqs, splits = _q_schedule(pb, key0, bkv, wgs, bq, n_q)
      n = nqs * heads_per
      g0 = kvh * group + part * heads_per  # this split's first query head

      def where(i):  # step -> (query head, first query row)
        g = lax.div(i, jnp.maximum(nqs, 1))
        return g0 + g, (q_lo + i - g * nqs) * bq
    else:
      steps = _Listed.at(list_refs, b, kvh, cta)
      n = steps.n

      def where(i):  # step -> (query head, first query row): block g * n_q + query block
        blk = steps.block(i)
        g = lax.div(blk, jnp.int32(n_q))
        return kvh * group + g, (blk - g * n_q) * bq

    @pl.when(wg < wgs)
    def _compute():
      plgpu.set_max_registers(232 if wgs == 2 else 240, action="increase")
      k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
      k_row = key0 + wg * bkv
      rows = pl.ds(k_row, bkv)
      plgpu.copy_gmem_to_smem(k_ref.at[b, rows, kvh], k_smem, k_bars.at[wg])
      plgpu.copy_gmem_to_smem(v_ref.at[b, rows, kvh], v_smem, k_bars.at[wg])
      if pb.segments:
        plgpu.copy_gmem_to_smem(ks_ref.at[b, rows], ks_smem2.at[wg], k_bars.at[wg])
      plgpu.barrier_wait(k_bars.at[wg])
      k_seg_vec = plgpu.load(ks_smem2.at[wg], layout=_WG.reduce(1)) if pb.segments else None

      def step(i, carry, masked):
        dk_acc, dv_acc = carry
        slot = lax.rem(i, jnp.int32(stages))
        plgpu.barrier_wait(q_bars.at[slot])

        def scores(acc_ref):
          plgpu.wgmma(acc_ref, k_smem, q_smem.at[slot].transpose((1, 0)))
          return acc_ref[...]

        raw = pl.run_scoped(scores, plgpu.ACC((bkv, bq), jnp.float32))  # s^T
        mask = None
        if masked:
          q_seg_vec = plgpu.load(qs_smem.at[slot], layout=_WG.reduce(0)) if pb.segments else None
          mask = _tile_mask(pb, (bkv, bq), where(i)[1], k_row, q_seg_vec, k_seg_vec,
                            queries_on_rows=False)
          if select:
            mask = _and(mask, _rows_select(pb, sel_smem[0].at[slot], k_row, (bkv, bq), 1))
        if softmax:
          lse = plgpu.load(stat_smem.at[slot, 0], layout=_WG.reduce(0))
          p = jnp.exp2(_log2_logits(spec, raw) - _bcast(lse, raw.shape, 1))
        else:
          p = _sigmoid_p(spec, raw)
        if mask is not None:
          p = jnp.where(mask, p, 0.0)

        def dv_dp(refs):
          dv_ref_, dp_ref_ = refs
          plgpu.wgmma(dv_ref_, p.astype(dtype), do_smem.at[slot])
          plgpu.wgmma(dp_ref_, v_smem, do_smem.at[slot].transpose((1, 0)))

        zeros = plgpu.layout_cast(jnp.zeros((bkv, bq), jnp.float32), _WG)
        dv_acc, dp = pl.run_state(dv_dp)((plgpu.ACC.init(dv_acc), plgpu.ACC.init(zeros)))
        if softmax:
          delta = plgpu.load(stat_smem.at[slot, 1], layout=_WG.reduce(0))
          ds = p * (dp - _bcast(delta, raw.shape, 1))
        else:
          ds = dp * p * (1.0 - p)
        factor = _ds_factor(spec, raw)
        if factor is not None:
          ds = ds * factor

        def dk_mma(acc_ref):
          plgpu.wgmma(acc_ref, ds.astype(dtype), q_smem.at[slot])

        dk_acc = pl.run_state(dk_mma)(plgpu.ACC.init(dk_acc))
        plgpu.barrier_arrive(free.at[slot])
        return dk_acc, dv_acc

      def skip(i, carry):
        slot = lax.rem(i, jnp.int32(stages))
        plgpu.barrier_wait(q_bars.at[slot])
        plgpu.barrier_arrive(free.at[slot])
        return carry

      zeros = plgpu.layout_cast(jnp.zeros((bkv, d), jnp.float32), _WG)

      if list_refs is None:
        split = _pick(splits, wg)

        def per_head(g, carry):  # the steps of query head g of the group: [g * nqs, (g + 1) * nqs)
          base = g * nqs
          return _run_split(_Split(*(x + base for x in split[:4])), base + nqs, step, skip, carry,
                            base)

        # traced bounds: a while loop (a fori_loop with static bounds becomes a scan, whose
        # carry layouts Mosaic GPU's inference does not resolve here)
        dk, dv = lax.fori_loop(0, heads_per, per_head, (zeros, zeros))
      else:
        dk, dv = steps.run(wg, step, skip, (zeros, zeros))
      k_smem[...] = (dk * spec.scale).astype(dtype)
      v_smem[...] = dv.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[part, b, rows, kvh])
      plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[part, b, rows, kvh])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == wgs)
    def _memory():
      plgpu.set_max_registers(40 if wgs == 2 else 24, action="decrease")

      def load_q(i, slot):
        h, row = where(i)
        rows = pl.ds(row, bq)
        plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem.at[slot], q_bars.at[slot])
        plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_smem.at[slot], q_bars.at[slot])
        if softmax:
          plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], stat_smem.at[slot, 0], q_bars.at[slot])
          plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], stat_smem.at[slot, 1], q_bars.at[slot])
        if pb.segments:
          plgpu.copy_gmem_to_smem(qs_ref.at[b, rows], qs_smem.at[slot], q_bars.at[slot])
        if select:
          plgpu.copy_gmem_to_smem(list_refs.rows.at[b, h, :, rows], sel_smem[0].at[slot],
                                  q_bars.at[slot])

      _produce(n, stages, [(free, load_q)])

  n_copies = 2 + 2 * softmax + pb.segments + select
  smem = (_tiles(dtype, wgs, bkv, d), _tiles(dtype, wgs, bkv, d), plgpu.SMEM((wgs, bkv), jnp.int32),
          _tiles(dtype, stages, bq, d), _tiles(dtype, stages, bq, d),
          plgpu.SMEM((stages, 2, bq), jnp.float32), plgpu.SMEM((stages, bq), jnp.int32)
          ) + _rows_smem(pb, lists, stages, bq)
  bars = (plgpu.Barrier(num_arrivals=2 + pb.segments, num_barriers=wgs),
          plgpu.Barrier(num_arrivals=n_copies, num_barriers=stages),
          plgpu.Barrier(num_arrivals=wgs, num_barriers=stages))
  kv_shape = jax.ShapeDtypeStruct((splits_n,) + k.shape, dtype)
  dk, dv = kernel(
      body,
      out_type=[kv_shape, kv_shape],
      scratch_types=[smem, bars],
      grid=(kv_heads, tiles * splits_n, bsz),
      grid_names=("kv_heads", "kv_seq", "batch"),
      num_threads=wgs + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(q, k, v, do, lse, delta, q_seg, k_seg, *_list_args(lists))
  if splits_n == 1:
    return dk[0], dv[0]
  add = lambda x: jnp.sum(x, 0, dtype=jnp.float32).astype(dtype)
  return add(dk), add(dv)


# ---------------------------------------------------------------------------- the op


def _pad_to(x, axis, multiple, value=0):
  n = x.shape[axis]
  extra = -n % multiple
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def _key_multiple(blk: Blocks):
  return math.lcm(blk.block_kv, blk.bwd_wgs * blk.bwd_block_kv)


def _query_multiple(blk: Blocks):
  """T is padded to a multiple of this: every query tile, forward and backward."""
  return math.lcm(blk.wgs * blk.block_q, blk.bwd_wgs * blk.bwd_block_q)


def _padded(q, k, v, q_seg, k_seg, blk: Blocks):
  """Pads T to a multiple of every query tile and S of every key tile (fwd and bwd)."""
  tq = _query_multiple(blk)
  tk = _key_multiple(blk)
  q = _pad_to(q, 1, tq)
  k, v = _pad_to(k, 1, tk), _pad_to(v, 1, tk)
  if q_seg is None:
    q_seg = jnp.zeros((q.shape[0], q.shape[1]), jnp.int32)
    k_seg = jnp.zeros((k.shape[0], k.shape[1]), jnp.int32)
  else:
    q_seg = _pad_to(q_seg.astype(jnp.int32), 1, tq, -1)
    k_seg = _pad_to(k_seg.astype(jnp.int32), 1, tk, -2)
  return q, k, v, q_seg, k_seg


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, q_seg, k_seg, lists, pb: _Problem):
  """-> (o [B, T, H, D], lse [B, T, H] float32 natural log, -inf for a row that sees no key;
  None for sigmoid), both differentiable. lists: `_SparseLists` (block-sparse) or None."""
  return _flash_fwd(q, k, v, q_seg, k_seg, lists, pb)[0]


def _flash_fwd(q, k, v, q_seg, k_seg, lists, pb: _Problem):
  t = q.shape[1]
  qp, kp, vp, qs, ks = _padded(q, k, v, q_seg, k_seg, pb.blocks)
  o, lse = _forward(qp, kp, vp, qs, ks, pb, lists and lists.fwd)
  lse_out = _lse_public(lse, t) if pb.spec.kind == "softmax" else None
  return (o[:, :t], lse_out), (q, k, v, q_seg, k_seg, lists, o, lse)


def _flash_bwd(pb: _Problem, res, cts):
  q, k, v, q_seg, k_seg, lists, o, lse = res
  do, dlse = cts
  dq, dk, dv = _grads(pb, q, k, v, q_seg, k_seg, o, lse, do, dlse, lists)
  return dq, dk, dv, _no_grad(q_seg), _no_grad(k_seg), jax.tree.map(_no_grad, lists)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _lse_public(lse, t: int):
  """The kernel's [B, H, Tp] log2 (+inf: empty row) -> [B, T, H] natural log (-inf: empty)."""
  return jnp.swapaxes(jnp.where(jnp.isposinf(lse), -jnp.inf, lse / LOG2E)[:, :, :t], 1, 2)


def _lse_kernel(lse, tp: int):
  """[B, T, H] natural log (-inf: empty row) -> the kernel's [B, H, Tp] log2 (+inf: empty)."""
  x = jnp.swapaxes(jnp.where(jnp.isneginf(lse), jnp.inf, lse * LOG2E), 1, 2)
  return _pad_to(x, 2, tp, jnp.inf)


def _grads(pb: _Problem, q, k, v, q_seg, k_seg, o, lse, do, dlse=None, lists=None):
  """(dq, dk, dv) from rows whose output o [B, T or Tp, H, D] and kernel lse [B, H, Tp] may
  cover more keys than k holds (ring attention: then this key block's share of dq and its
  dk, dv). dlse [B, T, H]: the cotangent of the public lse (d lse / d s = p), or None.
  lists: `_SparseLists` (block-sparse; the head dim is within the kernels' limit) or None."""
  t, s = q.shape[1], k.shape[1]
  if q.shape[-1] > MAX_BWD_HEAD_DIM:
    assert lists is None, "block-sparse: head dims above MAX_BWD_HEAD_DIM are unsupported"
    return _xla_backward(pb, (q, k, v, q_seg, k_seg, o, lse), do, dlse)
  qp, kp, vp, qs, ks = _padded(q, k, v, q_seg, k_seg, pb.blocks)
  tp = qp.shape[1]
  dop, op = (_pad_to(x, 1, tp) for x in (do, o[:, :t]))
  if pb.spec.kind == "softmax":  # delta_i = do_i . o_i (- dlse_i: the lse's own cotangent)
    delta = jnp.einsum("bthd,bthd->bht", dop.astype(jnp.float32), op.astype(jnp.float32))
    if dlse is not None:
      delta = delta - _pad_to(jnp.swapaxes(dlse, 1, 2), 2, tp)
  else:
    delta = jnp.zeros_like(lse)
  dq = _backward_dq(qp, kp, vp, dop, lse, delta, qs, ks, pb, lists and lists.dq)
  dk, dv = _backward_dkv(qp, kp, vp, dop, lse, delta, qs, ks, pb, lists and lists.dkv)
  return dq[:, :t], dk[:, :s], dv[:, :s]


def _no_grad(seg):
  """The cotangent of integer segment ids."""
  return None if seg is None else jnp.zeros(seg.shape, jax.dtypes.float0)


def _xla_backward(pb: _Problem, res, do, dlse=None):
  """The XLA path's FlashAttention-2 backward from the kernel's residuals (head dims whose
  dk/dv accumulators do not fit the registers)."""
  xla = sys.modules["longax.kernels.attention"]  # the op's module (it imports this one)
  q, k, v, q_seg, k_seg, o, lse = res
  b, t, h, _ = q.shape
  hkv = k.shape[2]
  lse_nat = dlse_int = None
  if pb.spec.kind == "softmax":
    lse_nat = (lse[:, :, :t] / LOG2E).reshape(b, hkv, h // hkv, t)
    if dlse is not None:
      dlse_int = jnp.swapaxes(dlse, 1, 2).reshape(b, hkv, h // hkv, t)
  q_pos = xla.query_positions(t, k.shape[1])
  k_pos = jnp.arange(k.shape[1], dtype=jnp.int32)
  return xla._flash_backward(pb.spec, xla.KV_BLOCK,
                             (q, k, v, q_pos, k_pos, q_seg, k_seg, o[:, :t], lse_nat), do,
                             dlse_int)[:3]


def blocks_for(head_dim: int) -> Blocks:
  return TUNED[head_dim]


def unsupported(call: dict) -> str | None:
  """Why the kernel does not take this call (None: it does). `auto` asks this; under
  impl="pallas" the reason is the error message."""
  q, k, v, spec = call["q"], call["k"], call["v"], call["spec"]
  if (why := not_on_hopper(call)) is not None:
    return why
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"dtype {q.dtype} (the kernel takes bfloat16 and float16)"
  if q.shape[-1] not in TUNED:
    return f"head dim {q.shape[-1]} (the kernel takes {sorted(TUNED)})"
  if v.shape[-1] != q.shape[-1]:
    return f"value head dim {v.shape[-1]} != query head dim {q.shape[-1]}"
  if call.get("explicit_positions"):
    return "explicit q_positions / kv_positions (the kernel takes the default bottom-right positions)"
  return None


def _problem(q, k, spec, q_seg, blocks, rows_per_pos: int = 1, select_block: int | None = None):
  if not spec.causal and spec.window is None:
    # Non-causal runs as a window no pair can leave: the same visibility, but its block
    # bounds come from positions, which Mosaic GPU's layout inference needs here (with
    # constant bounds it fails on the dk/dv loop over query heads and on segment masks).
    spec = dataclasses.replace(spec, window=_UNBOUNDED, sinks=0)
  return _Problem(spec, q.shape[1], k.shape[1], q.shape[2] // k.shape[2], q_seg is not None,
                  blocks or blocks_for(q.shape[-1]), rows_per_pos, select_block)


def attention_pallas(q, k, v, q_pos, k_pos, q_seg, k_seg, spec, kv_block=None, blocks=None,
                     return_lse=False):
  """The kernel under the op's signature; positions must be the defaults (see `unsupported`)."""
  del q_pos, k_pos, kv_block
  pb = _problem(q, k, spec, q_seg, blocks)
  o, lse = _flash(*same_vma(q, k, v, q_seg, k_seg), None, pb)
  return (o, lse) if return_lse else o


def block_grads_pallas(q, k, v, q_pos, k_pos, q_seg, k_seg, spec, o, lse, do, kv_block=None,
                       blocks=None):
  """Ring attention's backward step on the kernels: one key block's share of dq and its dk,
  dv for rows whose o [B, T, H, Dv] and lse [B, T, H] (natural log, -inf: empty row; None
  for sigmoid) cover more keys. Positions must be the defaults (see `unsupported`)."""
  del q_pos, k_pos, kv_block
  pb = _problem(q, k, spec, q_seg, blocks)
  tq = _query_multiple(pb.blocks)
  tp = -(-q.shape[1] // tq) * tq
  lse_k = (_lse_kernel(lse, tp) if spec.kind == "softmax"
           else jnp.zeros((q.shape[0], q.shape[2], tp), jnp.float32))
  return _grads(pb, q, k, v, q_seg, k_seg, o, lse_k, do)


def block_grads_unsupported(call: dict) -> str | None:
  """As `unsupported`, and the backward kernels' head-dim limit."""
  if (why := unsupported(call)) is not None:
    return why
  if call["q"].shape[-1] > MAX_BWD_HEAD_DIM:
    return f"head dim {call['q'].shape[-1]} > {MAX_BWD_HEAD_DIM} (the backward kernels' limit)"
  return None


# ------------------------------------------------------------------- block-sparse attention
# The kernels above with block lists (`_Lists`) instead of the causal ranges: built here in
# XLA from the op's block mask, per kernel CTA tile; blocks never listed are never loaded.


class _SparseLists(NamedTuple):
  fwd: _Lists  # per (b, query head, query tile): key blocks of Blocks.block_kv
  dq: _Lists  # the same with the backward's tiles (bwd_block_q, bwd_block_kv)
  dkv: _Lists  # per (b, KV head, key tile): g * n_q + query block (bwd_block_q), g < group


def _lists(own, masked):
  """own, masked: bool [..., wgs, N] (does a warpgroup see candidate block n at all, does it
  need the mask there) -> `_Lists` over the union of the warpgroups' blocks. Steps are ordered
  by how many warpgroups mask them, then by block: under the causal rule (monotone in both
  positions) every warpgroup's masked steps then come after its plain ones; where they would
  not, the steps after its first masked one run masked (slower, never wrong). numpy where
  `own` is (a concrete mask: lists just long enough, constants), else traced jnp."""
  xp = np if isinstance(own, np.ndarray) else jnp
  argsort = (lambda x: np.argsort(x, -1, kind="stable")) if xp is np else (
      lambda x: jnp.argsort(x, -1, stable=True))
  w, n = own.shape[-2:]
  union = own.any(-2)  # [..., N]
  length = max(int(union.sum(-1).max(initial=0)), 1) if xp is np else n
  rank = xp.sum(own & masked, -2) * n + xp.arange(n)
  order = argsort(xp.where(union, rank, (w + 1) * n))[..., :length]  # step -> block
  pick = lambda x: xp.take_along_axis(x, order[..., None, :], -1)  # [..., wgs, L]
  own_s, masked_s = pick(own), pick(own & masked)
  pos = argsort(~own_s)  # own steps first, ascending
  n_own = own_s.sum(-1)
  late = xp.take_along_axis(masked_s, pos, -1)  # the j-th own step runs masked
  n_plain = xp.where(late.any(-1), xp.argmax(late, -1), n_own)
  counts = xp.concatenate([union.sum(-1)[..., None],
                           xp.stack([n_own, n_plain], -1).reshape(*n_own.shape[:-1], 2 * w)], -1)
  return _Lists(*(jnp.asarray(x, jnp.int32) for x in (order, pos, counts)))


def _op_rows(row0, bq: int, block_q: int, nq: int):
  """The op's query blocks (block_q rows) in kernel blocks of bq rows from row0 [...]:
  [..., max(1, bq // block_q)] (one, or several where op blocks are smaller: rows listing
  their own blocks), clipped to the last."""
  sub = max(1, bq // block_q)
  return np.minimum(row0[..., None] // block_q + np.arange(sub), nq - 1)


def _row_lists(mask, pb: _Problem, tq: int, bq: int, wgs: int, bkv: int, block_q: int,
               block_k: int):
  """The forward / dq kernel's lists: mask [B|1, H|1, nq, nk] (op blocks) -> per query tile
  of wgs x bq rows (T padded to a multiple of tq), the key blocks of bkv keys. Where op
  blocks are smaller than bq rows, a key block is a step where any of them lists it, masked
  where not all do (the rows' own lists then mask it: `_rows_select`)."""
  tiles = -(-pb.t // tq) * tq // (wgs * bq)
  row0 = (np.arange(tiles)[:, None] * wgs + np.arange(wgs)) * bq  # [tiles, wgs]
  key0 = np.arange(-(-pb.s // bkv)) * bkv  # [nkb]
  sel = mask[:, :, _op_rows(row0, bq, block_q, mask.shape[2])][..., key0 // block_k]
  bits, whole = sel.any(-2), sel.all(-2)  # [B|1, H|1, tiles, wgs, nkb]
  seen, full = _row_visibility(pb, row0, bq, key0, bkv)
  return _lists(bits & seen, ~(full & whole) & seen)


def _row_visibility(pb: _Problem, row0, bq: int, key0, bkv: int):
  """Warpgroups of bq query rows from row0 [tiles, wgs] against key blocks of bkv keys from
  key0 (broadcasting against [tiles, wgs, 1]): (seen: some pair visible under the causal rule,
  rows past T none; full: every pair visible and no padded key)."""
  first, last = (x[..., None] for x in (pb.pos(row0), pb.pos(np.minimum(row0 + bq, pb.t) - 1)))
  seen = (row0 < pb.t)[..., None] & ((key0 <= last) if pb.spec.causal else True)
  full = (key0 + bkv <= pb.s) & ((key0 + bkv - 1 <= first) if pb.spec.causal else True)
  return seen, full


def _key_lists(mask, pb: _Problem, bq: int, wgs: int, bkv: int, sp: int, heads: int,
               block_q: int, block_k: int):
  """The dk/dv kernel's lists: per key tile of wgs x bkv keys of one KV head, the query
  blocks (bq rows) of each query head g of its group, as g * n_q + query block; each tile's
  steps cut into `_dkv_splits` CTAs by ranges of that number ([.., tiles * splits, ..])."""
  n_q, kv_heads = -(-pb.t // bq), heads // pb.group
  tiles = sp // (wgs * bkv)
  key0 = (np.arange(tiles)[:, None] * wgs + np.arange(wgs)) * bkv  # [tiles, wgs]
  q0 = np.arange(n_q) * bq
  first, last = pb.pos(q0), pb.pos(np.minimum(q0 + bq, pb.t) - 1)
  xp = np if isinstance(mask, np.ndarray) else jnp
  per_head = xp.broadcast_to(mask, mask.shape[:1] + (heads,) + mask.shape[2:])
  per_head = per_head.reshape(mask.shape[0], kv_heads, pb.group, *mask.shape[2:])
  sel = per_head[..., _op_rows(q0, bq, block_q, mask.shape[2]), :]  # [.., G, n_q, sub, nk]
  sel = sel[..., np.minimum(key0 // block_k, mask.shape[3] - 1)]  # [.., n_q, sub, tiles, wgs]
  bits, whole = sel.any(4), sel.all(4)  # [B|1, Hkv, G, n_q, tiles, wgs]
  bits, whole = (xp.moveaxis(x, (2, 3), (-2, -1)) for x in (bits, whole))  # [.., tiles, wgs, G, n_q]
  seen = (key0 < pb.s)[..., None] & ((key0[..., None] <= last) if pb.spec.causal else True)
  full = (key0[..., None] + bkv <= pb.s) & ((key0[..., None] + bkv - 1 <= first)
                                             if pb.spec.causal else True)
  seen, full = seen[..., None, :], full[..., None, :]  # over G
  n = pb.group * n_q
  splits = _dkv_splits(pb, mask.shape[0] * kv_heads * tiles, n, lists=True)
  span = -(-n // splits)

  def cut(x):  # [.., tiles, wgs, G, n_q] -> [.., tiles * splits, wgs, span]
    x = x.reshape(*x.shape[:-2], n)
    widths = [(0, 0)] * (x.ndim - 1) + [(0, span * splits - n)]
    x = xp.pad(x, widths).reshape(*x.shape[:-1], splits, span)
    x = xp.moveaxis(x, -2, -3)  # [.., tiles, splits, wgs, span]
    return x.reshape(*x.shape[:-4], tiles * splits, wgs, span)

  own, masked = cut(bits & seen), cut(~(full & whole) & seen)
  lists = _lists(own, masked)
  base = jnp.asarray(np.arange(tiles * splits) % splits * span, jnp.int32)  # the split's first
  return lists._replace(steps=lists.steps + base[:, None])


def _sparse_lists(block_mask, pb: _Problem, heads: int, block_q: int, block_k: int,
                  row_lists=None):
  """The three kernels' lists from the op's block mask (numpy where it is concrete).
  row_lists(pb, tq, bq, wgs, bkv) -> `_Lists`: the forward / dq lists built another way (from
  traced block indices: `_index_row_lists`), else from the mask; one build where both tile
  alike."""
  blk = pb.blocks
  tq = _query_multiple(blk)
  sp = -(-pb.s // _key_multiple(blk)) * _key_multiple(blk)
  mask = concrete(block_mask)
  mask = jnp.asarray(block_mask) if mask is None else mask.astype(bool)
  sizes = dict(block_q=block_q, block_k=block_k)
  build = row_lists or functools.partial(_row_lists, mask, **sizes)
  rows = functools.cache(lambda bq, wgs, bkv: build(pb, tq, bq, wgs, bkv))
  return _SparseLists(
      rows(blk.block_q, blk.wgs, blk.block_kv),
      rows(blk.bwd_block_q, blk.bwd_wgs, blk.bwd_block_kv),
      _key_lists(mask, pb, blk.bwd_block_q, blk.bwd_wgs, blk.bwd_block_kv, sp, heads, **sizes))


def sparse_blocks(head_dim: int, block_q: int, block_k: int) -> Blocks:
  """The tuned tiles with the forward's key block dividing block_k (64 keys: a ring of 4).
  Ping-pong only where the CTA's two warpgroups share one query block (block_q a multiple of
  128, as dense attention): elsewhere a warpgroup skipping a step its block does not list runs
  ahead to its next one instead of waiting on the other's turn (a guess, to time on a GPU)."""
  blk = blocks_for(head_dim)
  blk = dataclasses.replace(blk, pingpong=block_q % (blk.wgs * blk.block_q) == 0)
  return blk if block_k % blk.block_kv == 0 else dataclasses.replace(blk, block_kv=64, stages=4)


def block_sparse_pallas(q, k, v, block_mask, spec, *, block_q: int, block_k: int, blocks=None,
                        return_lse=False, block_indices=None):
  """`block_sparse_attention` on the kernels (see `block_sparse_unsupported`). With traced
  block_indices [B|1, H|1, nq, n] (the mask's on blocks) the forward and dq lists come from
  them (`_index_row_lists`: sorts of a tile's n-long candidates, not of every key block)."""
  pb = _problem(q, k, spec, None, blocks or sparse_blocks(q.shape[-1], block_q, block_k))
  row_lists = None
  if block_indices is not None and concrete(block_indices) is None:
    row_lists = functools.partial(_index_row_lists, block_indices, rows=block_q, block_k=block_k)
  lists = _sparse_lists(block_mask, pb, q.shape[2], block_q, block_k, row_lists)
  o, lse = _flash(*same_vma(q, k, v), None, None, lists, pb)
  return (o, lse) if return_lse else o


def block_sparse_unsupported(call: dict) -> str | None:
  """As `unsupported`, the backward kernels' head-dim limit, and the block sizes: the
  kernels' 64-row query and key tiles must tile the op's blocks."""
  if (why := block_grads_unsupported(call)) is not None:
    return why
  for name in ("block_q", "block_k"):
    if call[name] % 64:
      return f"{name}={call[name]} (the kernel takes multiples of 64)"
  return None


# ------------------------------------------------------------- NSA's selected blocks
# The block-sparse kernels over a token's query heads folded into query rows: token t of KV
# group g is `rows` query rows (its G heads, zero rows after them) of a one-head-per-KV-head
# problem at position S - T + t (`_Problem.rows_per_pos`), and its selected blocks are a row
# of a block mask, so `_sparse_lists` builds all three kernels' lists as for block-sparse
# attention (op query blocks of `rows` rows, several to a tile where rows < 64).


def selected_rows(group: int, shared: bool = True) -> int:
  """Query rows per token: its `group` heads padded to the next power of two up to 64
  (shared: 64 / rows tokens share a 64-row tile), else to a whole number of 64-row tiles."""
  if shared and group <= 64:
    return 1 << (group - 1).bit_length()
  return -(-group // 64) * 64


def _selected_mask(block_indices, n_blocks: int):
  """int32 [B, T, Hkv, n] (-1 unused, repeats) -> bool [B, Hkv, T, n_blocks] (numpy where
  the indices are concrete, so the lists are just long enough)."""
  idx = concrete(block_indices)
  on = index_mask(jnp.asarray(block_indices) if idx is None else idx, n_blocks)
  return (np if idx is not None else jnp).swapaxes(on, 1, 2)


def _index_row_lists(indices, pb: _Problem, tq: int, bq: int, wgs: int, bkv: int, rows: int,
                     block_k: int) -> _Lists:
  """`_row_lists` built from traced block indices [B|1, H|1, R, n] (-1 unused, repeats count
  once): group r of `rows` query rows sees the key blocks (of block_k keys) indices[.., r, :]
  lists (NSA: a token's selected blocks, rows = its heads; block-sparse: a query block's).
  A tile's candidate key blocks are its groups' listed ones (sorted, repeats dropped), so the
  lists' sorts run over wgs x groups x n x (block_k / bkv) candidates per tile instead of every
  key block, and no [R, blocks] mask is built. The same lists as from the mask (tested)."""
  b, hx, n_rows, _ = indices.shape
  r, nkb = block_k // bkv, -(-pb.s // bkv)
  per_wg = max(1, bq // rows)  # row groups per warpgroup
  tiles = -(-pb.t // tq) * tq // (wgs * bq)
  row0 = (np.arange(tiles)[:, None] * wgs + np.arange(wgs)) * bq  # [tiles, wgs]
  grp = np.minimum(row0[..., None] // rows + np.arange(per_wg), n_rows - 1)  # [tiles, wgs, per_wg]
  idx = jnp.asarray(indices, jnp.int32)[:, :, grp]  # [B, H, tiles, wgs, per_wg, n]
  kb = idx[..., None] * r + np.arange(r)  # the kernel's key blocks of each listed block
  kb = jnp.where((idx[..., None] >= 0) & (kb < nkb), kb, nkb).reshape(b, hx, tiles, -1)
  cand = jnp.sort(kb, -1)
  repeat = jnp.concatenate([jnp.zeros_like(cand[..., :1], bool), cand[..., 1:] == cand[..., :-1]], -1)
  cand = jnp.sort(jnp.where(repeat, nkb, cand), -1)  # [B, H, tiles, C]: unique, ascending, then nkb
  valid = (cand < nkb)[:, :, :, None, :]  # over wgs
  hit = jnp.any(idx[..., None] == (cand // r)[:, :, :, None, None, None, :], -2)  # [.., wgs, per_wg, C]
  bits, whole = hit.any(-2) & valid, hit.all(-2)
  seen, full = _row_visibility(pb, row0, bq, cand[:, :, :, None, :] * bkv, bkv)
  seen = seen & valid
  lists = _lists(bits & seen, ~(full & whole) & seen)
  return lists._replace(steps=jnp.take_along_axis(cand, lists.steps, -1))


def selected_pallas(q, k, v, block_indices, spec, *, block_size: int, blocks=None,
                    shared: bool = True):
  """`selected_block_attention` on the block-sparse kernels (see `selected_unsupported`).

  A token's G query heads are `selected_rows(G, shared)` query rows (zero rows after them)
  of a problem with one query head per KV head, all at the token's position. shared (G < 64):
  64 / rows tokens share a 64-row tile; a tile's steps are the union of its tokens' blocks,
  masked where not all of them selected the block (each row then drops the keys of blocks
  its token did not list: `_Lists.rows`, `_rows_select`). Else each token fills whole tiles
  (1 - G/64 of the MMA rows padding where G < 64, and q, o, dq 64/G times the op's size).
  Forward and dq walk each tile's blocks; the dk/dv kernel walks, per 128-key tile, the
  64-row query blocks that selected it: a block every token selects (NSA's first, often)
  has a list as long as the sequence while most have a few, so that kernel's CTAs are
  unbalanced. Exact either way; untimed."""
  b, t, h, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  g = h // hkv
  rows = selected_rows(g, shared)
  qf = jnp.pad(q.reshape(b, t, hkv, g, d), ((0, 0),) * 3 + ((0, rows - g), (0, 0)))
  qf = jnp.swapaxes(qf, 2, 3).reshape(b, t * rows, hkv, d)  # [B, T * rows, Hkv, D]
  mask = _selected_mask(block_indices, -(-s_len // block_size))
  blk = blocks or sparse_blocks(d, rows, block_size)
  pb = _problem(qf, k, spec, None, blk, rows, block_size if rows < 64 else None)
  tq = _query_multiple(blk)
  row_lists = None  # traced indices: the forward and dq lists from the indices themselves
  if concrete(block_indices) is None:
    row_lists = functools.partial(_index_row_lists, jnp.swapaxes(block_indices, 1, 2),
                                  rows=pb.rows_per_pos, block_k=block_size)
  lists = _sparse_lists(mask, pb, hkv, rows, block_size, row_lists)
  if pb.select_block is not None:  # each row's own blocks: [B, Hkv, n, Tp] (-1 past T)
    per_row = jnp.repeat(jnp.asarray(block_indices, jnp.int32), rows, axis=1)
    per_row = _pad_to(jnp.transpose(per_row, (0, 2, 3, 1)), 3, tq, -1)
    lists = _SparseLists(*(x._replace(rows=per_row) for x in lists))
  o = _flash(*same_vma(qf, k, v), None, None, lists, pb)[0]
  o = jnp.swapaxes(o.reshape(b, t, rows, hkv, d)[:, :, :g], 2, 3)
  return o.reshape(b, t, h, d)


KEYED_DKV_SPLIT_STEPS = 1024  # `_keyed_lists`: dk/dv list positions per CTA before a split


def _keyed_lists(chunk_block, pb: _Problem, rows: int, block_size: int, max_chunks: int,
                 heads: int) -> _SparseLists:
  """The three kernels' lists for NSA's key-centric chunks (`keyed_chunks_pallas`), by
  arithmetic: chunk_block int32 [B, Hkv, N] (each chunk of `rows` query slots, its key block
  of `block_size`; >= ceil(S / block_size): empty), chunks sorted by block. Forward / dq: a
  query tile (inside one chunk) steps over its chunk's block. dk/dv: a warpgroup's keys lie
  in one block, whose chunks are a contiguous range (and a key tile's blocks are adjacent,
  so their ranges too): per query head g of the group the steps g * n_q + that range of
  query blocks. Every step plain (whole blocks, non-causal). max_chunks: a static bound on
  one block's chunks (ceil(T / rows): a token lists a block once)."""
  blk = pb.blocks
  b, hkv, n_ch = chunk_block.shape
  g = heads // hkv
  nb = -(-pb.s // block_size)
  live = chunk_block < nb
  cb = jnp.where(live, chunk_block, 0)

  def row_lists(bq, wgs, bkv):
    tile_rows = wgs * bq
    tiles = n_ch * rows // tile_rows
    r = block_size // bkv
    at = cb[:, :, np.arange(tiles) * tile_rows // rows]  # [B, Hkv, tiles]
    on = live[:, :, np.arange(tiles) * tile_rows // rows]
    steps = at[..., None] * r + np.arange(r, dtype=np.int32)
    own = jnp.broadcast_to(np.arange(r, dtype=np.int32), (b, hkv, tiles, wgs, r))
    counts = jnp.repeat(jnp.where(on, r, 0)[..., None], 1 + 2 * wgs, -1)
    rep = lambda x: jnp.repeat(x.astype(jnp.int32), g, axis=1)  # per query head
    return _Lists(rep(steps), rep(own), rep(counts))

  # dk/dv: chunk ranges per block, in query blocks of bwd_block_q rows
  bq, bkv, wgs = blk.bwd_block_q, blk.bwd_block_kv, blk.bwd_wgs
  per_chunk = rows // bq
  n_q = n_ch * per_chunk
  ends = jax.vmap(lambda x: jnp.searchsorted(x, jnp.arange(nb + 1), method="scan_unrolled"))(
      chunk_block.reshape(b * hkv, n_ch)).reshape(b, hkv, nb + 1).astype(jnp.int32) * per_chunk
  sp = -(-pb.s // _key_multiple(blk)) * _key_multiple(blk)
  tiles = sp // (wgs * bkv)
  key0 = (np.arange(tiles)[:, None] * wgs + np.arange(wgs)) * bkv  # [tiles, wgs]
  blk_w = np.minimum(key0 // block_size, nb - 1)
  on_w = key0 < pb.s
  lo_w = jnp.where(on_w, ends[..., blk_w], 0)  # [B, Hkv, tiles, wgs]
  len_w = jnp.where(on_w, ends[..., blk_w + 1], 0) - lo_w
  hi = jnp.max(jnp.where(on_w, lo_w + len_w, 0), -1)  # the union: adjacent blocks' ranges
  lo = jnp.min(jnp.where(on_w, lo_w, n_q), -1)
  length = jnp.maximum(hi - lo, 0)
  lo = jnp.where(length > 0, lo, 0)
  ell = g * max_chunks * per_chunk * -(-(wgs * bkv) // block_size)  # static list length
  p = np.arange(ell, dtype=np.int32)
  len1 = jnp.maximum(length, 1)[..., None]
  steps = (p // len1) * n_q + lo[..., None] + p % len1  # [B, Hkv, tiles, L]
  steps = jnp.where(p < g * length[..., None], steps, 0)
  lw = jnp.maximum(len_w, 1)[..., None]
  own = (p // lw) * len1[..., None, :] + (lo_w - lo[..., None])[..., None] + p % lw
  n_own = g * len_w
  # a tile's list cut into `splits` CTAs by position (partial dk / dv summed after), as
  # `_dkv_splits` cuts rows listing their own blocks: every ~KEYED_DKV_SPLIT_STEPS, at most 16
  ctas = b * hkv * tiles
  splits = min(max(-(-_SMS // ctas), min(16, -(-ell // KEYED_DKV_SPLIT_STEPS)), 1), ell)
  span = -(-ell // splits)
  j0 = np.arange(splits, dtype=np.int32)[:, None] * span  # [splits, 1]: each part's first
  pad = span * splits - ell
  steps = jnp.pad(steps, [(0, 0)] * 3 + [(0, pad)]).reshape(b, hkv, tiles * splits, span)
  # each warpgroup's own positions ascend: a part's share is a searchsorted range of them
  own_m = jnp.where(p < n_own[..., None], own, span * splits)  # [B, Hkv, tiles, wgs, L]
  cut = lambda x: jax.vmap(lambda r: jnp.searchsorted(r, x, method="scan_unrolled"))(
      own_m.reshape(-1, ell)).reshape(*own_m.shape[:-1], splits)
  before = cut(j0[:, 0])  # [.., wgs, splits]
  inside = cut(j0[:, 0] + span) - before
  idx = jnp.minimum(before[..., None] + np.arange(span), ell - 1)  # [.., wgs, splits, span]
  own = jnp.take_along_axis(own[..., None, :], idx, -1) - j0
  own = jnp.moveaxis(own, -2, 3).reshape(b, hkv, tiles * splits, wgs, span)
  total = jnp.clip(g * length[..., None] - j0[:, 0], 0, span)  # [B, Hkv, tiles, splits]
  inside = jnp.moveaxis(inside, -1, -2)  # [.., splits, wgs]
  counts = jnp.concatenate([total[..., None], jnp.repeat(inside, 2, -1)], -1)
  counts = counts.reshape(b, hkv, tiles * splits, 1 + 2 * wgs)
  dkv = _Lists(*(x.astype(jnp.int32) for x in (steps, own, counts)))
  return _SparseLists(row_lists(blk.block_q, blk.wgs, blk.block_kv),
                      row_lists(blk.bwd_block_q, blk.bwd_wgs, blk.bwd_block_kv), dkv)


def keyed_chunks_pallas(q, k, v, chunk_block, rows: int, block_size: int, *, spec,
                        max_chunks: int, blocks=None):
  """NSA's key-centric chunks (`sparse_attention._selected_keyed`) on the block-sparse
  kernels: q [B, N * rows, H, D] (slots; chunk c's rows attend to key block chunk_block[b,
  h // G, c] only, non-causal), k / v [B, S, Hkv, D] as they are -> (o [B, N * rows, H, D],
  lse [B, N * rows, H] natural log, -inf for empty slots). The lists come from arithmetic
  (`_keyed_lists`), so no key block is gathered and dk / dv accumulate in the dk/dv kernel
  (no scatter-add). Needs rows a multiple of both query tiles (128) and block_size of 64."""
  blk = blocks or sparse_blocks(q.shape[-1], rows, block_size)
  pb = _problem(q, k, dataclasses.replace(spec, causal=False), None, blk)
  for tile in (blk.wgs * blk.block_q, blk.bwd_wgs * blk.bwd_block_q):
    if rows % tile:
      raise ValueError(f"keyed_chunks_pallas: rows={rows} must be a multiple of the {tile}-row "
                       "query tiles")
  if block_size % 64:
    raise ValueError(f"keyed_chunks_pallas: block_size={block_size} must be a multiple of 64")
  lists = _keyed_lists(chunk_block, pb, rows, block_size, max_chunks, q.shape[2])
  return _flash(*same_vma(q, k, v), None, None, lists, pb)


def selected_unsupported(call: dict) -> str | None:
  """As `block_sparse_unsupported` (block_size for both block sizes, the query side being a
  token's rows), and at most 64 query heads per KV head (what the tests cover: one tile)."""
  if (why := block_grads_unsupported(call)) is not None:
    return why
  if call["block_size"] % 64:
    return f"block_size={call['block_size']} (the kernel takes multiples of 64)"
  group = call["q"].shape[2] // call["k"].shape[2]
  if group > 64:
    return f"{group} query heads per KV head (the kernel takes up to 64: one token's heads in a tile)"
  return None


# --------------------------------------------------------------- NSA's block importance
# `compressed_importance` (kernels/sparse_attention.py): per token and KV group, the compressed
# branch's probabilities summed over the group's G query heads. A token's heads are `rows`
# query rows (`selected_rows`, zero rows after them) as in `selected_pallas`, so a 64-row tile
# holds 64 / rows tokens. Per compressed key block: S = Q K^T (wgmma), P = exp2(S scale log2e -
# lse log2e) masked by end_j <= t, P to shared memory in q's dtype, then the group sum as a
# second wgmma R @ P with R [64, 64] 0/1 in shared memory (R[i, r] = 1 where row r is token
# i's), whose first 64 / rows rows are the tile's tokens' importance, written [tokens,
# block_k] float32. A memory warpgroup streams the K blocks through a ring, as the forward's.

# auto takes the kernel: `tests/gpu/test_sparse_attention_gpu.py -k importance` passed on an
# H100 (2026-11-26; NSA's forward at 64k 24.9 ms with it vs 56.5 on the XLA path, NOTES.md).
# Off: auto keeps the XLA path (impl="pallas" takes the kernel regardless).
IMPORTANCE_ON_AUTO = True


@dataclasses.dataclass(frozen=True)
class ImportanceBlocks:
  """Compressed keys per step (`block_k`), the K ring's depth, 64-row compute warpgroups."""
  block_k: int = 128
  stages: int = 2
  wgs: int = 2


@dataclasses.dataclass(frozen=True)
class _Importance:
  t: int  # real tokens
  n: int  # real compressed keys
  rows: int  # query rows per token (a power of two <= 64)
  block_size: int
  stride: int
  scale: float
  blocks: ImportanceBlocks

  @property
  def tokens(self):  # tokens per 64-row tile
    return 64 // self.rows

  def n_visible(self, last_token):
    """Compressed keys token `last_token` (int32, >= 0) sees: end_j <= t for j < this."""
    num = jnp.maximum(last_token - (self.block_size - 1) + self.stride, 0)
    return jnp.minimum(lax.div(num, jnp.int32(self.stride)), jnp.int32(self.n))

  def steps(self, row0):
    """Key blocks a CTA of query rows [row0, row0 + wgs * 64) computes: those its last real
    token sees (the rest of its output is written as zeros)."""
    rows_cta = self.blocks.wgs * 64
    last = jnp.minimum(lax.div(row0 + rows_cta, jnp.int32(self.rows)), jnp.int32(self.t)) - 1
    n_vis = jnp.where(last >= 0, self.n_visible(jnp.maximum(last, 0)), 0)
    bk = jnp.int32(self.blocks.block_k)
    return lax.div(n_vis + bk - 1, bk)

  def visible(self, pos, key):
    """bool: a row whose token is at position `pos` sees compressed key `key` (int32 arrays
    of one shape; padded keys j >= n never)."""
    end = key * self.stride + (self.block_size - 1)
    return visible_pairs(pos, end) & (key < self.n)


def _k_memory(k_ref, b, kvh, bk: int, n, stages: int, wgs: int, k_smem, k_bars, k_free):
  """The memory warpgroup of the importance and block-max kernels: step i's K block (keys
  [i * bk, (i + 1) * bk) of batch b, KV head kvh) into the ring, freed by the compute
  warpgroups."""
  plgpu.set_max_registers(40 if wgs == 2 else 24, action="decrease")

  def load_k(i, slot):
    plgpu.copy_gmem_to_smem(k_ref.at[b, pl.ds(i * bk, bk), kvh], k_smem.at[slot],
                            k_bars.at[slot])

  _produce(n, stages, [(k_free, load_k)])
  _drain(n, stages, (k_free,))


def _importance_kernel(q, k, lse, pb: _Importance):
  """q [B, Tp * rows, Hkv, D] (a token's heads folded into `rows` rows; Tp * rows a multiple
  of wgs * 64), k [B, Np, Hkv, D] (Np a multiple of block_k), lse [B, Hkv, Tp * rows] float32
  log2 units (+inf: a row that adds nothing) -> [B, Tp, Hkv, Np] float32."""
  bsz, r_all, kv_heads, d = q.shape
  np_ = k.shape[1]
  blk = pb.blocks
  bk, stages, wgs, tok = blk.block_k, blk.stages, blk.wgs, pb.tokens
  dtype = q.dtype
  n_tiles, n_all = r_all // (wgs * 64), np_ // bk

  def body(q_ref, k_ref, lse_ref, out_ref, smem, bars):
    q_smem2, k_smem, lse_smem2, p_smem2, o_smem2, r_smem2 = smem
    q_bars, k_bars, k_free = bars
    b, kvh, wg = lax.axis_index("batch"), lax.axis_index("kv_heads"), lax.axis_index("wg")
    row0 = _heavy_first("q_seq", n_tiles) * (wgs * 64)
    n = pb.steps(row0)

    @pl.when(wg < wgs)
    def _compute():
      plgpu.set_max_registers(232 if wgs == 2 else 240, action="increase")
      q_smem, p_smem, o_smem, r_smem = (x.at[wg] for x in (q_smem2, p_smem2, o_smem2, r_smem2))
      q_row = row0 + wg * 64
      tok0 = lax.div(q_row, jnp.int32(pb.rows))
      plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q_row, 64), kvh], q_smem, q_bars.at[wg])
      plgpu.copy_gmem_to_smem(lse_ref.at[b, kvh, pl.ds(q_row, 64)], lse_smem2.at[wg], q_bars.at[wg])
      plgpu.barrier_wait(q_bars.at[wg])
      lse = _bcast(plgpu.load(lse_smem2.at[wg], layout=_WG.reduce(1)), (64, bk), 0)
      pos = _bcast(lax.div(plgpu.broadcasted_iota(jnp.int32, (64,), 0, layout=_WG.reduce(1)),
                           jnp.int32(pb.rows)) + tok0, (64, bk), 0)  # each row's token
      # R [64, 64] in shared memory: R[i, r] = 1 where P's row r is token i's (rows i >= tok 0)
      grouping = lax.div(_index_tile((64, 64), 1, 0), jnp.int32(pb.rows)) == _index_tile((64, 64), 0, 0)
      r_smem[...] = jnp.where(grouping, 1.0, 0.0).astype(dtype)

      def write(i):  # o_smem's first `tok` rows -> the tokens' [tok, bk] block i
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, tok)],
                                out_ref.at[b, pl.ds(tok0, tok), kvh, pl.ds(i * bk, bk)])

      def step(i, carry):
        slot = lax.rem(i, jnp.int32(stages))
        plgpu.barrier_wait(k_bars.at[slot])

        def qk(acc_ref):
          plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
          return acc_ref[...]

        raw = pl.run_scoped(qk, plgpu.ACC((64, bk), jnp.float32))
        plgpu.barrier_arrive(k_free.at[slot])
        ok = pb.visible(pos, _index_tile((64, bk), 1, i * bk))
        p = jnp.where(ok, jnp.exp2(raw * (pb.scale * LOG2E) - lse), 0.0)
        p_smem[...] = p.astype(dtype)
        plgpu.commit_smem()

        def group_sum(acc_ref):
          plgpu.wgmma(acc_ref, r_smem, p_smem)
          return acc_ref[...]

        imp = pl.run_scoped(group_sum, plgpu.ACC((64, bk), jnp.float32))
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last block's store has read o_smem
        o_smem[...] = imp
        write(i)
        return carry

      lax.fori_loop(0, n, step, None)
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      o_smem[...] = plgpu.layout_cast(jnp.zeros((64, bk), jnp.float32), _WG)

      @pl.loop(n, n_all)  # blocks no token of the CTA sees
      def _(i):
        write(i)

      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == wgs)
    def _memory():
      _k_memory(k_ref, b, kvh, bk, n, stages, wgs, k_smem, k_bars, k_free)

  smem = (_tiles(dtype, wgs, 64, d), _tiles(dtype, stages, bk, d),
          plgpu.SMEM((wgs, 64), jnp.float32), _tiles(dtype, wgs, 64, bk),
          plgpu.SMEM((wgs, 64, bk), jnp.float32), _tiles(dtype, wgs, 64, 64))
  bars = (plgpu.Barrier(num_arrivals=2, num_barriers=wgs), plgpu.Barrier(num_barriers=stages),
          plgpu.Barrier(num_arrivals=wgs, num_barriers=stages))
  return kernel(
      body,
      out_type=jax.ShapeDtypeStruct((bsz, r_all // pb.rows, kv_heads, np_), jnp.float32),
      scratch_types=[smem, bars],
      grid=(kv_heads, n_tiles, bsz),
      grid_names=("kv_heads", "q_seq", "batch"),
      num_threads=wgs + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(q, k, lse)


def importance_pallas(q, k_cmp, lse, *, block_size: int, stride: int, scale: float,
                      blocks: ImportanceBlocks | None = None):
  """`compressed_importance` on the kernel (see `importance_unsupported`): folds a token's
  heads into rows, lse to log2 units (+inf where it adds nothing: empty rows, padding), pads
  T and N to the tiles, and slices the result back to [B, T, Hkv, N]."""
  b, t, h, d = q.shape
  n, hkv = k_cmp.shape[1], k_cmp.shape[2]
  g = h // hkv
  blk = blocks or ImportanceBlocks()
  rows = selected_rows(g)
  tp = -(-t * rows // (blk.wgs * 64)) * (blk.wgs * 64) // rows  # tokens, padded to whole CTAs
  qf = jnp.pad(q.reshape(b, t, hkv, g, d), ((0, 0), (0, tp - t), (0, 0), (0, rows - g), (0, 0)))
  qf = jnp.swapaxes(qf, 2, 3).reshape(b, tp * rows, hkv, d)  # row t * rows + g
  l2 = jnp.where(jnp.isneginf(lse), jnp.inf, lse * LOG2E).reshape(b, t, hkv, g)
  l2 = jnp.pad(l2, ((0, 0), (0, tp - t), (0, 0), (0, rows - g)), constant_values=jnp.inf)
  l2 = jnp.transpose(l2, (0, 2, 1, 3)).reshape(b, hkv, tp * rows)
  kp = _pad_to(k_cmp, 1, blk.block_k)
  pb = _Importance(t, n, rows, block_size, stride, scale, blk)
  return _importance_kernel(*same_vma(qf, kp), l2, pb)[:, :t, :, :n]


def importance_unsupported(call: dict) -> str | None:
  """Why the kernel does not take this call (None: it does): a Hopper GPU, bf16/f16, head
  dim 64/128, at most 64 query heads per KV head, default positions; and under auto, only
  while IMPORTANCE_ON_AUTO is set (see there)."""
  if call.get("impl") == "auto" and not IMPORTANCE_ON_AUTO:
    return "switched off under auto (IMPORTANCE_ON_AUTO is False)"
  if (why := not_on_hopper(call)) is not None:
    return why
  q, k = call["q"], call["k_cmp"]
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"dtype {q.dtype} (the kernel takes bfloat16 and float16)"
  if q.shape[-1] not in (64, 128):
    return f"head dim {q.shape[-1]} (the kernel takes 64 and 128)"
  if q.shape[2] // k.shape[2] > 64:
    return f"{q.shape[2] // k.shape[2]} query heads per KV head (the kernel takes up to 64)"
  if call.get("explicit_positions"):
    return "explicit q_positions (the kernel takes the default positions 0..T-1)"
  return None


# ------------------------------------------------- block top-k's estimate: block maxima
# `block_max_scores` (kernels/sparse_attention.py): per row r and key block j of 64 keys,
# max_s q_r . k_s, the scores kept in registers (S = QK^T on wgmma, a row max per step) and
# only the [rows, S / 64] maxima written, where XLA writes and reads back every [rows, S] score.


@dataclasses.dataclass(frozen=True)
class BlockMaxBlocks:
  """The K ring's depth and the 64-row compute warpgroups per CTA (one 64-key block a step)."""
  stages: int = 3
  wgs: int = 2


def _block_max_kernel(q, k, *, s_len: int, row_block: int | None, blocks: BlockMaxBlocks):
  """q [B, Rp, Hkv, D] (Rp a multiple of wgs * 64), k [B, Sp, Hkv, D] (Sp a multiple of 64) ->
  [B, Hkv, NKp, Rp] float32 (NKp: Sp / 64 up to a multiple of 64): row r's max over the keys
  s < s_len of block j; -inf where none, or where j > r // row_block (row_block given: a CTA
  computes the blocks up to its last row's and writes -inf past them)."""
  bsz, rp, kv_heads, d = q.shape
  nk = k.shape[1] // 64
  nkp = -(-nk // 64) * 64
  stages, wgs = blocks.stages, blocks.wgs
  dtype = q.dtype
  n_tiles = rp // (wgs * 64)

  def body(q_ref, k_ref, out_ref, smem, bars):
    q_smem2, k_smem, o_smem2 = smem
    q_bars, k_bars, k_free = bars
    b, kvh, wg = lax.axis_index("batch"), lax.axis_index("kv_heads"), lax.axis_index("wg")
    row0 = lax.axis_index("rows") * (wgs * 64)
    n = jnp.int32(nk)
    if row_block is not None:  # the key blocks the CTA's last row sees
      n = jnp.minimum(lax.div(row0 + wgs * 64 - 1, jnp.int32(row_block)) + 1, n)

    @pl.when(wg < wgs)
    def _compute():
      plgpu.set_max_registers(232 if wgs == 2 else 240, action="increase")
      q_smem, o_smem = q_smem2.at[wg], o_smem2.at[wg]
      q_row = row0 + wg * 64
      plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q_row, 64), kvh], q_smem, q_bars.at[wg])
      plgpu.barrier_wait(q_bars.at[wg])
      # o_smem is written one row (a key block's 64 maxima) at a time, in one layout (a row
      # max's: layout inference fails on a reduce layout cast from a constant)
      neg = jnp.max(plgpu.layout_cast(jnp.full((64, 64), -jnp.inf, jnp.float32), _WG), axis=1)

      def fill(c0):  # o_smem rows c0..63 = -inf
        @pl.loop(c0, 64)
        def _(c):
          o_smem.at[c][...] = neg

      def flush(j0):  # o_smem [64 blocks, 64 rows] -> out[b, kvh, j0:j0 + 64, q_row:q_row + 64]
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, out_ref.at[b, kvh, pl.ds(j0, 64), pl.ds(q_row, 64)])

      def step(i, carry):
        slot, c = lax.rem(i, jnp.int32(stages)), lax.rem(i, 64)

        @pl.when(c == 0)
        def _():  # a fresh group of 64 blocks: the last group's store has read o_smem
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        plgpu.barrier_wait(k_bars.at[slot])

        def qk(acc_ref):
          plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
          return acc_ref[...]

        raw = pl.run_scoped(qk, plgpu.ACC((64, 64), jnp.float32))
        plgpu.barrier_arrive(k_free.at[slot])
        whole = i * 64 + 64 <= s_len  # every key real and (row_block) seen by every row
        if row_block is not None:
          whole = whole & (i <= lax.div(q_row, jnp.int32(row_block)))

        @pl.when(whole)
        def _():
          o_smem.at[c][...] = jnp.max(raw, axis=1)

        @pl.when(jnp.logical_not(whole))
        def _():
          ok = _index_tile((64, 64), 1, i * 64) < s_len
          if row_block is not None:
            ok = ok & (i <= lax.div(_index_tile((64, 64), 0, q_row), jnp.int32(row_block)))
          o_smem.at[c][...] = jnp.max(jnp.where(ok, raw, -jnp.inf), axis=1)

        @pl.when(c == 63)
        def _():
          flush(i - 63)

        return carry

      lax.fori_loop(0, n, step, None)
      m = lax.rem(n, 64)

      @pl.when(m != 0)
      def _():  # the last group, partly computed
        fill(m)
        flush(n - m)

      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      fill(0)

      @pl.loop(lax.div(n + 63, 64) * 64, nkp, step=64)  # groups no row of the CTA sees
      def _(j0):
        flush(j0)

      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == wgs)
    def _memory():
      _k_memory(k_ref, b, kvh, 64, n, stages, wgs, k_smem, k_bars, k_free)

  smem = (_tiles(dtype, wgs, 64, d), _tiles(dtype, stages, 64, d),
          plgpu.SMEM((wgs, 64, 64), jnp.float32))
  bars = (plgpu.Barrier(num_barriers=wgs), plgpu.Barrier(num_barriers=stages),
          plgpu.Barrier(num_arrivals=wgs, num_barriers=stages))
  return kernel(
      body,
      out_type=jax.ShapeDtypeStruct((bsz, kv_heads, nkp, rp), jnp.float32),
      scratch_types=[smem, bars],
      grid=(kv_heads, n_tiles, bsz),
      grid_names=("kv_heads", "rows", "batch"),
      num_threads=wgs + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(q, k)


def block_max_pallas(q, k, *, block: int, row_block: int | None = None,
                     blocks: BlockMaxBlocks | None = None):
  """`block_max_scores` on the kernel (see `block_max_unsupported`): pads R to whole CTAs and
  S to whole blocks, and returns [B, R, Hkv, ceil(S / 64)]."""
  b, r, hkv, d = q.shape
  s_len = k.shape[1]
  blk = blocks or BlockMaxBlocks()
  qp = _pad_to(q, 1, blk.wgs * 64)
  kp = _pad_to(k, 1, 64)
  out = _block_max_kernel(*same_vma(qp, kp), s_len=s_len, row_block=row_block, blocks=blk)
  return jnp.transpose(out, (0, 3, 1, 2))[:, :r, :, :kp.shape[1] // 64]


def block_max_unsupported(call: dict) -> str | None:
  """Why the kernel does not take this call (None: it does): a Hopper GPU, bf16/f16, head
  dim 64/128, blocks of 64 keys; and under auto, only while BLOCK_MAX_ON_AUTO is set (see
  there)."""
  if call.get("impl") == "auto" and not BLOCK_MAX_ON_AUTO:
    return "switched off under auto (BLOCK_MAX_ON_AUTO is False)"
  if (why := not_on_hopper(call)) is not None:
    return why
  q = call["q"]
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"dtype {q.dtype} (the kernel takes bfloat16 and float16)"
  if q.shape[-1] not in (64, 128):
    return f"head dim {q.shape[-1]} (the kernel takes 64 and 128)"
  if call["block"] != 64:
    return f"block {call['block']} (the kernel takes 64)"
  return None


# On: its GPU tests pass (4 of 4, the 64k-key case included) and it is faster on the H100
# (2026-11-27: block top-k's estimate at 64k 1.87 ms vs 8.33 on the XLA path; the sparse
# prefill 13.1 -> 6.39 ms, NOTES.md). Off: auto keeps the XLA path (impl="pallas" regardless).
BLOCK_MAX_ON_AUTO = True


# ------------------------------------------------- block top-k's summary: block means
# `block_mean_attention` is attention over the key blocks' means whose mask is per query
# block and per key (mean) column: the forward kernel with one op query block (64 rows) per
# warpgroup, tiles of 64 means, each query tile's steps listed from the mask's 64-column
# groups (`_row_lists`), and in every step the query block's own columns masked from a row
# it keeps in SMEM (`_Lists.cols`, `_Problem.cols`). The means themselves are an XLA reduce.

BLOCK_MEAN_BLOCKS = Blocks(block_q=64, block_kv=64, stages=4, wgs=2, pingpong=False)
BLOCK_MEAN_MAX_KEYS = 4096  # means (key blocks): each warpgroup's column row in SMEM, 4 B each


def block_mean_pallas(q, k, v, block_mask, *, block: int, scale: float,
                      blocks: Blocks | None = None):
  """`block_mean_attention` on the forward kernel (see `block_mean_unsupported`)."""
  xla = sys.modules["longax.kernels.sparse_attention"]  # the op's module (it imports this one)
  t = q.shape[1]
  blk = blocks or BLOCK_MEAN_BLOCKS
  if (blk.block_q, blk.block_kv) != (64, 64):  # a warpgroup is one op query block of 64 rows
    raise ValueError(f"block_mean_pallas: Blocks.block_q and block_kv must be 64, got {blk}")
  kbar, vbar = xla._block_means(k, block), xla._block_means(v, block)  # [B, nk, Hkv, D]
  spec = AttnSpec("softmax", False, scale, None, 0, None, 0.0)
  pb = dataclasses.replace(_problem(q, kbar, spec, None, blk), cols=True)
  qp, kp, vp, qs, ks = _padded(*same_vma(q, kbar, vbar), None, None, blk)
  tq, sp = qp.shape[1], kp.shape[1]
  nq, nk = block_mask.shape[2:]
  m = jnp.pad(jnp.asarray(block_mask), ((0, 0), (0, 0), (0, tq // 64 - nq), (0, sp - nk)))
  cols = m.reshape(*m.shape[:3], sp // 64, 64)  # [B|1, H|1, Tp / 64, Sp / 64, 64]
  lists = _row_lists(cols.any(-1), pb, tq, 64, blk.wgs, 64, block_q=64, block_k=64)
  o, lse = _forward(qp, kp, vp, qs, ks, pb, lists._replace(cols=cols.astype(jnp.int32)))
  return o[:, :t].astype(jnp.float32), _lse_public(lse, t) + math.log(block)


def block_mean_unsupported(call: dict) -> str | None:
  """Why the kernel does not take this call (None: it does): a Hopper GPU, bf16/f16, head
  dim 64/128 (q, k and v alike), blocks of 64 keys, at most BLOCK_MEAN_MAX_KEYS means."""
  if (why := not_on_hopper(call)) is not None:
    return why
  q, k, v = call["q"], call["k"], call["v"]
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"dtype {q.dtype} (the kernel takes bfloat16 and float16)"
  if q.shape[-1] not in (64, 128) or v.shape[-1] != q.shape[-1]:
    return f"head dims {q.shape[-1]} / {v.shape[-1]} (the kernel takes 64 or 128, alike)"
  if call["block"] != 64:
    return f"block {call['block']} (the kernel takes 64)"
  if -(-k.shape[1] // 64) > BLOCK_MEAN_MAX_KEYS:
    return f"{-(-k.shape[1] // 64)} key blocks (the kernel takes {BLOCK_MEAN_MAX_KEYS})"
  return None


# ------------------------------------------------------------ MInference's vertical-slash
# `vertical_slash_attention` (kernels/sparse_attention.py) as two forward passes of the kernel
# above, merged by their log-sum-exp:
# - the slash pass over the op's keys: the offsets, sorted and deduplicated, become runs of
#   consecutive offsets (lo, hi) (a local band of 1500 offsets is one run); a warpgroup's steps
#   are the key blocks some run's diagonals cross (built in XLA as block-sparse lists, traced),
#   each step with the range of runs crossing it (`_Lists.runs`); masked steps OR those runs'
#   (lo <= p - j <= hi) and drop the vertical columns (a per-head 0/1 vector streamed with the
#   key blocks, like segment ids), which the other pass holds; steps inside one run with no
#   vertical column run unmasked.
# - the vertical pass over each query head's columns gathered in XLA (K, V [B, nv_pad, H, D],
#   sorted, nv_pad a multiple of the key block) with their positions as the key vector:
#   column j is seen by position p >= j (causal), padding never.


def _shift(x, fill):
  """x [..., n] -> [fill, x_0, ..., x_{n-2}] along the last axis."""
  return jnp.concatenate([jnp.full_like(x[..., :1], fill), x[..., :-1]], -1)


def _sorted_unique(idx):
  """int32 [..., n] indices (-1 unused, repeats) -> each distinct one once, ascending, then
  _UNBOUNDED as padding."""
  big = jnp.int32(_UNBOUNDED)
  x = jnp.sort(jnp.where(idx >= 0, idx, big), -1)
  return jnp.sort(jnp.where(x == _shift(x, -1), big, x), -1)


def _vs_runs(slash_idx):
  """int32 [B, H, ns] offsets (-1 unused, repeats) -> runs of consecutive offsets
  [B, H, 2, ns] int32 (lo; hi), ascending, padded with _UNBOUNDED."""
  big = jnp.int32(_UNBOUNDED)
  o = _sorted_unique(slash_idx)
  nxt = jnp.concatenate([o[..., 1:], jnp.full_like(o[..., :1], big)], -1)
  valid = o < big
  lo = jnp.sort(jnp.where(valid & (o != _shift(o, -2) + 1), o, big), -1)
  hi = jnp.sort(jnp.where(valid & (o + 1 != nxt), o, big), -1)
  return jnp.stack([lo, hi], 2)


def _vs_windows(pb: _Problem, tiles: int, wgs: int, bq: int, nk: int, bkv: int):
  """Per (tile, warpgroup, key block): whether the warpgroup has a real query row, the
  positions of its first / last real rows [tiles, wgs, 1], and the key blocks' first keys."""
  row0 = (np.arange(tiles)[:, None] * wgs + np.arange(wgs)) * bq
  first, last = pb.pos(row0), pb.pos(np.minimum(row0 + bq, pb.t) - 1)
  return (row0 < pb.t)[..., None], first[..., None], last[..., None], np.arange(nk) * bkv


def _slash_lists(runs, vflag, pb: _Problem, tiles: int) -> _Lists:
  """The slash pass's lists: runs [B, H, 2, NR] (`_vs_runs`), vflag [B, H, Sp] int32 (1: a
  vertical column) -> per (b, query head, tile) the key blocks some run crosses; a step is
  plain for a warpgroup where one run holds all its pairs' offsets and the block holds no
  vertical column; `runs` each warpgroup's range of runs per step."""
  blk = pb.blocks
  bkv, wgs = blk.block_kv, blk.wgs
  nk = vflag.shape[-1] // bkv
  real, p_first, p_last, key0 = _vs_windows(pb, tiles, wgs, blk.block_q, nk, bkv)
  d_lo = jnp.asarray(p_first - (key0 + bkv - 1), jnp.int32)  # [tiles, wgs, nk]: the offsets
  d_hi = jnp.asarray(p_last - key0, jnp.int32)  # a warpgroup's rows meet in key block kb
  # unrolled: log2(NR) straight-line steps, not a while loop (whose predicate XLA:GPU reads
  # back to the host every iteration: a suspect for the host-bound 32k call, NOTES.md)
  search = jax.vmap(jax.vmap(lambda x, v, side: jnp.searchsorted(x, v, side=side,
                                                                 method="scan_unrolled"),
                             (0, None, None)), (0, None, None))
  lo, hi = runs[:, :, 0], runs[:, :, 1]
  first = search(hi, d_lo, "left").astype(jnp.int32)  # [B, H, tiles, wgs, nk]: the first run
  end = search(lo, d_hi, "right").astype(jnp.int32)  # with hi >= d_lo; runs with lo <= d_hi
  take = lambda x, i: jnp.take_along_axis(x[:, :, None, None], jnp.minimum(i, x.shape[-1] - 1),
                                          -1)  # x [B, H, NR] at i
  has_vert = vflag.reshape(*vflag.shape[:2], nk, bkv).any(-1)[:, :, None, None]
  whole = (take(lo, first) <= d_lo) & (take(hi, first) >= d_hi) & ~has_vert
  own = (end > first) & real & (key0 < pb.s)
  lists = _lists(own, ~whole)
  pick = lambda x: jnp.take_along_axis(x, lists.steps[:, :, :, None, :], -1)  # [.., wgs, L]
  return lists._replace(runs=jnp.stack([pick(first), pick(end)], -2), diags=runs)


def _vertical_lists(cols, pb: _Problem, tiles: int) -> _Lists:
  """The vertical pass's lists: cols [B, H, nv_pad] each head's column positions, ascending
  (padding _UNBOUNDED) -> per (b, query head, tile) the gathered key blocks some row sees;
  plain where every pair of the block is seen."""
  blk = pb.blocks
  bkv = blk.block_kv
  nk = cols.shape[-1] // bkv
  real, p_first, p_last, _ = _vs_windows(pb, tiles, blk.wgs, blk.block_q, nk, bkv)
  lo = cols[..., ::bkv][:, :, None, None]  # [B, H, 1, 1, nk]: each block's first column
  hi = cols[..., bkv - 1::bkv][:, :, None, None]  # and last (padding: _UNBOUNDED)
  if pb.spec.causal:
    own, whole = real & (lo <= p_last) & (lo < pb.s), (hi <= p_first)
  else:
    own, whole = real & (lo < pb.s), (hi < pb.s)
  return _lists(own, ~whole)


def _vs_merge(o_a, lse_a, o_b, lse_b, t: int):
  """Two passes' outputs [B, Tp, H, D] over disjoint keys, the kernel's lse -> o [B, T, H, D]
  float32 over the union (0 where neither saw a key): `merge_partials`."""
  part = lambda o, lse: (o[:, :t].astype(jnp.float32), _lse_public(lse, t))
  return merge_partials(*part(o_a, lse_a), *part(o_b, lse_b))[0]


def _vs_forward(q, k, v, vertical_idx, slash_idx, spec, blocks: Blocks):
  """The two passes (see above) -> o [B, T, H, D] in q's dtype."""
  b, t, h, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  blk, bkv = blocks, blocks.block_kv
  tq = blk.wgs * blk.block_q
  qp = _pad_to(q, 1, tq)
  tiles = qp.shape[1] // tq
  q_seg = jnp.zeros(qp.shape[:2], jnp.int32)  # unused (no segments)
  cols = _pad_to(_sorted_unique(vertical_idx), 2, bkv, _UNBOUNDED)  # [B, H, nv_pad]
  kp, vp = _pad_to(k, 1, bkv), _pad_to(v, 1, bkv)
  sp = kp.shape[1]
  vflag = jnp.zeros((b, h, sp + 1), jnp.int32).at[
      jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None], jnp.minimum(cols, sp)].set(1)
  vflag = vflag[..., :sp]  # [B, H, Sp]: 1 on each head's columns
  pb = lambda vs: _Problem(spec, t, s_len, h // hkv, False, blk, vs=vs)
  lists = _slash_lists(_vs_runs(slash_idx), vflag, pb("slash"), tiles)
  o_s, lse_s = _forward(qp, kp, vp, q_seg, vflag, pb("slash"), lists)
  # the columns' keys and values per query head: [B, nv_pad, H, D]
  at = (jnp.arange(b)[:, None, None], jnp.minimum(cols, s_len - 1),
        (jnp.arange(h) // (h // hkv))[None, :, None])
  kv_cols = [jnp.swapaxes(x[at], 1, 2) for x in (k, v)]
  pb_v = dataclasses.replace(pb("vertical"), group=1)
  o_v, lse_v = _forward(qp, *kv_cols, q_seg, cols, pb_v, _vertical_lists(cols, pb_v, tiles))
  return _vs_merge(o_s, lse_s, o_v, lse_v, t).astype(q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _vertical_slash(q, k, v, vertical_idx, slash_idx, spec, blocks: Blocks):
  return _vs_forward(q, k, v, vertical_idx, slash_idx, spec, blocks)


def _vertical_slash_fwd(q, k, v, vertical_idx, slash_idx, spec, blocks):
  return (_vs_forward(q, k, v, vertical_idx, slash_idx, spec, blocks),
          (q, k, v, vertical_idx, slash_idx))


def _vertical_slash_bwd(spec, blocks, res, do):
  """The XLA path's gradient (its forward recomputed: the kernel's lse is not its residual)."""
  q, k, v, vertical_idx, slash_idx = res
  xla = sys.modules["longax.kernels.sparse_attention"]  # the op's module (it imports this one)
  _, pull = jax.vjp(lambda q, k, v: xla._vertical_slash_xla(q, k, v, vertical_idx, slash_idx,
                                                            spec), q, k, v)
  return (*pull(do), _no_grad(vertical_idx), _no_grad(slash_idx))


_vertical_slash.defvjp(_vertical_slash_fwd, _vertical_slash_bwd)


def vertical_slash_pallas(q, k, v, vertical_idx, slash_idx, spec, *, blocks: Blocks | None = None):
  """`vertical_slash_attention` on the forward kernel (see `vertical_slash_unsupported`): two
  passes merged by their lse, the slash one over the op's keys with runs of offsets, the
  vertical one over each head's gathered columns (see the section's comment). Exact: the
  pairs of the reference, a key on a column and a slash once (the slash pass drops columns).

  Forward only as a kernel (MInference's use is prefill): the gradient is the XLA path's
  (`jax.custom_vjp`; its forward is recomputed in the backward).

  Why two passes and not the columns as a second key source of one: the vertical pass costs
  about nv / S of a dense pass plus a launch (~10 us) and an elementwise merge over o
  (3 x B T H D, ~0.05 ms at 32k H4); one pass would need a second ring of K / V and a second
  step schedule in every CTA for that. Cost: the slash pass folds the key blocks its runs
  cross, ~(nv + band + 2 bkv) / S of dense attention's pairs per row for a band of offsets
  and spread columns; a scattered set of offsets crosses most blocks (dense cost) and its
  masked steps loop over the runs crossing them (in-kernel work grows with their number)."""
  d = q.shape[-1]
  blk = blocks or dataclasses.replace(blocks_for(d), pingpong=True)
  return _vertical_slash(*same_vma(q, k, v), vertical_idx, slash_idx, spec, blk)


def vertical_slash_unsupported(call: dict) -> str | None:
  """As `unsupported` (a Hopper GPU, bf16 / f16), head dim 64 or 128 (what the tests cover)."""
  if (why := unsupported(call)) is not None:
    return why
  if call["q"].shape[-1] not in (64, 128):
    return f"head dim {call['q'].shape[-1]} (the kernel takes 64 and 128)"
  return None
