"""ssd: Mamba-2 on top of linear_attention, checked against a naive recurrence."""

import jax
import jax.numpy as jnp
import pytest

from conftest import assert_close, compare
from longax.kernels import ssd, ssd_step


def naive_ssd(x, dt, A, B, C, D, h0):
  """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T; y_t = h_t C_t + D x_t, in plain loops."""
  b, t, h, p = x.shape
  rep = h // B.shape[2]
  B, C = jnp.repeat(B, rep, axis=2), jnp.repeat(C, rep, axis=2)
  state, ys = h0, []
  for i in range(t):
    a = jnp.exp(dt[:, i] * A)[:, :, None, None]
    state = a * state + (dt[:, i, :, None, None] * x[:, i, :, :, None] * B[:, i, :, None, :])
    ys.append(jnp.einsum("bhpn,bhn->bhp", state, C[:, i]) + D[:, None] * x[:, i])
  return jnp.stack(ys, 1), state


def _inputs(rand, b, t, h, p, g, n, dtype=jnp.float32):
  return (rand.normal((b, t, h, p), dtype), jax.nn.softplus(rand.normal((b, t, h))),
          -jnp.exp(rand.normal((h,), scale=0.5)), rand.normal((b, t, g, n), dtype),
          rand.normal((b, t, g, n), dtype), rand.normal((h,)), rand.normal((b, h, p, n)))


@pytest.mark.parametrize("shape", [(2, 13, 4, 3, 2, 4, 8), (1, 33, 2, 4, 1, 8, 16)], ids=str)
def test_ssd_matches_naive(rand, shape):
  b, t, h, p, g, n, chunk = shape
  x, dt, A, B, C, D, h0 = _inputs(rand, b, t, h, p, g, n)
  want_y, want_s = naive_ssd(x, dt, A, B, C, D, h0)
  for impl in ("reference", "xla"):
    y, s = ssd(x, dt, A, B, C, D=D, initial_state=h0, chunk_size=chunk,
               return_final_state=True, impl=impl)
    assert_close(y, want_y, what=impl)
    assert_close(s, want_s, what=impl)


def test_ssd_grads_xla_vs_reference(rand):
  x, dt, A, B, C, D, h0 = _inputs(rand, 2, 21, 4, 3, 2, 4)
  seg = rand.segments(2, 21, 2)
  f = lambda impl: lambda x, dt, A, B, C, D, h0: ssd(
      x, dt, A, B, C, D=D, initial_state=h0, segment_ids=seg, chunk_size=8,
      return_final_state=True, impl=impl)
  compare(f("xla"), f("reference"), (x, dt, A, B, C, D, h0), tuple(range(7)), jnp.float32)


def test_ssd_bf16(rand):
  x, dt, A, B, C, D, _ = _inputs(rand, 2, 40, 4, 8, 2, 8, jnp.bfloat16)
  got = ssd(x, dt, A, B, C, D=D, chunk_size=16, impl="xla")
  want, _ = naive_ssd(*(a.astype(jnp.float32) for a in (x, dt, A, B, C, D)),
                      jnp.zeros((2, 4, 8, 8)))
  assert got.dtype == jnp.bfloat16
  assert_close(got, want, jnp.bfloat16)


def test_ssd_step_chain_equals_parallel(rand):
  x, dt, A, B, C, D, h0 = _inputs(rand, 2, 7, 4, 3, 2, 4)
  y, final = ssd(x, dt, A, B, C, D=D, initial_state=h0, return_final_state=True, impl="xla")
  state, ys = h0, []
  for i in range(7):
    y_t, state = ssd_step(x[:, i], dt[:, i], A, B[:, i], C[:, i], state, D=D)
    ys.append(y_t)
  assert_close(jnp.stack(ys, 1), y)
  assert_close(state, final)


BAD = [
    (lambda a: dict(a, dt=a["dt"][..., :1]), "`dt` must have shape"),
    (lambda a: dict(a, A=a["A"][:3]), "`A` must have shape"),
    (lambda a: dict(a, B=a["B"][:, :, :, :2]), "`C` must have shape"),
    (lambda a: dict(a, B=jnp.concatenate([a["B"]] * 3, 2)[:, :, :3],
                    C=jnp.concatenate([a["C"]] * 3, 2)[:, :, :3]), "H=4 .* G=3"),
    (lambda a: dict(a, x=a["x"][0]), "`x` must have rank 4"),
]


@pytest.mark.parametrize("mangle,msg", BAD, ids=[b[1] for b in BAD])
def test_bad_input_errors(rand, mangle, msg):
  x, dt, A, B, C, _, _ = _inputs(rand, 2, 6, 4, 3, 2, 4)
  a = mangle(dict(x=x, dt=dt, A=A, B=B, C=C))
  with pytest.raises(ValueError, match=msg):
    ssd(a["x"], a["dt"], a["A"], a["B"], a["C"])


def test_state_shape_errors(rand):
  x, dt, A, B, C, _, _ = _inputs(rand, 2, 6, 4, 3, 2, 4)
  with pytest.raises(ValueError, match="`initial_state` must have shape \\(2, 4, 3, 4\\)"):
    ssd(x, dt, A, B, C, initial_state=jnp.zeros((2, 4, 4, 3)))
  with pytest.raises(ValueError, match="`state` must have shape \\(2, 4, 3, 4\\)"):
    ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], jnp.zeros((2, 4, 3, 3)))


@pytest.mark.parametrize("impl,err,msg", [
    ("pallas", ValueError, r"^longax.kernels.ssd: impl='pallas' does not support this call: the "
                           "Mosaic GPU kernel needs a GPU backend"),
    ("bogus", ValueError, r"^ssd: unknown impl='bogus'")])
def test_impl_errors_name_ssd(rand, impl, err, msg):
  x, dt, A, B, C, _, _ = _inputs(rand, 1, 4, 4, 3, 2, 4)
  with pytest.raises(err, match=msg):
    ssd(x, dt, A, B, C, impl=impl)
