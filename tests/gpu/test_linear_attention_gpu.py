"""The Mosaic GPU linear-attention kernel (impl="pallas") against the float32 reference,
forward and every gradient (q, k, v, decay, initial state), on ragged shapes, GQA, packed
documents and strong decays. Runs on a Hopper GPU; skipped elsewhere.

    python -m pytest -q tests/gpu        # on the device
"""

import jax
import jax.numpy as jnp
import pytest

from conftest import assert_close, compare, needs_hopper
from longax.kernels import linear_attention, ssd

pytestmark = needs_hopper()

# (B, T, H, Hkv, Dk, Dv)
BASE = (2, 512, 4, 2, 128, 128)
RAGGED = (1, 300, 4, 1, 64, 64)  # T not a multiple of the chunk; one K/V head
MIXED = (1, 200, 2, 2, 64, 128)  # Dk != Dv
SHORT = (2, 37, 2, 2, 128, 64)  # one partial chunk
SPLIT = (1, 2000, 2, 1, 64, 64)  # few rows, long: the sequence split (4 pieces) runs
SHAPES = [BASE, RAGGED, MIXED, SHORT, SPLIT]
DECAYS = [None, "head", "token", "key"]


def _inputs(rand, shape, decay, dtype=jnp.bfloat16, strength=1.0):
  b, t, h, hkv, dk, dv = shape
  q, k = rand.normal((b, t, h, dk), dtype), rand.normal((b, t, hkv, dk), dtype)
  v = rand.normal((b, t, hkv, dv), dtype)
  g = {None: None, "head": lambda: -strength * jax.nn.softplus(rand.normal((h,))),
       "token": lambda: -strength * jax.nn.softplus(rand.normal((b, t, h))),
       "key": lambda: -strength * jax.nn.softplus(rand.normal((b, t, h, dk)))}[decay]
  return q, k, v, (g() if g else None), rand.normal((b, h, dk, dv), jnp.float32, 0.1)


@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("state,segments", [(False, 0), (True, 0), (True, 3)])
def test_pallas_matches_reference(rand, shape, decay, state, segments):
  q, k, v, g, h0 = _inputs(rand, shape, decay)
  seg = rand.segments(shape[0], shape[1], segments) if segments else None
  args, argnums = (q, k, v, g, h0), (0, 1, 2) + ((3,) if g is not None else ()) + (
      (4,) if state else ())

  def fn(impl):
    def f(q, k, v, g, h0):
      return linear_attention(q, k, v, log_decay=g, initial_state=h0 if state else None,
                              segment_ids=seg, scale=0.05, return_final_state=True, impl=impl)
    return f

  compare(fn("pallas"), fn("reference"), args, argnums, 2e-2,
          f"{shape} decay={decay} state={state} segments={segments}")


@pytest.mark.parametrize("per_key", [False, True])
def test_strong_decay_long_sequence(rand, per_key):
  """log decay down to -10 per token over 16k tokens: finite and within bf16 tolerance."""
  shape = (1, 16384, 2, 2, 64, 64)
  q, k, v, _, _ = _inputs(rand, shape, None)
  g = rand.uniform((1, 16384, 2, 64) if per_key else (1, 16384, 2), -10.0, 0.0)
  f = lambda impl: lambda q, k, v, g: linear_attention(q, k, v, log_decay=g, impl=impl)
  got = jax.jit(f("pallas"))(q, k, v, g)
  assert bool(jnp.isfinite(got.astype(jnp.float32)).all())
  compare(f("pallas"), f("reference"), (q, k, v, g), (0, 1, 2, 3), 2e-2, "strong decay")


def test_ssd_reaches_the_kernel(rand):
  """Mamba-2 SSD runs on linear_attention's kernel with no code of its own."""
  b, t, h, p, n = 1, 300, 4, 64, 64
  x = rand.normal((b, t, h, p), jnp.bfloat16)
  dt = jax.nn.softplus(rand.normal((b, t, h)))
  A = -jnp.exp(rand.normal((h,)))
  Bm, Cm = rand.normal((b, t, 1, n), jnp.bfloat16), rand.normal((b, t, 1, n), jnp.bfloat16)
  f = lambda impl: lambda x, dt, Bm, Cm: ssd(x, dt, A, Bm, Cm, impl=impl)
  compare(f("pallas"), f("reference"), (x, dt, Bm, Cm), (0, 1, 2, 3), 2e-2, "ssd")


def test_split_is_on_for_the_split_shape():
  from longax.kernels.gpu.linear_attention import pieces_for
  b, t, h, _, _, dv = SPLIT
  assert pieces_for(b, h, dv, t) == 4


