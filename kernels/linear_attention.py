"""Linear attention: one chunked recurrence, the decay form a parameter.

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,      o_t = scale * q_t S_t

q [B, T, H, Dk], k [B, T, Hkv, Dk], v [B, T, Hkv, Dv] (H % Hkv == 0), state [B, H, Dk, Dv]
in float32. The log decay g (<= 0) is one of
    None          no decay (plain linear attention, Based)
    [H]           per-head constant (RetNet, Lightning Attention)
    [B, T, H]     data-dependent scalar (Mamba-2 SSD)
    [B, T, H, Dk] data-dependent per key (GLA)
and is carried internally as g [B, T, H, 1 or Dk]. Packed documents: the state is zeroed
wherever `segment_ids` changes.

The XLA path is chunked (Lightning-Attention-2 style): inside a chunk of C tokens the
quadratic form, between chunks the state recurrence `pass_states`, the same combine that
LASP-2 applies between devices. Every decay factor is exp of a non-positive number: the
cumulative log decay G is only ever used as a difference G_later - G_earlier. Per-key decay
inside a chunk goes through sub-chunks (`_intra_per_key`), never a [.., C, C, Dk] tensor.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from einops import rearrange

from longax.kernels import _checks
from longax.kernels._dispatch import register, register_kernels, resolve
from longax.kernels._vma import vary_like

CHUNK = 64


def _resets(segment_ids, b: int, t: int):
  """[B, T] bool: the state is zeroed before token t (never before token 0); None if no
  segment ids are given."""
  if segment_ids is None:
    return None
  change = segment_ids[:, 1:] != segment_ids[:, :-1]
  return jnp.concatenate([jnp.zeros((b, 1), bool), change], axis=1)


# ----------------------------------------------------------------------------- reference


def _per_query_head(q, k, v):
  """k, v [B, T, Hkv, D] -> [B, T, H, D] (GQA: query head h reads head h // (H // Hkv))."""
  return tuple(jnp.repeat(x, q.shape[2] // x.shape[2], axis=2) for x in (k, v))


def linear_attention_reference(q, k, v, g, h0, resets, scale, **_blocks):
  """Token-by-token recurrence in float32. Shapes as in `_linear_attention_xla`."""
  k, v = _per_query_head(q, k, v)
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  b, t, h = q.shape[:3]
  g = jnp.zeros((b, t, h, 1)) if g is None else g
  resets = jnp.zeros((b, t), bool) if resets is None else resets

  def step(s, xs):
    q_t, k_t, v_t, g_t, r_t = xs  # [B,H,Dk], [B,H,Dk], [B,H,Dv], [B,H,1|Dk], [B]
    s = jnp.where(r_t[:, None, None, None], 0.0, s)
    s = jnp.exp(g_t)[..., None] * s + k_t[..., :, None] * v_t[..., None, :]
    return s, scale * jnp.einsum("bhk,bhkv->bhv", q_t, s)

  xs = [jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, resets)]
  s, o = jax.lax.scan(step, vary_like(h0, xs), xs)
  return jnp.moveaxis(o, 0, 1), s


register("linear_attention", "reference")(linear_attention_reference)

# ----------------------------------------------------------------------------------- XLA


def pass_states(decay, local, initial):
  """Chunk-state recurrence S_{c+1} = diag(decay_c) S_c + local_c.

  decay: [N, B, H, 1|Dk]; local: [N, B, H, Dk, Dv]; initial: [B, H, Dk, Dv].
  Returns (the state entering each chunk [N, B, H, Dk, Dv], the final state).
  """

  def step(s, xs):
    a, l = xs
    return a[..., None] * s + l, s

  final, entering = jax.lax.scan(step, vary_like(initial, decay, local), (decay, local))
  return entering, final


SUB = 16  # per-key decay: sub-chunk size inside a chunk (FLA chunk_gla's BC)


def _dot(spec, a, b, dtype, precision=None):
  """einsum on operands cast to `dtype` (the inputs' dtype: bf16 inputs keep bf16 matmuls)
  with float32 accumulation and result."""
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), precision=precision,
                    preferred_element_type=jnp.float32)


