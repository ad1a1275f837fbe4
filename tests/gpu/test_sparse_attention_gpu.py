"""Block-sparse attention on the Mosaic GPU kernels (impl="pallas": the attention kernels with
block lists) against the float32 reference, forward and every gradient, on random masks at
10-60% density with a query block that sees nothing, ragged lengths, GQA / MQA and broadcast
masks; NSA's selected blocks on the same kernels (a token's query heads folded into a tile's
rows) against the reference, and NSA's attention core with impl="pallas" (all three branches
on the kernels) against its XLA path; NSA's block importance (`compressed_importance`) on its
kernel against the reference; MInference's vertical-slash on its two forward passes against
the reference (bf16 and f16, scattered offsets, bands, T != S, non-causal; the gradient the
XLA path's). Runs on a Hopper GPU; skipped elsewhere.

    python -m pytest -q tests/gpu/test_sparse_attention_gpu.py      # on the device
    python -m pytest -q tests/gpu/test_sparse_attention_gpu.py -k "selected or nsa"
    python -m pytest -q tests/gpu/test_sparse_attention_gpu.py -k importance
    python -m pytest -q tests/gpu/test_sparse_attention_gpu.py -k vertical_slash
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close, block_indices_of, compare, needs_hopper
from longax.kernels import block_sparse_attention, selected_block_attention
from longax.kernels.gpu import attention as gpu

pytestmark = needs_hopper()

# (B, T, S, H, Hkv, D, block_q, block_k, mask [B|1, H|1])
BASE = (2, 512, 512, 4, 2, 128, 64, 64, (2, 4))  # GQA, a mask per (b, h)
RAGGED = (1, 300, 300, 4, 1, 64, 64, 64, (1, 4))  # T, S not multiples of any tile; MQA
T_LT_S = (1, 200, 456, 4, 2, 128, 64, 128, (1, 1))  # bottom-right causal; one mask for all
T_GT_S = (1, 333, 150, 2, 2, 64, 64, 64, (1, 2))  # the first queries see no key
BIG_BLOCKS = (2, 640, 640, 4, 2, 128, 128, 128, (2, 1))  # block_q = the CTA's 128 rows
ODD_BLOCK = (1, 520, 520, 2, 1, 64, 192, 192, (1, 2))  # 192: three 64-key kernel blocks
LONG = (1, 2048, 2048, 2, 1, 128, 64, 64, (1, 2))
FULL = dict(causal=False)
# (shape, block density, options), each for softmax and sigmoid
CASES = [
    (BASE, 0.1, {}), (BASE, 0.6, {}), (BASE, 0.3, FULL), (RAGGED, 0.3, {}), (RAGGED, 0.6, FULL),
    (T_LT_S, 0.3, {}), (T_LT_S, 0.1, FULL), (T_GT_S, 0.6, {}), (BIG_BLOCKS, 0.25, {}),
    (ODD_BLOCK, 0.4, {}), (ODD_BLOCK, 0.4, FULL), (LONG, 0.1, {}),
]


def _mask(shape, density, seed):
  """bool [B|1, H|1, nq, nk]: blocks on with probability `density`, query block 1 all off."""
  b, t, s, h, hkv, d, bq, bk, (bm, hm) = shape
  on = np.random.default_rng(seed).random((bm, hm, -(-t // bq), -(-s // bk))) < density
  on[:, :, min(1, on.shape[2] - 1)] = False
  return on


def _inputs(rand, shape, dtype):
  b, t, s, h, hkv, d = shape[:6]
  return (rand.normal((b, t, h, d), dtype), rand.normal((b, s, hkv, d), dtype),
          rand.normal((b, s, hkv, d), dtype))


def _op(mask, shape, impl, **opts):
  bq, bk = shape[6:8]
  return lambda q, k, v: block_sparse_attention(q, k, v, mask, block_q=bq, block_k=bk,
                                                impl=impl, **opts)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("shape,density,opts", CASES, ids=str)
def test_pallas_matches_reference(rand, shape, density, opts, kind):
  q, k, v = _inputs(rand, shape, jnp.bfloat16)
  mask = _mask(shape, density, seed=int(100 * density) + shape[1])
  opts = dict(opts, kind=kind)
  compare(_op(mask, shape, "pallas", **opts), _op(mask, shape, "reference", **opts), (q, k, v),
          (0, 1, 2), 2e-2, f"{shape} {density} {opts}")


def test_f16_and_a_traced_mask(rand):
  """float16, and a mask that is an argument of the jitted function (lists over every block)."""
  q, k, v = _inputs(rand, BASE, jnp.float16)
  mask = _mask(BASE, 0.3, seed=7)
  got = jax.jit(lambda q, k, v, m: block_sparse_attention(q, k, v, m, impl="pallas"))
  want = _op(mask, BASE, "reference")(q, k, v)
  assert_close(got(q, k, v, jnp.asarray(mask)), want, 2e-2, "traced mask")
  compare(_op(mask, BASE, "pallas"), _op(mask, BASE, "reference"), (q, k, v), (0, 1, 2), 2e-2,
          "f16")


@pytest.mark.parametrize("shape", [BASE, T_LT_S, BIG_BLOCKS], ids=str)
def test_traced_block_indices(rand, shape):
  """block_indices traced under jit (forward / dq lists from the indices: shuffled, -1
  padded, a repeat), forward and every gradient, as the reference of the mask they list."""
  q, k, v = _inputs(rand, shape, jnp.bfloat16)
  mask = _mask(shape, 0.3, seed=shape[1])
  idx = block_indices_of(mask, max(int(mask.sum(-1).max()) + 1, 2), seed=shape[1])
  bq, bk = shape[6:8]
  got = jax.jit(lambda q, k, v, i: block_sparse_attention(q, k, v, block_indices=i, block_q=bq,
                                                          block_k=bk, impl="pallas"))
  compare(lambda q, k, v: got(q, k, v, jnp.asarray(idx)), _op(mask, shape, "reference"),
          (q, k, v), (0, 1, 2), 2e-2, f"{shape} indices")


def test_blocks_off_everywhere_are_never_used(rand):
  """Keys and values of key blocks no query block lists are NaN: a kernel that loaded and
  used them (even times 0) would return NaN; the result is that of any finite values there,
  and their gradients are 0."""
  shape = RAGGED
  q, k, v = _inputs(rand, shape, jnp.bfloat16)
  mask = _mask(shape, 0.4, seed=3)
  mask[..., 1::2] = False  # every other key block: off for every query block and head
  off = (np.arange(shape[2]) // shape[7]) % 2 == 1
  poison = lambda x, fill: jnp.where(off[None, :, None, None], fill, x).astype(x.dtype)
  kn, vn = poison(k, jnp.nan), poison(v, jnp.nan)
  fn = _op(mask, shape, "pallas")
  want = _op(mask, shape, "reference")(q, poison(k, 0.0), poison(v, 0.0))
  assert_close(fn(q, kn, vn), want, 2e-2, "forward")
  grads = jax.grad(lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum(), (0, 1, 2))(q, kn, vn)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g, np.float32)))
  for g in grads[1:]:
    assert not np.any(np.asarray(g, np.float32)[:, off])


TILINGS = {"pingpong": gpu.Blocks(block_kv=64),
           "no_pingpong_kv128": gpu.Blocks(block_kv=128, pingpong=False),
           "one_wg": gpu.Blocks(block_kv=64, wgs=1, bwd_wgs=1)}


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("tiling", TILINGS)
def test_other_tilings(rand, tiling, kind):
  """Tilings other than `sparse_blocks`' for 64-row query blocks: ping-pong (the warpgroups
  alternate, also on the steps one of them skips), 128-key forward blocks, and one compute
  warpgroup (a CTA of 64 query rows: each CTA one list, no union)."""
  from longax.kernels.attention import AttnSpec
  shape = (1, 300, 300, 4, 1, 128, 64, 128, (1, 4))
  q, k, v = _inputs(rand, shape, jnp.bfloat16)
  mask = _mask(shape, 0.3, seed=11)
  spec = AttnSpec(kind, True, shape[5]**-0.5, None, 0, None,
                  -np.log(shape[2]) if kind == "sigmoid" else 0.0)
  got = lambda q, k, v: gpu.block_sparse_pallas(q, k, v, mask, spec, block_q=64, block_k=128,
                                                 blocks=TILINGS[tiling])
  compare(got, _op(mask, shape, "reference", kind=kind), (q, k, v), (0, 1, 2), 2e-2,
          f"{tiling} {kind}")


def test_auto_takes_the_kernel():
  """On a Hopper GPU, auto picks the kernel for bf16 / head dim 128 / 64-blocks (the
  benchmark's `longax.auto` row), and XLA for float32."""
  from longax.kernels._dispatch import resolve
  from longax.kernels.attention import AttnSpec
  x = lambda dt: jnp.zeros((1, 256, 4, 128), dt)
  spec = AttnSpec("softmax", True, 0.1, None, 0, None, 0.0)
  call = lambda dt: dict(q=x(dt), k=x(dt), v=x(dt), spec=spec, block_q=64, block_k=64)
  assert resolve("block_sparse_attention", "auto", call(jnp.bfloat16)) is gpu.block_sparse_pallas
  assert resolve("block_sparse_attention", "auto", call(jnp.float32)) is not gpu.block_sparse_pallas


# ------------------------------------------------------------------ NSA's selected blocks

# (B, T, S, H, Hkv, D, block_size, n): query heads per KV head G = H / Hkv
SELECTED = [
    (2, 300, 300, 4, 4, 64, 64, 3),  # G = 1, ragged T
    (1, 517, 517, 8, 2, 128, 64, 8),  # G = 4
    (1, 1000, 1000, 16, 1, 128, 64, 16),  # G = 16 (the paper's), n = 16
    (1, 200, 456, 16, 4, 64, 128, 1),  # T < S, n = 1, block_size 128 (two kernel key blocks)
    (2, 333, 150, 16, 1, 64, 64, 2),  # T > S: the first tokens see no key
    (1, 260, 260, 12, 2, 64, 64, 4),  # G = 6: a token's rows padded to 8
    (1, 250, 250, 4, 2, 64, 64, 5),  # G = 2
    (1, 384, 384, 16, 2, 128, 64, 16),  # G = 8
]


def _block_indices(shape, seed):
  """int32 [B, T, Hkv, n] in [-1, ceil(S / block_size)): -1 entries, repeats, future blocks,
  and each token's own block (the layer always picks it) in the first slot of odd tokens."""
  b, t, s, h, hkv, d, bs, n = shape
  rng = np.random.default_rng(seed)
  idx = rng.integers(-1, -(-s // bs), (b, t, hkv, n)).astype(np.int32)
  own = (np.arange(t) + s - t) // bs
  idx[:, 1::2, :, 0] = np.maximum(own[1::2], -1)[None, :, None]
  idx[:, ::3, :, -1] = idx[:, ::3, :, 0]  # repeats
  idx[:, 2::5, :, 0] = -1
  return idx


def _selected(idx, shape, impl, **opts):
  return lambda q, k, v: selected_block_attention(q, k, v, idx, block_size=shape[6], impl=impl,
                                                  **opts)


@pytest.mark.parametrize("shape", SELECTED, ids=str)
def test_selected_matches_reference(rand, shape):
  b, t, s, h, hkv, d = shape[:6]
  q, k, v = (rand.normal(sh, jnp.bfloat16) for sh in ((b, t, h, d), (b, s, hkv, d), (b, s, hkv, d)))
  idx = _block_indices(shape, seed=t)
  compare(_selected(idx, shape, "pallas"), _selected(idx, shape, "reference"), (q, k, v),
          (0, 1, 2), 2e-2, str(shape))


@pytest.mark.parametrize("shape", [SELECTED[1], SELECTED[2]], ids=str)
def test_selected_one_token_per_tile(rand, shape):
  """shared=False: each token's heads fill a 64-row tile alone (no per-row block masks)."""
  from longax.kernels.attention import AttnSpec
  b, t, s, h, hkv, d, bs, n = shape
  q, k, v = (rand.normal(sh, jnp.bfloat16) for sh in ((b, t, h, d), (b, s, hkv, d), (b, s, hkv, d)))
  idx = _block_indices(shape, seed=t + 1)
  spec = AttnSpec("softmax", True, d**-0.5, None, 0, None, 0.0)
  got = lambda q, k, v: gpu.selected_pallas(q, k, v, idx, spec, block_size=bs, shared=False)
  compare(got, _selected(idx, shape, "reference"), (q, k, v), (0, 1, 2), 2e-2, str(shape))


@pytest.mark.parametrize("chunks", [True, "lists"])
@pytest.mark.parametrize("shape", SELECTED, ids=str)
def test_selected_keyed_matches_reference(rand, shape, chunks):
  """Key-centric loading (`_selected_keyed`: each block's tokens gathered into 128-slot
  chunks, the own block block-diagonal causal, merged by lse), its chunks on the dense
  kernel with gathered key blocks (True) or on the block-sparse kernels' lists ("lists")."""
  from longax.kernels import sparse_attention as SA
  from longax.kernels.attention import AttnSpec
  b, t, s, h, hkv, d, bs, n = shape
  q, k, v = (rand.normal(sh, jnp.bfloat16) for sh in ((b, t, h, d), (b, s, hkv, d), (b, s, hkv, d)))
  idx = _block_indices(shape, seed=t + 2)
  spec = AttnSpec("softmax", True, d**-0.5, None, 0, None, 0.0)
  if SA.keyed_unsupported(q, k, spec, bs) is not None:
    pytest.skip(SA.keyed_unsupported(q, k, spec, bs))
  got = lambda q, k, v: SA._selected_gpu(q, k, v, idx, spec, block_size=bs, key_centric=chunks)
  compare(got, _selected(idx, shape, "reference"), (q, k, v), (0, 1, 2), 2e-2, str(shape))


@pytest.mark.parametrize("chunks", [True, "lists"])
def test_selected_keyed_non_causal(rand, chunks):
  """Key-centric, non-causal with T < S (no own-block pass), both chunk forms."""
  from longax.kernels import sparse_attention as SA
  from longax.kernels.attention import AttnSpec
  shape = (1, 300, 512, 8, 2, 128, 64, 4)
  b, t, s, h, hkv, d, bs, n = shape
  q, k, v = (rand.normal(sh, jnp.bfloat16) for sh in ((b, t, h, d), (b, s, hkv, d), (b, s, hkv, d)))
  idx = _block_indices(shape, seed=5)
  spec = AttnSpec("softmax", False, d**-0.5, None, 0, None, 0.0)
  got = lambda q, k, v: SA._selected_gpu(q, k, v, idx, spec, block_size=bs, key_centric=chunks)
  compare(got, _selected(idx, shape, "reference", causal=False), (q, k, v), (0, 1, 2), 2e-2)


def test_selected_traced_indices_non_causal_and_f16(rand):
  """Indices that are an argument of the jitted function (lists over every block, as the
  layer's), float16, and causal=False."""
  shape = SELECTED[1]
  b, t, s, h, hkv, d = shape[:6]
  q, k, v = (rand.normal(sh, jnp.float16) for sh in ((b, t, h, d), (b, s, hkv, d), (b, s, hkv, d)))
  idx = _block_indices(shape, seed=1)
  for causal in (True, False):
    fn = jax.jit(lambda q, k, v, i: selected_block_attention(q, k, v, i, block_size=shape[6],
                                                            causal=causal, impl="pallas"))
    want = _selected(idx, shape, "reference", causal=causal)
    compare(lambda q, k, v: fn(q, k, v, jnp.asarray(idx)), want, (q, k, v), (0, 1, 2), 2e-2,
            f"causal={causal}")


def test_selected_blocks_never_selected_are_never_used(rand):
  """K / V of blocks no token selects are NaN: the result is finite and their gradients 0."""
  shape = SELECTED[1]
  b, t, s, h, hkv, d, bs, n = shape
  q, k, v = (rand.normal(sh, jnp.bfloat16) for sh in ((b, t, h, d), (b, s, hkv, d), (b, s, hkv, d)))
  idx = _block_indices(shape, seed=2)
  idx = np.where(idx % 2 == 1, -1, idx)  # odd blocks: never selected
  off = (np.arange(s) // bs) % 2 == 1
  poison = lambda x, fill: jnp.where(off[None, :, None, None], fill, x).astype(x.dtype)
  fn = _selected(idx, shape, "pallas")
  want = _selected(idx, shape, "reference")(q, poison(k, 0.0), poison(v, 0.0))
  assert_close(fn(q, poison(k, jnp.nan), poison(v, jnp.nan)), want, 2e-2, "forward")
  grads = jax.grad(lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum(), (0, 1, 2))(
      q, poison(k, jnp.nan), poison(v, jnp.nan))
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g, np.float32)))
  for g in grads[1:]:
    assert not np.any(np.asarray(g, np.float32)[:, off])


def test_selected_auto_takes_the_kernel():
  from longax.kernels._dispatch import resolve
  from longax.kernels.attention import AttnSpec
  spec = AttnSpec("softmax", True, 0.1, None, 0, None, 0.0)
  call = lambda dt: dict(q=jnp.zeros((1, 256, 16, 128), dt), k=jnp.zeros((1, 256, 1, 128), dt),
                         v=jnp.zeros((1, 256, 1, 128), dt), spec=spec, block_size=64,
                         explicit_positions=False)
  from longax.kernels import sparse_attention as SA
  assert resolve("selected_block_attention", "auto", call(jnp.bfloat16)) is SA._selected_gpu
  assert resolve("selected_block_attention", "auto", call(jnp.float32)) is not SA._selected_gpu


# ------------------------------------------------------------------ NSA's attention core

# (T, H, Hkv, D, NSA settings): the layer's defaults (the paper's), and smaller blocks
NSA_CASES = [(1000, 16, 1, 128, {}),
             (2048, 8, 2, 64, dict(block_size=32, stride=16, select_block=128, n_selected=4,
                                   window=256))]


@pytest.mark.parametrize("case", NSA_CASES, ids=str)
def test_nsa_attend_pallas_matches_xla(rand, case):
  """NSA.attend (compression, the three branches, the gates) with impl="pallas" (every branch
  on the kernels) against impl="xla", bf16, forward and the gradients of q, k, v and the
  gate logits, with the XLA path's selection given to both (the compressed branch's lse,
  from which the selection ranks blocks, differs by impl: near-ties could flip)."""
  from flax import nnx
  from longax.layers import NSA
  t, h, hkv, d, kw = case
  layer = NSA(h * d, h, hkv, head_dim=d, **kw, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
              param_dtype=jnp.float32)
  q, k, v = (rand.normal(sh, jnp.bfloat16) for sh in ((1, t, h, d), (1, t, hkv, d), (1, t, hkv, d)))
  gates = rand.normal((1, t, h, 3), jnp.bfloat16)
  idx = layer.select(q, k, v, impl="xla")
  fn = lambda impl: lambda q, k, v, g: layer.attend(q, k, v, g, impl=impl, block_indices=idx)
  compare(fn("pallas"), fn("xla"), (q, k, v, gates), (0, 1, 2, 3), 2e-2, str(case))


# ------------------------------------------------------------------ NSA's block importance
# `compressed_importance` on its kernel (impl="pallas"; auto takes it since these passed on
# an H100: `kernels/gpu/attention.py` IMPORTANCE_ON_AUTO).

# (B, T, N, H, Hkv, D, block_size, stride): the paper's G = 16, GQA G = 4, MHA, G = 6 (rows
# padded to 8), T < block_size (all zeros), more keys than one 128-key step
IMPORTANCE = [(1, 1000, 61, 16, 1, 128, 32, 16), (2, 300, 18, 8, 2, 64, 32, 16),
              (1, 257, 62, 4, 4, 128, 8, 4), (1, 777, 96, 6, 1, 128, 16, 8),
              (1, 20, 1, 16, 1, 128, 32, 16), (1, 4096, 255, 16, 1, 128, 32, 16)]


@pytest.mark.parametrize("case", IMPORTANCE, ids=str)
def test_importance_matches_reference(rand, case):
  """bf16 against the float32 reference (1e-2), lse from the definition (-inf rows: 0)."""
  from test_sparse_attention import importance_inputs
  from longax.kernels import compressed_importance
  b, t, n, h, hkv, d, l, st = case
  q, k, lse = importance_inputs(rand, b, t, n, h, hkv, d, l, st, jnp.bfloat16)
  fn = lambda impl: compressed_importance(q, k, lse, block_size=l, stride=st, impl=impl)
  got = jax.jit(lambda: fn("pallas"))()
  assert_close(got, fn("reference"), 1e-2, str(case))
  unseen = (np.arange(n) * st + l - 1 > np.arange(t)[:, None])[None, :, None]  # [1, T, 1, N]
  assert not np.any(np.where(unseen, np.asarray(got), 0.0)), "unseen blocks are 0"


def test_nsa_selection_on_the_kernel(rand):
  """NSA with select_impl="pallas" (the importance on its kernel) picks the blocks the XLA
  importance picks, but for rare near-ties (bf16 P); its attention core runs and is finite."""
  from flax import nnx
  from longax.layers import NSA
  t, h, hkv, d = 2048, 16, 1, 128
  layers = {i: NSA(h * d, h, hkv, head_dim=d, select_impl=i, rngs=nnx.Rngs(0),
                   dtype=jnp.bfloat16, param_dtype=jnp.float32) for i in ("xla", "pallas")}
  q, k, v = (rand.normal(sh, jnp.bfloat16) for sh in ((1, t, h, d), (1, t, hkv, d), (1, t, hkv, d)))
  idx = {i: np.sort(np.asarray(m.select(q, k, v, impl="pallas")), -1) for i, m in layers.items()}
  assert np.mean(np.all(idx["xla"] == idx["pallas"], -1)) > 0.98
  o = layers["pallas"].attend(q, k, v, rand.normal((1, t, h, 3), jnp.bfloat16), impl="pallas")
  assert np.all(np.isfinite(np.asarray(o, np.float32)))


# ------------------------------------------------------------- MInference's vertical-slash
# `vertical_slash_attention` on its kernels (impl="pallas": a slash pass over runs of offsets
# and a vertical pass over gathered columns, merged by lse; the gradient is the XLA path's).

# (B, T, S, H, Hkv, D, nv, ns, band, causal): scattered offsets with offset 0, a short run and
# repeats (`vs_pattern`), plus a local band of `band` offsets (one run: plain steps)
VS_CASES = [(1, 300, 300, 4, 1, 64, 9, 12, 0, True),
            (2, 1000, 1000, 4, 2, 128, 40, 30, 300, True),
            (1, 2000, 2000, 8, 2, 128, 60, 20, 700, True),
            (1, 777, 1500, 4, 2, 64, 30, 50, 200, True),  # T < S
            (1, 700, 400, 2, 2, 128, 20, 20, 100, True),  # T > S: the first rows see nothing
            (1, 520, 600, 4, 1, 128, 25, 40, 150, False)]


def _vs(case, dtype, rand):
  from test_sparse_attention_gpu_lowering import vs_pattern
  b, t, s, h, hkv, d, nv, ns, band, causal = case
  q, k, v = _inputs(rand, (b, t, s, h, hkv, d), dtype)
  vert, slash = vs_pattern(t + s, b, h, s, nv, ns, band)
  from longax.kernels import vertical_slash_attention
  fn = lambda impl: lambda q, k, v: vertical_slash_attention(q, k, v, vert, slash, causal=causal,
                                                             impl=impl)
  return fn, (q, k, v)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("case", VS_CASES, ids=str)
def test_vertical_slash_matches_reference(rand, case, dtype):
  """Forward against the float32 reference (2e-2); no NaN from keys never listed."""
  fn, args = _vs(case, dtype, rand)
  got = jax.jit(fn("pallas"))(*args)
  assert_close(got, fn("reference")(*args), 2e-2, f"{case} {dtype.__name__}")


def test_vertical_slash_gradient_is_xla(rand):
  """The forward on the kernels, the gradient the XLA path's: both against the reference."""
  fn, args = _vs(VS_CASES[1], jnp.bfloat16, rand)
  compare(fn("pallas"), fn("reference"), args, (0, 1, 2), 2e-2, "vertical-slash grads")


def test_vertical_slash_estimated_pattern(rand):
  """`vertical_slash_pattern`'s estimate, as `layers.sparse_prefill` and the benchmark use it,
  passed as jit arguments (traced lists)."""
  from longax.kernels import vertical_slash_attention, vertical_slash_pattern
  q, k, v = _inputs(rand, (1, 2048, 2048, 4, 1, 128), jnp.bfloat16)
  vert, slash = vertical_slash_pattern(q, k, n_vertical=16, n_slash=96)
  f = jax.jit(lambda q, k, v, vi, si, impl: vertical_slash_attention(q, k, v, vi, si, impl=impl),
              static_argnums=5)
  assert_close(f(q, k, v, vert, slash, "pallas"), f(q, k, v, vert, slash, "reference"), 2e-2)


def test_vertical_slash_auto_takes_the_kernel():
  """On a Hopper GPU auto takes the kernel for bf16 / f16, head dims 64 / 128; float32 XLA."""
  from longax.kernels._dispatch import resolve
  from longax.kernels.attention import AttnSpec
  x = lambda d, dt: jnp.zeros((1, 256, 4, d), dt)
  spec = AttnSpec("softmax", True, 0.1, None, 0, None, 0.0)
  take = lambda d, dt: resolve("vertical_slash_attention", "auto", dict(
      q=x(d, dt), k=x(d, dt), v=x(d, dt), spec=spec)) is gpu.vertical_slash_pallas
  assert take(128, jnp.bfloat16) and take(64, jnp.float16) and not take(128, jnp.float32)


@pytest.mark.parametrize("shape", [CASES[0][0], (1, 300, 300, 4, 2, 128, 64, 64, (1, 4))], ids=str)
def test_lse_matches_reference(rand, shape):
  """return_lse on the kernels: the rows' log-sum-exp (-inf for query block 1, which sees
  nothing) and the gradients through o and lse together."""
  q, k, v = _inputs(rand, shape, jnp.bfloat16)
  mask = _mask(shape, 0.4, seed=7)
  fin = lambda f: lambda q, k, v: (lambda o, l: (o, jnp.where(jnp.isinf(l), 0.0, l)))(*f(q, k, v))
  got, want = (_op(mask, shape, impl, return_lse=True) for impl in ("pallas", "reference"))
  bq = shape[6]
  assert bool(jnp.all(jnp.isneginf(got(q, k, v)[1][:, bq:2 * bq])))
  compare(fin(got), fin(want), (q, k, v), (0, 1, 2), 2e-2, f"{shape} lse")


@pytest.mark.parametrize("case", [(1, 100, 300, 1, 64, 16), (2, 1000, 4100, 4, 128, 16),
                                  (1, 16384, 65536, 1, 128, 16), (1, 300, 300, 2, 64, None)],
                         ids=str)
def test_block_max_matches_reference(rand, case):
  """Block top-k's estimate on the kernel: each row's best score per 64-key block, bf16 in,
  float32 out, within bf16 rounding of the float32 reference; -inf where the reference has it
  (causal rows), nothing unwritten. (B, R, S, Hkv, D, row_block); the third: 64k keys, the
  prefill's probes at 4 query heads x 4 probes per KV head."""
  from longax.kernels import block_max_scores
  b, r, s, hkv, d, rb = case
  q, k = rand.normal((b, r, hkv, d), jnp.bfloat16), rand.normal((b, s, hkv, d), jnp.bfloat16)
  got = np.asarray(block_max_scores(q, k, block=64, row_block=rb, impl="pallas"))
  want = np.asarray(block_max_scores(q, k, block=64, row_block=rb, impl="reference"))
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
  fin = np.isfinite(want)
  assert np.abs(got[fin] - want[fin]).max() <= 2e-2 * np.abs(want[fin]).max()


@pytest.mark.parametrize("case", [(1, 300, 300, 2, 1, 64, 2), (2, 1000, 4100, 8, 2, 128, 1),
                                  (1, 8192, 8192, 16, 4, 128, 16),
                                  (1, 65536, 65536, 16, 4, 128, 16)], ids=str)
def test_block_mean_matches_reference(rand, case):
  """Block top-k's summary branch on the kernel (attention over key-block means, each query
  block's own columns masked), bf16 in: o within bf16 rounding of the float32 reference, the
  lse within 1e-2, -inf (and o = 0) where a query block takes no block. (B, T, S, H, Hkv, D,
  mask heads); masks as the prefill's: blocks wholly before the query's, about half of them;
  the last two at 8k and 64k, the prefill's shape."""
  from longax.kernels import block_mean_attention
  b, t, s, h, hkv, d, mh = case
  q = rand.normal((b, t, h, d), jnp.bfloat16)
  k, v = rand.normal((b, s, hkv, d), jnp.bfloat16), rand.normal((b, s, hkv, d), jnp.bfloat16)
  nq, nk = -(-t // 64), -(-s // 64)
  i, j = jnp.arange(nq)[:, None], jnp.arange(nk)[None, :]
  mask = (j < i) & (rand.uniform((1, mh, nq, nk), 0.0, 1.0) < 0.5)
  o, lse = (np.asarray(x) for x in block_mean_attention(q, k, v, mask, impl="pallas"))
  want_o, want_lse = (np.asarray(x) for x in block_mean_attention(q, k, v, mask, impl="reference"))
  np.testing.assert_array_equal(np.isinf(lse), np.isinf(want_lse))
  fin = np.isfinite(want_lse)
  assert np.abs(lse[fin] - want_lse[fin]).max() <= 1e-2
  assert_close(o, want_o, 2e-2, what=str(case))
