"""attention / sigmoid_attention: every impl against the float32 reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close, compare
from longax.kernels import attention, query_positions, sigmoid_attention, visible

# (B, T, S, H, Hkv, D, Dv, block_kv)
SQUARE = (2, 16, 16, 4, 4, 8, 8, 512)
T_LT_S = (1, 13, 29, 4, 2, 8, 8, 512)  # bottom-right causal, GQA
RAGGED = (2, 37, 37, 6, 2, 16, 8, 16)  # several key blocks, the last one partial
RAGGED_T_LT_S = (1, 21, 45, 2, 1, 8, 8, 8)
T_GT_S = (1, 9, 5, 2, 2, 8, 8, 4)  # the first queries see no key
CASES = [
    (SQUARE, dict()), (T_LT_S, dict()), (RAGGED, dict()), (RAGGED_T_LT_S, dict()),
    (T_GT_S, dict()),
    (SQUARE, dict(causal=False)), (RAGGED_T_LT_S, dict(causal=False)),
    (T_LT_S, dict(window=5)), (RAGGED, dict(window=5)),
    (RAGGED, dict(window=4, sinks=2)), (RAGGED_T_LT_S, dict(window=7, sinks=3)),
    (RAGGED, dict(window=3, causal=False)),
    (T_LT_S, dict(softcap=3.0)), (RAGGED, dict(softcap=2.0, window=9)),
    (SQUARE, dict(scale=0.3)),
    (RAGGED, dict(segments=3)), (RAGGED_T_LT_S, dict(segments=3)), (T_GT_S, dict(segments=2)),
    (RAGGED, dict(segments=4, window=6, sinks=1)),
]
KINDS = {"softmax": attention, "sigmoid": sigmoid_attention}


def _inputs(rand, shape, dtype, segments=None):
  b, t, s, h, hkv, d, dv, _ = shape
  q = rand.normal((b, t, h, d), dtype)
  k = rand.normal((b, s, hkv, d), dtype)
  v = rand.normal((b, s, hkv, dv), dtype)
  seg = None
  if segments:
    kv = rand.segments(b, s, segments)
    seg = kv if t == s else (kv[:, s - t:] if t < s else rand.segments(b, t, segments))
    seg = seg if t == s else (seg, kv)
  return q, k, v, seg


def _fn(kind, impl, opts, seg, block_kv):
  opts = {k: v for k, v in opts.items() if k != "segments"}
  if kind == "sigmoid":
    opts.pop("softcap", None)
    opts.pop("sinks", None)
  return lambda q, k, v: KINDS[kind](q, k, v, segment_ids=seg, impl=impl, block_kv=block_kv,
                                     **opts)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape,opts", CASES, ids=str)
def test_xla_matches_reference_f32(rand, kind, shape, opts):
  q, k, v, seg = _inputs(rand, shape, jnp.float32, opts.get("segments"))
  blk = shape[-1]
  compare(_fn(kind, "xla", opts, seg, blk), _fn(kind, "reference", opts, seg, blk),
          (q, k, v), (0, 1, 2), jnp.float32, f"{kind} {opts}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("opts", [dict(), dict(window=6, sinks=2), dict(segments=2)], ids=str)
def test_xla_matches_reference_bf16(rand, kind, opts):
  shape = (2, 40, 40, 4, 2, 16, 16, 16)
  q, k, v, seg = _inputs(rand, shape, jnp.bfloat16, opts.get("segments"))
  ref = _fn(kind, "reference", opts, seg, 16)
  compare(_fn(kind, "xla", opts, seg, 16), ref, (q, k, v), (0, 1, 2), jnp.bfloat16, kind)
  assert _fn(kind, "xla", opts, seg, 16)(q, k, v).dtype == jnp.bfloat16
  assert_close(_fn(kind, "auto", opts, seg, 16)(q, k, v), ref(q, k, v), jnp.bfloat16)


def test_reference_matches_jax_dot_product_attention(rand):
  """An independent oracle for the softmax reference: causal GQA, T == S."""
  q, k, v, _ = _inputs(rand, (2, 24, 24, 4, 2, 8, 8, 0), jnp.float32)
  want = jax.nn.dot_product_attention(q, k, v, is_causal=True)
  assert_close(attention(q, k, v, impl="reference"), want)
  want = jax.nn.dot_product_attention(q, k, v, is_causal=False, scale=0.2)
  assert_close(attention(q, k, v, causal=False, scale=0.2, impl="reference"), want)


def test_sigmoid_reference_by_hand(rand):
  q, k, v, _ = _inputs(rand, (1, 6, 6, 1, 1, 4, 4, 0), jnp.float32)
  s = jnp.einsum("btd,bsd->bts", q[:, :, 0], k[:, :, 0]) / 2.0 - math.log(6)
  p = jax.nn.sigmoid(s) * jnp.tril(jnp.ones((6, 6)))
  want = jnp.einsum("bts,bsd->btd", p, v[:, :, 0])[:, :, None]
  for impl in ("reference", "xla"):
    assert_close(sigmoid_attention(q, k, v, impl=impl), want)
  got = sigmoid_attention(q, k, v, bias=0.5, causal=False, impl="xla")
  p = jax.nn.sigmoid(s + math.log(6) + 0.5)
  assert_close(got, jnp.einsum("bts,bsd->btd", p, v[:, :, 0])[:, :, None])


def test_visibility_bottom_right_window_sinks():
  # 3 queries over 6 keys: the queries are positions 3, 4, 5.
  m = visible(query_positions(3, 6), jnp.arange(6), causal=True, window=2, sinks=1)
  want = np.array([[1, 0, 1, 1, 0, 0],
                   [1, 0, 0, 1, 1, 0],
                   [1, 0, 0, 0, 1, 1]], bool)
  np.testing.assert_array_equal(np.asarray(m), want)
  seg = jnp.array([[0, 0, 1]])
  m = visible(jnp.arange(3), jnp.arange(3), causal=False, q_seg=seg, k_seg=seg)
  np.testing.assert_array_equal(np.asarray(m[0]), np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], bool))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_rows_that_see_no_key_are_zero(rand, kind, impl):
  # T > S: the first T - S queries precede every key; a q segment absent from kv.
  q, k, v, _ = _inputs(rand, (1, 9, 5, 2, 2, 8, 8, 0), jnp.float32)
  f = lambda q, k, v: KINDS[kind](q, k, v, impl=impl, block_kv=2)
  o = f(q, k, v)
  assert np.all(np.asarray(o[:, :4]) == 0) and np.all(np.isfinite(np.asarray(o)))
  grads = jax.grad(lambda q, k, v: f(q, k, v).sum(), argnums=(0, 1, 2))(q, k, v)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
  q, k, v, _ = _inputs(rand, (1, 4, 4, 2, 2, 8, 8, 0), jnp.float32)
  seg = (jnp.array([[0, 0, 7, 7]]), jnp.zeros((1, 4), jnp.int32))
  o = KINDS[kind](q, k, v, causal=False, segment_ids=seg, impl=impl)
  assert np.all(np.asarray(o[:, 2:]) == 0) and np.all(np.isfinite(np.asarray(o)))


def test_packed_segments_equal_documents_one_by_one(rand):
  q, k, v, _ = _inputs(rand, (1, 20, 20, 2, 1, 8, 8, 0), jnp.float32)
  seg = jnp.array([[0] * 7 + [1] * 13])
  packed = attention(q, k, v, segment_ids=seg, impl="xla", block_kv=8)
  for lo, hi in ((0, 7), (7, 20)):
    alone = attention(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], impl="xla")
    assert_close(packed[:, lo:hi], alone)


def test_jit_and_vmap(rand):
  q, k, v, _ = _inputs(rand, (2, 12, 12, 2, 2, 8, 8, 0), jnp.float32)
  f = jax.jit(lambda q, k, v: attention(q, k, v, window=4, impl="xla"))
  assert_close(f(q, k, v), attention(q, k, v, window=4, impl="reference"))
  vm = jax.vmap(lambda q, k, v: sigmoid_attention(q[None], k[None], v[None], impl="xla")[0])
  assert_close(vm(q, k, v), sigmoid_attention(q, k, v, impl="reference"))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the CPU answer")
@pytest.mark.parametrize("kind", KINDS)
def test_pallas_off_gpu_is_one_clear_line(rand, kind):
  q, k, v, _ = _inputs(rand, (1, 4, 4, 1, 1, 8, 8, 0), jnp.bfloat16)
  name = "attention" if kind == "softmax" else "sigmoid_attention"
  with pytest.raises(ValueError, match=f"{name}: impl='pallas' does not support this call: "
                                       "the Mosaic GPU kernel needs a GPU backend"):
    KINDS[kind](q, k, v, impl="pallas")
  assert KINDS[kind](q, k, v, impl="auto").shape == q.shape  # auto falls back to XLA


@pytest.mark.parametrize("change,reason", [
    (dict(dtype=jnp.float32), "dtype float32"),
    (dict(d=96), "head dim 96"),
    (dict(dv=64), "value head dim 64"),
    (dict(explicit_positions=True), "explicit q_positions"),
])
def test_pallas_unsupported_reasons(monkeypatch, change, reason):
  """What `auto` reads and `impl="pallas"` says, with a Hopper GPU pretended."""
  from longax.kernels.attention import AttnSpec
  from longax.kernels.gpu import attention as gpu
  monkeypatch.setattr(jax, "devices", lambda *a: [type("Dev", (), {"compute_capability": "9.0"})()])
  dt, d, dv = change.get("dtype", jnp.bfloat16), change.get("d", 128), change.get("dv", change.get("d", 128))
  x = lambda dd: jax.ShapeDtypeStruct((1, 128, 2, dd), dt)
  call = dict(q=x(d), k=x(d), v=x(dv), spec=AttnSpec("softmax", True, 0.1, None, 0, None, 0.0),
              backend="gpu", explicit_positions=change.get("explicit_positions", False),
              return_lse=change.get("return_lse", False))
  assert reason in gpu.unsupported(call)
  ok = dict(call, q=jax.ShapeDtypeStruct((1, 128, 2, 128), jnp.bfloat16),
            k=jax.ShapeDtypeStruct((1, 128, 2, 128), jnp.bfloat16),
            v=jax.ShapeDtypeStruct((1, 128, 2, 128), jnp.bfloat16), explicit_positions=False,
            return_lse=False)
  assert gpu.unsupported(ok) is None
  assert gpu.unsupported(dict(ok, return_lse=True)) is None  # ring attention folds with it


BAD = [
    (lambda q, k, v: (q[0], k, v), {}, "`q` must have rank 4"),
    (lambda q, k, v: (q, k[:, :, :1], v), {}, "`v` must be"),
    (lambda q, k, v: (q[:, :, :3], k, v), {}, "H=3 .* Hkv=2"),
    (lambda q, k, v: (q, k.astype(jnp.bfloat16), v), {}, "share one dtype"),
    (lambda q, k, v: (q, k[..., :4], v), {}, "`k` must be"),
    (lambda q, k, v: (q, k, v), dict(window=0), "`window` must be an int >= 1"),
    (lambda q, k, v: (q, k, v), dict(sinks=-1), "`sinks`"),
    (lambda q, k, v: (q, k, v), dict(segment_ids=jnp.zeros((2, 5))), r"segment_ids \(queries\)"),
    (lambda q, k, v: (q, k, v), dict(impl="cuda"), "unknown impl='cuda'"),
    (lambda q, k, v: (q, k, v), dict(softcap=-1.0), "softcap"),
]


@pytest.mark.parametrize("mangle,kw,msg", BAD, ids=[b[2] for b in BAD])
def test_bad_input_errors(rand, mangle, kw, msg):
  q, k, v, _ = _inputs(rand, (2, 6, 6, 4, 2, 8, 8, 0), jnp.float32)
  with pytest.raises(ValueError, match=msg):
    attention(*mangle(q, k, v), **kw)


def test_sigmoid_bias_must_be_scalar(rand):
  q, k, v, _ = _inputs(rand, (1, 4, 4, 1, 1, 8, 8, 0), jnp.float32)
  with pytest.raises(ValueError, match="`bias` must be a scalar"):
    sigmoid_attention(q, k, v, bias=jnp.zeros(3))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_explicit_positions_and_empty_slots(rand, kind, impl):
  """A decode cache: keys in shuffled slots with their positions, empty slots at -1,
  equals attention over the keys in order."""
  q, k, v, _ = _inputs(rand, (2, 3, 10, 4, 2, 8, 8, 0), jnp.float32)
  opts = dict(window=6) if kind == "softmax" else dict(bias=-1.0)
  want = KINDS[kind](q, k, v, impl="reference", **opts)
  perm = jnp.array([7, 2, 9, 0, 4, 1, 8, 3, 6, 5])
  pad = lambda x: jnp.concatenate([x[:, perm], jnp.zeros_like(x[:, :3])], axis=1)
  kv_pos = jnp.concatenate([perm, jnp.full((3,), -1)])
  got = KINDS[kind](q, pad(k), pad(v), q_positions=jnp.arange(7, 10), kv_positions=kv_pos,
                    impl=impl, block_kv=4, **opts)
  assert_close(got, want)


def test_positions_shape_error(rand):
  q, k, v, _ = _inputs(rand, (1, 4, 4, 1, 1, 8, 8, 0), jnp.float32)
  with pytest.raises(ValueError, match=r"`q_positions` must have shape \(4,\) or \(1, 4\)"):
    attention(q, k, v, q_positions=jnp.arange(3))


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_per_row_positions(rand, impl):
  """Rows at different positions (batched decode of prompts of different lengths)."""
  q, k, v, _ = _inputs(rand, (2, 2, 9, 2, 1, 8, 8, 0), jnp.float32)
  kv_pos = jnp.array([list(range(9)), list(range(6)) + [-1] * 3])  # row 1: 6 keys + empty
  q_pos = jnp.array([[7, 8], [4, 5]])
  got = attention(q, k, v, q_positions=q_pos, kv_positions=kv_pos, window=4, impl=impl,
                  block_kv=4)
  for row, n in ((0, 9), (1, 6)):
    want = attention(q[row:row + 1], k[row:row + 1, :n], v[row:row + 1, :n], window=4,
                     impl="reference")
    assert_close(got[row:row + 1], want, what=f"row {row}")


def test_pallas_needs_hopper(monkeypatch):
  from longax.kernels.attention import AttnSpec
  from longax.kernels.gpu import attention as gpu
  monkeypatch.setattr(jax, "devices", lambda *a: [type("Dev", (), {"compute_capability": "8.0"})()])
  x = jax.ShapeDtypeStruct((1, 128, 2, 128), jnp.bfloat16)
  call = dict(q=x, k=x, v=x, spec=AttnSpec("softmax", True, 0.1, None, 0, None, 0.0), backend="gpu")
  assert "needs a Hopper GPU (compute capability 9.x), got '8.0'" in gpu.unsupported(call)


@pytest.mark.parametrize("kw,msg", [(dict(block_q=96), "Blocks.block_q=96 must be a multiple of 64"),
                                    (dict(bwd_block_kv=32), "Blocks.bwd_block_kv=32 must be a multiple of 64"),
                                    (dict(wgs=3), "bad pipeline settings"),
                                    (dict(stages=0), "bad pipeline settings"),
                                    (dict(bwd_splits=-1), "bad pipeline settings")])
def test_kernel_blocks_errors(kw, msg):
  from longax.kernels.gpu.attention import Blocks
  with pytest.raises(ValueError, match=msg):
    Blocks(**kw)


def test_kernel_bwd_splits_must_divide_the_group():
  """A dk/dv split of the dense schedule takes whole query heads of a KV group."""
  import dataclasses
  from longax.kernels.attention import AttnSpec
  from longax.kernels.gpu import attention as gpu
  x = jnp.zeros((1, 128, 4, 64))
  spec = AttnSpec("softmax", True, 0.1, None, 0, None, 0.0)
  pb = gpu._problem(x, x[:, :, :1], spec, None, dataclasses.replace(gpu.Blocks(), bwd_splits=3))
  with pytest.raises(ValueError, match="Blocks.bwd_splits=3 must divide the 4 query heads per KV head"):
    gpu._dkv_splits(pb, 1, 8, lists=False)
  assert gpu._dkv_splits(dataclasses.replace(pb, blocks=gpu.Blocks(bwd_splits=2)), 1, 8, lists=False) == 2


def test_attention_benchmark_rejects_unknown_impl(capsys):
  from longax.benchmarks import attention as bench
  with pytest.raises(SystemExit) as e:
    bench.main(["--impls", "pallas,flashy"])
  assert e.value.code == 2
  assert "unknown --impls ['flashy']" in capsys.readouterr().err


@pytest.mark.parametrize("opts", [dict(), dict(window=5, segments=2)], ids=str)
def test_return_lse_matches_reference(rand, opts):
  """return_lse: the rows' log-sum-exp [B, T, H] (ring attention folds with it), forward and
  gradients through both outputs against the reference; rows that see nothing give -inf."""
  b, t, h, hkv, d = 2, 20, 4, 2, 8
  q, k, v = rand.normal((b, t, h, d)), rand.normal((b, t, hkv, d)), rand.normal((b, t, hkv, d))
  seg = rand.segments(b, t, opts["segments"]) if "segments" in opts else None
  kw = dict(window=opts.get("window"), segment_ids=seg, return_lse=True, block_kv=8)
  fn = lambda impl: lambda q, k, v: attention(q, k, v, impl=impl, **kw)
  compare(fn("xla"), fn("reference"), (q, k, v), (0, 1, 2), jnp.float32, "return_lse")
  empty = attention(q, k, v, q_positions=jnp.arange(t), kv_positions=jnp.full((t,), -1),
                    return_lse=True, impl="xla")[1]
  assert empty.shape == (b, t, h) and bool(jnp.all(jnp.isneginf(empty)))
