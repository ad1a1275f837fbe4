"""Tunes the Mosaic GPU attention kernel's block sizes and pipeline depth per head dim.

    python -m longax.benchmarks.autotune_attention --json out.json

Times each candidate `Blocks` (forward: keys per block and ring slots; backward: ring slots)
on causal bf16 attention at one shape per head dim, checks it against the XLA path, and
prints the fastest as the `TUNED` table of `kernels/gpu/attention.py` (copy it there).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from longax import kernels as K
from longax.benchmarks.kernels import _median_ms, jax_row
from longax.kernels.attention import AttnSpec
from longax.kernels.gpu import attention as gpu


def candidates(d: int):
  base = gpu.TUNED[d]
  fwd_kv = (64,) if d > 128 else (64, 128)
  for bkv, st, bst in itertools.product(fwd_kv, (2, 3), (2, 3)):
    yield dataclasses.replace(base, block_kv=bkv, stages=st, bwd_stages=bst)


def tune(d: int, n: int, batch: int, heads: int, reps: int):
  ks = jax.random.split(jax.random.key(d), 3)
  q, k, v = (jax.random.normal(kk, (batch, n, heads, d), jnp.bfloat16) for kk in ks)
  spec = AttnSpec("softmax", True, d**-0.5, None, 0, None, 0.0)
  want = np.asarray(jax.jit(lambda q, k, v: K.attention(q, k, v, impl="xla"))(q, k, v),
                    np.float32)
  rows = []
  for blk in candidates(d):
    rec = dict(D=d, N=n, B=batch, H=heads, **dataclasses.asdict(blk))
    try:
      f = lambda q, k, v, blk=blk: gpu.attention_pallas(q, k, v, None, None, None, None, spec,
                                                        blocks=blk)
      row = jax_row("pallas", f, (q, k, v))
      got = np.asarray(row.fwd(), np.float32)
      rec["err"] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
      rec["fwd_ms"] = _median_ms(row.fwd, reps)
      if d <= gpu.MAX_BWD_HEAD_DIM:
        rec["fwd_bwd_ms"] = _median_ms(row.fwd_bwd, reps)
    except Exception as e:  # noqa: BLE001 - e.g. shared memory exceeded: reported, skipped
      rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    print(json.dumps(rec), flush=True)
    rows.append(rec)
  return rows


def best(rows):
  ok = [r for r in rows if "fwd_ms" in r and r["err"] < 2e-2]
  by_fwd = min(ok, key=lambda r: r["fwd_ms"])
  with_bwd = [r for r in ok if "fwd_bwd_ms" in r]
  by_bwd = min(with_bwd, key=lambda r: r["fwd_bwd_ms"]) if with_bwd else by_fwd
  fields = {f.name for f in dataclasses.fields(gpu.Blocks)}
  fwd_fields = ("block_q", "block_kv", "stages", "wgs", "pingpong")
  pick = {k: (by_fwd if k in fwd_fields else by_bwd)[k] for k in fields}
  return gpu.Blocks(**pick)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--dims", default="64,128,256")
  p.add_argument("--n", type=int, default=8192)
  p.add_argument("--tokens", type=int, default=16384, help="batch = tokens // n")
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--reps", type=int, default=10)
  p.add_argument("--json", default=None)
  a = p.parse_args(argv)
  rows, table = [], {}
  for d in (int(x) for x in a.dims.split(",")):
    r = tune(d, a.n, max(1, a.tokens // a.n), a.heads, a.reps)
    rows += r
    table[d] = best(r)
  print("TUNED: dict[int, Blocks] = {")
  for d, blk in table.items():
    print(f"    {d}: {blk!r},")
  print("}")
  if a.json:
    meta = dict(date=datetime.date.today().isoformat(), device=jax.devices()[0].device_kind,
                jax=jax.__version__, dtype="bfloat16", causal=True)
    with open(a.json, "w") as f:
      json.dump(dict(meta=meta, rows=rows, tuned={d: dataclasses.asdict(b) for d, b in table.items()}),
                f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
