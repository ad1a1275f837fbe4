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

import jax.numpy as jnp


def query_positions(t: int, s: int) -> jnp.ndarray:
  """Absolute positions of `t` queries against `s` keys, bottom-right aligned: [t]."""
  return jnp.arange(t, dtype=jnp.int32) + (s - t)


def visible(q_pos, k_pos, *, causal: bool = True, window: int | None = None,
            sinks: int = 0, q_seg=None, k_seg=None):
  """Boolean visibility, broadcast over the leading axes.

  q_pos: [T] or [B, T] query positions; k_pos: [S] or [B, S] key positions;
  q_seg: [B, T] / k_seg: [B, S] segment ids or None. Returns [..., T, S] (with a
  leading B when segment ids are given).
  """
  qi = q_pos[..., :, None]
  kj = k_pos[..., None, :]
  ok = jnp.broadcast_to(kj >= 0, jnp.broadcast_shapes(qi.shape, kj.shape))
  if causal:
    ok &= kj <= qi
  if window is not None:
    in_window = qi - kj < window
    if sinks:
      in_window |= kj < sinks
    ok &= in_window
  if q_seg is not None:
    ok = ok & (q_seg[:, :, None] == k_seg[:, None, :])
  return ok
