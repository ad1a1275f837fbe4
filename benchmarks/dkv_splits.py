"""The dk/dv kernel's split across CTAs (`Blocks.bwd_splits`) on dense attention: the rule
(`bwd_splits=0`) against one CTA per key tile, fwd+bwd device time (Hopper GPU).

    python -m longax.benchmarks.dkv_splits [--shapes 1x1024,1x2048,1x4096,4x2048] [--reps 10]

Shapes are BxT with H16 Hkv4 D128 bf16, causal; the gradient call of a float32 vdot loss.
Device time is the sum of the traced kernels per call (`profile.device_time`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m longax.benchmarks.dkv_splits", description=__doc__.splitlines()[0])
  p.add_argument("--shapes", default="1x1024,1x2048,1x4096,4x2048", help="comma-separated BxT")
  p.add_argument("--reps", type=int, default=10)
  a = p.parse_args(argv)
  try:
    shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
    assert all(len(s) == 2 and min(s) >= 1 for s in shapes)
  except (ValueError, AssertionError):
    print(f"error: --shapes {a.shapes}: comma-separated BxT, e.g. 1x2048", file=sys.stderr)
    return 2
  import jax
  import jax.numpy as jnp
  if jax.default_backend() != "gpu":
    print("error: needs a Hopper GPU (the Mosaic GPU kernels)", file=sys.stderr)
    return 2
  from longax import kernels as K
  from longax.benchmarks.kernels import _attention_inputs
  from longax.benchmarks.profile import device_time
  from longax.kernels.gpu import attention as G
  base = G.TUNED[128]
  print("B T      rule_ms  one_cta_ms  one_cta/rule")
  for b, t in shapes:
    q, k, v = _attention_inputs(b, t, 16, 4, 128, jnp.bfloat16, seed=4)
    ct = jax.random.normal(jax.random.key(9), q.shape, jnp.float32)
    ms = []
    for blk in (base, dataclasses.replace(base, bwd_splits=1)):
      G.TUNED[128] = blk  # read when the call is traced
      try:
        grad = jax.jit(jax.grad(lambda ct, q, k, v: jnp.vdot(ct, K.attention(q, k, v).astype(jnp.float32)),
                                argnums=(1, 2, 3)))
        ms.append(device_time(lambda: grad(ct, q, k, v), a.reps)["total_ms_per_step"])
      finally:
        G.TUNED[128] = base
    print(f"{b} {t:<6} {ms[0]:8.4f}  {ms[1]:10.4f}  {ms[1] / ms[0]:12.3f}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