def test_auto_takes_the_kernel_where_covered():
  from longax.kernels._dispatch import resolve
  from longax.kernels.gpu.linear_attention import linear_attention_pallas as kernel
  x = lambda d, dt=jnp.bfloat16: jnp.zeros((1, 128, 2, d), dt)
  call = lambda d=128, dt=jnp.bfloat16, g=None, chunk=64: dict(q=x(d, dt), k=x(d, dt),
                                                              v=x(d, dt), g=g, chunk=chunk)
  assert resolve("linear_attention", "auto", call()) is kernel
  assert resolve("linear_attention", "auto", call(64, g=jnp.zeros((1, 128, 2, 1)))) is kernel
  assert resolve("linear_attention", "auto", call(dt=jnp.float32)) is not kernel
  assert resolve("linear_attention", "auto", call(g=jnp.zeros((1, 128, 2, 128)))) is kernel
  assert resolve("linear_attention", "auto", call(chunk=128)) is kernel  # its own chunk: 64


def _split_op(seg, scale):
  """linear_attention on the kernel's split backward (LASP-2's): phase 1 from a zero final
  cotangent, phase 2 with the real one. The initial state gets no gradient here."""
  from longax.kernels.linear_attention import _log_decay, _resets
  from longax.kernels.gpu import linear_attention as gpu

  @jax.custom_vjp
  def f(q, k, v, g, h0):
    return split_fwd(q, k, v, g, h0)[0]

  def split_fwd(q, k, v, g, h0):
    b, t, h, dk = q.shape
    g4 = _log_decay("test", g, b, t, h, dk)
    o, final, res = gpu.split_forward(q, k, v, g4, h0, _resets(seg, b, t), scale)
    return (o.astype(q.dtype), final), (res, g)

  def split_bwd(saved, cts):
    res, g = saved
    do, dfinal = cts
    _, d0 = gpu.split_grad_in(res, do, scale)
    dq, dk, dv, dg4 = gpu.split_grads(res, d0, do, dfinal, scale)
    b, t, h, d = dq.shape
    dg = None if g is None else jax.vjp(lambda g: _log_decay("test", g, b, t, h, d), g)[1](dg4)[0]
    return dq, dk, dv, dg, jnp.zeros((b, h, d, dv.shape[-1]), jnp.float32)

  f.defvjp(split_fwd, split_bwd)
  return f


@pytest.mark.parametrize("decay", [None, "head", "token"])
@pytest.mark.parametrize("shape", [BASE, RAGGED, SPLIT], ids=str)
@pytest.mark.parametrize("segments", [0, 3])
def test_split_backward_matches_the_reference(rand, shape, decay, segments):
  """LASP-2's split: (o, final) and the gradients of q, k, v, decay under any final-state
  cotangent equal the reference's; phase 1's initial-state gradient is dS_in (the gradient at
  the initial state through the outputs alone)."""
  from longax.kernels.linear_attention import _log_decay, _resets
  from longax.kernels.gpu import linear_attention as gpu
  q, k, v, g, h0 = _inputs(rand, shape, decay)
  seg = rand.segments(shape[0], shape[1], segments) if segments else None
  scale = 0.05
  ref = lambda q, k, v, g, h0: linear_attention(q, k, v, log_decay=g, initial_state=h0,
                                                segment_ids=seg, scale=scale,
                                                return_final_state=True, impl="reference")
  argnums = (0, 1, 2) + ((3,) if g is not None else ())
  compare(_split_op(seg, scale), ref, (q, k, v, g, h0), argnums, 2e-2,
          f"split {shape} decay={decay} segments={segments}")
  b, t, h, dk = q.shape
  do = rand.normal((b, t, h, v.shape[-1]), jnp.bfloat16)

  def phase1(q, k, v, g, h0):
    g4 = _log_decay("test", g, b, t, h, dk)
    _, _, res = gpu.split_forward(q, k, v, g4, h0, _resets(seg, b, t), scale)
    return gpu.split_grad_in(res, do, scale)[0]

  got = jax.jit(phase1)(q, k, v, g, h0)
  want = jax.vjp(lambda h0: ref(q, k, v, g, h0)[0].astype(jnp.float32), h0)[1](
      do.astype(jnp.float32))[0]
  assert_close(got, want, 2e-2, "dS_in")


@pytest.mark.parametrize("shape", [BASE, RAGGED, MIXED, SHORT, (1, 32768, 16, 16, 128, 128)],
                         ids=str)
@pytest.mark.parametrize("splits", [None, 1])
def test_shard_state_matches_the_sum(rand, shape, splits):
  """LASP-2's shard state on the kernel, sum_t w_t k_t^T v_t per query head (GQA), against
  the float32 einsum; weights spanning 1e-30..1 (decayed rows) and zeros (reset rows)."""
  from longax.kernels.gpu.linear_attention import shard_state
  b, t, h, hkv, dk, dv = shape
  _, k, v, _, _ = _inputs(rand, shape, None)
  w = jnp.exp(rand.uniform((b, h, t), -69.0, 0.0)) * (rand.uniform((b, h, t), 0.0, 1.0) > 0.1)
  got = shard_state(k, v, w, h, splits=splits)
  kr, vr = (jnp.repeat(x, h // hkv, axis=2).astype(jnp.float32) for x in (k, v))
  want = jnp.einsum("bthd,bht,bthe->bhde", kr, w, vr)
  assert got.shape == (b, h, dk, dv)
  assert_close(got, want, jnp.bfloat16, f"shard state {shape} splits={splits}")
