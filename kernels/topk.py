"""Exact top-k over the last axis, in two stages where XLA's one-pass TopK is slow.

XLA's GPU TopK kernel is slow on long rows (H100, k = 16, device ms, one pass vs chunks of
128: [64k, 1024] rows 6.07 vs 2.21, [16k, 1024] 1.51 vs 0.556, [16k, 512] 0.334 vs 0.295,
[16k, 384] 0.266 vs 0.231, [16k, 256] 0.147 vs 0.152; chunks of 64 lose everywhere;
benchmarks/results/topk-threshold-h100-2026-11-27-s16.txt); on the CPU the staged form is
slower. NSA's selection and block top-k's block choice both take it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TOPK_CHUNK = 128  # the first stage's chunk width
STAGED_PLATFORMS = ("cuda",)  # where `top_k` takes the two stages (tests add "cpu")


def top_k_staged(x, k: int, chunk: int = TOPK_CHUNK):
  """`lax.top_k(x, k)` in two stages: each `chunk`-wide slice's top k, then the top k of
  those (the row's top k is among them). The same values, and indices (candidates stay in
  chunk order, so ties go to the lower index as in lax.top_k); the row is padded with -inf to
  whole chunks and an index picked from that padding (a row with fewer than k finite
  entries) is clipped to the row."""
  n = x.shape[-1]
  m = -(-n // chunk)
  xp = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, m * chunk - n)], constant_values=-jnp.inf)
  val, idx = jax.lax.top_k(xp.reshape(*x.shape[:-1], m, chunk), k)  # [..., m, k]
  idx = idx + (jnp.arange(m, dtype=idx.dtype) * chunk)[:, None]
  flat = lambda y: y.reshape(*x.shape[:-1], m * k)
  best, at = jax.lax.top_k(flat(val), k)
  return best, jnp.minimum(jnp.take_along_axis(flat(idx), at, -1), n - 1)


def top_k(x, k: int):
  """lax.top_k over the last axis (values, indices; ties to the lower index); on
  STAGED_PLATFORMS `top_k_staged` where the row is longer than two chunks and k fits in one."""
  if x.shape[-1] <= 2 * TOPK_CHUNK or k > TOPK_CHUNK:
    return jax.lax.top_k(x, k)
  staged = lambda x: top_k_staged(x, k)
  return jax.lax.platform_dependent(x, **{p: staged for p in STAGED_PLATFORMS},
                                    default=lambda x: tuple(jax.lax.top_k(x, k)))
