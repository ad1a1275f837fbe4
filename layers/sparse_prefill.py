"""Training-free sparse prefill (MInference) for full softmax attention layers.

    with capture() as records:          # a dense forward records each eligible layer's q, k, v
      model(calibration_tokens)
    plan = SparsePrefill(kind, budget, block, heads=...)   # per layer, per head: a choice
    with prefill(plan):                 # traced inside: eligible layers prefill sparsely
      logits, cache = model.decode(prompt, fresh_cache)

Eligible layers are `Attention(kind="softmax")` without a window or softcap (they decide,
the model does not). Under `prefill`, such a layer given a cache and more than one token
takes the cache as fresh (the whole prompt from position 0), attends sparsely and writes
the same K/V a dense prefill would; single-token decode steps stay dense. Layers take their
plan in call order, the order `capture` recorded them.

Each prompt's pattern is estimated online from its own q, k; the plan fixes, per head, how
the budget of `budget` keys per query splits (`choices`):
- `vertical_slash`: a choice is the number of vertical columns nv; the slash lines get
  budget - nv (`kernels.vertical_slash_pattern` from the last `last_q` queries, then
  `kernels.vertical_slash_attention`).
- `block_topk`: K = ceil(budget / block) key blocks per query block; a choice is how many
  of them are the nearest (diagonal) blocks, the rest the best of the others by the score
  of the query block's probes (its mean query and its last queries) against each key block's
  best key (`_block_scores`; mean-pooled q and k, as MInference's, drown a needle)
  (`kernels.block_sparse_attention`). The block mask is
  traced, so under jit its XLA path steps over every key block (masked): the same output,
  no saving yet (that is the GPU kernel's job). With `summary`, every skipped key block
  wholly before the query's block still takes part as one key, its mean key and mean value,
  weighing as its `block` keys (log(block) on its score), in one softmax with the kept keys
  (`kernels.block_mean_attention`, merged by log-sum-exp): heads whose attention spreads
  over the whole prompt keep that share (NOTES.md: dense's answers at 1024 keys per query on
  the 8k passkey model).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax.numpy as jnp
from einops import rearrange

from longax import kernels
from longax.kernels.attention import merge_partials
from longax.kernels.visibility import index_mask

KINDS = ("vertical_slash", "block_topk")
LAST_Q = 64


@dataclasses.dataclass(frozen=True)
class SparsePrefill:
  kind: str  # vertical_slash | block_topk
  budget: int  # keys per query
  block: int  # block_topk: tokens per block
  heads: tuple[tuple[int, ...], ...] = ()  # per eligible layer (call order), per head: a choice
  last_q: int = LAST_Q  # vertical_slash: queries the pattern is estimated from
  summary: bool = False  # block_topk: skipped blocks as one mean key each (block_mean_attention)


def choices(kind: str, budget: int, block: int) -> tuple[int, ...]:
  """The per-head options the search compares (all at the same budget)."""
  if kind == "vertical_slash":
    opts = (budget // 4, budget // 2, 3 * budget // 4)
    return tuple(sorted({min(max(1, n), max(1, budget - 1)) for n in opts}))
  k = -(-budget // block)
  return tuple(sorted({1, max(1, k // 2), k}))


def attend(q, k, v, kind: str, heads: tuple[int, ...], budget: int, block: int,
           last_q: int = LAST_Q, impl: str = "auto", summary: bool = False):
  """Sparse causal attention of a whole prompt, q [B, T, H, D], k/v [B, T, Hkv, D], head h
  with option heads[h] (see `choices`) -> [B, T, H, D]. summary: block_topk's skipped blocks
  as one mean key each (`kernels.block_mean_attention`)."""
  if kind == "vertical_slash":
    return _vertical_slash(q, k, v, heads, budget, last_q, impl)
  return _block_topk(q, k, v, heads, budget, block, impl, summary)


def _vertical_slash(q, k, v, heads, budget, last_q, impl):
  s = k.shape[1]
  per = {}  # one estimate per distinct option, then each head takes its own
  for nv in sorted(set(heads)):
    per[nv] = kernels.vertical_slash_pattern(q, k, n_vertical=min(nv, s),
                                             n_slash=min(max(1, budget - nv), s), last_q=last_q)
  width_v = max(x[0].shape[-1] for x in per.values())
  width_s = max(x[1].shape[-1] for x in per.values())
  pad = lambda x, w: jnp.pad(x, ((0, 0), (0, 0), (0, w - x.shape[-1])), constant_values=-1)
  vert = jnp.stack([pad(per[nv][0], width_v)[:, h] for h, nv in enumerate(heads)], axis=1)
  slash = jnp.stack([pad(per[nv][1], width_s)[:, h] for h, nv in enumerate(heads)], axis=1)
  return kernels.vertical_slash_attention(q, k, v, vert, slash, impl=impl)


# a query block's probes: its mean query and its last PROBES - 1 queries
PROBES = 4


def _block_scores(q, k, block):
  """score [B, H, nq, nk]: for query block i and key block j <= i, the best match of block i's
  probe queries (its mean query and its last PROBES - 1 queries) against block j's keys:
  max over probes p and keys s in j of p . k_s; -inf for j > i (causal: never kept). A single
  key that matches (a needle) raises its block, where a mean over the block's keys would
  dilute it block-fold; the last queries keep what a block ends with (a question) from
  drowning in the mean. The maxima come from `kernels.block_max_scores` (a KV group's probes
  as its rows, `row_block` rows per query block: the kernel skips the blocks past them)."""
  b, t, h, d = q.shape
  hkv, probes = k.shape[2], PROBES
  n = -(-t // block)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, n * block - t), (0, 0), (0, 0)))
  qs = rearrange(pad(q), "b (n c) (kv g) d -> n b kv g c d", c=block, kv=hkv)
  start = jnp.arange(n)[:, None] * block
  end = jnp.minimum(start + block, t)  # the block's real rows: [start, end)
  last = jnp.maximum(end - 1 - jnp.arange(probes - 1) - start, 0)  # [n, P - 1]
  picked = jnp.take_along_axis(qs, last[:, None, None, None, :, None], axis=4)
  mean = qs.astype(jnp.float32).mean(-2, keepdims=True).astype(q.dtype)
  qp = jnp.concatenate([mean, picked], axis=-2)  # [n, B, Hkv, G, P, D]
  rows = rearrange(qp, "n b kv g p d -> b (n g p) kv d")
  g = h // hkv
  score = kernels.block_max_scores(rows, k, block=block, row_block=g * probes)  # [B, R, Hkv, nk]
  score = rearrange(score, "b (n g p) kv j -> b (kv g) n p j", g=g, p=probes)
  return jnp.max(score, axis=3)


def _keep(score, heads, budget, block):
  """Block top-k's key blocks int32 [B, H, n, K'] (-1 unused; each at most once) of query
  block i: its heads[h] nearest blocks (i, i-1, ...) and the best K - heads[h] of the others
  up to i by `score` (ties to the lower index), K = ceil(budget / block)."""
  n = score.shape[-1]
  i, j = jnp.arange(n)[:, None], jnp.arange(n)[None, :]
  k_blocks = -(-budget // block)
  n_local = jnp.asarray(heads, jnp.int32)[:, None, None]  # [H, 1, 1]
  rest = jnp.where((j <= i) & (i - j >= n_local), score, -jnp.inf)
  best, at = kernels.top_k(rest, min(k_blocks, n))  # [B, H, n, K], best first
  take = (jnp.arange(best.shape[-1]) < k_blocks - n_local) & jnp.isfinite(best)
  back = jnp.arange(min(max(heads), n))  # the local blocks i - back, where back < heads[h]
  near = jnp.where((back < n_local) & (i >= back), i - back, -1)  # [H, n, L]
  near = jnp.broadcast_to(near, best.shape[:3] + near.shape[-1:])
  return jnp.concatenate([jnp.where(take, at, -1), near], -1).astype(jnp.int32)


def _block_topk(q, k, v, heads, budget, block, impl, summary=False):
  n = -(-q.shape[1] // block)
  keep = _keep(_block_scores(q, k, block), heads, budget, block)  # [B, H, n, K']
  out = kernels.block_sparse_attention(q, k, v, block_indices=keep, block_q=block,
                                       block_k=block, impl=impl, return_lse=summary)
  if not summary:
    return out
  i, j = jnp.arange(n)[:, None], jnp.arange(n)[None, :]
  o, _ = merge_partials(out[0].astype(jnp.float32), out[1],
                        *kernels.block_mean_attention(q, k, v, (j < i) & ~index_mask(keep, n),
                                                      block=block, impl=impl))
  return o.astype(q.dtype)


# ------------------------------------------------------------------------------ context


@dataclasses.dataclass
class _State:
  plan: SparsePrefill | None = None
  taken: int = 0
  records: list | None = None


_STATE: contextvars.ContextVar[_State | None] = contextvars.ContextVar("longax_sparse_prefill",
                                                                       default=None)


@contextlib.contextmanager
def prefill(plan: SparsePrefill):
  """Eligible layers traced inside prefill sparsely with `plan` (one entry each, in order)."""
  token = _STATE.set(_State(plan=plan))
  try:
    yield
  finally:
    _STATE.reset(token)


@contextlib.contextmanager
def capture():
  """Eligible layers called (eagerly) inside append (q, k, v) to the list it yields."""
  state = _State(records=[])
  token = _STATE.set(state)
  try:
    yield state.records
  finally:
    _STATE.reset(token)


def record(q, k, v) -> None:
  state = _STATE.get()
  if state is not None and state.records is not None:
    state.records.append((q, k, v))


def take() -> tuple[SparsePrefill, tuple[int, ...]] | None:
  """(plan, this layer's per-head options) inside `prefill`, else None."""
  state = _STATE.get()
  if state is None or state.plan is None:
    return None
  if state.taken >= len(state.plan.heads):
    raise ValueError(f"sparse prefill: the plan covers {len(state.plan.heads)} attention layers, "
                     "the model has more (a plan made for another model?)")
  heads = state.plan.heads[state.taken]
  state.taken += 1
  return state.plan, heads
