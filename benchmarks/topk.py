"""`kernels.top_k`'s forms side by side on a Hopper GPU: XLA's lax.top_k, the two stages
(`top_k_staged`) and the Mosaic GPU kernel per chunk width; float32 rows, random normal with
40% -inf entries (as causal scores have); device ms per call from a profiler trace. Each
kernel row is checked equal to lax.top_k (values and indices; "WRONG" where not).

    python -m longax.benchmarks.topk [--shapes 65536x1024,16384x256] [--k 16] [--chunks 128,64]
"""

from __future__ import annotations

import argparse
import sys


def _shapes(text: str):
  try:
    shapes = [tuple(int(n) for n in s.split("x")) for s in text.split(",")]
  except ValueError:
    shapes = []
  if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
    raise ValueError(f"--shapes {text!r}: comma-separated ROWSxN, e.g. 65536x1024,16384x256")
  return shapes


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m longax.benchmarks.topk", description=__doc__.split("\n\n")[0])
  p.add_argument("--shapes", default="65536x1024,16384x1024,16384x256,4096x256")
  p.add_argument("--k", type=int, default=16)
  p.add_argument("--chunks", default="128,64", help="the kernel's chunk widths (multiples of 64)")
  p.add_argument("--reps", type=int, default=5)
  a = p.parse_args(argv)
  try:
    shapes = _shapes(a.shapes)
    chunks = [int(c) for c in a.chunks.split(",")]
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if any(c < 64 or c % 64 for c in chunks):
    print(f"error: --chunks {a.chunks}: multiples of 64", file=sys.stderr)
    return 2
  import jax
  import jax.numpy as jnp
  from longax.benchmarks.profile import device_time
  from longax.kernels import topk
  from longax.kernels.gpu import topk as gpu_topk
  probe = jnp.zeros((1, max(a.k, 1)), jnp.float32)
  if (why := gpu_topk.top_k_unsupported(probe, a.k)) is not None:
    print(f"error: the top-k kernel does not run here: {why}", file=sys.stderr)
    return 2
  print(f"# {jax.devices()[0].device_kind}, float32, k={a.k}, device ms per call", flush=True)
  for r, n in shapes:
    x = jax.random.normal(jax.random.key(r + n), (r, n), jnp.float32)
    x = jnp.where(jax.random.uniform(jax.random.key(1), (r, n)) < 0.4, -jnp.inf, x)
    want = jax.lax.top_k(x, a.k)
    forms = [("lax.top_k", lambda x: jax.lax.top_k(x, a.k)),
             ("staged", lambda x: topk.top_k_staged(x, a.k))]
    forms += [(f"kernel/{c}", lambda x, c=c: gpu_topk.top_k_pallas(x, a.k, c)) for c in chunks]
    out = []
    for name, f in forms:
      f = jax.jit(f)
      got = f(x)
      ok = bool(jnp.all(got[0] == want[0]) & jnp.all(got[1] == want[1]))
      ms = device_time(lambda: f(x), a.reps)["total_ms_per_step"]
      out.append(f"{name} {ms:.3f}{'' if ok else ' WRONG'}")
    print(f"[{r}, {n}]: " + "  ".join(out), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
