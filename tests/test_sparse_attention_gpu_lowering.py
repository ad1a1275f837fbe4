"""Block-sparse attention on the Mosaic GPU attention kernels (block lists), on any machine:
the kernels lower for "cuda" forward and backward (cross-platform lowering catches layout,
shared-memory and tracing errors without a GPU), the lists list every visible block once and
nothing else, the kernels' step loop (`_Listed.run`, on arrays) walks them as meant, and the
op run with the kernels emulated by list-following XLA (the pairs each warpgroup's steps
cover, the rule on masked steps only) matches the reference. The same for NSA's selected
blocks (`selected_pallas`) and `NSA.attend` with every branch on the kernels. NSA's block
importance kernel (`importance_pallas`) lowers and runs under Mosaic GPU's interpret mode on CPU
against the reference; so do MInference's vertical-slash passes (`vertical_slash_pallas`, ~35 s
of the file; their lists checked against the pattern's definition). ~2 min on 2 cores. Running the kernels is checked on the device
(`tests/gpu/test_sparse_attention_gpu.py`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import block_indices_of
from test_attention_gpu_lowering import _onehot_cover, emulated  # noqa: F401 (a fixture)
from longax.kernels import block_sparse_attention
from longax.kernels.attention import AttnSpec
from longax.kernels.gpu import attention as gpu


def _mask(shape, density, seed, empty_row=True):
  """bool block mask, blocks on with probability `density`; query block 0 all off (a row of
  queries that sees nothing) where `empty_row`."""
  on = np.random.default_rng(seed).random(shape) < density
  if empty_row:
    on[:, :, 0] = False
  return on


def _spec(kind, causal, d):
  return AttnSpec(kind, causal, d**-0.5, None, 0, None, -3.0 if kind == "sigmoid" else 0.0)


# (kind, causal, T, S, H, Hkv, D, block_q, block_k, mask per (b, h))
LOWER = [
    ("softmax", True, 300, 300, 4, 2, 64, 64, 64, True),  # ragged, GQA, forward key block 64
    ("softmax", False, 256, 256, 4, 2, 128, 64, 128, False),  # forward key block 128
    ("sigmoid", True, 200, 456, 4, 1, 128, 128, 64, True),  # T < S, MQA, block_q = the CTA tile
    ("sigmoid", False, 192, 192, 2, 2, 64, 64, 192, False),  # block_k = 3 kernel key blocks
]


@pytest.mark.parametrize("case", LOWER, ids=str)
def test_lowers_forward_and_backward(case):
  kind, causal, t, s, h, hkv, d, bq, bk, full = case
  q = jnp.zeros((1, t, h, d), jnp.bfloat16)
  k = jnp.zeros((1, s, hkv, d), jnp.bfloat16)
  mask = _mask((1, h if full else 1, -(-t // bq), -(-s // bk)), 0.4, seed=t)

  def loss(q, k, v):
    o = gpu.block_sparse_pallas(q, k, v, mask, _spec(kind, causal, d), block_q=bq, block_k=bk)
    return o.astype(jnp.float32).sum()

  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k).lower(
      lowering_platforms=("cuda",))
  assert lowered.as_text().count("mosaic_gpu") >= 3  # forward, dq, dk/dv


TILINGS = {"pingpong": gpu.Blocks(block_kv=64), "one_wg": gpu.Blocks(block_kv=64, wgs=1, bwd_wgs=1)}


@pytest.mark.parametrize("tiling", TILINGS)
def test_lowers_other_tilings(tiling):
  """Tilings other than `sparse_blocks`' choice for 64-row blocks (tuning candidates)."""
  q = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
  mask = _mask((1, 2, 4, 4), 0.5, seed=1)

  def loss(q, k, v):
    o = gpu.block_sparse_pallas(q, k, v, mask, _spec("softmax", True, 64), block_q=64,
                                block_k=64, blocks=TILINGS[tiling])
    return o.astype(jnp.float32).sum()

  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, q, q).lower(
      lowering_platforms=("cuda",))
  assert lowered.as_text().count("mosaic_gpu") >= 3


