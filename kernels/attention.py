"""Softmax and sigmoid attention: one flash algorithm with a parameter.

Layout: q [B, T, H, D], k [B, S, Hkv, D], v [B, S, Hkv, Dv], H % Hkv == 0 (GQA).
Visibility (causal bottom-right, window, sinks, segments) comes from `visibility.py`.

- `kind="softmax"`: o_i = sum_j softmax_j(s_ij) v_j, with a running max and normaliser.
- `kind="sigmoid"` (FlashSigmoid): o_i = sum_j sigmoid(s_ij + bias) v_j; no max, no
  normaliser, the bias defaults to -log(S).

Here s_ij = scale * q_i.k_j, optionally soft-capped c*tanh(s/c). Rows that see no key
return 0. `attention_reference` is the math in float32; `_attention_xla` folds key blocks
of `kv_block` with `fold_block`, the same fold that ring attention applies across devices,
and has its own FlashAttention-2 backward (`_flash_backward`), so neither pass holds a
[T, S] score matrix.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from einops import rearrange

from longax.kernels import _checks
from longax.kernels._dispatch import register, register_kernels, resolve
from longax.kernels._vma import vary_like
from longax.kernels.visibility import query_positions, visible

KV_BLOCK = 512  # XLA path: keys folded per step (tuned defaults live in one place)


@dataclasses.dataclass(frozen=True)
class AttnSpec:
  kind: str  # "softmax" | "sigmoid"
  causal: bool
  scale: float
  window: int | None
  sinks: int
  softcap: float | None
  bias: float  # sigmoid only

  def mask(self, q_pos, k_pos, q_seg, k_seg):
    """[B or 1, T, S] visibility of keys `k_pos` to queries `q_pos`."""
    m = visible(q_pos, k_pos, causal=self.causal, window=self.window, sinks=self.sinks,
                q_seg=q_seg, k_seg=k_seg)
    return m if m.ndim == 3 else m[None]

  def logits(self, s):
    s = s * self.scale
    if self.softcap is not None:
      s = self.softcap * jnp.tanh(s / self.softcap)
    return s


# ----------------------------------------------------------------------------- reference


def attention_reference(q, k, v, q_pos, k_pos, q_seg, k_seg, spec: AttnSpec,
                        return_lse: bool = False, mask=None, **_blocks):
  """The math in float32 with the full [B, H, T, S] score matrix. return_lse: also the
  rows' log-sum-exp [B, T, H] (-inf where a row sees no key; softmax only). mask: an
  extra bool [B|1, H|1, T, S] visibility, and-ed with the spec's (sparse attention)."""
  h, hkv = q.shape[2], k.shape[2]
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  k = jnp.repeat(k, h // hkv, axis=2)
  v = jnp.repeat(v, h // hkv, axis=2)
  s = spec.logits(jnp.einsum("bthd,bshd->bhts", q, k))
  mask = spec.mask(q_pos, k_pos, q_seg, k_seg)[:, None] & (True if mask is None else mask)
  if spec.kind == "softmax":
    s = jnp.where(mask, s, -jnp.inf)
    lse = rearrange(jax.nn.logsumexp(s, axis=-1), "b h t -> b t h")
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
  else:
    p = jnp.where(mask, jax.nn.sigmoid(s + spec.bias), 0.0)
    lse = None
  o = jnp.einsum("bhts,bshd->bthd", p, v)
  return (o, lse) if return_lse else o


for _op in ("attention", "sigmoid_attention"):
  register(_op, "reference")(attention_reference)

# ----------------------------------------------------------------------------------- XLA


def init_carry(spec: AttnSpec, shape_btkg: tuple[int, ...], dv: int):
  """Empty accumulator for `fold_block`: (acc [..., T, Dv], row max, row sum)."""
  b, hkv, g, t = shape_btkg
  acc = jnp.zeros((b, hkv, g, t, dv), jnp.float32)
  if spec.kind == "sigmoid":
    return (acc,)
  return acc, jnp.full((b, hkv, g, t), -jnp.inf, jnp.float32), jnp.zeros((b, hkv, g, t), jnp.float32)


def fold_block(spec: AttnSpec, carry, qg, k_blk, v_blk, mask):
  """Folds one key block into the carry.

  qg: [B, T, Hkv, G, D]; k_blk: [B, C, Hkv, D]; v_blk: [B, C, Hkv, Dv];
  mask: [B or 1, T, C] visibility.
  """
  s = jnp.einsum("btkgd,bckd->bkgtc", qg, k_blk, preferred_element_type=jnp.float32)
  s = spec.logits(s)
  mask = mask[:, None, None]
  if spec.kind == "sigmoid":
    (acc,) = carry
    p = jnp.where(mask, jax.nn.sigmoid(s + spec.bias), 0.0)
    pv = jnp.einsum("bkgtc,bckd->bkgtd", p.astype(v_blk.dtype), v_blk,
                    preferred_element_type=jnp.float32)
    return (acc + pv,)
  acc, m, l = carry
  s = jnp.where(mask, s, -jnp.inf)
  # The output does not depend on the shift m, so no gradient flows through it.
  m_new = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(s, axis=-1)))
  m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
  p = jnp.exp(s - m_safe[..., None])
  alpha = jnp.exp(m - m_safe)
  l = alpha * l + jnp.sum(p, axis=-1)
  pv = jnp.einsum("bkgtc,bckd->bkgtd", p.astype(v_blk.dtype), v_blk,
                  preferred_element_type=jnp.float32)
  return alpha[..., None] * acc + pv, m_new, l


