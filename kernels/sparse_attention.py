"""Sparse attention: the flash fold of `attention.py` over a list of keys per query block.

Layout as `attention`: q [B, T, H, D], k [B, S, Hkv, D], v [B, S, Hkv, Dv], H % Hkv == 0;
queries are bottom-right aligned (query i at position S - T + i) and causal means
key j <= that position. A query row that sees no key gives 0.

- `block_sparse_attention`: a bool block mask [B|1, H|1, ceil(T/block_q), ceil(S/block_k)];
  softmax or sigmoid. impl="pallas": the Hopper attention kernels walking block lists
  (`kernels/gpu/attention.py`).
- `selected_block_attention`: NSA's selected branch; each query token lists key blocks
  (int32 [B, T, Hkv, n], -1 unused, repeats count once), shared by a KV group's heads.
  impl="pallas": the same Hopper kernels, a token's query heads folded into query rows (64/G
  tokens to a tile, each row masked by its own token's blocks) and its blocks a row of a
  block mask (`selected_pallas`); or key-centric, as Flash Sparse Attention loads small
  groups (`_selected_keyed`: each block's tokens gathered into chunks on the dense kernel,
  merged by lse; `auto` takes it at G = 1 from 64k tokens, where it was timed faster).
- `compressed_importance`: NSA's selection scores, the compressed branch's probabilities
  summed over a KV group's heads (q [B, T, H, D], compressed keys [B, N, Hkv, D] at positions
  j*stride + block_size - 1, the branch's own lse [B, T, H] -> [B, T, Hkv, N] float32), so
  no softmax is recomputed: the XLA path is one einsum and one fused exp-mask-sum per chunk
  of tokens (`IMPORTANCE_ELEMENTS`); impl="pallas": a Hopper kernel (QK^T, masked exp2, the
  group sum as a second wgmma with a 0/1 grouping matrix; `importance_pallas`), which `auto`
  takes on a Hopper GPU (`IMPORTANCE_ON_AUTO`). No gradient.
- `block_max_scores`: block top-k's estimate (`layers.sparse_prefill`): each row's best
  score per key block, [B, R, Hkv, ceil(S / block)] float32; the XLA path chunks rows
  (`BLOCK_MAX_ELEMENTS`), impl="pallas" a Hopper kernel writing only the maxima
  (`block_max_pallas`). No gradient.
- `block_mean_attention`: block top-k's summary branch: each query attends to the mean key /
  value of the key blocks its block's mask row takes (each weighing as `block` keys), (o,
  lse) to merge with the block-sparse pass; impl="pallas" the Hopper forward kernel over the
  means with a per-query-block column mask (`block_mean_pallas`). No gradient.
- `vertical_slash_attention`: MInference; key columns every query sees ([B, H, nv]) and
  offsets o >= 0 (query i sees key i - o, [B, H, ns]), -1 unused; `vertical_slash_pattern`
  estimates both from the last queries' scores. impl="pallas": two passes of the Hopper
  forward kernel merged by lse, runs of offsets over the keys and the gathered columns
  (`vertical_slash_pallas`); forward only, the gradient is the XLA path's.

The three attention ops differ only in how the keys of a step are listed. `_sparse_flash` is the one XLA
loop: rows of queries (a query block, or one query token), and per step a list of key
indices per row (-1: none); it gathers those keys and folds them with `fold_block`, so
softmax and sigmoid come with it. Its backward is FlashAttention-2's (a `custom_vjp` that
recomputes the probabilities from the saved row log-sum-exp; dk / dv scatter-added), so
neither pass forms [T, S]: memory is rows x listed keys per step. Rows listing fewer keys
than the longest list run masked steps (a block mask traced under jit lists every key
block). The references build a dense [T, S] mask from the pattern, independently of the
lists, and call `attention_reference(mask=...)`. `selected_block_attention`'s XLA path
takes key-centric loading instead for KV groups of up to SELECTED_KEYED_XLA_MAX_GROUP heads
(`_selected_keyed` with `attention`'s XLA path: each block's tokens in chunks, far fewer
masked pairs than a token's scan over its n blocks).

NSA (`layers/nsa.py`) runs its three branches on kernels: the compressed one as causal
attention over query rows folded into heads (`layers.nsa.compressed_attention`, on
`attention`'s kernels, which also returns its lse), the selection's importance and the
selected branch here, the window on `attention`'s.

`block_sparse_attention` also runs the Pallas TPU flash kernels (`kernels/tpu/attention.py`,
impl="pallas" on TPU, "pallas_interpret" on CPU), their step tables built from the mask (or
from traced block indices); `selected_block_attention` runs there as key-centric loading whose
dense calls are those kernels (`_selected_tpu`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from longax.kernels import _checks
from longax.kernels._dispatch import register, register_kernels, resolve
from longax.kernels._vma import vary_like
from longax.kernels.attention import (AttnSpec, attention_reference, check_qkv, finish, fold_block,
                                      init_carry)
from longax.kernels.attention import attention as _attention
from longax.kernels.visibility import index_mask, query_positions, visible_pairs

VS_CHUNK = 64  # vertical columns / slash offsets folded per step of the XLA path
IMPORTANCE_ELEMENTS = 2**26  # compressed_importance's XLA path: float32 scores per chunk
BLOCK_MAX_ELEMENTS = 2**26  # block_max_scores' XLA path: scores per chunk of rows
BLOCK_MAX_BANDS = 8  # block_max_scores' XLA path with causal rows: row ranges


def _dedupe(idx):
  """-1 for every entry of the last axis equal to an earlier one (repeats count once)."""
  n = idx.shape[-1]
  earlier = jnp.tril(jnp.ones((n, n), bool), -1)  # [j, i]: i < j
  dup = jnp.any((idx[..., :, None] == idx[..., None, :]) & earlier, axis=-1)
  return jnp.where(dup, -1, idx)


def _chunks(idx, c):
  """[..., n] -> [n_steps, ..., c], padded with -1."""
  n = idx.shape[-1]
  pad = -(-n // c) * c - n
  idx = jnp.pad(idx, [(0, 0)] * (idx.ndim - 1) + [(0, pad)], constant_values=-1)
  return jnp.moveaxis(idx.reshape(idx.shape[:-1] + (-1, c)), -2, 0)


# ----------------------------------------------------------------------------------- XLA


def _tile(spec: AttnSpec, qpos, k, v, kidx):
  """One step's keys: (clipped indices [R, C], k [R, C, D], v [R, C, Dv], visible [R, Tq, C])."""
  kc = jnp.clip(kidx, 0, k.shape[0] - 1)
  ok = (kidx >= 0)[:, None, :]
  rule = visible_pairs(qpos[:, :, None], kidx[:, None, :], causal=spec.causal)
  return kc, k[kc], v[kc], ok if rule is None else ok & rule


def _sparse_forward(spec: AttnSpec, qr, qpos, k, v, key_idx):
  """-> (o [R, G, Tq, Dv] float32, lse [R, G, Tq]: +inf where a row sees nothing; None for
  sigmoid). Step j folds keys k[key_idx[j, r]] into row r with `fold_block` (B = R, Hkv = 1)."""
  r, tq, g, _ = qr.shape
  q5 = qr[:, :, None]

  def step(carry, kidx):
    _, kb, vb, ok = _tile(spec, qpos, k, v, kidx)
    return fold_block(spec, carry, q5, kb[:, :, None], vb[:, :, None], ok), None

  init = vary_like(init_carry(spec, (r, 1, g, tq), v.shape[-1]), qr, qpos, k, v, key_idx)
  carry, _ = jax.lax.scan(step, init, key_idx)
  o = finish(spec, carry)[:, 0]
  if spec.kind == "sigmoid":
    return o, None
  _, m, l = (x[:, 0] for x in carry)
  return o, jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sparse_flash(spec: AttnSpec, qr, qpos, k, v, key_idx):
  """Rows of queries qr [R, Tq, G, D] at positions qpos [R, Tq]; one KV head k [S, D],
  v [S, Dv]; key_idx [n, R, C] int32 (-1: no key) -> (o [R, G, Tq, Dv] float32, lse
  [R, G, Tq] natural log, -inf where a row sees nothing; None for sigmoid), both
  differentiable. Forward: the flash fold over the listed keys; backward (FlashAttention-2):
  per step, recompute the probabilities from the saved row log-sum-exp; dq in the carry,
  dk / dv scatter-added."""
  return _sparse_flash_fwd(spec, qr, qpos, k, v, key_idx)[0]


def _sparse_flash_fwd(spec, qr, qpos, k, v, key_idx):
  o, lse = _sparse_forward(spec, qr, qpos, k, v, key_idx)
  public = None if lse is None else jnp.where(jnp.isposinf(lse), -jnp.inf, lse)
  return (o, public), (qr, qpos, k, v, key_idx, o, lse)


