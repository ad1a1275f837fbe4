"""Sequence parallelism (kernels/sequence_parallel.py) against the single-device ops.

The multi-device cases need 8 simulated CPU devices, which must be set before JAX starts, so
they run in one subprocess (`python tests/test_sequence_parallel.py CASE...`, with
XLA_FLAGS=--xla_force_host_platform_device_count=8) that prints each case's relative errors
(forward, then the gradient of every float input) as JSON; the subprocess runs once per
pytest session (a file lock shares its result between xdist workers). Each case compares
`jax.shard_map(sp_op)` on P=8 devices with the op on the whole sequence, float32.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

P_DEV, B, T, H, HKV, D = 8, 2, 48, 8, 2, 8

# Each case compiles two programs (~5 s on 2 busy cores), so the list covers every option
# once rather than their product: both layouts, both kinds, window, segments, non-causal,
# GQA (H=8, Hkv=2) and MQA (Ulysses repeats the one K/V head), every decay form.
ATTN = ["ring-softmax-causal-contiguous", "ring-softmax-window+segments-zigzag",
        "ring-sigmoid-causal-zigzag", "ring-sigmoid-noncausal-contiguous",
        "ring-softmax-mqa-zigzag", "ulysses-softmax-causal-zigzag",
        "ulysses-sigmoid-window+segments-contiguous", "ulysses-softmax-mqa-zigzag"]
LASP = ["lasp2-none-contiguous", "lasp2-head-zigzag", "lasp2-token-zigzag",
        "lasp2-key-contiguous", "lasp2-state-zigzag", "lasp2split-token-zigzag",
        "lasp2split-state-contiguous", "ssd-zigzag", "sscan-contiguous", "sscan-zigzag",
        "conv-contiguous", "conv-zigzag"]
CASES = ATTN + LASP
TOL = 1e-5

# ------------------------------------------------------------------ the subprocess side


def _inputs(name):
  from conftest import Rand
  r = Rand(sum(map(ord, name)))
  hkv = 1 if "mqa" in name else HKV
  q, k, v = r.normal((B, T, H, D)), r.normal((B, T, hkv, D)), r.normal((B, T, hkv, D))
  return r, q, k, v, r.segments(B, T, 4)


def _case(name):
  """(sp_fn, ref_fn, args, float argnums) of one case."""
  from longax import kernels as K
  from longax.kernels import sequence_parallel as SP
  r, q, k, v, seg = _inputs(name)
  layout = name.rsplit("-", 1)[1]
  lay = dict(axis_name="sp", layout=layout)
  if name.startswith(("ring", "ulysses")):
    fn, kind, opts = name.split("-")[:3]
    kw = dict(kind=kind, window=7 if "window" in opts else None, causal=opts != "noncausal")
    sp_op = SP.ring_attention if fn == "ring" else SP.ulysses_attention
    ref_op = K.attention if kind == "softmax" else K.sigmoid_attention
    ref_kw = {k_: v_ for k_, v_ in kw.items() if k_ != "kind"}
    s = seg if "segments" in opts else None
    return (lambda q, k, v, s: sp_op(q, k, v, segment_ids=s, block_kv=4, **kw, **lay),
            lambda q, k, v, s: ref_op(q, k, v, segment_ids=s, **ref_kw), (q, k, v, s), (0, 1, 2))
  if name.startswith("lasp2split"):  # the GPU kernel's split backward (`_emulated_kernel`)
    return _case(name.replace("lasp2split", "lasp2"))
  if name.startswith("lasp2"):
    decay = name.split("-")[1]
    g = {"none": None, "head": -jnp.arange(1.0, H + 1) / 8,
         "token": -r.uniform((B, T, H), 0.0, 0.5), "state": -r.uniform((B, T, H), 0.0, 0.2),
         "key": -r.uniform((B, T, H, D), 0.0, 0.5)}[decay]
    s = seg if decay in ("none", "token", "state") else None
    fin = decay == "state"  # also the initial state's gradient and the final state
    h0 = r.normal((B, H, D, D)) if fin else None
    kw = dict(chunk_size=4, return_final_state=fin)
    return (lambda q, k, v, g, s, h0: SP.lasp2_linear_attention(q, k, v, log_decay=g, segment_ids=s, initial_state=h0, **kw, **lay),
            lambda q, k, v, g, s, h0: K.linear_attention(q, k, v, log_decay=g, segment_ids=s, initial_state=h0, **kw),
            (q, k, v, g, s, h0), (0, 1, 2) + ((3,) if g is not None else ()) + ((5,) if fin else ()))
  if name.startswith("ssd"):
    x, dt = r.normal((B, T, H, D)), r.uniform((B, T, H), 0.05, 0.5)
    bm, cm = r.normal((B, T, 1, 4)), r.normal((B, T, 1, 4))
    a, dd = -jnp.arange(1.0, H + 1), r.normal((H,))
    kw = dict(D=dd, chunk_size=4, return_final_state=True)
    return (lambda x, dt, bm, cm, s: SP.lasp2_ssd(x, dt, a, bm, cm, segment_ids=s, **kw, **lay),
            lambda x, dt, bm, cm, s: K.ssd(x, dt, a, bm, cm, segment_ids=s, **kw),
            (x, dt, bm, cm, seg), (0, 1, 2, 3))
  if name.startswith("sscan"):
    u, z, dl = r.normal((B, T, D)), r.normal((B, T, D)), r.normal((B, T, D))
    bs, cs = r.normal((B, T, 4)), r.normal((B, T, 4))
    a = -jnp.broadcast_to(jnp.arange(1.0, 5.0), (D, 4))
    kw = dict(D=jnp.ones(D), delta_bias=r.normal((D,)), delta_softplus=True, chunk_size=4)
    return (lambda u, dl, bs, cs, z, s: SP.lasp2_selective_scan(u, dl, a, bs, cs, z=z, segment_ids=s, **kw, **lay),
            lambda u, dl, bs, cs, z, s: K.selective_scan(u, dl, a, bs, cs, z=z, segment_ids=s, **kw),
            (u, dl, bs, cs, z, seg), (0, 1, 2, 3, 4))
  if name.startswith("conv"):  # left_context feeds a 3-tap causal sum: equals a global shift
    x = r.normal((B, T, D))
    n = 2 if layout == "zigzag" else 1

    def sp_fn(x, s):
      ctx, ctx_seg = SP.left_context(x, 2, segment_ids=s, **lay)
      out = []
      for j, (xc, sc) in enumerate(zip(jnp.split(x, n, 1), jnp.split(s, n, 1))):
        xp = jnp.concatenate([ctx[j], xc], 1)
        sp = jnp.concatenate([ctx_seg[j], sc], 1)
        c = xc.shape[1]
        out.append(sum(xp[:, i:i + c] * (sp[:, i:i + c] == sc)[..., None] * (i + 1) for i in range(3)))
      return jnp.concatenate(out, 1)

    def ref_fn(x, s):
      xp, sp = jnp.pad(x, ((0, 0), (2, 0), (0, 0))), jnp.pad(s, ((0, 0), (2, 0)), constant_values=-1)
      return sum(xp[:, i:i + T] * (sp[:, i:i + T] == s)[..., None] * (i + 1) for i in range(3))

    return sp_fn, ref_fn, (x, seg), (0,)
  raise KeyError(name)


@contextlib.contextmanager
def _emulated_kernel(pieces: int):
  """LASP-2 on the Mosaic GPU linear-attention kernel's split backward, with the kernel's two
  state passes and the shard-state kernel emulated in XLA (`test_linear_attention_gpu_lowering`)
  and its chunk-parallel part on the XLA path, in `pieces` sequence pieces: the split's wiring,
  exact on the CPU."""
  import test_linear_attention_gpu_lowering as emu
  from longax.kernels import sequence_parallel as SP
  from longax.kernels.gpu import linear_attention as gpu
  saved = gpu._forward, gpu._reverse_states, gpu.shard_state, gpu.TUNED, SP._takes_split
  gpu._forward, gpu._reverse_states = emu._emulate_forward, emu._emulate_reverse
  gpu.shard_state = emu._emulate_shard_state
  gpu.TUNED = gpu.Config(grads_kernel=False, pieces=pieces)
  SP._takes_split = lambda *a: True
  try:
    yield
  finally:
    gpu._forward, gpu._reverse_states, gpu.shard_state, gpu.TUNED, SP._takes_split = saved


def _errors(name):
  """[forward error(s)..., gradient errors...] of one case. The zigzag permutation happens
  on the host (numpy): permuting sharded arrays inside jit costs seconds of SPMD compile."""
  if name.startswith("lasp2split"):
    with _emulated_kernel(pieces=2 if "state" in name else 1):
      return _errors_of(name)
  return _errors_of(name)


def _errors_of(name):
  from jax.sharding import Mesh, PartitionSpec as Ps
  from conftest import rel_err
  from longax.kernels import sequence_parallel as SP
  sp_fn, ref_fn, args, argnums = _case(name)
  per_token = lambda a: a is not None and a.ndim >= 2 and a.shape[:2] == (B, T)
  order = np.arange(T)
  if name.endswith("zigzag"):
    order = np.asarray(SP.to_zigzag(order[None], P_DEV))[0]
  to_sp = lambda a: np.take(np.asarray(a), order, axis=1) if per_token(a) else a
  from_sp = lambda a: np.take(np.asarray(a), np.argsort(order), axis=1) if per_token(a) else a
  mesh = Mesh(np.asarray(jax.devices()[:P_DEV]), ("sp",))
  specs = tuple(Ps(None, "sp") if per_token(a) else Ps() for a in args)
  out_tree = jax.eval_shape(ref_fn, *args)
  out_specs = jax.tree.map(lambda a: Ps(None, "sp") if a.shape[:2] == (B, T) else Ps(), out_tree)
  sm = jax.shard_map(sp_fn, mesh=mesh, in_specs=specs, out_specs=out_specs)
  keys = jax.random.split(jax.random.key(7), len(jax.tree.leaves(out_tree)))
  proj = [np.asarray(jax.random.normal(k_, x.shape)) for k_, x in zip(keys, jax.tree.leaves(out_tree))]

  def both(fn, a, r):  # forward, and gradients of <out, R> for fixed random projections R
    loss = lambda *a: sum(jnp.vdot(r_, x) for r_, x in zip(r, jax.tree.leaves(fn(*a))))
    return fn(*a), jax.grad(loss, argnums=argnums)(*a)

  # One program for both sides: the SP op in its layout's order, the op on the whole sequence.
  run = jax.jit(lambda a_sp, r_sp, a, r: (both(sm, a_sp, r_sp), both(ref_fn, a, r)))
  (got, g_got), (want, g_want) = run(tuple(map(to_sp, args)), [to_sp(r) for r in proj], args, proj)
  got, g_got = jax.tree.map(from_sp, got), [from_sp(g) for g in g_got]
  pairs = list(zip(jax.tree.leaves(got), jax.tree.leaves(want))) + list(zip(g_got, g_want))
  return [rel_err(a, b) for a, b in pairs]


def _sp_errors():
  """The multi-device messages (heads for Ulysses, zigzag lengths, left_context width)."""
  from jax.sharding import Mesh, PartitionSpec as Ps
  from longax.kernels import sequence_parallel as SP
  mesh = Mesh(np.asarray(jax.devices()[:P_DEV]), ("sp",))
  x = jnp.zeros((1, 8 * P_DEV, 4, 8))
  calls = {
      "ulysses_heads": lambda q: SP.ulysses_attention(q, q, q, axis_name="sp"),
      "zigzag_length": lambda q: SP.ring_attention(q[:, :1], q[:, :1], q[:, :1], axis_name="sp", layout="zigzag"),
      "conv_width": lambda q: SP.left_context(q[:, :, 0], 9, axis_name="sp")[0],
  }
  out = {}
  for name, fn in calls.items():
    try:
      jax.shard_map(fn, mesh=mesh, in_specs=Ps(None, "sp"), out_specs=Ps(None, "sp"))(x)
      out[name] = "no error"
    except ValueError as e:
      out[name] = str(e)
  return out


def _worker(names):
  results = {}
  for name in names:
    try:
      results[name] = _errors(name)
    except Exception as e:  # reported by the test of that case
      results[name] = f"{type(e).__name__}: {e}"
  results["errors"] = _sp_errors()
  print("RESULTS " + json.dumps(results))


# ---------------------------------------------------------------------- the pytest side


@pytest.fixture(scope="session")
def results(tmp_path_factory):
  """Runs every case once in a subprocess with 8 CPU devices; xdist workers share it."""
  # One session's folder: the xdist workers' common parent, else this run's own (never
  # /tmp/pytest-of-USER itself, which would hand a stale result to later sessions).
  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  cache, lock = root / "sp_results.json", root / "sp_results.lock"
  with open(lock, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    if not cache.exists():
      env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
                 JAX_PLATFORMS="cpu")
      here = pathlib.Path(__file__).parent
      proc = subprocess.run([sys.executable, str(pathlib.Path(__file__)), *CASES], env=env,
                            cwd=here, capture_output=True, text=True, timeout=900)
      line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
      assert line, f"worker failed:\n{proc.stderr[-4000:]}"
      cache.write_text(line[-1][len("RESULTS "):])
  return json.loads(cache.read_text())


@pytest.mark.long
@pytest.mark.parametrize("case", CASES)
def test_matches_single_device(results, case):
  errs = results[case]
  assert not isinstance(errs, str), errs
  assert max(errs) <= TOL, f"{case}: relative errors {errs}"


@pytest.mark.parametrize("name,msg", [
    ("ulysses_heads", "ulysses_attention: query heads H=4 must be divisible by the sequence axis size P=8 ('sp')"),
    ("zigzag_length", "ring_attention: length T=8 must be divisible by 2P (zigzag layout)=16"),
    ("conv_width", "left_context: width=9 must be in [1, the local chunk length 8]"),
])
def test_multi_device_errors(results, name, msg):
  assert results["errors"][name] == msg


def test_zigzag_round_trip():
  from longax.kernels.sequence_parallel import from_zigzag, to_zigzag
  x = jnp.arange(16)[None]
  z = to_zigzag(x, 4)
  assert z[0].tolist() == [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9]
  assert from_zigzag(z, 4).tolist() == x.tolist()
  with pytest.raises(ValueError, match="to_zigzag: length T=12 must be divisible by 2P=8"):
    to_zigzag(jnp.zeros((1, 12)), 4)


def _one_device(fn, x):
  from jax.sharding import Mesh, PartitionSpec as Ps
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("s",))
  return jax.shard_map(fn, mesh=mesh, in_specs=Ps(None, "s"), out_specs=Ps(None, "s"))(x)


@pytest.mark.parametrize("fn", ["ring_attention", "ulysses_attention", "lasp2_linear_attention"])
def test_axis_not_in_mesh(fn):
  from longax.kernels import sequence_parallel as SP
  op = getattr(SP, fn)
  with pytest.raises(ValueError, match=f"{fn}: axis_name='sequence' is not an axis of the enclosing"):
    _one_device(lambda q: op(q, q, q, axis_name="sequence"), jnp.zeros((1, 4, 2, 4)))


def test_unknown_layout_and_odd_zigzag():
  from longax.kernels import sequence_parallel as SP
  with pytest.raises(ValueError, match="unknown layout='zig'"):
    _one_device(lambda q: SP.ring_attention(q, q, q, axis_name="s", layout="zig"), jnp.zeros((1, 4, 2, 4)))
  with pytest.raises(ValueError, match="length T=3 must be divisible by 2P"):
    _one_device(lambda q: SP.lasp2_linear_attention(q, q, q, axis_name="s", layout="zigzag"),
                jnp.zeros((1, 3, 2, 4)))


@pytest.mark.long
def test_benchmark_quick(tmp_path):
  """benchmarks/sequence_parallel.py --quick runs on 8 simulated CPU devices."""
  out = tmp_path / "sp.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-m", "longax.benchmarks.sequence_parallel", "--quick",
                      "--ops", "ring", "lasp2", "--out", str(out)], env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = json.loads(out.read_text())
  assert [(x["op"], x["P"]) for x in rows] == [("ring", 1), ("ring", 2), ("lasp2", 1), ("lasp2", 2)]
  assert all(x["bytes_sent"] > 0 and x["efficiency_fwd_bwd"] > 0 for x in rows if x["P"] == 2)
  assert all(x["loss"] == ("inside" if x["P"] == 2 else "outside") for x in rows)


@pytest.mark.parametrize("extra,msg", [
    (["--train", "no/such/config.py"], "no/such/config.py"),
    (["--train", "configs/mqar.py", "--set", "model.nope=1"], "model.nope"),
])
def test_benchmark_train_bad_config_is_one_line(extra, msg):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  root = pathlib.Path(__file__).resolve().parents[1]
  r = subprocess.run([sys.executable, "-m", "longax.benchmarks.sequence_parallel", *extra],
                     env=env, capture_output=True, text=True, timeout=300, cwd=root)
  assert r.returncode == 2 and r.stderr.startswith("error: ") and msg in r.stderr
  assert r.stderr.count("\n") == 1, r.stderr


@pytest.mark.slow
def test_benchmark_train_quick(tmp_path):
  """--train: a training step with mesh (data, sequence) = (8, 1) and (4, 2), 8 CPU devices."""
  out = tmp_path / "spt.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-m", "longax.benchmarks.sequence_parallel", "--quick",
                      "--train", str(pathlib.Path(__file__).parent / "tiny_train_config.py"),
                      "--out", str(out)], env=env, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = json.loads(out.read_text())
  assert [x["P"] for x in rows] == [2, 1] and all(x["tokens_per_s"] > 0 for x in rows)
  assert rows[0]["vs_data_parallel"] > 0 and "vs_data_parallel" not in rows[1]


def test_benchmark_profile_row(tmp_path):
  """--profile's numbers for a row: kernel time per call from a trace kept in the given
  folder (on the CPU the host's XLA ops), no collective here, the top kernels named."""
  import jax
  import jax.numpy as jnp
  from longax.benchmarks.sequence_parallel import _profiled
  fn = jax.jit(lambda x: jnp.sin(x) @ x)
  row = _profiled(fn, [jnp.ones((64, 64))], 2, str(tmp_path))
  assert row["device_ms_fwd_bwd"] > 0 and row["comm_ms_fwd_bwd"] == 0
  assert row["top_kernels"] and any(tmp_path.rglob("*.xplane.pb"))


def test_benchmark_train_empty_run_says_why(monkeypatch, tmp_path):
  """A training run that timed no interval (stopped early) is an error row saying so."""
  import argparse
  from longax.benchmarks import sequence_parallel as bench
  from longax.benchmarks import train as bench_train
  monkeypatch.setattr(bench_train, "run_longax", lambda cfg, workdir: [])
  args = argparse.Namespace(train=str(pathlib.Path(__file__).parent / "tiny_train_config.py"),
                            devices=[1], lengths=[32], layouts=["contiguous"],
                            sp_attention="ring", train_steps=4, set=[], out=None)
  (row,) = bench.run_train(args)
  assert row["error"].startswith("RuntimeError: no timed interval")


if __name__ == "__main__":
  sys.path.insert(0, str(pathlib.Path(__file__).parent))
  os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
  _worker(sys.argv[1:])


def test_benchmark_fwd_bwd_is_the_gradient_call(monkeypatch):
  """fwd+bwd is the gradient call's time, not forward + gradient (which counts the forward
  twice: the benchmark did so until 2026-11-26)."""
  from longax.benchmarks import sequence_parallel as bench
  times = iter([1.0, 3.0])  # forward call, then the gradient call
  monkeypatch.setattr(bench, "_time", lambda fn, xs, reps: next(times))
  x = jnp.ones((1, 8, 2, 4))
  row = bench._timed_row(lambda q, k, v: q * k * v, (x, x, x), reps=1)
  assert row == dict(ms_fwd=1.0, ms_fwd_bwd=3.0)


@pytest.mark.parametrize("wall, device, comm, want", [
    (8.0, 10.0, 2.0, 1.0),    # wall = compute alone: the collectives all hidden
    (10.0, 10.0, 2.0, 0.0),   # wall = compute + comm: none hidden
    (9.0, 10.0, 2.0, 0.5),
    (12.0, 10.0, 2.0, 0.0),   # gaps beyond the comm time: clipped
    (10.0, 10.0, 0.0, None),  # no collective
])
def test_benchmark_overlap(wall, device, comm, want):
  from longax.benchmarks.sequence_parallel import overlap
  assert overlap(wall, device, comm) == (None if want is None else pytest.approx(want))


@pytest.mark.long
def test_benchmark_loss_inside_has_the_same_gradients():
  """--loss inside (sum(o) per device, psum'd, inside shard_map) differentiates to the same
  gradients as the sum of the gathered output, for each op (2 simulated CPU devices). Both
  gradients in one jitted program per op, as the benchmark times them: eager, every op of the
  shard_map's backward dispatched (and compiled) on its own took ~130 s."""
  code = """
import jax, jax.numpy as jnp
from longax.benchmarks import sequence_parallel as b
for op in ["ring", "ulysses", "lasp2"]:
  xs = b._placed(b._inputs(op, 1, 32, 4, 2, 8, jnp.float32), 2)
  fn, loss = b._fn(op, 2, "zigzag"), b._loss_fn(op, 2, "zigzag")
  both = jax.jit(lambda *a: (jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=(0, 1, 2))(*a),
                             jax.grad(loss, argnums=(0, 1, 2))(*a)))
  want, got = both(*xs)
  print(op, max(float(jnp.max(jnp.abs(w - g)) / jnp.max(jnp.abs(w))) for w, g in zip(want, got)))
"""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  errs = dict(line.split() for line in r.stdout.splitlines())
  assert sorted(errs) == ["lasp2", "ring", "ulysses"]
  assert all(float(e) < 1e-6 for e in errs.values()), errs


def test_benchmark_bad_loss_names_the_flag(capsys):
  """--loss takes inside or outside; anything else stops before any work, naming the value."""
  from longax.benchmarks.sequence_parallel import main
  with pytest.raises(SystemExit) as e:
    main(["--loss", "sideways"])
  assert e.value.code == 2
  assert "argument --loss: invalid choice: 'sideways'" in capsys.readouterr().err