def merge_partials(o1, lse1, o2, lse2):
  """Two softmax attentions of the same rows over disjoint keys -> the one over their union:
  o [..., Dv] (float32 out), lse [...] natural log, -inf where a row saw no key (its o: 0)."""
  lse = jnp.logaddexp(lse1, lse2)
  safe = jnp.where(jnp.isneginf(lse), 0.0, lse)
  return o1 * jnp.exp(lse1 - safe)[..., None] + o2 * jnp.exp(lse2 - safe)[..., None], lse


def finish(spec: AttnSpec, carry):
  """Carry -> output [B, Hkv, G, T, Dv] (rows that saw no key give 0)."""
  if spec.kind == "sigmoid":
    return carry[0]
  acc, _, l = carry
  return acc / jnp.where(l > 0, l, 1.0)[..., None]


def _kv_blocks(t: int, k, v, k_pos, k_seg, kv_block: int):
  """Keys cut into blocks for a scan: k [N, B, C, Hkv, D], v [N, B, C, Hkv, Dv],
  positions [N, (B,) C] (padding slots at -1: invisible), segments [N, B, C] or None.

  All keys form one block when the [T, S] score tile is no larger than a square
  [kv_block, kv_block] one (decode: T=1 against a long cache), so a step neither pads
  (copies) the cache nor runs S / kv_block sequential scan steps."""
  s_len = k.shape[1]
  c = s_len if t * s_len <= kv_block**2 else min(kv_block, s_len)
  n_blk = -(-s_len // c)
  pad = n_blk * c - s_len
  pad_seq = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  ks = rearrange(pad_seq(k), "b (n c) k d -> n b c k d", c=c)
  vs = rearrange(pad_seq(v), "b (n c) k d -> n b c k d", c=c)
  k_pos = jnp.pad(k_pos, [(0, 0)] * (k_pos.ndim - 1) + [(0, pad)], constant_values=-1)
  pos = rearrange(k_pos, "... (n c) -> n ... c", c=c)
  segs = None if k_seg is None else rearrange(pad_seq(k_seg), "b (n c) -> n b c", c=c)
  return ks, vs, pos, segs


def _flash_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, spec: AttnSpec, kv_block: int):
  """-> (o [B, T, H, Dv], lse [B, Hkv, G, T]: log-sum-exp of each row's visible logits,
  +inf where a row sees nothing; None for sigmoid, which has no normaliser)."""
  b, t, h, _ = q.shape
  hkv, dv = k.shape[2], v.shape[3]
  qg = rearrange(q, "b t (k g) d -> b t k g d", k=hkv)

  def step(carry, xs):
    k_blk, v_blk, pos_blk, seg_blk = xs
    return fold_block(spec, carry, qg, k_blk, v_blk, spec.mask(q_pos, pos_blk, q_seg, seg_blk)), None

  carry0 = vary_like(init_carry(spec, (b, hkv, h // hkv, t), dv), q, k, v, q_pos, k_pos, q_seg, k_seg)
  carry, _ = jax.lax.scan(step, carry0, _kv_blocks(t, k, v, k_pos, k_seg, kv_block))
  o = rearrange(finish(spec, carry), "b k g t d -> b t (k g) d").astype(q.dtype)
  if spec.kind == "sigmoid":
    return o, None
  _, m, l = carry
  return o, jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)


def _flash_backward(spec: AttnSpec, kv_block: int, res, do, dlse=None):
  """FlashAttention-2 backward: per key block, recompute the probabilities from q, k and
  the saved row log-sum-exp; dq accumulates in the scan carry, dk / dv come out per block.
  dlse [B, Hkv, G, T]: the cotangent of the log-sum-exp (d lse / d s = p), or None.
  o and lse may be those of more keys than k holds (ring attention's rows): the result is
  then this key block's share of dq and its dk, dv."""
  q, k, v, q_pos, k_pos, q_seg, k_seg, o, lse = res
  t, hkv, s_len = q.shape[1], k.shape[2], k.shape[1]
  qg = rearrange(q, "b t (k g) d -> b t k g d", k=hkv)
  dog = rearrange(do, "b t (k g) d -> b k g t d", k=hkv)
  if spec.kind == "softmax":  # delta_i = sum_j p_ij dp_ij = do_i . o_i
    delta = jnp.einsum("bkgtd,bkgtd->bkgt", dog.astype(jnp.float32),
                       rearrange(o, "b t (k g) d -> b k g t d", k=hkv).astype(jnp.float32))
    if dlse is not None:
      delta = delta - dlse

  def step(dq, xs):
    k_blk, v_blk, pos_blk, seg_blk = xs
    mask = spec.mask(q_pos, pos_blk, q_seg, seg_blk)[:, None, None]
    raw = jnp.einsum("btkgd,bckd->bkgtc", qg, k_blk, preferred_element_type=jnp.float32)
    s = spec.logits(raw)
    if spec.kind == "softmax":
      p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)
    else:
      p = jnp.where(mask, jax.nn.sigmoid(s + spec.bias), 0.0)
    dv = jnp.einsum("bkgtc,bkgtd->bckd", p.astype(do.dtype), dog, preferred_element_type=jnp.float32)
    dp = jnp.einsum("bkgtd,bckd->bkgtc", dog, v_blk, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[..., None]) if spec.kind == "softmax" else dp * p * (1.0 - p)
    if spec.softcap is not None:  # s = c tanh(raw scale / c)
      ds = ds * (1.0 - jnp.square(s / spec.softcap))
    ds = (ds * spec.scale).astype(q.dtype)
    dq = dq + jnp.einsum("bkgtc,bckd->btkgd", ds, k_blk, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bkgtc,btkgd->bckd", ds, qg, preferred_element_type=jnp.float32)
    return dq, (dk, dv)

  dq0 = vary_like(jnp.zeros(qg.shape, jnp.float32), res, do)
  dq, (dk, dv) = jax.lax.scan(step, dq0, _kv_blocks(t, k, v, k_pos, k_seg, kv_block))
  dk = rearrange(dk, "n b c k d -> b (n c) k d")[:, :s_len]
  dv = rearrange(dv, "n b c k d -> b (n c) k d")[:, :s_len]
  dq = rearrange(dq, "b t k g d -> b t (k g) d")
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _flash(q, k, v, q_pos, k_pos, q_seg, k_seg, spec, kv_block):
  """-> (o, lse [B, Hkv, G, T] or None), both differentiable."""
  return _flash_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, spec, kv_block)


def _flash_fwd_rule(q, k, v, q_pos, k_pos, q_seg, k_seg, spec, kv_block):
  o, lse = _flash_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, spec, kv_block)
  return (o, lse), (q, k, v, q_pos, k_pos, q_seg, k_seg, o, lse)


