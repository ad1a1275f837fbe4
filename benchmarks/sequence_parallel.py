"""Sequence parallelism: 1 vs P devices for ring, Ulysses and LASP-2 (forward, forward+backward).

    python -m longax.benchmarks.sequence_parallel                 # GPUs: T = 32k, 64k
    python -m longax.benchmarks.sequence_parallel --quick         # CPU smoke test, 8 sim devices
    python -m longax.benchmarks.sequence_parallel --devices 2 4 --scaling strong weak \
        --lengths 16384 --layouts zigzag contiguous --peer --out sp.json
    python -m longax.benchmarks.sequence_parallel --train configs/hybrid_350m.py \
        --devices 2 4 --lengths 8192 --set data.batch_size=4     # a training step, DP vs SP

Strong scaling keeps the total length T; weak scaling keeps T / P per device. Each row: op,
P, T, ms forward / forward+backward, efficiency (`efficiency`: strong, 1-device time / (P x
P-device time); weak, the 1-device time of the work each device now does / P-device time,
where causal attention's work grows as T^2 and the linear family's as T) and the bytes each device sends per
forward, from the shapes (ring: (P-1) K/V blocks; Ulysses: 4 all-to-alls of (P-1)/P of a
shard; LASP-2: one all-gather of (P-1) [B, H, Dk, Dv] states) and tokens/s per device.
With `--profile DIR` a row also has its gradient call's device time on the first device
(`device_ms_fwd_bwd`), the collectives' share of it (`comm_ms_fwd_bwd`, NCCL kernels) and
`overlap_fwd_bwd`: the share of that communication hidden behind compute, 1 - exposed /
comm with exposed = wall - (device - comm) (approximate: the trace and the timing are
separate calls). Strong-scaling rows carry `err`: the P-device forward's relative error against the
1-device op on the same inputs. `--peer`: jla's context parallelism (ring with load balancing for zigzag, Ulysses, simple_gla
state passing for LASP-2) on the same P and inputs, its efficiency against its own P = 1 row.
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
  for _ in range(3):  # compile, then let the allocator grow (it is not preallocated)
    jax.block_until_ready(fn(*args))
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


def _placed(xs, p: int):
  """The inputs already sharded as the P-device call takes them ([B, T/P] per device), so a
  timed call moves nothing but what the op sends (unplaced inputs would be scattered from
  device 0 on every call: ~1-2 ms at T = 32k, counted against sequence parallelism)."""
  import jax
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  if p == 1:
    return [jax.device_put(x, jax.devices()[0]) for x in xs]
  sharding = NamedSharding(Mesh(np.asarray(jax.devices()[:p]), ("sp",)), P(None, "sp"))
  return [jax.device_put(x, sharding) for x in xs]


def _local(op, layout: str):
  """The op on one device's part of the sequence (called inside `shard_map` over "sp")."""
  from longax.kernels import sequence_parallel as SP
  kw = dict(axis_name="sp", layout=layout)
  return {"ring": lambda q, k, v: SP.ring_attention(q, k, v, **kw),
          "ulysses": lambda q, k, v: SP.ulysses_attention(q, k, v, **kw),
          "lasp2": lambda q, k, v, g: SP.lasp2_linear_attention(q, k, v, log_decay=g, **kw)}[op]


def _sharded(f, op, p: int, out_spec):
  import jax
  import numpy as np
  from jax.sharding import Mesh, PartitionSpec as P
  mesh = Mesh(np.asarray(jax.devices()[:p]), ("sp",))
  n = 4 if op == "lasp2" else 3
  return jax.shard_map(f, mesh=mesh, in_specs=(P(None, "sp"),) * n, out_specs=out_spec)


def _fn(op, p: int, layout: str):
  """The op on whole arrays: the 1-device kernel, or `shard_map` of its SP form."""
  from jax.sharding import PartitionSpec as P
  from longax import kernels as K
  if p == 1:
    if op == "lasp2":
      return lambda q, k, v, g: K.linear_attention(q, k, v, log_decay=g)
    return lambda q, k, v: K.attention(q, k, v)
  return _sharded(_local(op, layout), op, p, P(None, "sp"))