def _sparse_flash_bwd(spec, res, cts):
  qr_in, qpos, k_in, v_in, key_idx, o, lse = res
  do, dlse = cts
  # float32 throughout (XLA:CPU has no bf16 x bf16 -> f32 dot for some of these contractions).
  qr, k, v, do = (x.astype(jnp.float32) for x in (qr_in, k_in, v_in, do))
  if spec.kind == "softmax":  # delta_i = sum_j p_ij dp_ij = do_i . o_i (- the lse's cotangent)
    delta = jnp.sum(do * o, axis=-1)
    if dlse is not None:
      delta = delta - jnp.where(jnp.isposinf(lse), 0.0, dlse)

  def step(carry, kidx):
    dq, dk, dv = carry
    kc, kb, vb, ok = _tile(spec, qpos, k, v, kidx)
    ok = ok[:, None]  # [R, 1, Tq, C]
    s = spec.logits(jnp.einsum("rtgd,rcd->rgtc", qr, kb))
    if spec.kind == "softmax":
      p = jnp.where(ok, jnp.exp(s - lse[..., None]), 0.0)
    else:
      p = jnp.where(ok, jax.nn.sigmoid(s + spec.bias), 0.0)
    dvb = jnp.einsum("rgtc,rgtd->rcd", p, do)
    dp = jnp.einsum("rgtd,rcd->rgtc", do, vb)
    ds = p * (dp - delta[..., None]) if spec.kind == "softmax" else dp * p * (1.0 - p)
    if spec.softcap is not None:
      ds = ds * (1.0 - jnp.square(s / spec.softcap))
    ds = ds * spec.scale
    dq = dq + jnp.einsum("rgtc,rcd->rtgd", ds, kb)
    dkb = jnp.einsum("rgtc,rtgd->rcd", ds, qr)
    return (dq, dk.at[kc].add(dkb), dv.at[kc].add(dvb)), None  # masked slots add 0

  init = vary_like(tuple(map(jnp.zeros_like, (qr, k, v))), qr, qpos, k, v, do, key_idx)
  (dq, dk, dv), _ = jax.lax.scan(step, init, key_idx)
  return dq.astype(qr_in.dtype), None, dk.astype(k_in.dtype), dv.astype(v_in.dtype), None


_sparse_flash.defvjp(_sparse_flash_fwd, _sparse_flash_bwd)


def _block_lists(block_mask, t, s_len, block_q, block_k, causal, block_indices=None):
  """[Bm, Hm, nq, n] int32: each query block's key blocks that are on (and not entirely in
  its causal future), -1 for the rest. From traced block_indices: those (repeats dropped),
  n = theirs. Else ascending, -1 padded; n is the most any block lists where the mask is
  concrete, else all key blocks."""
  nq, nk = block_mask.shape[2:]
  last_q = np.minimum((np.arange(nq) + 1) * block_q, t) - 1 + s_len - t
  conc = _checks.concrete(block_mask)
  if block_indices is not None and conc is None:
    idx = _dedupe(block_indices)
    ok = (idx >= 0) & ((idx * block_k <= last_q[:, None]) if causal else True)
    return jnp.where(ok, idx, -1)
  xp = jnp if conc is None else np
  on = block_mask if conc is None else conc.astype(bool)
  if causal:
    on = on & (np.arange(nk)[None, :] * block_k <= last_q[:, None])
  n = nk if conc is None else max(int(on.sum(-1).max()), 1)
  order = (jnp.argsort(~on, axis=-1, stable=True) if conc is None
           else np.argsort(~on, axis=-1, kind="stable"))[..., :n]
  return jnp.asarray(xp.where(xp.take_along_axis(on, order, -1), order, -1), jnp.int32)


def _block_sparse_xla(q, k, v, block_mask, spec: AttnSpec, *, block_q: int, block_k: int,
                      return_lse: bool = False, block_indices=None):
  b, t, h, _ = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  nq = block_mask.shape[2]
  lists = _block_lists(block_mask, t, s_len, block_q, block_k, spec.causal, block_indices)
  lists = jnp.broadcast_to(lists, (b,) + lists.shape[1:])  # [B, Hm, nq, n]
  kidx = lists[..., None] * block_k + jnp.arange(block_k, dtype=jnp.int32)
  kidx = jnp.where((lists[..., None] >= 0) & (kidx < s_len), kidx, -1)
  kidx = jnp.moveaxis(kidx, -2, -3)  # [B, Hm, n, nq, bk]
  qpad = jnp.pad(q, ((0, 0), (0, nq * block_q - t), (0, 0), (0, 0)))
  qr = rearrange(qpad, "b (r c) (k g) d -> b k g r c d", c=block_q, k=hkv)
  qpos = query_positions(nq * block_q, nq * block_q + s_len - t).reshape(nq, block_q)
  kh, vh = (rearrange(x, "b s k d -> b k s d") for x in (k, v))

  def one(qr, kk, vv, ki):  # qr [nq, bq, G', D], kk [S, D], ki [n, nq, bk] -> [Tp, G', Dv]
    o, lse = _sparse_flash(spec, qr, qpos, kk, vv, ki)  # (and lse [Tp, G'])
    return (rearrange(o, "r g c d -> (r c) g d"),
            None if lse is None else rearrange(lse, "r g c -> (r c) g"))

  if lists.shape[1] != 1:  # a list per query head: one head at a time
    kidx = rearrange(kidx, "b (k g) n r c -> b k g n r c", k=hkv)
    head = lambda qg, kk, vv, ki: jax.tree.map(lambda x: x[:, 0],
                                               one(qg[:, :, None], kk, vv, ki))
    fn = jax.vmap(jax.vmap(jax.vmap(head, (0, None, None, 0))))
    o, lse = fn(qr, kh, vh, kidx)  # [B, Hkv, G, Tp, Dv], [B, Hkv, G, Tp]
  else:  # one list for all heads: the KV group's query heads share the loaded keys
    group = lambda qg, kk, vv, ki: one(jnp.moveaxis(qg, 0, 2), kk, vv, ki)
    fn = jax.vmap(jax.vmap(group, (0, 0, 0, None)))
    o, lse = fn(qr, kh, vh, kidx[:, 0])
    o = rearrange(o, "b k t g d -> b k g t d")
    lse = None if lse is None else rearrange(lse, "b k t g -> b k g t")
  o = rearrange(o, "b k g t d -> b t (k g) d")[:, :t].astype(q.dtype)
  if not return_lse:
    return o
  return o, rearrange(lse, "b k g t -> b t (k g)")[:, :t]


def _selected_scan(q, k, v, block_indices, spec: AttnSpec, *, block_size: int,
                   q_positions=None):
  """The XLA path as a scan over query tokens, each a row listing its selected keys."""
  b, t, h, _ = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  idx = _dedupe(block_indices)  # [B, T, Hkv, n]
  kidx = idx[..., None] * block_size + jnp.arange(block_size, dtype=jnp.int32)
  kidx = jnp.where((idx[..., None] >= 0) & (kidx < s_len), kidx, -1)
  kidx = rearrange(kidx, "b t k n c -> b k n t c")  # rows: one query token each
  qr = rearrange(q, "b t (k g) d -> b k t 1 g d", k=hkv)
  qpos = query_positions(t, s_len) if q_positions is None else q_positions
  qpos = jnp.broadcast_to(qpos, (b, t))[..., None]  # [B, T, 1]
  kh, vh = (rearrange(x, "b s k d -> b k s d") for x in (k, v))

  def one(qr, kk, vv, ki, qp):  # qr [T, 1, G, D] -> [T, G, Dv]
    return _sparse_flash(spec, qr, qp, kk, vv, ki)[0][:, :, 0]

  o = jax.vmap(jax.vmap(one, (0, 0, 0, 0, None)))(qr, kh, vh, kidx, qpos)  # [B, Hkv, T, G, Dv]
  return rearrange(o, "b k t g d -> b t (k g) d").astype(q.dtype)


@jax.custom_vjp
def _take_rows(x, idx, back):
  """x [R, ...] -> x[idx] [M, ...], 0 where idx == R; a gather whose transpose is a gather
  too: `back` [R, n] lists, for each row of x, the n positions of y that copy it (M: none),
  so dx = sum_n dy[back] (no scatter-add, which XLA runs slowly on the GPU)."""
  return _take0(x, idx)


def _take0(x, idx):
  return jnp.take(x, idx, axis=0, mode="fill", fill_value=0)


def _take_rows_fwd(x, idx, back):
  return _take0(x, idx), back


def _take_rows_bwd(back, dy):
  r, n = back.shape
  dx = _take0(dy, back.reshape(-1)).reshape(r, n, *dy.shape[1:])
  return jnp.sum(dx.astype(jnp.float32), axis=1).astype(dy.dtype), None, None