def _flash_bwd_rule(spec, kv_block, res, cotangents):
  do, dlse = cotangents
  return _flash_backward(spec, kv_block, res, do, dlse)


_flash.defvjp(_flash_fwd_rule, _flash_bwd_rule)


def _lse_public(lse, hkv):
  """Internal [B, Hkv, G, T] (+inf: empty row) -> [B, T, H] (-inf: empty row)."""
  return rearrange(jnp.where(jnp.isposinf(lse), -jnp.inf, lse), "b k g t -> b t (k g)")


def _lse_internal(lse, hkv):
  """[B, T, H] (-inf: empty row) -> internal [B, Hkv, G, T] (+inf: empty row)."""
  return rearrange(jnp.where(jnp.isneginf(lse), jnp.inf, lse), "b t (k g) -> b k g t", k=hkv)


def _attention_xla(q, k, v, q_pos, k_pos, q_seg, k_seg, spec: AttnSpec,
                   kv_block: int = KV_BLOCK, return_lse: bool = False):
  """Flash attention in XLA: a scan over key blocks, O(T * kv_block) memory forward and
  backward (the backward recomputes probabilities from the saved log-sum-exp)."""
  o, lse = _flash(q, k, v, q_pos, k_pos, q_seg, k_seg, spec, kv_block)
  if not return_lse:
    return o
  return o, None if lse is None else _lse_public(lse, k.shape[2])


