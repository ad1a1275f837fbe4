"""linear_attention / linear_attention_step against the token-by-token reference."""

import jax
import jax.numpy as jnp
import pytest

from conftest import assert_close, compare, forward_and_probe_grads
from longax.kernels import linear_attention, linear_attention_step
from longax.kernels.linear_attention import _intra

# (B, T, H, Hkv, Dk, Dv, chunk): one partial chunk, several with a ragged tail, GQA, exact.
SHAPES = [(2, 13, 2, 2, 8, 8, 16), (1, 45, 4, 2, 8, 6, 16), (2, 32, 2, 1, 4, 8, 8)]
DECAYS = [None, "head", "scalar", "key"]


def _decay(rand, form, b, t, h, dk, strength=1.0):
  shape = {None: None, "head": (h,), "scalar": (b, t, h), "key": (b, t, h, dk)}[form]
  return None if shape is None else -strength * jax.nn.softplus(rand.normal(shape))


def _inputs(rand, shape, dtype=jnp.float32):
  b, t, h, hkv, dk, dv, _ = shape
  return (rand.normal((b, t, h, dk), dtype), rand.normal((b, t, hkv, dk), dtype),
          rand.normal((b, t, hkv, dv), dtype))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("state,segments", [("zero", False), ("given", False), ("given", True)])
def test_xla_matches_reference_f32(rand, shape, decay, state, segments):
  b, t, h, hkv, dk, dv, chunk = shape
  q, k, v = _inputs(rand, shape)
  g = _decay(rand, decay, b, t, h, dk)
  h0 = rand.normal((b, h, dk, dv)) if state == "given" else None
  seg = rand.segments(b, t, 3) if segments else None
  args = [q, k, v] + [x for x in (g, h0) if x is not None]

  def fn(impl):
    def f(q, k, v, *rest):
      rest = list(rest)
      gg = rest.pop(0) if g is not None else None
      hh = rest.pop(0) if h0 is not None else None
      return linear_attention(q, k, v, log_decay=gg, initial_state=hh, segment_ids=seg,
                              chunk_size=chunk, return_final_state=True, impl=impl)
    return f

  compare(fn("xla"), fn("reference"), args, tuple(range(len(args))), jnp.float32,
          f"decay={decay}")


@pytest.mark.parametrize("decay", DECAYS)
def test_xla_matches_reference_bf16(rand, decay):
  shape = (2, 40, 4, 2, 16, 16, 16)
  q, k, v = _inputs(rand, shape, jnp.bfloat16)
  g = _decay(rand, decay, 2, 40, 4, 16)
  f = lambda impl: lambda q, k, v: linear_attention(q, k, v, log_decay=g, chunk_size=16,
                                                    impl=impl)
  compare(f("xla"), f("reference"), (q, k, v), (0, 1, 2), jnp.bfloat16, f"decay={decay}")
  assert f("auto")(q, k, v).dtype == jnp.bfloat16


def test_plain_linear_attention_by_hand(rand):
  """No decay: o_t = scale * q_t sum_{j<=t} k_j^T v_j, i.e. causal unnormalised attention."""
  q, k, v = _inputs(rand, (1, 10, 1, 1, 4, 4, 0))
  s = jnp.einsum("btd,bsd->bts", q[:, :, 0], k[:, :, 0]) * jnp.tril(jnp.ones((10, 10)))
  want = 0.5 * jnp.einsum("bts,bsd->btd", s, v[:, :, 0])[:, :, None]
  for impl in ("reference", "xla"):
    assert_close(linear_attention(q, k, v, chunk_size=4, impl=impl), want)