_take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def _selected_keyed(q, k, v, block_indices, spec: AttnSpec, *, block_size: int, attend,
                    chunks, rows: int = 128):
  """`selected_block_attention` loaded key-centric, as Flash Sparse Attention does for small
  GQA groups: per (batch, KV head) the (token, selected block) pairs are sorted by block and
  each block's tokens gathered into chunks of `rows` slots, so every chunk attends to its one
  block (`chunks`); the own block (the causal diagonal) runs as block-diagonal causal
  attention (`attend`); the partial outputs are merged by their log-sum-exp. No tile walks
  the union of several tokens' blocks, so every MMA row is a useful one, at the price of the
  gathered q and the partial outputs ([T, n, H, D] in all) in memory. Rows move by gathers
  both ways (`_take_rows`: pair -> slot and slot -> pair are both known).
  chunks(q_slots [B, N * rows, H, D] (slot s of query head h: a token of KV head h // G),
  k, v [B, S, Hkv, D], chunk_block int32 [B, Hkv, N] (nb = ceil(S / block_size): empty),
  rows, block_size) -> (o [B, N * rows, H, Dv], lse [B, N * rows, H] natural log): each
  chunk against its block, non-causal (`_chunks_gathered`, or the block-sparse kernels from
  lists, `keyed_chunks_pallas`).
  attend(q [N, R, Hq, D], k [N, S', Hk, D], v, causal) -> (o, lse [N, R, Hq], -inf where a
  row sees nothing): the dense kernel (or the XLA path), for the own blocks. Takes T == S
  when causal (training, prefill), S a multiple of block_size when not
  (`keyed_unsupported`)."""
  b, t, h, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  dv = v.shape[-1]
  g, bs, n, tpc = h // hkv, block_size, block_indices.shape[-1], rows
  nb = -(-s_len // bs)
  idx = _dedupe(block_indices)  # [B, T, Hkv, n]
  own = (jnp.arange(t, dtype=jnp.int32) // bs)[None, :, None, None]
  past = (idx >= 0) & ((idx < own) if spec.causal else True)  # fully visible pairs
  own_on = jnp.any(idx == own, axis=-1) if spec.causal else None  # [B, T, Hkv]
  # per (batch, KV head): its T * n pairs in (token, slot) order, keyed by block (nb: not past)
  m = t * n
  key = jnp.moveaxis(jnp.where(past, idx, nb), 2, 1).reshape(b, hkv, m)
  order = jnp.argsort(key, axis=-1, stable=True).astype(jnp.int32)  # [B, Hkv, M]
  sk = jnp.take_along_axis(key, order, -1)
  # (searchsorted unrolled: its default while loop reads its predicate back to the host on
  # every iteration on the GPU)
  rowwise = lambda f, x: jax.vmap(f)(x.reshape(b * hkv, -1)).reshape(b, hkv, -1)
  search = lambda v, side="left": lambda x: jnp.searchsorted(x, v, side=side,
                                                             method="scan_unrolled")
  first = rowwise(search(jnp.arange(nb + 1)), sk).astype(jnp.int32)
  count = first[..., 1:] - first[..., :-1]  # [B, Hkv, nb]
  n_ch = -(-count // tpc)
  chunk_end = jnp.cumsum(n_ch, -1)
  chunk0 = chunk_end - n_ch  # each block's first chunk
  bound = -(-m // tpc) + nb  # static: whole chunks + one partial per block
  n_slots = bound * tpc
  at = lambda x, i: jnp.take_along_axis(x, i.reshape(b, hkv, -1), -1).reshape(i.shape)
  # pair -> slot, as a row of q_slots flattened (batch, slot, KV head); dead: `rows_all`
  rows_all = b * n_slots * hkv
  skc = jnp.minimum(sk, nb - 1)
  rank = jnp.arange(m, dtype=jnp.int32) - at(first, skc)
  local = (at(chunk0, skc) + rank // tpc) * tpc + rank % tpc  # slot within (b, kv)
  bi = jnp.arange(b, dtype=jnp.int32)[:, None, None]
  ki = jnp.arange(hkv, dtype=jnp.int32)[None, :, None]
  gid_sorted = jnp.where(sk < nb, (bi * n_slots + local) * hkv + ki, rows_all)
  inv = jnp.zeros_like(order).at[bi, ki, order].set(
      jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), order.shape), unique_indices=True)
  slot_of_pair = jnp.take_along_axis(gid_sorted, inv, -1)  # [B, Hkv, M], (token, slot) order
  slot_of_pair = jnp.moveaxis(slot_of_pair.reshape(b, hkv, t, n), 1, 2).reshape(-1)  # (b,t,kv,s)
  # chunk -> block (nb: empty); slot -> pair
  chunk_block = rowwise(search(jnp.arange(bound), "right"), chunk_end).astype(jnp.int32)
  cb = jnp.minimum(chunk_block, nb - 1)
  srank = (jnp.arange(bound) - at(chunk0, cb))[..., None] * tpc + jnp.arange(tpc)
  full = (chunk_block < nb)[..., None] & (srank < at(count, cb)[..., None])
  pair = at(order, jnp.minimum(at(first, cb)[..., None] + srank, m - 1))  # [B, Hkv, bound, tpc]
  tok, sel = pair // n, pair % n
  row_of_slot = jnp.where(full, (bi[..., None] * t + tok) * hkv + ki[..., None], b * t * hkv)
  pair_of_slot = jnp.where(full, row_of_slot * n + sel, b * t * hkv * n)
  slot_order = lambda x: jnp.moveaxis(x.reshape(b, hkv, n_slots), 1, 2).reshape(-1)  # (b, s, kv)
  q_slots = _take_rows(q.reshape(b * t * hkv, g * d), slot_order(row_of_slot),
                       slot_of_pair.reshape(b * t * hkv, n)).reshape(b, n_slots, h, d)
  o_c, lse_c = chunks(q_slots, k, v, chunk_block, tpc, bs)  # [B, n_slots, H, Dv], [B, n_slots, H]
  # each pair's partial (o, lse) back in (b, t, kv, s) order; pairs not past: lse = -inf
  back = slot_order(pair_of_slot)[:, None]
  o_p = _take_rows(o_c.reshape(rows_all, g * dv), slot_of_pair, back)  # [P, G*Dv]
  lse_p = _take_rows(lse_c.reshape(rows_all, g), slot_of_pair, back)
  lse_p = jnp.where((slot_of_pair < rows_all)[:, None], lse_p, -jnp.inf)
  o_p = o_p.reshape(b, t, hkv, n, g, dv)
  lse_p = lse_p.reshape(b, t, hkv, n, g)
  if spec.causal:  # the own block: causal attention within each block of bs tokens
    tp = nb * bs
    pad = lambda x: jnp.pad(x, ((0, 0), (0, tp - x.shape[1]), (0, 0), (0, 0)))
    o_o, lse_o = attend(pad(q).reshape(b * nb, bs, h, d), pad(k).reshape(b * nb, bs, hkv, d),
                        pad(v).reshape(b * nb, bs, hkv, dv), True)
    o_o = o_o.reshape(b, tp, hkv, 1, g, dv)[:, :t]
    lse_o = jnp.where(own_on[..., None, None], lse_o.reshape(b, tp, hkv, 1, g)[:, :t], -jnp.inf)
    o_p, lse_p = jnp.concatenate([o_p, o_o], 3), jnp.concatenate([lse_p, lse_o], 3)
  m_ = jnp.max(lse_p, axis=3, keepdims=True)
  m_ = jnp.where(jnp.isneginf(m_), 0.0, m_)  # a row that sees nothing: weights exp(-inf) = 0
  w = jnp.exp(lse_p - m_)
  w = w / jnp.maximum(jnp.sum(w, axis=3, keepdims=True), jnp.finfo(jnp.float32).tiny)
  o = jnp.sum(w[..., None] * o_p.astype(jnp.float32), axis=3)  # [B, T, Hkv, G, Dv]
  return o.reshape(b, t, h, -1).astype(q.dtype)


def _chunks_gathered(attend, max_batch: int = 32768):
  """`_selected_keyed`'s chunks by gathering each chunk's key block: the chunks of all KV
  heads as batch rows of dense, non-causal GQA calls (`attend`; q_slots is already
  [B x chunks, rows, H, D], so no transpose), at most `max_batch` rows per call (CUDA caps a
  grid's y / z at 65535). The key blocks' gradient is XLA's scatter-add (67 ms of 122 at 64k
  on the H100)."""

  def run(q_slots, k, v, chunk_block, tpc, bs):
    b, n_slots, h, d = q_slots.shape
    s_len, hkv = k.shape[1], k.shape[2]
    bound = n_slots // tpc
    nb = -(-s_len // bs)
    # row (b, s, kv) of k for each (b, chunk, key i, kv): [B * bound, bs, Hkv]
    blk = jnp.moveaxis(jnp.minimum(chunk_block, nb - 1), 1, 2)  # [B, bound, Hkv]
    pos = blk[:, :, None, :] * bs + jnp.arange(bs)[None, None, :, None]  # [B, bound, bs, Hkv]
    on = (blk < nb)[:, :, None, :] & (pos < s_len)
    row = (jnp.arange(b)[:, None, None, None] * s_len + pos) * hkv + jnp.arange(hkv)
    row = jnp.where(on, row, b * s_len * hkv).reshape(b * bound, bs, hkv)
    take = lambda x: _take0(x.reshape(b * s_len * hkv, x.shape[-1]), row)  # [B*bound, bs, Hkv, D]
    qc, kc, vc = q_slots.reshape(b * bound, tpc, h, d), take(k), take(v)
    outs = [attend(qc[i:i + max_batch], kc[i:i + max_batch], vc[i:i + max_batch], False)
            for i in range(0, b * bound, max_batch)]
    o, lse = (jnp.concatenate(parts) for parts in zip(*outs))
    return o.reshape(b, n_slots, h, -1), lse.reshape(b, n_slots, h)

  return run


# The XLA path takes key-centric loading (chunks and own blocks on the XLA attention path) for
# KV groups of at most this many query heads; larger groups, q_positions (decode) and causal
# calls with T != S take the per-token scan. Measured on the CPU (2 cores, float32, D64, 64-key
# blocks; NOTES.md, session 9), key-centric vs scan, fwd / fwd+bwd: G = 1 5.7-12x / 6.7-7.6x,
# G = 4 1.6x / 2.5x, G = 8 1.03x / 1.45x, G = 16 0.65x / 0.85x.
SELECTED_KEYED_XLA_MAX_GROUP = 8
# ... and while its gathered queries (B x T x n x H x D elements, as many again for the partial
# outputs) stay within this many elements (1 GiB in float32); past it the scan, whose memory
# is rows x listed keys per step.
SELECTED_KEYED_XLA_MAX_ELEMENTS = 2**28


def _keyed_fits(q, block_indices, limit: int) -> bool:
  """Whether key-centric loading's gathered queries (B x T x n x H x D elements; the partial
  outputs as many again) stay within `limit` elements (each backend's own budget)."""
  return q.size * block_indices.shape[-1] <= limit


def _op_attend(scale: float, impl: str = "xla"):
  """`_selected_keyed`'s dense calls through `attention` with `impl` (the XLA path, or the
  TPU kernels: "pallas" on TPU, "pallas_interpret")."""
  def attend(q, k, v, causal):
    return _attention(q, k, v, causal=causal, scale=scale, impl=impl, return_lse=True)
  return attend


def _selected_xla(q, k, v, block_indices, spec: AttnSpec, *, block_size: int, q_positions=None):
  g = q.shape[2] // k.shape[2]
  if (g <= SELECTED_KEYED_XLA_MAX_GROUP and q_positions is None
      and _keyed_fits(q, block_indices, SELECTED_KEYED_XLA_MAX_ELEMENTS)
      and keyed_unsupported(q, k, spec, block_size) is None):
    attend = _op_attend(spec.scale)
    return _selected_keyed(q, k, v, block_indices, spec, block_size=block_size, attend=attend,
                           chunks=_chunks_gathered(attend), rows=128)
  return _selected_scan(q, k, v, block_indices, spec, block_size=block_size,
                        q_positions=q_positions)


def _vertical_slash_xla(q, k, v, vertical_idx, slash_idx, spec: AttnSpec):
  b, t, h, _ = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  qpos = query_positions(t, s_len)
  vert = _dedupe(vertical_idx)  # [B, H, nv]
  is_vert = jnp.zeros((b, h, s_len + 1), bool).at[
      jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None],
      jnp.where(vert >= 0, vert, s_len)].set(True)[..., :s_len]
  slash = _dedupe(slash_idx)  # [B, H, ns]
  skey = jnp.where(slash[..., None, :] >= 0, qpos[:, None] - slash[..., None, :], -1)  # [B,H,T,ns]
  # A key on a slash that is also a vertical column is folded once, with the columns.
  on_vert = jnp.take_along_axis(is_vert, jnp.clip(skey, 0, s_len - 1).reshape(b, h, -1),
                                -1).reshape(skey.shape)
  skey = jnp.where((skey >= 0) & ~on_vert, skey, -1)
  # Each query token is a row listing its keys: the columns, then its slash keys.
  keys = jnp.concatenate([jnp.broadcast_to(vert[:, :, None], (b, h, t, vert.shape[-1])), skey], -1)
  steps = _chunks(keys, min(VS_CHUNK, keys.shape[-1]))  # [n, B, H, T, C]
  steps = rearrange(steps, "n b (k g) t c -> n b k g t c", k=hkv)
  qh = rearrange(q, "b t (k g) d -> b k g t 1 1 d", k=hkv)
  kh, vh = (rearrange(x, "b s k d -> b k s d") for x in (k, v))

  def one(qh, kk, vv, ki):  # one (batch, head): qh [T, 1, 1, D] -> [T, Dv]
    return _sparse_flash(spec, qh, qpos[:, None], kk, vv, ki)[0][:, 0, 0]

  fn = jax.vmap(jax.vmap(jax.vmap(one, (0, None, None, 1)), (0, 0, 0, 1)), (0, 0, 0, 1))
  o = rearrange(fn(qh, kh, vh, steps), "b k g t d -> b t (k g) d")  # K/V never repeated
  return o.astype(q.dtype)


# ------------------------------------------------------------- NSA's block importance


def compressed_ends(n: int, block_size: int, stride: int):
  """[n] int32: compressed key j's position, its block's last token j*stride + block_size - 1."""
  return jnp.arange(n, dtype=jnp.int32) * stride + block_size - 1


def _importance_positions(q_positions, b: int, t: int):
  """[B, T] int32: the queries' positions (default t)."""
  pos = jnp.arange(t, dtype=jnp.int32) if q_positions is None else q_positions
  return jnp.broadcast_to(pos, (b, t))


def _importance_xla(q, k_cmp, lse, *, block_size: int, stride: int, scale: float,
                    q_positions=None):
  """One einsum per chunk of tokens and one fused exp-mask-sum over the group: scores
  [B, c, Hkv, G, N] float32 for c tokens at a time (IMPORTANCE_ELEMENTS bounds them; lax.map
  over the chunks), never the whole [T, H, N]."""
  b, t, h, _ = q.shape
  n, hkv = k_cmp.shape[1], k_cmp.shape[2]
  ends = compressed_ends(n, block_size, stride)
  qpos = _importance_positions(q_positions, b, t)
  qg = rearrange(q, "b t (k g) d -> b t k g d", k=hkv)
  lg = rearrange(lse, "b t (k g) -> b t k g", k=hkv)

  def one(xs):  # qg [B, c, Hkv, G, D], lg [B, c, Hkv, G], pos [B, c] -> [B, c, Hkv, N]
    qc, lc, pc = xs
    s = jnp.einsum("btkgd,bnkd->btkgn", qc, k_cmp, preferred_element_type=jnp.float32)
    seen = visible_pairs(pc[..., None], ends)[:, :, None, None]  # [B, c, 1, 1, N]
    return jnp.sum(jnp.where(seen, jnp.exp(s * scale - lc[..., None]), 0.0), axis=3)

  c = max(1, min(t, IMPORTANCE_ELEMENTS // (b * h * n)))
  if c >= t:
    return one((qg, lg, qpos))
  m = -(-t // c)
  pad = lambda x, v=0: jnp.pad(x, [(0, 0), (0, m * c - t)] + [(0, 0)] * (x.ndim - 2),
                               constant_values=v)
  chunks = lambda x: jnp.moveaxis(x.reshape(b, m, c, *x.shape[2:]), 1, 0)
  out = jax.lax.map(one, (chunks(pad(qg)), chunks(pad(lg)), chunks(pad(qpos, -1))))
  return jnp.moveaxis(out, 0, 1).reshape(b, m * c, hkv, n)[:, :t]


# ----------------------------------------------------------------------------- reference
# Dense [B|1, H|1, T, S] masks built straight from each pattern's definition.


def _reference(q, k, v, mask, spec, q_positions=None):
  s_len, t = k.shape[1], q.shape[1]
  qpos = query_positions(t, s_len) if q_positions is None else q_positions
  o = attention_reference(q, k, v, qpos, jnp.arange(s_len), None, None, spec, mask=mask)
  return o.astype(q.dtype)


def _block_sparse_reference(q, k, v, block_mask, spec, *, block_q: int, block_k: int,
                            return_lse: bool = False, block_indices=None):  # the mask's blocks
  t, s_len = q.shape[1], k.shape[1]
  mask = jnp.asarray(block_mask)[:, :, jnp.arange(t) // block_q][:, :, :, jnp.arange(s_len) // block_k]
  if not return_lse:
    return _reference(q, k, v, mask, spec)
  o, lse = attention_reference(q, k, v, query_positions(t, s_len), jnp.arange(s_len), None, None,
                               spec, return_lse=True, mask=mask)
  return o.astype(q.dtype), lse


def _selected_reference(q, k, v, block_indices, spec, *, block_size: int, q_positions=None):
  h, hkv, s_len = q.shape[2], k.shape[2], k.shape[1]
  key_block = jnp.arange(s_len) // block_size
  sel = jnp.any(block_indices[..., None, :] == key_block[:, None], axis=-1)  # [B, T, Hkv, S]
  mask = jnp.repeat(rearrange(sel, "b t k s -> b k t s"), h // hkv, axis=1)
  return _reference(q, k, v, mask, spec, q_positions)


def _vertical_slash_reference(q, k, v, vertical_idx, slash_idx, spec):
  t, s_len = q.shape[1], k.shape[1]
  keys = jnp.arange(s_len)
  vert = jnp.any(vertical_idx[..., :, None] == keys, axis=-2)  # [B, H, S]
  offset = query_positions(t, s_len)[:, None] - keys  # [T, S]: i - j
  b, h = slash_idx.shape[:2]
  on = jnp.zeros((b, h, s_len + 1), bool).at[  # [B, H, S]: offset o is a slash
      jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None],
      jnp.where(slash_idx >= 0, slash_idx, s_len)].set(True)[..., :s_len]
  slash = (offset >= 0) & on[:, :, jnp.clip(offset, 0, s_len - 1)]  # [B, H, T, S]
  return _reference(q, k, v, vert[:, :, None, :] | slash, spec)


def _importance_reference(q, k_cmp, lse, *, block_size: int, stride: int, scale: float,
                          q_positions=None):
  """The definition in float32: every head's probabilities, then the group's sum."""
  b, t, h, _ = q.shape
  n, hkv = k_cmp.shape[1], k_cmp.shape[2]
  kk = jnp.repeat(k_cmp.astype(jnp.float32), h // hkv, axis=2)
  s = scale * jnp.einsum("bthd,bnhd->bthn", q.astype(jnp.float32), kk)
  qpos = _importance_positions(q_positions, b, t)
  seen = compressed_ends(n, block_size, stride) <= qpos[..., None]  # [B, T, N]
  p = jnp.where(seen[:, :, None], jnp.exp(s - lse[..., None]), 0.0)
  return p.reshape(b, t, hkv, h // hkv, n).sum(3)


# ------------------------------------------------ block top-k's estimate: block maxima


def _block_max_mask(r: int, nk: int, row_block):
  """bool [R, nk]: row r takes key block j (all, or j <= r // row_block)."""
  if row_block is None:
    return jnp.ones((r, nk), bool)
  return jnp.arange(nk)[None, :] <= (jnp.arange(r) // row_block)[:, None]


def _block_max_reference(q, k, *, block: int, row_block=None):
  """The definition in float32: every score, then the max over each block's keys."""
  b, r, hkv, _ = q.shape
  s_len = k.shape[1]
  nk = -(-s_len // block)
  sc = jnp.einsum("brhd,bshd->brhs", q.astype(jnp.float32), k.astype(jnp.float32))
  sc = jnp.pad(sc, ((0, 0),) * 3 + ((0, nk * block - s_len),), constant_values=-jnp.inf)
  sc = sc.reshape(b, r, hkv, nk, block).max(-1)
  return jnp.where(_block_max_mask(r, nk, row_block)[None, :, None], sc, -jnp.inf)


def _block_max_xla(q, k, *, block: int, row_block=None):
  """Rows in chunks of BLOCK_MAX_ELEMENTS scores (`lax.map`), products and scores in the
  inputs' dtype (ranking only), the max over each block's keys, float32 out. With row_block,
  the rows go in BLOCK_MAX_BANDS contiguous ranges, each against the key blocks up to its
  last row's (causal rows: ~(bands + 1) / (2 bands) of the products)."""
  b, r, hkv, d = q.shape
  s_len = k.shape[1]
  nk = -(-s_len // block)
  kp = jnp.pad(k, ((0, 0), (0, nk * block - s_len), (0, 0), (0, 0)))
  valid = (jnp.arange(nk * block) < s_len).reshape(nk, block)

  def band(lo, hi):  # rows [lo, hi) -> [B, hi - lo, Hkv, nk]
    m = nk if row_block is None else min(nk, (hi - 1) // row_block + 1)
    per_step = max(1, min(hi - lo, BLOCK_MAX_ELEMENTS // (b * hkv * m * block)))
    c = -(-(hi - lo) // per_step)
    qs = jnp.pad(q[:, lo:hi], ((0, 0), (0, c * per_step - (hi - lo)), (0, 0), (0, 0)))

    def rows(qi):  # [B, c, Hkv, D] -> [B, c, Hkv, m]
      sc = jnp.einsum("bchd,bshd->bchs", qi, kp[:, :m * block], preferred_element_type=qi.dtype)
      sc = jnp.where(valid[:m], sc.reshape(*sc.shape[:3], m, block), -jnp.inf)
      return sc.max(-1).astype(jnp.float32)

    out = jax.lax.map(rows, jnp.moveaxis(qs.reshape(b, c, per_step, hkv, d), 1, 0))
    out = jnp.moveaxis(out, 0, 1).reshape(b, c * per_step, hkv, m)[:, :hi - lo]
    return jnp.pad(out, ((0, 0),) * 3 + ((0, nk - m),), constant_values=-jnp.inf)

  if row_block is None:
    return band(0, r)
  edges = sorted({-(-r * i // BLOCK_MAX_BANDS) for i in range(BLOCK_MAX_BANDS + 1)})
  out = jnp.concatenate([band(lo, hi) for lo, hi in zip(edges, edges[1:])], axis=1)
  return jnp.where(_block_max_mask(r, nk, row_block)[None, :, None], out, -jnp.inf)


# ------------------------------------------- block top-k's summary: attention over block means

BLOCK_MEAN_ELEMENTS = 2**26  # block_mean_attention's XLA path: float32 scores per step


def _block_means(x, block: int):
  """x [B, S, Hkv, D] -> [B, ceil(S / block), Hkv, D] in x's dtype: each block's mean over its
  real keys (float32 sums)."""
  b, s_len = x.shape[:2]
  n = -(-s_len // block)
  xs = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, n * block - s_len), (0, 0), (0, 0)))
  count = jnp.minimum(block, s_len - jnp.arange(n) * block).astype(jnp.float32)
  return (xs.reshape(b, n, block, *x.shape[2:]).sum(2) / count[:, None, None]).astype(x.dtype)


def _block_mean_reference(q, k, v, block_mask, *, block: int, scale: float):
  """The definition in float32: every query's scores against the means its block takes, one
  softmax, log(block) added to the lse."""
  b, t, h, d = q.shape
  hkv = k.shape[2]
  kbar, vbar = (jnp.repeat(_block_means(x, block).astype(jnp.float32), h // hkv, axis=2)
                for x in (k, v))
  sc = scale * jnp.einsum("bthd,bnhd->bhtn", q.astype(jnp.float32), kbar)
  on = jnp.broadcast_to(block_mask, (b, h) + block_mask.shape[2:])[:, :, jnp.arange(t) // block]
  sc = jnp.where(on, sc, -jnp.inf)
  lse = jax.nn.logsumexp(sc, axis=-1)  # [B, H, T]; -inf: no block
  p = jnp.where(on, jnp.exp(sc - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
  o = jnp.einsum("bhtn,bnhd->bthd", p, vbar)
  return o, jnp.swapaxes(lse, 1, 2) + math.log(block)


def _block_mean_xla(q, k, v, block_mask, *, block: int, scale: float):
  """One query block per step row (`lax.map` over query blocks, several per step up to
  BLOCK_MEAN_ELEMENTS scores): [B, Hkv, G, block, nk] scores, products in the inputs' dtype,
  float32 accumulation, as the kernels. (Not `block_sparse_attention` with one key per
  block: its XLA path would scan S / block single-key steps, where this takes a few query
  blocks' dense scores per step.)"""
  b, t, h, d = q.shape
  hkv = k.shape[2]
  nq = -(-t // block)
  nk = -(-k.shape[1] // block)
  kbar, vbar = _block_means(k, block), _block_means(v, block)  # [B, nk, Hkv, D]
  qs = rearrange(jnp.pad(q, ((0, 0), (0, nq * block - t), (0, 0), (0, 0))),
                 "b (n c) (kv g) d -> n b kv g c d", c=block, kv=hkv)
  masks = rearrange(jnp.broadcast_to(block_mask, (b, h, nq, nk)), "b (kv g) i j -> i b kv g j",
                    kv=hkv)
  mm = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)

  def rows(args):  # one query block: [B, Hkv, G, c, D], [B, Hkv, G, nk]
    qi, m = args
    sc = jnp.where(m[..., None, :], mm("bkgcd,bjkd->bkgcj", qi, kbar) * scale, -jnp.inf)
    lse = jax.nn.logsumexp(sc, axis=-1)  # -inf: no block
    p = jnp.exp(sc - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None])
    return mm("bkgcj,bjkd->bkgcd", p.astype(vbar.dtype), vbar), lse

  per_step = max(1, BLOCK_MEAN_ELEMENTS // (b * h * block * nk))
  o, lse = jax.lax.map(rows, (qs, masks), batch_size=min(per_step, nq))
  o = rearrange(o, "n b kv g c d -> b (n c) (kv g) d")[:, :t]
  lse = rearrange(lse, "n b kv g c -> b (n c) (kv g)")[:, :t]
  return o, lse + math.log(block)


for _op, _ref, _xla in (("block_sparse_attention", _block_sparse_reference, _block_sparse_xla),
                        ("selected_block_attention", _selected_reference, _selected_xla),
                        ("vertical_slash_attention", _vertical_slash_reference, _vertical_slash_xla),
                        ("compressed_importance", _importance_reference, _importance_xla),
                        ("block_max_scores", _block_max_reference, _block_max_xla),
                        ("block_mean_attention", _block_mean_reference, _block_mean_xla)):
  register(_op, "reference")(_ref)
  register(_op, "xla")(_xla)

# The Pallas kernels walk the mask's on blocks: the Mosaic GPU kernels with block lists on
# Hopper (`kernels/gpu/attention.py`), the Pallas TPU flash kernels with step tables on TPU,
# and those under the TPU interpreter anywhere (impl="pallas_interpret", CPU).
from longax.kernels.gpu import attention as _gpu  # noqa: E402
from longax.kernels.tpu import attention as _tpu  # noqa: E402

register_kernels("block_sparse_attention",
                 gpu=(_gpu.block_sparse_pallas, _gpu.block_sparse_unsupported),
                 tpu=(_tpu.block_sparse_pallas, _tpu.block_sparse_unsupported),
                 interpret=(_tpu.block_sparse_interpret, _tpu.block_sparse_unsupported_interpret))
# Key-centric loading (`_selected_keyed`, Flash Sparse Attention's) on the Hopper kernels for
# the KV groups G listed in SELECTED_KEYED_MIN_LENGTH from that many tokens on, its chunks in
# SELECTED_KEYED_FORM ("lists": the block-sparse kernels from lists; True: gathered key blocks
# on the dense kernel); elsewhere the token tiles of `selected_pallas`. Measured (H100, B1 H16
# D128 bf16, n = 16 blocks of 64; NOTES.md, session 10), ms fwd / fwd+bwd, lists vs tiles:
# G = 1: 20.3 / 45.0 vs 37.7 / 146.1 at 64k, 9.9 / 24.0 vs 11.6 / 44.2 at 32k, 4.6 / 11.8 vs
# 3.2 / 11.9 at 16k (forward lost); G = 2 at 64k 16.5 / 39.2 vs 28.1 / 110.6, at 32k 8.1 / 21.8
# vs 10.0 / 38.2; G = 4 at 64k 14.3 / 36.0 vs 18.3 / 73.4, at 32k 7.3 / 21.1 vs 7.4 / 29.0;
# G = 8 at 64k 13.6 / 34.8 vs 11.1 / 44.4 (forward lost, fwd+bwd won: a training call's pick;
# session 11). G = 8 at 32k and G = 16 not measured as wins: the tiles. The gathered form:
# 23.5 / 106.0 at 64k, G = 1. `tests/gpu/... -k keyed` covers it (G = 1, 2, 4, 6, 8, 16).
SELECTED_KEYED_MIN_LENGTH = {1: 32768, 2: 32768, 4: 32768, 8: 65536}
SELECTED_KEYED_FORM = "lists"
# ... and gathered queries (B x T x n x H x D elements; the partial outputs as many again) of at
# most this many elements: B1 H16 D128 n16 at 64k is 2^31 (4 GiB in bf16; its gradient call
# ran on the 80 GB H100); larger calls keep the token tiles.
SELECTED_KEYED_MAX_ELEMENTS = 2**31


def keyed_unsupported(q, k, spec: AttnSpec, block_size: int) -> str | None:
  """Why `_selected_keyed` does not take a call (None: it does)."""
  if spec.causal and q.shape[1] != k.shape[1]:
    return f"causal with T={q.shape[1]} != S={k.shape[1]} (its own-block pass tiles T as S)"
  if not spec.causal and k.shape[1] % block_size:
    return f"non-causal with S={k.shape[1]} not a multiple of block_size={block_size}"
  return None


def _kernel_attend(scale: float, block_size: int):
  """`_selected_keyed`'s dense calls on the Hopper attention kernel (one step of
  `block_size` keys per chunk where it is 64 or 128)."""
  def attend(q, k, v, causal):
    spec = AttnSpec("softmax", causal, scale, None, 0, None, 0.0)
    blk = _gpu.blocks_for(q.shape[-1])
    if block_size in (64, 128):
      blk = dataclasses.replace(blk, block_kv=block_size)
    return _gpu.attention_pallas(q, k, v, None, None, None, None, spec, blocks=blk,
                                 return_lse=True)
  return attend


def _selected_gpu(q, k, v, block_indices, spec: AttnSpec, *, block_size: int,
                  key_centric: bool | str | None = None):
  """selected_block_attention on the Hopper kernels: key-centric loading where
  `key_centric` (default: SELECTED_KEYED_FORM for bf16 where SELECTED_KEYED_MIN_LENGTH lists
  the group and T reaches its length) and the call allows it (T == S when causal), else the token
  tiles (`selected_pallas`). key_centric="lists": its chunks on the block-sparse kernels
  from lists (`keyed_chunks_pallas`; no gathered K / V), else gathered key blocks on the
  dense kernel (`_chunks_gathered`)."""
  g = q.shape[2] // k.shape[2]
  if key_centric is None:
    key_centric = (q.shape[1] >= SELECTED_KEYED_MIN_LENGTH.get(g, math.inf)
                   and _keyed_fits(q, block_indices, SELECTED_KEYED_MAX_ELEMENTS)
                   and q.dtype == jnp.bfloat16  # what its GPU tests run
                   and SELECTED_KEYED_FORM)
  if key_centric and keyed_unsupported(q, k, spec, block_size) is None:
    attend = _kernel_attend(spec.scale, block_size)
    if key_centric == "lists":  # a block's chunks: at most one slot per token
      chunks = functools.partial(_gpu.keyed_chunks_pallas, spec=spec,
                                 max_chunks=-(-q.shape[1] // 128))
    else:
      chunks = _chunks_gathered(attend)
    return _selected_keyed(q, k, v, block_indices, spec, block_size=block_size, attend=attend,
                           chunks=chunks, rows=128)
  return _gpu.selected_pallas(q, k, v, block_indices, spec, block_size=block_size)


def _selected_tpu(q, k, v, block_indices, spec: AttnSpec, *, block_size: int,
                  interpret: bool = False):
  """selected_block_attention on the Pallas TPU flash kernels: key-centric loading
  (`_selected_keyed`), its chunks' gathered key blocks and the own blocks on the dense
  kernel (`attention`'s TPU impl, forward and backward); see `_selected_tpu_unsupported`."""
  attend = _op_attend(spec.scale, "pallas_interpret" if interpret else "pallas")
  return _selected_keyed(q, k, v, block_indices, spec, block_size=block_size, attend=attend,
                         chunks=_chunks_gathered(attend), rows=128)


def _selected_tpu_unsupported(call: dict, *, interpret: bool = False) -> str | None:
  """The dense TPU kernel's limits (head dims, default positions), key-centric loading's
  (`keyed_unsupported`), KV groups of at most SELECTED_KEYED_XLA_MAX_GROUP heads and its
  gathered queries within SELECTED_KEYED_XLA_MAX_ELEMENTS (what its tests cover)."""
  if (why := _tpu.unsupported(call, interpret=interpret)) is not None:
    return why
  q, k = call["q"], call["k"]
  if (why := keyed_unsupported(q, k, call["spec"], call["block_size"])) is not None:
    return why
  if (g := q.shape[2] // k.shape[2]) > SELECTED_KEYED_XLA_MAX_GROUP:
    return (f"{g} query heads per KV head (key-centric loading takes at most "
            f"{SELECTED_KEYED_XLA_MAX_GROUP})")
  if q.size * call["n_selected"] > SELECTED_KEYED_XLA_MAX_ELEMENTS:
    return (f"gathered queries of {q.size * call['n_selected']} elements (at most "
            f"SELECTED_KEYED_XLA_MAX_ELEMENTS = {SELECTED_KEYED_XLA_MAX_ELEMENTS})")
  return None


register_kernels("selected_block_attention", gpu=(_selected_gpu, _gpu.selected_unsupported),
                 tpu=(_selected_tpu, _selected_tpu_unsupported),
                 interpret=(functools.partial(_selected_tpu, interpret=True),
                            functools.partial(_selected_tpu_unsupported, interpret=True)))
register_kernels("compressed_importance", gpu=(_gpu.importance_pallas, _gpu.importance_unsupported))
register_kernels("block_max_scores", gpu=(_gpu.block_max_pallas, _gpu.block_max_unsupported))
register_kernels("block_mean_attention", gpu=(_gpu.block_mean_pallas, _gpu.block_mean_unsupported))
register_kernels("vertical_slash_attention",
                 gpu=(_gpu.vertical_slash_pallas, _gpu.vertical_slash_unsupported))

# ----------------------------------------------------------------------------- public API


def _check_qkv(op, q, k, v, causal, scale):
  """Validates the attention inputs; returns the scale."""
  check_qkv(op, q, k, v)
  if not isinstance(causal, bool):
    raise ValueError(f"{op}: `causal` must be a bool, got {causal!r}")
  return q.shape[-1]**-0.5 if scale is None else float(scale)


def _check_block_mask(op, block_mask, q, s_len, block_q, block_k, sizes, q_name, k_name):
  """A bool block mask [B|1, H|1, ceil(T / block_q), ceil(S / block_k)] for q [B, T, H, D]."""
  b, t, h, _ = q.shape
  _checks.rank(op, "block_mask", block_mask, 4,
               f"[B|1, H|1, ceil(T/{q_name}), ceil(S/{k_name})]")
  if jnp.asarray(block_mask).dtype != jnp.bool_:
    raise ValueError(f"{op}: `block_mask` must be bool, got dtype {jnp.asarray(block_mask).dtype}")
  nq, nk = -(-t // block_q), -(-s_len // block_k)
  bm_shape = tuple(block_mask.shape)
  if bm_shape[0] not in (1, b) or bm_shape[1] not in (1, h) or bm_shape[2:] != (nq, nk):
    raise ValueError(f"{op}: `block_mask` must be [B={b}|1, H={h}|1, {nq}, {nk}] "
                     f"({sizes}), got {bm_shape}")


def _check_indices(op, name, x, rank, layout, lo, hi):
  """Integer array of `rank`; concrete values must lie in [lo, hi) (-1: unused)."""
  _checks.rank(op, name, x, rank, layout)
  if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.integer):
    raise ValueError(f"{op}: `{name}` must be an integer array, got dtype {jnp.asarray(x).dtype}")
  conc = _checks.concrete(x)
  if conc is not None and conc.size and (conc.min() < lo or conc.max() >= hi):
    raise ValueError(f"{op}: `{name}` values must be in [{lo}, {hi}) (-1: unused), "
                     f"got [{conc.min()}, {conc.max()}]")
  return jnp.asarray(x, jnp.int32)


def _q_positions(op, q_positions, b: int, t: int) -> dict:
  """{} or {"q_positions": int32 [T] or [B, T]}: the queries' explicit positions, checked."""
  if q_positions is None:
    return {}
  q_positions = jnp.asarray(q_positions, jnp.int32)
  if q_positions.shape not in ((t,), (b, t)):
    raise ValueError(f"{op}: `q_positions` must have shape ({t},) or ({b}, {t}), got {q_positions.shape}")
  return dict(q_positions=q_positions)


def block_sparse_attention(q, k, v, block_mask=None, *, block_indices=None, block_q: int = 64,
                           block_k: int = 64, causal: bool = True, kind: str = "softmax",
                           scale: float | None = None, bias: float | None = None,
                           impl: str = "auto", return_lse: bool = False):
  """Attention where query i sees key j iff block (i // block_q, j // block_k) of
  `block_mask` (bool [B|1, H|1, ceil(T/block_q), ceil(S/block_k)]) is on, and
  j <= i + S - T when causal. Or the same blocks as `block_indices` (int [B|1, H|1,
  ceil(T/block_q), n]: each query block's key blocks, -1 unused, repeats count once), one of
  the two: where they are traced (a pattern chosen inside jit), indices keep the XLA path's
  steps and the kernels' list sorts n long instead of ceil(S/block_k).
  kind="softmax" | "sigmoid" (bias: sigmoid only, default -log S). The XLA path loops over
  each query block's on key blocks only; their number is static where the mask is concrete,
  n with indices, else every key block is a step (masked).
  return_lse (softmax): also each row's log-sum-exp over the keys it sees, [B, T, H]
  float32 (-inf for a row that sees none), differentiable: a partial result `merge_partials`
  can combine with another attention of the same rows over other keys."""
  op = "block_sparse_attention"
  scale = _check_qkv(op, q, k, v, causal, scale)
  _checks.positive_int(op, "block_q", block_q)
  _checks.positive_int(op, "block_k", block_k)
  s_len = k.shape[1]
  sizes = f"block_q={block_q}, block_k={block_k}"
  extra = {}
  if (block_mask is None) == (block_indices is None):
    raise ValueError(f"{op}: give one of `block_mask` and `block_indices`")
  if block_indices is not None:
    b, t, h, _ = q.shape
    nq, nk = -(-t // block_q), -(-s_len // block_k)
    idx = _check_indices(op, "block_indices", block_indices, 4, "[B|1, H|1, ceil(T/block_q), n]",
                         -1, nk)
    if idx.shape[0] not in (1, b) or idx.shape[1] not in (1, h) or idx.shape[2] != nq \
        or idx.shape[3] < 1:
      raise ValueError(f"{op}: `block_indices` must be [B={b}|1, H={h}|1, {nq}, n>=1] "
                       f"({sizes}), got {idx.shape}")
    conc = _checks.concrete(idx)
    block_mask = index_mask(idx if conc is None else conc, nk)
    extra["block_indices"] = idx
  _check_block_mask(op, block_mask, q, s_len, block_q, block_k, sizes, "block_q", "block_k")
  if kind == "softmax":
    if bias is not None:
      raise ValueError(f"{op}: `bias` is for kind='sigmoid' only")
    bias = 0.0
  elif kind == "sigmoid":
    bias = -math.log(s_len) if bias is None else bias
    if jnp.ndim(bias) != 0:
      raise ValueError(f"{op}: `bias` must be a scalar, got shape {jnp.shape(bias)}")
    bias = float(bias)
  else:
    raise ValueError(f"{op}: `kind` must be 'softmax' or 'sigmoid', got {kind!r}")
  if return_lse and kind != "softmax":
    raise ValueError(f"{op}: `return_lse` is for kind='softmax' only (sigmoid has no normaliser)")
  spec = AttnSpec(kind, causal, scale, None, 0, None, bias)
  fn = resolve(op, impl, dict(q=q, k=k, v=v, spec=spec, block_q=block_q, block_k=block_k))
  if return_lse:
    extra["return_lse"] = True
  return fn(q, k, v, block_mask, spec, block_q=block_q, block_k=block_k, **extra)


def selected_block_attention(q, k, v, block_indices, *, block_size: int = 64,
                             causal: bool = True, scale: float | None = None,
                             impl: str = "auto", q_positions=None):
  """NSA's selected-block branch (softmax): query token t of every head of KV group g sees
  the keys of blocks `block_indices[b, t, g]` (int32 [B, T, Hkv, n] of key-block indices
  < ceil(S/block_size); -1 unused, repeats count once), and j <= t + S - T when causal.
  q_positions [T] or [B, T]: the queries' positions instead of the bottom-right `S - T + t`
  (a decode cache whose slot j holds position j: slots past the query stay unseen)."""
  op = "selected_block_attention"
  scale = _check_qkv(op, q, k, v, causal, scale)
  _checks.positive_int(op, "block_size", block_size)
  b, t, _, _ = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  nk = -(-s_len // block_size)
  idx = _check_indices(op, "block_indices", block_indices, 4, "[B, T, Hkv, n]", -1, nk)
  if idx.shape[:3] != (b, t, hkv) or idx.shape[3] < 1:
    raise ValueError(f"{op}: `block_indices` must be [B={b}, T={t}, Hkv={hkv}, n>=1], got {idx.shape}")
  extra = _q_positions(op, q_positions, b, t)
  spec = AttnSpec("softmax", causal, scale, None, 0, None, 0.0)
  fn = resolve(op, impl, dict(q=q, k=k, v=v, spec=spec, block_size=block_size,
                             n_selected=idx.shape[-1], explicit_positions=bool(extra)))
  return fn(q, k, v, idx, spec, block_size=block_size, **extra)


def block_max_scores(q, k, *, block: int = 64, row_block: int | None = None,
                     impl: str = "auto"):
  """Each row's best score per key block (block top-k's estimate, `layers.sparse_prefill`):
  q [B, R, Hkv, D] rows per KV head (a caller folds probes and query heads into rows),
  k [B, S, Hkv, D] -> [B, R, Hkv, ceil(S / block)] float32, max over the keys s < S of block j
  of q_r . k_s (unscaled); with `row_block`, row r takes the key blocks j <= r // row_block
  only (-inf past them: causal rows, which the kernel skips). Ranking only: no gradient.
  impl="pallas": a Hopper kernel that keeps the scores in registers and writes the maxima
  (`block_max_pallas`; blocks of 64; `auto` takes it on a Hopper GPU)."""
  op = "block_max_scores"
  _checks.rank(op, "q", q, 4, "[B, R, Hkv, D]")
  _checks.rank(op, "k", k, 4, "[B, S, Hkv, D]")
  _checks.same_dtype(op, q=q, k=k)
  _checks.floating(op, "q", q)
  if k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
    raise ValueError(f"{op}: `k` must be [B={q.shape[0]}, S, Hkv={q.shape[2]}, D={q.shape[3]}] "
                     f"to match q {q.shape}, got {k.shape}")
  _checks.positive_int(op, "block", block)
  if row_block is not None:
    _checks.positive_int(op, "row_block", row_block)
  fn = resolve(op, impl, dict(q=q, k=k, block=block, impl=impl))
  return fn(jax.lax.stop_gradient(q), jax.lax.stop_gradient(k), block=block, row_block=row_block)


def block_mean_attention(q, k, v, block_mask, *, block: int = 64, scale: float | None = None,
                         impl: str = "auto"):
  """Attention over key-block means (block top-k's summary branch, `layers.sparse_prefill`):
  query i attends to the mean key and mean value of every key block j (`block` keys; the
  last block's mean over its real keys) whose `block_mask` (bool [B|1, H|1, ceil(T/block),
  ceil(S/block)]) entry (i // block, j) is on, each mean weighing as `block` keys. q [B, T, H,
  D], k/v [B, S, Hkv, D] -> (o [B, T, H, Dv] float32, lse [B, T, H] float32 with log(block) in
  it; o = 0 and lse = -inf where a query's block takes no block): a partial result for
  `merge_partials`. No causal rule: the mask says which blocks a query takes. No gradient
  (inference). impl="pallas": the Hopper attention kernel over the means with each query
  block's own key columns masked in-tile (`block_mean_pallas`)."""
  op = "block_mean_attention"
  scale = _check_qkv(op, q, k, v, False, scale)
  _checks.positive_int(op, "block", block)
  _check_block_mask(op, block_mask, q, k.shape[1], block, block, f"block={block}", "block", "block")
  fn = resolve(op, impl, dict(q=q, k=k, v=v, block=block, impl=impl))
  sg = jax.lax.stop_gradient
  return fn(sg(q), sg(k), sg(v), jnp.asarray(block_mask), block=block, scale=scale)


def compressed_importance(q, k_cmp, lse, *, block_size: int, stride: int,
                          scale: float | None = None, impl: str = "auto", q_positions=None):
  """NSA's block importance: the compressed branch's attention probabilities summed over
  each KV group's query heads. q [B, T, H, D], k_cmp [B, N, Hkv, D] (compressed key j at
  position end_j = j*stride + block_size - 1), lse [B, T, H] float32: each row's natural-log
  log-sum-exp over the compressed keys it sees (`attention(..., return_lse=True)` of the
  compressed branch; -inf where it sees none) -> [B, T, Hkv, N] float32,
  sum_g exp(scale q_(t,g).k_j - lse_(t,g)) where end_j <= position of t, else 0.
  q_positions [T] or [B, T]: the queries' positions (default 0..T-1: query t at t).
  Not differentiable (NSA's selection ranks blocks under stop_gradient): no gradient rule."""
  op = "compressed_importance"
  _checks.rank(op, "q", q, 4, "[B, T, H, D]")
  _checks.rank(op, "k_cmp", k_cmp, 4, "[B, N, Hkv, D]")
  _checks.same_dtype(op, q=q, k_cmp=k_cmp)
  _checks.floating(op, "q", q)
  b, t, h, d = q.shape
  if k_cmp.shape[0] != b or k_cmp.shape[3] != d:
    raise ValueError(f"{op}: `k_cmp` must be [B={b}, N, Hkv, D={d}] to match q {q.shape}, "
                     f"got {k_cmp.shape}")
  _checks.divides(op, f"q heads H={h} vs k_cmp heads Hkv={k_cmp.shape[2]}", k_cmp.shape[2], h)
  _checks.shape_is(op, "lse", lse, (b, t, h), "[B, T, H]")
  _checks.floating(op, "lse", lse)
  _checks.positive_int(op, "block_size", block_size)
  _checks.positive_int(op, "stride", stride)
  extra = _q_positions(op, q_positions, b, t)
  scale = d**-0.5 if scale is None else float(scale)
  fn = resolve(op, impl, dict(q=q, k_cmp=k_cmp, impl=impl, explicit_positions=bool(extra)))
  return fn(jax.lax.stop_gradient(q), jax.lax.stop_gradient(k_cmp),
            jax.lax.stop_gradient(jnp.asarray(lse, jnp.float32)), block_size=block_size,
            stride=stride, scale=scale, **extra)


def vertical_slash_attention(q, k, v, vertical_idx, slash_idx, *, causal: bool = True,
                             scale: float | None = None, impl: str = "auto"):
  """MInference's vertical-slash pattern (softmax): query i (position p = i + S - T) of head
  h sees keys `vertical_idx[b, h]` (int32 [B, H, nv], columns < S) and keys p - o for the
  offsets o in `slash_idx[b, h]` (int32 [B, H, ns], 0 <= o < S); -1 unused, repeats and
  keys on both count once; causal also drops columns j > p."""
  op = "vertical_slash_attention"
  scale = _check_qkv(op, q, k, v, causal, scale)
  b, _, h, _ = q.shape
  s_len = k.shape[1]
  vert = _check_indices(op, "vertical_idx", vertical_idx, 3, "[B, H, nv]", -1, s_len)
  slash = _check_indices(op, "slash_idx", slash_idx, 3, "[B, H, ns]", -1, s_len)
  for name, x in (("vertical_idx", vert), ("slash_idx", slash)):
    if x.shape[:2] != (b, h) or x.shape[2] < 1:
      raise ValueError(f"{op}: `{name}` must be [B={b}, H={h}, n>=1], got {x.shape}")
  spec = AttnSpec("softmax", causal, scale, None, 0, None, 0.0)
  fn = resolve(op, impl, dict(q=q, k=k, v=v, spec=spec))
  return fn(q, k, v, vert, slash, spec)


def vertical_slash_pattern(q, k, *, n_vertical: int, n_slash: int, last_q: int = 64,
                           scale: float | None = None):
  """MInference's estimate from the last `last_q` queries' causal softmax scores: the
  `n_vertical` key columns and `n_slash` offsets (o = query position - key) with the most
  attention mass, per head. -> (vertical_idx [B, H, n_vertical], slash_idx [B, H, n_slash]),
  int32, ascending, in [0, S)."""
  op = "vertical_slash_pattern"
  _checks.rank(op, "q", q, 4, "[B, T, H, D]")
  _checks.rank(op, "k", k, 4, "[B, S, Hkv, D]")
  _checks.floating(op, "q", q)
  b, t, h, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  if k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"{op}: `k` must be [B={b}, S, Hkv, D={d}] to match q {q.shape}, got {k.shape}")
  _checks.divides(op, f"q heads H={h} vs k heads Hkv={hkv}", hkv, h)
  _checks.positive_int(op, "last_q", last_q)
  for name, n in (("n_vertical", n_vertical), ("n_slash", n_slash)):
    _checks.positive_int(op, name, n)
    if n > s_len:
      raise ValueError(f"{op}: `{name}`={n} exceeds the number of keys S={s_len}")
  scale = d**-0.5 if scale is None else float(scale)
  n_last = min(last_q, t)
  qpos = query_positions(t, s_len)[t - n_last:]
  kk = jnp.repeat(k.astype(jnp.float32), h // hkv, axis=2)
  s = scale * jnp.einsum("bthd,bshd->bhts", q[:, t - n_last:].astype(jnp.float32), kk)
  offset = qpos[:, None] - jnp.arange(s_len)  # [L, S]
  p = jax.nn.softmax(jnp.where(offset >= 0, s, -jnp.inf), axis=-1)
  p = jnp.where(offset >= 0, p, 0.0)  # rows that see nothing (T > S) add nothing
  vert_score = jnp.sum(p, axis=2)  # [B, H, S]
  slash_score = jnp.zeros((b, h, s_len + 1), jnp.float32).at[
      :, :, jnp.where(offset >= 0, offset, s_len)].add(p)[..., :s_len]
  vert = jnp.sort(jax.lax.top_k(vert_score, n_vertical)[1], axis=-1)
  slash = jnp.sort(jax.lax.top_k(slash_score, n_slash)[1], axis=-1)
  return vert.astype(jnp.int32), slash.astype(jnp.int32)