for _op in ("attention", "sigmoid_attention"):
  register(_op, "xla")(_attention_xla)


def _block_grads_xla(q, k, v, q_pos, k_pos, q_seg, k_seg, spec: AttnSpec, o, lse, do,
                     kv_block: int = KV_BLOCK):
  """One key block's share of the gradients of rows whose output o [B, T, H, Dv] and
  log-sum-exp lse [B, T, H] (None: sigmoid) cover more keys (ring attention's backward
  step) -> (dq, dk, dv)."""
  lse = None if lse is None else _lse_internal(lse, k.shape[2])
  res = (q, k, v, q_pos, k_pos, q_seg, k_seg, o, lse)
  return _flash_backward(spec, kv_block, res, do)[:3]


register("attention_block_grads", "xla")(_block_grads_xla)

# The Mosaic GPU kernel (Hopper) is impl="pallas"; it asks `unsupported` which calls it takes.
from longax.kernels.gpu import attention as _gpu  # noqa: E402

# The Pallas TPU kernels are impl="pallas" on TPU and impl="pallas_interpret" anywhere (CPU).
from longax.kernels.tpu import attention as _tpu  # noqa: E402

for _op in ("attention", "sigmoid_attention"):
  register_kernels(_op, gpu=(_gpu.attention_pallas, _gpu.unsupported),
                   tpu=(_tpu.attention_pallas, _tpu.unsupported),
                   interpret=(_tpu.attention_interpret, _tpu.unsupported_interpret))
register_kernels("attention_block_grads",
                 gpu=(_gpu.block_grads_pallas, _gpu.block_grads_unsupported),
                 tpu=(_tpu.block_grads_pallas, _tpu.unsupported),
                 interpret=(_tpu.block_grads_interpret, _tpu.unsupported_interpret))

# ----------------------------------------------------------------------------- public API


def check_qkv(op, q, k, v):
  """q [B, T, H, D], k [B, S, Hkv, D], v [B, S, Hkv, Dv]: one floating dtype, H % Hkv == 0;
  a mismatch is one ValueError line naming `op`. (Every attention-shaped op asks this.)"""
  _checks.rank(op, "q", q, 4, "[B, T, H, D]")
  _checks.rank(op, "k", k, 4, "[B, S, Hkv, D]")
  _checks.rank(op, "v", v, 4, "[B, S, Hkv, Dv]")
  _checks.same_dtype(op, q=q, k=k, v=v)
  _checks.floating(op, "q", q)
  b, _, h, d = q.shape
  if k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"{op}: `k` must be [B={b}, S, Hkv, D={d}] to match q {q.shape}, got {k.shape}")
  if v.shape[:3] != k.shape[:3]:
    raise ValueError(f"{op}: `v` must be [B, S, Hkv, Dv] = {k.shape[:3]} + [Dv] to match k, got {v.shape}")
  _checks.divides(op, f"q heads H={h} vs k/v heads Hkv={k.shape[2]}", k.shape[2], h)


