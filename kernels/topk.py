"""Exact top-k over the last axis: a Mosaic GPU kernel on Hopper, two stages where XLA's
one-pass TopK is slow.

XLA's GPU TopK kernel is slow on long rows (H100, k = 16, device ms, one pass vs chunks of
128: [64k, 1024] rows 6.07 vs 2.21, [16k, 1024] 1.51 vs 0.556, [16k, 512] 0.334 vs 0.295,
[16k, 384] 0.266 vs 0.231, [16k, 256] 0.147 vs 0.152; chunks of 64 lose everywhere;
benchmarks/results/topk-threshold-h100-2026-11-27-s16.txt); on the CPU the staged form is
slower. NSA's selection and block top-k's block choice both take it. On a Hopper GPU the
kernel (`kernels/gpu/topk.py`, float32, k <= 16) takes the calls of 2^20 entries or more
where TOPK_KERNEL is on: 0.664 ms at [64k, 1024], 3.3x the staged form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from longax.kernels.gpu import topk as _gpu

TOPK_CHUNK = 128  # the first stage's chunk width
STAGED_PLATFORMS = ("cuda",)  # where `top_k` takes the two stages (tests add "cpu")
TOPK_KERNEL = True  # on CUDA: the Mosaic GPU kernel where it takes the call (a Hopper GPU)
TOPK_KERNEL_MIN_SIZE = 2**20  # ... on inputs of this many entries or more (measured down to
# there; H100, k 16, ms: [4k, 256] 0.034 vs lax.top_k 0.039, [16k, 256] 0.056 vs 0.146, [64k,
# 128] 0.096 vs 0.251, [64k, 1024] 0.664 vs staged 2.18 / lax.top_k 6.08)


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
  STAGED_PLATFORMS `top_k_staged` where the row is longer than two chunks and k fits in one;
  on CUDA the Mosaic GPU kernel instead where TOPK_KERNEL is on, the input has at least
  TOPK_KERNEL_MIN_SIZE entries and the kernel takes the call."""
  if k > TOPK_CHUNK:
    return jax.lax.top_k(x, k)
  branches, staged = {}, lambda x: top_k_staged(x, k)  # (one function: platforms share it)
  if x.shape[-1] > 2 * TOPK_CHUNK:
    branches = {p: staged for p in STAGED_PLATFORMS}
  if TOPK_KERNEL and x.size >= TOPK_KERNEL_MIN_SIZE and _gpu.top_k_unsupported(x, k) is None:
    branches["cuda"] = lambda x: _gpu.top_k_pallas(x, k)
  if not branches:
    return jax.lax.top_k(x, k)
  return jax.lax.platform_dependent(x, **branches, default=lambda x: tuple(jax.lax.top_k(x, k)))
