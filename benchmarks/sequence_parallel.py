"""Sequence parallelism: 1 vs P devices for ring, Ulysses and LASP-2 (forward, forward+backward).

    python -m longax.benchmarks.sequence_parallel                 # GPUs: T = 32k, 64k
    python -m longax.benchmarks.sequence_parallel --quick         # CPU smoke test, 8 sim devices
    python -m longax.benchmarks.sequence_parallel --lengths 65536 --scaling weak --out sp.json

Strong scaling keeps the total length T; weak scaling keeps T / P per device. Each row: op,
P, T, ms forward / forward+backward, efficiency (1-device time / (P x P-device time) for
strong, 1-device time at T/P / P-device time for weak) and the bytes each device sends per
forward, from the shapes (ring: (P-1) K/V blocks; Ulysses: 4 all-to-alls of (P-1)/P of a
shard; LASP-2: one all-gather of (P-1) [B, H, Dk, Dv] states). jla's context parallelism
runs beside when `jla.distributed` imports (else one line says why).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _setup(quick: bool):
  if quick and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _time(fn, args, reps: int) -> float:
  import jax
  jax.block_until_ready(fn(*args))  # compile
  t0 = time.perf_counter()
  for _ in range(reps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / reps * 1e3


def _inputs(op, b, t, h, hkv, d, dtype):
  import jax
  import jax.numpy as jnp
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (b, t, h, d), dtype)
  k = jax.random.normal(ks[1], (b, t, hkv if op != "lasp2" else h, d), dtype)
  v = jax.random.normal(ks[2], (b, t, hkv if op != "lasp2" else h, d), dtype)
  args = [q, k, v]
  if op == "lasp2":  # Mamba-2 style per-token scalar decay
    args.append(-jax.nn.softplus(jax.random.normal(ks[3], (b, t, h), jnp.float32)))
  return args


def _fn(op, p: int, layout: str):
  """(function on whole arrays, its SP mesh or None)."""
  import jax
  import numpy as np
  from jax.sharding import Mesh, PartitionSpec as P
  from longax import kernels as K
  from longax.kernels import sequence_parallel as SP
  if p == 1:
    if op == "lasp2":
      return lambda q, k, v, g: K.linear_attention(q, k, v, log_decay=g)
    return lambda q, k, v: K.attention(q, k, v)
  mesh = Mesh(np.asarray(jax.devices()[:p]), ("sp",))
  kw = dict(axis_name="sp", layout=layout)
  local = {"ring": lambda q, k, v: SP.ring_attention(q, k, v, **kw),
           "ulysses": lambda q, k, v: SP.ulysses_attention(q, k, v, **kw),
           "lasp2": lambda q, k, v, g: SP.lasp2_linear_attention(q, k, v, log_decay=g, **kw)}[op]
  n = 4 if op == "lasp2" else 3
  return jax.shard_map(local, mesh=mesh, in_specs=(P(None, "sp"),) * n, out_specs=P(None, "sp"))


def bytes_per_device(op, p, b, t, h, hkv, d, itemsize) -> int:
  """Bytes one device sends in one forward, from the shapes."""
  if p == 1:
    return 0
  shard = b * (t // p) * d * itemsize
  if op == "ring":
    return (p - 1) * 2 * shard * hkv
  if op == "ulysses":  # q, k, v in, o out; each keeps 1/P of its shard
    return int((h + 2 * hkv + h) * shard * (p - 1) / p)
  return (p - 1) * b * h * d * d * 4  # LASP-2: float32 states


def _jla_row(args, p, t):
  try:
    import jla.distributed  # noqa: F401
  except Exception as e:  # noqa: BLE001 - optional peer
    print(f"# jla unavailable: {type(e).__name__}: {e}", file=sys.stderr)
    return None
  return None  # TODO(lead): wire jla.distributed's context-parallel attention on the GPUs


def run(args) -> list[dict]:
  import jax
  import jax.numpy as jnp
  dtype = jnp.dtype(args.dtype)
  p_max = min(args.devices, jax.device_count())
  rows = []
  for op in args.ops:
    for t_arg in args.lengths:
      base = {}
      for p in sorted({1, p_max}):
        t = t_arg * p if args.scaling == "weak" else t_arg
        xs = _inputs(op, args.batch, t, args.heads, args.kv_heads, args.head_dim, dtype)
        fn = _fn(op, p, args.layout)
        fwd = jax.jit(fn)
        loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32))
        bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        ms_f, ms_b = _time(fwd, xs, args.reps), _time(bwd, xs, args.reps)
        row = dict(op=op, P=p, T=t, layout=args.layout, ms_fwd=ms_f, ms_fwd_bwd=ms_f + ms_b,
                   bytes_sent=bytes_per_device(op, p, args.batch, t, args.heads, args.kv_heads,
                                               args.head_dim, dtype.itemsize),
                   device=jax.devices()[0].device_kind)
        if p == 1:
          base = row
        else:
          ideal = p if args.scaling == "strong" else 1
          row["efficiency_fwd"] = base["ms_fwd"] / (ideal * ms_f)
          row["efficiency_fwd_bwd"] = base["ms_fwd_bwd"] / (ideal * row["ms_fwd_bwd"])
        rows.append(row)
        print(json.dumps(row), flush=True)
      _jla_row(args, p_max, t_arg)
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="tiny shapes on 8 simulated CPU devices")
  ap.add_argument("--ops", nargs="+", default=["ring", "ulysses", "lasp2"])
  ap.add_argument("--lengths", nargs="+", type=int, default=[32768, 65536])
  ap.add_argument("--scaling", choices=["strong", "weak"], default="strong")
  ap.add_argument("--layout", choices=["contiguous", "zigzag"], default="zigzag")
  ap.add_argument("--devices", type=int, default=2)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--heads", type=int, default=16)
  ap.add_argument("--kv-heads", type=int, default=4)
  ap.add_argument("--head-dim", type=int, default=128)
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--out", default=None, help="write the rows as JSON here")
  args = ap.parse_args(argv)
  if args.quick:
    args.lengths, args.heads, args.kv_heads, args.head_dim = [64], 4, 2, 16
    args.dtype, args.reps = "float32", 1
  _setup(args.quick)
  rows = run(args)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
