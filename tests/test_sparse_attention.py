"""Sparse attention (block-sparse, NSA selected blocks, vertical-slash): every impl against
the float32 reference, whose dense masks are built from the patterns independently of the
XLA path's key lists; plus dense-attention identities and the pattern estimator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close, block_indices_of, compare
from longax.kernels import (attention, block_sparse_attention, compressed_importance,
                            selected_block_attention, sigmoid_attention, vertical_slash_attention,
                            vertical_slash_pattern)

IMPLS = ["xla"]  # block-sparse's pallas kernel (GPU): tests/gpu/test_sparse_attention_gpu.py


def _qkv(rand, b, t, s, h, hkv, d, dtype=jnp.float32, dv=None):
  return (rand.normal((b, t, h, d), dtype), rand.normal((b, s, hkv, d), dtype),
          rand.normal((b, s, hkv, dv or d), dtype))


def _bits(rand, shape, p=0.5):
  return np.asarray(rand.uniform(shape, 0.0, 1.0)) < p


# ------------------------------------------------------------------------------ block-sparse

# (B, T, S, H, Hkv, D, block_q, block_k, per-batch/per-head mask)
BS_CASES = [
    ((2, 37, 37, 4, 2, 8, 8, 16, True), dict()),  # ragged, GQA, a mask per (b, h)
    ((1, 21, 45, 4, 2, 8, 8, 8, False), dict(causal=False, kind="sigmoid", bias=-1.0)),  # T < S
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,opts", BS_CASES, ids=str)
def test_block_sparse_matches_reference_f32(rand, impl, shape, opts):
  b, t, s, h, hkv, d, bq, bk, full = shape
  q, k, v = _qkv(rand, b, t, s, h, hkv, d)
  mask = _bits(rand, (b if full else 1, h if full else 1, -(-t // bq), -(-s // bk)))
  fn = lambda impl: lambda q, k, v: block_sparse_attention(q, k, v, mask, block_q=bq,
                                                          block_k=bk, impl=impl, **opts)
  compare(fn(impl), fn("reference"), (q, k, v), (0, 1, 2), jnp.float32, str(opts))


def test_block_sparse_bf16_and_traced_mask(rand):
  q, k, v = _qkv(rand, 2, 33, 33, 4, 2, 16, jnp.bfloat16)
  mask = _bits(rand, (2, 4, 5, 3))
  ref = lambda q, k, v: block_sparse_attention(q, k, v, mask, block_q=8, block_k=16, impl="reference")
  got = lambda q, k, v: block_sparse_attention(q, k, v, mask, block_q=8, block_k=16, impl="xla")
  compare(got, ref, (q, k, v), (0, 1, 2), jnp.bfloat16)
  assert got(q, k, v).dtype == jnp.bfloat16
  # A mask traced under jit: every key block becomes a (masked) step, same result.
  traced = jax.jit(lambda q, k, v, m: block_sparse_attention(q, k, v, m, block_q=8, block_k=16))
  assert_close(traced(q, k, v, jnp.asarray(mask)), ref(q, k, v), jnp.bfloat16)


@pytest.mark.parametrize("impl", ["reference"] + IMPLS)
@pytest.mark.parametrize("shape,opts", BS_CASES, ids=str)
def test_block_sparse_indices_are_the_mask(rand, impl, shape, opts):
  """block_indices (shuffled, repeats, -1, blocks in the causal future) give the mask's
  attention, forward and gradients, concrete and traced under jit (the XLA path's steps then
  the indices' n, not every key block)."""
  b, t, s, h, hkv, d, bq, bk, full = shape
  q, k, v = _qkv(rand, b, t, s, h, hkv, d)
  nq, nk = -(-t // bq), -(-s // bk)
  mask = _bits(rand, (b if full else 1, h if full else 1, nq, nk), 0.4)
  idx = block_indices_of(mask, nk + 1, seed=t + s)
  want = lambda q, k, v: block_sparse_attention(q, k, v, mask, block_q=bq, block_k=bk,
                                                impl="reference", **opts)
  got = lambda q, k, v: block_sparse_attention(q, k, v, block_indices=idx, block_q=bq,
                                               block_k=bk, impl=impl, **opts)
  compare(got, want, (q, k, v), (0, 1, 2), jnp.float32, f"{impl} concrete")
  traced = jax.jit(lambda q, k, v, i: block_sparse_attention(q, k, v, block_indices=i, block_q=bq,
                                                             block_k=bk, impl=impl, **opts))
  compare(lambda q, k, v: traced(q, k, v, jnp.asarray(idx)), want, (q, k, v), (0, 1, 2),
          jnp.float32, f"{impl} traced")


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_block_sparse_all_on_is_dense_attention(rand, kind):
  q, k, v = _qkv(rand, 2, 29, 35, 4, 2, 8)
  mask = np.ones((1, 1, 4, 3), bool)
  dense = attention if kind == "softmax" else sigmoid_attention
  for causal in (True, False):
    want = dense(q, k, v, causal=causal, impl="reference")
    for impl in ["reference"] + IMPLS:
      got = jax.jit(lambda q, k, v: block_sparse_attention(
          q, k, v, mask, block_q=8, block_k=12, causal=causal, kind=kind, impl=impl))(q, k, v)
      assert_close(got, want, what=f"{impl} causal={causal}")


def test_block_sparse_window_mask_is_windowed_attention(rand):
  """Query block i sees key blocks i-1 and i (causal): its last row has window 2c, its
  first row window c + 1, exactly as `attention(window=...)`."""
  c, n = 8, 5
  q, k, v = _qkv(rand, 1, c * n, c * n, 4, 2, 8)
  blocks = np.arange(n)
  mask = ((blocks[:, None] - blocks[None, :]) <= 1)[None, None]
  for impl in ["reference"] + IMPLS:
    got = jax.jit(lambda q, k, v: block_sparse_attention(q, k, v, mask, block_q=c, block_k=c,
                                                         impl=impl))(q, k, v)
    last = attention(q, k, v, window=2 * c, impl="reference")
    first = attention(q, k, v, window=c + 1, impl="reference")
    assert_close(got[:, c - 1::c], last[:, c - 1::c], what=f"{impl} last rows")
    assert_close(got[:, ::c], first[:, ::c], what=f"{impl} first rows")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(2, 37, 37, 4, 2, 8, 8, 16, True), (1, 21, 45, 4, 2, 8, 8, 8, False)],
                         ids=str)
