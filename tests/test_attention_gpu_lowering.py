"""The Mosaic GPU attention kernels lower to Mosaic GPU on any machine (cross-platform
lowering for "cuda"): catches layout-inference, shared-memory-shape and tracing errors without
a GPU. Running them is checked on the device (`tests/gpu/`). ~2 s a case on 2 cores."""

import jax
import jax.numpy as jnp
import pytest

from longax.kernels.attention import AttnSpec
from longax.kernels.gpu import attention as gpu

# (kind, causal, window, sinks, softcap, segments, T, S, H, Hkv, D)
CASES = [
    ("softmax", True, None, 0, None, False, 256, 256, 4, 2, 128),
    ("softmax", False, None, 0, None, False, 256, 256, 4, 2, 128),
    ("softmax", False, None, 0, None, True, 192, 192, 2, 1, 64),
    ("softmax", True, 100, 4, 20.0, True, 300, 300, 4, 1, 64),
    ("softmax", True, 200, 70, None, False, 600, 600, 4, 2, 128),  # sink prefix + window split
    ("sigmoid", True, None, 0, None, False, 200, 456, 4, 2, 128),
    ("sigmoid", False, 64, 0, None, False, 256, 256, 2, 2, 64),
    ("softmax", True, None, 0, None, False, 128, 128, 2, 2, 256),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_lowers_forward_and_backward(case):
  kind, causal, window, sinks, softcap, segments, t, s, h, hkv, d = case
  spec = AttnSpec(kind, causal, d**-0.5, window, sinks, softcap, -3.0 if kind == "sigmoid" else 0.0)
  q = jnp.zeros((1, t, h, d), jnp.bfloat16)
  k = jnp.zeros((1, s, hkv, d), jnp.bfloat16)
  seg = (jnp.zeros((1, t), jnp.int32), jnp.zeros((1, s), jnp.int32)) if segments else (None, None)

  def loss(q, k, v):
    o = gpu.attention_pallas(q, k, v, None, None, *seg, spec)
    return o.astype(jnp.float32).sum()

  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k).lower(
      lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()