@pytest.mark.parametrize("decay", DECAYS)
def test_step_chain_equals_parallel(rand, decay):
  b, t, h, hkv, dk, dv = 2, 11, 4, 2, 8, 6
  q, k, v = _inputs(rand, (b, t, h, hkv, dk, dv, 0))
  g = _decay(rand, decay, b, t, h, dk)
  h0 = rand.normal((b, h, dk, dv))
  o, final = linear_attention(q, k, v, log_decay=g, initial_state=h0, chunk_size=4,
                              return_final_state=True, impl="xla")
  state, outs = h0, []
  step = jax.jit(linear_attention_step)
  for i in range(t):
    g_t = None if g is None else (g if g.ndim == 1 else g[:, i])
    o_t, state = step(q[:, i], k[:, i], v[:, i], state, g_t)
    outs.append(o_t)
  assert_close(jnp.stack(outs, 1), o)
  assert_close(state, final)
  # The same step with a time axis of length one.
  g_1 = None if g is None else (g if g.ndim == 1 else g[:, :1])
  o_1, s_1 = linear_attention_step(q[:, :1], k[:, :1], v[:, :1], h0, g_1)
  assert o_1.shape == (b, 1, h, dv)
  assert_close(o_1, o[:, :1])


@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_packed_row_equals_documents(rand, decay, impl):
  b, t, h, dk, dv = 1, 30, 2, 8, 8
  q, k, v = _inputs(rand, (b, t, h, h, dk, dv, 0))
  g = _decay(rand, decay, b, t, h, dk)
  h0 = rand.normal((b, h, dk, dv))
  bounds = [(0, 9), (9, 10), (10, 30)]
  seg = jnp.concatenate([jnp.full((hi - lo,), 5 * i) for i, (lo, hi) in enumerate(bounds)])
  o, final = linear_attention(q, k, v, log_decay=g, initial_state=h0, segment_ids=seg[None],
                              chunk_size=8, return_final_state=True, impl=impl)
  for i, (lo, hi) in enumerate(bounds):
    gi = None if g is None else (g if g.ndim == 1 else g[:, lo:hi])
    oi, fi = linear_attention(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], log_decay=gi,
                              initial_state=h0 if i == 0 else None, chunk_size=8,
                              return_final_state=True, impl=impl)
    assert_close(o[:, lo:hi], oi, what=f"document {i}")
  assert_close(final, fi, what="final state belongs to the last document")


@pytest.mark.parametrize("t", [37, 130])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_per_key_sub_chunks_match_reference(rand, t, dtype):
  """Per-key decay with chunks of 64 (four sub-chunks of 16: off-diagonal and diagonal
  blocks), a ragged tail, packed documents and an initial state."""
  b, h, hkv, dk, dv = 2, 4, 2, 8, 8
  q, k, v = _inputs(rand, (b, t, h, hkv, dk, dv, 0), dtype)
  g = _decay(rand, "key", b, t, h, dk)
  h0 = rand.normal((b, h, dk, dv))
  seg = rand.segments(b, t, 3)
  f = lambda impl: lambda q, k, v, g, h0: linear_attention(
      q, k, v, log_decay=g, initial_state=h0, segment_ids=seg, chunk_size=64,
      return_final_state=True, impl=impl)
  compare(f("xla"), f("reference"), (q, k, v, g, h0), (0, 1, 2, 3, 4), dtype)


def _strong(rand, decay, b, t, h, d):
  """Inputs with a log decay uniform in [-10, 0] per token (and key)."""
  q, k, v = (rand.normal((b, t, h, d)) for _ in range(3))
  g = rand.uniform({"scalar": (b, t, h), "key": (b, t, h, d)}[decay], -10.0, 0.0)
  return q, k, v, g, rand.normal((b, h, d, d))


def _with_state(impl, dtype=jnp.float32):
  return lambda q, k, v, g, h0: linear_attention(
      *(x.astype(dtype) for x in (q, k, v)), log_decay=g, initial_state=h0,
      return_final_state=True, impl=impl)


@pytest.mark.parametrize("decay", ["scalar", "key"])
def test_strong_decay_gradients(rand, decay):
  """Log decay down to -10 per token: outputs and every gradient finite; f32 matches the
  reference, bf16 operands stay within 1e-2 of the f32 reference."""
  args = _strong(rand, decay, 1, 1024, 2, 16)
  argnums = tuple(range(5))
  want, want_grads = forward_and_probe_grads(_with_state("reference"), args, argnums)
  for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)):
    got, grads = forward_and_probe_grads(_with_state("xla", dtype), args, argnums)
    for i, (a, w) in enumerate(zip(got + grads, want + want_grads)):
      assert_close(a, w, tol, f"{jnp.dtype(dtype).name} output/grad {i}")


