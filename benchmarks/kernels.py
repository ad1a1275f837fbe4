"""Times every kernel op's impls, forward and forward+backward, beside the peers.

    python -m longax.benchmarks.kernels --quick            # CPU smoke run / demo
    python -m longax.benchmarks.kernels --json out.json    # the GPU grid, peers included

Every row is first checked against longax's float32 reference on the same inputs
(`err` = ||out - ref|| / ||ref||), then timed: median over `--reps` runs after warm-up.
`vs xla` is longax-xla's time over the row's time (> 1: faster than our XLA path).
On a GPU the peers that import are added in the same run: cuDNN through
`jax.nn.dot_product_attention`, tokamax, jax-linear-attention (jla) and
flash-linear-attention (fla, PyTorch/Triton). `--ops block_sparse_attention` times the
block-sparse op at 10/25/50% of the causal blocks beside dense attention (ours and cuDNN) at
the same shape, FLOPs from the mask's pairs. `--ops nsa` times NSA's attention core
(`layers.NSA.attend`: compressed, selected and window branches and gates) fwd and fwd+bwd,
`--ops vertical_slash` MInference's vertical-slash prefill (forward only; two patterns of one
budget: the estimated one, `vertical_slash`, and a local band with spread columns,
`vertical_slash[band]`), `--ops sparse_prefill` the inference CLI's sparse prefill
attention (pattern estimate included; block top-k with and without its summary branch,
vertical-slash; forward only; `--ops block_max` its estimate alone, `block_max_scores`),
all beside dense causal attention (ours and cuDNN) at the same
shape, at 8k..64k / 32k..128k tokens on the GPU
grid (`python -m longax.benchmarks.plots sparse` draws the speedups). A row that runs out of
memory prints `oom` in the column it was timing. Attention FLOPs are counted the
FlashAttention way: 4*B*H*T*S*D forward, halved if causal, x3.5 for forward+backward.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from longax import kernels as K
from longax.benchmarks.profile import device_time


@dataclasses.dataclass
class Row:
  name: str
  fwd: Callable[[], Any]  # runs the forward once, returns the output (any array type)
  fwd_bwd: Callable[[], Any] | None  # runs forward + backward once, blocks
  same_op: bool = True  # False: a baseline of another op (no err, no TFLOP/s of the case)


@dataclasses.dataclass
class Case:
  op: str
  shape: dict
  flops_fwd: float | None
  reference: Callable[[], Any]
  rows: list[Row]


def _block(x):
  if hasattr(x, "block_until_ready") or isinstance(x, (tuple, list, dict)):
    return jax.block_until_ready(x)
  import torch  # a peer's output
  torch.cuda.synchronize()
  return x


def _median_ms(fn, reps: int) -> float:
  for _ in range(2):
    _block(fn())
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    _block(fn())
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def _to_np(x) -> np.ndarray:
  if isinstance(x, (tuple, list)):
    x = x[0]
  if hasattr(x, "detach"):
    return x.detach().float().cpu().numpy()
  return np.asarray(jnp.asarray(x, jnp.float32))


def jax_row(name: str, f: Callable, args: tuple, bwd: bool = True) -> Row:
  """A row for a JAX function of `args` (gradients w.r.t. every argument; bwd=False: forward
  only, for ops timed without a backward or with integer arguments)."""
  fwd = jax.jit(f)
  if not bwd:
    return Row(name, lambda: fwd(*args), None)
  ct = jax.random.normal(jax.random.key(7), jax.eval_shape(f, *args).shape, jnp.float32)

  def loss(ct, *a):  # ct is an argument: as a closure constant XLA would fold it for minutes
    return jnp.vdot(ct, f(*a).astype(jnp.float32))

  grad = jax.jit(jax.grad(loss, argnums=tuple(range(1, len(args) + 1))))
  return Row(name, lambda: fwd(*args), lambda: grad(ct, *args))


def torch_row(name: str, f: Callable, args: tuple) -> Row:
  """A row for a PyTorch function of jax `args` (moved over with dlpack)."""
  import torch

  t_args = [torch.from_dlpack(a).clone().requires_grad_(True) for a in args]

  def fwd():
    with torch.no_grad():
      return f(*t_args)

  def fwd_bwd():
    out = f(*t_args)
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    return out

  return Row(name, fwd, fwd_bwd)


def _longax_rows(op: str, f: Callable, args: tuple, on_gpu: bool, bwd: bool = True) -> list[Row]:
  """longax's rows for `f(*args, impl=...)`: the reference (CPU only: timing the oracle tells
  nothing on a GPU), xla, and auto where a kernel of `op` can make it differ from xla."""
  impls = ("xla", "auto") if "pallas" in K.available(op) else ("xla",)
  impls = impls if on_gpu else ("reference",) + impls
  return [jax_row(f"longax.{impl}", lambda *a, impl=impl: f(*a, impl=impl), args, bwd)
          for impl in impls]


def _peer(rows: list[Row], name: str, make: Callable[[], Row]) -> None:
  """Appends a peer's row; a peer that is missing or fails to build is reported, not fatal."""
  try:
    rows.append(make())
  except Exception as e:  # noqa: BLE001
    print(f"# {name} unavailable: {e!r}", file=sys.stderr)


