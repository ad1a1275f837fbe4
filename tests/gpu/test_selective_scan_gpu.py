"""The Mosaic GPU selective scan (impl="pallas") against the float32 reference: forward and
every gradient (u, delta, A, B, C, D, z, delta_bias, initial state), ragged L, segments
(segment_ids), sequence splits, bf16 and f32, d_state 8 and 16. Runs on a Hopper GPU;
skipped elsewhere.

    python -m pytest -q tests/gpu/test_selective_scan_gpu.py      # on the device
"""

import jax
import jax.numpy as jnp
import pytest

from conftest import assert_close, compare, needs_hopper
from longax.kernels import selective_scan
from longax.kernels.gpu import selective_scan as gpu
from longax.kernels.selective_scan import selective_scan_reference

pytestmark = needs_hopper()

TOL = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2}


def _inputs(rand, b, l, d, n, dtype):
  return dict(u=rand.normal((b, l, d), dtype), delta=rand.normal((b, l, d), dtype, 0.5),
              A=-jnp.exp(rand.normal((d, n), scale=0.5)), B=rand.normal((b, l, n), dtype),
              C=rand.normal((b, l, n), dtype), z=rand.normal((b, l, d), dtype),
              D=rand.normal((d,)), delta_bias=rand.normal((d,), scale=0.1) - 1.0,
              h0=rand.normal((b, d, n)))


# (B, L, D, N, options): L=256 splits into 4 segments (2 channel blocks x 2 rows), L=300 is
# ragged (19 tiles: one segment), L=1000 ragged in 9 segments, N=8 packs two tokens per row.
CASES = [
    ((2, 256, 256, 16), "plain"),
    ((2, 256, 256, 16), "full"),
    ((1, 300, 128, 16), "full+segments"),
    ((1, 1000, 128, 8), "full+segments"),
    ((1, 1000, 256, 16), "plain"),
]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("shape,options", CASES, ids=str)
def test_pallas_matches_reference(rand, shape, options, dtype):
  if dtype == jnp.float32 and shape[1] == 1000 and shape[3] == 16:
    pytest.skip("f32: the shorter shapes")
  b, l, d, n = shape
  x = _inputs(rand, b, l, d, n, dtype)
  seg = rand.segments(b, l, 4) if "segments" in options else None
  full = options != "plain"
  names = ["u", "delta", "A", "B", "C"] + (["z", "D", "delta_bias", "h0"] if full else [])

  def fn(impl):
    def f(*arrays):
      a = dict(zip(names, arrays))
      return selective_scan(a["u"], a["delta"], a["A"], a["B"], a["C"], D=a.get("D"),
                            z=a.get("z"), delta_bias=a.get("delta_bias"), delta_softplus=True,
                            initial_state=a.get("h0"), segment_ids=seg,
                            return_final_state=True, impl=impl)
    return f

  args = [x[k] for k in names]
  compare(fn("pallas"), fn("reference"), args, tuple(range(len(args))), TOL[dtype],
          f"{shape} {options}")


@pytest.mark.parametrize("segments", [1, 2, 5])
def test_kernel_segments(rand, segments):
  """The kernel's own contract (dt given) with the sequence split forced, and resets."""
  b, l, d, n = 2, 320, 128, 16  # 20 tiles
  x = _inputs(rand, b, l, d, n, jnp.float32)
  dt = jax.nn.softplus(x["delta"] - 1.0)
  resets = jnp.zeros((b, l), bool).at[:, 77].set(True).at[1, 150].set(True)

  def f(impl):
    def g(u, dt, A, Bm, Cm, h0):
      if impl == "pallas":
        return gpu.selective_scan_pallas(u, dt, A, Bm, Cm, h0, resets, segments=segments)
      return selective_scan_reference(u, dt, A, Bm, Cm, h0, resets)
    return g

  args = (x["u"], dt, x["A"], x["B"], x["C"], x["h0"])
  compare(f("pallas"), f("reference"), args, tuple(range(6)), 1e-4, f"segments={segments}")


def test_auto_takes_the_kernel(rand):
  x = _inputs(rand, 1, 64, 128, 16, jnp.bfloat16)
  call = dict(u=x["u"], A=x["A"], backend="gpu")
  assert gpu.unsupported(call) is None
  assert gpu.unsupported(dict(call, A=x["A"][:, :4])) is not None
  y = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], delta_softplus=True)
  r = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], delta_softplus=True,
                     impl="reference")
  assert_close(y, r, jnp.bfloat16)
