"""selective_scan / selective_scan_step against the token-by-token reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close, compare
from longax.kernels import selective_scan, selective_scan_step

SHAPES = [(2, 13, 6, 4, 16), (1, 45, 8, 3, 16), (2, 32, 4, 4, 8)]  # (B, L, D, N, chunk)


def _inputs(rand, b, l, d, n, dtype=jnp.float32):
  return dict(u=rand.normal((b, l, d), dtype), delta=rand.normal((b, l, d), dtype, 0.5),
              A=-jnp.exp(rand.normal((d, n), scale=0.5)), B=rand.normal((b, l, n), dtype),
              C=rand.normal((b, l, n), dtype), z=rand.normal((b, l, d), dtype),
              D=rand.normal((d,)), delta_bias=rand.normal((d,), scale=0.1),
              h0=rand.normal((b, d, n)))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("options", ["plain", "full", "full+segments"])
def test_xla_matches_reference_f32(rand, shape, options):
  b, l, d, n, chunk = shape
  x = _inputs(rand, b, l, d, n)
  seg = rand.segments(b, l, 3) if "segments" in options else None
  names = ["u", "delta", "A", "B", "C"] + (["z", "D", "delta_bias", "h0"] if options != "plain" else [])

  def fn(impl):
    def f(*arrays):
      a = dict(zip(names, arrays))
      return selective_scan(a["u"], a["delta"] if "z" in a else jax.nn.softplus(a["delta"]),
                            a["A"], a["B"], a["C"], D=a.get("D"), z=a.get("z"),
                            delta_bias=a.get("delta_bias"), delta_softplus="z" in a,
                            initial_state=a.get("h0"), segment_ids=seg, chunk_size=chunk,
                            return_final_state=True, impl=impl)
    return f

  args = [x[k] for k in names]
  compare(fn("xla"), fn("reference"), args, tuple(range(len(args))), jnp.float32, options)


def test_xla_matches_reference_bf16(rand):
  x = _inputs(rand, 2, 40, 8, 4, jnp.bfloat16)
  f = lambda impl: lambda u, delta, B, C, z: selective_scan(
      u, delta, x["A"], B, C, D=x["D"], z=z, delta_softplus=True, chunk_size=16, impl=impl)
  args = [x[k] for k in ("u", "delta", "B", "C", "z")]
  compare(f("xla"), f("reference"), args, (0, 1, 2, 3, 4), jnp.bfloat16)
  assert f("auto")(*args).dtype == jnp.bfloat16


def test_reference_by_hand(rand):
  """One channel, one state: h_t = e^{dt a} h_{t-1} + dt b_t u_t, y = c_t h_t."""
  x = _inputs(rand, 1, 5, 1, 1)
  dt = jax.nn.softplus(x["delta"])
  h, ys = 0.0, []
  for t in range(5):
    h = jnp.exp(dt[0, t, 0] * x["A"][0, 0]) * h + dt[0, t, 0] * x["B"][0, t, 0] * x["u"][0, t, 0]
    ys.append(x["C"][0, t, 0] * h)
  for impl in ("reference", "xla"):
    y = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], delta_softplus=True,
                       chunk_size=2, impl=impl)
    assert_close(y[0, :, 0], jnp.stack(ys))


def test_step_chain_equals_parallel(rand):
  b, l, d, n = 2, 9, 6, 4
  x = _inputs(rand, b, l, d, n)
  kw = dict(D=x["D"], delta_bias=x["delta_bias"], delta_softplus=True)
  y, final = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], z=x["z"],
                            initial_state=x["h0"], return_final_state=True, chunk_size=4,
                            impl="xla", **kw)
  state, ys = x["h0"], []
  step = jax.jit(lambda *a, z: selective_scan_step(*a, z_t=z, **kw))
  for t in range(l):
    y_t, state = step(x["u"][:, t], x["delta"][:, t], x["A"], x["B"][:, t], x["C"][:, t],
                      state, z=x["z"][:, t])
    ys.append(y_t)
  assert_close(jnp.stack(ys, 1), y)
  assert_close(state, final)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_packed_row_equals_documents(rand, impl):
  x = _inputs(rand, 1, 20, 4, 3)
  seg = jnp.array([[1] * 6 + [2] * 14])
  run = lambda sl, **kw: selective_scan(x["u"][:, sl], x["delta"][:, sl], x["A"],
                                        x["B"][:, sl], x["C"][:, sl], delta_softplus=True,
                                        chunk_size=8, impl=impl, return_final_state=True, **kw)
  y, final = run(slice(None), segment_ids=seg, initial_state=x["h0"])
  y0, _ = run(slice(0, 6), initial_state=x["h0"])
  y1, f1 = run(slice(6, 20))
  assert_close(y[:, :6], y0)
  assert_close(y[:, 6:], y1)
  assert_close(final, f1)


def test_long_sequence_grad_is_finite(rand):
  x = _inputs(rand, 1, 4096, 4, 4)
  f = jax.jit(jax.grad(lambda u: selective_scan(u, x["delta"], x["A"], x["B"], x["C"],
                                                delta_softplus=True, impl="xla").sum()))
  assert np.all(np.isfinite(np.asarray(f(x["u"]))))


def test_pallas_needs_hopper(rand):
  x = _inputs(rand, 1, 4, 2, 2)
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="needs a Hopper GPU"):
      selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], impl="pallas")


BAD = [
    (dict(u=lambda a: a[0]), "`u` must have rank 3"),
    (dict(A=lambda a: a[:, :, None]), "`A` must have rank 2"),
    (dict(A=lambda a: a[:3]), "`A` must have shape \\(4, 3\\) \\[D, N\\] with D=4 from u"),
    (dict(delta=lambda a: a[:, :5]), "`delta` must have shape"),
    (dict(B=lambda a: a[..., :2]), "`B` must have shape"),
    (dict(C=lambda a: a.astype(jnp.bfloat16)), "share one dtype"),
    (dict(D=lambda a: a[:2]), "`D` must have shape"),
    (dict(h0=lambda a: a[:, :, :1]), "`initial_state` must have shape"),
]


@pytest.mark.parametrize("mangle,msg", BAD, ids=[b[1] for b in BAD])
def test_bad_input_errors(rand, mangle, msg):
  x = _inputs(rand, 2, 8, 4, 3)
  for k, f in mangle.items():
    x[k] = f(x[k])
  with pytest.raises(ValueError, match=msg):
    selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], initial_state=x["h0"])