def _reference(f: Callable, args: tuple, small: bool) -> Callable[[], Any]:
  """The float32 oracle of a case: the reference impl, or for shapes too large for its
  full score matrix / token loop, the XLA path (checked against it in tests/) in float32."""
  f32 = tuple(a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a
              for a in args)  # integer arguments (index lists) as they are
  impl = "reference" if small else "xla"
  return lambda: jax.jit(lambda *a: f(*a, impl=impl))(*f32)


# ------------------------------------------------------------------------------ the cases


def _attention_inputs(b, t, h, hkv, d, dtype, seed):
  """q [B, T, H, D], k / v [B, T, Hkv, D]: standard normal."""
  keys = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(keys[0], (b, t, h, d), dtype),
          jax.random.normal(keys[1], (b, t, hkv, d), dtype),
          jax.random.normal(keys[2], (b, t, hkv, d), dtype))


def attention_cases(shapes, dtype, on_gpu) -> list[Case]:
  out = []
  for b, t, h, hkv, d in shapes:
    q, k, v = _attention_inputs(b, t, h, hkv, d, dtype, seed=0)
    flops = 4 * b * h * t * t * d / 2
    shape = dict(B=b, T=t, H=h, Hkv=hkv, D=d, causal=True)
    for op, fn in (("attention", K.attention), ("sigmoid_attention", K.sigmoid_attention)):
      rows = _longax_rows(op, lambda q, k, v, impl, fn=fn: fn(q, k, v, impl=impl), (q, k, v),
                          on_gpu)
      if op == "attention" and on_gpu:
        rows += _attention_peers(q, k, v)
      ref = _reference(lambda q, k, v, fn=fn, impl="reference": fn(q, k, v, impl=impl),
                       (q, k, v), small=t <= 2048)
      out.append(Case(op, shape, flops, ref, rows))
  return out


def _attention_peers(q, k, v) -> list[Row]:
  rows = []
  args = (q, k, v)
  rows.append(jax_row("cudnn", lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation="cudnn"), args))

  def tokamax_row():
    import tokamax
    return jax_row("tokamax", lambda q, k, v: tokamax.dot_product_attention(
        q, k, v, is_causal=True), args)

  def jla_row():
    from jla.ops.mosaic_gpu.attention import flash_attention
    return jax_row("jla.mosaic_gpu", lambda q, k, v: flash_attention(q, k, v), args)

  _peer(rows, "tokamax", tokamax_row)
  _peer(rows, "jla attention", jla_row)
  return rows


def linear_cases(shapes, dtype, on_gpu, decay_names=("none", "scalar", "key")) -> list[Case]:
  out = []
  for b, t, h, d in shapes:
    keys = jax.random.split(jax.random.key(1), 4)
    q, k, v = (jax.random.normal(kk, (b, t, h, d), dtype) * d**-0.25 for kk in keys[:3])
    decays = {
        "none": None,
        "scalar": -jax.nn.softplus(jax.random.normal(keys[3], (b, t, h))),
        "key": -jax.nn.softplus(jax.random.normal(keys[3], (b, t, h, d))) / 8,
    }
    for name, g in decays.items():
      if name not in decay_names:
        continue
      args = (q, k, v) if g is None else (q, k, v, g)
      la = lambda *a, impl: K.linear_attention(*a[:3], log_decay=a[3] if len(a) > 3 else None,
                                               impl=impl)
      rows = _longax_rows("linear_attention", la, args, on_gpu)
      if on_gpu:
        rows += _linear_peers(name, args, d)
      ref = _reference(lambda *a, impl="reference": la(*a, impl=impl), args, small=t <= 4096)
      out.append(Case(f"linear_attention[{name}]", dict(B=b, T=t, H=h, D=d), None, ref, rows))
  return out


def _linear_peers(decay: str, args, d: int) -> list[Row]:
  rows = []
  q, k, v = args[:3]
  g = args[3] if len(args) > 3 else jnp.zeros(q.shape[:3], jnp.float32)
  kind = "gla" if decay == "key" else "simple_gla"

  def jla_row():  # jla's Mosaic GPU kernel where it has one, else its chunked path
    from jla.ops import linear_attention as jla_la
    return jax_row("jla.auto", lambda q, k, v, g: jla_la(
        kind, q, k, v, g=g, scale=d**-0.5, impl="auto")[0], (q, k, v, g))

  def fla_row():
    if decay == "none":
      from fla.ops.linear_attn import chunk_linear_attn
      return torch_row("fla.chunk", lambda q, k, v: chunk_linear_attn(
          q, k, v, scale=d**-0.5, normalize=False)[0], (q, k, v))
    if decay == "scalar":
      from fla.ops.simple_gla import chunk_simple_gla
      return torch_row("fla.chunk", lambda q, k, v, g: chunk_simple_gla(
          q, k, v, g=g.float(), scale=d**-0.5)[0], (q, k, v, g))
    from fla.ops.gla import chunk_gla
    return torch_row("fla.chunk", lambda q, k, v, g: chunk_gla(
        q, k, v, g=g.float(), scale=d**-0.5)[0], (q, k, v, g))

  _peer(rows, "jla", jla_row)
  _peer(rows, "fla", fla_row)
  return rows