def _loss_fn(op, p: int, layout: str):
  """The timed backward's loss, sum(o) in float32, computed where a trainer computes it: on
  each device's own tokens inside `shard_map`, then one psum of the scalar (its transpose
  moves nothing), so o's cotangent is born in the shard in o's dtype. (Summed outside, as the
  peers' functions must be, the cotangent enters the shard in float32 and is cast there.)
  None on one device (the sum outside is the same thing there)."""
  import jax.numpy as jnp
  from jax import lax
  from jax.sharding import PartitionSpec as P
  if p == 1:
    return None
  local = _local(op, layout)
  return _sharded(lambda *a: lax.psum(jnp.sum(local(*a).astype(jnp.float32)), "sp"), op, p, P())


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


def efficiency(op: str, scaling: str, p: int, t1: int, t: int, ms1: float, ms: float) -> float:
  """The 1-device time of the P-device run's work per device over its time. Strong: ms1 / (P
  ms). Weak: attention's work grows as T^2 (per device: (T/T1)^2 / P of the 1-device run's),
  the linear family's as T (per device: the same)."""
  if scaling == "strong":
    return ms1 / (p * ms)
  work = (t / t1) ** 2 / p if op in ("ring", "ulysses") else 1.0
  return ms1 * work / ms


def _jla_fn(op, p: int, layout: str):
  """jax-linear-attention's context parallelism for the same op on P devices, or None."""
  import jax
  import numpy as np
  from jax.sharding import Mesh
  try:
    from jla.distributed.context_parallel import context_parallel_linear_attention
    from jla.distributed.context_parallel_attention import context_parallel_attention
  except Exception as e:  # noqa: BLE001 - optional peer
    print(f"# jla unavailable: {type(e).__name__}: {e}", file=sys.stderr)
    return None
  mesh = Mesh(np.asarray(jax.devices()[:p]), ("sp",))  # the placed inputs' mesh (`_placed`)
  if op == "lasp2":
    return lambda q, k, v, g: context_parallel_linear_attention(
        "simple_gla", q, k, v, g=g, mesh=mesh, axis="sp", scale=q.shape[-1]**-0.5)[0]
  strategy = "ring" if op == "ring" else "ulysses"
  return lambda q, k, v: context_parallel_attention(
      q, k, v, mesh=mesh, axis="sp", strategy=strategy, load_balance=layout == "zigzag")


def _profiled(fn, xs, reps: int, trace_dir: str) -> dict:
  """Device time of reps calls of the compiled fn on the first device, from a trace."""
  from longax.benchmarks.profile import device_time
  s = device_time(lambda: fn(*xs), reps, trace_dir)
  return dict(device_ms_fwd_bwd=s["total_ms_per_step"],
              comm_ms_fwd_bwd=sum(ms for name, ms, _ in s["by_kernel"] if _is_comm(name)),
              top_kernels=[(name, round(ms, 4)) for name, ms, _ in s["by_kernel"][:8]])


def _is_comm(kernel: str) -> bool:
  """A collective's kernel (NCCL on GPUs)."""
  return kernel.startswith("nccl") or "all-gather" in kernel or "all-to-all" in kernel


def overlap(ms_wall: float, device_ms: float, comm_ms: float) -> float | None:
  """The share of the collectives' kernel time hidden behind compute: 1 - exposed / comm,
  where exposed = wall - (device time - comm time), clipped to [0, 1]. None without comm."""
  if comm_ms <= 0:
    return None
  exposed = max(0.0, ms_wall - (device_ms - comm_ms))
  return max(0.0, 1.0 - exposed / comm_ms)