def test_lowers_with_a_traced_mask():
  """A mask traced under jit: lists as long as every block (the counts still bound the steps)."""
  q = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
  spec = _spec("softmax", True, 64)
  fn = lambda q, k, v, m: gpu.block_sparse_pallas(q, k, v, m, spec, block_q=64, block_k=64)
  lowered = jax.jit(fn).trace(q, q, q, jnp.ones((1, 2, 4, 4), bool)).lower(
      lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()


# ------------------------------------------------------------------------------ the lists

# (causal, T, S, H, Hkv, block_q, block_k, tiling: `sparse_blocks`' or one of TILINGS)
LISTS = [
    (True, 300, 300, 4, 2, 64, 64, "default"),
    (True, 200, 456, 4, 1, 128, 128, "default"),  # forward key block 128
    (True, 333, 150, 2, 2, 64, 64, "default"),  # T > S: the first rows see nothing
    (False, 260, 300, 4, 2, 64, 192, "default"),
    (True, 300, 300, 4, 2, 64, 128, "one_wg"),
]


def _seen(t, s, causal, q0, n_q, k0, n_k):
  """bool [n_q, n_k]: query rows [q0, q0 + n_q) vs keys [k0, k0 + n_k), padding excluded."""
  i = np.arange(q0, q0 + n_q)[:, None]
  j = np.arange(k0, k0 + n_k)[None, :]
  ok = (i < t) & (j < s)
  return ok & (j <= i + s - t) if causal else ok


def _union_is_own(steps, own, counts, cover, name):
  """The streamed steps are the blocks some warpgroup owns, each once; each warpgroup's own
  positions ascend within them; (a concrete mask) the lists are just long enough."""
  assert steps.shape[-1] == max(counts[..., 0].max(), 1), name
  for idx in np.ndindex(*steps.shape[:3]):
    n = counts[idx][0]
    assert sorted(steps[idx][:n]) == list(np.flatnonzero(cover[idx].any(0))), (name, idx)
    for w in range(own.shape[3]):
      pos = own[idx][w, :counts[idx][1 + 2 * w]]
      assert np.all(np.diff(pos) > 0) and np.all(pos < n), (name, idx, w)


@pytest.mark.parametrize("case", LISTS, ids=str)
def test_lists_hold_each_seen_block_once(case):
  """Every block a warpgroup sees (mask bit on, a visible pair) is one of its own steps, once;
  no other block is a step; plain steps hold only visible pairs; own steps are in order."""
  causal, t, s, h, hkv, bq_op, bk_op, tiling = case
  blk = TILINGS.get(tiling) or gpu.sparse_blocks(64, bq_op, bk_op)
  mask = _mask((2, h, -(-t // bq_op), -(-s // bk_op)), 0.4, seed=t + s)
  pb = gpu._problem(jnp.zeros((1, t, h, 64)), jnp.zeros((1, s, hkv, 64)),
                    _spec("softmax", causal, 64), None, blk)
  lists = gpu._sparse_lists(mask, pb, h, bq_op, bk_op)
  dense = mask[:, :, np.arange(t) // bq_op][..., np.arange(s) // bk_op]  # [B, H, T, S]
  kinds = [("fwd", blk.block_q, blk.wgs, blk.block_kv), ("dq", blk.bwd_block_q, blk.bwd_wgs,
                                                         blk.bwd_block_kv)]
  for name, bq, wgs, bkv in kinds:
    steps, own, counts = (np.asarray(x) for x in getattr(lists, name)[:3])
    cover = np.asarray(_onehot_cover(getattr(lists, name), -(-s // bkv))[0])
    for b, hh, tile, w in np.ndindex(*cover.shape[:4]):
      n_own, n_plain = counts[b, hh, tile, 1 + 2 * w], counts[b, hh, tile, 2 + 2 * w]
      pos = own[b, hh, tile, w, :n_own]
      row0 = (tile * wgs + w) * bq
      for kb in range(cover.shape[-1]):
        seen = _seen(t, s, causal, row0, bq, kb * bkv, bkv)
        on = dense[b, hh, row0:row0 + bq, kb * bkv:(kb + 1) * bkv]
        want = int(np.any(seen[:on.shape[0], :on.shape[1]] & on))
        assert cover[b, hh, tile, w, kb] == want, (name, b, hh, tile, w, kb)
      for j in range(n_plain):  # a plain step's pairs are all visible
        kb = steps[b, hh, tile, pos[j]]
        i = np.arange(row0, row0 + bq)[:, None] + s - t
        jj = np.arange(kb * bkv, (kb + 1) * bkv)[None, :]
        assert np.all(jj < s) and (not causal or np.all(jj <= i)), (name, "plain", kb)
    _union_is_own(steps, own, counts, cover, name)
  steps, own, counts = (np.asarray(x) for x in lists.dkv[:3])
  g, bq, bkv, wgs = h // hkv, blk.bwd_block_q, blk.bwd_block_kv, blk.bwd_wgs
  n_q = -(-t // bq)
  flat = np.asarray(_onehot_cover(lists.dkv, g * n_q)[0])
  _union_is_own(steps, own, counts, flat, "dkv")
  tiles = -(-s // (wgs * bkv))  # each tile's steps cut into splits by ranges of their numbers
  splits = counts.shape[2] // tiles
  span = -(-g * n_q // splits)
  for idx in np.ndindex(*counts.shape[:3]):
    part = steps[idx][:counts[idx][0]]
    assert np.all(part // span == idx[2] % splits), ("dkv split", idx)
  cover = flat.reshape(*counts.shape[:2], tiles, splits, wgs, g, n_q).sum(3)
  for b, kvh, tile, w, gg, qb in np.ndindex(*cover.shape):
    key0 = (tile * wgs + w) * bkv
    on = dense[b, kvh * g + gg, qb * bq:(qb + 1) * bq, key0:key0 + bkv]
    seen = _seen(t, s, causal, qb * bq, bq, key0, bkv)[:on.shape[0], :on.shape[1]]
    assert cover[b, kvh, tile, w, gg, qb] == int(np.any(seen & on)), ("dkv", b, kvh, tile, w)


class _Ref:
  """A stand-in for a kernel's GMEM ref over an array: `.at[i]` views, `[i]` scalar reads."""

  def __init__(self, x):
    self.x, self.shape = x, x.shape

  @property
  def at(self):
    return self

  def __getitem__(self, i):
    out = self.x[i]
    return _Ref(out) if jnp.ndim(out) else out


def test_listed_run_visits_every_step_once():
  """`_Listed.run`, the kernels' own loop over a CTA's steps, run on arrays: each warpgroup
  visits every streamed step once, in order, computing its own ones (plain, then masked) and
  skipping the rest."""
  blk = gpu.sparse_blocks(64, 64, 64)
  t, h = 300, 4
  mask = _mask((1, h, 5, 5), 0.4, seed=2)
  pb = gpu._problem(jnp.zeros((1, t, h, 64)), jnp.zeros((1, t, 2, 64)),
                    _spec("softmax", True, 64), None, blk)
  log = lambda code: lambda i, c: (c[0].at[c[1]].set(4 * i + code), c[1] + 1)
  step = lambda i, c, masked: log(1 + masked)(i, c)
  for lists in gpu._sparse_lists(mask, pb, h, 64, 64):
    steps, own, counts = (np.asarray(x) for x in lists[:3])
    refs = gpu._Lists(*(_Ref(jnp.asarray(x)) for x in (steps, own, counts)))
    run = jax.jit(lambda b, hh, tile, w: gpu._Listed.at(refs, b, hh, tile).run(
        w, step, log(0), (jnp.full(steps.shape[-1], -1), jnp.int32(0))))
    for b, hh, tile in np.ndindex(*steps.shape[:3]):
      for w in range(own.shape[3]):
        got, n = run(b, hh, tile, w)
        want = np.zeros(counts[b, hh, tile, 0], int)
        n_own, n_plain = counts[b, hh, tile, 1 + 2 * w], counts[b, hh, tile, 2 + 2 * w]
        want[own[b, hh, tile, w, :n_own]] = 1 + (np.arange(n_own) >= n_plain)
        assert n == len(want) and list(got[:n]) == list(4 * np.arange(n) + want)


# ---------------------------------------------------------------- the op, kernels emulated

# (B, T, S, H, Hkv, D, block_q, block_k, mask [B|1, H|1]), options, block density
EMULATED = [
    ((2, 300, 300, 4, 2, 16, 64, 64, (2, 4)), dict(), 0.1),  # ragged, GQA, a mask per (b, h)
    ((2, 300, 300, 4, 2, 16, 64, 64, (2, 4)), dict(), 0.6),
    ((1, 200, 456, 4, 1, 16, 128, 64, (1, 1)), dict(kind="sigmoid"), 0.3),  # T < S, MQA
    ((1, 333, 150, 2, 2, 16, 64, 128, (1, 2)), dict(), 0.6),  # T > S
    ((1, 260, 300, 4, 2, 16, 64, 192, (1, 4)), dict(causal=False), 0.3),
    ((2, 256, 256, 2, 1, 16, 64, 64, (2, 1)), dict(causal=False, kind="sigmoid"), 0.1),
]


@pytest.mark.parametrize("shape,opts,density", EMULATED, ids=str)
def test_emulated_matches_reference(emulated, shape, opts, density):
  """Forward and every gradient through the kernels' custom_vjp, padding and lists, with the
  kernels emulated as the pairs their lists cover, against the reference (float32)."""
  from conftest import compare
  b, t, s, h, hkv, d, bq, bk, (bm, hm) = shape
  rng = np.random.default_rng(t + s + int(10 * density))
  q, k, v = (jnp.asarray(rng.standard_normal(sh), jnp.float32)
             for sh in ((b, t, h, d), (b, s, hkv, d), (b, s, hkv, d)))
  mask = _mask((bm, hm, -(-t // bq), -(-s // bk)), density, seed=t)
  kind, causal = opts.get("kind", "softmax"), opts.get("causal", True)
  spec = AttnSpec(kind, causal, d**-0.5, None, 0, None, -np.log(s) if kind == "sigmoid" else 0.0)
  blocks = gpu.sparse_blocks(128, bq, bk)
  got = lambda q, k, v: gpu.block_sparse_pallas(q, k, v, mask, spec, block_q=bq, block_k=bk,
                                                 blocks=blocks)
  want = lambda q, k, v: block_sparse_attention(q, k, v, mask, block_q=bq, block_k=bk,
                                                impl="reference", **opts)
  compare(got, want, (q, k, v), (0, 1, 2), 2e-5, f"{shape} {opts}")


def test_emulated_traced_mask(emulated):
  """A mask traced under jit (lists over every block, built in jnp): as the reference."""
  from conftest import assert_close
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal(sh), jnp.float32)
             for sh in ((1, 300, 4, 16), (1, 300, 2, 16), (1, 300, 2, 16)))
  mask = _mask((1, 4, 5, 5), 0.4, seed=5)
  spec = _spec("softmax", True, 16)
  loss = lambda o: (o * jnp.cos(o)).sum()
  got = jax.jit(jax.value_and_grad(lambda q, k, v, m: loss(gpu.block_sparse_pallas(
      q, k, v, m, spec, block_q=64, block_k=64, blocks=gpu.sparse_blocks(64, 64, 64))), (0, 1, 2)))
  want = jax.value_and_grad(lambda q, k, v: loss(block_sparse_attention(
      q, k, v, mask, scale=0.25, impl="reference")), (0, 1, 2))
  for a, b in zip(jax.tree.leaves(got(q, k, v, jnp.asarray(mask))), jax.tree.leaves(want(q, k, v))):
    assert_close(a, b, 2e-5)


def _same_lists(got, want):
  """Two `_Lists` walk the same steps: counts equal, and each tile's first counts[0] steps and
  each warpgroup's own positions equal (what lies past the counts is never read)."""
  w_steps, w_own, w_counts = (np.asarray(x) for x in want[:3])
  g_steps, g_own, g_counts = (np.asarray(x) for x in got[:3])
  np.testing.assert_array_equal(g_counts, w_counts)
  for at in np.ndindex(*w_counts.shape[:3]):
    m = w_counts[at][0]
    np.testing.assert_array_equal(g_steps[at][:m], w_steps[at][:m], err_msg=str(at))
    for w in range(w_own.shape[3]):
      k = w_counts[at][1 + 2 * w]
      np.testing.assert_array_equal(g_own[at][w, :k], w_own[at][w, :k], err_msg=str((at, w)))


# (T, S, H, mask [B|1, H|1], block_q, block_k, causal, head dim): the forward key block 64 and
# 128, block_q a whole CTA tile, T < S, T > S, non-causal
BS_INDEX_LISTS = [(300, 300, 4, (2, 4), 64, 64, True, 64), (200, 456, 4, (1, 1), 128, 128, True, 128),
                  (333, 150, 2, (1, 2), 64, 64, True, 64), (260, 300, 4, (1, 4), 64, 192, False, 64)]


@pytest.mark.parametrize("case", BS_INDEX_LISTS, ids=str)
def test_block_sparse_lists_from_indices_equal_the_masks(case):
  """Traced block indices build the forward / dq lists from a tile's own candidates
  (`_index_row_lists`): the same steps, own positions and counts as from the mask (`_row_lists`)."""
  t, s, h, (bm, hm), bq, bk, causal, d = case
  nq, nk = -(-t // bq), -(-s // bk)
  mask = _mask((bm, hm, nq, nk), 0.4, seed=t + s)
  idx = jnp.asarray(block_indices_of(mask, 4, seed=t))
  mask = np.asarray(gpu.index_mask(np.asarray(idx), nk))  # the blocks the indices list
  blk = gpu.sparse_blocks(d, bq, bk)
  pb = gpu._problem(jnp.zeros((bm, t, h, d)), jnp.zeros((bm, s, h, d)), _spec("softmax", causal, d),
                    None, blk)
  tq = gpu._query_multiple(blk)
  for bq_k, wgs, bkv in ((blk.block_q, blk.wgs, blk.block_kv),
                         (blk.bwd_block_q, blk.bwd_wgs, blk.bwd_block_kv)):
    _same_lists(jax.jit(lambda i: gpu._index_row_lists(i, pb, tq, bq_k, wgs, bkv, bq, bk))(idx),
                gpu._row_lists(jnp.asarray(mask), pb, tq, bq_k, wgs, bkv, bq, bk))


def test_emulated_traced_indices(emulated):
  """Block indices traced under jit on the kernels (forward / dq lists from the indices, the
  dk/dv lists from their mask, as the op passes them), forward and gradients, as the reference
  of the mask they list."""
  from conftest import assert_close
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.standard_normal(sh), jnp.float32)
             for sh in ((2, 300, 4, 16), (2, 300, 2, 16), (2, 300, 2, 16)))
  mask = _mask((2, 4, 5, 5), 0.5, seed=7)
  idx = block_indices_of(mask, 3, seed=3)
  mask = np.asarray(gpu.index_mask(idx, 5))
  loss = lambda o: (o * jnp.cos(o)).sum()
  spec, blocks = _spec("softmax", True, 16), gpu.sparse_blocks(64, 64, 64)
  got = jax.jit(jax.value_and_grad(lambda q, k, v, i: loss(gpu.block_sparse_pallas(
      q, k, v, gpu.index_mask(i, 5), spec, block_q=64, block_k=64, blocks=blocks,
      block_indices=i)), (0, 1, 2)))
  want = jax.value_and_grad(lambda q, k, v: loss(block_sparse_attention(
      q, k, v, mask, scale=0.25, impl="reference")), (0, 1, 2))
  for a, b in zip(jax.tree.leaves(got(q, k, v, jnp.asarray(idx))), jax.tree.leaves(want(q, k, v))):
    assert_close(a, b, 2e-5)


def test_auto_takes_the_kernel_where_covered(monkeypatch):
  """Dispatch: bf16/f16, head dims 64/128, blocks multiples of 64 take the kernel; float32,
  head dim 256 (its backward is XLA's) and 32-row blocks fall back to XLA."""
  from longax.kernels._dispatch import resolve
  monkeypatch.setattr(gpu, "not_on_hopper", lambda call: None)
  spec = _spec("softmax", True, 128)
  x = lambda d, dt=jnp.bfloat16: jnp.zeros((1, 128, 2, d), dt)
  call = lambda d=128, dt=jnp.bfloat16, bq=64, bk=64: dict(
      q=x(d, dt), k=x(d, dt), v=x(d, dt), spec=spec, block_q=bq, block_k=bk)
  take = lambda **kw: resolve("block_sparse_attention", "auto", call(**kw)) is gpu.block_sparse_pallas
  assert take() and take(d=64, dt=jnp.float16) and take(bq=128, bk=192)
  assert not take(dt=jnp.float32) and not take(d=256) and not take(bq=32) and not take(bk=96)


# ------------------------------------------------------------------ NSA's selected blocks
# `selected_pallas`: a token's G query heads are query rows at one position
# (`_Problem.rows_per_pos`), its selected blocks a row of the block mask; shared (the
# default): 64 / G tokens share a tile, its rows masked by their own blocks (`_Lists.rows`);
# else a token fills a tile.


def _block_indices(rng, b, t, hkv, n, n_blocks):
  """int32 [B, T, Hkv, n] in [-1, n_blocks): -1 entries, repeats, future blocks."""
  idx = rng.integers(-1, n_blocks, (b, t, hkv, n)).astype(np.int32)
  idx[:, ::3, :, -1] = idx[:, ::3, :, 0]  # repeats
  idx[:, 1::4, :, 0] = -1
  return idx


# (T, S, H, Hkv, D, block_size, n, shared): query heads per KV head G = 1, 4, 16
SEL_LOWER = [(300, 300, 2, 2, 64, 64, 3, True), (200, 456, 8, 2, 128, 128, 4, True),
             (130, 130, 16, 1, 64, 64, 16, True), (130, 200, 16, 1, 128, 64, 5, False)]


@pytest.mark.parametrize("case", SEL_LOWER, ids=str)
def test_selected_lowers_forward_and_backward(case):
  t, s, h, hkv, d, bs, n, shared = case
  q = jnp.zeros((1, t, h, d), jnp.bfloat16)
  k = jnp.zeros((1, s, hkv, d), jnp.bfloat16)

  def loss(q, k, v, idx):
    o = gpu.selected_pallas(q, k, v, idx, _spec("softmax", True, d), block_size=bs, shared=shared)
    return o.astype(jnp.float32).sum()

  idx = jnp.zeros((1, t, hkv, n), jnp.int32)  # traced: the lists of a layer's selection
  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k, idx).lower(
      lowering_platforms=("cuda",))
  assert lowered.as_text().count("mosaic_gpu") >= 3


# (B, T, S, H, Hkv, block_size, n, causal, shared, blocks): shared tiles with G = 16, 4, 1 and
# 6 (rows padded to 8), a token per tile, selection blocks of two kernel key blocks, T < S
SEL_LISTS = [(1, 300, 300, 16, 1, 64, 5, True, True, None),
             (2, 37, 200, 4, 1, 64, 3, True, True, None),
             (1, 150, 150, 4, 4, 64, 2, True, True, gpu.Blocks(block_kv=64, wgs=1, bwd_wgs=1)),
             (1, 70, 300, 12, 2, 128, 5, False, True, None),
             (1, 45, 300, 8, 2, 64, 4, True, False, None),
             (1, 90, 250, 8, 1, 128, 3, True, True, gpu.Blocks(block_kv=64))]


@pytest.mark.parametrize("case", SEL_LISTS, ids=str)
def test_selected_lists_from_indices_equal_the_masks(case):
  """Traced indices build the forward / dq lists from a tile's own candidates
  (`_index_row_lists`): the same steps, own positions and counts as from the [T, blocks]
  mask (`_row_lists`), every field compared exactly."""
  b, t, s, h, hkv, bs, n, causal, shared, blocks = case
  rng = np.random.default_rng(t * s)
  idx = _block_indices(rng, b, t, hkv, n, -(-s // bs))
  idx[:, ::5, :, 1 % n] = -(-s // bs)  # past the last block: unused, as -1
  g = h // hkv
  rows = gpu.selected_rows(g, shared)
  blk = blocks or gpu.sparse_blocks(64, rows, bs)
  qf = jnp.zeros((b, t * rows, hkv, 64))
  pb = gpu._problem(qf, jnp.zeros((b, s, hkv, 64)), _spec("softmax", causal, 64), None, blk,
                    rows, bs if rows < 64 else None)
  tq = gpu._query_multiple(blk)
  mask = jnp.asarray(gpu._selected_mask(idx, -(-s // bs)))  # traced-style (jnp) lists
  for bq, wgs, bkv in ((blk.block_q, blk.wgs, blk.block_kv),
                       (blk.bwd_block_q, blk.bwd_wgs, blk.bwd_block_kv)):
    _same_lists(jax.jit(lambda i: gpu._index_row_lists(jnp.swapaxes(i, 1, 2), pb, tq, bq, wgs, bkv,
                                                       rows, bs))(jnp.asarray(idx)),
                gpu._row_lists(mask, pb, tq, bq, wgs, bkv, rows, bs))


# (B, T, S, H, Hkv, block_size, n, causal, shared), D = 16 (emulated: any head dim)
SEL_EMULATED = [(2, 37, 200, 4, 1, 64, 3, True, True),  # T < S, G = 4, ragged
                (1, 150, 150, 4, 4, 64, 2, True, True),  # G = 1, more tokens than a tile
                (1, 70, 300, 12, 2, 128, 5, False, True),  # G = 6: rows padded to 8
                (1, 45, 300, 8, 2, 64, 4, True, False)]  # a token per tile


@pytest.mark.parametrize("case", SEL_EMULATED, ids=str)
def test_selected_emulated_matches_reference(emulated, case):
  """Forward and gradients through the folding, the lists and the kernels' custom_vjp, the
  kernels emulated as the pairs their lists cover, against the reference (float32), with
  concrete indices (numpy lists) and traced ones (jnp lists over every block)."""
  from conftest import assert_close, compare
  from longax.kernels import selected_block_attention
  b, t, s, h, hkv, bs, n, causal, shared = case
  rng = np.random.default_rng(t + s)
  q, k, v = (jnp.asarray(rng.standard_normal(sh), jnp.float32)
             for sh in ((b, t, h, 16), (b, s, hkv, 16), (b, s, hkv, 16)))
  idx = _block_indices(rng, b, t, hkv, n, -(-s // bs))
  spec, blocks = _spec("softmax", causal, 16), gpu.sparse_blocks(128, 64, bs)
  got = lambda q, k, v, i=idx: gpu.selected_pallas(q, k, v, i, spec, block_size=bs, blocks=blocks,
                                                   shared=shared)
  want = lambda q, k, v: selected_block_attention(q, k, v, idx, block_size=bs, causal=causal,
                                                  impl="reference")
  compare(got, want, (q, k, v), (0, 1, 2), 2e-5, str(case))
  assert_close(jax.jit(got)(q, k, v, jnp.asarray(idx)), want(q, k, v), 2e-5, "traced indices")


# NSA's key-centric chunks on the block-sparse kernels from arithmetic lists
# (`keyed_chunks_pallas`, `_selected_gpu(..., key_centric="lists")`):
# (B, T, H, Hkv, block_size, n): G = 1, 2, 4; 64-key blocks (two per dk/dv key tile) and 128
KEYED = [(2, 300, 2, 2, 64, 3), (1, 260, 4, 2, 128, 4), (1, 200, 8, 2, 64, 5)]


def _keyed(idx, bs, chunks="lists", causal=True):
  from longax.kernels import sparse_attention as SA
  return lambda q, k, v: SA._selected_gpu(q, k, v, idx, _spec("softmax", causal, q.shape[-1]),
                                          block_size=bs, key_centric=chunks)


@pytest.mark.parametrize("chunks", [True, "lists"])
@pytest.mark.parametrize("case", KEYED[:2], ids=str)
def test_keyed_lists_lower_forward_and_backward(case, chunks):
  b, t, h, hkv, bs, n = case
  q = jnp.zeros((b, t, h, 64), jnp.bfloat16)
  k = jnp.zeros((b, t, hkv, 64), jnp.bfloat16)
  idx = jnp.zeros((b, t, hkv, n), jnp.int32)
  loss = lambda q, k, v, i: _keyed(i, bs, chunks)(q, k, v).astype(jnp.float32).sum()
  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k, idx).lower(
      lowering_platforms=("cuda",))
  assert lowered.as_text().count("mosaic_gpu") >= 6  # chunks and own blocks, fwd, dq, dk/dv


@pytest.mark.parametrize("chunks", [True, "lists"])
@pytest.mark.parametrize("case", KEYED, ids=str)
def test_keyed_lists_emulated_matches_reference(emulated, case, chunks):
  """Forward and gradients of key-centric loading, its chunks on the dense kernel with
  gathered key blocks (True) or on the kernels' lists ("lists": they cover each chunk's block
  and nothing else, dk / dv from the key tiles' ranges), the kernels emulated as the pairs
  they cover, against the reference (float32)."""
  from conftest import compare
  from longax.kernels import selected_block_attention
  b, t, h, hkv, bs, n = case
  rng = np.random.default_rng(t + n)
  q, k, v = (jnp.asarray(rng.standard_normal(sh), jnp.float32)
             for sh in ((b, t, h, 64), (b, t, hkv, 64), (b, t, hkv, 64)))
  idx = _block_indices(rng, b, t, hkv, n, -(-t // bs))
  idx[:, 1::2, :, 0] = (np.arange(t)[1::2] // bs)[None, :, None]  # own blocks too
  want = lambda q, k, v: selected_block_attention(q, k, v, idx, block_size=bs, impl="reference")
  compare(_keyed(jnp.asarray(idx), bs, chunks), want, (q, k, v), (0, 1, 2), 2e-5, str(case))


@pytest.mark.parametrize("split_steps", [1024, 5])
@pytest.mark.parametrize("bs,g", [(64, 1), (64, 3), (128, 2)])
def test_keyed_dkv_lists_cover_each_pair_once(bs, g, split_steps, monkeypatch):
  """The dk/dv lists of `_keyed_lists`, over a key tile's splits: warpgroup w's steps are
  exactly g' * n_q + the query blocks of the chunks sorted to its keys' block, for every
  query head g' of the group, each once (built here from chunk_block directly)."""
  monkeypatch.setattr(gpu, "KEYED_DKV_SPLIT_STEPS", split_steps)
  rng = np.random.default_rng(bs + g)
  b, hkv, s, rows = 2, 2, 300, 128
  nb = -(-s // bs)
  n_ch = 9
  chunk_block = np.sort(rng.integers(0, nb + 1, (b, hkv, n_ch)), -1).astype(np.int32)  # nb: empty
  q = jnp.zeros((b, n_ch * rows, hkv * g, 64))
  pb = gpu._problem(q, jnp.zeros((b, s, hkv, 64)), _spec("softmax", False, 64), None,
                    gpu.sparse_blocks(64, rows, bs))
  max_chunks = int(max(np.max(np.sum(chunk_block == x, -1)) for x in range(nb)))
  lists = gpu._keyed_lists(jnp.asarray(chunk_block), pb, rows, bs, max(max_chunks, 1), hkv * g).dkv
  steps, own, counts = (np.asarray(x) for x in lists[:3])
  blk = pb.blocks
  wgs, bkv, bq = blk.bwd_wgs, blk.bwd_block_kv, blk.bwd_block_q
  n_q, per = n_ch * rows // bq, rows // bq
  tiles = -(-s // gpu._key_multiple(blk)) * gpu._key_multiple(blk) // (wgs * bkv)
  splits = steps.shape[2] // tiles
  if split_steps == 5:
    assert splits > 1
  for bi, kv, tile, w in np.ndindex(b, hkv, tiles, wgs):
    got = []
    for j in range(splits):
      at = (bi, kv, tile * splits + j)
      got += list(steps[at][own[at][w, :counts[at][1 + 2 * w]]])
    key0 = (tile * wgs + w) * bkv
    chunks = np.nonzero(chunk_block[bi, kv] == key0 // bs)[0] if key0 < s else []
    want = [gg * n_q + c * per + r for gg in range(g) for c in chunks for r in range(per)]
    assert sorted(got) == sorted(want), (bi, kv, tile, w)


def test_keyed_chunks_pallas_says_what_it_cannot_take():
  q = jnp.zeros((1, 256, 2, 64))
  k = jnp.zeros((1, 256, 2, 64))
  cb = jnp.zeros((1, 2, 4), jnp.int32)
  spec = _spec("softmax", False, 64)
  with pytest.raises(ValueError, match=r"rows=64 must be a multiple of the 128-row query tiles"):
    gpu.keyed_chunks_pallas(q, k, k, cb, 64, 64, spec=spec, max_chunks=4)
  with pytest.raises(ValueError, match=r"block_size=96 must be a multiple of 64"):
    gpu.keyed_chunks_pallas(q, k, k, cb[..., :2], 128, 96, spec=spec, max_chunks=2)


@pytest.mark.parametrize("chunks", [True, "lists"])
def test_keyed_non_causal_emulated_matches_reference(emulated, chunks):
  """Non-causal, T < S (S a multiple of block_size): no own-block pass, every listed block
  whole."""
  from conftest import compare
  from longax.kernels import selected_block_attention
  b, t, s, h, hkv, bs, n = 1, 100, 256, 4, 2, 64, 3
  rng = np.random.default_rng(7)
  q, k, v = (jnp.asarray(rng.standard_normal(sh), jnp.float32)
             for sh in ((b, t, h, 64), (b, s, hkv, 64), (b, s, hkv, 64)))
  idx = _block_indices(rng, b, t, hkv, n, s // bs)
  want = lambda q, k, v: selected_block_attention(q, k, v, idx, block_size=bs, causal=False,
                                                  impl="reference")
  compare(_keyed(jnp.asarray(idx), bs, chunks, causal=False), want, (q, k, v), (0, 1, 2), 2e-5)


def test_selected_dispatch(monkeypatch):
  """auto takes the kernel for bf16/f16, head dims 64/128, block_size a multiple of 64, up
  to 64 query heads per KV head, default positions; else XLA (impl="pallas" says why)."""
  from longax.kernels import selected_block_attention
  from longax.kernels._dispatch import resolve
  monkeypatch.setattr(gpu, "not_on_hopper", lambda call: None)
  spec = _spec("softmax", True, 128)
  call = lambda d=128, dt=jnp.bfloat16, h=16, bs=64, pos=False: dict(
      q=jnp.zeros((1, 128, h, d), dt), k=jnp.zeros((1, 128, 1, d), dt),
      v=jnp.zeros((1, 128, 1, d), dt), spec=spec, block_size=bs, explicit_positions=pos)
  from longax.kernels import sparse_attention as SA
  take = lambda **kw: resolve("selected_block_attention", "auto", call(**kw)) is SA._selected_gpu
  assert take() and take(d=64, dt=jnp.float16, h=1) and take(h=64, bs=128)
  assert not (take(dt=jnp.float32) or take(d=256) or take(bs=32) or take(h=128) or take(pos=True))
  x = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"impl='pallas' does not support this call: block_size=8"):
    selected_block_attention(x, x, x, jnp.zeros((1, 8, 2, 1), jnp.int32), block_size=8,
                             impl="pallas")


# ------------------------------------------------------------------ NSA's attention core

NSA_KW = dict(block_size=32, stride=16, select_block=64, n_selected=3, window=100)


def _nsa(h, hkv, d):
  from flax import nnx
  from longax.layers import NSA
  return NSA(h * d, h, hkv, head_dim=d, **NSA_KW, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
             param_dtype=jnp.float32)


def test_nsa_attend_lowers_on_the_kernels(monkeypatch):
  """NSA.attend with impl="pallas": all three branches take the kernels (the compressed one
  folded into causal attention, the selected one the block-sparse kernels, the window),
  forward and backward."""
  monkeypatch.setattr(gpu, "not_on_hopper", lambda call: None)
  layer = _nsa(8, 2, 64)
  q = jnp.zeros((1, 200, 8, 64), jnp.bfloat16)
  k = jnp.zeros((1, 200, 2, 64), jnp.bfloat16)
  gates = jnp.zeros((1, 200, 8, 3), jnp.bfloat16)
  loss = lambda q, k, v, g: layer.attend(q, k, v, g, impl="pallas").sum()
  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(q, k, k, gates).lower(
      lowering_platforms=("cuda",))
  assert lowered.as_text().count("mosaic_gpu") >= 9  # 3 branches x (forward, dq, dk/dv)


def test_nsa_attend_emulated_matches_xla(emulated):
  """NSA.attend on the (emulated) kernels against its XLA path, bf16, forward and gradients:
  the branches' wiring (the compressed fold, the selection's traced indices, the gates), with
  the XLA path's selection given to both (the compressed branch's lse differs by impl)."""
  from conftest import compare
  layer = _nsa(4, 2, 64)
  rng = np.random.default_rng(0)
  t = 150
  q, k, v = (jnp.asarray(rng.standard_normal(sh), jnp.bfloat16)
             for sh in ((1, t, 4, 64), (1, t, 2, 64), (1, t, 2, 64)))
  gates = jnp.asarray(rng.standard_normal((1, t, 4, 3)), jnp.bfloat16)
  idx = layer.select(q, k, v, impl="xla")
  fn = lambda impl: lambda q, k, v, g: layer.attend(q, k, v, g, impl=impl, block_indices=idx)
  compare(fn("pallas"), fn("xla"), (q, k, v, gates), (0, 1, 2, 3), 2e-2, "nsa")


# ----------------------------------------------------------------- NSA's block importance
# `importance_pallas`: a token's G heads folded into rows (64 / rows tokens to a tile), S = QK^T,
# P masked by end_j <= t, the group sum as R @ P. The kernel lowers for cuda, and runs on CPU
# under Mosaic GPU's interpret mode (below) against the reference; dispatch keeps auto on XLA.


# (T, N, H, Hkv, D, block_size, stride): G = 1, 4, 16 and 6 (rows padded to 8)
IMP_LOWER = [(300, 17, 16, 1, 128, 32, 16), (130, 7, 4, 2, 64, 32, 16), (100, 5, 1, 1, 64, 16, 8),
             (77, 9, 12, 2, 128, 8, 8)]


@pytest.mark.parametrize("case", IMP_LOWER, ids=str)
def test_importance_lowers(case):
  t, n, h, hkv, d, l, st = case
  q = jnp.zeros((1, t, h, d), jnp.bfloat16)
  k = jnp.zeros((1, n, hkv, d), jnp.bfloat16)
  fn = lambda q, k, lse: gpu.importance_pallas(q, k, lse, block_size=l, stride=st, scale=0.1)
  lowered = jax.jit(fn).trace(q, k, jnp.zeros((1, t, h), jnp.float32)).lower(
      lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()


def test_importance_dispatch(monkeypatch):
  """auto stays on XLA while IMPORTANCE_ON_AUTO is off; with it on (the default), bf16/f16, head dim 64/128, G <= 64, default positions take the kernel.
  impl="pallas" takes it regardless of the flag, or says why not."""
  from longax.kernels import compressed_importance
  from longax.kernels._dispatch import resolve
  monkeypatch.setattr(gpu, "not_on_hopper", lambda call: None)
  call = lambda impl="auto", d=128, dt=jnp.bfloat16, h=16, pos=False: dict(
      q=jnp.zeros((1, 64, h, d), dt), k_cmp=jnp.zeros((1, 3, 1, d), dt), impl=impl,
      explicit_positions=pos)
  take = lambda **kw: resolve("compressed_importance", kw.get("impl", "auto"),
                              call(**kw)) is gpu.importance_pallas
  monkeypatch.setattr(gpu, "IMPORTANCE_ON_AUTO", False)
  assert not take() and take(impl="pallas")
  monkeypatch.setattr(gpu, "IMPORTANCE_ON_AUTO", True)
  assert take() and take(d=64, dt=jnp.float16, h=1) and take(h=64)
  assert not (take(dt=jnp.float32) or take(d=256) or take(h=128) or take(pos=True))
  x = jnp.zeros((1, 8, 2, 64), jnp.float32)
  with pytest.raises(ValueError, match=r"impl='pallas' does not support this call: dtype float32"):
    compressed_importance(x, x[:, :2], jnp.zeros((1, 8, 2)), block_size=4, stride=2, impl="pallas")


# The kernel itself, run by Mosaic GPU's interpret mode on CPU (`plgpu.force_gpu_interpret_mode`:
# simulated shared memory, warpgroups, barriers and TMA; buffers start as NaN, so an output
# block the kernel never writes shows; the race detector on; a warpgroup that waits on a
# barrier must observe every phase of it). (B, T, N, H, Hkv, D, block_size, stride, blocks):
# G = 16 over several CTAs, G = 6 (rows padded to 8), T < block_size, more 64-key steps than
# the ring's slots with blocks past each CTA's last written as zeros, one warpgroup.
IMP_INTERPRET = [(1, 70, 40, 16, 1, 128, 8, 2, None), (2, 37, 3, 12, 2, 64, 8, 4, None),
                 (1, 5, 1, 4, 4, 64, 8, 4, None),
                 (1, 130, 200, 1, 1, 64, 2, 1, gpu.ImportanceBlocks(block_k=64)),
                 (1, 150, 70, 8, 2, 64, 4, 2, gpu.ImportanceBlocks(block_k=64, wgs=1)),
                 # the paper's setting with the default tiles, 3 steps a CTA: ~5 min on CPU
                 pytest.param((1, 4200, 261, 16, 1, 128, 32, 16, None), marks=pytest.mark.slow)]


@pytest.mark.parametrize("case", IMP_INTERPRET, ids=str)
def test_importance_kernel_interpreted_matches_reference(rand, case):
  """bf16 against the float32 reference (1e-2), every output element written, no race."""
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as interp
  from jax.experimental.pallas import mosaic_gpu as plgpu
  from conftest import assert_close
  from test_sparse_attention import importance_inputs
  from longax.kernels import compressed_importance
  b, t, n, h, hkv, d, l, st, blocks = case
  q, k, lse = importance_inputs(rand, b, t, n, h, hkv, d, l, st, jnp.bfloat16)
  try:
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams(detect_races=True)):
      got = gpu.importance_pallas(q, k, lse, block_size=l, stride=st, scale=d**-0.5, blocks=blocks)
      got = np.asarray(got)
    assert not interp.get_races().races_found, "a data race in the kernel"
  finally:
    interp.reset_gpu_interpret_mode_state()
  assert_close(got, compressed_importance(q, k, lse, block_size=l, stride=st, impl="reference"),
               1e-2, str(case))


# --------------------------------------------------------- MInference's vertical-slash
# `vertical_slash_pallas`: a slash pass over the op's keys (runs of consecutive offsets, the
# vertical columns dropped) and a vertical pass over each head's gathered columns, merged by
# their lse; forward only as kernels (the gradient is the XLA path's).


def vs_pattern(seed, b, h, s, nv=9, ns=12, band=0):
  """int32 vertical [B, H, nv] and slash [B, H, ns + band] indices in [-1, S): repeats, -1,
  offset 0, a column on a slash (the diagonal crosses every column), scattered offsets, and
  a band of offsets 0..band-1 (one run) where band > 0."""
  rng = np.random.default_rng(seed)
  vert = rng.integers(-1, s, (b, h, nv)).astype(np.int32)
  vert[..., 1] = vert[..., 0]
  slash = rng.integers(-1, s, (b, h, ns)).astype(np.int32)
  slash[..., 1] = slash[..., 0]
  slash[..., 2] = 0
  slash[..., 3:7] = np.arange(30, 34)  # a short run
  if band:
    slash = np.concatenate([slash, np.broadcast_to(np.arange(band, dtype=np.int32),
                                                   (b, h, band))], -1)
  return jnp.asarray(vert), jnp.asarray(slash)


# (T, S, H, Hkv, D, causal, dtype)
VS_LOWER = [(300, 300, 4, 2, 64, True, jnp.bfloat16), (200, 456, 4, 1, 128, False, jnp.float16)]


@pytest.mark.parametrize("case", VS_LOWER, ids=str)
def test_vertical_slash_lowers(case):
  """Both forward kernels lower for "cuda"; the gradient (XLA's) lowers with them."""
  t, s, h, hkv, d, causal, dtype = case
  q = jnp.zeros((1, t, h, d), dtype)
  k = jnp.zeros((1, s, hkv, d), dtype)
  vert, slash = vs_pattern(0, 1, h, s)
  spec = _spec("softmax", causal, d)
  loss = lambda q, k, v, vi, si: gpu.vertical_slash_pallas(q, k, v, vi, si, spec).astype(
      jnp.float32).sum()
  lowered = jax.jit(jax.value_and_grad(loss, (0, 1, 2))).trace(q, k, k, vert, slash).lower(
      lowering_platforms=("cuda",))
  assert lowered.as_text().count("mosaic_gpu") >= 2  # the slash and vertical passes
  fwd = jax.jit(lambda q, k, v, vi, si: gpu.vertical_slash_pallas(q, k, v, vi, si, spec))
  text = fwd.trace(q, k, k, vert, slash).lower(lowering_platforms=("cuda",)).as_text()
  assert "stablehlo.while" not in text  # the lists are straight-line code (host-bound else)


def test_vertical_slash_dispatch(monkeypatch):
  """auto takes the kernel for bf16/f16 and head dims 64/128 on a Hopper GPU, else XLA;
  impl="pallas" on an uncovered call says why in one line."""
  from longax.kernels import vertical_slash_attention
  from longax.kernels._dispatch import resolve
  monkeypatch.setattr(gpu, "not_on_hopper", lambda call: None)
  x = lambda d, dt: jnp.zeros((1, 128, 2, d), dt)
  call = lambda d, dt: dict(q=x(d, dt), k=x(d, dt), v=x(d, dt), spec=_spec("softmax", True, d))
  take = lambda d=128, dt=jnp.bfloat16: resolve("vertical_slash_attention", "auto",
                                                call(d, dt)) is gpu.vertical_slash_pallas
  assert take() and take(d=64, dt=jnp.float16)
  assert not take(dt=jnp.float32) and not take(d=256)
  y = jnp.zeros((1, 16, 2, 256), jnp.bfloat16)
  idx = jnp.zeros((1, 2, 1), jnp.int32)
  with pytest.raises(ValueError, match=r"impl='pallas' does not support this call: head dim 256"):
    vertical_slash_attention(y, y, y, idx, idx, impl="pallas")


def test_vertical_slash_gradient_is_the_xla_paths(monkeypatch):
  """The custom_vjp's wiring: with the two kernel passes replaced by the XLA forward, the
  op's value and gradients (the XLA path's backward) match the float32 reference."""
  from conftest import compare
  from longax.kernels import sparse_attention as S
  from longax.kernels import vertical_slash_attention
  monkeypatch.setattr(gpu, "_vs_forward", lambda q, k, v, vi, si, spec, blocks:
                      S._vertical_slash_xla(q, k, v, vi, si, spec))
  rng = np.random.default_rng(4)
  q, k, v = (jnp.asarray(rng.standard_normal(sh), jnp.float32)
             for sh in ((1, 70, 4, 16), (1, 70, 2, 16), (1, 70, 2, 16)))
  vert, slash = vs_pattern(1, 1, 4, 70)
  spec, blocks = _spec("softmax", True, 16), gpu.Blocks()
  compare(lambda q, k, v: gpu.vertical_slash_pallas(q, k, v, vert, slash, spec, blocks=blocks),
          lambda q, k, v: vertical_slash_attention(q, k, v, vert, slash, impl="reference"),
          (q, k, v), (0, 1, 2), jnp.float32, "custom_vjp")


def test_vertical_slash_runs():
  """Offsets -> runs of consecutive offsets: sorted, repeats and -1 dropped, padded."""
  slash = jnp.asarray([[[7, -1, 3, 4, 5, 4, 0, 9, 8, -1]]], jnp.int32)
  runs = np.asarray(gpu._vs_runs(slash))[0, 0]
  big = gpu._UNBOUNDED
  assert runs[0].tolist() == [0, 3, 7] + [big] * 7 and runs[1].tolist() == [0, 5, 9] + [big] * 7


# (T, S, causal, band): a band wide enough for plain steps (one run over a warpgroup's window)
VS_LISTS = [(320, 320, True, 260), (150, 300, True, 0), (333, 150, True, 40), (190, 260, False, 80)]


@pytest.mark.parametrize("case", VS_LISTS, ids=str)
def test_vertical_slash_lists(case):
  """Per warpgroup and key block (numpy, from the pattern's definition): the slash pass owns
  exactly the blocks holding a pair on a slash, runs unmasked only blocks whose pairs are all
  on one run with no vertical column, and its run range holds every run crossing the block;
  the vertical pass owns exactly the gathered blocks holding a seen column."""
  t, s, causal, band = case
  h, d = 2, 64
  blk = gpu.blocks_for(d)
  bq, bkv, wgs = blk.block_q, blk.block_kv, blk.wgs
  vert, slash = vs_pattern(t + s, 1, h, s, band=band)
  vert = vert.at[0, 0].set(jnp.asarray([0, 1, 2, 2, 5, -1, 7, 8, 9]))  # columns in block 0 only
  spec = _spec("softmax", causal, d)
  pb = gpu._Problem(spec, t, s, 1, False, blk, vs="slash")
  tiles = -(-t // (wgs * bq))
  sp = -(-s // bkv) * bkv
  cols = np.full((1, h, sp + 1), 0, np.int32)
  for hh in range(h):
    cols[0, hh, np.asarray(vert[0, hh])[np.asarray(vert[0, hh]) >= 0]] = 1
  vflag = jnp.asarray(cols[..., :sp])
  runs = gpu._vs_runs(slash)
  lists = gpu._slash_lists(runs, vflag, pb, tiles)
  steps, own, counts, runs_s = (np.asarray(x) for x in (lists.steps, lists.own, lists.counts,
                                                        lists.runs))
  diags = np.asarray(runs)
  plain_seen = 0
  for hh, tile, w in np.ndindex(h, tiles, wgs):
    offs = set(np.asarray(slash[0, hh]).tolist()) - {-1}
    row0 = (tile * wgs + w) * bq
    p = np.arange(row0, min(row0 + bq, t))[:, None] + s - t
    n_own, n_plain = counts[0, hh, tile, 1 + 2 * w], counts[0, hh, tile, 2 + 2 * w]
    mine = {steps[0, hh, tile, j]: (k, k >= n_plain)
            for k, j in enumerate(own[0, hh, tile, w, :n_own])}
    for kb in range(sp // bkv):
      j = np.arange(kb * bkv, (kb + 1) * bkv)[None, :]
      on = np.isin(p - j, list(offs)) & (j < s)
      assert (kb in mine) == bool(on.size and on.any()), (case, hh, tile, w, kb)
      if kb not in mine:
        continue
      pos = [i for i in range(counts[0, hh, tile, 0]) if steps[0, hh, tile, i] == kb][0]
      r0, r1 = runs_s[0, hh, tile, w, :, pos]
      crossing = [r for r in range(diags.shape[-1]) if diags[0, hh, 0, r] <= (p - j).max()
                  and diags[0, hh, 1, r] >= (p - j).min()]
      assert set(crossing) <= set(range(r0, r1)), (case, hh, tile, w, kb)
      if not mine[kb][1]:  # plain: every pair on a slash, no vertical column
        plain_seen += 1
        assert on.all() and not cols[0, hh, kb * bkv:(kb + 1) * bkv].any(), (case, kb)
  assert plain_seen or band < 200, "the wide band makes plain steps"
  # the vertical pass: gathered columns [B, H, nv_pad] sorted, padding _UNBOUNDED
  col = np.sort(np.where(np.asarray(vert) >= 0, np.asarray(vert), gpu._UNBOUNDED), -1)
  col = np.pad(col, ((0, 0), (0, 0), (0, bkv - col.shape[-1])), constant_values=gpu._UNBOUNDED)
  pb_v = gpu._Problem(spec, t, s, 1, False, blk, vs="vertical")
  vl = gpu._vertical_lists(jnp.asarray(col), pb_v, tiles)
  counts = np.asarray(vl.counts)
  for hh, tile, w in np.ndindex(h, tiles, wgs):
    row0 = (tile * wgs + w) * bq
    last = min(row0 + bq, t) - 1 + s - t
    seen = row0 < t and bool(np.any((col[0, hh] < s) & ((col[0, hh] <= last) | (not causal))))
    assert counts[0, hh, tile, 1 + 2 * w] == int(seen), (case, "vertical", hh, tile, w)


# Both kernels run by Mosaic GPU's interpret mode on CPU (race detector on; a warpgroup must
# observe every phase of a barrier it waits on), bf16 / f16 against the float32 reference.
# (B, T, S, H, Hkv, D, causal, band, dtype): ragged T, GQA, offset 0, a short run, scattered
# offsets, columns on slashes; T < S; a wide band (plain steps); non-causal with T > S; B = 2.
VS_INTERPRET = [
    (1, 200, 200, 4, 2, 64, True, 0, jnp.bfloat16),
    (1, 150, 300, 2, 1, 64, True, 0, jnp.float16),
    pytest.param((1, 320, 320, 2, 1, 64, True, 260, jnp.bfloat16), marks=pytest.mark.slow),
    pytest.param((1, 190, 130, 2, 2, 128, False, 40, jnp.bfloat16), marks=pytest.mark.slow),
    pytest.param((2, 130, 130, 2, 1, 64, True, 20, jnp.bfloat16), marks=pytest.mark.slow),  # B=2
]


@pytest.mark.long
@pytest.mark.parametrize("case", VS_INTERPRET, ids=str)
def test_vertical_slash_interpreted_matches_reference(case):
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as interp
  from jax.experimental.pallas import mosaic_gpu as plgpu
  from conftest import assert_close
  from longax.kernels import vertical_slash_attention
  b, t, s, h, hkv, d, causal, band, dtype = case
  rng = np.random.default_rng(t + s)
  q, k, v = (jnp.asarray(rng.standard_normal(sh), dtype)
             for sh in ((b, t, h, d), (b, s, hkv, d), (b, s, hkv, d)))
  vert, slash = vs_pattern(t, b, h, s, band=band)
  try:
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams(detect_races=True)):
      got = np.asarray(gpu.vertical_slash_pallas(q, k, v, vert, slash, _spec("softmax", causal, d)))
    assert not interp.get_races().races_found, "a data race in the kernel"
  finally:
    interp.reset_gpu_interpret_mode_state()
  want = vertical_slash_attention(q, k, v, vert, slash, causal=causal, impl="reference")
  assert_close(got, want, 2e-2, str(case))


# -------------------------------------------------- block top-k's estimate: block maxima
# `block_max_pallas`: S = QK^T per 64-key block on wgmma, each row's max written (64 blocks
# to a store); with row_block a CTA stops at its last row's block and writes -inf past it.
# (R, S, Hkv, D, row_block)
BMAX_LOWER = [(300, 1000, 2, 128, 16), (64, 64, 1, 64, None), (130, 5000, 1, 128, 64)]


@pytest.mark.parametrize("case", BMAX_LOWER, ids=str)
def test_block_max_lowers(case):
  r, s, hkv, d, rb = case
  q, k = jnp.zeros((1, r, hkv, d), jnp.bfloat16), jnp.zeros((1, s, hkv, d), jnp.bfloat16)
  lowered = jax.jit(lambda q, k: gpu.block_max_pallas(q, k, block=64, row_block=rb)).trace(
      q, k).lower(lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()


def test_block_max_dispatch(monkeypatch):
  """auto takes the kernel while BLOCK_MAX_ON_AUTO is on and stays on XLA when it is off;
  impl="pallas" takes it for bf16/f16, head dim 64/128, blocks of 64, or says why not."""
  from longax.kernels._dispatch import resolve
  monkeypatch.setattr(gpu, "not_on_hopper", lambda call: None)
  take = lambda impl="auto", d=128, dt=jnp.bfloat16, block=64: resolve(
      "block_max_scores", impl, dict(q=jnp.zeros((1, 64, 1, d), dt), k=jnp.zeros((1, 64, 1, d), dt),
                                     block=block, impl=impl)) is gpu.block_max_pallas
  assert take() and not (take(dt=jnp.float32) or take(d=256) or take(block=32))
  monkeypatch.setattr(gpu, "BLOCK_MAX_ON_AUTO", False)
  assert not take() and take(impl="pallas") and take(impl="pallas", d=64, dt=jnp.float16)


# The kernel run by Mosaic GPU's interpret mode on CPU (race detector on, buffers start as
# NaN): (B, R, S, Hkv, D, row_block, blocks): causal rows over two CTAs, ragged S, two KV
# heads with one warpgroup, more than 64 key blocks (two stores of maxima) with a 2-slot ring.
BMAX_INTERPRET = [(1, 100, 300, 1, 64, 16, None), (2, 64, 200, 2, 64, None, gpu.BlockMaxBlocks(wgs=1)),
                  (1, 70, 64 * 70 + 5, 1, 64, None, gpu.BlockMaxBlocks(wgs=1, stages=2))]


@pytest.mark.parametrize("case", BMAX_INTERPRET, ids=str)
def test_block_max_kernel_interpreted_matches_reference(rand, case):
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as interp
  from jax.experimental.pallas import mosaic_gpu as plgpu
  from longax.kernels import block_max_scores
  b, r, s, hkv, d, rb, blocks = case
  q, k = rand.normal((b, r, hkv, d), jnp.bfloat16), rand.normal((b, s, hkv, d), jnp.bfloat16)
  try:
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams(detect_races=True)):
      got = np.asarray(gpu.block_max_pallas(q, k, block=64, row_block=rb, blocks=blocks))
    assert not interp.get_races().races_found, "a data race in the kernel"
  finally:
    interp.reset_gpu_interpret_mode_state()
  want = np.asarray(block_max_scores(q, k, block=64, row_block=rb, impl="reference"))
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want))  # no NaN: every element written
  np.testing.assert_allclose(np.where(np.isinf(got), 0, got), np.where(np.isinf(want), 0, want),
                             rtol=1e-4, atol=1e-4)


# ------------------------------------------------- block top-k's summary: block means
# `block_mean_pallas`: the forward kernel over the key blocks' means, each query block's own
# columns masked (`_Lists.cols`). (B, T, S, H, Hkv, D, mask heads): the prefill's 64k shape.
BMEAN_LOWER = [(1, 65536, 65536, 16, 4, 128, 16), (2, 1000, 3000, 4, 2, 64, 1)]


@pytest.mark.parametrize("case", BMEAN_LOWER, ids=str)
def test_block_mean_lowers(case):
  b, t, s, h, hkv, d, mh = case
  q = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((b, s, hkv, d), jnp.bfloat16)
  m = jax.ShapeDtypeStruct((1, mh, -(-t // 64), -(-s // 64)), jnp.bool_)
  lowered = jax.jit(lambda q, k, v, m: gpu.block_mean_pallas(q, k, v, m, block=64, scale=0.1)
                    ).trace(q, k, k, m).lower(lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()


def test_block_mean_dispatch(monkeypatch):
  """auto and impl="pallas" take the kernel for bf16/f16, head dim 64/128 (v's alike), blocks
  of 64 and up to BLOCK_MEAN_MAX_KEYS means, or say why not."""
  from longax.kernels._dispatch import resolve
  monkeypatch.setattr(gpu, "not_on_hopper", lambda call: None)

  def take(impl="auto", d=128, dv=None, dt=jnp.bfloat16, block=64, s=64):
    q, k = jnp.zeros((1, 64, 1, d), dt), jnp.zeros((1, s, 1, d), dt)
    v = jnp.zeros((1, s, 1, dv or d), dt)
    return resolve("block_mean_attention", impl, dict(q=q, k=k, v=v, block=block, impl=impl)
                   ) is gpu.block_mean_pallas

  assert take() and take(impl="pallas", d=64, dt=jnp.float16)
  assert not (take(dt=jnp.float32) or take(d=256) or take(dv=64) or take(block=32)
              or take(s=64 * gpu.BLOCK_MEAN_MAX_KEYS + 1))
  with pytest.raises(ValueError, match="block 32 \\(the kernel takes 64\\)"):
    take(impl="pallas", block=32)


# The kernel run by Mosaic GPU's interpret mode on CPU (race detector on, buffers start as
# NaN) against the reference: (B, T, S, H, Hkv, D, mask heads, density): ragged T and S
# (the last mean over 5 keys), a mask per head; B = 2, GQA with one mask for all heads, two
# tiles of means; head dim 128: slow, and on a 2-core CPU it can deadlock under the
# interpreter (warpgroup threads blocked in barrier-wait callbacks hold XLA's CPU thread pool
# while another warpgroup's 64x128 dot waits for a pool thread; NOTES.md session 15).
BMEAN_INTERPRET = [(1, 300, 300, 2, 1, 64, 2, 0.6), (2, 200, 4500, 4, 2, 64, 1, 0.3),
                   pytest.param((1, 130, 200, 1, 1, 128, 1, 0.5), marks=pytest.mark.slow)]


@pytest.mark.long
@pytest.mark.parametrize("case", BMEAN_INTERPRET, ids=str)
def test_block_mean_kernel_interpreted_matches_reference(rand, case):
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as interp
  from conftest import assert_close
  from jax.experimental.pallas import mosaic_gpu as plgpu
  from longax.kernels import block_mean_attention
  b, t, s, h, hkv, d, mh, density = case
  q = rand.normal((b, t, h, d), jnp.bfloat16)
  k, v = rand.normal((b, s, hkv, d), jnp.bfloat16), rand.normal((b, s, hkv, d), jnp.bfloat16)
  mask = rand.uniform((1, mh, -(-t // 64), -(-s // 64)), 0.0, 1.0) < density
  mask = mask.at[:, :, 1].set(False)  # a query block that takes no block
  try:
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams(detect_races=True)):
      o, lse = jax.tree.map(np.asarray, gpu.block_mean_pallas(q, k, v, mask, block=64,
                                                                  scale=d**-0.5))
    assert not interp.get_races().races_found, "a data race in the kernel"
  finally:
    interp.reset_gpu_interpret_mode_state()
  want_o, want_lse = block_mean_attention(q, k, v, mask, impl="reference")
  np.testing.assert_array_equal(np.isinf(lse), np.isinf(want_lse))
  assert_close(np.where(np.isinf(lse), 0, lse), np.where(np.isinf(want_lse), 0, want_lse), 1e-3,
               what="lse")
  assert_close(o, want_o, 2e-2, what="o")


@pytest.mark.parametrize("change,message", [
    (dict(dt=jnp.float32), "dtype float32 (the kernel takes bfloat16 and float16)"),
    (dict(d=256), "head dims 256 / 256 (the kernel takes 64 or 128, alike)"),
    (dict(dv=64), "head dims 128 / 64 (the kernel takes 64 or 128, alike)"),
    (dict(block=32), "block 32 (the kernel takes 64)"),
    (dict(s=64 * 4096 + 1), "4097 key blocks (the kernel takes 4096)")])
def test_block_mean_unsupported_says_why(change, message, monkeypatch):
  monkeypatch.setattr(gpu, "not_on_hopper", lambda call: None)
  a = dict(dict(d=128, dv=None, dt=jnp.bfloat16, block=64, s=64), **change)
  call = dict(q=jax.ShapeDtypeStruct((1, 64, 1, a["d"]), a["dt"]),
              k=jax.ShapeDtypeStruct((1, a["s"], 1, a["d"]), a["dt"]),
              v=jax.ShapeDtypeStruct((1, a["s"], 1, a["dv"] or a["d"]), a["dt"]), block=a["block"])
  assert gpu.block_mean_unsupported(call) == message


def test_block_mean_kernel_takes_64_tiles_only():
  q = jnp.zeros((1, 64, 1, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match="block_mean_pallas: Blocks.block_q and block_kv must be 64"):
    gpu.block_mean_pallas(q, q, q, jnp.ones((1, 1, 1, 1), bool), block=64, scale=0.1,
                          blocks=gpu.Blocks(block_q=128, block_kv=64))