def scan_cases(shapes, dtype, on_gpu) -> list[Case]:
  out = []
  for b, l, d, n in shapes:
    keys = jax.random.split(jax.random.key(2), 6)
    u = jax.random.normal(keys[0], (b, l, d), dtype)
    delta = (jax.random.normal(keys[1], (b, l, d)) * 0.5 - 2).astype(dtype)
    A = -jnp.exp(jax.random.normal(keys[2], (d, n)) * 0.5)
    Bm = jax.random.normal(keys[3], (b, l, n), dtype)
    Cm = jax.random.normal(keys[4], (b, l, n), dtype)
    args = (u, delta, Bm, Cm)
    ss = lambda u, delta, Bm, Cm, impl, A=A: K.selective_scan(u, delta, A, Bm, Cm,
                                                         delta_softplus=True, impl=impl)
    rows = _longax_rows("selective_scan", ss, args, on_gpu)

    def jla_row(A=A, args=args):
      from jla.ops import linear_attention as jla_la
      return jax_row("jla.auto", lambda u, delta, Bm, Cm: jla_la(
          "mamba1", Cm, Bm, u, dt=delta, a=A, dt_softplus=True)[0], args)

    if on_gpu:
      _peer(rows, "jla mamba1", jla_row)
    ref = _reference(lambda *a, impl="reference": ss(*a, impl=impl), args,
                     small=l <= 4096 and d * n <= 2**15)
    out.append(Case("selective_scan", dict(B=b, L=l, D=d, N=n), None, ref, rows))
  return out


def ssd_cases(shapes, dtype, on_gpu) -> list[Case]:
  out = []
  for b, t, h, p, n in shapes:
    keys = jax.random.split(jax.random.key(3), 5)
    x = jax.random.normal(keys[0], (b, t, h, p), dtype)
    dt = jax.nn.softplus(jax.random.normal(keys[1], (b, t, h)) - 2)
    A = -jnp.exp(jax.random.normal(keys[2], (h,)) * 0.5)
    Bm = jax.random.normal(keys[3], (b, t, 1, n), dtype)
    Cm = jax.random.normal(keys[4], (b, t, 1, n), dtype)
    args = (x, dt, A, Bm, Cm)  # all jit arguments: a captured dt * A gets constant-folded
    f = lambda x, dt, A, Bm, Cm, impl: K.ssd(x, dt, A, Bm, Cm, impl=impl)
    rows = _longax_rows("ssd", f, args, on_gpu)

    def jla_row(h=h, args=args):
      from jla.ops import linear_attention as jla_la
      rep = lambda m: jnp.repeat(m, h, axis=2)
      return jax_row("jla.auto", lambda x, dt, A, Bm, Cm: jla_la(
          "simple_gla", rep(Cm), rep(Bm), (x * dt[..., None]).astype(x.dtype),
          g=dt * A, scale=1.0)[0], args)

    if on_gpu:
      _peer(rows, "jla ssd", jla_row)
    ref = _reference(lambda *a, impl="reference": f(*a, impl=impl), args, small=t <= 4096)
    out.append(Case("ssd", dict(B=b, T=t, H=h, P=p, N=n), None, ref, rows))
  return out


def _sparse_mask(nq: int, nk: int, h: int, density: float, seed: int = 0) -> np.ndarray:
  """bool [1, H, nq, nk]: each causally visible block on with probability `density`, the
  diagonal always on (no row is empty); concrete, so the XLA path's loop is static."""
  rng = np.random.default_rng(seed)
  causal = np.tril(np.ones((nq, nk), bool), k=nk - nq)
  on = (rng.random((1, h, nq, nk)) < density) & causal
  on |= np.eye(nq, nk, k=nk - nq, dtype=bool)
  return on


