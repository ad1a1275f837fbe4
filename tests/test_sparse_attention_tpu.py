"""block_sparse_attention on the Pallas TPU flash kernels (impl="pallas_interpret": TPU
interpret mode on CPU) against the float32 reference, forward and gradients; the step tables
the kernels walk, built from the block mask; the TPU side of `impl=` dispatch.

Each case runs its kernels forward and backward in one jit (interpret mode compiles slowly);
the fast cases cover every option between them, the grid of all of them is marked slow."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close
from longax.kernels import _dispatch, block_sparse_attention, selected_block_attention
from longax.kernels.attention import AttnSpec
from longax.kernels.tpu import attention as tpu
from test_attention_tpu import _value_and_grads
from test_sparse_attention import _block_indices

F32, BF16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)  # str: the test ids


def _mask(rand, shape, density, empty_row=True):
  """bool [Bm, Hm, nq, nk], each bit on with probability `density`; with empty_row, query
  block 1 of the first (batch, head) lists no key block."""
  bits = np.asarray(rand.uniform(shape, 0.0, 1.0)) < density
  if empty_row and shape[2] > 1:
    bits[0, 0, 1] = False
  return bits


def _index_mask(idx, nk: int):
  """int indices [.., n] (-1 unused) -> their bool mask [.., nk] (numpy)."""
  mask = np.zeros(idx.shape[:-1] + (nk + 1,), bool)
  np.put_along_axis(mask, np.where(idx >= 0, idx, nk), True, -1)
  return mask[..., :nk]


def _assert_matches(o, grads, o_ref, grads_ref, dtype, what: str):
  """An impl's output (of `dtype`) and gradients against the reference's."""
  assert o.dtype == dtype
  assert_close(o, o_ref, dtype, f"{what} forward")
  for name, a, want in zip("qkv", grads, grads_ref):
    assert_close(a, want, dtype, f"{what} d{name}")


def _check(rand, shape, mask_bh, density, dtype, *, traced=False, **opts):
  """shape (B, T, S, H, Hkv, D, block_q, block_k); mask_bh: its (Bm, Hm); traced: the mask
  is an argument of the jitted function (tables as wide as every block)."""
  b, t, s, h, hkv, d, bq, bk = shape
  q = rand.normal((b, t, h, d), dtype)
  k, v = rand.normal((b, s, hkv, d), dtype), rand.normal((b, s, hkv, d), dtype)
  mask = _mask(rand, (*mask_bh, -(-t // bq), -(-s // bk)), density)

  def fn(impl, m=mask):
    return lambda q, k, v: block_sparse_attention(q, k, v, m, block_q=bq, block_k=bk,
                                                  impl=impl, **opts)

  if traced:
    run = jax.jit(lambda q, k, v, m: _value_and_grads(fn("pallas_interpret", m))(q, k, v))
    o, grads = run(q, k, v, jnp.asarray(mask))
  else:
    o, grads = _value_and_grads(fn("pallas_interpret"))(q, k, v)
  _assert_matches(o, grads, *_value_and_grads(fn("reference"))(q, k, v), dtype, str(opts))
  if mask_bh == (b, h) and mask.shape[2] > 1:  # the empty query-block row gives exactly 0
    np.testing.assert_array_equal(np.asarray(o[0, bq:2 * bq, 0], np.float32), 0.0)


# (B, T, S, H, Hkv, D, block_q, block_k), mask (Bm, Hm), density, options: between them the
# fast cases take ragged T / S (T < S, T > S), GQA, every mask broadcast, both kinds, causal
# and not, a traced mask, float32 and bfloat16.
FAST = [
    ((2, 37, 37, 4, 2, 8, 8, 16), (2, 4), 0.3, F32, dict()),
    ((1, 21, 45, 4, 2, 8, 8, 8), (1, 1), 0.6, F32,
     dict(causal=False, kind="sigmoid", bias=-1.0)),
    ((1, 29, 19, 2, 1, 8, 8, 8), (1, 2), 0.5, F32, dict(traced=True)),  # T > S
    ((2, 40, 40, 4, 2, 16, 8, 16), (2, 1), 0.5, BF16, dict(kind="sigmoid")),
]


@pytest.mark.parametrize("shape,mask_bh,density,dtype,opts", FAST, ids=str)
def test_interpret_matches_reference(rand, shape, mask_bh, density, dtype, opts):
  _check(rand, shape, mask_bh, density, dtype, **opts)


def test_interpret_lse_matches_reference(rand):
  """return_lse on the TPU kernels (interpreted): lse with an empty query block (-inf), and
  the gradients through o and lse together."""
  from conftest import compare
  b, t, s, h, hkv, d, bq, bk = 2, 37, 37, 4, 2, 8, 8, 16
  q, k, v = rand.normal((b, t, h, d)), rand.normal((b, s, hkv, d)), rand.normal((b, s, hkv, d))
  mask = _mask(rand, (b, h, -(-t // bq), -(-s // bk)), 0.4)
  fn = lambda impl: lambda q, k, v: block_sparse_attention(q, k, v, mask, block_q=bq, block_k=bk,
                                                          impl=impl, return_lse=True)
  fin = lambda f: lambda q, k, v: (lambda o, l: (o, jnp.where(jnp.isinf(l), 0.0, l)))(*f(q, k, v))
  assert bool(jnp.all(jnp.isneginf(fn("pallas_interpret")(q, k, v)[1][0, bq:2 * bq, 0])))
  compare(fin(fn("pallas_interpret")), fin(fn("reference")), (q, k, v), (0, 1, 2), jnp.float32)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape,mask_bh,density", [
    ((2, 37, 37, 4, 2, 8, 8, 16), (2, 4), 0.1),
    ((1, 21, 45, 4, 1, 8, 16, 8), (1, 4), 0.25),
    ((2, 45, 21, 2, 2, 16, 8, 8), (1, 1), 0.6),
    ((1, 64, 64, 2, 1, 8, 16, 16), (1, 2), 0.4),
], ids=str)
def test_interpret_every_case(rand, shape, mask_bh, density, kind, causal, dtype):
  _check(rand, shape, mask_bh, density, dtype, kind=kind, causal=causal)


# ------------------------------------------------------------------ step tables and dispatch


def _problem(t, s, bq, bk, group=1, causal=True):
  spec = AttnSpec("softmax", causal, 1.0, None, 0, None, 0.0)
  return tpu._Problem(spec, t, s, group, False, bq, bk, True)


def test_mask_step_tables():
  """T = S = 30 in 8-blocks, causal: query block i lists its on key blocks <= i, masked on
  the diagonal and in the padded last key block; the dk/dv table lists, per key block, the
  (head in group, query block) entries gi * nq + qb that see it."""
  on = np.zeros((1, 2, 4, 4), bool)
  on[0, 0, 3] = [True, False, True, True]  # head 0, query block 3: key blocks 0, 2, 3
  on[0, 0, 2, 3] = True  # past the diagonal: not listed
  on[0, 1, :, 0] = True  # head 1: key block 0 only
  pb = _problem(30, 30, 8, 8, group=2)
  pb = dataclasses.replace(pb, mask_steps=tpu._mask_widths(pb, on))
  assert pb.mask_steps == (3, 5)
  blk, kind, rows = tpu._forward_steps(pb, (jnp.asarray(on), None))
  blk, kind = np.asarray(blk), np.asarray(kind)
  assert blk.shape == (8, 3) and (rows.tb, rows.th) == (1, 2)
  assert list(blk[rows(0, 0, 3)]) == [0, 2, 3] and list(kind[rows(0, 0, 3)]) == [2, 2, 1]
  assert list(kind[rows(0, 0, 2)]) == [0, 0, 0]  # lists nothing
  assert list(blk[rows(0, 1, 0)]) == [0, 0, 0] and list(kind[rows(0, 1, 0)]) == [1, 0, 0]
  assert list(kind[rows(0, 1, 2)]) == [2, 0, 0]
  blk, kind, rows = tpu._backward_steps(pb, (jnp.asarray(on), None))
  blk, kind = np.asarray(blk), np.asarray(kind)
  assert blk.shape == (4, 5) and (rows.tb, rows.th) == (1, 1)  # one KV head
  assert list(blk[0]) == [3, 4, 5, 6, 7] and list(kind[0]) == [2, 1, 2, 2, 2]
  assert list(blk[2]) == [3] * 5 and list(kind[2]) == [2, 0, 0, 0, 0]
  assert list(blk[3]) == [3] * 5 and list(kind[3]) == [1, 0, 0, 0, 0]  # padded keys
  # A traced mask: tables as wide as every block, same lists.
  pb = dataclasses.replace(pb, mask_steps=(4, 8))
  traced = jax.jit(lambda m: tpu._forward_steps(pb, (m, None))[:2])(jnp.asarray(on))
  assert list(np.asarray(traced[0])[rows(0, 0, 3)]) == [0, 2, 3, 3]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("t,s,bq,bk,group,heads", [(30, 30, 8, 8, 2, 2), (21, 45, 8, 16, 1, 1),
                                                    (45, 21, 16, 8, 2, 4)])
def test_index_step_tables_are_the_mask_tables(rand, t, s, bq, bk, group, heads, causal):
  """Traced block_indices (shuffled, -1, repeats, blocks past the diagonal) give the forward
  / dq tables of their mask, as wide as the indices (not every key block): the same listed
  blocks and kinds in the same order, and the same kind-0 padding."""
  from conftest import block_indices_of
  pb = _problem(t, s, bq, bk, group=group, causal=causal)
  mask = _mask(rand, (2, heads, pb.nq, pb.nk), 0.5)
  n = 4
  idx = block_indices_of(mask & (np.cumsum(mask, -1) <= n), n + 1, seed=t)  # at most n on
  mask = _index_mask(idx, pb.nk)
  widths = []  # as the op calls it: under jit, the mask built from the traced indices
  jax.jit(lambda m, i: widths.append(tpu._mask_widths(pb, m, i)) or 0)(mask, idx)
  assert widths == [(min(n + 1, pb.nk), group * pb.nq)]
  pbi = dataclasses.replace(pb, mask_steps=widths[0])
  rows = []
  got = jax.jit(lambda i: (lambda b, k, r: rows.append(r) or (b, k))(
      *tpu._forward_steps(pbi, (None, i))))(jnp.asarray(idx))
  pbm = dataclasses.replace(pb, mask_steps=(pb.nk, group * pb.nq))
  want = tpu._forward_steps(pbm, (jnp.asarray(mask), None))
  assert rows == [want[2]]
  width = pbi.mask_steps[0]
  listed = np.asarray(want[1]) > 0
  assert listed.sum(-1).max() <= width
  np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1])[:, :width])
  np.testing.assert_array_equal(np.where(np.asarray(got[1]) > 0, np.asarray(got[0]), -1),
                                np.where(listed, np.asarray(want[0]), -1)[:, :width])
  # Padding repeats a row's last listed block (no new load); a row listing none: any block.
  count = listed.sum(-1, keepdims=True)
  last = np.take_along_axis(np.asarray(want[0]), np.maximum(count - 1, 0), -1)
  pad = (np.asarray(got[1]) == 0) & (count > 0)
  np.testing.assert_array_equal(np.where(pad, np.asarray(got[0]), -1), np.where(pad, last, -1))
  assert np.asarray(got[0]).min() >= 0 and np.asarray(got[0]).max() < pb.nk


def test_interpret_traced_indices_match_reference(rand):
  """block_indices traced under jit on the TPU kernels (interpreted): forward and gradients
  as the reference's on their mask; the forward's grid walks n steps a query block."""
  from conftest import block_indices_of
  b, t, s, h, hkv, d, bq, bk = 2, 37, 37, 4, 2, 8, 8, 8
  q, k, v = rand.normal((b, t, h, d)), rand.normal((b, s, hkv, d)), rand.normal((b, s, hkv, d))
  mask = _mask(rand, (b, h, -(-t // bq), -(-s // bk)), 0.4)
  idx = block_indices_of(mask, 4, seed=3)  # the first 4 on blocks (shuffled), a repeat
  mask = _index_mask(idx, mask.shape[-1])
  fn = lambda impl: lambda q, k, v, i: block_sparse_attention(q, k, v, block_indices=i, block_q=bq,
                                                             block_k=bk, impl=impl)
  run = jax.jit(lambda q, k, v, i: _value_and_grads(lambda q, k, v: fn("pallas_interpret")(
      q, k, v, i))(q, k, v))
  _assert_matches(*run(q, k, v, jnp.asarray(idx)), *_value_and_grads(
      lambda q, k, v: block_sparse_attention(q, k, v, mask, block_q=bq, block_k=bk,
                                             impl="reference"))(q, k, v), F32, "traced indices")
  jaxpr = str(jax.make_jaxpr(fn("pallas_interpret"))(q, k, v, jnp.asarray(idx)))
  assert "grid=(2, 4, 5, 4)" in jaxpr, "the forward's grid is not n = 4 steps a query block"


def test_dispatch_on_tpu(monkeypatch):
  """With a TPU backend pretended: impl="pallas" and auto take the kernel for blocks it
  covers, auto falls back to XLA otherwise, pallas says why in one line."""
  from longax.kernels import sparse_attention
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  x = lambda t, d: jax.ShapeDtypeStruct((1, t, 2, d), jnp.bfloat16)
  call = dict(q=x(512, 128), k=x(512, 128), v=x(512, 128), block_q=128, block_k=64,
              spec=AttnSpec("softmax", True, 0.1, None, 0, None, 0.0))
  op = "block_sparse_attention"
  assert _dispatch.resolve(op, "pallas", call) is tpu.block_sparse_pallas
  assert _dispatch.resolve(op, "auto", call) is tpu.block_sparse_pallas
  assert _dispatch.resolve(op, "pallas_interpret", call) is tpu.block_sparse_interpret
  one_block = dict(call, block_q=64, q=x(64, 128))  # block_q 64 covers every query
  assert _dispatch.resolve(op, "auto", one_block) is tpu.block_sparse_pallas
  for change, reason in ((dict(block_q=64), "block_q=64 \\(the TPU kernel takes multiples of 128"),
                         (dict(block_k=12), "block_q=128 / block_k=12"),
                         (dict(q=x(512, 96), k=x(512, 96)), "head dim 96")):
    bad = dict(call, **change)
    assert _dispatch.resolve(op, "auto", bad) is sparse_attention._block_sparse_xla
    with pytest.raises(ValueError, match=f"impl='pallas' does not support this call: {reason}"):
      _dispatch.resolve(op, "pallas", bad)


def test_off_tpu_auto_is_xla_and_interpret_refuses_odd_blocks():
  from longax.kernels import sparse_attention
  call = dict(q=jnp.zeros((1, 16, 1, 8)), k=jnp.zeros((1, 16, 1, 8)), v=jnp.zeros((1, 16, 1, 8)),
              block_q=8, block_k=8, spec=AttnSpec("softmax", True, 0.1, None, 0, None, 0.0))
  if jax.default_backend() != "tpu":
    auto = _dispatch.resolve("block_sparse_attention", "auto", call)
    assert auto is sparse_attention._block_sparse_xla
  q = jnp.zeros((1, 24, 1, 8))
  why = "block_q=12 / block_k=8 \\(the TPU kernel takes multiples of 8\\)"
  with pytest.raises(ValueError, match=f"impl='pallas_interpret' does not support this call: "
                                       f"{why}"):
    block_sparse_attention(q, q, q, np.ones((1, 1, 2, 3), bool), block_q=12, block_k=8,
                           impl="pallas_interpret")


# --------------------------------------------------------------- NSA's selected blocks on TPU


# (B, T, S, H, Hkv, D, block_size, n), dtype, options: ragged causal T == S with GQA, T < S
# non-causal (S a multiple of block_size), bfloat16.
SELECTED = [
    ((1, 37, 37, 4, 2, 8, 8, 3), F32, dict()),
    ((1, 19, 32, 4, 1, 8, 16, 2), F32, dict(causal=False, scale=0.2)),
    ((1, 40, 40, 2, 2, 16, 16, 2), BF16, dict()),
]


@pytest.mark.parametrize("shape,dtype,opts", SELECTED, ids=str)
def test_selected_interpret_matches_reference(rand, shape, dtype, opts):
  """selected_block_attention on the TPU kernels (key-centric loading, its dense calls on the
  TPU flash kernel, interpreted): forward and gradients as the reference's."""
  b, t, s, h, hkv, d, bs, n = shape
  q = rand.normal((b, t, h, d), dtype)
  k, v = rand.normal((b, s, hkv, d), dtype), rand.normal((b, s, hkv, d), dtype)
  idx = _block_indices(rand, b, t, hkv, n, -(-s // bs))  # -1 and repeats planted
  fn = lambda impl: lambda q, k, v: selected_block_attention(q, k, v, idx, block_size=bs,
                                                            impl=impl, **opts)
  _assert_matches(*_value_and_grads(fn("pallas_interpret"))(q, k, v),
                  *_value_and_grads(fn("reference"))(q, k, v), dtype, str(opts))


def test_selected_dispatch_on_tpu(monkeypatch):
  """With a TPU backend pretended: auto takes the TPU form where it covers the call and
  falls back to XLA otherwise; pallas says why in one line."""
  from longax.kernels import sparse_attention as SA
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  x = lambda t, h, d: jax.ShapeDtypeStruct((1, t, h, d), jnp.bfloat16)
  call = dict(q=x(512, 8, 128), k=x(512, 2, 128), v=x(512, 2, 128), block_size=64, n_selected=16,
              spec=AttnSpec("softmax", True, 0.1, None, 0, None, 0.0))
  op = "selected_block_attention"
  assert _dispatch.resolve(op, "auto", call) is SA._selected_tpu
  assert _dispatch.resolve(op, "pallas", call) is SA._selected_tpu
  for change, reason in (
      (dict(q=x(512, 32, 128)), "16 query heads per KV head"),
      (dict(q=x(256, 8, 128)), "causal with T=256 != S=512"),
      (dict(q=x(512, 8, 96), k=x(512, 2, 96), v=x(512, 2, 96)), "head dim 96"),
      (dict(explicit_positions=True), "explicit q_positions"),
      (dict(n_selected=2**20), "gathered queries of")):
    bad = dict(call, **change)
    assert _dispatch.resolve(op, "auto", bad) is SA._selected_xla
    with pytest.raises(ValueError, match=f"impl='pallas' does not support this call: {reason}"):
      _dispatch.resolve(op, "pallas", bad)
