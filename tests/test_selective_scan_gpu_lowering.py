"""The Mosaic GPU selective scan lowers for "cuda" on any machine, forward and backward, with
and without sequence segments and resets. Running it is checked on the device (`tests/gpu/`).
~10-20 s a case on 2 cores."""

import jax
import jax.numpy as jnp
import pytest

from longax.kernels.gpu import selective_scan as gpu

# (B, L, D, N, dtype, resets, segments)
CASES = [
    (1, 100, 128, 16, jnp.bfloat16, False, 1),
    (1, 200, 128, 8, jnp.float32, True, 2),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_lowers_forward_and_backward(case):
  b, l, d, n, dtype, resets, segments = case
  u = jnp.zeros((b, l, d), dtype)
  bc = jnp.zeros((b, l, n), dtype)
  r = jnp.zeros((b, l), bool) if resets else None

  def loss(u, dt, A, Bm, Cm, h0):
    y, h = gpu.selective_scan_pallas(u, dt, A, Bm, Cm, h0, r, segments=segments)
    return y.sum() + h.sum()

  lowered = jax.jit(jax.grad(loss, argnums=range(6))).trace(
      u, jnp.zeros((b, l, d)), jnp.zeros((d, n)), bc, bc, jnp.zeros((b, d, n))).lower(
          lowering_platforms=("cuda",))
  assert lowered.as_text().count("mosaic_gpu") >= 4
