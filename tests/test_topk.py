"""`kernels.top_k`: lax.top_k's values and indices, one pass or in two stages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longax.kernels import topk


@pytest.mark.parametrize("n,k,chunk", [(1024, 16, 128), (1000, 16, 128), (130, 16, 64),
                                       (37, 3, 4), (37, 4, 4), (9, 2, 4)])
def test_staged_is_lax_top_k(n, k, chunk):
  """Values and indices: ties (few distinct values) to the lower index, -inf runs, +inf
  (NSA's own block), rows not a multiple of the chunk, rows with fewer than k finite
  entries (whose -inf picks may be any -inf: their indices only stay inside the row)."""
  rng = np.random.default_rng(n + k)
  x = rng.integers(0, 5, (3, 4, n)).astype(np.float32)
  x[rng.random(x.shape) < 0.3] = -np.inf
  x[0, 0, :] = -np.inf
  x[0, 1, :-2] = -np.inf
  x[1, :, n // 2:] = -np.inf
  x[2, :, 1] = np.inf
  got, want = topk.top_k_staged(jnp.asarray(x), k, chunk), jax.lax.top_k(jnp.asarray(x), k)
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
  fin = np.isfinite(np.asarray(want[0])) | (np.asarray(want[0]) > 0)
  np.testing.assert_array_equal(np.asarray(got[1])[fin], np.asarray(want[1])[fin])
  assert np.all((np.asarray(got[1]) >= 0) & (np.asarray(got[1]) < n))


@pytest.mark.parametrize("staged_here", [False, True])
def test_top_k_takes_two_stages_for_long_rows_only(staged_here, monkeypatch):
  """Rows over two chunks with k within one get the staged branch (two more top_k's in the
  program, beside the plain one `platform_dependent` keeps), others one lax.top_k; under jit
  the answer is lax.top_k's whether this platform takes the stages or not."""
  if staged_here:
    monkeypatch.setattr(topk, "STAGED_PLATFORMS", ("cuda", jax.default_backend()))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 600)), jnp.float32)
  for n, k, staged in ((600, 16, True), (2 * topk.TOPK_CHUNK, 16, False), (600, 200, False)):
    jaxpr = str(jax.make_jaxpr(lambda x: topk.top_k(x, k))(x[:, :n]))
    assert jaxpr.count("top_k[") == (3 if staged else 1), (n, k)
    got, want = jax.jit(lambda x: topk.top_k(x, k))(x[:, :n]), jax.lax.top_k(x[:, :n], k)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
