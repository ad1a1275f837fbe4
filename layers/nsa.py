"""Native Sparse Attention (Yuan et al. 2025): three softmax branches over the same keys,
mixed by learned per-head sigmoid gates.

- compressed: the keys / values of each block of `block_size` (l) tokens taken every
  `stride` (d) tokens are compressed to one token (a learned linear map of the flattened
  block, initialised to mean pooling, plus an intra-block position embedding); query t
  sees compressed block i only when the whole block is past: i*d + l - 1 <= t.
- selected: the compressed branch's attention probabilities, summed over the query heads
  of a KV group and spread over selection blocks of `select_block` (l') tokens by the
  fraction of each compressed block inside them, rank the key blocks; each query token
  attends to the top `n_selected` that start at or before it, its own (local) block always
  among them (`kernels.selected_block_attention`). The group's summed probabilities are
  `kernels.compressed_importance` from the compressed branch's own log-sum-exp (one pass
  over the compressed scores, no softmax), on `select_impl` ("auto": the Hopper kernel on an
  H100/H200, else XLA). Selection is not differentiable (as in the paper): the ranking is
  computed under stop_gradient.
- sliding window: `kernels.attention(window=window)`.

q and k carry RoPE in every branch (the compressed keys are compressions of rotated keys),
so the full forward and the decode cache compress the same thing. One k / v projection
serves all three branches. Packed documents (segment_ids) and sequence parallelism are
not supported (one line each).

Decode cache: a full KV cache (slot p holds position p, `max_len` slots; the selected
branch may pick any past block) plus the compressed keys / values of every block
(`[B, n_blocks, Hkv, D]`, written when a block's last token arrives). A chunk of new tokens
is written first, then attends over the cache: nothing is ever evicted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from longax import kernels
from longax.kernels.sparse_attention import compressed_ends as block_ends
from longax.layers import sequence
from longax.layers.cache import init_kv_cache, positions_of, write_kv
from longax.layers.common import dense, gqa_projections, rope

BRANCHES = ("compressed", "selected", "window")


def n_compressed(length: int, block_size: int, stride: int) -> int:
  """Compressed blocks (start i*stride, block_size tokens) inside `length` tokens; at least
  1 (a block no query sees when length < block_size), so shapes never go empty."""
  return max(1, (length - block_size) // stride + 1)


def overlap(n_cmp: int, n_sel: int, block_size: int, stride: int, select_block: int):
  """[n_cmp, n_sel] float32: the fraction of compressed block i's tokens in selection block j."""
  tok = np.arange(n_cmp)[:, None] * stride + np.arange(block_size)  # [n_cmp, l]
  sel = tok // select_block
  return jnp.asarray((sel[:, :, None] == np.arange(n_sel)).mean(1), jnp.float32)


def spread(p, n_sel: int, block_size: int, stride: int, select_block: int):
  """p [..., N] float32 (per compressed block) -> [..., n_sel]: sum_i overlap[i, j] p_i.
  Where select_block % stride == 0, selection block j overlaps compressed blocks
  i = j q - c + r (q = select_block / stride, c = ceil(block_size / stride) - 1, r < q + c)
  with a weight that depends on r only: q + c strided slices, one pass over p instead of a
  [N, n_sel] matmul (5.5e11 FLOP at 64k tokens). Else that matmul."""
  n = p.shape[-1]
  if select_block % stride:
    return jnp.einsum("...n,nj->...j", p, overlap(n, n_sel, block_size, stride, select_block))
  q, c = select_block // stride, -(-block_size // stride) - 1
  first = (np.arange(q + c) - c) * stride  # block j q - c + r's first token, relative to j's
  w = (np.minimum(select_block, first + block_size) - np.maximum(0, first)) / block_size
  length = (n_sel - 1) * q + q + c
  p = jnp.pad(p, [(0, 0)] * (p.ndim - 1) + [(c, max(0, length - c - n))])
  take = lambda r: jax.lax.slice_in_dim(p, r, r + (n_sel - 1) * q + 1, stride=q, axis=-1)
  return sum(float(w[r]) * take(r) for r in range(q + c))


