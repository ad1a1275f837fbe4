"""The Pallas TPU linear-attention kernel (impl="pallas_interpret": TPU interpret mode on CPU)
against the token-by-token reference: outputs, final state and the gradients of q, k, v,
log_decay and the initial state, every decay form. Interpret mode compiles slowly, so the
default suite keeps two cases that cover every option between them; the rest is slow."""

import jax
import jax.numpy as jnp
import pytest

from conftest import assert_close
from longax.kernels import _dispatch, linear_attention
from longax.kernels.tpu import VMEM_LIMIT
from longax.kernels.tpu import linear_attention as tpu
from test_linear_attention import _decay, _inputs


def _check(rand, shape, decay, state, segments, dtype=jnp.float32):
  b, t, h, hkv, dk, dv, chunk = shape
  q, k, v = _inputs(rand, shape, dtype)
  g = _decay(rand, decay, b, t, h, dk)
  h0 = rand.normal((b, h, dk, dv)) if state else None
  seg = rand.segments(b, t, 3) if segments else None
  args = {n: x for n, x in dict(q=q, k=k, v=v, log_decay=g, initial_state=h0).items()
          if x is not None}

  def run(impl):
    def f(args):
      return linear_attention(**args, segment_ids=seg, chunk_size=chunk,
                              return_final_state=True, impl=impl)

    def both(args):  # outputs and the gradients of <outputs, R>, one jit
      out, vjp = jax.vjp(f, args)
      keys = jax.random.split(jax.random.key(5), 2)
      return out, vjp(tuple(jax.random.normal(kk, x.shape).astype(x.dtype)
                            for kk, x in zip(keys, out)))[0]
    return jax.jit(both)(args)

  (o, grads), (o_ref, grads_ref) = run("pallas_interpret"), run("reference")
  assert o[0].dtype == dtype
  for name, a, w in (("o", o[0], o_ref[0]), ("final state", o[1], o_ref[1])):
    assert_close(a, w, dtype, f"{decay} {name}")
  for name in args:
    assert_close(grads[name], grads_ref[name], dtype, f"{decay} d{name}")


# (B, T, H, Hkv, Dk, Dv, chunk): ragged tails (T not a multiple of the chunk), GQA.
@pytest.mark.parametrize("shape,decay", [((2, 21, 2, 1, 8, 16, 8), "scalar"),
                                         ((1, 19, 4, 2, 8, 8, 8), "key")], ids=str)
def test_interpret_matches_reference_f32(rand, shape, decay):
  _check(rand, shape, decay, state=True, segments=True)


@pytest.mark.slow
@pytest.mark.parametrize("decay", [None, "head", "scalar", "key"])
@pytest.mark.parametrize("state,segments", [(False, False), (True, False), (True, True)])
def test_interpret_every_form_f32(rand, decay, state, segments):
  _check(rand, (2, 13, 2, 2, 8, 8, 8), decay, state, segments)
  _check(rand, (1, 45, 4, 2, 8, 6, 16), decay, state, segments)


@pytest.mark.slow
@pytest.mark.parametrize("decay", [None, "head", "scalar", "key"])
def test_interpret_bf16(rand, decay):
  _check(rand, (2, 40, 4, 2, 16, 16, 16), decay, state=False, segments=False, dtype=jnp.bfloat16)


def test_chunks_per_form_fit_v5e_vmem():
  for form, c in tpu.DEFAULTS.items():
    assert tpu.vmem_bytes(form, c, 128, 128, 4) < VMEM_LIMIT, form
  assert tpu.chunk_for(None, 64) == 64 and tpu.chunk_for(jnp.zeros((1, 4, 2, 8)), 64) == 32


def test_dispatch_on_tpu(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  x = lambda d: jax.ShapeDtypeStruct((1, 128, 2, d), jnp.bfloat16)
  call = dict(q=x(128), k=x(128), v=x(128), g=None)
  assert _dispatch.resolve("linear_attention", "auto", call) is tpu.linear_attention_pallas
  bad = dict(call, q=x(96), k=x(96))
  assert _dispatch.resolve("linear_attention", "auto", bad).__name__ == "_linear_attention_xla"
  with pytest.raises(ValueError, match="impl='pallas' does not support this call: Dk=96"):
    _dispatch.resolve("linear_attention", "pallas", bad)


@pytest.mark.slow
def test_ssd_through_the_kernel(rand):
  """ssd (Mamba-2) reaches the kernel through linear_attention's dispatch."""
  from longax.kernels import ssd
  from test_ssd import _inputs as ssd_inputs, naive_ssd
  x, dt, A, B, C, D, h0 = ssd_inputs(rand, 1, 19, 2, 8, 1, 8)
  want_y, want_s = naive_ssd(x, dt, A, B, C, D, h0)
  y, s = ssd(x, dt, A, B, C, D=D, initial_state=h0, chunk_size=8, return_final_state=True,
             impl="pallas_interpret")
  assert_close(y, want_y)
  assert_close(s, want_s)
