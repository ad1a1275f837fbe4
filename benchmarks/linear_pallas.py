"""The linear-attention kernel against jla, fwd and fwd+bwd, with kernel variants (GPU).

    python -m longax.benchmarks.linear_pallas --shapes 2,8192,16,128 1,32768,16,64 \
        --decays none,scalar,key

Each row: longax's kernel (and, for scalar decay, the kernel without the sequence split) and
jla's `simple_gla` / `gla` in the same process, median of `--reps` timed calls after a warm-up,
as ms and as ratios to jla. `benchmarks/kernels.py` is the full side-by-side (fla, XLA path,
accuracy check); this is the quick one the kernel's NOTES.md attempts were measured with.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from longax.kernels.gpu import linear_attention as gpu


def _median_ms(f, *args, reps: int) -> float:
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))


def _timed(f, args, reps: int):
  loss = lambda *a: f(*a).astype(jnp.float32).sum()
  return (_median_ms(jax.jit(f), *args, reps=reps),
          _median_ms(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), *args, reps=reps))


def rows(b, t, h, d, decay: str, reps: int) -> dict[str, tuple[float, float]]:
  """{name: (fwd ms, fwd+bwd ms)} for one shape and decay form ("none", "scalar", "key")."""
  ks = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(kk, (b, t, h, d), jnp.bfloat16) * d**-0.25 for kk in ks[:3])
  g = {"none": jnp.zeros((b, t, h)),
       "scalar": -jax.nn.softplus(jax.random.normal(ks[3], (b, t, h))),
       "key": -jax.nn.softplus(jax.random.normal(ks[3], (b, t, h, d))) / 8}[decay]
  variants = {"pallas": gpu.Config()}
  if decay == "scalar":
    variants["pallas-nosplit"] = gpu.Config(pieces=1)
  out = {}
  for name, cfg in variants.items():
    def f(q, k, v, g, cfg=cfg):
      gg = None if decay == "none" else (g if g.ndim == 4 else g[..., None])
      return gpu.linear_attention_pallas(q, k, v, gg, jnp.zeros((b, h, d, d)), None, d**-0.5,
                                         config=cfg)[0]
    out[name] = _timed(f, (q, k, v, g), reps)
  try:
    from jla.ops import linear_attention as jla_la
    kind = "gla" if decay == "key" else "simple_gla"
    out["jla"] = _timed(lambda q, k, v, g: jla_la(kind, q, k, v, g=g, scale=d**-0.5,
                                                  impl="auto")[0], (q, k, v, g), reps)
  except Exception as e:  # noqa: BLE001  a missing peer is reported, not fatal
    print(f"# jla unavailable: {e!r}", file=sys.stderr)
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shapes", nargs="+", default=["2,8192,16,128"], help="B,T,H,D ...")
  p.add_argument("--decays", default="none,scalar,key")
  p.add_argument("--reps", type=int, default=20)
  a = p.parse_args(argv)
  if jax.default_backend() != "gpu":
    raise SystemExit("error: linear_pallas times the Mosaic GPU kernel: it needs a Hopper GPU")
  for shape in a.shapes:
    b, t, h, d = (int(x) for x in shape.split(","))
    for decay in a.decays.split(","):
      r = rows(b, t, h, d, decay, a.reps)
      base = r.get("jla")
      for name, (fwd, fb) in r.items():
        ratio = f"  vs jla fwd {base[0] / fwd:.2f}x fwd+bwd {base[1] / fb:.2f}x" if base else ""
        print(f"B{b} T{t} H{h} D{d} {decay:7s} {name:16s} fwd {fwd:.3f} ms  "
              f"fwd+bwd {fb:.3f} ms{ratio}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
