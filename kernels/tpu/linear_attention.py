"""Chunked linear attention for TPU in Pallas (Mosaic TPU): every log_decay form.

Registered as `impl="pallas"` (TPU backend) and `impl="pallas_interpret"` (TPU interpret mode,
on CPU) of `linear_attention`; see `kernels/linear_attention.py` for the API, the float32
reference and the XLA path, whose chunked form (`chunked`) this kernel shares. Per chunk of C
tokens, G the chunk-local cumulative log decay ([C, 1] scalar forms, [C, Dk] per key), S the
state entering the chunk ([Dk, Dv] float32 in VMEM scratch, carried across the "arbitrary"
chunk axis of the grid (B, H, N)):

    o  = scale * ((q k^T) * exp(G_i - G_j) [j <= i, one document]) v + scale * (q * fs) S
    S' = across * S + (k * te)^T v

fs = exp(G) (times "sees the incoming state"), te = exp(G_last - G) (times "reaches the
outgoing state"), across = exp(G_last) (times "no reset in the chunk"): every exponent is <= 0
on the pairs it is used for (masked before exp). The per-key intra-chunk scores are elementwise
on a [C, C, Dk] tile (VPU, not MXU), hence per key's smaller chunk.

Backward (`jax.custom_vjp`): the forward also stores the state entering every chunk; a reverse
state pass kernel (grid (B, H, N) walked from the last chunk, dS in f32 VMEM scratch) gives the
gradient of the state leaving every chunk and of the initial state:
    dS = across * dS' + scale * (q * fs)^T do
and the chunk-parallel rest (dq, dk, dv, d log_decay) is the VJP of the XLA path's chunk
functions (`chunk_outputs`, `chunk_states`) with those states held fixed: batched XLA over
chunks, no sequential dependence left.

GQA: query head h reads K/V head h // group through the index maps (no repeat in the forward).
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
from einops import rearrange
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from longax.kernels._vma import same_vma
from longax.kernels.tpu import not_on_tpu, pallas_call, round_up, scan_params

F32 = jnp.float32
NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b
TN = (((0,), (0,)), ((), ()))  # a.T @ b

# Tokens per chunk (the op's chunk_size is taken up to these): per decay form.
DEFAULTS = {"none": 128, "scalar": 128, "per_key": 32}


def _form(g) -> str:
  return "none" if g is None else ("per_key" if g.shape[-1] > 1 else "scalar")


def chunk_for(g, chunk: int) -> int:
  return min(chunk, DEFAULTS[_form(g)])


def vmem_bytes(form: str, c: int, dk: int, dv: int, itemsize: int = 2) -> int:
  """VMEM one forward grid step holds: double-buffered q, k, v, factor and output blocks, the
  f32 state (scratch, entering-state output), and the [C, C] (per key [C, C, Dk]) f32
  temporaries. The reverse pass holds less (no k, v, scores)."""
  lane = lambda n: round_up(n, 128)
  dk, dv = lane(dk), lane(dv)
  gd = dk if form == "per_key" else 128
  io = 2 * (itemsize * c * (2 * dk + dv) + 4 * c * dv + 2 * 4 * c * gd)
  state = 3 * 4 * dk * dv
  temps = 3 * 4 * c * lane(c) * (dk if form == "per_key" else 1)
  return io + state + temps


@dataclasses.dataclass(frozen=True)
class _Config:
  scale: float
  chunk: int
  form: str
  group: int
  segments: bool
  interpret: bool


# ------------------------------------------------------------------------------- forward


def _forward_kernel(*refs, cfg: _Config):
  q_ref, k_ref, v_ref, fs_ref, te_ref, across_ref, h0_ref, *refs = refs
  if cfg.form != "none":
    g_ref, *refs = refs
    if cfg.form == "scalar":
      grow_ref, *refs = refs
  if cfg.segments:
    sc_ref, sr_ref, *refs = refs
  o_ref, ent_ref, final_ref, s_ref = refs
  n = pl.program_id(2)

  @pl.when(n == 0)
  def _init():
    s_ref[...] = h0_ref[0, 0]

  q, k, v = q_ref[0, 0], k_ref[0, 0], v_ref[0, 0]
  c = q.shape[0]
  s_in = s_ref[...]
  ent_ref[0, 0, 0] = s_in
  vis = lax.broadcasted_iota(jnp.int32, (c, c), 1) <= lax.broadcasted_iota(jnp.int32, (c, c), 0)
  if cfg.segments:
    vis &= sc_ref[0] == sr_ref[0]
  if cfg.form == "per_key":  # sum_d q_id k_jd exp(G_id - G_jd), [C, C, Dk] elementwise
    g = g_ref[0, 0]
    diff = jnp.where(vis[:, :, None], g[:, None, :] - g[None, :, :], 0.0)
    a = jnp.sum(q.astype(F32)[:, None, :] * k.astype(F32)[None, :, :] * jnp.exp(diff), axis=-1)
  else:
    a = lax.dot_general(q, k, NT, preferred_element_type=F32)
    if cfg.form == "scalar":
      a = a * jnp.exp(jnp.where(vis, g_ref[0, 0] - grow_ref[0, 0], 0.0))
  a = jnp.where(vis, a, 0.0)
  o = lax.dot_general(a.astype(v.dtype), v, NN, preferred_element_type=F32)
  qd = (q * fs_ref[0, 0]).astype(q.dtype)
  o = o + lax.dot_general(qd, s_in.astype(q.dtype), NN, preferred_element_type=F32)
  o_ref[0, 0] = cfg.scale * o
  kd = (k * te_ref[0, 0]).astype(k.dtype)
  s_ref[...] = across_ref[0, 0, 0] * s_in + lax.dot_general(kd, v, TN, preferred_element_type=F32)

  @pl.when(n == pl.num_programs(2) - 1)
  def _finish():
    final_ref[0, 0] = s_ref[...]


def _head_major(x):
  """[B, Tp, H, D] -> [B, H, Tp, D]."""
  return jnp.swapaxes(x, 1, 2)


def _factors(ch):
  """fs, te [B, H, Tp, 1|Dk] and across [B, H, N, 1|Dk, 1], float32, from the chunked form."""
  b, h, n, c = ch.q.shape[:4]
  full = lambda x, d: jnp.broadcast_to(jnp.asarray(x, F32), (b, h, n, c, d))
  d = 1 if ch.gc is None else ch.gc.shape[-1]
  flat = lambda x: rearrange(full(x, d), "b h n c d -> b h (n c) d")
  across = jnp.broadcast_to(ch.across.astype(F32), (b, h, n, d))[..., None]
  return flat(ch.from_start * ch.same_in), flat(ch.to_end * ch.same_end), across


def _forward(q, k, v, g, h0, run, cfg: _Config):
  """q [B, Tp, H, Dk], k / v [B, Tp, Hkv, D], g [B, Tp, H, 1|Dk] or None, run [B, Tp] document
  ids or None -> (o [B, H, Tp, Dv] f32, entering [N, B, H, Dk, Dv] f32, final [B, H, Dk, Dv])."""
  lin = sys.modules["longax.kernels.linear_attention"]
  ch = lin.chunked(q, q, q[..., :1], g, _resets(run), cfg.chunk)  # its factors only
  fs, te, across = _factors(ch)
  b, tp, h, dk = q.shape
  dv, c, grp = v.shape[-1], cfg.chunk, cfg.group
  n = tp // c
  tok = lambda d: pl.BlockSpec((1, 1, c, d), lambda b, h, i: (b, h, i, 0))
  kv_tok = lambda d: pl.BlockSpec((1, 1, c, d), lambda b, h, i: (b, h // grp, i, 0))
  state = pl.BlockSpec((1, 1, dk, dv), lambda b, h, i: (b, h, 0, 0))
  fd = fs.shape[-1]
  in_specs = [tok(dk), kv_tok(dk), kv_tok(dv), tok(fd), tok(fd),
              pl.BlockSpec((1, 1, 1, fd, 1), lambda b, h, i: (b, h, i, 0, 0)), state]
  args = [_head_major(q), _head_major(k), _head_major(v), fs, te, across, h0]
  if cfg.form != "none":
    gc = rearrange(ch.gc, "b h n c d -> b h (n c) d")
    in_specs.append(tok(gc.shape[-1]))
    args.append(gc)
    if cfg.form == "scalar":
      in_specs.append(pl.BlockSpec((1, 1, 1, c), lambda b, h, i: (b, h, 0, i)))
      args.append(jnp.swapaxes(gc, 2, 3))
  if cfg.segments:
    in_specs += [pl.BlockSpec((1, c, 1), lambda b, h, i: (b, i, 0)),
                 pl.BlockSpec((1, 1, c), lambda b, h, i: (b, 0, i))]
    args += [run[:, :, None], run[:, None, :]]
  return pallas_call(
      functools.partial(_forward_kernel, cfg=cfg),
      grid=(b, h, n), in_specs=in_specs,
      out_specs=[tok(dv), pl.BlockSpec((1, 1, 1, dk, dv), lambda b, h, i: (i, b, h, 0, 0)), state],
      out_shape=[jax.ShapeDtypeStruct((b, h, tp, dv), F32),
                 jax.ShapeDtypeStruct((n, b, h, dk, dv), F32),
                 jax.ShapeDtypeStruct((b, h, dk, dv), F32)],
      scratch_shapes=[pltpu.VMEM((dk, dv), F32)], **scan_params(cfg.interpret))(*args)


# ------------------------------------------------------------------------------ backward


def _reverse_kernel(q_ref, do_ref, fs_ref, across_ref, dfinal_ref, dleave_ref, dh0_ref, ds_ref,
                    *, cfg: _Config):
  i = pl.program_id(2)

  @pl.when(i == 0)
  def _init():
    ds_ref[...] = dfinal_ref[0, 0]

  ds = ds_ref[...]
  dleave_ref[0, 0, 0] = ds
  q, do = q_ref[0, 0], do_ref[0, 0]
  qd = (q * fs_ref[0, 0]).astype(q.dtype)
  ds_ref[...] = across_ref[0, 0, 0] * ds + cfg.scale * lax.dot_general(
      qd, do.astype(q.dtype), TN, preferred_element_type=F32)

  @pl.when(i == pl.num_programs(2) - 1)
  def _finish():
    dh0_ref[0, 0] = ds_ref[...]


def _reverse_states(q, do, fs, across, dfinal, cfg: _Config):
  """-> (d state leaving each chunk [N, B, H, Dk, Dv], d initial state [B, H, Dk, Dv])."""
  b, h, tp, dk = q.shape
  dv, c = do.shape[-1], cfg.chunk
  n = tp // c
  rev = lambda i: n - 1 - i
  tok = lambda d: pl.BlockSpec((1, 1, c, d), lambda b, h, i: (b, h, rev(i), 0))
  state = pl.BlockSpec((1, 1, dk, dv), lambda b, h, i: (b, h, 0, 0))
  per_chunk = lambda d1, d2: pl.BlockSpec((1, 1, 1, d1, d2), lambda b, h, i: (b, h, rev(i), 0, 0))
  fd = fs.shape[-1]
  return pallas_call(
      functools.partial(_reverse_kernel, cfg=cfg),
      grid=(b, h, n), in_specs=[tok(dk), tok(dv), tok(fd), per_chunk(fd, 1), state],
      out_specs=[pl.BlockSpec((1, 1, 1, dk, dv), lambda b, h, i: (rev(i), b, h, 0, 0)), state],
      out_shape=[jax.ShapeDtypeStruct((n, b, h, dk, dv), F32),
                 jax.ShapeDtypeStruct((b, h, dk, dv), F32)],
      scratch_shapes=[pltpu.VMEM((dk, dv), F32)], **scan_params(cfg.interpret))(
          q, do, fs, across, dfinal)


# ---------------------------------------------------------------------------- the op


def _resets(run):
  """Document ids [B, Tp] -> resets [B, Tp] bool (the state is zeroed before the token)."""
  if run is None:
    return None
  return jnp.concatenate([jnp.zeros_like(run[:, :1], bool), run[:, 1:] != run[:, :-1]], axis=1)


def _pad(x, tp):
  return None if x is None else jnp.pad(x, [(0, 0), (0, tp - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _chunked(q, k, v, g, h0, run, cfg: _Config):
  """Padded inputs (Tp a multiple of the chunk) -> (o [B, H, Tp, Dv] f32, final state)."""
  o, _, final = _forward(q, k, v, g, h0, run, cfg)
  return o, final


def _chunked_fwd(q, k, v, g, h0, run, cfg: _Config):
  o, entering, final = _forward(q, k, v, g, h0, run, cfg)
  return (o, final), (q, k, v, g, run, entering)


def _chunked_bwd(cfg: _Config, res, cts):
  q, k, v, g, run, entering = res
  do, dfinal = cts
  lin = sys.modules["longax.kernels.linear_attention"]
  resets = _resets(run)
  ch = lin.chunked(q, k, v, g, resets, cfg.chunk)
  fs, _, across = _factors(ch)
  dleave, dh0 = _reverse_states(_head_major(q), do, fs, across, dfinal, cfg)

  def local(q, k, v, g):  # the chunks with their entering states held fixed
    ch = lin.chunked(q, k, v, g, resets, cfg.chunk)
    decay, local_states = lin.chunk_states(ch, q.dtype)
    leaving = decay[..., None] * entering + local_states
    return lin.chunk_outputs(ch, entering, cfg.scale, q.dtype), leaving

  _, vjp = jax.vjp(local, q, k, v, g)
  dq, dk, dv, dg = vjp((_head_major(do), dleave))
  drun = None if run is None else jnp.zeros(run.shape, jax.dtypes.float0)
  return dq, dk, dv, dg, dh0, drun


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def unsupported(call: dict, *, interpret: bool = False) -> str | None:
  """Why the kernel does not take this call (None: it does); a call without arrays (ssd
  asking whether the impl exists) is judged when linear_attention makes it."""
  if not interpret and (why := not_on_tpu(call)) is not None:
    return why
  if "q" in call and not interpret:
    q, v = call["q"], call["v"]
    if q.shape[-1] % 64 or v.shape[-1] % 64:
      return f"Dk={q.shape[-1]}, Dv={v.shape[-1]} (the TPU kernel takes multiples of 64)"
  return None


def linear_attention_pallas(q, k, v, g, h0, resets, scale, chunk: int = 64, interpret=False):
  """The kernel under the op's signature (shapes as in `_linear_attention_xla`); `chunk` is
  taken up to the form's `DEFAULTS` entry."""
  b, t = q.shape[:2]
  c = chunk_for(g, chunk)
  tp = round_up(t, c)
  run = None if resets is None else jnp.cumsum(resets, axis=1, dtype=jnp.int32)
  cfg = _Config(float(scale), c, _form(g), q.shape[2] // k.shape[2], run is not None, interpret)
  if run is not None:  # padded tokens (k = v = 0, no decay) stay in the last document
    run = jnp.pad(run, [(0, 0), (0, tp - t)], mode="edge")
  o, final = _chunked(*same_vma(_pad(q, tp), _pad(k, tp), _pad(v, tp), _pad(g, tp), h0), run, cfg)
  return jnp.swapaxes(o, 1, 2)[:, :t], final
