"""Attention kernels side by side on one GPU: TFLOP/s against sequence length.

    python -m longax.benchmarks.attention --json out.json --png out.png
    python -m longax.benchmarks.attention --lengths 4096 --dims 128 --causal 1 --impls pallas,cudnn

Rows: longax `pallas` (Mosaic GPU kernel), `sigmoid` (longax's sigmoid_attention kernel, same
shape), cuDNN (`jax.nn.dot_product_attention(implementation="cudnn")`), jla's Mosaic GPU
`flash_attention` (causal only), tokamax, and longax's `xla` path. Each row is checked against
longax's float32 XLA path on the same inputs (`err`), then timed (median of `--reps`, after
warm-up) forward and forward+backward. FLOPs the FlashAttention way: 4*B*H*N*N*D forward,
halved if causal, x3.5 for forward+backward. A peer that cannot run is reported with its reason.
Batch is chosen so B*N = 16k tokens (B=8 at 2k ... B=1 at 16k, 32k), H=16, Hkv=16 unless
`--gqa`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from longax import kernels as K
from longax.benchmarks.kernels import _median_ms, _to_np, jax_row

IMPLS = ("pallas", "sigmoid", "cudnn", "jla", "tokamax", "xla")


def _row(impl, causal, window, gqa_args):
  """(name, f(q, k, v)) for one implementation, or raises with the reason it cannot run."""
  opts = dict(causal=causal, window=window)
  if impl in ("pallas", "xla"):
    return lambda q, k, v: K.attention(q, k, v, impl=impl, **opts)
  if impl == "sigmoid":
    return lambda q, k, v: K.sigmoid_attention(q, k, v, impl="pallas", **opts)
  if impl == "cudnn":
    win = None if window is None else (window - 1, 0)
    return lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, local_window_size=win, implementation="cudnn")
  if impl == "jla":
    if not causal:
      raise ValueError("jla's flash_attention is causal only")
    from jla.ops.mosaic_gpu.attention import flash_attention
    return lambda q, k, v: flash_attention(q, k, v, sliding_window=window)
  if impl == "tokamax":
    import tokamax
    if window is not None:
      raise ValueError("window rows: not mapped for tokamax")
    return lambda q, k, v: tokamax.dot_product_attention(q, k, v, is_causal=causal)
  raise ValueError(impl)


def run(lengths, dims, causals, impls, dtype, reps, heads, kv_heads, window=None, tokens=16384,
        stream=None):
  results = []
  for d in dims:
    for causal in causals:
      for n in lengths:
        b = max(1, tokens // n)
        ks = jax.random.split(jax.random.key(n + d), 3)
        q = jax.random.normal(ks[0], (b, n, heads, d), dtype)
        k = jax.random.normal(ks[1], (b, n, kv_heads, d), dtype)
        v = jax.random.normal(ks[2], (b, n, kv_heads, d), dtype)
        flops = 4 * b * heads * n * n * d / (2 if causal else 1)
        if window is not None:
          flops = 4 * b * heads * n * min(window, n) * d  # ~ visible pairs
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        want = {}
        for impl in impls:
          rec = dict(N=n, B=b, H=heads, Hkv=kv_heads, D=d, causal=causal, window=window,
                     impl=impl)
          try:
            kind = "sigmoid" if impl == "sigmoid" else "softmax"
            if kind not in want:
              ref_fn = K.sigmoid_attention if kind == "sigmoid" else K.attention
              want[kind] = _to_np(jax.jit(lambda q, k, v: ref_fn(
                  q, k, v, causal=causal, window=window, impl="xla"))(*f32))
            row = jax_row(impl, _row(impl, causal, window, None), (q, k, v))
            got = _to_np(row.fwd())
            rec["err"] = float(np.linalg.norm(got - want[kind]) / np.linalg.norm(want[kind]))
            rec["fwd_ms"] = _median_ms(row.fwd, reps)
            rec["fwd_bwd_ms"] = _median_ms(row.fwd_bwd, reps)
            rec["fwd_tflops"] = flops / rec["fwd_ms"] / 1e9
            rec["fwd_bwd_tflops"] = 3.5 * flops / rec["fwd_bwd_ms"] / 1e9
          except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
          results.append(rec)
          if stream is not None:
            print(json.dumps(rec), file=stream, flush=True)
  return results


VARIANTS = {  # name: (options of longax's attention, KV heads); --variants times each at one N
    "dense": (dict(), 16),
    "window": (dict(window=4096), 16),
    "window+sinks": (dict(window=4096, sinks=4), 16),
    "softcap+gqa": (dict(softcap=30.0), 4),
    "segments+window": (dict(segments=8, window=4096), 16),
}


def _visible_pairs(n, opts, seg):
  """Exactly counted visible (query, key) pairs per (batch row, head), summed over rows."""
  from longax.kernels.visibility import visible
  pos = jnp.arange(n, dtype=jnp.int32)
  total = 0
  for lo in range(0, n, 2048):
    q_seg = None if seg is None else seg[:, lo:lo + 2048]
    m = visible(pos[lo:lo + 2048], pos, causal=True, window=opts.get("window"),
                sinks=opts.get("sinks", 0), q_seg=q_seg, k_seg=seg)
    total += int(jnp.sum(m))  # summed over batch rows when segments give a batch axis
  return total


def run_variants(n, d, kinds, dtype, reps, heads, tokens=16384, stream=None):
  """Each VARIANTS entry at sequence length n: ms and TFLOP/s of the visible pairs, and
  its speed (TFLOP/s) over the dense causal one of the same kind."""
  results = []
  b = max(1, tokens // n)
  for kind in kinds:
    op = K.sigmoid_attention if kind == "sigmoid" else K.attention
    dense = None
    for name, (opts, kv_heads) in VARIANTS.items():
      if kind == "sigmoid" and ("sinks" in opts or "softcap" in opts):
        continue
      opts = dict(opts)
      ks = jax.random.split(jax.random.key(n + d), 4)
      q = jax.random.normal(ks[0], (b, n, heads, d), dtype)
      k = jax.random.normal(ks[1], (b, n, kv_heads, d), dtype)
      v = jax.random.normal(ks[2], (b, n, kv_heads, d), dtype)
      n_docs = opts.pop("segments", None)
      seg = None
      if n_docs:
        cuts = jnp.sort(jax.random.randint(ks[3], (b, n_docs - 1), 1, n), axis=1)
        seg = jnp.sum(jnp.arange(n)[None, :, None] >= cuts[:, None, :], axis=-1).astype(jnp.int32)
      pairs = _visible_pairs(n, opts, seg) * (1 if seg is not None else b)
      flops = 4 * heads * d * pairs
      rec = dict(kind=kind, variant=name, N=n, B=b, H=heads, Hkv=kv_heads, D=d, impl="pallas")
      try:
        row = jax_row(name, lambda q, k, v: op(q, k, v, impl="pallas", segment_ids=seg, **opts),
                      (q, k, v))
        want = _to_np(jax.jit(lambda q, k, v: op(q, k, v, impl="xla", segment_ids=seg, **opts))(
            *(x.astype(jnp.float32) for x in (q, k, v))))
        got = _to_np(row.fwd())
        rec["err"] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        rec["fwd_ms"] = _median_ms(row.fwd, reps)
        rec["fwd_bwd_ms"] = _median_ms(row.fwd_bwd, reps)
        rec["fwd_bwd_tflops"] = 3.5 * flops / rec["fwd_bwd_ms"] / 1e9
        if name == "dense":
          dense = rec
        elif dense is not None:
          rec["speed_vs_dense"] = rec["fwd_bwd_tflops"] / dense["fwd_bwd_tflops"]
      except Exception as e:  # noqa: BLE001
        rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
      results.append(rec)
      if stream is not None:
        print(json.dumps(rec), file=stream, flush=True)
  return results


def ratios(results):
  """Per (D, causal, N): pallas and sigmoid fwd+bwd time over the faster of cuDNN and jla."""
  out = []
  keyf = lambda r: (r["D"], r["causal"], r["N"])
  groups = {}
  for r in results:
    groups.setdefault(keyf(r), {})[r["impl"]] = r
  for key, g in sorted(groups.items()):
    peers = [g[p]["fwd_bwd_ms"] for p in ("cudnn", "jla") if "fwd_bwd_ms" in g.get(p, {})]
    fpeers = [g[p]["fwd_ms"] for p in ("cudnn", "jla") if "fwd_ms" in g.get(p, {})]
    rec = dict(D=key[0], causal=key[1], N=key[2])
    for impl in ("pallas", "sigmoid"):
      if peers and "fwd_bwd_ms" in g.get(impl, {}):
        rec[f"{impl}_fwd_bwd_vs_best_peer"] = min(peers) / g[impl]["fwd_bwd_ms"]
        rec[f"{impl}_fwd_vs_best_peer"] = min(fpeers) / g[impl]["fwd_ms"]
      if "fwd_bwd_ms" in g.get("cudnn", {}) and "fwd_bwd_ms" in g.get(impl, {}):
        rec[f"{impl}_fwd_bwd_vs_cudnn"] = g["cudnn"]["fwd_bwd_ms"] / g[impl]["fwd_bwd_ms"]
    out.append(rec)
  return out


def plot(results, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  panels = sorted({(r["D"], r["causal"]) for r in results})
  fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 7), squeeze=False)
  for j, (d, causal) in enumerate(panels):
    for i, metric in enumerate(("fwd_tflops", "fwd_bwd_tflops")):
      ax = axes[i][j]
      for impl in sorted({r["impl"] for r in results}):
        pts = sorted((r["N"], r[metric]) for r in results
                     if r["impl"] == impl and r["D"] == d and r["causal"] == causal and metric in r)
        if pts:
          ax.plot(*zip(*pts), marker="o", label=impl)
      ax.set_xscale("log", base=2)
      ax.set_title(f"D={d} {'causal' if causal else 'non-causal'} {metric.split('_t')[0]}")
      ax.set_xlabel("sequence length N")
      ax.set_ylabel("TFLOP/s")
      ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  ints = lambda s: [int(x) for x in s.split(",")]
  p.add_argument("--lengths", type=ints, default=[2048, 4096, 8192, 16384, 32768])
  p.add_argument("--dims", type=ints, default=[64, 128])
  p.add_argument("--causal", type=ints, default=[1, 0], help="1, 0 or 1,0")
  p.add_argument("--impls", default=",".join(IMPLS))
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--kv-heads", type=int, default=16)
  p.add_argument("--window", type=int, default=None)
  p.add_argument("--tokens", type=int, default=16384, help="B = max(1, tokens // N)")
  p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
  p.add_argument("--reps", type=int, default=10)
  p.add_argument("--variants", type=int, default=None, metavar="N",
                 help="instead: time each option variant (window, sinks, softcap+GQA, "
                      "segments+window) at length N against dense causal")
  p.add_argument("--json", default=None)
  p.add_argument("--png", default=None)
  a = p.parse_args(argv)
  if a.variants:
    results = run_variants(a.variants, a.dims[-1], ["softmax", "sigmoid"], jnp.dtype(a.dtype),
                           a.reps, a.heads, a.tokens, stream=sys.stdout)
    if a.json:
      meta = dict(date=datetime.date.today().isoformat(), device=str(jax.devices()[0].device_kind),
                  jax=jax.__version__, dtype=a.dtype, reps=a.reps)
      with open(a.json, "w") as f:
        json.dump(dict(meta=meta, variants=results), f, indent=1)
    return 0
  impls = a.impls.split(",")
  bad = set(impls) - set(IMPLS)
  if bad:
    p.error(f"unknown --impls {sorted(bad)}; valid: {','.join(IMPLS)}")
  results = run(a.lengths, a.dims, [bool(c) for c in a.causal], impls, jnp.dtype(a.dtype),
                a.reps, a.heads, a.kv_heads, a.window, a.tokens, stream=sys.stdout)
  meta = dict(date=datetime.date.today().isoformat(), device=str(jax.devices()[0].device_kind),
              jax=jax.__version__, dtype=a.dtype, reps=a.reps,
              command="python -m longax.benchmarks.attention " + " ".join(argv or sys.argv[1:]))
  summary = ratios(results)
  for r in summary:
    print(json.dumps(r))
  if a.json:
    with open(a.json, "w") as f:
      json.dump(dict(meta=meta, results=results, ratios=summary), f, indent=1)
  if a.png:
    plot(results, a.png)
  return 0


if __name__ == "__main__":
  sys.exit(main())
