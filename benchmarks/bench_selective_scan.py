"""Mamba-1 selective scan timings on the GPU: longax pallas vs jla's Mosaic GPU kernel vs our
XLA path, bf16, fwd and fwd+bwd (grad w.r.t. u, delta, B, C), median of `--reps` after warmup.

    python benchmarks/bench_selective_scan.py --shapes 2,8192,2048,16 2,4096,1024,16
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from longax.kernels import selective_scan


def _time(f, args, reps):
  jax.block_until_ready(f(*args))
  jax.block_until_ready(f(*args))
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    ts.append(time.perf_counter() - t)
  return float(np.median(ts)) * 1e3


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--shapes", nargs="+", default=["2,4096,2048,16", "2,8192,2048,16",
                                                   "2,16384,2048,16"])
  p.add_argument("--impls", default="pallas,jla,xla")
  p.add_argument("--xla-max-len", type=int, default=4096)
  p.add_argument("--reps", type=int, default=20)
  a = p.parse_args()
  print(jax.devices()[0].device_kind, flush=True)
  for shape in a.shapes:
    b, l, d, n = map(int, shape.split(","))
    ks = jax.random.split(jax.random.key(0), 5)
    u = jax.random.normal(ks[0], (b, l, d), jnp.bfloat16)
    delta = (jax.random.normal(ks[1], (b, l, d)) * 0.5 - 2).astype(jnp.bfloat16)
    A = -jnp.exp(jax.random.normal(ks[2], (d, n)) * 0.5)
    Bm = jax.random.normal(ks[3], (b, l, n), jnp.bfloat16)
    Cm = jax.random.normal(ks[4], (b, l, n), jnp.bfloat16)
    fns = {}
    for impl in a.impls.split(","):
      if impl == "jla":
        try:
          from jla.ops import linear_attention as jla_la
        except ImportError as e:
          print("jla missing:", e)
          continue
        fns["jla"] = lambda u, delta, Bm, Cm, A=A: jla_la(
            "mamba1", Cm, Bm, u, dt=delta, a=A, dt_softplus=True)[0]
      elif impl != "xla" or l <= a.xla_max_len:
        fns[impl] = lambda u, delta, Bm, Cm, A=A, impl=impl: selective_scan(
            u, delta, A, Bm, Cm, delta_softplus=True, impl=impl)
    res = {}
    for name, f in fns.items():
      fwd = jax.jit(f)
      fb = jax.jit(jax.grad(lambda *x, f=f: f(*x).astype(jnp.float32).sum(), argnums=(0, 1, 2, 3)))
      try:
        t0 = time.perf_counter()
        tf = _time(fwd, (u, delta, Bm, Cm), a.reps)
        tb = _time(fb, (u, delta, Bm, Cm), a.reps)
        res[name] = (tf, tb)
        print(f"B={b} L={l} D={d} N={n} {name:7s} fwd {tf:8.3f} ms  fwd+bwd {tb:8.3f} ms"
              f"  (incl. compile {time.perf_counter() - t0:.0f} s)", flush=True)
      except Exception as e:  # noqa: BLE001
        print(f"B={b} L={l} D={d} N={n} {name}: failed {type(e).__name__}: {str(e)[:300]}")
    if "pallas" in res:
      for other in ("jla", "xla"):
        if other in res:
          (pf, pb), (of, ob) = res["pallas"], res[other]
          print(f"  pallas vs {other}: fwd {of / pf:.2f}x  fwd+bwd {ob / pb:.2f}x (>1: pallas faster)")


if __name__ == "__main__":
  main()
