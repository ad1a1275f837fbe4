"""The Mosaic GPU attention kernel (impl="pallas") against the float32 reference, forward and
every gradient, on ragged shapes and every option. Runs on a Hopper GPU; skipped elsewhere.

    python -m pytest -q tests/gpu        # on the device
"""

import jax
import jax.numpy as jnp
import pytest

from conftest import compare, needs_hopper
from longax.kernels import attention, sigmoid_attention

pytestmark = needs_hopper()

# (B, T, S, H, Hkv, D)
BASE = (2, 512, 512, 4, 2, 128)
RAGGED = (1, 300, 300, 4, 1, 64)  # T, S not multiples of any block; MQA
T_LT_S = (1, 200, 456, 4, 2, 128)  # bottom-right causal, queries start mid-cache
T_GT_S = (1, 333, 150, 2, 2, 64)  # the first queries see no key
WIDE = (1, 256, 256, 2, 2, 256)  # D=256: kernel forward, XLA backward
LONG = (1, 1000, 1000, 2, 1, 128)  # window tiles skip the middle blocks
CASES = [
    (BASE, dict()), (RAGGED, dict()), (T_LT_S, dict()), (T_GT_S, dict()), (WIDE, dict()),
    (BASE, dict(causal=False)), (RAGGED, dict(causal=False)), (T_LT_S, dict(causal=False)),
    (BASE, dict(window=100)), (RAGGED, dict(window=37, causal=False)),
    (RAGGED, dict(window=70, sinks=5)), (T_LT_S, dict(window=129, sinks=64)),
    (BASE, dict(softcap=5.0)), (RAGGED, dict(softcap=3.0, window=90)),
    (BASE, dict(segments=3)), (RAGGED, dict(segments=4, window=50)),
    (BASE, dict(scale=0.3)),
    (LONG, dict(window=200, sinks=70)), (LONG, dict(window=300)), (LONG, dict(window=256, sinks=1)),
]
KINDS = {"softmax": attention, "sigmoid": sigmoid_attention}


def _inputs(rand, shape, dtype, segments):
  b, t, s, h, hkv, d = shape
  q, k, v = (rand.normal(sh, dtype) for sh in ((b, t, h, d), (b, s, hkv, d), (b, s, hkv, d)))
  seg = rand.segments(b, t, segments) if segments else None
  return q, k, v, seg


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape,opts", CASES, ids=str)
def test_pallas_matches_reference(rand, kind, shape, opts, dtype):
  if kind == "sigmoid" and ("softcap" in opts or "sinks" in opts):
    pytest.skip("sigmoid attention has no softcap / sinks")
  if dtype == jnp.float16 and shape is not BASE:
    pytest.skip("f16: the base shape only")
  opts = dict(opts)
  q, k, v, seg = _inputs(rand, shape, dtype, opts.pop("segments", None))
  fn = lambda impl: (lambda q, k, v: KINDS[kind](q, k, v, segment_ids=seg, impl=impl, **opts))
  compare(fn("pallas"), fn("reference"), (q, k, v), (0, 1, 2), 2e-2, f"{kind} {shape} {opts}")


@pytest.mark.parametrize("kind", KINDS)
def test_auto_takes_the_kernel_where_covered(kind):
  """The auto choice, pinned: bf16/f16 and head dims 64/128/256 take the kernel; float32,
  other head dims and explicit positions fall back to XLA."""
  from longax.kernels._dispatch import resolve
  from longax.kernels.attention import AttnSpec
  from longax.kernels.gpu.attention import attention_pallas
  spec = AttnSpec(kind, True, 0.1, None, 0, None, 0.0)
  op = "attention" if kind == "softmax" else "sigmoid_attention"
  x = lambda d, dt=jnp.bfloat16: jnp.zeros((1, 128, 2, d), dt)
  call = lambda d, dt=jnp.bfloat16, **kw: dict(q=x(d, dt), k=x(d, dt), v=x(d, dt), spec=spec, **kw)
  assert resolve(op, "auto", call(128)) is attention_pallas
  assert resolve(op, "auto", call(64, jnp.float16)) is attention_pallas
  assert resolve(op, "auto", call(256)) is attention_pallas
  assert resolve(op, "auto", call(128, jnp.float32)) is not attention_pallas
  assert resolve(op, "auto", call(96)) is not attention_pallas
  assert resolve(op, "auto", call(128, explicit_positions=True)) is not attention_pallas