def test_block_sparse_lse_matches_reference_f32(rand, impl, shape):
  """return_lse: the rows' log-sum-exp, forward and gradients through o and lse together
  (the lse's own cotangent), rows that see nothing included (-inf, no NaN in gradients)."""
  b, t, s, h, hkv, d, bq, bk, full = shape
  q, k, v = _qkv(rand, b, t, s, h, hkv, d)
  mask = _bits(rand, (b if full else 1, h if full else 1, -(-t // bq), -(-s // bk)))
  mask[..., 1, :] = False  # a query block that sees nothing
  fn = lambda impl: lambda q, k, v: block_sparse_attention(q, k, v, mask, block_q=bq, block_k=bk,
                                                          impl=impl, return_lse=True)
  o, lse = fn(impl)(q, k, v)
  assert lse.shape == (b, t, h) and lse.dtype == jnp.float32
  assert bool(jnp.all(jnp.isneginf(lse[:, bq:2 * bq])))
  finite = lambda f: lambda q, k, v: (lambda o, lse: (o, jnp.where(jnp.isinf(lse), 0.0, lse)))(*f(q, k, v))
  compare(finite(fn(impl)), finite(fn("reference")), (q, k, v), (0, 1, 2), jnp.float32, "lse")


def test_block_sparse_lse_merges_to_dense(rand):
  """Two block-sparse calls over complementary masks, merged by their lse, are dense
  attention (the summary branch's contract)."""
  from longax.kernels.attention import merge_partials
  q, k, v = _qkv(rand, 1, 40, 40, 4, 2, 8)
  m = _bits(rand, (1, 4, 5, 5))
  parts = [block_sparse_attention(q, k, v, x, block_q=8, block_k=8, return_lse=True)
           for x in (m, ~m)]
  o, _ = merge_partials(*parts[0], *parts[1])
  assert_close(o, attention(q, k, v), jnp.float32)
  with pytest.raises(ValueError, match="return_lse.*softmax"):
    block_sparse_attention(q, k, v, m, block_q=8, block_k=8, kind="sigmoid", return_lse=True)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_block_sparse_empty_rows_give_zero(rand, kind):
  q, k, v = _qkv(rand, 1, 24, 24, 2, 1, 8)
  mask = np.ones((1, 2, 3, 3), bool)
  mask[0, 0, 1] = False  # head 0, queries 8..15 see nothing
  mask[0, 1, :, 0] = False  # head 1: queries 0..7 (causal) see nothing
  for impl in ["reference"] + IMPLS:
    fn = lambda q, k, v: block_sparse_attention(q, k, v, mask, block_q=8, block_k=8,
                                                kind=kind, impl=impl)
    loss = lambda q, k, v: (jnp.sum(fn(q, k, v) ** 2), fn(q, k, v))
    (_, o), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
    np.testing.assert_array_equal(np.asarray(o[0, 8:16, 0]), 0.0)
    np.testing.assert_array_equal(np.asarray(o[0, :8, 1]), 0.0)
    assert np.all(np.abs(np.asarray(o[0, 16:, 0])) > 0)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    np.testing.assert_array_equal(np.asarray(grads[0][0, 8:16, 0]), 0.0)


# ---------------------------------------------------------------------- NSA selected blocks


def _block_indices(rand, b, t, hkv, n, n_blocks):
  """Random block indices with -1 and repeats planted."""
  idx = np.array(jax.random.randint(rand._next(), (b, t, hkv, n), -1, n_blocks))
  idx[:, ::3, :, 1] = idx[:, ::3, :, 0]  # repeats
  idx[:, 1::4, :, 0] = -1
  return jnp.asarray(idx, jnp.int32)


# (B, T, S, H, Hkv, D, block_size, n)
SEL_CASES = [
    ((2, 37, 37, 4, 2, 8, 8, 3), dict()),
    ((1, 19, 45, 8, 2, 8, 16, 2), dict(causal=False, scale=0.2)),  # T < S, groups of 4
]


def test_selected_xla_takes_key_centric_within_its_limits(rand, monkeypatch):
  """The XLA path's choice: key-centric for small groups within the element budget, the scan
  for larger groups, decode positions, or past the budget."""
  from longax.kernels import sparse_attention as SA
  calls = []
  monkeypatch.setattr(SA, "_selected_keyed", lambda *a, **kw: calls.append("keyed"))
  monkeypatch.setattr(SA, "_selected_scan", lambda *a, **kw: calls.append("scan"))
  spec = SA.AttnSpec("softmax", True, 0.3, None, 0, None, 0.0)
  q, k, v = _qkv(rand, 1, 16, 16, 4, 2, 8)  # G = 2
  idx = _block_indices(rand, 1, 16, 2, 3, 2)
  SA._selected_xla(q, k, v, idx, spec, block_size=8)
  SA._selected_xla(q, k, v, idx, spec, block_size=8, q_positions=jnp.arange(16))
  monkeypatch.setattr(SA, "SELECTED_KEYED_XLA_MAX_ELEMENTS", q.size * 3 - 1)
  SA._selected_xla(q, k, v, idx, spec, block_size=8)
  monkeypatch.setattr(SA, "SELECTED_KEYED_XLA_MAX_ELEMENTS", q.size * 3)
  monkeypatch.setattr(SA, "SELECTED_KEYED_XLA_MAX_GROUP", 1)
  SA._selected_xla(q, k, v, idx, spec, block_size=8)
  assert calls == ["keyed", "scan", "scan", "scan"]


@pytest.mark.parametrize("keyed_max_group", [8, 0])  # the XLA path key-centric / as a scan
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,opts", SEL_CASES, ids=str)
def test_selected_matches_reference_f32(rand, impl, shape, opts, keyed_max_group, monkeypatch):
  from longax.kernels import sparse_attention as SA
  monkeypatch.setattr(SA, "SELECTED_KEYED_XLA_MAX_GROUP", keyed_max_group)
  b, t, s, h, hkv, d, bs, n = shape
  q, k, v = _qkv(rand, b, t, s, h, hkv, d)
  idx = _block_indices(rand, b, t, hkv, n, -(-s // bs))
  fn = lambda impl: lambda q, k, v: selected_block_attention(q, k, v, idx, block_size=bs,
                                                            impl=impl, **opts)
  compare(fn(impl), fn("reference"), (q, k, v), (0, 1, 2), jnp.float32, str(opts))


def test_selected_bf16_repeats_and_empty(rand):
  q, k, v = _qkv(rand, 1, 32, 32, 4, 2, 16, jnp.bfloat16)
  idx = _block_indices(rand, 1, 32, 2, 3, 4)
  for impl in IMPLS:
    fn = lambda impl: lambda q, k, v: selected_block_attention(q, k, v, idx, block_size=8, impl=impl)
    compare(fn(impl), fn("reference"), (q, k, v), (0, 1, 2), jnp.bfloat16)
  # Repeats count once: [a, a, b] == [a, b, -1]; all -1 (or only future blocks) gives 0.
  q, k, v = _qkv(rand, 1, 16, 16, 2, 1, 8)
  rep = jnp.array([0, 0, 1], jnp.int32)
  once = jnp.array([0, 1, -1], jnp.int32)
  full = lambda x: jnp.broadcast_to(x, (1, 16, 1, 3))
  for impl in ["reference"] + IMPLS:
    sel = jax.jit(lambda q, k, v, i: selected_block_attention(q, k, v, i, block_size=8, impl=impl))
    a = sel(q, k, v, full(rep))
    assert_close(a, sel(q, k, v, full(once)))
    dense = attention(q, k, v, impl="reference")
    assert_close(a, dense, what="blocks 0 and 1 are every key")
    empty = sel(q, k, v, full(jnp.array([-1, -1, 1])))
    np.testing.assert_array_equal(np.asarray(empty[:, :8]), 0.0)


def test_selected_q_positions(rand):
  """Queries placed by q_positions ([B, T], a decode cache): keys past them stay unseen,
  as the reference's; the bottom-right positions given explicitly change nothing."""
  q, k, v = _qkv(rand, 2, 5, 24, 4, 2, 8)
  idx = _block_indices(rand, 2, 5, 2, 2, 3)
  pos = jnp.array([[3, 4, 5, 6, 7], [12, 13, 14, 15, 16]], jnp.int32)
  fn = lambda impl: lambda q, k, v: selected_block_attention(q, k, v, idx, block_size=8,
                                                            impl=impl, q_positions=pos)
  compare(fn("xla"), fn("reference"), (q, k, v), (0, 1, 2), jnp.float32)
  plain = selected_block_attention(q, k, v, idx, block_size=8, impl="xla")
  placed = selected_block_attention(q, k, v, idx, block_size=8, impl="xla",
                                    q_positions=jnp.arange(19, 24))
  assert_close(placed, plain)
  with pytest.raises(ValueError, match=r"`q_positions` must have shape \(5,\) or \(2, 5\)"):
    selected_block_attention(q, k, v, idx, block_size=8, q_positions=jnp.arange(4))


# (B, T, S, H, Hkv, D, block_size, n, rows, max_batch): key-centric loading; rows = tokens per
# chunk, small ones make many chunks, a small max_batch spreads them over several calls
KEYED_CASES = [
    ((2, 37, 37, 4, 4, 8, 8, 3, 8, 32768), dict()),  # G=1, ragged last block, 8 tokens per chunk
    ((1, 50, 50, 8, 2, 8, 16, 4, 16, 7), dict()),  # G=4: 16 tokens per chunk; 7 chunks per call
    ((1, 29, 32, 4, 2, 8, 8, 2, 4, 5), dict(causal=False, scale=0.3)),  # T < S, non-causal
]


def _xla_attend(scale, block_size=None):  # `_kernel_attend`'s signature, on the XLA path
  from longax.kernels import sparse_attention as SA
  return SA._op_attend(scale)


@pytest.mark.parametrize("shape,opts", KEYED_CASES, ids=str)
def test_selected_keyed_matches_reference_f32(rand, shape, opts):
  """Key-centric loading (pairs sorted by block, each block's tokens gathered into chunks,
  the own block as block-diagonal causal attention, merged by lse) on the XLA attention
  path: forward and gradients equal the reference, -1 and repeats included."""
  from longax.kernels import sparse_attention as SA
  from longax.kernels.attention import AttnSpec
  b, t, s, h, hkv, d, bs, n, rows, max_batch = shape
  q, k, v = _qkv(rand, b, t, s, h, hkv, d)
  idx = _block_indices(rand, b, t, hkv, n, -(-s // bs))
  causal, scale = opts.get("causal", True), opts.get("scale", d**-0.5)
  spec = AttnSpec("softmax", causal, scale, None, 0, None, 0.0)
  assert SA.keyed_unsupported(q, k, spec, bs) is None
  attend = _xla_attend(scale)
  keyed = lambda q, k, v: SA._selected_keyed(
      q, k, v, idx, spec, block_size=bs, attend=attend, rows=rows,
      chunks=SA._chunks_gathered(attend, max_batch=max_batch))
  ref = lambda q, k, v: selected_block_attention(q, k, v, idx, block_size=bs, impl="reference",
                                                 **opts)
  compare(keyed, ref, (q, k, v), (0, 1, 2), jnp.float32, str(opts))


def test_selected_keyed_dispatch_and_limits(rand, monkeypatch):
  """The Hopper entry takes key-centric loading where asked (its dense calls replaced by the
  XLA path here, on the CPU) and says why it cannot."""
  from longax.kernels import sparse_attention as SA
  from longax.kernels.attention import AttnSpec
  q, k, v = _qkv(rand, 1, 40, 40, 4, 4, 8)
  idx = _block_indices(rand, 1, 40, 4, 2, 5)
  spec = AttnSpec("softmax", True, 8**-0.5, None, 0, None, 0.0)
  monkeypatch.setattr(SA, "_kernel_attend", _xla_attend)
  # The calls that compute, jitted (the dispatch is Python, run as it traces): eagerly, every
  # op of the key-centric path compiled on its own (~20 s). Made here: the patches above and
  # below are read when each call (a new shape or dtype) traces.
  selected = jax.jit(SA._selected_gpu, static_argnums=4,
                     static_argnames=("block_size", "key_centric"))
  got = selected(q, k, v, idx, spec, block_size=8, key_centric=True)
  assert_close(got, selected_block_attention(q, k, v, idx, block_size=8, impl="reference"))
  # the default: key-centric for the groups SELECTED_KEYED_MIN_LENGTH lists from their length
  # on, its chunks in SELECTED_KEYED_FORM (the lists form's kernels need the GPU: a stand-in)
  monkeypatch.setattr(SA._gpu, "selected_pallas", lambda *a, **kw: "tiles")
  monkeypatch.setattr(SA, "SELECTED_KEYED_MIN_LENGTH", {1: 40})
  assert SA.SELECTED_KEYED_FORM == "lists"
  assert SA._selected_gpu(q, k, v, idx, spec, block_size=8) == "tiles"  # float32: the tiles
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))

  class Lists(Exception):
    pass

  def lists(*a, **kw):
    raise Lists
  monkeypatch.setattr(SA._gpu, "keyed_chunks_pallas", lists)
  with pytest.raises(Lists):
    SA._selected_gpu(q, k, v, idx, spec, block_size=8)
  monkeypatch.setattr(SA, "SELECTED_KEYED_FORM", True)
  assert selected(q, k, v, idx, spec, block_size=8).shape == q.shape
  f16 = [x.astype(jnp.float16) for x in (q, k, v)]  # bf16 only: what the GPU tests run
  assert SA._selected_gpu(*f16, idx, spec, block_size=8) == "tiles"
  monkeypatch.setattr(SA, "SELECTED_KEYED_MIN_LENGTH", {1: 41})
  assert SA._selected_gpu(q, k, v, idx, spec, block_size=8) == "tiles"
  monkeypatch.setattr(SA, "SELECTED_KEYED_MIN_LENGTH", {1: 40})
  monkeypatch.setattr(SA, "SELECTED_KEYED_MAX_ELEMENTS", q.size * 2 - 1)  # n = 2
  assert SA._selected_gpu(q, k, v, idx, spec, block_size=8) == "tiles"
  monkeypatch.setattr(SA, "SELECTED_KEYED_MAX_ELEMENTS", q.size * 2)
  k2, v2 = k[:, :, :2], v[:, :, :2]  # G = 2: not listed
  assert SA._selected_gpu(q, k2, v2, idx[:, :, :2], spec, block_size=8) == "tiles"
  monkeypatch.setattr(SA, "SELECTED_KEYED_MIN_LENGTH", {1: 41, 2: 40})
  assert selected(q, k2, v2, idx[:, :, :2], spec, block_size=8).shape == q.shape
  short = q[:, :30]
  assert SA.keyed_unsupported(short, k, spec, 8) == (
      "causal with T=30 != S=40 (its own-block pass tiles T as S)")
  free = AttnSpec("softmax", False, 0.3, None, 0, None, 0.0)
  assert SA.keyed_unsupported(q, k[:, :36], free, 8) == (
      "non-causal with S=36 not a multiple of block_size=8")


# ------------------------------------------------------------------------- vertical-slash


def _vs_indices(rand, b, h, nv, ns, s):
  vert = np.array(jax.random.randint(rand._next(), (b, h, nv), -1, s))
  slash = np.array(jax.random.randint(rand._next(), (b, h, ns), -1, s))
  vert[..., 1] = vert[..., 0]  # repeats
  slash[..., 1] = slash[..., 0]
  slash[..., 2] = 0  # the diagonal, which crosses the columns: keys on both count once
  slash[..., -1] = -1
  return jnp.asarray(vert, jnp.int32), jnp.asarray(slash, jnp.int32)


# (B, T, S, H, Hkv, D, nv, ns)
VS_CASES = [
    ((2, 37, 37, 4, 2, 8, 5, 7), dict()),
    ((1, 21, 45, 2, 1, 8, 70, 9), dict(causal=False)),  # T < S, several steps
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,opts", VS_CASES, ids=str)
def test_vertical_slash_matches_reference_f32(rand, impl, shape, opts):
  b, t, s, h, hkv, d, nv, ns = shape
  q, k, v = _qkv(rand, b, t, s, h, hkv, d)
  vert, slash = _vs_indices(rand, b, h, nv, ns, s)
  fn = lambda impl: lambda q, k, v: vertical_slash_attention(q, k, v, vert, slash, impl=impl, **opts)
  compare(fn(impl), fn("reference"), (q, k, v), (0, 1, 2), jnp.float32, str(opts))


def test_vertical_slash_bf16_and_identities(rand):
  q, k, v = _qkv(rand, 1, 40, 40, 4, 2, 16, jnp.bfloat16)
  vert, slash = _vs_indices(rand, 1, 4, 6, 6, 40)
  for impl in IMPLS:
    fn = lambda impl: lambda q, k, v: vertical_slash_attention(q, k, v, vert, slash, impl=impl)
    compare(fn(impl), fn("reference"), (q, k, v), (0, 1, 2), jnp.bfloat16)
  q, k, v = _qkv(rand, 1, 12, 12, 2, 1, 8)
  none = -jnp.ones((1, 2, 1), jnp.int32)
  for impl in ["reference"] + IMPLS:
    vs = jax.jit(lambda q, k, v, c, o: vertical_slash_attention(q, k, v, c, o, impl=impl))
    # Offsets 0..3 are a causal window of 4; with column 0 too, window 4 with a sink.
    window = jnp.broadcast_to(jnp.arange(4, dtype=jnp.int32), (1, 2, 4))
    got = vs(q, k, v, none, window)
    assert_close(got, attention(q, k, v, window=4, impl="reference"), what=impl)
    got = vs(q, k, v, jnp.zeros((1, 2, 1), jnp.int32), window)
    assert_close(got, attention(q, k, v, window=4, sinks=1, impl="reference"), what=impl)
    # Only future columns: every row but the last sees nothing.
    got = vs(q, k, v, jnp.full((1, 2, 1), 11, jnp.int32), none)
    np.testing.assert_array_equal(np.asarray(got[:, :11]), 0.0)


def test_vertical_slash_pattern_shapes_and_planted(rand):
  b, t, h, hkv, d = 1, 96, 4, 2, 16
  q, k, _ = _qkv(rand, b, t, t, h, hkv, d)
  vert, slash = vertical_slash_pattern(q, k, n_vertical=3, n_slash=5, last_q=32)
  assert vert.shape == (b, h, 3) and slash.shape == (b, h, 5)
  assert vert.dtype == jnp.int32 and slash.dtype == jnp.int32
  for x in (vert, slash):
    x = np.asarray(x)
    assert x.min() >= 0 and x.max() < t and np.all(np.diff(x, axis=-1) > 0)
  # Plant: every query attends strongly to key 5 (a sink column) and to the key 7 back.
  col, off = 5, 7
  u = jax.random.normal(rand._next(), (d,))
  k = k.at[:, col].set(4.0 * u)
  q = q + 2.0 * u  # q . k_col large for every query
  q = q.at[:, off:].add(3.0 * jnp.repeat(k[:, :-off], h // hkv, axis=2))  # q_i . k_{i-off}
  vert, slash = vertical_slash_pattern(q, k, n_vertical=3, n_slash=5, last_q=32)
  assert np.all(np.any(np.asarray(vert) == col, axis=-1))
  assert np.all(np.any(np.asarray(slash) == off, axis=-1))


# ---------------------------------------------------------------------------------- errors


def test_errors(rand):
  q, k, v = _qkv(rand, 1, 16, 16, 4, 2, 8)
  mask = np.ones((1, 1, 2, 2), bool)
  bs = lambda **kw: block_sparse_attention(q, k, v, kw.pop("m", mask), block_q=8, block_k=8, **kw)
  with pytest.raises(ValueError, match="block_mask` must be \\[B=1\\|1, H=4\\|1, 2, 2\\]"):
    bs(m=np.ones((1, 1, 2, 3), bool))
  with pytest.raises(ValueError, match="block_mask` must be bool"):
    bs(m=np.ones((1, 1, 2, 2), np.int32))
  with pytest.raises(ValueError, match="kind"):
    bs(kind="relu")
  with pytest.raises(ValueError, match="sigmoid' only"):
    bs(bias=1.0)
  with pytest.raises(ValueError, match="share one dtype"):
    block_sparse_attention(q, k.astype(jnp.bfloat16), v, mask, block_q=8, block_k=8)
  with pytest.raises(ValueError, match="impl='pallas' does not support this call: the Mosaic GPU"):
    bs(impl="pallas")  # the GPU kernel, asked on CPU
  bi = np.zeros((1, 4, 2, 3), np.int32)
  bsi = lambda i, **kw: block_sparse_attention(q, k, v, block_indices=i, block_q=8, block_k=8, **kw)
  with pytest.raises(ValueError, match="give one of `block_mask` and `block_indices`"):
    bsi(bi, block_mask=mask)
  with pytest.raises(ValueError, match="give one of `block_mask` and `block_indices`"):
    block_sparse_attention(q, k, v, block_q=8, block_k=8)
  with pytest.raises(ValueError, match=r"block_indices` must be \[B=1\|1, H=4\|1, 2, n>=1\]"):
    bsi(bi[:, :, :1])
  with pytest.raises(ValueError, match=r"block_indices` values must be in \[-1, 2\)"):
    bsi(bi + 2)
  with pytest.raises(ValueError, match="block_indices` must be an integer array"):
    bsi(bi.astype(np.float32))
  idx = jnp.zeros((1, 16, 2, 2), jnp.int32)
  with pytest.raises(ValueError, match=r"values must be in \[-1, 2\)"):
    selected_block_attention(q, k, v, idx.at[0, 0, 0, 0].set(2), block_size=8)
  with pytest.raises(ValueError, match="integer"):
    selected_block_attention(q, k, v, idx.astype(jnp.float32), block_size=8)
  with pytest.raises(ValueError, match="block_indices` must be"):
    selected_block_attention(q, k, v, idx[:, :, :1], block_size=8)
  vi = jnp.zeros((1, 4, 2), jnp.int32)
  with pytest.raises(ValueError, match="slash_idx` values"):
    vertical_slash_attention(q, k, v, vi, vi.at[0, 0, 0].set(-2))
  with pytest.raises(ValueError, match="vertical_idx` must be"):
    vertical_slash_attention(q, k, v, vi[:, :2], vi)
  with pytest.raises(ValueError, match="exceeds"):
    vertical_slash_pattern(q, k, n_vertical=17, n_slash=2)


# --------------------------------------------------------------- NSA's block importance


def importance_inputs(rand, b, t, n, h, hkv, d, block_size, stride, dtype=jnp.float32,
                      positions=None):
  """q, k_cmp and the compressed branch's lse [B, T, H] (float32 from the rounded inputs;
  -inf for a query that sees no block), built here from the definition end_j <= t."""
  q, k_cmp = rand.normal((b, t, h, d), dtype), rand.normal((b, n, hkv, d), dtype)
  pos = jnp.broadcast_to(jnp.arange(t) if positions is None else positions, (b, t))
  kk = jnp.repeat(k_cmp.astype(jnp.float32), h // hkv, axis=2)
  s = jnp.einsum("bthd,bnhd->bthn", q.astype(jnp.float32), kk) * d**-0.5
  seen = (jnp.arange(n) * stride + block_size - 1 <= pos[..., None])[:, :, None]
  return q, k_cmp, jax.nn.logsumexp(jnp.where(seen, s, -jnp.inf), axis=-1)


# (B, T, N, H, Hkv, D, block_size, stride): G = 1, 4, 16; ragged; T < block_size
IMP_CASES = [(2, 37, 3, 4, 4, 8, 8, 4, ), (1, 50, 11, 8, 2, 16, 6, 4),
             (1, 45, 6, 16, 1, 8, 16, 8), (2, 5, 1, 4, 1, 8, 8, 4)]


@pytest.mark.parametrize("case", IMP_CASES, ids=str)
def test_importance_xla_matches_reference(rand, case, monkeypatch):
  """f32 1e-5 and bf16 1e-2 in one chunk, bf16 chunked over T (padded to whole chunks); each
  token's importance sums to its G heads' probability mass (G where it sees a block, else 0)."""
  from longax.kernels import sparse_attention as S
  b, t, n, h, hkv, d, l, st = case
  for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)):
    q, k, lse = importance_inputs(rand, b, t, n, h, hkv, d, l, st, dtype)
    fn = lambda impl: compressed_importance(q, k, lse, block_size=l, stride=st, impl=impl)
    want = fn("reference")
    assert_close(fn("xla"), want, tol, f"{case} {dtype.__name__}")
  monkeypatch.setattr(S, "IMPORTANCE_ELEMENTS", 7 * b * h * n)  # chunks of 7 tokens
  assert_close(fn("xla"), want, tol, f"{case} chunked")
  sees = (jnp.arange(t) >= l - 1)[None, :, None]
  assert_close(want.sum(-1), jnp.broadcast_to(jnp.where(sees, h // hkv, 0.0), want.shape[:3]))


def test_importance_xla_memory_is_bounded(rand, monkeypatch):
  """The chunked XLA path's largest intermediates are its output [T, Hkv, N] (G = 4 times
  smaller than the scores [T, H, N]) and a chunk's IMPORTANCE_ELEMENTS scores."""
  from longax.kernels import sparse_attention as S
  t, n, h = 64, 64, 4
  q, k, lse = importance_inputs(rand, 1, t, n, h, 1, 8, 4, 4)
  monkeypatch.setattr(S, "IMPORTANCE_ELEMENTS", t * h * n // 8)
  fn = lambda q, k, lse: compressed_importance(q, k, lse, block_size=4, stride=4, impl="xla")
  sizes = [int(np.prod(a.shape)) for a in _avals(jax.make_jaxpr(fn)(q, k, lse).jaxpr)]
  assert max(sizes) <= t * n, max(sizes)  # the output; scores per chunk t * h * n / 8


def test_importance_q_positions_and_errors(rand):
  """Explicit positions (a decode chunk against compressed keys of a cache); bad inputs."""
  pos = jnp.asarray([[9, 10, 11], [3, 4, 5]], jnp.int32)
  q, k, lse = importance_inputs(rand, 2, 3, 5, 4, 2, 8, 4, 2, positions=pos)
  fn = lambda impl: compressed_importance(q, k, lse, block_size=4, stride=2, impl=impl,
                                          q_positions=pos)
  want = fn("reference")
  assert_close(fn("xla"), want)
  assert np.all(np.asarray(want[1, 0, :, 1:]) == 0) and np.all(np.asarray(want[0, 2]) > 0)
  imp = lambda **kw: compressed_importance(kw.pop("q", q), kw.pop("k", k), kw.pop("lse", lse),
                                           block_size=kw.pop("l", 4), stride=2, **kw)
  with pytest.raises(ValueError, match=r"`lse` must have shape \(2, 3, 4\)"):
    imp(lse=lse[:, :, :2])
  with pytest.raises(ValueError, match="`k_cmp` must be \\[B=2, N, Hkv, D=8\\]"):
    imp(k=k[..., :4])
  with pytest.raises(ValueError, match="H=4 vs k_cmp heads Hkv=3"):
    imp(k=jnp.zeros((2, 5, 3, 8)))
  with pytest.raises(ValueError, match="`block_size` must be an int >= 1"):
    imp(l=0)
  with pytest.raises(ValueError, match="q_positions` must have shape"):
    imp(q_positions=pos[:, :2])
  with pytest.raises(ValueError, match="impl='pallas' does not support this call: the Mosaic GPU"):
    imp(impl="pallas")  # the GPU kernel, asked on CPU


# ------------------------------------------------------------------------------ memory


def _avals(jaxpr):
  """Every intermediate's abstract value, sub-jaxprs (scan, checkpoint, jit) included."""
  for eqn in jaxpr.eqns:
    yield from (v.aval for v in eqn.outvars)
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else [p]):
        if hasattr(sub, "eqns"):
          yield from _avals(sub)
        elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
          yield from _avals(sub.jaxpr)


def test_xla_path_never_forms_t_by_s(rand):
  """No intermediate of the forward or backward has two axes as long as the sequence."""
  n = 256
  q, k, v = _qkv(rand, 1, n, n, 2, 1, 8)
  diag = np.eye(n // 16, dtype=bool)[None, None]
  idx = jnp.broadcast_to((jnp.arange(n) // 16)[None, :, None, None], (1, n, 1, 1)).astype(jnp.int32)
  col = jnp.zeros((1, 2, 1), jnp.int32)
  ops = {
      "block_sparse": lambda impl: lambda q, k, v: block_sparse_attention(
          q, k, v, diag, block_q=16, block_k=16, impl=impl),
      "selected": lambda impl: lambda q, k, v: selected_block_attention(
          q, k, v, idx, block_size=16, impl=impl),
      "vertical_slash": lambda impl: lambda q, k, v: vertical_slash_attention(
          q, k, v, col, col + jnp.arange(2)[None, None, :1], impl=impl),
  }
  for name, fn in ops.items():
    for impl, want_dense in (("reference", True), ("xla", False)):
      loss = lambda q, k, v: jnp.sum(fn(impl)(q, k, v) ** 2)
      jaxpr = jax.make_jaxpr(jax.grad(loss, (0, 1, 2)))(q, k, v).jaxpr
      dense = any(sum(d >= n for d in a.shape) >= 2 for a in _avals(jaxpr) if hasattr(a, "shape"))
      assert dense == want_dense, f"{name} {impl}: forms a [T, S] array: {dense}"


@pytest.mark.parametrize("t", [6, 11])  # T < S and T > S (the first rows see nothing)
def test_patterns_by_hand(rand, t):
  """Each pattern's mask written out with Python loops from its definition, the attention
  done in numpy float64: an oracle shared with neither the reference nor the XLA path."""
  s, h, d, c = 9, 2, 4, 3  # queries at positions s - t ... s - 1
  q, k, v = (np.asarray(x, np.float64) for x in _qkv(rand, 1, t, s, h, 1, d))

  def dense(mask):  # mask [H, T, S] -> o [1, T, H, D]
    sc = np.einsum("thd,sd->hts", q[0], k[0, :, 0]) / np.sqrt(d)
    sc = np.where(mask, sc, -np.inf)
    mx = np.max(sc, -1, keepdims=True)
    p = np.exp(sc - np.where(np.isfinite(mx), mx, 0))
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
    return np.einsum("hts,sd->thd", p, v[0, :, 0])[None]

  bm = np.array([[[1, 0, 1], [0, 1, 1]], [[0, 0, 0], [1, 1, 0]]], bool)[None]  # [1, H, 2, 3]
  bm = np.resize(bm, (1, h, -(-t // c), 3))
  sel = np.array([[2, 2, -1], [0, -1, 1], [1, 1, 1], [-1, -1, -1], [0, 2, 0], [2, 1, 0]])
  sel = np.resize(sel, (t, 3))
  vert = np.array([[[1, 1, 7]], [[-1, 4, 0]]]).reshape(1, h, 3)
  slash = np.array([[[0, 2, 2]], [[-1, 5, 1]]]).reshape(1, h, 3)
  want = {name: np.zeros((h, t, s), bool) for name in ("bs", "sel", "vs")}
  for hh in range(h):
    for i in range(t):
      p = i + s - t
      for j in range(s):
        if j > p:
          continue
        want["bs"][hh, i, j] = bm[0, hh, i // c, j // c]
        want["sel"][hh, i, j] = j // c in set(sel[i])
        want["vs"][hh, i, j] = j in set(vert[0, hh]) or (p - j) in set(slash[0, hh])
  cast = lambda x: jnp.asarray(x, jnp.float32)
  args = tuple(map(cast, (q, k, v)))
  sel_j = jnp.asarray(sel, jnp.int32)[None, :, None]
  for impl in ["reference"] + IMPLS:
    got = jax.jit(lambda q, k, v: {
        "bs": block_sparse_attention(q, k, v, bm, block_q=c, block_k=c, impl=impl),
        "sel": selected_block_attention(q, k, v, sel_j, block_size=c, impl=impl),
        "vs": vertical_slash_attention(q, k, v, jnp.asarray(vert, jnp.int32),
                                       jnp.asarray(slash, jnp.int32), impl=impl),
    })(*args)
    for name, mask in want.items():
      assert_close(got[name], dense(mask), what=f"{name} {impl}")


def test_unregistered_impl_is_one_line():
  """An impl an op does not have yet names the op and what it has."""
  from longax.kernels._dispatch import resolve
  with pytest.raises(NotImplementedError,
                     match=r"longax.kernels.vertical_slash_attention: impl='pallas_interpret' "
                           r"is not implemented yet \(available: pallas, reference, xla, "
                           r"or 'auto'\)"):
    resolve("vertical_slash_attention", "pallas_interpret")


# ------------------------------------------------ block top-k's estimate: block maxima


def _block_max_loops(q, k, block, row_block):
  """The definition, loop by loop (numpy float64)."""
  b, r, hkv, _ = q.shape
  s = k.shape[1]
  nk = -(-s // block)
  out = np.full((b, r, hkv, nk), -np.inf)
  for bi, ri, hi, j in np.ndindex(b, r, hkv, nk):
    if row_block is None or j <= ri // row_block:
      out[bi, ri, hi, j] = max(q[bi, ri, hi] @ k[bi, x, hi] for x in range(j * block, min(s, (j + 1) * block)))
  return out


@pytest.mark.parametrize("b,r,s,hkv,d,block,row_block", [(1, 37, 100, 2, 8, 16, None),
                                                         (2, 24, 61, 1, 4, 8, 4),
                                                         (1, 5, 9, 3, 8, 64, 1)])
@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_block_max_scores_matches_its_definition(b, r, s, hkv, d, block, row_block, impl,
                                                 monkeypatch):
  """Each row's best score per key block (ragged S, causal rows), every impl; the XLA path
  in steps of a few rows and in 1, 3 and 8 causal bands too."""
  from longax.kernels import block_max_scores, sparse_attention
  rng = np.random.default_rng(r)
  q, k = rng.normal(size=(b, r, hkv, d)), rng.normal(size=(b, s, hkv, d))
  want = _block_max_loops(q, k, block, row_block)
  for elements, bands in ((sparse_attention.BLOCK_MAX_ELEMENTS, 8), (b * hkv * s * 3, 3),
                          (b * hkv * s * 3, 1)):
    monkeypatch.setattr(sparse_attention, "BLOCK_MAX_ELEMENTS", elements)
    monkeypatch.setattr(sparse_attention, "BLOCK_MAX_BANDS", bands)
    got = np.asarray(block_max_scores(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                                      block=block, row_block=row_block, impl=impl))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    assert_close(np.where(np.isinf(got), 0, got), np.where(np.isinf(want), 0, want), 1e-5,
                 what=f"{impl} {elements} {bands}")


def test_block_max_scores_errors():
  from longax.kernels import block_max_scores
  q, k = jnp.zeros((1, 8, 2, 4)), jnp.zeros((1, 16, 2, 4))
  with pytest.raises(ValueError, match=r"block_max_scores: `k` must be \[B=1, S, Hkv=2, D=4\]"):
    block_max_scores(q, jnp.zeros((1, 16, 1, 4)))
  with pytest.raises(ValueError, match="block_max_scores: `block` must be an int >= 1, got 0"):
    block_max_scores(q, k, block=0)
  with pytest.raises(ValueError, match="block_max_scores: `row_block` must be an int >= 1, got -1"):
    block_max_scores(q, k, row_block=-1)
  with pytest.raises(ValueError, match="impl='pallas' does not support this call"):
    block_max_scores(q, k, impl="pallas")


def _block_mean_loops(q, k, v, mask, block, scale):
  """block_mean_attention query by query in numpy float64: the real keys' mean per block, a
  softmax over the blocks the query's block takes, each with log(block) on its score."""
  b, t, h, _ = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  nk = -(-s_len // block)
  kbar = np.stack([k[:, j * block:(j + 1) * block].mean(1) for j in range(nk)], 1)
  vbar = np.stack([v[:, j * block:(j + 1) * block].mean(1) for j in range(nk)], 1)
  mask = np.broadcast_to(mask, (b, h) + mask.shape[2:])
  o, lse = np.zeros((b, t, h, v.shape[-1])), np.full((b, t, h), -np.inf)
  for bi, i, hi in np.ndindex(b, t, h):
    js = np.flatnonzero(mask[bi, hi, i // block])
    if js.size:
      g = hi // (h // hkv)
      sc = scale * kbar[bi, js, g] @ q[bi, i, hi] + np.log(block)
      lse[bi, i, hi] = np.logaddexp.reduce(sc)
      o[bi, i, hi] = np.exp(sc - lse[bi, i, hi]) @ vbar[bi, js, g]
  return o, lse


@pytest.mark.parametrize("b,t,s,h,hkv,d,block,mb,mh", [
    (1, 37, 37, 2, 1, 8, 8, 1, 1), (2, 50, 70, 4, 2, 16, 16, 2, 4), (1, 64, 30, 3, 3, 8, 16, 1, 3)])
@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_block_mean_attention_matches_its_definition(b, t, s, h, hkv, d, block, mb, mh, impl,
                                                     monkeypatch):
  """Attention over key-block means (ragged T and S: the last block's mean over its real keys,
  GQA, broadcast masks, query blocks that take none: o 0, lse -inf); the XLA path one and a
  few query blocks per step too."""
  from longax.kernels import block_mean_attention, sparse_attention
  rng = np.random.default_rng(t + s)
  q, k, v = (rng.normal(size=sh) for sh in ((b, t, h, d), (b, s, hkv, d), (b, s, hkv, d)))
  mask = rng.random((mb, mh, -(-t // block), -(-s // block))) < 0.5
  mask[..., 0, :] = False  # a query block that takes no block
  want_o, want_lse = _block_mean_loops(q, k, v, mask, block, 0.3)
  for elements in (sparse_attention.BLOCK_MEAN_ELEMENTS, b * h * block * s):
    monkeypatch.setattr(sparse_attention, "BLOCK_MEAN_ELEMENTS", elements)
    o, lse = block_mean_attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)),
                                  jnp.asarray(mask), block=block, scale=0.3, impl=impl)
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(want_lse))
    assert_close(np.where(np.isinf(lse), 0, lse), np.where(np.isinf(want_lse), 0, want_lse), 1e-5,
                 what=f"{impl} lse")
    assert_close(o, want_o, 1e-5, what=f"{impl} o")


def test_block_mean_attention_errors():
  from longax.kernels import block_mean_attention
  q, k = jnp.zeros((1, 8, 2, 4)), jnp.zeros((1, 16, 2, 4))
  with pytest.raises(ValueError, match=r"block_mean_attention: `block_mask` must be \[B=1\|1, H=2\|1, 1, 2\]"):
    block_mean_attention(q, k, k, jnp.ones((1, 1, 2, 2), bool), block=8)
  with pytest.raises(ValueError, match="block_mean_attention: `block_mask` must be bool"):
    block_mean_attention(q, k, k, jnp.ones((1, 1, 1, 2)), block=8)
  with pytest.raises(ValueError, match="block_mean_attention: `block` must be an int >= 1, got 0"):
    block_mean_attention(q, k, k, jnp.ones((1, 1, 1, 2), bool), block=0)
  with pytest.raises(ValueError, match="impl='pallas' does not support this call"):
    block_mean_attention(q, k, k, jnp.ones((1, 1, 1, 2), bool), block=8, impl="pallas")