def _intra(q, k, gc, visible, sub: int = SUB, exact: bool = False):
  """Within-chunk scores sum_d q_id k_jd exp(G_id - G_jd) on visible (j <= i) pairs.

  q, k: [B, H, N, C, Dk] (matmul operands in their dtype); gc: cumulative log decay
  [B, H, N, C, 1|Dk] float32 or None; visible: [B|1, 1, N|1, C, C]. Returns [B, H, N, C, C]
  float32. exact (per-key gc): the sub-chunk products on float32 operands at HIGHEST
  precision (the Hopper kernels' strong-decay form: see `_intra_per_key`).
  """
  if gc is None:
    return _dot("bhnid,bhnjd->bhnij", q, k, q.dtype) * visible
  if gc.shape[-1] == 1:
    return _dot("bhnid,bhnjd->bhnij", q, k, q.dtype) * _masked_exp(_pairwise(gc)[..., 0], visible)
  return _intra_per_key(q, k, gc, visible, math.gcd(q.shape[3], sub), exact)


def _masked_exp(x, mask):
  """exp(x) where mask, else 0, with finite gradients: x may be large and positive where
  masked out (the double where)."""
  return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)


def _pairwise(gc):
  """[..., S, D] -> [..., S, S, D]: gc_i - gc_j, <= 0 for j <= i (gc is non-increasing)."""
  return gc[..., :, None, :] - gc[..., None, :, :]


@jax.checkpoint
def _diag_scores(q, k, gc, mask):
  """q, k, gc: [.., S, Dk]; mask [.., S, S]. sum_d q_id k_jd exp(gc_id - gc_jd) on mask:
  one elementwise product and reduction, which the backward recomputes rather than keeping
  [.., S, S, Dk] alive."""
  decay = _masked_exp(_pairwise(gc), mask[..., None])  # [.., S, S, Dk]
  q, k = q.astype(jnp.float32), k.astype(jnp.float32)
  return jnp.sum(q[..., :, None, :] * k[..., None, :, :] * decay, axis=-1)


def _intra_per_key(q, k, gc, visible, sub: int, exact: bool = False):
  """`_intra` for gc [B, H, N, C, Dk] without [.., C, C, Dk]: sub-chunks of `sub` tokens.

  Off-diagonal blocks (row sub-chunk r after column sub-chunk s) are a matmul of
  q_i exp(G_i - G_r) and k_j exp(G_r - G_j), G_r the decay at the first token of r: both
  exponents <= 0. Diagonal blocks are elementwise on [.., S, S, Dk]. Peak [B,H,N,C,S|C/S,Dk].
  exact: that matmul on float32 operands at HIGHEST precision. On an H100 its bf16 form
  inside the Hopper kernels' forward-and-gradient program gave non-finite decay gradients
  in about half the runs of one compiled executable at decays of -10 nats per token (an XLA
  Triton GEMM of its backward; none in float32, NOTES.md session 16).
  """
  blocks = lambda x: rearrange(x, "... (r i) d -> ... r i d", i=sub)
  q, k, gc = blocks(q), blocks(k), blocks(gc)  # [B,H,N,R,S,Dk]
  m = q.shape[-3]
  g_r = gc[..., :1, :]  # [B,H,N,R,1,Dk]
  earlier = jnp.tril(jnp.ones((m, m), bool), -1)[:, :, None, None]  # [R,R',1,1]: s < r
  q_r = q * jnp.exp(gc - g_r)
  k_r = k[..., None, :, :, :] * _masked_exp(g_r[..., :, None, :, :] - gc[..., None, :, :, :],
                                            earlier)  # [B,H,N,R,R',S,Dk]
  off = _dot("bhnrid,bhnrsjd->bhnrsij", q_r, k_r, *((jnp.float32, jax.lax.Precision.HIGHEST)
                                                    if exact else (q.dtype,)))  # [B,H,N,R,R',S,S]

  vis = rearrange(visible, "... (r i) (s j) -> ... r s i j", i=sub, j=sub)
  vis_diag = jnp.moveaxis(jnp.diagonal(vis, axis1=-4, axis2=-3), -1, -3)  # [..,R,S,S]
  diag = _diag_scores(q, k, gc, vis_diag)  # [B,H,N,R,S,S]
  scores = jnp.where(jnp.eye(m, dtype=bool)[:, :, None, None], diag[..., None, :, :], off * vis)
  return rearrange(scores, "... r s i j -> ... (r i) (s j)")