def _timed_row(fn, xs, reps: int, natural=None, want=None, profile: str | None = None,
               loss=None) -> dict:
  """ms forward and forward+backward of fn(*xs) (the backward of `loss`, by default sum(fn)
  in float32); with `want` (the 1-device output) also the relative error of `natural` (fn on
  natural-order arrays); with `profile` (a folder) the gradient call's kernel time on the
  first device and its top kernels. An error is reported in the row."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  try:
    fwd = jax.jit(fn)
    loss = loss or (lambda *a: jnp.sum(fn(*a).astype(jnp.float32)))
    bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    row = dict(ms_fwd=_time(fwd, xs, reps), ms_fwd_bwd=_time(bwd, xs, reps))  # grad: fwd + bwd
    if profile:
      row.update(_profiled(bwd, xs, reps, profile))
      row["overlap_fwd_bwd"] = overlap(row["ms_fwd_bwd"], row["device_ms_fwd_bwd"],
                                       row["comm_ms_fwd_bwd"])
    if want is not None:
      got = np.asarray(jax.jit(natural or fn)(*xs), np.float32)
      row["err"] = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
    return row
  except Exception as e:  # noqa: BLE001 - one failing row must not sink the table
    return dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")


def _natural(fn, p: int, layout: str):
  """fn on natural-order arrays (zigzag: reorder in, restore out)."""
  from longax.kernels.sequence_parallel import from_zigzag, to_zigzag
  if layout != "zigzag" or p == 1:
    return fn
  return lambda *a: from_zigzag(fn(*(to_zigzag(x, p) for x in a)), p)


def run(args) -> list[dict]:
  import jax
  import jax.numpy as jnp
  import numpy as np
  dtype = jnp.dtype(args.dtype)
  ps = sorted({p for p in args.devices if p <= jax.device_count()} | {1})
  rows = []
  for scaling in args.scaling:
    for op in args.ops:
      for layout in (args.layouts if op != "ulysses" else ["contiguous"]):
        for t_arg in args.lengths:
          base, want = {}, None
          for p in ps:
            t = t_arg * p if scaling == "weak" else t_arg
            xs = _placed(_inputs(op, args.batch, t, args.heads, args.kv_heads, args.head_dim,
                                 dtype), p)
            row = dict(op=op, layout=layout, scaling=scaling, P=p, T=t, impl="longax",
                       bytes_sent=bytes_per_device(op, p, args.batch, t, args.heads,
                                                   args.kv_heads, args.head_dim, dtype.itemsize),
                       device=jax.devices()[0].device_kind)
            peers = [("longax", _fn(op, p, layout))]
            if args.peer and (p > 1 or op != "lasp2"):
              peers.append(("jla", _jla_fn(op, p, layout)))
            for impl, fn in peers:
              if fn is None:
                continue
              natural = _natural(fn, p, layout) if impl == "longax" else fn
              trace = (f"{args.profile}/{op}-{layout}-{scaling}-P{p}-T{t}-{impl}"
                       if args.profile else None)
              loss = (_loss_fn(op, p, layout)
                      if impl == "longax" and args.loss == "inside" else None)
              r = dict(row, impl=impl, loss=args.loss if loss else "outside",
                       **_timed_row(fn, xs, args.reps, natural,
                                    want if p > 1 and scaling == "strong" else None, trace, loss))
              if p == 1 and impl == "longax" and scaling == "strong" and "error" not in r:
                want = np.asarray(jax.jit(fn)(*xs), np.float32)  # the 1-device op
              if "ms_fwd_bwd" in r:
                r["tokens_per_s_per_device"] = args.batch * t / p / (r["ms_fwd_bwd"] / 1e3)
                if p == 1:
                  base.setdefault(impl, r)
                b0 = base.get(impl) or base.get("longax")
                if b0 and p > 1:
                  r["efficiency_fwd"] = efficiency(op, scaling, p, b0["T"], t, b0["ms_fwd"], r["ms_fwd"])
                  r["efficiency_fwd_bwd"] = efficiency(op, scaling, p, b0["T"], t,
                                                       b0["ms_fwd_bwd"], r["ms_fwd_bwd"])
              rows.append(r)
              print(json.dumps(r), flush=True)
              if args.out:  # after every row: a run cut short keeps what it measured
                with open(args.out, "w") as f:
                  json.dump(rows, f, indent=1)
  return rows


def run_train(args) -> list[dict]:
  """A training step at fixed global batch and length on all devices, mesh (data, sequence)
  = (N/P, P) for each P: tokens/s in all and per device, against P = 1 (data parallel). The
  sequence-parallel points run first and the baseline last (a call cut short keeps the SP
  rows); `vs_data_parallel` is filled in when the baseline lands."""
  import pathlib
  import statistics
  import tempfile

  import jax

  from longax.benchmarks.train import run_longax
  from longax.train.config import load, override
  n = jax.device_count()
  rows = []
  base_cfg = load(args.train)  # (main checked it loads)
  for p in sorted({p for p in args.devices if n % p == 0} - {1}) + [1]:
    for t in args.lengths:
      row = dict(op="train", config=args.train, layout=args.layouts[0],
                 sp_attention=args.sp_attention, scaling="dp-vs-sp", P=p, T=t, devices=n,
                 impl="longax", device=jax.devices()[0].device_kind)
      try:  # a point the config rules refuse (e.g. T not a multiple of P) is an error row
        cfg = override(base_cfg, [
            f"mesh.sequence={p}", "mesh.data=-1", f"data.seq_len={t}", f"model.max_len={t}",
            f"train.steps={args.train_steps}", f"train.log_every={max(args.train_steps // 5, 1)}",
            f"train.eval_every={args.train_steps}", "train.eval_batches=1",
            f"train.checkpoint_every={args.train_steps}", f"train.sp_layout={args.layouts[0]}",
            f"train.sp_attention={args.sp_attention}", *args.set])
        row["batch"] = cfg.data.batch_size
        with tempfile.TemporaryDirectory() as d:
          tps = run_longax(cfg, pathlib.Path(d) / "run")
        if not tps:  # the trainer stops cleanly on SIGTERM (e.g. a timeout): no interval timed
          raise RuntimeError(f"no timed interval: the first logged interval (compilation) is "
                             f"dropped and none followed ({args.train_steps} steps; was the run "
                             f"stopped early?)")
        row["tokens_per_s"] = statistics.median(tps)
        row["tokens_per_s_per_device"] = row["tokens_per_s"] / n
        if p == 1:
          for r in rows:
            if r["T"] == t and "tokens_per_s" in r:
              r["vs_data_parallel"] = r["tokens_per_s"] / row["tokens_per_s"]
              print(f"# P={r['P']} T={t}: {r['vs_data_parallel']:.3f}x data parallel", flush=True)
      except Exception as e:  # noqa: BLE001 - e.g. out of memory at P = 1: the point of SP
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
      rows.append(row)
      print(json.dumps(row), flush=True)
      if args.out:
        with open(args.out, "w") as f:
          json.dump(rows, f, indent=1)
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="tiny shapes on 8 simulated CPU devices")
  ap.add_argument("--ops", nargs="+", default=["ring", "ulysses", "lasp2"],
                  choices=["ring", "ulysses", "lasp2"])
  ap.add_argument("--lengths", nargs="+", type=int, default=[32768, 65536],
                  help="T (strong scaling) or T per device (weak scaling)")
  ap.add_argument("--scaling", nargs="+", choices=["strong", "weak"], default=["strong"])
  ap.add_argument("--layouts", nargs="+", choices=["contiguous", "zigzag"], default=["zigzag"],
                  help="ring and LASP-2 run each (Ulysses: contiguous)")
  ap.add_argument("--devices", nargs="+", type=int, default=[2],
                  help="device counts P to run (1 is always run: the baseline; last with --train)")
  ap.add_argument("--peer", action="store_true", help="jla's context parallelism beside, same P")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--heads", type=int, default=16)
  ap.add_argument("--kv-heads", type=int, default=4)
  ap.add_argument("--head-dim", type=int, default=128)
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--loss", choices=["inside", "outside"], default="inside",
                  help="where the timed backward's loss sum(o) is taken on P > 1 devices: "
                       "inside shard_map on each device's tokens and psum'd (as a trainer "
                       "does), or on the gathered output (the peers' rows always are)")
  ap.add_argument("--out", default=None, help="write the rows as JSON here (after every row)")
  ap.add_argument("--profile", default=None, metavar="DIR",
                  help="trace each row's gradient calls under DIR: the row gets the kernel "
                       "time per call on the first device and its top kernels (a time far "
                       "below ms_fwd_bwd: latency, not work)")
  ap.add_argument("--train", default=None, metavar="CONFIG",
                  help="time a training step of this config instead: mesh (data, sequence) = "
                       "(N/P, P) on all N devices for each P of --devices, at each --lengths")
  ap.add_argument("--train-steps", type=int, default=30)
  ap.add_argument("--sp-attention", choices=["ring", "ulysses"], default="ring")
  ap.add_argument("--set", action="append", default=[], help="config overrides (--train)")
  args = ap.parse_args(argv)
  if args.quick:
    args.lengths, args.heads, args.kv_heads, args.head_dim = [64], 4, 2, 16
    args.dtype, args.reps, args.devices = "float32", 1, [2]
    if args.train:
      args.lengths, args.train_steps = [32], 4
  _setup(args.quick)
  if args.train:
    from longax.train.config import ConfigError, load, override
    try:
      override(load(args.train), args.set)
    except ConfigError as e:
      print(f"error: {e}", file=sys.stderr)
      raise SystemExit(2) from None
    return run_train(args)
  return run(args)


if __name__ == "__main__":
  main()