@pytest.mark.parametrize("decay", ["scalar", "key"])
def test_strong_decay_100k_tokens(rand, decay):
  """exp of a cumulative log decay over 100k tokens would overflow; the XLA path only takes
  exp of differences <= 0. f32 against the token-by-token reference, bf16 within 1e-2."""
  args = _strong(rand, decay, 1, 100_000, 1, 16)
  want = jax.jit(_with_state("reference"))(*args)
  for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)):
    got = jax.jit(_with_state("xla", dtype))(*args)
    for i, (a, w) in enumerate(zip(got, want)):
      assert_close(a, w, tol, f"{jnp.dtype(dtype).name} output {i}")


def test_intra_per_key_never_overflows(rand):
  """`_intra` (the kernel's intra-chunk scores) with sub-chunks of 4 against the dense
  [C, C, Dk] form, segments included, where exp(G_i - G_j) for j > i would be e^300."""
  b, h, n, c, d = 1, 2, 3, 16, 8
  q, k = rand.normal((b, h, n, c, d)), rand.normal((b, h, n, c, d))
  gc = jnp.cumsum(rand.uniform((b, h, n, c, d), -10.0, 0.0), axis=3)
  seg = jnp.cumsum(rand.uniform((b, n, c), 0, 1) < 0.15, axis=-1)
  visible = jnp.tril(jnp.ones((c, c), bool)) & (seg[..., :, None] == seg[..., None, :])[:, None]
  dense = lambda q, k, gc: jnp.einsum(
      "bhnid,bhnjd,bhnijd->bhnij", q, k,
      jnp.exp(jnp.minimum(gc[..., :, None, :] - gc[..., None, :, :], 0.0))) * visible
  sub = lambda q, k, gc: _intra(q, k, gc, visible, sub=4)
  compare(sub, dense, (q, k, gc), (0, 1, 2), jnp.float32)


def test_intra_exact_takes_float32_products_at_highest_precision(rand):
  """`_intra(..., exact=True)` (the Hopper kernels' strong-decay form): bf16 inputs, the
  sub-chunk product on float32 operands at HIGHEST precision (a bf16 product there gave
  non-finite gradients in some H100 runs), the same scores as the bf16 form within bf16."""
  b, h, n, c, d = 1, 2, 2, 16, 8
  q, k = rand.normal((b, h, n, c, d), jnp.bfloat16), rand.normal((b, h, n, c, d), jnp.bfloat16)
  gc = jnp.cumsum(rand.uniform((b, h, n, c, d), -10.0, 0.0), axis=3)
  visible = jnp.tril(jnp.ones((c, c), bool))
  dots = lambda exact: [e for e in jax.make_jaxpr(
      lambda q, k, gc: _intra(q, k, gc, visible, sub=4, exact=exact))(q, k, gc).eqns
      if e.primitive.name == "dot_general"]
  exact, plain = dots(True), dots(False)
  assert [str(e.params["precision"]) for e in exact] == ["(Precision.HIGHEST, Precision.HIGHEST)"]
  assert all(v.aval.dtype == jnp.float32 for v in exact[0].invars)
  assert [v.aval.dtype for v in plain[0].invars] == [jnp.bfloat16, jnp.bfloat16]
  assert_close(_intra(q, k, gc, visible, sub=4, exact=True), _intra(q, k, gc, visible, sub=4),
               jnp.bfloat16)


