"""Top-k over the last axis of float32 rows in Mosaic GPU (Hopper): `kernels.top_k`'s kernel.

A CTA takes 64 rows (one warpgroup, WGMMA layout) and streams their 128-wide column chunks
through SMEM (`emit_pipeline`). In each chunk it takes k successive maxima (the lowest column on
ties; a pick is masked to -inf and its column to past every column, so a row with fewer than k
finite entries still gets k distinct columns) and merges them into the row's running top k
(row vectors of values and columns in registers, in lax.top_k's order: value down, column up)
by a bitonic merge. XLA's TopK sorts (see `kernels/topk.py` for its times); this reads each
row once. NaN entries are not ranked as lax.top_k ranks them (first): the callers' scores
(NSA's importance, block maxima) have none. Measured (H100, k 16, device ms; `benchmarks/results/topk-variants-h100-2026-11-28-s17.txt`):
[64k, 1024] 0.664 with the bitonic merge, 1.09 inserting each pick into the list (136 steps a
chunk, quadratic in k); chunks of 64 columns 0.70.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from longax.kernels.gpu import kernel, not_on_hopper

_WG = plgpu.Layout.WGMMA
ROWS = 64  # a warpgroup's rows
CHUNK = 128  # the columns of one pipeline step
MAX_K = 16  # the running lists live in registers: 2 k row vectors


def _row_vec(value):
  """A [ROWS] row vector (WGMMA row layout) filled with `value`."""
  return plgpu.layout_cast(jnp.full((ROWS,), value, jnp.float32), _WG.reduce(1))


def _better(v1, c1, v2, c2):
  """Where (v1, c1) comes first in lax.top_k's order: a higher value, or the same at a lower
  column."""
  return (v1 > v2) | ((v1 == v2) & (c1 < c2))


def _merge(vals, cols, bv, bc):
  """The top of two sorted lists of a power-of-two length L (lax.top_k's order): the better
  of a[i] and b[L-1-i] (a bitonic sequence holding the top L), sorted by a bitonic merge."""
  n = len(vals)
  vals, cols = list(vals), list(cols)
  for i in range(n):
    keep = _better(vals[i], cols[i], bv[n - 1 - i], bc[n - 1 - i])
    vals[i], cols[i] = (jnp.where(keep, vals[i], bv[n - 1 - i]),
                        jnp.where(keep, cols[i], bc[n - 1 - i]))
  s = n // 2
  while s:
    for i in range(n):
      if i & s:
        continue
      j = i + s
      keep = _better(vals[i], cols[i], vals[j], cols[j])
      vals[i], vals[j] = jnp.where(keep, vals[i], vals[j]), jnp.where(keep, vals[j], vals[i])
      cols[i], cols[j] = jnp.where(keep, cols[i], cols[j]), jnp.where(keep, cols[j], cols[i])
    s //= 2
  return vals, cols


def _top_k_kernel(x, k: int, chunk: int = CHUNK):
  """x [R, N] float32 (R a multiple of 64, N of `chunk`) -> the top k's columns [k, R] as
  float32 (exact up to 2^24), largest value first."""
  r, n = x.shape
  big = float(n)  # past every column
  kl = 1 << (k - 1).bit_length()  # the lists' length: k up to a power of 2

  def body(x_ref, col_ref, col_smem):
    row0 = lax.axis_index("rows") * ROWS

    def step(idx, x_smem, carry):
      (c,) = idx
      vals, cols = carry
      xs = plgpu.load(x_smem, layout=_WG)
      plgpu.commit_smem()  # every thread's read done before the pipeline refills the slot
      col = plgpu.broadcasted_iota(jnp.float32, (ROWS, chunk), 1, layout=_WG)
      col = col + (c * chunk).astype(jnp.float32)
      bv, bc = [_row_vec(-jnp.inf)] * kl, [_row_vec(big)] * kl  # the chunk's picks
      for j in range(k):
        m = jnp.max(xs, axis=1)
        at = -jnp.max(jnp.where(xs == m[:, None], -col, -big), axis=1)
        taken = col == at[:, None]
        xs = jnp.where(taken, -jnp.inf, xs)
        col = jnp.where(taken, big, col)
        bv[j], bc[j] = m, at
      vals, cols = _merge(vals, cols, bv, bc)
      return tuple(vals), tuple(cols)

    init = (tuple(_row_vec(-jnp.inf) for _ in range(kl)), tuple(_row_vec(big) for _ in range(kl)))
    pipeline = plgpu.emit_pipeline(
        step, grid=(n // chunk,), max_concurrent_steps=2, init_carry=init,
        in_specs=[plgpu.BlockSpec((ROWS, chunk), lambda c: (0, c))])
    _, cols = pipeline(x_ref.at[pl.ds(row0, ROWS)])
    for j in range(k):
      col_smem.at[j][...] = cols[j]
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(col_smem, col_ref.at[:, pl.ds(row0, ROWS)])
    plgpu.wait_smem_to_gmem(0)

  return kernel(
      body,
      out_type=jax.ShapeDtypeStruct((k, r), jnp.float32),
      scratch_types=[plgpu.SMEM((k, ROWS), jnp.float32)],
      grid=(r // ROWS,),
      grid_names=("rows",),
  )(x)


def top_k_pallas(x, k: int, chunk: int = CHUNK):
  """lax.top_k(x, k) for float32 x [..., N] on the kernel: (values, int32 indices [..., k]).
  The values are gathered from x at the indices (so they differentiate as lax.top_k's); with
  k <= N no index comes from the padding (real -inf columns are lower), the clip is a guard."""
  lead, n = x.shape[:-1], x.shape[-1]
  rows = x.reshape(-1, n)
  r = rows.shape[0]
  rp, np_ = -(-r // ROWS) * ROWS, -(-n // chunk) * chunk
  padded = jnp.pad(lax.stop_gradient(rows), ((0, rp - r), (0, np_ - n)), constant_values=-jnp.inf)
  cols = _top_k_kernel(padded, k, chunk)
  idx = jnp.minimum(cols.T[:r].astype(jnp.int32), n - 1).reshape(*lead, k)
  return jnp.take_along_axis(x, idx, axis=-1), idx


def top_k_unsupported(x, k: int) -> str | None:
  """Why the kernel does not take `lax.top_k(x, k)` (None: it does)."""
  if (why := not_on_hopper({})) is not None:
    return why
  if x.dtype != jnp.float32:
    return f"dtype {x.dtype} (the kernel takes float32)"
  if not 1 <= k <= MAX_K:
    return f"k={k} (the kernel takes 1..{MAX_K})"
  if k > x.shape[-1]:
    return f"k={k} > the row's {x.shape[-1]} entries"
  return None
