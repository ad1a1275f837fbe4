"""The Mosaic GPU attention kernels lower to Mosaic GPU on any machine (cross-platform
lowering for "cuda"): catches layout-inference, shared-memory-shape and tracing errors without
a GPU. Running them is checked on the device (`tests/gpu/`). ~2 s a case on 2 cores."""

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longax.kernels.attention import AttnSpec
from longax.kernels.gpu import attention as gpu

# (kind, causal, window, sinks, softcap, segments, T, S, H, Hkv, D)
CASES = [
    ("softmax", True, None, 0, None, False, 256, 256, 4, 2, 128),
    ("softmax", False, None, 0, None, False, 256, 256, 4, 2, 128),
    ("softmax", False, None, 0, None, True, 192, 192, 2, 1, 64),
    ("softmax", True, 100, 4, 20.0, True, 300, 300, 4, 1, 64),
    ("softmax", True, 200, 70, None, False, 600, 600, 4, 2, 128),  # sink prefix + window split
    ("sigmoid", True, None, 0, None, False, 200, 456, 4, 2, 128),
    ("sigmoid", False, 64, 0, None, False, 256, 256, 2, 2, 64),
    ("softmax", True, None, 0, None, False, 128, 128, 2, 2, 256),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_lowers_forward_and_backward(case):
  kind, causal, window, sinks, softcap, segments, t, s, h, hkv, d = case
  spec = AttnSpec(kind, causal, d**-0.5, window, sinks, softcap, -3.0 if kind == "sigmoid" else 0.0)
  q = jnp.zeros((1, t, h, d), jnp.bfloat16)
  k = jnp.zeros((1, s, hkv, d), jnp.bfloat16)
  seg = (jnp.zeros((1, t), jnp.int32), jnp.zeros((1, s), jnp.int32)) if segments else (None, None)

  def loss(q, k, v):
    o = gpu.attention_pallas(q, k, v, None, None, *seg, spec)
    return o.astype(jnp.float32).sum()

  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k).lower(
      lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()


def test_lowers_return_lse_and_block_grads():
  """The forward with its log-sum-exp (and that lse's cotangent) and ring attention's block
  gradients lower for cuda."""
  spec = AttnSpec("softmax", True, 128**-0.5, None, 0, None, 0.0)
  q = jnp.zeros((1, 256, 4, 128), jnp.bfloat16)
  k = jnp.zeros((1, 256, 2, 128), jnp.bfloat16)

  def loss(q, k, v):
    o, lse = gpu.attention_pallas(q, k, v, None, None, None, None, spec, return_lse=True)
    return o.astype(jnp.float32).sum() + jnp.where(jnp.isfinite(lse), lse, 0.0).sum()

  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k).lower(
      lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()
  lse = jnp.zeros((1, 256, 4), jnp.float32)
  grads = lambda q, k, v: gpu.block_grads_pallas(q, k, v, None, None, None, None, spec, q, lse, q)
  lowered = jax.jit(grads).trace(q, k, k).lower(lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()


# ---------------------------------------------- the op's wiring with the kernels emulated
# `_forward`, `_backward_dq` and `_backward_dkv` as XLA with the kernels' contract (padded
# arrays, lse [B, H, Tp] in log2 units with +inf for an empty row), so the custom_vjp, the
# returned log-sum-exp and its cotangent, ring attention's block gradients and the ring's
# dispatch onto the kernel run on CPU against the reference. With block lists (block-sparse)
# the emulation computes exactly the pairs the kernels would: the blocks each warpgroup's own
# steps list, the rule applied on its masked steps only.


def _onehot_cover(lists, n_blocks):
  """A kernel's `_Lists` -> (covered, masked): int [..., wgs, n_blocks] how many of the
  warpgroup's own steps list each block, bool whether one of them runs masked."""
  steps, own, counts = lists[:3]
  j = jnp.arange(own.shape[-1])
  valid = j < counts[..., 1::2, None]
  masked = j >= counts[..., 2::2, None]
  blk = jnp.take_along_axis(jnp.broadcast_to(steps[..., None, :], own.shape), own, -1)
  hit = (blk[..., None] == jnp.arange(n_blocks)) & valid[..., None]  # [..., wgs, L, n_blocks]
  return hit.sum(-2), (hit & masked[..., None]).any(-2)


def _row_pairs(lists, tp, sp, bq, bkv):
  """Forward / dq lists [B|1, H|1, tiles, ...] -> (covered, masked) [B|1, H|1, Tp, Sp]."""
  cover, masked = _onehot_cover(lists, sp // bkv)  # [B, H, tiles, wgs, nkb]
  grow = lambda x: jnp.repeat(jnp.repeat(x.reshape(*x.shape[:2], -1, x.shape[-1]), bq, 2), bkv, 3)
  return grow(cover) > 0, grow(masked)


def _key_pairs(lists, t, tp, sp, bq, bkv, group):
  """dk/dv lists [B|1, Hkv, tiles * splits, wgs, G * n_q] (n_q = ceil(T / bq); a tile's
  splits hold parts of its steps) -> (covered, masked) [B|1, H, Tp, Sp]."""
  n_q = -(-t // bq)
  cover, masked = _onehot_cover(lists, group * n_q)
  tiles = sp // (cover.shape[-2] * bkv)
  per_tile = lambda x: x.reshape(*x.shape[:2], tiles, -1, *x.shape[3:])
  cover, masked = per_tile(cover).sum(3), per_tile(masked).any(3)

  def grow(x):  # [B, Hkv, tiles, wgs, G * n_q] -> [B, H, Tp, tiles * wgs * bkv]
    x = x.reshape(*x.shape[:2], -1, group, n_q)  # [B, Hkv, key blocks, G, n_q]
    x = jnp.moveaxis(x, 2, -1).reshape(x.shape[0], -1, n_q, x.shape[2])
    x = jnp.repeat(jnp.repeat(x, bq, 2), bkv, 3)
    return jnp.pad(x, ((0, 0), (0, 0), (0, tp - n_q * bq), (0, 0)))

  return grow(cover) > 0, grow(masked)


def _rows_selected(lists, pb, sp):
  """Rows listing their own key blocks (`_Lists.rows` [B, Hkv, n, Tp]): bool [B, Hkv, Tp, Sp]
  whether row i's token selected key j's block; else None."""
  if lists is None or lists.rows is None:
    return None
  key_block = jnp.arange(sp) // pb.select_block
  return jnp.any(lists.rows[..., None] == key_block, axis=2)


def _emulated_scores(q, k, q_seg, k_seg, pb, pairs=None):
  h, hkv = q.shape[2], k.shape[2]
  kr = jnp.repeat(k, h // hkv, axis=2).astype(jnp.float32)
  s = pb.spec.logits(jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), kr))
  q_pos = pb.pos(jnp.arange(q.shape[1]))
  k_pos = jnp.arange(k.shape[1])
  mask = pb.spec.mask(q_pos, k_pos, q_seg, k_seg)[:, None] & (k_pos < pb.s)
  if pairs is not None:  # the listed blocks; the rule (and rows' own blocks) on masked steps only
    covered, masked, selected = pairs
    mask = covered & ((mask if selected is None else mask & selected) | ~masked)
  return s, mask


def _emulate_forward(q, k, v, q_seg, k_seg, pb, lists=None):
  blk = pb.blocks
  pairs = lists and (*_row_pairs(lists, q.shape[1], k.shape[1], blk.block_q, blk.block_kv),
                     _rows_selected(lists, pb, k.shape[1]))
  s, mask = _emulated_scores(q, k, q_seg, k_seg, pb, pairs)
  vr = jnp.repeat(v, q.shape[2] // v.shape[2], axis=2).astype(jnp.float32)
  if pb.spec.kind == "softmax":
    lse = jax.nn.logsumexp(jnp.where(mask, s, -jnp.inf), axis=-1)
    p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
    lse = jnp.where(jnp.isfinite(lse), lse * gpu.LOG2E, jnp.inf)
  else:
    p = jnp.where(mask, jax.nn.sigmoid(s + pb.spec.bias), 0.0)
    lse = jnp.zeros(s.shape[:3], jnp.float32)
  return jnp.einsum("bhts,bshd->bthd", p, vr).astype(q.dtype), lse


def _emulated_grads(q, k, v, do, lse, delta, q_seg, k_seg, pb, pairs=None):
  spec, g = pb.spec, q.shape[2] // k.shape[2]
  s, mask = _emulated_scores(q, k, q_seg, k_seg, pb, pairs)
  if spec.kind == "softmax":
    p = jnp.where(mask, jnp.exp2(s * gpu.LOG2E - lse[..., None]), 0.0)
  else:
    p = jnp.where(mask, jax.nn.sigmoid(s + spec.bias), 0.0)
  kr, vr = (jnp.repeat(x, g, axis=2).astype(jnp.float32) for x in (k, v))
  dof = do.astype(jnp.float32)
  dp = jnp.einsum("bthd,bshd->bhts", dof, vr)
  ds = p * (dp - delta[..., None]) if spec.kind == "softmax" else dp * p * (1 - p)
  if spec.softcap is not None:
    ds = ds * (1 - jnp.square(s / spec.softcap))
  ds = ds * spec.scale
  group = lambda x: x.reshape(*x.shape[:2], -1, g, x.shape[-1]).sum(3)
  dq = jnp.einsum("bhts,bshd->bthd", ds, kr)
  dk = group(jnp.einsum("bhts,bthd->bshd", ds, q.astype(jnp.float32)))
  dv = group(jnp.einsum("bhts,bthd->bshd", p, dof))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _emulate_dq(q, k, v, do, lse, delta, q_seg, k_seg, pb, lists=None):
  blk = pb.blocks
  pairs = lists and (*_row_pairs(lists, q.shape[1], k.shape[1], blk.bwd_block_q, blk.bwd_block_kv),
                     _rows_selected(lists, pb, k.shape[1]))
  return _emulated_grads(q, k, v, do, lse, delta, q_seg, k_seg, pb, pairs)[0]


def _emulate_dkv(q, k, v, do, lse, delta, q_seg, k_seg, pb, lists=None):
  blk = pb.blocks
  pairs = lists and (*_key_pairs(lists, pb.t, q.shape[1], k.shape[1], blk.bwd_block_q,
                                blk.bwd_block_kv,
                                pb.group), _rows_selected(lists, pb, k.shape[1]))
  return _emulated_grads(q, k, v, do, lse, delta, q_seg, k_seg, pb, pairs)[1:]


@pytest.fixture
def emulated(monkeypatch):
  monkeypatch.setattr(gpu, "_forward", _emulate_forward)
  monkeypatch.setattr(gpu, "_backward_dq", _emulate_dq)
  monkeypatch.setattr(gpu, "_backward_dkv", _emulate_dkv)
  monkeypatch.setattr(gpu, "not_on_hopper", lambda call: None)  # let dispatch pick it
  monkeypatch.setattr(gpu, "IMPORTANCE_ON_AUTO", False)  # NSA's importance kernel: not emulated


def _inputs(t, s, h, hkv, d, dtype, seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
  return f(1, t, h, d), f(1, s, hkv, d), f(1, s, hkv, d), f(1, t, h, d), f(1, t, h)


@pytest.mark.parametrize("causal,window,segments", [(True, None, False), (False, None, True),
                                                    (True, 40, True)])
def test_emulated_return_lse_and_its_gradient(emulated, causal, window, segments):
  A = importlib.import_module("longax.kernels.attention")
  t = s = 150
  q, k, v, w_o, w_l = _inputs(t, s, 4, 2, 16, jnp.float32)
  seg = jnp.asarray(np.repeat(np.arange(3), [60, 50, 40])[None]) if segments else None
  spec = AttnSpec("softmax", causal, 0.3, window, 0, None, 0.0)
  pos = (A.query_positions(t, s), jnp.arange(s))

  def loss(fn, q, k, v):
    o, lse = fn(q, k, v, *pos, seg, seg, spec, return_lse=True)
    return (o * w_o).sum() + (jnp.where(jnp.isfinite(lse), lse, 0.0) * w_l).sum(), (o, lse)

  kern = lambda *a, **kw: gpu.attention_pallas(*a, blocks=gpu.Blocks(), **kw)
  (_, got), g_got = jax.value_and_grad(lambda *a: loss(kern, *a), (0, 1, 2), has_aux=True)(q, k, v)
  (_, want), g_want = jax.value_and_grad(lambda *a: loss(A.attention_reference, *a), (0, 1, 2),
                                         has_aux=True)(q, k, v)
  for a, b in zip((*got, *g_got), (*want, *g_want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kind,causal", [("softmax", True), ("softmax", False), ("sigmoid", True)])
def test_emulated_block_grads_match_xla(emulated, kind, causal):
  """The kernels' block gradients equal the XLA path's for rows whose o / lse cover more keys."""
  A = importlib.import_module("longax.kernels.attention")
  t = 130
  q, k, v, do, _ = _inputs(t, t, 4, 1, 16, jnp.float32, seed=3)
  spec = AttnSpec(kind, causal, 0.25, None, 0, None, -2.0 if kind == "sigmoid" else 0.0)
  pos = (A.query_positions(t, t), jnp.arange(t))
  wide = jnp.concatenate([k, k[:, :20] * 0.5], axis=1)  # o and lse of more keys than the block
  o, lse = A.attention_reference(q, wide, jnp.concatenate([v, v[:, :20]], axis=1),
                                 jnp.arange(t) + 20, jnp.arange(t + 20), None, None,
                                 dataclasses.replace(spec, causal=False), return_lse=True)
  lse = lse if kind == "softmax" else None
  got = gpu.block_grads_pallas(q, k, v, *pos, None, None, spec, o, lse, do, blocks=gpu.Blocks())
  want = A._block_grads_xla(q, k, v, *pos, None, None, spec, o, lse, do)
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)


@pytest.mark.slow  # ~50 s on 2 cores; on a GPU: tests/gpu/test_sequence_parallel_gpu.py
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_ring_takes_the_kernel_on_one_device(emulated, kind):
  """Zigzag ring attention on a 1-device mesh (the device's two chunks: both diagonals and
  one full pair) with impl="pallas": every local call and block gradient is the kernel's
  (the kernels emulated on CPU; `test_ring_on_the_kernel` runs the real ones on a GPU)."""
  from jax.sharding import Mesh, PartitionSpec as P

  A = importlib.import_module("longax.kernels.attention")
  from longax.kernels import sequence_parallel as SP
  t = 2 * 96
  q, k, v, w_o, _ = _inputs(t, t, 4, 2, 64, jnp.bfloat16, seed=5)
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("sp",))
  ring = jax.shard_map(lambda q, k, v: SP.ring_attention(q, k, v, axis_name="sp", kind=kind,
                                                         layout="zigzag", impl="pallas"),
                       mesh=mesh, in_specs=(P(None, "sp"),) * 3, out_specs=P(None, "sp"))
  ref = (lambda q, k, v: A.attention(q, k, v, impl="reference")) if kind == "softmax" else (
      lambda q, k, v: A.sigmoid_attention(q, k, v, impl="reference"))
  loss = lambda fn: lambda q, k, v: (fn(q, k, v).astype(jnp.float32) * w_o).sum()
  got = jax.grad(loss(ring), (0, 1, 2))(q, k, v)
  want = jax.grad(loss(ref), (0, 1, 2))(q, k, v)
  np.testing.assert_allclose(np.asarray(ring(q, k, v), np.float32),
                             np.asarray(ref(q, k, v), np.float32), atol=3e-2, rtol=3e-2)
  for a, b in zip(got, want):
    err = np.linalg.norm(np.asarray(a, np.float32) - np.asarray(b, np.float32))
    assert err <= 3e-2 * np.linalg.norm(np.asarray(b, np.float32))


@pytest.mark.parametrize("op", ["ring", "ulysses", "lasp2"])
def test_kernels_inside_shard_map_lower_with_their_gradients(monkeypatch, op):
  """The real kernels inside `jax.shard_map` (check_vma on): their outputs and gradients
  must vary over the mesh axis as their inputs do, or the custom_vjp refuses them."""
  from jax.sharding import Mesh, PartitionSpec as P

  from longax.kernels import sequence_parallel as SP
  from longax.kernels.gpu import linear_attention as gpu_la
  monkeypatch.setattr(gpu, "not_on_hopper", lambda call: None)
  monkeypatch.setattr(gpu_la, "not_on_hopper", lambda call: None)
  x = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
  fn = {"ring": lambda q, k, v: SP.ring_attention(q, k, v, axis_name="sp", impl="pallas"),
        "ulysses": lambda q, k, v: SP.ulysses_attention(q, k, v, axis_name="sp", impl="pallas"),
        "lasp2": lambda q, k, v: SP.lasp2_linear_attention(
            q, k, v, axis_name="sp", log_decay=-jnp.ones(q.shape[:3]), impl="pallas")}[op]
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("sp",))
  sp = jax.shard_map(fn, mesh=mesh, in_specs=(P(None, "sp"),) * 3, out_specs=P(None, "sp"))
  loss = lambda q, k, v: sp(q, k, v).astype(jnp.float32).sum()
  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, x, x).lower(
      lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()
