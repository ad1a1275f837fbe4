"""Sequence parallelism: the ops over a sequence split across one mesh axis.

Every function here is called inside `jax.shard_map`; each device holds its part of the
sequence, `[B, T/P, ...]`, and `axis_name` names the mesh axis (size P). `layout`:

- `"contiguous"`: device i holds tokens [i T/P, (i+1) T/P).
- `"zigzag"`: the sequence cut into 2P chunks, device i holds chunks i and 2P-1-i (in that
  order), so causal work is balanced. `to_zigzag(x, p)` / `from_zigzag` convert whole arrays.

- `ring_attention`: K/V (and their segment ids) rotate with `lax.ppermute`, issued before
  each step's compute so the transfer overlaps it; each step runs the local attention op
  (`impl=` dispatch) on the visible (query chunk, key chunk) pairs (without a window each is
  fully visible or the causal diagonal: default positions, so the GPU kernel takes it),
  and folds its output into the running one by log-sum-exp (softmax) or by a plain sum
  (sigmoid). Pairs no query sees (`visibility.key_blocks`) are skipped. The backward is a
  ring too (`custom_vjp`): dK/dV travel with their K/V; per device it keeps q, k, v, o and
  the rows' log-sum-exp, whatever P.
- `ulysses_attention`: all-to-all sequence -> heads, the local op on the whole sequence,
  all-to-all back.
- `lasp2_linear_attention` / `lasp2_ssd`: each device's chunk state from zero as one GEMM
  and its total decay, one `all_gather` of the states, the chunk-state combine
  `linear_attention.pass_states` over devices, then the local op (the `impl=` dispatch) once
  from the true entering state. Its backward (`_lasp2`) runs the op's backward once, with the
  chunk state's gradient as its final-state cotangent.
  `lasp2_selective_scan`: the same state pass, then the local op with the incoming state.
- `left_context`: the tokens before each local chunk (short causal convs).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from longax.kernels import _checks
from longax.kernels._dispatch import resolve
from longax.kernels._vma import vary_like
from longax.kernels.attention import KV_BLOCK, AttnSpec, _prepare, merge_partials
from longax.kernels.gpu import linear_attention as _gpu_la
from longax.kernels.linear_attention import (CHUNK, _log_decay, _resets, linear_attention,
                                             pass_states)
from longax.kernels.selective_scan import _prepare_dt, selective_scan
from longax.kernels.ssd import _as_qkv, _check as _ssd_check, _skip
from longax.kernels.visibility import key_blocks

LAYOUTS = ("contiguous", "zigzag")

# ----------------------------------------------------------------------------- layouts


def _zigzag_order(p: int) -> np.ndarray:
  """Chunk order of the zigzag layout: [0, 2p-1, 1, 2p-2, ...]."""
  return np.stack([np.arange(p), 2 * p - 1 - np.arange(p)], axis=1).reshape(-1)


def _check_len(op, t: int, parts: int, what: str):
  if t % parts:
    raise ValueError(f"{op}: length T={t} must be divisible by {what}={parts}")


def to_zigzag(x, p: int, axis: int = 1):
  """Whole array in sequence order -> zigzag order (device i's share: chunks i, 2p-1-i)."""
  t = x.shape[axis]
  _check_len("to_zigzag", t, 2 * p, "2P")
  chunks = jnp.split(x, 2 * p, axis=axis)
  return jnp.concatenate([chunks[i] for i in _zigzag_order(p)], axis=axis)


def from_zigzag(x, p: int, axis: int = 1):
  """The inverse of `to_zigzag`."""
  t = x.shape[axis]
  _check_len("from_zigzag", t, 2 * p, "2P")
  chunks = jnp.split(x, 2 * p, axis=axis)
  inverse = np.argsort(_zigzag_order(p))
  return jnp.concatenate([chunks[i] for i in inverse], axis=axis)


def _axis(op: str, axis_name, layout: str, t_local: int):
  """(P, this device's index) of `axis_name`, after the layout and length checks."""
  if layout not in LAYOUTS:
    raise ValueError(f"{op}: unknown layout={layout!r}; valid: {', '.join(LAYOUTS)}")
  try:
    p = jax.lax.axis_size(axis_name)
  except (NameError, KeyError, ValueError) as e:
    raise ValueError(f"{op}: axis_name={axis_name!r} is not an axis of the enclosing "
                     f"shard_map's mesh ({type(e).__name__})") from None
  if layout == "zigzag":
    _check_len(op, p * t_local, 2 * p, "2P (zigzag layout)")
  return p, jax.lax.axis_index(axis_name)


def _n_chunks(layout: str) -> int:
  return 2 if layout == "zigzag" else 1


def chunk_ids(p: int, idx, layout: str):
  """Global chunk indices of this device's chunks: [idx] or [idx, 2p-1-idx] (int32)."""
  if layout == "zigzag":
    return jnp.stack([idx, 2 * p - 1 - idx]).astype(jnp.int32)
  return jnp.reshape(idx, (1,)).astype(jnp.int32)


def local_positions(t_local: int, p: int, idx, layout: str):
  """Global positions of this device's tokens: [T/P] int32."""
  ids = chunk_ids(p, idx, layout)
  c = t_local // ids.shape[0]
  return (ids[:, None] * c + jnp.arange(c, dtype=jnp.int32)).reshape(-1)


def _split(x, n: int, axis: int = 1):
  """[B, n*c, ...] -> [n, B, c, ...]: the local chunks."""
  return jnp.stack(jnp.split(x, n, axis=axis)) if x is not None else None


def _merge(xs, axis: int = 1):
  """[n, B, c, ...] -> [B, n*c, ...]."""
  return jnp.concatenate(list(xs), axis=axis)


def _fold_batch(x, n: int):
  """[B, n*c, ...] -> [n*B, c, ...]: the local chunks stacked on the batch axis."""
  return None if x is None else _split(x, n).reshape(-1, x.shape[1] // n, *x.shape[2:])


def _unfold_batch(x, n: int):
  """[n*B, c, ...] -> [B, n*c, ...]."""
  return _merge(x.reshape(n, -1, *x.shape[1:]))


# ------------------------------------------------------------------------ ring attention


def _ring_spec(op, q, k, v, *, p, causal, kind, scale, bias, window, segment_ids, block_kv):
  if kind not in ("softmax", "sigmoid"):
    raise ValueError(f"{op}: unknown kind={kind!r}; valid: softmax, sigmoid")
  scale = _prepare(op, q, k, v, segment_ids=segment_ids, causal=causal, scale=scale,
                   window=window, sinks=0, softcap=None, block_kv=block_kv, q_positions=None,
                   kv_positions=None)[-1]
  if kind == "sigmoid" and bias is None:
    bias = -math.log(p * k.shape[1])  # the global key count, as the single-device op
  return AttnSpec(kind, causal, scale, window, 0, None, 0.0 if bias is None else float(bias))


def _seen(spec: AttnSpec, q_chunk, k_chunk, c: int, n_total: int):
  """Does any query of global chunk q_chunk see a key of chunk k_chunk (chunks of c)?"""
  lo, hi, _, _ = key_blocks(q_chunk * c, q_chunk * c + c - 1, c, n_total,
                            causal=spec.causal, window=spec.window)
  return (lo <= k_chunk) & (k_chunk < hi)


def _pair_specs(spec: AttnSpec):
  """The local calls a (query chunk, key chunk) pair can need, as (spec, explicit positions).
  Without a window every pair is skipped, fully visible (non-causal) or the causal diagonal
  (equal chunks), so the local op runs with default positions and a kernel can take it;
  with a window a pair can be partly visible: one call with the global positions."""
  if spec.window is None:
    return [(dataclasses.replace(spec, causal=False), False)] + ([(spec, False)] if spec.causal else [])
  return [(spec, True)]


def _balanced(spec: AttnSpec, layout: str) -> bool:
  """Zigzag causal attention without a window: every ring step's pairs are known up to one
  bit, so the ring runs without conditionals (`_pairs`)."""
  return layout == "zigzag" and spec.causal and spec.window is None


def _pairs(spec, p, idx, src, layout, c, first: bool = False):
  """For each (local query chunk i, key chunk j of device src): (i, j, branch). A traced
  branch goes to `lax.switch`: 0 skips the pair, b > 0 runs `_pair_specs(spec)[b - 1]`; a
  Python int b runs that call unconditionally. Zigzag causal (`_balanced`): step 0 (`first`)
  is the two diagonals and (1, 0); every later step is (1, 0) and (a, a) with a = src > idx
  (a traced chunk index): both fully visible, no conditional, the same work on every device."""
  if _balanced(spec, layout):
    if first:
      return [(0, 0, 2), (1, 1, 2), (1, 0, 1)]
    a = (src > idx).astype(jnp.int32)
    return [(1, 0, 1), (a, a, 1)]
  q_ids, k_ids = chunk_ids(p, idx, layout), chunk_ids(p, src, layout)
  n = q_ids.shape[0]
  out = []
  for i in range(n):
    for j in range(n):
      qc, kc = q_ids[i], k_ids[j]
      if spec.window is not None:
        branch = _seen(spec, qc, kc, c, n * p).astype(jnp.int32)
      elif spec.causal:
        branch = jnp.where(kc < qc, 1, jnp.where(kc == qc, 2, 0)).astype(jnp.int32)
      else:
        branch = jnp.int32(1)
      out.append((i, j, branch))
  return out


def _update_at(xs: tuple, i, fn) -> tuple:
  """xs with entry i replaced by fn(xs[i]); i a Python int or a traced index (then by select)."""
  if isinstance(i, int):
    return xs[:i] + (fn(xs[i]),) + xs[i + 1:]
  new = fn(jax.tree.map(lambda *a: jnp.select([i == m for m in range(len(xs))], list(a)), *xs))
  return tuple(jax.tree.map(lambda a, b, m=m: jnp.where(i == m, a, b), new, xs[m])
               for m in range(len(xs)))


def _ring_loop(p: int, step, carry, balanced: bool):
  """Runs step(s, carry, first) for s = 0..P-1; balanced rings peel step 0 (its pairs differ)."""
  if balanced:
    carry = step(0, carry, first=True)
    return jax.lax.fori_loop(1, p, step, carry)
  return jax.lax.fori_loop(0, p, step, carry)


def _pair_fns(op, impl, spec, call):
  """[(fn, spec, explicit)] per `_pair_specs` entry, each resolved by `impl=` dispatch."""
  return [(resolve(op, impl, dict(call, spec=sp, explicit_positions=ex)), sp, ex)
          for sp, ex in _pair_specs(spec)]


def _fold(spec, acc, part):
  """Folds a partial result (o [B, c, H, Dv] f32, lse [B, c, H] or None) into acc."""
  if spec.kind == "sigmoid":
    return acc[0] + part[0], None
  return merge_partials(*acc, *part)


def _ring_forward(axis_name, spec, layout, impl, block_kv, q, k, v, seg):
  """-> (o [B, Tl, H, Dv] in q's dtype, lse [B, Tl, H] f32 or None)."""
  b, t, h, _ = q.shape
  p, idx = _axis("ring_attention", axis_name, layout, t)
  n = _n_chunks(layout)
  c = t // n
  q_pos = local_positions(t, p, idx, layout)
  op = "attention" if spec.kind == "softmax" else "sigmoid_attention"
  fns = _pair_fns(op, impl, spec, dict(q=q, k=k, v=v, return_lse=spec.kind == "softmax"))
  extra = dict(return_lse=True) if spec.kind == "softmax" else {}
  qs, q_poss, q_segs = _split(q, n), _split(q_pos, n, 0), _split(seg, n)
  own = jnp.arange(c, dtype=jnp.int32)  # a chunk's default positions (T == S)
  perm = [(j, (j + 1) % p) for j in range(p)]

  def local(fn, sp, explicit, i, j, kv, k_pos):
    k_blk, v_blk, seg_blk = (_split(x, n)[j] if x is not None else None for x in kv)
    qp, kp = (q_poss[i], _split(k_pos, n, 0)[j]) if explicit else (own, own)
    out = fn(qs[i], k_blk, v_blk, qp, kp, None if seg is None else q_segs[i], seg_blk, sp,
             kv_block=block_kv, **extra)
    return (out[0].astype(jnp.float32), out[1]) if spec.kind == "softmax" else (out.astype(jnp.float32), None)

  def step(s, carry, first=False):
    accs, kv = carry
    nxt = jax.lax.ppermute(kv, axis_name, perm)  # in flight while this step computes
    src = (idx - s) % p
    k_pos = local_positions(t, p, src, layout)
    for i, j, branch in _pairs(spec, p, idx, src, layout, c, first):
      if isinstance(branch, int):
        accs = _update_at(accs, i, lambda a, i=i, j=j, f=fns[branch - 1]: _fold(
            spec, a, local(*f, i, j, kv, k_pos)))
        continue
      calls = [lambda a, kv: a] + [
          lambda a, kv, f=f, i=i, j=j: _fold(spec, a, local(*f, i, j, kv, k_pos)) for f in fns]
      accs = _update_at(accs, i, lambda a, calls=calls: jax.lax.switch(branch, calls, a, kv))
    return accs, nxt

  dv = v.shape[-1]
  acc0 = (jnp.zeros((b, c, h, dv), jnp.float32),
          jnp.full((b, c, h), -jnp.inf, jnp.float32) if spec.kind == "softmax" else None)
  accs0 = vary_like((acc0,) * n, q, k, v, seg)
  accs, _ = _ring_loop(p, step, (accs0, (k, v, seg)), _balanced(spec, layout))
  o = _merge([a[0] for a in accs]).astype(q.dtype)
  lse = None if spec.kind == "sigmoid" else _merge([a[1] for a in accs])
  return o, lse


def _ring_backward(axis_name, spec, layout, impl, block_kv, res, do):
  q, k, v, seg, o, lse = res
  b, t, h, _ = q.shape
  p, idx = _axis("ring_attention", axis_name, layout, t)
  n = _n_chunks(layout)
  c = t // n
  q_pos = local_positions(t, p, idx, layout)
  fns = _pair_fns("attention_block_grads", impl, spec, dict(q=q, k=k, v=v))
  qs, q_poss, q_segs, os_, dos = (_split(x, n, a) for x, a in
                                   ((q, 1), (q_pos, 0), (seg, 1), (o, 1), (do, 1)))
  lses = _split(lse, n)
  own = jnp.arange(c, dtype=jnp.int32)
  perm = [(j, (j + 1) % p) for j in range(p)]

  def local(fn, sp, explicit, i, j, kv, k_pos):
    k_blk, v_blk, seg_blk = (_split(x, n)[j] if x is not None else None for x in kv[:3])
    qp, kp = (q_poss[i], _split(k_pos, n, 0)[j]) if explicit else (own, own)
    return fn(qs[i], k_blk, v_blk, qp, kp, None if seg is None else q_segs[i], seg_blk, sp,
              os_[i], None if lse is None else lses[i], dos[i], kv_block=block_kv)

  def add(f, grads, i, j, kv, k_pos):
    dqs, dks, dvs = grads
    dq_i, dk_j, dv_j = local(*f, i, j, kv, k_pos)
    plus = lambda x: lambda a: a + x.astype(jnp.float32)
    return (_update_at(dqs, i, plus(dq_i)), _update_at(dks, j, plus(dk_j)),
            _update_at(dvs, j, plus(dv_j)))

  def step(s, carry, first=False):
    dqs, kv = carry
    src = (idx - s) % p
    k_pos = local_positions(t, p, src, layout)
    grads = (dqs, kv[3], kv[4])
    for i, j, branch in _pairs(spec, p, idx, src, layout, c, first):
      if isinstance(branch, int):
        grads = add(fns[branch - 1], grads, i, j, kv, k_pos)
        continue
      calls = [lambda g, kv: g] + [
          lambda g, kv, f=f, i=i, j=j: add(f, g, i, j, kv, k_pos) for f in fns]
      grads = jax.lax.switch(branch, calls, grads, kv)
    dqs, dks, dvs = grads
    return dqs, jax.lax.ppermute((*kv[:3], dks, dvs), axis_name, perm)  # dK, dV ride along

  zeros = lambda x: tuple(jnp.zeros(y.shape, jnp.float32) for y in _split(x, n))
  dqs0, dks0, dvs0 = vary_like((zeros(q), zeros(k), zeros(v)), q, k, v, seg, o, lse, do)
  dqs, kv = _ring_loop(p, step, (dqs0, (k, v, seg, dks0, dvs0)), _balanced(spec, layout))
  dq, dk, dv = _merge(dqs), _merge(kv[3]), _merge(kv[4])  # p hops: dK, dV are home
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _ring(axis_name, spec, layout, impl, block_kv, q, k, v, seg):
  return _ring_forward(axis_name, spec, layout, impl, block_kv, q, k, v, seg)[0]


def _ring_fwd_rule(axis_name, spec, layout, impl, block_kv, q, k, v, seg):
  o, lse = _ring_forward(axis_name, spec, layout, impl, block_kv, q, k, v, seg)
  return o, (q, k, v, seg, o, lse)


_ring.defvjp(_ring_fwd_rule, _ring_backward)


def ring_attention(q, k, v, *, axis_name, causal: bool = True, kind: str = "softmax",
                   scale: float | None = None, bias: float | None = None,
                   window: int | None = None, segment_ids=None, layout: str = "contiguous",
                   impl: str = "auto", block_kv: int = KV_BLOCK):
  """Ring attention. Local shards q [B, Tl, H, D], k [B, Tl, Hkv, D], v [B, Tl, Hkv, Dv],
  segment_ids [B, Tl] -> o [B, Tl, H, Dv]; equals `attention` / `sigmoid_attention` of the
  whole sequence (sigmoid's bias defaults to -log of the global length)."""
  op = "ring_attention"
  p, _ = _axis(op, axis_name, layout, q.shape[1])
  spec = _ring_spec(op, q, k, v, p=p, causal=causal, kind=kind, scale=scale, bias=bias,
                    window=window, segment_ids=segment_ids, block_kv=block_kv)
  return _ring(axis_name, spec, layout, impl, block_kv, q, k, v, segment_ids)


# ---------------------------------------------------------------------- Ulysses attention


def ulysses_attention(q, k, v, *, axis_name, causal: bool = True, kind: str = "softmax",
                      scale: float | None = None, bias: float | None = None,
                      window: int | None = None, segment_ids=None, layout: str = "contiguous",
                      impl: str = "auto", block_kv: int = KV_BLOCK):
  """Ulysses (DeepSpeed) attention: all-to-all from sequence to heads, the local op on the
  whole sequence with H/P heads, all-to-all back. Same arguments as `ring_attention`.
  K/V heads split P ways when Hkv % P == 0, else each is repeated P / Hkv times."""
  op = "ulysses_attention"
  p, _ = _axis(op, axis_name, layout, q.shape[1])
  h, hkv = q.shape[2], k.shape[2]
  if h % p:
    raise ValueError(f"{op}: query heads H={h} must be divisible by the sequence axis "
                     f"size P={p} ({axis_name!r})")
  if hkv % p:
    if p % hkv:
      raise ValueError(f"{op}: k/v heads Hkv={hkv} must divide or be divisible by the "
                       f"sequence axis size P={p}")
    k, v = (jnp.repeat(x, p // hkv, axis=2) for x in (k, v))
  to_heads = lambda x: jax.lax.all_to_all(x, axis_name, 2, 1, tiled=True)  # [B, T, H/P, D]
  q, k, v = to_heads(q), to_heads(k), to_heads(v)
  seg = None
  if segment_ids is not None:
    seg = jax.lax.all_gather(segment_ids, axis_name, axis=1, tiled=True)
  if layout == "zigzag":  # natural order, so the local op runs with default positions
    q, k, v, seg = (None if x is None else from_zigzag(x, p) for x in (q, k, v, seg))
  if kind == "softmax":
    from longax.kernels.attention import attention as local
    kw = {}
  elif kind == "sigmoid":
    from longax.kernels.attention import sigmoid_attention as local
    kw = dict(bias=bias)
  else:
    raise ValueError(f"{op}: unknown kind={kind!r}; valid: softmax, sigmoid")
  o = local(q, k, v, causal=causal, scale=scale, window=window, segment_ids=seg, impl=impl,
            block_kv=block_kv, **kw)
  if layout == "zigzag":
    o = to_zigzag(o, p)
  return jax.lax.all_to_all(o, axis_name, 1, 2, tiled=True)


# ---------------------------------------------------------------------------------- LASP-2


def _global_chunks(x, p: int, layout: str):
  """All-gathered per-device values [P, n, ...] -> global chunk order [n P, ...]."""
  if layout == "contiguous":
    return x.reshape(p, *x.shape[2:])
  dev_half = [(g, 0) if g < p else (2 * p - 1 - g, 1) for g in range(2 * p)]
  flat = x.reshape(2 * p, *x.shape[2:])
  return flat[np.asarray([d * 2 + hf for d, hf in dev_half])]


def _combine_states(axis_name, layout, local, decay, first, last, initial):
  """LASP-2's state pass. Per local chunk (on a leading axis n): local state [n, B, ...S],
  decay through the chunk [n, B, ...] (0 where a segment starts inside it), first / last
  segment ids [n, B] (or None). One all_gather, then `pass_states` over the global chunks.
  Returns (the state entering each local chunk [n, B, ...S], the final state [B, ...S])."""
  p, idx = jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name)
  # One collective; its result is the same on every device, and so is the final state.
  gathered = jax.lax.all_gather((local, decay, first, last), axis_name, to="invarying")
  local_g, decay_g, first_g, last_g = (None if x is None else _global_chunks(x, p, layout)
                                       for x in gathered)
  if first_g is not None:  # a chunk starting a new document does not take the state in
    cont = jnp.concatenate([jnp.ones_like(first_g[:1], bool), first_g[1:] == last_g[:-1]])
    cont = cont.reshape(cont.shape + (1,) * (decay_g.ndim - cont.ndim))
    decay_g = decay_g * cont
  entering, final = pass_states(decay_g, local_g, initial)
  own = chunk_ids(p, idx, layout)
  state_in = jnp.take(entering, own, axis=0)
  if first_g is not None:
    state_in = state_in * jnp.take(cont, own, axis=0)[..., None]
  return state_in, final


def _segment_edges(seg, b, n):
  """Per local chunk: (first id [n, B], last id [n, B], no reset inside [n, B]) or Nones."""
  if seg is None:
    return None, None, None
  chunks = _split(seg, n)  # [n, B, c]
  return chunks[..., 0], chunks[..., -1], ~jnp.any(_starts(chunks), axis=-1)


def _local_states(k, v, g, seg, h: int, on_kernel: bool = False):
  """Each local chunk's state from zero, sum_t w_t k_t^T v_t with w_t the decay after token t
  (exp of the log decay summed over t+1..end), zero before the chunk's last document start:
  one GEMM over the chunk (`on_kernel`, scalar decay: the Mosaic GPU kernel that weighs the
  rows as it loads them). k [nB, c, Hkv, Dk], v [nB, c, Hkv, Dv], g [nB, c, H, 1|Dk] or
  None, seg [nB, c] or None -> [nB, H, Dk, Dv] float32. Not differentiated (`_lasp2`)."""
  nb, c, hkv, dk = k.shape
  w = jnp.ones((nb, c, h, 1), jnp.float32)
  if g is not None:
    w = jnp.exp(jnp.sum(g, axis=1, keepdims=True) - jnp.cumsum(g, axis=1))
  if seg is not None:
    starts = _starts(seg)
    later = jnp.flip(jnp.cumsum(jnp.flip(starts, 1), 1), 1) - starts > 0  # a start after t
    w = jnp.where(later[..., None, None], 0.0, w)
  if on_kernel and w.shape[-1] == 1:
    return _gpu_la.shard_state(k, v, jnp.moveaxis(w[..., 0], 1, 2), h)
  w = w.reshape(nb, c, hkv, h // hkv, w.shape[-1])
  kw = (k.astype(jnp.float32)[:, :, :, None] * w).astype(k.dtype)  # [nB, c, Hkv, G, Dk]
  s = jnp.einsum("bckgd,bckv->bkgdv", kw, v, preferred_element_type=jnp.float32)
  return s.reshape(nb, h, dk, v.shape[-1])


def _starts(seg):
  """[..., c] segment ids -> bool [..., c]: a document starts at t (t > 0)."""
  return jnp.concatenate([jnp.zeros_like(seg[..., :1], bool), seg[..., 1:] != seg[..., :-1]], -1)


def _entering_grad(q, g, seg, do, scale):
  """The cotangent of the state entering a chunk from o's: the chunk's outputs take
  scale (q_t exp(G_t)) S_in (G_t: the log decay summed through t; zero from the chunk's first
  document start on), so dS_in = sum_t scale (q_t exp(G_t))^T do_t: one GEMM, operands in q's
  dtype. q [nB, c, H, Dk], g [nB, c, H, 1|Dk] or None, do [nB, c, H, Dv] -> [nB, H, Dk, Dv]."""
  qf = q.astype(jnp.float32) * scale
  if g is not None:
    qf = qf * jnp.exp(jnp.cumsum(g, axis=1))
  if seg is not None:
    qf = jnp.where((jnp.cumsum(_starts(seg), axis=1) > 0)[..., None, None], 0.0, qf)
  return jnp.einsum("bthk,bthv->bhkv", qf.astype(q.dtype), do.astype(q.dtype),
                    preferred_element_type=jnp.float32)


class _Lasp2(NamedTuple):  # the static arguments of `_lasp2`
  axis_name: object
  layout: str
  n: int  # local chunks (2 for zigzag)
  scale: float | None
  chunk_size: int
  impl: str
  split: bool = False  # the GPU kernel's split backward gives dS_in (`_takes_split`)


def _chunk_decay(st: _Lasp2, g_raw, segc, b: int, shape):
  """(g [nB, c, H, 1|Dk] float32 or None, the decay through each chunk [n, B, H, 1|Dk], 0 where
  a document starts inside it)."""
  nb, c, h, dk = shape
  g = _log_decay("lasp2_linear_attention", g_raw, nb, c, h, dk)
  decay = jnp.ones((nb, h, 1)) if g is None else jnp.exp(jnp.sum(g, axis=1))
  if segc is not None:
    decay = decay * jnp.all(~_starts(segc), axis=1)[:, None, None]
  return g, decay.reshape(st.n, b, *decay.shape[1:])


def _lasp2_parts(st: _Lasp2, qc, kc, vc, g_raw, segc, h0, pullbacks: bool):
  """The forward: chunk states (one GEMM each) -> one all_gather and the combine -> the
  kernel once from the true entering state. Returns (o, final) and, with `pullbacks`, what
  the backward needs (else None: a call not differentiated linearises nothing)."""
  vjp = jax.vjp if pullbacks else (lambda f, *a: (f(*a), None))
  nb, c, h, dk = qc.shape
  b, dv = h0.shape[0], vc.shape[-1]
  g, decay = _chunk_decay(st, g_raw, segc, b, qc.shape)
  local = _local_states(kc, vc, g, segc, h, on_kernel=st.split).reshape(st.n, b, h, dk, dv)
  first, last = ((None, None) if segc is None else
                 (segc[:, 0].reshape(st.n, b), segc[:, -1].reshape(st.n, b)))
  combine = lambda local, decay, h0: _combine_states(st.axis_name, st.layout, local, decay,
                                                     first, last, h0)
  (state_in, final), pull_combine = vjp(combine, local, decay, h0)
  state_in = state_in.reshape(nb, h, dk, dv)
  if pullbacks and st.split:  # the kernel's backward split at dF (`_lasp2_bwd`)
    o, _, kernel_res = _gpu_la.split_forward(qc, kc, vc, g, state_in, _resets(segc, nb, c),
                                             _scale(st, dk))
    return (o.astype(qc.dtype), final), (pull_combine, kernel_res, g, state_in)
  run = lambda q, k, v, g_raw, s0: linear_attention(
      q, k, v, log_decay=g_raw, scale=st.scale, segment_ids=segc, chunk_size=st.chunk_size,
      initial_state=s0, return_final_state=True, impl=st.impl)
  (o, _), pull_kernel = vjp(run, qc, kc, vc, g_raw, state_in)
  return (o, final), (pull_combine, pull_kernel, g, state_in)


def _scale(st: _Lasp2, dk: int) -> float:
  return dk**-0.5 if st.scale is None else st.scale


def _takes_split(impl, chunk_size, q, k, v, g) -> bool:
  """Whether the local op resolves to the Mosaic GPU kernel with a scalar decay, whose
  backward splits at the final state's cotangent: dS_in then comes from its reverse pass
  (`linear_attention.split_grad_in`), not a GEMM of its own."""
  try:
    fn = resolve("linear_attention", impl, dict(q=q, k=k, v=v, g=g, chunk=chunk_size))
  except (ValueError, NotImplementedError):
    return False
  return fn is _gpu_la.linear_attention_pallas and _gpu_la.split_supported(g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lasp2(st: _Lasp2, qc, kc, vc, g_raw, segc, h0):
  return _lasp2_parts(st, qc, kc, vc, g_raw, segc, h0, pullbacks=False)[0]


def _lasp2_fwd(st, qc, kc, vc, g_raw, segc, h0):
  out, (pull_combine, pull_kernel, g, state_in) = _lasp2_parts(st, qc, kc, vc, g_raw, segc, h0,
                                                                pullbacks=True)
  return out, (qc, g_raw, segc, pull_combine, pull_kernel, g, state_in)


def _lasp2_bwd(st: _Lasp2, res, cts):
  """The kernel's own backward carries the chunk state's gradient: its final state is
  F = D h0 + S_local (D: the chunk's decay), so its pullback with dF = dS_local gives S_local's
  share of dk, dv, dg plus D h0's share of dg, taken off here. dS_local comes from the combine's
  pullback of dS_in, which is one GEMM of q exp(G) and do (`_entering_grad`), or, on the GPU
  kernel (`st.split`), the initial-state gradient of its reverse pass run from dF = 0, whose
  chunk-parallel rest then takes dF = dS_local."""
  qc, g_raw, segc, pull_combine, pull_kernel, g, state_in = res
  do, dfinal = cts
  nb, c, h, dk = qc.shape
  scale = _scale(st, dk)
  if st.split:
    d_in, d0 = _gpu_la.split_grad_in(pull_kernel, do, scale)
  else:
    d_in = _entering_grad(qc, g, segc, do, scale)
  b = dfinal.shape[0]
  d_local, d_decay, dh0 = pull_combine((d_in.reshape(st.n, b, *d_in.shape[1:]), dfinal))
  d_local = d_local.reshape(nb, h, dk, -1)
  if st.split:
    dq, dk_, dv, dg = _gpu_la.split_grads(pull_kernel, d0, do, d_local, scale)
    if g_raw is not None:
      to_g = lambda g_raw: _log_decay("lasp2_linear_attention", g_raw, nb, c, h, dk)
      dg = jax.vjp(to_g, g_raw)[1](dg)[0]
  else:
    dq, dk_, dv, dg, _ = pull_kernel((do, d_local))
  if g_raw is not None:  # dg: + the chunk decay's share in the combine, - D h0's in the kernel
    decay_of = lambda g_raw: _chunk_decay(st, g_raw, segc, b, qc.shape)[1]
    spurious = jnp.sum(state_in * d_local, axis=-1).reshape(d_decay.shape[:3] + (-1,))
    spurious = jnp.sum(spurious, -1, keepdims=True) if d_decay.shape[-1] == 1 else spurious
    dg = dg + jax.vjp(decay_of, g_raw)[1](d_decay - spurious)[0]
  return dq, dk_, dv, dg, None, dh0


_lasp2.defvjp(_lasp2_fwd, _lasp2_bwd)


def lasp2_linear_attention(q, k, v, *, axis_name, log_decay=None, scale: float | None = None,
                           segment_ids=None, initial_state=None,
                           return_final_state: bool = False, layout: str = "contiguous",
                           chunk_size: int = CHUNK, impl: str = "auto"):
  """LASP-2 linear attention. Local shards q [B, Tl, H, Dk], k [B, Tl, Hkv, Dk],
  v [B, Tl, Hkv, Dv], log_decay [H] / [B, Tl, H] / [B, Tl, H, Dk], segment_ids [B, Tl];
  initial_state [B, H, Dk, Dv] (the same on every device: it precedes token 0). Returns
  o [B, Tl, H, Dv] or (o, the final state of the whole sequence, on every device).
  Each local chunk's state from zero is one GEMM; one all_gather and the chunk-state combine
  give the state entering it; the local kernel runs once from that state. The backward runs
  the kernel's backward once, with the chunk state's gradient as its final-state cotangent
  (NOTES.md: the forms tried and their cost)."""
  op = "lasp2_linear_attention"
  b, t, h, dk = q.shape
  _axis(op, axis_name, layout, t)
  n = _n_chunks(layout)
  per_token = log_decay is not None and jnp.ndim(log_decay) > 1
  g_chunks = _fold_batch(log_decay, n) if per_token else log_decay
  if g_chunks is not None:  # varying: a replicated [H] decay gets its gradient summed
    g_chunks = vary_like(jnp.asarray(g_chunks, jnp.float32), q)
  qc, kc, vc, segc = (_fold_batch(x, n) for x in (q, k, v, segment_ids))
  dv = v.shape[-1]
  h0 = (jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None
        else initial_state.astype(jnp.float32))
  split = _takes_split(impl, chunk_size, qc, kc, vc,
                       _log_decay(op, g_chunks, *qc.shape[:3], dk))
  st = _Lasp2(axis_name, layout, n, scale, chunk_size, impl, split)
  o, final = _lasp2(st, qc, kc, vc, g_chunks, segc, h0)
  o = _unfold_batch(o, n)
  return (o, final) if return_final_state else o


def lasp2_ssd(x, dt, A, B, C, *, axis_name, D=None, segment_ids=None, initial_state=None,
              return_final_state: bool = False, layout: str = "contiguous",
              chunk_size: int = CHUNK, impl: str = "auto"):
  """Mamba-2 SSD over a split sequence: `ssd`'s mapping onto `lasp2_linear_attention`.
  Local shards x [B, Tl, H, P], dt [B, Tl, H], B, C [B, Tl, G, N]; state [B, H, P, N]."""
  _ssd_check("lasp2_ssd", x, dt, A, B, C, D, "B, T")
  q, k, v, g = _as_qkv(x, dt, A, B, C)
  h0 = None if initial_state is None else jnp.swapaxes(initial_state, -1, -2)
  y, state = lasp2_linear_attention(q, k, v, axis_name=axis_name, log_decay=g, scale=1.0,
                                    segment_ids=segment_ids, initial_state=h0,
                                    return_final_state=True, layout=layout,
                                    chunk_size=chunk_size, impl=impl)
  y = _skip(y, x, D)
  return (y, jnp.swapaxes(state, -1, -2)) if return_final_state else y


def lasp2_selective_scan(u, delta, A, B, C, *, axis_name, D=None, z=None, delta_bias=None,
                         delta_softplus: bool = False, segment_ids=None, initial_state=None,
                         return_final_state: bool = False, layout: str = "contiguous",
                         chunk_size: int = CHUNK, impl: str = "auto"):
  """LASP-2 for Mamba-1's selective scan: local shards u, delta, z [B, Tl, D], B, C
  [B, Tl, N]; state [B, D, N]. Returns y [B, Tl, D] or (y, the final state)."""
  op = "lasp2_selective_scan"
  b, t, d = u.shape
  p, _ = _axis(op, axis_name, layout, t)
  _checks.rank(op, "A", A, 2, "[D, N]")
  n = _n_chunks(layout)
  uc, dc, bc, cc, zc, segc = (_fold_batch(x, n) for x in (u, delta, B, C, z, segment_ids))
  kw = dict(delta_bias=delta_bias, delta_softplus=delta_softplus, segment_ids=segc,
            chunk_size=chunk_size)
  _, local = selective_scan(uc, dc, A, bc, cc, return_final_state=True,
                            impl=impl, **kw)  # [nB, D, N]
  dt_sum = jnp.sum(_prepare_dt(dc, delta_bias, delta_softplus), axis=1)  # [nB, D]
  decay = jnp.exp(dt_sum[..., None] * A.astype(jnp.float32))  # [nB, D, N]
  first, last, no_reset = _segment_edges(segment_ids, b, n)
  split = lambda x: x.reshape(n, b, *x.shape[1:])
  decay = split(decay)
  if no_reset is not None:
    decay = decay * no_reset[..., None, None]
  # pass_states' layout: the state [B, D, N] as [B, "H"=D, "Dk"=N, "Dv"=1].
  h0 = (jnp.zeros((b, d, A.shape[1]), jnp.float32) if initial_state is None
        else initial_state.astype(jnp.float32))
  state_in, final = _combine_states(axis_name, layout, split(local)[..., None], decay,
                                    first, last, h0[..., None])
  y = selective_scan(uc, dc, A, bc, cc, D=D, z=zc, initial_state=state_in[..., 0].reshape(n * b, d, -1),
                     impl=impl, **kw)
  y = _unfold_batch(y, n)
  return (y, final[..., 0]) if return_final_state else y


# ---------------------------------------------------------------------------- convolutions


def left_context(x, width: int, *, axis_name, layout: str = "contiguous", segment_ids=None):
  """The `width` tokens before each local chunk in global order (short causal convs).

  x [B, Tl, C] -> (context [n, B, width, C], its segment ids [n, B, width] or None), n the
  local chunks (1 contiguous, 2 zigzag); zeros (segment id -1) before the sequence start."""
  op = "left_context"
  t = x.shape[1]
  p, idx = _axis(op, axis_name, layout, t)
  n = _n_chunks(layout)
  if not 1 <= width <= t // n:
    raise ValueError(f"{op}: width={width} must be in [1, the local chunk length {t // n}]")
  tails = tuple(None if y is None else _split(y, n)[:, :, t // n - width:]
                for y in (x, segment_ids))
  fwd = [(j, j + 1) for j in range(p - 1)]
  recv = lambda y, perm: None if y is None else jax.lax.ppermute(y, axis_name, perm)
  first = [recv(y if y is None else y[0], fwd) for y in tails]  # chunk i <- chunk i-1
  ctx = [[f] for f in first]
  if n == 2:  # chunk 2p-1-i <- chunk 2p-2-i: device i+1's second, or (i = p-1) own first
    back = [(j, j - 1) for j in range(1, p)]
    for out, y in zip(ctx, tails):
      if y is not None:
        out.append(jnp.where(idx == p - 1, y[0], recv(y[1], back)))
  x_ctx = jnp.stack(ctx[0])
  seg_ctx = None
  if segment_ids is not None:
    seg_ctx = jnp.stack(ctx[1])
    seg_ctx = seg_ctx.at[0].set(jnp.where(idx == 0, -1, seg_ctx[0]))
  return x_ctx, seg_ctx