def compressed_attention(q, k_cmp, v_cmp, block_size: int, stride: int, impl: str = "auto",
                         return_lse: bool = False):
  """The compressed branch at the default positions as ordinary bottom-right causal
  attention (so it runs on the dense kernels): query t (position t) sees compressed key j
  (position end_j = j*stride + block_size - 1) iff end_j <= t. q [B, T, H, D], k_cmp / v_cmp
  [B, N, Hkv, D] -> [B, T, H, D].

  With c = ceil((block_size - 1) / stride), prepending P0 = stride*c - (block_size - 1)
  (in [0, stride)) empty rows puts query t at row r = t + P0, and end_j <= t becomes
  j <= r // stride - c: rows cut into groups of `stride` see keys j <= g - c, i.e. N + c
  groups over N keys, bottom-right causal (the first c groups see nothing: 0). Each group's
  rows fold into the head axis (kv-head-major, so a KV group's query heads stay together);
  the tail is padded to (N + c) * stride rows; gradients come through the reshape.
  return_lse: also each query row's log-sum-exp [B, T, H] float32 (-inf: sees no block),
  what `kernels.compressed_importance` takes."""
  b, t, h, _ = q.shape
  n, hkv = k_cmp.shape[1], k_cmp.shape[2]
  c = -(-(block_size - 1) // stride)
  p0 = stride * c - (block_size - 1)
  rows = (n + c) * stride
  if t + p0 > rows:
    raise ValueError(f"compressed_attention: {n} compressed keys are fewer than T={t} queries "
                     f"see (block_size={block_size}, stride={stride}): want N >= "
                     f"{n_compressed(t, block_size, stride)}")
  qf = jnp.pad(q, ((0, 0), (p0, rows - t - p0), (0, 0), (0, 0)))
  qf = rearrange(qf, "b (n s) (k g) d -> b n (k s g) d", s=stride, k=hkv)  # [B, N + c, H*s, D]
  out = kernels.attention(qf, k_cmp, v_cmp, impl=impl, return_lse=return_lse)
  o, lse = out if return_lse else (out, None)
  o = rearrange(o, "b n (k s g) d -> b (n s) (k g) d", s=stride, k=hkv)[:, p0:p0 + t]
  if not return_lse:
    return o
  return o, rearrange(lse, "b n (k s g) -> b (n s) (k g)", s=stride, k=hkv)[:, p0:p0 + t]


class NSA(nnx.Module):
  """x [B, T, d_model] -> [B, T, d_model]; see the module docstring."""

  def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, *,
               head_dim: int | None = None, block_size: int = 32, stride: int = 16,
               select_block: int = 64, n_selected: int = 16, window: int = 512,
               rope_theta: float = 10000.0, impl: str = "auto", select_impl: str = "auto",
               rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    gqa_projections(self, "NSA", d_model, n_heads, n_kv_heads, head_dim, **kw)
    if not 1 <= stride <= block_size:
      raise ValueError(f"NSA: stride={stride} must be in [1, block_size={block_size}]")
    self.gate = dense(d_model, self.h * len(BRANCHES), bias=True, **kw)
    # (each parameter its own buffer: the train step donates them)
    pool = lambda: jnp.tile(jnp.eye(self.hd, dtype=param_dtype)[None] / block_size, (block_size, 1, 1))
    self.cmp_k = nnx.Param(pool())  # [l, D, D]: mean pooling at init
    self.cmp_v = nnx.Param(pool())
    self.cmp_k_pos = nnx.Param(jnp.zeros((block_size, self.hd), param_dtype))
    self.cmp_v_pos = nnx.Param(jnp.zeros((block_size, self.hd), param_dtype))
    self.block_size, self.stride, self.select_block = block_size, stride, select_block
    self.n_selected, self.window, self.rope_theta = n_selected, window, rope_theta
    self.impl, self.select_impl, self.dtype = impl, select_impl, dtype

  # ------------------------------------------------------------------------------ parts

  def compress(self, k_blocks, v_blocks):
    """k_blocks, v_blocks [B, N, l, Hkv, D] -> compressed [B, N, Hkv, D] each."""
    def one(x, w, pos):
      x = x + pos[...].astype(x.dtype)[:, None]
      return jnp.einsum("bnlkd,lde->bnke", x, w[...].astype(x.dtype),
                        preferred_element_type=jnp.float32).astype(x.dtype)
    return one(k_blocks, self.cmp_k, self.cmp_k_pos), one(v_blocks, self.cmp_v, self.cmp_v_pos)

  def _gather_blocks(self, x, first):
    """x [B, S, Hkv, D]; first [B, N] block indices -> [B, N, l, Hkv, D] (clipped to S)."""
    idx = first[..., None] * self.stride + jnp.arange(self.block_size, dtype=jnp.int32)
    idx = jnp.clip(idx, 0, x.shape[1] - 1)
    return jax.vmap(lambda xb, ib: xb[ib])(x, idx)

  def _selection(self, q, k_cmp, lse, q_pos, explicit: bool, n_keys: int):
    """Block indices [B, T, Hkv, min(n_selected, n_blocks)] over `n_keys` keys, from the
    compressed branch's probabilities, summed over each KV group's query heads
    (`kernels.compressed_importance` with the branch's own log-sum-exp lse [B, T, H], on
    `select_impl`, independent of the layer's impl) and spread over the selection blocks by
    `overlap` (`spread`; no gradient). A block starting after the query is never picked (-1 where
    fewer exist), the query's own block always is. q [B, T, H, D]; k_cmp [B, N, Hkv, D];
    q_pos [B, T]; explicit: the importance at q_pos (a decode chunk), else at 0..T-1 (the
    compressed branch's own positions)."""
    # (the kernel takes the default positions only: a decode chunk's importance, a few rows
    # against the cache's compressed keys, runs on the XLA path under select_impl="pallas")
    impl = "auto" if explicit and self.select_impl == "pallas" else self.select_impl
    p_group = kernels.compressed_importance(
        q, k_cmp, lse, block_size=self.block_size, stride=self.stride, impl=impl,
        q_positions=q_pos if explicit else None)  # [B, T, Hkv, N]
    n_sel = -(-n_keys // self.select_block)
    score = spread(p_group, n_sel, self.block_size, self.stride, self.select_block)
    start = jnp.arange(n_sel, dtype=jnp.int32) * self.select_block
    own = (q_pos // self.select_block)[..., None, None] == jnp.arange(n_sel)
    score = jnp.where(own, jnp.inf, score)
    score = jnp.where(start <= q_pos[..., None, None], score, -jnp.inf)
    top, idx = kernels.top_k(score, min(self.n_selected, n_sel))
    return jnp.where(top > -jnp.inf, idx, -1).astype(jnp.int32)

  def _mix(self, q, k, v, k_cmp, v_cmp, ends, q_pos, explicit, gate_logits, impl=None,
           block_indices=None):
    """The three branches mixed by their gates -> [B, T, H, D] float32. k, v [B, S, Hkv, D]
    hold position j at index j; q [B, T, H, D] at positions q_pos [B, T] (explicit: not the
    bottom-right default); gate_logits [B, T, H, 3]; impl: the kernels' (default the layer's);
    block_indices: the selection, where given (else from the compressed branch)."""
    impl = impl or self.impl
    kv_pos = jnp.arange(k.shape[1], dtype=jnp.int32)
    pos_kw = dict(q_positions=q_pos, kv_positions=kv_pos) if explicit else {}
    o_cmp, lse = self._compressed_branch(q, k_cmp, v_cmp, ends, q_pos, explicit, impl)
    idx = (self._selection(q, k_cmp, lse, q_pos, explicit, k.shape[1]) if block_indices is None
           else block_indices)
    o_sel = kernels.selected_block_attention(q, k, v, idx, block_size=self.select_block,
                                             impl=impl, q_positions=q_pos if explicit else None)
    o_win = kernels.attention(q, k, v, window=self.window, impl=impl, **pos_kw)
    gates = jax.nn.sigmoid(gate_logits)
    return sum(gates[..., i, None].astype(jnp.float32) * o.astype(jnp.float32)
               for i, o in enumerate((o_cmp, o_sel, o_win)))

  def _compressed_branch(self, q, k_cmp, v_cmp, ends, q_pos, explicit: bool, impl: str):
    """The compressed-token branch -> (o [B, T, H, D], its log-sum-exp [B, T, H])."""
    if explicit:  # a decode chunk against the cache: the keys' own positions
      return kernels.attention(q, k_cmp, v_cmp, q_positions=q_pos, kv_positions=ends,
                               impl=impl, return_lse=True)
    # the same math as causal attention over rows folded into heads: the kernels take it
    return compressed_attention(q, k_cmp, v_cmp, self.block_size, self.stride, impl,
                                return_lse=True)

  def _compressed(self, k, v):
    """The full forward's compressed keys / values [B, N, Hkv, D] and their positions [N]."""
    b, t = k.shape[:2]
    n = n_compressed(t, self.block_size, self.stride)
    first = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    k_cmp, v_cmp = self.compress(self._gather_blocks(k, first), self._gather_blocks(v, first))
    return k_cmp, v_cmp, block_ends(n, self.block_size, self.stride)

  def _positions(self, q, q_pos):
    """q_pos, or the default 0..T-1, as [B, T] int32."""
    b, t = q.shape[:2]
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)) if q_pos is None else q_pos

  def attend(self, q, k, v, gate_logits, q_pos=None, impl=None, block_indices=None):
    """The attention core of a full forward (no cache; what `benchmarks/kernels.py --ops nsa`
    times): compression, the three branches and the gates, no projections. q [B, T, H, D],
    k / v [B, T, Hkv, D] (RoPE applied), gate_logits [B, T, H, 3] (before the sigmoid),
    q_pos [B, T] (default 0..T-1; the branches take key j at position j and the queries
    bottom-right, i.e. 0..T-1: q_pos only places the selection) -> [B, T, H, D] float32.
    block_indices [B, T, Hkv, n]: a given selection (`select`'s; tests comparing impls hold
    it fixed, since the compressed branch's lse, and so near-ties, differ by impl)."""
    q_pos = self._positions(q, q_pos)
    k_cmp, v_cmp, ends = self._compressed(k, v)
    return self._mix(q, k, v, k_cmp, v_cmp, ends, q_pos, False, gate_logits, impl, block_indices)

  def select(self, q, k, v, q_pos=None, impl=None):
    """The selection `attend` computes (its arguments; impl: the compressed branch's, whose
    lse the importance takes) -> block indices [B, T, Hkv, n] int32."""
    q_pos = self._positions(q, q_pos)
    k_cmp, v_cmp, ends = self._compressed(k, v)
    _, lse = self._compressed_branch(q, k_cmp, v_cmp, ends, q_pos, False, impl or self.impl)
    return self._selection(q, k_cmp, lse, q_pos, False, k.shape[1])

  def _out(self, o, x):
    """o [B, T, H, D] float32 -> the output projection, in x's dtype."""
    return self.o(rearrange(o.astype(x.dtype), "b t h d -> b t (h d)"))

  # -------------------------------------------------------------------------- protocol

  def init_cache(self, batch: int, max_len: int) -> dict:
    n = n_compressed(max_len, self.block_size, self.stride)
    cache = init_kv_cache(batch, max_len, self.hkv, self.hd, self.dtype)
    zeros = jnp.zeros((batch, n, self.hkv, self.hd), self.dtype)
    return dict(cache, cmp_k=zeros, cmp_v=zeros)

  def __call__(self, x, cache=None, pos=0, segment_ids=None):
    """x: [B, T, d_model] at positions pos..pos+T-1. Returns (y, new cache or None)."""
    if segment_ids is not None:
      raise ValueError("NSA: packed documents (segment_ids) are not supported")
    if sequence.active() is not None:
      raise ValueError("NSA: sequence parallelism is not supported")
    b, t = x.shape[:2]
    split = lambda y: rearrange(y, "b t (h d) -> b t h d", d=self.hd)
    q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
    q_pos = jnp.broadcast_to(positions_of(pos, t), (b, t))
    q, k = rope(q, q_pos, self.rope_theta), rope(k, q_pos, self.rope_theta)
    gate_logits = rearrange(self.gate(x), "b t (h n) -> b t h n", n=len(BRANCHES))
    if cache is None:
      return self._out(self.attend(q, k, v, gate_logits, q_pos), x), None
    cache = dict(cache, **write_kv(cache, k, v, q_pos))
    cache = self._write_compressed(cache, q_pos)
    ends = block_ends(cache["cmp_k"].shape[1], self.block_size, self.stride)
    o = self._mix(q, cache["k"], cache["v"], cache["cmp_k"], cache["cmp_v"], ends, q_pos, True,
                  gate_logits)
    return self._out(o, x), cache

  def _write_compressed(self, cache, q_pos):
    """Compresses the blocks whose last token is among the new ones (positions q_pos
    [B, T], consecutive per row) from the updated KV cache, into cmp_k / cmp_v."""
    t, n = q_pos.shape[1], cache["cmp_k"].shape[1]
    m = min(n, -(-t // self.stride) + 1)  # blocks that can end inside T tokens
    lo, hi = q_pos[:, 0], q_pos[:, -1]
    first = jnp.maximum(0, -(-(lo - self.block_size + 1) // self.stride))  # ceil, >= 0
    i = first[:, None] + jnp.arange(m, dtype=jnp.int32)  # [B, m]
    end = i * self.stride + self.block_size - 1
    ok = (end >= lo[:, None]) & (end <= hi[:, None]) & (i < n)
    k_cmp, v_cmp = self.compress(self._gather_blocks(cache["k"], i),
                                 self._gather_blocks(cache["v"], i))
    slot = jnp.where(ok, i, n)  # out of range: dropped
    put = jax.vmap(lambda c, s, x: c.at[s].set(x.astype(c.dtype), mode="drop"))
    return dict(cache, cmp_k=put(cache["cmp_k"], slot, k_cmp), cmp_v=put(cache["cmp_v"], slot, v_cmp))