def _prepare(op, q, k, v, *, segment_ids, causal, scale, window, sinks, softcap, block_kv,
             q_positions, kv_positions):
  """Validates the inputs; returns (q_pos, k_pos, q_seg, k_seg, scale)."""
  check_qkv(op, q, k, v)
  b, t, h, d = q.shape
  _checks.positive_int(op, "window", window)
  _checks.positive_int(op, "block_kv", block_kv)
  _checks.positive_int(op, "sinks", sinks, minimum=0)
  if not isinstance(causal, bool):
    raise ValueError(f"{op}: `causal` must be a bool, got {causal!r}")
  if softcap is not None and not softcap > 0:
    raise ValueError(f"{op}: `softcap` must be > 0, got {softcap!r}")
  q_seg = k_seg = None
  if segment_ids is not None:
    if isinstance(segment_ids, (tuple, list)):
      if len(segment_ids) != 2:
        raise ValueError(f"{op}: `segment_ids` must be [B, T] or a pair (q [B, T], kv [B, S])")
      q_seg, k_seg = segment_ids
    else:
      q_seg = k_seg = segment_ids
    _checks.shape_is(op, "segment_ids (queries)", q_seg, (b, t), "[B, T]")
    _checks.shape_is(op, "segment_ids (keys)", k_seg, (b, k.shape[1]), "[B, S]")
  scale = d**-0.5 if scale is None else float(scale)
  s_len = k.shape[1]
  q_pos = query_positions(t, s_len) if q_positions is None else jnp.asarray(q_positions)
  k_pos = jnp.arange(s_len, dtype=jnp.int32) if kv_positions is None else jnp.asarray(kv_positions)
  for name, x, n in (("q_positions", q_pos, t), ("kv_positions", k_pos, s_len)):
    if x.shape not in ((n,), (b, n)):
      raise ValueError(f"{op}: `{name}` must have shape ({n},) or ({b}, {n}), got {x.shape}")
  return q_pos.astype(jnp.int32), k_pos.astype(jnp.int32), q_seg, k_seg, scale


def attention(q, k, v, *, causal: bool = True, scale: float | None = None,
              window: int | None = None, sinks: int = 0, segment_ids=None,
              softcap: float | None = None, impl: str = "auto", block_kv: int = KV_BLOCK,
              q_positions=None, kv_positions=None, return_lse: bool = False):
  """Softmax attention. q [B,T,H,D], k [B,S,Hkv,D], v [B,S,Hkv,Dv] -> [B,T,H,Dv].

  causal: bottom-right aligned when T < S. window=w: query i sees key j only if
  i - j < w. sinks=s: keys j < s stay visible inside the window. softcap=c: logits
  c*tanh(s/c). segment_ids: [B, T] (T == S) or a pair (q [B, T], kv [B, S]).
  block_kv: keys per step of the XLA fold. q_positions [T] or [B, T] / kv_positions [S] or
  [B, S]: absolute positions (default: bottom-right aligned `S - T + arange(T)` and
  `arange(S)`); a key at position -1 is an empty slot no query sees (decode caches).
  return_lse: also return each row's log-sum-exp of its visible logits, [B, T, H] float32
  (-inf for a row that sees no key), differentiable; ring attention folds with it.
  """
  q_pos, k_pos, q_seg, k_seg, scale = _prepare("attention", q, k, v, segment_ids=segment_ids,
                                 causal=causal, scale=scale, window=window, sinks=sinks,
                                 softcap=softcap, block_kv=block_kv,
                                 q_positions=q_positions, kv_positions=kv_positions)
  spec = AttnSpec("softmax", causal, scale, window, sinks, softcap, 0.0)
  fn = resolve("attention", impl, dict(q=q, k=k, v=v, spec=spec, return_lse=return_lse,
                                       explicit_positions=q_positions is not None or kv_positions is not None))
  extra = dict(return_lse=True) if return_lse else {}
  return fn(q, k, v, q_pos, k_pos, q_seg, k_seg, spec, kv_block=block_kv, **extra)


def sigmoid_attention(q, k, v, *, bias: float | None = None, causal: bool = True,
                      scale: float | None = None, window: int | None = None,
                      segment_ids=None, impl: str = "auto", block_kv: int = KV_BLOCK,
                      q_positions=None, kv_positions=None):
  """Sigmoid attention (FlashSigmoid): o_i = sum_j sigmoid(scale q_i.k_j + bias) v_j.

  Same layout and visibility options as `attention`; `bias` defaults to -log(S).
  """
  q_pos, k_pos, q_seg, k_seg, scale = _prepare("sigmoid_attention", q, k, v, segment_ids=segment_ids,
                                 causal=causal, scale=scale, window=window, sinks=0,
                                 softcap=None, block_kv=block_kv,
                                 q_positions=q_positions, kv_positions=kv_positions)
  if bias is None:
    bias = -math.log(k.shape[1])
  elif jnp.ndim(bias) != 0:
    raise ValueError(f"sigmoid_attention: `bias` must be a scalar, got shape {jnp.shape(bias)}")
  spec = AttnSpec("sigmoid", causal, scale, window, 0, None, float(bias))
  fn = resolve("sigmoid_attention", impl, dict(q=q, k=k, v=v, spec=spec,
                                               explicit_positions=q_positions is not None or kv_positions is not None))
  return fn(q, k, v, q_pos, k_pos, q_seg, k_seg, spec, kv_block=block_kv)
