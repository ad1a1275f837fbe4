"""The key/value decode cache: a ring of slots that serves full, windowed and sink caches.

slots = max_len for a full cache, sinks + window for a rolling one (StreamingLLM). A token
at absolute position p lives in slot p if p < sinks, else sinks + (p - sinks) % (slots -
sinks). Each slot records its token's position (-1: empty), and `kernels.attention` masks
with those positions, so a stale or empty slot is never seen: visibility stays in one place.
"""

from __future__ import annotations

import jax.numpy as jnp


def kv_slots(max_len: int, window: int | None, sinks: int) -> int:
  """Slots a cache needs: all positions, or the sinks plus one window."""
  return max_len if window is None else min(max_len, sinks + window)


def init_kv_cache(batch: int, slots: int, kv_heads: int, head_dim: int, dtype) -> dict:
  return dict(k=jnp.zeros((batch, slots, kv_heads, head_dim), dtype),
              v=jnp.zeros((batch, slots, kv_heads, head_dim), dtype),
              pos=jnp.full((slots,), -1, jnp.int32))


def attend_cached(attend, q, k, v, cache: dict, positions, sinks: int = 0):
  """Attention of new tokens over the cache and themselves, then the cache updated.

  attend(q, k, v, q_positions=, kv_positions=) -> o; q: [B, T, H, D]; k, v: [B, T, Hkv, D];
  positions: [T] absolute positions of the new tokens. Returns (o, new cache).
  """
  keys = jnp.concatenate([cache["k"], k.astype(cache["k"].dtype)], axis=1)
  vals = jnp.concatenate([cache["v"], v.astype(cache["v"].dtype)], axis=1)
  kpos = jnp.concatenate([cache["pos"], positions.astype(jnp.int32)])
  o = attend(q, keys, vals, q_positions=positions, kv_positions=kpos)
  return o, _write(cache, k, v, positions, sinks)


def _write(cache, k, v, positions, sinks):
  slots = cache["pos"].shape[0]
  ring = slots - sinks
  # Keep the sinks and the last `ring` tokens; drop the rest (their slot would be
  # written twice in one scatter, whose order is undefined).
  keep = (positions < sinks) | (positions > positions[-1] - ring)
  slot = jnp.where(positions < sinks, positions, sinks + (positions - sinks) % ring)
  slot = jnp.where(keep, slot, slots)  # out of range: dropped
  return dict(k=cache["k"].at[:, slot].set(k.astype(cache["k"].dtype), mode="drop"),
              v=cache["v"].at[:, slot].set(v.astype(cache["v"].dtype), mode="drop"),
              pos=cache["pos"].at[slot].set(positions.astype(jnp.int32), mode="drop"))
