"""The Pallas TPU selective-scan kernel (impl="pallas_interpret": TPU interpret mode on CPU)
against the token-by-token reference: y, final state and every gradient (u, delta, A, B, C,
z, D, delta_bias, initial state). One fast case covers every option; the rest is slow."""

import jax
import jax.numpy as jnp
import pytest

from conftest import assert_close
from longax.kernels import _dispatch, selective_scan
from longax.kernels.tpu import VMEM_LIMIT
from longax.kernels.tpu import selective_scan as tpu
from test_selective_scan import _inputs


def _check(rand, shape, segments, dtype=jnp.float32):
  b, l, d, n, chunk = shape
  x = _inputs(rand, b, l, d, n, dtype)
  seg = rand.segments(b, l, 3) if segments else None

  def run(impl):
    def f(x):
      return selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], z=x["z"],
                            delta_bias=x["delta_bias"], delta_softplus=True,
                            initial_state=x["h0"], segment_ids=seg, chunk_size=chunk,
                            return_final_state=True, impl=impl)

    def both(x):  # outputs and the gradients of <outputs, R>, one jit
      out, vjp = jax.vjp(f, x)
      keys = jax.random.split(jax.random.key(3), 2)
      return out, vjp(tuple(jax.random.normal(kk, o.shape).astype(o.dtype)
                            for kk, o in zip(keys, out)))[0]
    return jax.jit(both)(x)

  (o, grads), (o_ref, grads_ref) = run("pallas_interpret"), run("reference")
  assert o[0].dtype == dtype
  assert_close(o[0], o_ref[0], dtype, "y")
  assert_close(o[1], o_ref[1], dtype, "final state")
  for name in x:
    assert_close(grads[name], grads_ref[name], dtype, f"d{name}")


def test_interpret_matches_reference_f32(rand):
  _check(rand, (2, 21, 8, 4, 8), segments=True)  # ragged L: 3 chunks, the last partial


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(2, 13, 6, 4, 16), (1, 45, 8, 3, 16), (2, 32, 4, 4, 8)], ids=str)
@pytest.mark.parametrize("segments", [False, True])
def test_interpret_every_shape_f32(rand, shape, segments):
  _check(rand, shape, segments)


@pytest.mark.slow
def test_interpret_bf16(rand):
  _check(rand, (2, 40, 16, 8, 16), segments=False, dtype=jnp.bfloat16)


def test_default_blocks_fit_v5e_vmem():
  assert tpu.vmem_bytes(tpu.BLOCK_D, tpu.CHUNK, 16, 4) < VMEM_LIMIT


def test_dispatch_on_tpu(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  call = dict(u=jax.ShapeDtypeStruct((1, 64, 256), jnp.bfloat16), A=None)
  assert _dispatch.resolve("selective_scan", "auto", call) is tpu.selective_scan_pallas
  bad = dict(call, u=jax.ShapeDtypeStruct((1, 64, 96), jnp.bfloat16))
  assert _dispatch.resolve("selective_scan", "auto", bad).__name__ == "_selective_scan_xla"
  with pytest.raises(ValueError, match="impl='pallas' does not support this call: D=96"):
    _dispatch.resolve("selective_scan", "pallas", bad)
