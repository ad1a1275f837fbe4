"""The Pallas TPU attention kernels (impl="pallas_interpret": TPU interpret mode on CPU) against
the float32 reference, forward and gradients, and the TPU side of `impl=` dispatch.

Interpret mode compiles slowly (seconds per kernel variant), so each case runs its kernel
forward and backward in one jit, and the default suite keeps a few cases that cover every
option between them; the full option grid of test_attention.py is marked slow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close
from longax.kernels import _dispatch, attention, sigmoid_attention
from longax.kernels.attention import AttnSpec
from longax.kernels.tpu import VMEM_LIMIT
from longax.kernels.tpu import attention as tpu
from test_attention import CASES, KINDS, _inputs

SMALL = tpu.Blocks(block_q=16, block_kv=8, bwd_block_q=8, bwd_block_kv=16)


@pytest.fixture
def small_blocks(monkeypatch):
  """Blocks far smaller than the sequences, so every case walks several key / query blocks."""
  monkeypatch.setattr(tpu, "blocks_for", lambda d: SMALL)


def _value_and_grads(fn, seed=7):
  """jit(q, k, v -> (outputs, d<outputs, R>/d(q, k, v))) for a fixed random projection R."""

  def run(q, k, v):
    out, vjp = jax.vjp(fn, q, k, v)
    leaves, tree = jax.tree.flatten(out)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    cot = [jnp.where(jnp.isfinite(x), jax.random.normal(kk, x.shape), 0).astype(x.dtype)
           for kk, x in zip(keys, leaves)]
    return out, vjp(jax.tree.unflatten(tree, cot))

  return jax.jit(run)


def _check(kind, shape, opts, dtype, rand, **extra):
  q, k, v, seg = _inputs(rand, shape, dtype, opts.get("segments"))
  opts = {n: x for n, x in opts.items() if n != "segments"}
  f = lambda impl: lambda q, k, v: KINDS[kind](q, k, v, segment_ids=seg, impl=impl, **opts,
                                               **extra)
  got, want = _value_and_grads(f("pallas_interpret"))(q, k, v), _value_and_grads(f("reference"))(q, k, v)
  (o, grads), (o_ref, grads_ref) = got, want
  assert jax.tree.leaves(o)[0].dtype == dtype
  for i, (a, b) in enumerate(zip(jax.tree.leaves(o), jax.tree.leaves(o_ref))):
    fin = np.isfinite(np.asarray(b, np.float32))
    np.testing.assert_array_equal(np.isfinite(np.asarray(a, np.float32)), fin)
    assert_close(jnp.where(fin, a, 0), jnp.where(fin, b, 0), dtype, f"{kind} {opts} forward[{i}]")
  for name, a, b in zip("qkv", grads, grads_ref):
    assert_close(a, b, dtype, f"{kind} {opts} d{name}")


# (B, T, S, H, Hkv, D, Dv, unused): between them the fast cases take every option.
FAST = [
    ("softmax", (1, 21, 45, 2, 1, 8, 8, 0), dict(window=7, sinks=3, softcap=2.0)),
    ("sigmoid", (1, 37, 37, 4, 2, 16, 8, 0), dict(segments=3, window=6)),
    ("softmax", (1, 9, 5, 2, 2, 8, 8, 0), dict(segments=2)),  # T > S: rows that see no key
]


@pytest.mark.parametrize("kind,shape,opts", FAST, ids=str)
def test_interpret_matches_reference_f32(rand, small_blocks, kind, shape, opts):
  _check(kind, shape, opts, jnp.float32, rand)


def test_interpret_bf16_return_lse(rand, small_blocks):
  _check("softmax", (1, 40, 40, 2, 1, 16, 16, 0), dict(causal=False), jnp.bfloat16, rand,
         return_lse=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape,opts", CASES, ids=str)
def test_interpret_every_case_f32(rand, small_blocks, kind, shape, opts):
  if kind == "sigmoid":
    opts = {n: x for n, x in opts.items() if n not in ("softcap", "sinks")}
  _check(kind, shape, opts, jnp.float32, rand)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("opts", [dict(), dict(window=6, sinks=2), dict(segments=2)], ids=str)
def test_interpret_bf16(rand, small_blocks, kind, opts):
  if kind == "sigmoid":
    opts.pop("sinks", None)
  _check(kind, (2, 40, 40, 4, 2, 16, 16, 0), opts, jnp.bfloat16, rand)


@pytest.mark.slow
def test_interpret_default_blocks_one_block(rand):
  """The default blocks (the table's) on a short sequence: one block each way."""
  _check("softmax", (1, 24, 24, 2, 2, 64, 64, 0), dict(window=9), jnp.float32, rand)


# ------------------------------------------------------------------ schedule and dispatch


def _problem(t, s, bq, bk, **spec):
  spec = AttnSpec("softmax", spec.get("causal", True), 1.0, spec.get("window"),
                  spec.get("sinks", 0), None, 0.0)
  return tpu._Problem(spec, t, s, 1, False, bq, bk, True)


def test_key_steps_skip_and_unmask():
  """Causal 64 x 64 in 16-blocks: query block i visits key blocks 0..i, masked on the
  diagonal only; a window of 16 keeps two blocks; sinks come first."""
  blk, kind = map(np.asarray, tpu._key_steps(_problem(64, 64, 16, 16)))
  assert blk.shape == (4, 4)
  for i in range(4):
    assert list(blk[i, :i + 1]) == list(range(i + 1)) and set(blk[i, i + 1:]) <= {i}
    assert list(kind[i]) == [2] * i + [1] + [0] * (3 - i)
  blk, kind = map(np.asarray, tpu._key_steps(_problem(64, 64, 16, 16, window=16)))
  assert blk.shape == (4, 2) and list(blk[3]) == [2, 3] and list(kind[3]) == [1, 1]
  blk, kind = map(np.asarray, tpu._key_steps(_problem(64, 64, 16, 16, window=16, sinks=4)))
  assert list(blk[3]) == [0, 2, 3] and list(kind[3]) == [1, 1, 1]
  blk, kind = map(np.asarray, tpu._query_steps(_problem(64, 64, 16, 16)))  # the transpose
  assert list(blk[1]) == [1, 2, 3, 3] and list(kind[1]) == [1, 2, 2, 0]


def test_default_blocks_fit_v5e_vmem():
  for d, blocks in tpu.DEFAULTS.items():
    for itemsize in (2, 4):
      need = tpu.vmem_bytes(blocks, d, d, itemsize)
      assert max(need.values()) < VMEM_LIMIT, (d, itemsize, need)


def test_blocks_must_be_multiples_of_8():
  with pytest.raises(ValueError, match="Blocks.block_kv=12 must be a multiple of 8"):
    tpu.Blocks(block_kv=12)


@pytest.mark.skipif(jax.default_backend() == "tpu", reason="the off-TPU answer")
def test_pallas_off_tpu_keeps_the_gpu_answer(rand):
  """Off TPU, impl="pallas" is still the Mosaic GPU kernel's (and its one-line refusal)."""
  q, k, v, _ = _inputs(rand, (1, 4, 4, 1, 1, 8, 8, 0), jnp.bfloat16)
  with pytest.raises(ValueError, match="impl='pallas' does not support this call: the Mosaic GPU"):
    attention(q, k, v, impl="pallas")


@pytest.mark.parametrize("op", ["attention", "sigmoid_attention"])
def test_dispatch_on_tpu(monkeypatch, op):
  """With a TPU backend pretended: impl="pallas" and auto take the TPU kernel where its
  `unsupported` is None, auto falls back to XLA otherwise, pallas says why."""
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  x = lambda d: jax.ShapeDtypeStruct((1, 128, 2, d), jnp.bfloat16)
  call = dict(q=x(128), k=x(128), v=x(128), spec=AttnSpec("softmax", True, 0.1, None, 0, None, 0.0))
  assert _dispatch.resolve(op, "pallas", call) is tpu.attention_pallas
  assert _dispatch.resolve(op, "auto", call) is tpu.attention_pallas
  assert _dispatch.resolve(op, "pallas_interpret", call) is tpu.attention_interpret
  for change, reason in ((dict(explicit_positions=True), "explicit q_positions"),
                         (dict(q=x(96), k=x(96)), "head dim 96")):
    bad = dict(call, **change)
    assert _dispatch.resolve(op, "auto", bad).__name__ == "_attention_xla"
    with pytest.raises(ValueError, match=f"impl='pallas' does not support this call: {reason}"):
      _dispatch.resolve(op, "pallas", bad)
  assert tpu.unsupported(dict(call, backend="cpu")).startswith("the Pallas TPU kernel needs a TPU")


def test_pallas_interpret_refuses_explicit_positions(rand):
  q, k, v, _ = _inputs(rand, (1, 4, 4, 1, 1, 8, 8, 0), jnp.float32)
  for fn in (attention, sigmoid_attention):
    with pytest.raises(ValueError, match="impl='pallas_interpret' does not support this call: "
                                         "explicit q_positions"):
      fn(q, k, v, impl="pallas_interpret", q_positions=jnp.arange(4))


@pytest.mark.slow
@pytest.mark.parametrize("op", ["ring", "lasp2"])
def test_kernels_inside_shard_map(op):
  """Ring attention (the forward and `attention_block_grads` kernels) and LASP-2 (the linear
  kernel) with impl="pallas_interpret" inside `jax.shard_map` (check_vma on), one device."""
  from jax.sharding import Mesh, PartitionSpec as P

  from longax.kernels import linear_attention
  from longax.kernels import sequence_parallel as SP
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(kk, (1, 32, h, 8)) for kk, h in zip(keys, (2, 1, 1)))
  g = -0.1 * jnp.ones((1, 32, 2))
  local, ref = {
      "ring": (lambda impl: lambda q, k, v: SP.ring_attention(q, k, v, axis_name="sp", layout="zigzag", impl=impl),
               lambda q, k, v: attention(q, k, v, impl="reference")),
      "lasp2": (lambda impl: lambda q, k, v: SP.lasp2_linear_attention(q, k, v, axis_name="sp", log_decay=g, impl=impl),
                lambda q, k, v: linear_attention(q, k, v, log_decay=g, impl="reference"))}[op]
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("sp",))
  sp = jax.shard_map(local("pallas_interpret"), mesh=mesh, in_specs=(P(None, "sp"),) * 3,
                     out_specs=P(None, "sp"))
  assert_close(jax.jit(sp)(q, k, v), ref(q, k, v))
  got = jax.jit(jax.grad(lambda *a: sp(*a).sum(), (0, 1, 2)))(q, k, v)
  for a, b in zip(got, jax.grad(lambda *a: ref(*a).sum(), (0, 1, 2))(q, k, v)):
    assert_close(a, b)
