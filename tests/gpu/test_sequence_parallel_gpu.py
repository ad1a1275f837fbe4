"""Sequence parallelism on several GPUs with the kernels inside `jax.shard_map`: ring
attention (its local calls and block gradients on the Mosaic GPU attention kernel), Ulysses
and LASP-2 (the linear-attention kernel with the incoming state) against the single-device
op, forward and gradients, bf16. Needs >= 2 Hopper GPUs; skipped elsewhere.

    python -m pytest -q tests/gpu/test_sequence_parallel_gpu.py   # on a 2-, 4- or 8-GPU device
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from conftest import compare, needs_hopper
from longax import kernels as K
from longax.kernels import sequence_parallel as SP

pytestmark = needs_hopper(2)

B, T, H, HKV, D = 1, 2048, 4, 2, 128


def _sp(local, p, n_args):
  mesh = Mesh(np.asarray(jax.devices()[:p]), ("sp",))
  return jax.shard_map(local, mesh=mesh, in_specs=(P(None, "sp"),) * n_args,
                       out_specs=P(None, "sp"))


def _p():
  return 4 if jax.device_count() >= 4 else 2


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_ring_on_the_kernel(rand, layout, kind):
  q, k, v = rand.normal((B, T, H, D), jnp.bfloat16), *(rand.normal((B, T, HKV, D), jnp.bfloat16)
                                                        for _ in range(2))
  p = _p()
  ring = _sp(lambda q, k, v: SP.ring_attention(q, k, v, axis_name="sp", kind=kind, layout=layout,
                                               impl="pallas"), p, 3)
  one = K.attention if kind == "softmax" else K.sigmoid_attention
  perm = (lambda x: SP.to_zigzag(x, p)) if layout == "zigzag" else (lambda x: x)
  unperm = (lambda x: SP.from_zigzag(x, p)) if layout == "zigzag" else (lambda x: x)
  got = lambda q, k, v: unperm(ring(perm(q), perm(k), perm(v)))
  compare(got, lambda q, k, v: one(q, k, v, impl="reference"), (q, k, v), (0, 1, 2),
          jnp.bfloat16, f"ring {kind} {layout} P={p}")


def test_ulysses_on_the_kernel(rand):
  q, k, v = rand.normal((B, T, H, D), jnp.bfloat16), *(rand.normal((B, T, HKV, D), jnp.bfloat16)
                                                        for _ in range(2))
  uly = _sp(lambda q, k, v: SP.ulysses_attention(q, k, v, axis_name="sp", impl="pallas"), _p(), 3)
  compare(uly, lambda q, k, v: K.attention(q, k, v, impl="reference"), (q, k, v), (0, 1, 2),
          jnp.bfloat16, "ulysses")


@pytest.mark.parametrize("decay,segments", [("token", 0), ("key", 0), ("token", 5),
                                            (None, 5)])
def test_lasp2_on_the_kernel(rand, decay, segments):
  """Scalar decays take the kernel's split backward (dS_in from its reverse pass), per-key
  decays the GEMM; packed documents cross the shard boundaries."""
  q, k, v = (rand.normal((B, T, H, D), jnp.bfloat16, 0.3) for _ in range(3))
  shape = (B, T, H) if decay != "key" else (B, T, H, D)
  g = -jax.nn.softplus(rand.normal(shape)) / (1 if decay != "key" else 8)
  seg = rand.segments(B, T, segments) if segments else jnp.zeros((B, T), jnp.int32)
  use = lambda g, s: dict(log_decay=g if decay else None, segment_ids=s if segments else None)
  lasp = _sp(lambda q, k, v, g, s: SP.lasp2_linear_attention(q, k, v, axis_name="sp",
                                                             impl="pallas", **use(g, s)), _p(), 5)
  one = lambda q, k, v, g: K.linear_attention(q, k, v, impl="reference", **use(g, seg))
  compare(lambda q, k, v, g: lasp(q, k, v, g, seg), one, (q, k, v, g),
          (0, 1, 2) + ((3,) if decay else ()), jnp.bfloat16, f"lasp2 {decay} {segments}")
