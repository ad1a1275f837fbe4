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


def _rows(rng, r, n, few_values: bool):
  """Rows with ties (few distinct values) or normal values, -inf runs, a row of -inf, a row
  with two finite entries, +inf (NSA's own block)."""
  x = (rng.integers(0, 5, (r, n)) if few_values else rng.standard_normal((r, n))).astype(np.float32)
  x[rng.random(x.shape) < 0.3] = -np.inf
  x[0] = -np.inf
  x[1, :-2] = -np.inf
  x[2, 1] = np.inf
  return x


def _same_as_lax(got, x, k):
  """Values and indices exactly lax.top_k's (ties to the lower index, -inf picks too: the
  kernel's columns are distinct and in the row)."""
  want = jax.lax.top_k(jnp.asarray(x), k)
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
  np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


# (rows, n, k, few distinct values): rows and columns not whole tiles; k 16 and 5 (the lists
# padded to 8)
KERNEL_CASES = [(70, 300, 16, True), (64, 256, 5, False)]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=str)
def test_kernel_interpreted_is_lax_top_k(case):
  """The Mosaic GPU kernel under its interpreter (race detector on) against lax.top_k."""
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as interp
  from jax.experimental.pallas import mosaic_gpu as plgpu
  from longax.kernels.gpu import topk as gpu_topk
  r, n, k, few = case
  x = _rows(np.random.default_rng(r + n), r, n, few)
  try:
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams(detect_races=True)):
      got = jax.block_until_ready(gpu_topk.top_k_pallas(jnp.asarray(x), k))
    assert not interp.get_races().races_found, "a data race in the kernel"
  finally:
    interp.reset_gpu_interpret_mode_state()
  _same_as_lax(got, x, k)


def test_kernel_lowers_for_cuda_and_top_k_takes_it(monkeypatch):
  """It lowers for CUDA (Mosaic GPU) at NSA's 64k row width with batch dims, its values
  differentiate as lax.top_k's (gathered from x), and `top_k` takes it where it takes the
  call (a Hopper GPU: faked here) on inputs of TOPK_KERNEL_MIN_SIZE entries, not below, not
  for bf16 or k > 16."""
  from longax.kernels.gpu import topk as gpu_topk
  x = jnp.zeros((4, topk.TOPK_KERNEL_MIN_SIZE // 4096, 1, 1024), jnp.float32)
  f = jax.jit(lambda x: gpu_topk.top_k_pallas(x, 16)[0].sum())
  text = jax.jit(jax.grad(lambda x: f(x))).trace(x).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text
  monkeypatch.setattr(gpu_topk, "not_on_hopper", lambda call: None)
  assert gpu_topk.top_k_unsupported(x, 16) is None
  assert "dtype" in gpu_topk.top_k_unsupported(x.astype(jnp.bfloat16), 16)
  assert "k=17" in gpu_topk.top_k_unsupported(x, 17)
  lowered = lambda x, k: jax.jit(lambda x: topk.top_k(x, k)).trace(x).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in lowered(x, 16)
  assert "mosaic_gpu" not in lowered(x.astype(jnp.bfloat16), 16)
  assert "mosaic_gpu" not in lowered(x[:, 1:], 16)
  monkeypatch.setattr(topk, "TOPK_KERNEL", False)
  assert "mosaic_gpu" not in lowered(x, 16)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))  # inside shard_map (check_vma)
  sharded = jax.shard_map(lambda x: gpu_topk.top_k_pallas(x, 16), mesh=mesh,
                          in_specs=jax.P("x"), out_specs=jax.P("x"))
  assert "mosaic_gpu" in jax.jit(sharded).trace(x).lower(lowering_platforms=("cuda",)).as_text()
