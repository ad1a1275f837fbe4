"""The key/value decode cache: a ring of slots that serves full, windowed and sink caches.

slots = max_len for a full cache, sinks + window for a rolling one (StreamingLLM). A token
at absolute position p lives in slot p if p < sinks, else sinks + (p - sinks) % (slots -
sinks). Each slot records its token's position (-1: empty), and `kernels.attention` masks
with those positions, so a stale or empty slot is never seen: visibility stays in one place.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def kv_slots(max_len: int, window: int | None, sinks: int) -> int:
  """Slots a cache needs: all positions, or the sinks plus one window."""
  return max_len if window is None else min(max_len, sinks + window)


def positions_of(pos, t: int):
  """Absolute positions of t new tokens after `pos` (a scalar, or [B] per row): [T] or [B, T]."""
  return jnp.asarray(pos, jnp.int32)[..., None] + jnp.arange(t, dtype=jnp.int32)


def init_kv_cache(batch: int, slots: int, kv_heads: int, head_dim: int, dtype) -> dict:
  return dict(k=jnp.zeros((batch, slots, kv_heads, head_dim), dtype),
              v=jnp.zeros((batch, slots, kv_heads, head_dim), dtype),
              pos=jnp.full((batch, slots), -1, jnp.int32))


def attend_cached(attend, q, k, v, cache: dict, positions, sinks: int = 0):
  """Attention of new tokens over the cache and themselves, then the cache updated.

  attend(q, k, v, q_positions=, kv_positions=) -> o; q: [B, T, H, D]; k, v: [B, T, Hkv, D];
  positions: [T] or [B, T] absolute positions of the new tokens. Returns (o, new cache).

  One new token (decode) is written first and attends over the cache in place: the slot it
  takes held position p - (slots - sinks), which a window of (slots - sinks) keys no longer
  shows, or nothing, while positions stay below a full cache's length. Several new tokens
  (a prefill chunk) attend over cache + chunk before the write, since the chunk's own
  writes may evict keys its earlier tokens still see.
  """
  positions = jnp.broadcast_to(positions, k.shape[:2]).astype(jnp.int32)
  k_c, v_c, p_c = _write_rows(cache, k, v, positions, sinks)
  if k.shape[1] == 1:  # no O(cache) concatenation per decoded token
    return attend(q, k_c, v_c, q_positions=positions, kv_positions=p_c), dict(k=k_c, v=v_c, pos=p_c)
  keys = jnp.concatenate([cache["k"], k.astype(cache["k"].dtype)], axis=1)
  vals = jnp.concatenate([cache["v"], v.astype(cache["v"].dtype)], axis=1)
  kpos = jnp.concatenate([cache["pos"], positions], axis=1)
  o = attend(q, keys, vals, q_positions=positions, kv_positions=kpos)
  return o, dict(k=k_c, v=v_c, pos=p_c)


def write_kv(cache: dict, k, v, positions, sinks: int = 0) -> dict:
  """The cache with k, v [B, T, Hkv, D] of the tokens at `positions` ([T] or [B, T], in any
  order, no repeats) written into their slots; no attention (a sequence-parallel prefill
  fills a fresh cache this way)."""
  positions = jnp.broadcast_to(positions, k.shape[:2]).astype(jnp.int32)
  return dict(zip(("k", "v", "pos"), _write_rows(cache, k, v, positions, sinks)))


def _write_rows(cache, k, v, positions, sinks):
  write = jax.vmap(functools.partial(_write, sinks=sinks))
  return write(cache["k"], cache["v"], cache["pos"], k, v, positions)


def _write(k_c, v_c, p_c, k, v, positions, sinks):
  """One row: k_c, v_c [slots, Hkv, D], p_c [slots]; k, v [T, Hkv, D]; positions [T]."""
  slots = p_c.shape[0]
  ring = slots - sinks
  # Keep the sinks and the last `ring` tokens; drop the rest (their slot would be
  # written twice in one scatter, whose order is undefined). The newest position is the
  # last one, except in a sequence-parallel prefill's zigzag order: hence the max.
  keep = (positions < sinks) | (positions > jnp.max(positions) - ring)
  slot = jnp.where(positions < sinks, positions, sinks + (positions - sinks) % ring)
  slot = jnp.where(keep, slot, slots)  # out of range: dropped
  return (k_c.at[slot].set(k.astype(k_c.dtype), mode="drop"),
          v_c.at[slot].set(v.astype(v_c.dtype), mode="drop"),
          p_c.at[slot].set(positions, mode="drop"))