class Chunked(NamedTuple):
  """The chunked form of one call: operands [B, H, N, C, D] (k, v per query head), the
  cumulative log decay gc [B, H, N, C, 1|Dk] (None: no decay) and the factors below; the
  XLA path and the TPU kernel's backward share it."""
  q: Any
  k: Any
  v: Any
  gc: Any
  from_start: Any  # exp(G): chunk start -> token (1 without decay)
  to_end: Any  # exp(G_last - G): token -> chunk end
  across: Any  # [B, H|1, N, 1|Dk]: the state's decay over the chunk, times `carry`
  same_in: Any  # [B, 1, N, C, 1]: the token sees the incoming state (1: no resets)
  same_end: Any  # the token reaches the outgoing state
  visible: Any  # [B|1, 1, N|1, C, C]: causal pairs of one document
  t: int


def chunked(q, k, v, g, resets, chunk: int) -> Chunked:
  """q: [B, T, H, Dk]; k, v: [B, T, Hkv, Dk|Dv]; g: [B, T, H, 1|Dk] f32 or None; resets:
  [B, T] bool or None. T is padded to a multiple of `chunk`."""
  k, v = _per_query_head(q, k, v)
  b, t = q.shape[:2]
  n = -(-t // chunk)
  pad = n * chunk - t
  padt = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  to_chunks = lambda x: rearrange(padt(x), "b (n c) h d -> b h n c d", c=chunk)
  q, k, v = (to_chunks(x) for x in (q, k, v))
  causal = jnp.tril(jnp.ones((chunk, chunk), bool))

  # Decay factors, all exp of a non-positive number (1 without decay).
  gc = None if g is None else jnp.cumsum(to_chunks(g.astype(jnp.float32)), axis=3)  # [B,H,N,C,1|Dk]
  from_start = 1.0 if gc is None else jnp.exp(gc)
  to_end = 1.0 if gc is None else jnp.exp(gc[..., -1:, :] - gc)
  across = jnp.ones((b, 1, n, 1)) if gc is None else jnp.exp(gc[..., -1, :])

  # Segment masks: who sees the incoming state, who reaches the outgoing one (1: no resets).
  same_in = same_end = 1.0
  visible = causal
  if resets is not None:
    seg = rearrange(jnp.cumsum(padt(resets), axis=1), "b (n c) -> b n c", c=chunk)
    seg_in = seg[..., 0] - rearrange(padt(resets), "b (n c) -> b n c", c=chunk)[..., 0]
    same_in = (seg == seg_in[..., None])[:, None, ..., None]
    same_end = (seg == seg[..., -1:])[:, None, ..., None]
    across = across * (seg[..., -1] == seg_in)[:, None, :, None]  # no reset in the chunk
    visible = causal & (seg[..., :, None] == seg[..., None, :])[:, None]  # [B,1,N,C,C]
  return Chunked(q, k, v, gc, from_start, to_end, across, same_in, same_end, visible, t)


def chunk_states(c: Chunked, dt):
  """-> (decay [N, B, H|1, 1|Dk], local [N, B, H, Dk, Dv]): S_leaving = decay S_entering + local."""
  local = _dot("bhncd,bhnce->nbhde", c.k * c.to_end * c.same_end, c.v, dt)
  return rearrange(c.across, "b h n d -> n b h d"), local


def chunk_outputs(c: Chunked, entering, scale, dt):
  """o [B, T, H, Dv] float32 from the states entering each chunk [N, B, H, Dk, Dv]."""
  o_intra = _dot("bhnij,bhnje->bhnie", _intra(c.q, c.k, c.gc, c.visible), c.v, dt)
  o_inter = _dot("bhncd,nbhde->bhnce", c.q * c.from_start * c.same_in, entering, dt)
  o = scale * rearrange(o_intra + o_inter, "b h n c e -> b (n c) h e")
  return o[:, :c.t]


def _linear_attention_xla(q, k, v, g, h0, resets, scale, chunk: int = CHUNK):
  """q: [B, T, H, Dk]; k, v: [B, T, Hkv, Dk|Dv]; g: [B, T, H, 1|Dk] f32 or None; h0: [B, H,
  Dk, Dv] f32; resets: [B, T] bool or None. Returns (o [B, T, H, Dv] f32, final state).
  Matmul operands stay in the dtype of q, k, v; decays, scores and states are float32.
  Chunk-local states, then the recurrence over chunks, then the outputs."""
  c = chunked(q, k, v, g, resets, chunk)
  entering, final = pass_states(*chunk_states(c, q.dtype), h0)
  return chunk_outputs(c, entering, scale, q.dtype), final


register("linear_attention", "xla")(_linear_attention_xla)

# ----------------------------------------------------------------------------- public API


def _log_decay(op, log_decay, b, t, h, dk):
  """Normalises the decay forms to g [B, T, H, 1|Dk] float32 (or None: no decay)."""
  if log_decay is None:
    return None
  _checks.floating(op, "log_decay", log_decay)
  g = jnp.asarray(log_decay, jnp.float32)
  forms = {(h,): lambda: jnp.broadcast_to(g[:, None], (b, t, h, 1)),
           (b, t, h): lambda: g[..., None],
           (b, t, h, dk): lambda: g}
  if g.shape not in forms:
    raise ValueError(
        f"{op}: `log_decay` must be [H]={(h,)}, [B,T,H]={(b, t, h)} or [B,T,H,Dk]="
        f"{(b, t, h, dk)}, got {g.shape}")
  return forms[g.shape]()


def _check_qkv(op, q, k, v, time_axis: bool):
  names = "[B, T, H, Dk]", "[B, T, Hkv, Dk]", "[B, T, Hkv, Dv]"
  if not time_axis:
    names = tuple(n.replace("T, ", "") for n in names)
  r = 4 if time_axis else 3
  for name, x, layout in zip("qkv", (q, k, v), names):
    _checks.rank(op, name, x, r, layout)
  _checks.same_dtype(op, q=q, k=k, v=v)
  _checks.floating(op, "q", q)
  lead = q.shape[:-2]
  if k.shape[:-2] != lead or v.shape[:-1] != k.shape[:-1] or k.shape[-1] != q.shape[-1]:
    raise ValueError(f"{op}: shapes must be q {names[0]}, k {names[1]}, v {names[2]}; "
                     f"got q {q.shape}, k {k.shape}, v {v.shape}")
  _checks.divides(op, f"q heads H={q.shape[-2]} vs k/v heads Hkv={k.shape[-2]}",
                  k.shape[-2], q.shape[-2])


def _check_state(op, state, b, h, dk, dv):
  if state is not None:
    _checks.shape_is(op, "initial_state", state, (b, h, dk, dv), "[B, H, Dk, Dv]")
    _checks.floating(op, "initial_state", state)


def linear_attention(q, k, v, *, log_decay=None, initial_state=None, segment_ids=None,
                     scale: float | None = None, chunk_size: int = CHUNK,
                     return_final_state: bool = False, impl: str = "auto"):
  """Causal linear attention with optional decay; see the module docstring.

  Returns o [B, T, H, Dv] (dtype of q) or (o, final_state [B, H, Dk, Dv] float32).
  """
  op = "linear_attention"
  _check_qkv(op, q, k, v, time_axis=True)
  _checks.positive_int(op, "chunk_size", chunk_size)
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  g = _log_decay(op, log_decay, b, t, h, dk)
  _check_state(op, initial_state, b, h, dk, dv)
  if segment_ids is not None:
    _checks.shape_is(op, "segment_ids", segment_ids, (b, t), "[B, T]")
  h0 = (jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None
        else initial_state.astype(jnp.float32))
  scale = dk**-0.5 if scale is None else scale
  fn = resolve(op, impl, dict(q=q, k=k, v=v, g=g, chunk=chunk_size))
  o, final = fn(q, k, v, g, h0, _resets(segment_ids, b, t), scale, chunk=chunk_size)
  o = o.astype(q.dtype)
  return (o, final) if return_final_state else o


def linear_attention_step(q_t, k_t, v_t, state, log_decay_t=None, scale: float | None = None):
  """One decoding step. q_t [B, H, Dk], k_t [B, Hkv, Dk], v_t [B, Hkv, Dv] (or each with
  a time axis of length 1), state [B, H, Dk, Dv]; log_decay_t [H], [B, H] or [B, H, Dk]
  (or [B, 1, H], [B, 1, H, Dk]). Returns (o_t like q_t with Dv, new state float32)."""
  op = "linear_attention_step"
  time_axis = jnp.ndim(q_t) == 4
  if time_axis:
    _check_qkv(op, q_t, k_t, v_t, time_axis=True)
    if q_t.shape[1] != 1:
      raise ValueError(f"{op}: `q_t` must hold one token, got shape {q_t.shape}")
    q_t, k_t, v_t = q_t[:, 0], k_t[:, 0], v_t[:, 0]
    if log_decay_t is not None and jnp.ndim(log_decay_t) >= 3:
      log_decay_t = jnp.asarray(log_decay_t)[:, 0]
  _check_qkv(op, q_t, k_t, v_t, time_axis=False)
  b, h, dk = q_t.shape
  dv = v_t.shape[-1]
  _checks.shape_is(op, "state", state, (b, h, dk, dv), "[B, H, Dk, Dv]")
  if log_decay_t is not None and jnp.ndim(log_decay_t) >= 2:
    log_decay_t = jnp.expand_dims(log_decay_t, 1)  # [B, 1, H(, Dk)]: a sequence of one
  g = _log_decay(op, log_decay_t, b, 1, h, dk)
  decay = 1.0 if g is None else jnp.exp(g[:, 0])[..., None]  # [B, H, 1|Dk, 1]
  k_t, v_t = (jnp.repeat(x, h // x.shape[1], axis=1).astype(jnp.float32) for x in (k_t, v_t))
  state = decay * state.astype(jnp.float32) + k_t[..., :, None] * v_t[..., None, :]
  scale = dk**-0.5 if scale is None else scale
  o = (scale * jnp.einsum("bhk,bhkv->bhv", q_t.astype(jnp.float32), state)).astype(q_t.dtype)
  return (o[:, None] if time_axis else o), state


# The Mosaic GPU kernel (Hopper) is impl="pallas" off TPU; the Pallas TPU kernel impl="pallas" on
# TPU and impl="pallas_interpret" anywhere (CPU). Each asks `unsupported` which calls it takes.
from longax.kernels.gpu import linear_attention as _gpu  # noqa: E402
from longax.kernels.tpu import linear_attention as _tpu  # noqa: E402

register_kernels("linear_attention", gpu=(_gpu.linear_attention_pallas, _gpu.unsupported),
                 tpu=(_tpu.linear_attention_pallas, _tpu.unsupported),
                 interpret=(functools.partial(_tpu.linear_attention_pallas, interpret=True),
                            functools.partial(_tpu.unsupported, interpret=True)))
