"""Which key may a query see: one function of positions, asked by every path.

Positions are absolute indices into the key sequence. With `T` queries and `S` keys the
queries are the last `T` positions (bottom-right alignment, FlashAttention >= 2.1):
`query_positions(T, S) = S - T + arange(T)`.

Query i sees key j iff all of:
  key slot filled   j >= 0 (decode caches mark empty slots with position -1)
  causal            j <= i
  window=w          i - j < w, except sink keys j < sinks (StreamingLLM)
  segment ids       seg_q[i] == seg_k[j]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def query_positions(t: int, s: int) -> jnp.ndarray:
  """Absolute positions of `t` queries against `s` keys, bottom-right aligned: [t]."""
  return jnp.arange(t, dtype=jnp.int32) + (s - t)


def visible_pairs(qi, kj, *, causal: bool = True, window: int | None = None, sinks: int = 0):
  """The rule on position arrays of one (broadcast) shape, elementwise: the kernels call it
  on [block_q, block_kv] tiles. Returns a bool array, or None where nothing is masked."""
  ok = None
  both = lambda a, b: b if a is None else a & b
  if causal:
    ok = kj <= qi
  if window is not None:
    in_window = qi < kj + window  # i - j < w, without a difference tile
    if sinks:
      in_window |= kj < sinks
    ok = both(ok, in_window)
  return ok


def visible(q_pos, k_pos, *, causal: bool = True, window: int | None = None,
            sinks: int = 0, q_seg=None, k_seg=None):
  """Boolean visibility, broadcast over the leading axes.

  q_pos: [T] or [B, T] query positions; k_pos: [S] or [B, S] key positions;
  q_seg: [B, T] / k_seg: [B, S] segment ids or None. Returns [..., T, S] (with a
  leading B when segment ids are given).
  """
  shape = jnp.broadcast_shapes(q_pos[..., :, None].shape, k_pos[..., None, :].shape)
  qi = jnp.broadcast_to(q_pos[..., :, None], shape)
  kj = jnp.broadcast_to(k_pos[..., None, :], shape)
  ok = kj >= 0  # empty cache slots
  rule = visible_pairs(qi, kj, causal=causal, window=window, sinks=sinks)
  if rule is not None:
    ok &= rule
  if q_seg is not None:
    ok = ok & (q_seg[:, :, None] == k_seg[:, None, :])
  return ok


def index_mask(indices, n_blocks: int):
  """Block indices [..., n] (-1 or >= n_blocks: unused; repeats count once) -> bool
  [..., n_blocks], block j on iff some index is j. numpy in, numpy out (a concrete mask keeps
  the lists built from it just long enough); else jnp."""
  xp = np if isinstance(indices, np.ndarray) else jnp
  slot = xp.where((indices >= 0) & (indices < n_blocks), indices, n_blocks)  # unused: dropped
  lead = tuple(xp.arange(m).reshape([-1 if a == ax else 1 for a in range(indices.ndim)])
               for ax, m in enumerate(indices.shape[:-1]))
  shape = indices.shape[:-1] + (n_blocks + 1,)
  if xp is np:
    on = np.zeros(shape, bool)
    on[lead + (slot,)] = True
  else:
    on = jnp.zeros(shape, bool).at[lead + (slot,)].set(True)
  return on[..., :n_blocks]


# Block skipping: which key blocks can a run of queries see, which query blocks can a run of
# keys be seen by. Positions are int32 scalars (traced inside kernels); `lo` may be negative
# before clamping. Ranges are [lo, hi) in block units; `full_*` bound the blocks every pair of
# which is visible (no mask needed). Sinks are handled by the callers (a prefix of blocks).


def _div(a, b):  # floor division of a non-negative int32 scalar, lowers in every backend
  return jax.lax.div(a, jnp.int32(b))


def key_blocks(q_first, q_last, block: int, n_blocks: int, *, causal: bool,
               window: int | None):
  """Key blocks seen by queries at positions [q_first, q_last]: (lo, hi, full_lo, full_hi)."""
  zero = jnp.int32(0)
  hi = jnp.minimum(_div(jnp.maximum(q_last + block, zero), block), n_blocks) if causal \
      else jnp.int32(n_blocks)
  full_hi = jnp.minimum(_div(jnp.maximum(q_first + 1, zero), block), n_blocks) if causal \
      else jnp.int32(n_blocks)
  if window is None:
    lo = full_lo = zero
  else:
    lo = _div(jnp.maximum(q_first - (window - 1), zero), block)
    full_lo = _div(jnp.maximum(q_last - window + block, zero), block)
  return lo, jnp.maximum(hi, lo), full_lo, full_hi


def query_blocks(k_first, k_last, block: int, n_blocks: int, offset: int, *, causal: bool,
                 window: int | None, sinks: int = 0):
  """Query blocks (query row i at position i + offset) that see keys at [k_first, k_last]:
  (lo, hi, full_lo, full_hi); with sinks the full range is left to the caller (masked)."""
  zero = jnp.int32(0)
  lo = _div(jnp.maximum(k_first - offset, zero), block) if causal else zero
  if window is None:
    hi = jnp.int32(n_blocks)
  else:
    hi = jnp.minimum(_div(jnp.maximum(k_last + window - 1 - offset + block, zero), block),
                     n_blocks)
    if sinks:
      hi = jnp.where(k_first < sinks, jnp.int32(n_blocks), hi)
  full_lo = _div(jnp.maximum(k_last - offset + block - 1, zero), block) if causal else zero
  full_hi = jnp.int32(n_blocks) if window is None else jnp.minimum(
      _div(jnp.maximum(k_first + window - offset, zero), block), n_blocks)
  return lo, jnp.maximum(hi, lo), full_lo, full_hi