def sparse_cases(shapes, dtype, on_gpu, densities=(0.1, 0.25, 0.5), block=64) -> list[Case]:
  """Block-sparse attention at several densities beside dense attention (the same shape):
  the goal is time within 1.2x of density x dense time. FLOPs from the mask's pairs. A shape
  (B, T, H, Hkv, D[, block]) may name its own square block size (else `block`)."""
  out = []
  for b, t, h, hkv, d, *own in shapes:
    bs = own[0] if own else block
    q, k, v = _attention_inputs(b, t, h, hkv, d, dtype, seed=4)
    nq = -(-t // bs)
    for density in densities:
      mask = _sparse_mask(nq, nq, h, density)
      pairs = b * bs * bs * (mask.sum() - 0.5 * h * nq)  # diagonal blocks: half
      f = lambda q, k, v, impl, mask=mask, bs=bs: K.block_sparse_attention(
          q, k, v, mask, block_q=bs, block_k=bs, impl=impl)
      rows = _longax_rows("block_sparse_attention", f, (q, k, v), on_gpu)
      rows += _dense_rows(q, k, v, on_gpu)
      ref = _reference(lambda *a, impl="reference", f=f: f(*a, impl=impl), (q, k, v),
                       small=t <= 2048)
      out.append(Case(f"block_sparse[{density:.0%}]",
                      dict(B=b, T=t, H=h, Hkv=hkv, D=d, block=bs, causal=True),
                      4.0 * d * pairs, ref, rows))
  return out


def _dense_rows(q, k, v, on_gpu: bool, bwd: bool = True) -> list[Row]:
  """The dense causal attention baselines of a sparse case at its shape: ours (auto: the
  Hopper kernel on a GPU) and cuDNN on a GPU; rows `dense.*`, not checked (another op)."""
  rows = [jax_row("dense.longax.auto", lambda q, k, v: K.attention(q, k, v), (q, k, v), bwd)]
  if on_gpu:
    rows.append(jax_row("dense.cudnn", lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn"), (q, k, v), bwd))
  return [dataclasses.replace(r, same_op=False) for r in rows]


def nsa_pairs(t: int, block_size: int, stride: int, select_block: int, n_selected: int,
              window: int) -> int:
  """(query, key) pairs one head of NSA's three branches folds over T tokens: compressed
  blocks past the query, its selected blocks' keys up to it, its window."""
  p = np.arange(t)
  cmp = np.clip((p - block_size + 1) // stride + 1, 0, None)
  sel = (np.minimum(n_selected, p // select_block + 1) - 1) * select_block + p % select_block + 1
  return int((cmp + sel + np.minimum(p + 1, window)).sum())


def nsa_cases(shapes, dtype, on_gpu) -> list[Case]:
  """NSA's attention core (`layers.NSA.attend`: compression, compressed-token attention,
  top-n block selection, `selected_block_attention`, the sliding window, the gates; not
  the projections) as a function of q, k, v and the gate logits, fwd and fwd+bwd, beside
  dense causal attention at the same shape. Each shape's dict: NSA's settings (the layer's
  defaults, the paper's, where empty). FLOPs from the three branches' pairs (`nsa_pairs`;
  the selection's scores, another pass over the compressed keys, not counted). On a GPU also
  `longax.auto.xla_select`: auto with the selection's importance on the XLA path
  (`select_impl="xla"`; auto takes its Hopper kernel)."""
  from flax import nnx
  from longax.layers import NSA
  out = []
  for b, t, h, hkv, d, kw in shapes:
    q, k, v = _attention_inputs(b, t, h, hkv, d, dtype, seed=5)
    gates = jax.random.normal(jax.random.key(6), (b, t, h, 3), dtype)
    layer = NSA(h * d, h, hkv, head_dim=d, **kw, rngs=nnx.Rngs(0), dtype=dtype,
                param_dtype=jnp.float32)
    f = lambda q, k, v, g, impl, layer=layer: layer.attend(q, k, v, g, impl=impl)
    # auto: every branch on the Hopper kernels (the compressed one as causal attention over
    # rows folded into heads, the selected one on the block-sparse kernels, the window)
    rows = _longax_rows("attention", f, (q, k, v, gates), on_gpu) + _dense_rows(q, k, v, on_gpu)
    if on_gpu:  # the selection's importance on the XLA path, for comparison
      slow = NSA(h * d, h, hkv, head_dim=d, **kw, select_impl="xla", rngs=nnx.Rngs(0),
                 dtype=dtype, param_dtype=jnp.float32)
      rows.append(jax_row("longax.auto.xla_select", lambda q, k, v, g, m=slow: m.attend(
          q, k, v, g, impl="auto"), (q, k, v, gates), True))
    ref = _reference(lambda *a, impl="reference", f=f: f(*a, impl=impl), (q, k, v, gates),
                     small=t <= 2048)
    cfg = dict(block_size=layer.block_size, stride=layer.stride, select_block=layer.select_block,
               n_selected=layer.n_selected, window=layer.window)
    pairs = b * h * nsa_pairs(t, **cfg)
    cfg = dict(l=cfg["block_size"], d=cfg["stride"], sel=cfg["select_block"],
               n=cfg["n_selected"], w=cfg["window"])
    out.append(Case("nsa", dict(B=b, T=t, H=h, Hkv=hkv, D=d, **cfg), 4.0 * d * pairs, ref, rows))
  return out


# MInference's vertical-slash budget at 128k tokens (its LLaMA-3 setting), scaled with T.
VS_BUDGET = (1000, 6096, 131072)


def vs_budget(t: int) -> tuple[int, int]:
  """(n_vertical, n_slash) at T tokens: VS_BUDGET in proportion to T (so about the same
  share of the causal pairs at every T: at most 2 (nv + ns) / T = 11%), at least 1 each."""
  nv, ns, at = VS_BUDGET
  return max(1, round(nv * t / at)), max(1, round(ns * t / at))


def vs_pairs(vert: np.ndarray, slash: np.ndarray, t: int) -> int:
  """(query, key) pairs a vertical-slash pattern keeps, causal, T == S: vert / slash
  [B, H, n] (-1 unused, repeats once); a key on a column and a slash counts once."""
  total = 0
  for v_bh, s_bh in zip(vert.reshape(-1, vert.shape[-1]), slash.reshape(-1, slash.shape[-1])):
    v_bh, s_bh = np.unique(v_bh[v_bh >= 0]), np.unique(s_bh[s_bh >= 0])
    both = np.searchsorted(v_bh, t - s_bh).sum()  # column j on slash o for query j + o < T
    total += (t - v_bh).sum() + (t - s_bh).sum() - both
  return int(total)


def vs_band_pattern(b: int, h: int, t: int, nv: int, ns: int) -> tuple[jax.Array, jax.Array]:
  """A realistic pattern with the same budget (MInference's heads: a local band, a few hundred
  columns): slashes the ns smallest offsets 0..ns-1 (one run), columns spread evenly over T."""
  vert = np.round(np.linspace(0, t - 1, nv)).astype(np.int32)
  slash = np.arange(ns, dtype=np.int32)
  return (jnp.asarray(np.broadcast_to(vert, (b, h, nv))),
          jnp.asarray(np.broadcast_to(slash, (b, h, ns))))


def vertical_slash_cases(shapes, dtype, on_gpu) -> list[Case]:
  """MInference's vertical-slash prefill, forward only, beside dense causal attention, two
  patterns with `vs_budget(T)`: `vertical_slash` from `vertical_slash_pattern` (the last 64
  queries' scores; on random inputs its offsets are scattered), `vertical_slash[band]` a local
  band and spread columns (`vs_band_pattern`), both passed as jit arguments (a captured one
  would be constant-folded); FLOPs from the kept pairs (`vs_pairs`)."""
  out = []
  for b, t, h, hkv, d in shapes:
    q, k, v = _attention_inputs(b, t, h, hkv, d, dtype, seed=6)
    nv, ns = vs_budget(t)
    estimated = K.vertical_slash_pattern(q, k, n_vertical=nv, n_slash=ns)
    f = lambda q, k, v, vert, slash, impl: K.vertical_slash_attention(q, k, v, vert, slash,
                                                                      impl=impl)
    for name, (vert, slash) in (("vertical_slash", estimated),
                                ("vertical_slash[band]", vs_band_pattern(b, h, t, nv, ns))):
      pairs = vs_pairs(np.asarray(vert), np.asarray(slash), t)
      args = (q, k, v, vert, slash)
      rows = _longax_rows("vertical_slash_attention", f, args, on_gpu, bwd=False)
      rows += _dense_rows(q, k, v, on_gpu, bwd=False)
      ref = _reference(lambda *a, impl="reference": f(*a, impl=impl), args, small=t <= 1024)
      out.append(Case(name, dict(B=b, T=t, H=h, Hkv=hkv, D=d, nv=nv, ns=ns), 4.0 * d * pairs,
                      ref, rows))
  return out


def sparse_prefill_cases(shapes, dtype, on_gpu) -> list[Case]:
  """`longax.infer --sparse-prefill`'s attention of a whole prompt (`layers.sparse_prefill.
  attend`: the pattern's estimate from q, k and the sparse attention), forward only, at one
  budget of keys per query: block top-k (`prefill.topk`), the same with the summary
  branch (`prefill.topk+summary`), vertical-slash (`prefill.vertical_slash`); the first
  case of a shape carries the dense causal baselines. Every head takes the middle option of
  `choices` (block top-k: half its blocks the nearest ones; vertical-slash: half its budget
  columns). FLOPs: `budget` keys per query (the summary's T / block keys not counted)."""
  from longax.layers import sparse_prefill as sp
  out = []
  for b, t, h, hkv, d, budget, block in shapes:
    q, k, v = _attention_inputs(b, t, h, hkv, d, dtype, seed=8)
    for i, (kind, summary) in enumerate((("block_topk", False), ("block_topk", True),
                                         ("vertical_slash", False))):
      heads = (sp.choices(kind, budget, block)[1],) * h
      f = lambda q, k, v, impl, kind=kind, heads=heads, summary=summary: sp.attend(
          q, k, v, kind, heads, budget, block, impl=impl, summary=summary)
      op = "block_sparse_attention" if kind == "block_topk" else "vertical_slash_attention"
      rows = _longax_rows(op, f, (q, k, v), on_gpu, bwd=False)
      rows += _dense_rows(q, k, v, on_gpu, bwd=False) if i == 0 else []
      ref = _reference(lambda *a, impl="reference", f=f: f(*a, impl=impl), (q, k, v),
                       small=t <= 1024)
      name = "prefill." + {"block_topk": "topk"}.get(kind, kind) + ("+summary" if summary else "")
      pairs = b * h * sum(min(p + 1, budget) for p in range(t))
      out.append(Case(name, dict(B=b, T=t, H=h, Hkv=hkv, D=d, budget=budget, block=block),
                      4.0 * d * pairs, ref, rows))
  return out


def block_max_cases(shapes, dtype, on_gpu) -> list[Case]:
  """Block top-k's estimate alone (`block_max_scores`: each probe row's best score per key
  block, causal rows), forward: the XLA path and, on a GPU, the kernel (`longax.pallas`, off
  `auto` until timed). Shapes (B, T, Hkv, G, D): the prefill's rows, T / 64 query blocks x G
  query heads x PROBES probes per KV head, against T keys; FLOPs of the rows' products up to
  each row's block (2 R T D / 2)."""
  from longax.layers.sparse_prefill import PROBES
  out = []
  for b, t, hkv, g, d in shapes:
    r = (t // 64) * g * PROBES
    q, k = (jax.random.normal(key, (b, n, hkv, d), dtype)
            for key, n in zip(jax.random.split(jax.random.key(9)), (r, t)))
    f = lambda q, k, impl: (lambda x: jnp.where(jnp.isinf(x), 0.0, x))(  # err: -inf as 0
        K.block_max_scores(q, k, block=64, row_block=g * PROBES, impl=impl))
    impls = ("xla", "pallas") if on_gpu else ("reference", "xla")
    rows = [jax_row(f"longax.{i}", lambda q, k, i=i: f(q, k, i), (q, k), bwd=False) for i in impls]
    ref = _reference(lambda *a, impl="reference": f(*a, impl), (q, k), small=t <= 1024)
    out.append(Case("block_max", dict(B=b, T=t, Hkv=hkv, G=g, D=d), b * hkv * r * t * d, ref, rows))
  return out


# NSA's settings at the CPU grids' tiny T (the GPU grid takes the layer's, the paper's)
NSA_TINY = dict(block_size=16, stride=8, select_block=32, n_selected=3, window=64)

def _grid(attention, linear_attention, selective_scan, ssd, block_sparse_attention, nsa=(),
          vertical_slash=(), sparse_prefill=(), block_max=()) -> dict:
  """A grid: each --ops name's shapes (a tuple per case, the case function's order)."""
  return dict(attention=attention, linear_attention=linear_attention,
              selective_scan=selective_scan, ssd=ssd, block_sparse_attention=block_sparse_attention,
              nsa=nsa, vertical_slash=vertical_slash, sparse_prefill=sparse_prefill,
              block_max=block_max)


GRIDS = {
    "quick": _grid([(1, 128, 4, 2, 32)], [(1, 256, 4, 32)], [(1, 256, 64, 8)],
                   [(1, 256, 4, 32, 16)], [(1, 256, 2, 1, 32)],
                   nsa=[(1, 256, 4, 1, 32, NSA_TINY)], vertical_slash=[(1, 256, 2, 1, 32)],
                   sparse_prefill=[(1, 256, 2, 1, 32, 64, 16)], block_max=[(1, 256, 1, 2, 32)]),
    "cpu": _grid([(1, 1024, 8, 2, 64)], [(1, 2048, 8, 64)], [(1, 2048, 256, 16)],
                 [(1, 2048, 8, 64, 64)], [(1, 1024, 4, 2, 64)],
                 nsa=[(1, 1024, 16, 1, 64, NSA_TINY)], vertical_slash=[(1, 1024, 4, 2, 64)],
                 sparse_prefill=[(1, 1024, 4, 2, 64, 256, 64)], block_max=[(1, 1024, 2, 2, 64)]),
    # nsa (issue #15): the paper's kernel setting on one GPU, GQA group 16 (H=16, Hkv=1,
    # D=128), the paper's l=32, d=16, l'=64, n=16, w=512, 8k..64k tokens. vertical_slash:
    # one KV group of LLaMA-3-8B, MInference's model (H=4, Hkv=1, D=128), 32k..128k tokens
    # (all 32 heads: the XLA path's index lists and gathers need ~74 GB at 32k).
    "gpu": _grid([(2, 4096, 16, 4, 128)], [(2, 4096, 16, 128)], [(2, 4096, 1024, 16)],
                 [(2, 4096, 16, 64, 128)],
                 [(2, 4096, 16, 4, 128), (1, 16384, 16, 4, 128, 64)]
                 + [(1, t, 16, 4, 128, 128) for t in (16384, 32768, 65536)],
                 nsa=[(1, t, 16, 1, 128, {}) for t in (8192, 16384, 32768, 65536)],
                 vertical_slash=[(1, t, 4, 1, 128) for t in (32768, 65536, 131072)],
                 # sparse_prefill: the 8k needle check's setting (1024 keys per query, blocks
                 # of 64) on a GQA shape, 8k..64k tokens
                 sparse_prefill=[(1, t, 16, 4, 128, 1024, 64)
                                 for t in (8192, 16384, 32768, 65536)],
                 block_max=[(1, t, 4, 4, 128) for t in (16384, 65536)]),
    # the linear family's issue grid: N = 2k..32k at a fixed 32k tokens (B = 32k / N), D = 64 and 128
    # (cuDNN / our softmax kernel at the same shapes: where the linear family crosses over)
    "long": _grid([(32 * 1024 // t, t, 16, 16, d) for d in (128, 64) for t in (2048, 8192, 32768)],
                  [(32 * 1024 // t, t, 16, d) for d in (128, 64) for t in (2048, 8192, 32768)],
                  [(2, 8192, 1024, 16)], [(2, 8192, 16, 64, 128)],
                  [(32 * 1024 // t, t, 16, 16, 128) for t in (8192, 32768)]),
    "anchor": _grid([(2, 8192, 16, 16, 128)], [(2, 8192, 16, 128)], [(2, 8192, 1024, 16)],
                    [(2, 8192, 16, 64, 128)], [(2, 8192, 16, 16, 128)]),
}
OPS = tuple(GRIDS["quick"])


def _is_oom(e: Exception) -> bool:
  """An allocation that did not fit (XLA's RESOURCE_EXHAUSTED, at compile or run time)."""
  msg = str(e)
  return "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower()


def _error(e: Exception) -> str:
  return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"


def run(grid: str, dtype, reps: int, ops: set[str], bwd: bool, stream=None,
        decays=("none", "scalar", "key"), rows: tuple[str, ...] | None = None,
        check: bool = True, lengths: tuple[int, ...] | None = None,
        profile: bool = False) -> list[dict]:
  """rows: keep only the rows whose name starts with one of these (None: all); check=False
  skips the float32 reference (no `err`): on a GPU most of a case's time is compiling;
  lengths: keep only the grid's shapes of these sequence lengths (None: all)."""
  on_gpu = jax.default_backend() == "gpu"
  makers = {"attention": attention_cases,
            "linear_attention": lambda *a: linear_cases(*a, decays),
            "selective_scan": scan_cases, "ssd": ssd_cases,
            "block_sparse_attention": sparse_cases, "nsa": nsa_cases,
            "vertical_slash": vertical_slash_cases, "sparse_prefill": sparse_prefill_cases,
            "block_max": block_max_cases}
  cases = [c for name, make in makers.items() if name in ops
           for c in make([s for s in GRIDS[grid][name] if lengths is None or s[1] in lengths],
                         dtype, on_gpu)]
  return time_cases(cases, reps, bwd, stream, rows, check, profile)


def time_cases(cases: list[Case], reps: int, bwd: bool, stream=None,
               rows: tuple[str, ...] | None = None, check: bool = True,
               profile: bool = False) -> list[dict]:
  """One record per (case, row). A row that fails keeps its `error` line; one that runs out
  of memory also gets `oom`: the column it was timing (`fwd_ms` or `fwd_bwd_ms`), which the
  table prints as `oom`; the forward time stays where only the backward did not fit. A
  reference that fails leaves its case unchecked (a note on stderr), not the run dead.
  profile: also the kernels' time per call on the first device from a profiler trace
  (`fwd_dev_ms`, `fwd_bwd_dev_ms`): wall time far above it is host or launch overhead."""
  try:
    from tqdm import tqdm
  except ImportError:  # pragma: no cover
    tqdm = lambda x, **_: x
  results = []
  # With a stream the rows are the progress (a bar's carriage returns would share a line of
  # merged output with them); without, a bar on stderr.
  for case in tqdm(cases, desc="benchmark", file=sys.stderr, disable=stream is not None):
    want = None
    if check:
      try:
        want = _to_np(case.reference())
      except Exception as e:  # noqa: BLE001
        shape = ",".join(f"{k}={v}" for k, v in case.shape.items())
        print(f"# {case.op} {shape}: reference failed, no err ({_error(e)})", file=sys.stderr)
    base = None
    for row in case.rows:
      if rows is not None and not row.name.startswith(rows):
        continue
      rec = dict(op=case.op, shape=case.shape, impl=row.name)
      stage = "fwd_ms"
      try:
        got = _to_np(row.fwd())
        if want is not None and row.same_op:
          rec["err"] = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
        del got
        rec["fwd_ms"] = _median_ms(row.fwd, reps)
        if profile:
          rec["fwd_dev_ms"] = device_time(row.fwd, reps)["total_ms_per_step"]
        if bwd and row.fwd_bwd is not None:
          stage = "fwd_bwd_ms"
          rec["fwd_bwd_ms"] = _median_ms(row.fwd_bwd, reps)
          if profile:
            rec["fwd_bwd_dev_ms"] = device_time(row.fwd_bwd, reps)["total_ms_per_step"]
      except Exception as e:  # noqa: BLE001 - one failing row must not sink the table
        rec["error"] = _error(e)
        if _is_oom(e):
          rec["oom"] = stage
      if case.flops_fwd and "fwd_ms" in rec and row.same_op:
        rec["fwd_tflops"] = case.flops_fwd / rec["fwd_ms"] / 1e9
        if "fwd_bwd_ms" in rec:
          rec["fwd_bwd_tflops"] = 3.5 * case.flops_fwd / rec["fwd_bwd_ms"] / 1e9
      if row.name == "longax.xla":
        base = rec
      if base and "fwd_ms" in rec and "fwd_ms" in base:
        rec["fwd_vs_xla"] = base["fwd_ms"] / rec["fwd_ms"]
        if "fwd_bwd_ms" in rec and "fwd_bwd_ms" in base:
          rec["fwd_bwd_vs_xla"] = base["fwd_bwd_ms"] / rec["fwd_bwd_ms"]
      results.append(rec)
      if stream is not None:  # one line per row as it lands: a run cut short still reports
        print(table([rec], header=False), file=stream, flush=True)
  return results


# The printed table's columns and widths (one space between columns); `plots` reads it back.
COLUMNS = (("op", 24), ("shape", 40), ("impl", 17), ("err", 8), ("fwd_ms", 9),
           ("fwd_bwd_ms", 10), ("fwd_vs_xla", 10), ("fwd_bwd_vs_xla", 14),
           ("fwd_bwd_tflops", 14), ("fwd_dev_ms", 10), ("fwd_bwd_dev_ms", 14))


def table(results: list[dict], header: bool = True) -> str:
  cols = COLUMNS
  fmt = lambda v: (f"{v:.3g}" if isinstance(v, float) else
                   ",".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else str(v))
  lines = [" ".join(name.ljust(w) for name, w in cols)] if header else []
  for r in results:
    cell = lambda name: r.get(name, "oom" if r.get("oom") == name else "")
    line = " ".join(fmt(cell(name)).ljust(w)[:w] for name, w in cols)
    lines.append(line + (f"  {r['error']}" if "error" in r else ""))
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--grid", choices=sorted(GRIDS), default=None,
                 help="shape grid (default: gpu on a GPU, else cpu)")
  p.add_argument("--quick", action="store_true", help="tiny shapes, few reps (a demo)")
  p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                 help="default: bfloat16 on GPU, float32 on CPU")
  p.add_argument("--reps", type=int, default=None)
  p.add_argument("--ops", default="attention,linear_attention,selective_scan,ssd",
                 help="comma-separated; also block_sparse_attention (10/25/50%% density), "
                      "nsa (NSA's attention core), vertical_slash (MInference's prefill, "
                      "forward only) and sparse_prefill (longax.infer --sparse-prefill's "
                      "attention, pattern estimate included, forward only), each beside dense "
                      "attention at the same shape; block_max: block top-k's estimate alone")
  p.add_argument("--decays", default="none,scalar,key",
                 help="linear_attention decay forms to time (none, scalar, key)")
  p.add_argument("--no-bwd", action="store_true", help="time the forward only")
  p.add_argument("--json", default=None, help="also write the results here")
  p.add_argument("--stream", action="store_true",
                 help="print each row as it lands (instead of the progress bar)")
  p.add_argument("--rows", default=None,
                 help="keep only these rows (name prefixes, e.g. longax.auto,jla,fla,cudnn)")
  p.add_argument("--lengths", type=int, nargs="+", default=None,
                 help="keep only the grid's shapes of these sequence lengths T")
  p.add_argument("--profile", action="store_true",
                 help="also each row's kernel time per call on the first device, from a "
                      "profiler trace (columns fwd_dev_ms, fwd_bwd_dev_ms)")
  p.add_argument("--no-check", action="store_true",
                 help="skip the float32 reference check (no err column; faster on a GPU)")
  a = p.parse_args(argv)
  on_gpu = jax.default_backend() == "gpu"
  grid = "quick" if a.quick else a.grid or ("gpu" if on_gpu else "cpu")
  dtype = jnp.dtype(a.dtype or ("bfloat16" if on_gpu else "float32"))
  reps = a.reps or (3 if a.quick else 10 if not on_gpu else 20)
  ops = set(a.ops.split(","))
  unknown = ops - set(OPS)
  if unknown:
    p.error(f"unknown --ops {sorted(unknown)}; valid: {', '.join(OPS)}")
  have = sorted({s[1] for name in ops for s in GRIDS[grid][name]})
  if a.lengths and not set(a.lengths) & set(have):
    p.error(f"--lengths {' '.join(map(str, a.lengths))}: no shape of the {grid!r} grid for "
            f"--ops {','.join(sorted(ops))} has that T; its lengths: {', '.join(map(str, have))}")
  results = run(grid, dtype, reps, ops, not a.no_bwd, stream=sys.stdout if a.stream else None,
                decays=tuple(a.decays.split(",")),
                rows=tuple(a.rows.split(",")) if a.rows else None, check=not a.no_check,
                lengths=tuple(a.lengths) if a.lengths else None, profile=a.profile)
  meta = dict(date=datetime.date.today().isoformat(), device=str(jax.devices()[0].device_kind),
              backend=jax.default_backend(), jax=jax.__version__, dtype=str(dtype), grid=grid,
              reps=reps)
  print("# " + ", ".join(f"{k}={v}" for k, v in meta.items()))
  print(table(results))
  if a.json:
    with open(a.json, "w") as f:
      json.dump(dict(meta=meta, results=results), f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