def test_per_key_memory_4k_tokens_16_heads():
  """Forward + backward of per-key decay at B1 T4096 H16 D128 compiles to < 4 GiB of
  temporaries (the dense [B, H, N, C, C, Dk] form alone is 2 GiB per copy)."""
  b, t, h, d = 1, 4096, 16, 128
  sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
  args = (sds(b, t, h, d), sds(b, t, h, d), sds(b, t, h, d),
          jax.ShapeDtypeStruct((b, t, h, d), jnp.float32))
  loss = lambda q, k, v, g: jnp.sum(
      linear_attention(q, k, v, log_decay=g, impl="xla").astype(jnp.float32) ** 2)
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(*args).compile()
  memory = compiled.memory_analysis()
  if memory is None or not hasattr(memory, "temp_size_in_bytes"):
    pytest.skip("memory_analysis unavailable on this backend")
  temp = memory.temp_size_in_bytes / 2**30
  print(f"per-key decay B1 T4096 H16 D128 bf16 fwd+bwd: {temp:.2f} GiB temporaries")
  assert temp < 4, f"{temp:.2f} GiB"


def test_jit_and_vmap(rand):
  q, k, v = _inputs(rand, (2, 12, 2, 2, 4, 4, 0))
  g = _decay(rand, "scalar", 2, 12, 2, 4)
  want = linear_attention(q, k, v, log_decay=g, impl="reference")
  vm = jax.vmap(lambda q, k, v, g: linear_attention(q[None], k[None], v[None],
                                                    log_decay=g[None], chunk_size=4,
                                                    impl="xla")[0])
  assert_close(jax.jit(vm)(q, k, v, g), want)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the CPU answer")
def test_pallas_off_gpu_is_one_clear_line(rand):
  q, k, v = _inputs(rand, (1, 4, 1, 1, 4, 4, 0))
  with pytest.raises(ValueError, match="linear_attention: impl='pallas' does not support this "
                                       "call: the Mosaic GPU kernel needs a GPU backend"):
    linear_attention(q, k, v, impl="pallas")


BAD = [
    (dict(q=lambda x: x[0]), "`q` must have rank 4"),
    (dict(k=lambda x: x[:, :, :, :2]), "shapes must be"),
    (dict(q=lambda x: jnp.concatenate([x, x[:, :, :1]], 2)), "H=5 .* Hkv=2"),
    (dict(v=lambda x: x.astype(jnp.bfloat16)), "share one dtype"),
    (dict(log_decay=jnp.zeros((3,))), r"`log_decay` must be \[H\]"),
    (dict(log_decay=jnp.zeros((2, 9, 4))), r"`log_decay` must be"),
    (dict(initial_state=jnp.zeros((2, 4, 8, 7))), "`initial_state` must have shape"),
    (dict(segment_ids=jnp.zeros((2, 7), jnp.int32)), "`segment_ids` must have shape"),
    (dict(chunk_size=0), "`chunk_size`"),
    (dict(impl="gpu"), "unknown impl"),
]


@pytest.mark.parametrize("kw,msg", BAD, ids=[b[1] for b in BAD])
def test_bad_input_errors(rand, kw, msg):
  q, k, v = _inputs(rand, (2, 8, 4, 2, 8, 8, 0))
  arrays = dict(q=q, k=k, v=v)
  for name in "qkv":
    if name in kw:
      arrays[name] = kw.pop(name)(arrays[name])
  with pytest.raises(ValueError, match=msg):
    linear_attention(arrays["q"], arrays["k"], arrays["v"], **kw)


def test_step_bad_state(rand):
  q, k, v = _inputs(rand, (2, 1, 4, 2, 8, 8, 0))
  with pytest.raises(ValueError, match="`state` must have shape"):
    linear_attention_step(q[:, 0], k[:, 0], v[:, 0], jnp.zeros((2, 4, 8, 9)))


def test_step_with_time_axis_takes_one_token(rand):
  q, k, v = _inputs(rand, (2, 3, 4, 2, 8, 8, 0))
  with pytest.raises(ValueError, match="`q_t` must hold one token, got shape \\(2, 3, 4, 8\\)"):
    linear_attention_step(q, k, v, jnp.zeros((2, 4, 8, 8)))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the CPU answer")
def test_linear_pallas_benchmark_off_gpu_is_one_line():
  from longax.benchmarks import linear_pallas
  with pytest.raises(SystemExit, match="needs a Hopper GPU"):
    linear_pallas.main(["--shapes", "1,128,2,64"])
