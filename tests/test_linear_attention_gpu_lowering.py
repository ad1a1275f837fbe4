"""The Mosaic GPU linear-attention kernels lower for "cuda" on any machine (catches layout and
tracing errors without a GPU), and the backward's chunk-parallel math is exact: fed the
states the kernels compute (here by an XLA recurrence), `chunk_grads` gives the reference's
gradients. Running the kernels is checked on the device (`tests/gpu/`)."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

la = importlib.import_module("longax.kernels.linear_attention")  # the module, not the op
from longax.kernels.gpu import linear_attention as gpu

# (T, H, Hkv, Dk, Dv, decay, segments)
CASES = [
    (128, 2, 2, 128, 128, "token", False),
    (130, 2, 1, 128, 128, "key", True),
    (130, 2, 2, 64, 128, "key", False),  # per-key on the scalar kernels (bounded chunks)
    (200, 4, 2, 64, 128, "head", True),
    (64, 2, 1, 128, 64, None, False),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_lowers_forward_and_backward(case):
  t, h, hkv, dk, dv, decay, segments = case
  q = jnp.zeros((1, t, h, dk), jnp.bfloat16)
  k = jnp.zeros((1, t, hkv, dk), jnp.bfloat16)
  v = jnp.zeros((1, t, hkv, dv), jnp.bfloat16)
  g = None if decay is None else jnp.zeros((1, t, h, dk if decay == "key" else 1), jnp.float32)
  resets = jnp.zeros((1, t), bool) if segments else None
  h0 = jnp.zeros((1, h, dk, dv), jnp.float32)

  def loss(q, k, v, g, h0):
    o, s = gpu.linear_attention_pallas(q, k, v, g, h0, resets, 0.1)
    return o.astype(jnp.float32).sum() + s.sum()

  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).trace(q, k, v, g, h0).lower(
      lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()


@pytest.mark.parametrize("t,h,hkv,dk,dv", [(300, 4, 2, 64, 64), (32768, 16, 16, 128, 128),
                                         (37, 2, 1, 128, 64)])
def test_shard_state_lowers(t, h, hkv, dk, dv):
  """LASP-2's shard-state kernel lowers (layouts, barriers, SMEM) for the GPU."""
  k = jnp.zeros((1, t, hkv, dk), jnp.bfloat16)
  v = jnp.zeros((1, t, hkv, dv), jnp.bfloat16)
  w = jnp.zeros((1, h, t), jnp.float32)
  lowered = jax.jit(lambda k, v, w: gpu.shard_state(k, v, w, h)).trace(k, v, w).lower(
      lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()


def _emulate_shard_state(k, v, w, heads, **kw):
  """`gpu.shard_state` as XLA (the same contract)."""
  del kw
  kr, vr = (jnp.repeat(x, heads // x.shape[2], axis=2).astype(jnp.float32) for x in (k, v))
  return jnp.einsum("bthd,bht,bthe->bhde", kr, w, vr)


def _states(k, v, g2, segs, h0t, reverse=False, q=None, do=None, scale=1.0):
  """The two kernels' state passes as an XLA recurrence over chunks (per query head k, v)."""
  b, tp, h, _ = (q if reverse else k).shape
  n = tp // gpu.C
  ch = lambda x: gpu._chunks(x).astype(jnp.float32)  # [B, H, N, C, D]
  g = g2.reshape(b, h, n, gpu.C)
  cin = 1.0 if segs is None else segs.cin.reshape(b, 1, n, gpu.C)
  tail = 1.0 if segs is None else segs.tail.reshape(b, 1, n, gpu.C)
  carry = jnp.exp2(g[..., -1]) * (1.0 if segs is None else cin[..., -1])
  if reverse:
    x, y, w = ch(q), ch(do), jnp.exp2(g) * cin * scale
  else:
    x, y, w = ch(k), ch(v), jnp.exp2(g[..., -1:] - g) * tail
  local = jnp.einsum("bhnce,bhncd->bhned", y * w[..., None], x)
  order = range(n - 1, -1, -1) if reverse else range(n)
  s, out = h0t, [None] * n
  for c in order:
    out[c] = s
    s = carry[:, :, c, None, None] * s + local[:, :, c]
  return jnp.stack(out, axis=2), s


@pytest.mark.parametrize("decay,segments,group", [("token", True, 2), ("head", False, 1),
                                                  (None, True, 1)])
def test_chunk_grads_match_reference(decay, segments, group):
  rng = np.random.default_rng(0)
  b, t, h, dk, dv = 2, 150, 2, 16, 8
  hkv = h // group
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  q, k, v = f(b, t, h, dk), f(b, t, hkv, dk), f(b, t, hkv, dv)
  g = None if decay is None else (-jnp.abs(f(b, t, h, 1)) if decay == "token"
                                  else jnp.broadcast_to(-jnp.abs(f(1, 1, h, 1)), (b, t, h, 1)))
  h0 = f(b, h, dk, dv)
  seg = jnp.asarray(np.sort(rng.integers(0, 3, (b, t)), axis=1)) if segments else None
  resets = la._resets(seg, b, t)
  scale = 0.3
  do, dfin = f(b, t, h, dv), f(b, h, dk, dv)

  _, vjp = jax.vjp(lambda q, k, v, g, h0: la.linear_attention_reference(
      q, k, v, g, h0, resets, scale), q, k, v, g, h0)
  want = vjp((do, dfin))

  tp = -(-t // gpu.C) * gpu.C
  pad = lambda x: jnp.pad(x, [(0, 0), (0, tp - t), (0, 0), (0, 0)])
  g_in = jnp.zeros((b, t, h, 1)) if g is None else g
  g2, g2_vjp = jax.vjp(lambda g: gpu.chunk_log2_decay(g, tp), g_in)
  segs = None if resets is None else gpu.segment_vectors(resets, tp)
  kr, vr = la._per_query_head(q, k, v)
  states, _ = _states(pad(kr), pad(vr), g2, segs, jnp.swapaxes(h0, -1, -2))
  d_t, dh0t = _states(None, None, g2, segs, jnp.swapaxes(dfin, -1, -2), reverse=True,
                      q=pad(q), do=pad(do), scale=scale)
  dq, dk, dv_, dg2 = gpu.chunk_grads(pad(q), pad(kr), pad(vr), pad(do), g2, segs, states, d_t,
                                     scale)
  dk, dv_ = (gpu._group_sum(x, group) for x in (dk, dv_))
  got = (dq[:, :t], dk[:, :t], dv_[:, :t], g2_vjp(dg2)[0], jnp.swapaxes(dh0t, -1, -2))
  for name, x, y in zip(["dq", "dk", "dv", "dg", "dh0"], got, want):
    if y is None:
      continue
    np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-4, err_msg=name)


def _emulate_forward(q, k, v, decay, segs, h0t, *, scale, store_states, stages, pieces=1,
                     gamma_after=None):
  """`gpu._forward` as XLA (the same contract), to check the op's wiring and backward on CPU."""
  del stages
  h = q.shape[2]
  k, v = (jnp.repeat(x, h // x.shape[2], axis=2) for x in (k, v))
  qc, kc, vc = (gpu._chunks(x).astype(jnp.float32) for x in (q, k, v))
  b, _, n = qc.shape[:3]
  if isinstance(decay, tuple):
    gamma, a = decay
    carry, w, qw = gamma[..., None, :], 1.0, 1.0
    scores = a.reshape(b, h, n, gpu.C, gpu.C).astype(jnp.float32)
  else:
    g = decay.reshape(b, h, n, gpu.C)
    cin = 1.0 if segs is None else segs.cin.reshape(b, 1, n, gpu.C)
    tail = 1.0 if segs is None else segs.tail.reshape(b, 1, n, gpu.C)
    carry = (jnp.exp2(g[..., -1]) * (1.0 if segs is None else cin[..., -1]))[..., None, None]
    w = (jnp.exp2(g[..., -1:] - g) * tail)[..., None]
    qw = (jnp.exp2(g) * cin * scale)[..., None]
    keep = jnp.tril(jnp.ones((gpu.C, gpu.C), bool))
    if segs is not None:
      run = segs.run.reshape(b, 1, n, gpu.C)
      keep = keep & (run[..., :, None] == run[..., None, :])
    m = jnp.where(keep, jnp.exp2(jnp.where(keep, g[..., :, None] - g[..., None, :], 0.0)), 0.0)
    scores = jnp.einsum("bhnid,bhnjd->bhnij", qc, kc) * m * scale
  local = jnp.einsum("bhnce,bhncd->bhned", vc * w, kc)
  starts = h0t.reshape(b, pieces, *h0t.shape[1:])
  states, finals = [], []
  for c in range(n):
    if c % (n // pieces) == 0:  # a piece starts from its own initial state
      s = starts[:, c // (n // pieces)]
    states.append(s)
    s = carry[:, :, c] * s + local[:, :, c]
    if gamma_after is not None:
      s = s * gamma_after[:, :, c, None, :]
    if (c + 1) % (n // pieces) == 0:
      finals.append(s)
  s = jnp.stack(finals, 1).reshape(h0t.shape)
  states = jnp.stack(states, axis=2)  # [B, H, N, Dv, Dk]
  o = jnp.einsum("bhnij,bhnje->bhnie", scores, vc) + jnp.einsum(
      "bhncd,bhned->bhnce", qc * qw, states)
  return (gpu._unchunk(o).astype(q.dtype), s,
          states.astype(q.dtype) if store_states else None)


def _emulate_reverse(q, do, decay, segs, dfinal_t, *, scale, stages, pieces=1):
  del stages
  b, tp, h, _ = q.shape
  n = tp // gpu.C
  qc, doc = (gpu._chunks(x).astype(jnp.float32) for x in (q, do))
  if decay.ndim == 4:
    carry, w = decay[..., None, :], 1.0
  else:
    g = decay.reshape(b, h, n, gpu.C)
    cin = 1.0 if segs is None else segs.cin.reshape(b, 1, n, gpu.C)
    carry = (jnp.exp2(g[..., -1]) * (1.0 if segs is None else cin[..., -1]))[..., None, None]
    w = (jnp.exp2(g) * cin * scale)[..., None]
  local = jnp.einsum("bhnce,bhncd->bhned", doc * w, qc)
  ends = dfinal_t.reshape(b, pieces, *dfinal_t.shape[1:])
  out, firsts = [None] * n, [None] * pieces
  npc = n // pieces
  for c in range(n - 1, -1, -1):
    if (c + 1) % npc == 0:
      d = ends[:, c // npc]
    out[c] = d
    d = carry[:, :, c] * d + local[:, :, c]
    if c % npc == 0:
      firsts[c // npc] = d
  return jnp.stack(out, axis=2).astype(q.dtype), jnp.stack(firsts, 1).reshape(dfinal_t.shape)


@pytest.mark.parametrize("decay,segments,group,strength,pieces", [
    ("key", True, 2, 0.2, 1), ("key", False, 1, 0.2, 1), ("key", True, 1, 5.0, 1),
    ("key", False, 2, 5.0, 1),
    ("token", True, 1, 1.0, 1), ("token", True, 2, 0.3, 2), ("token", False, 1, 0.3, 4)])
def test_pallas_wiring_with_emulated_kernels(monkeypatch, decay, segments, group, strength,
                                             pieces):
  """strength 0.2: per-key scores in one matmul; 5.0: chunks past PER_KEY_BOUND, sub-chunks."""
  # The whole pallas impl (factors, custom_vjp, XLA chunk gradients) with the two state-pass
  # kernels emulated, against the reference: forward and every gradient, float32.
  monkeypatch.setattr(gpu, "_forward", _emulate_forward)
  monkeypatch.setattr(gpu, "_reverse_states", _emulate_reverse)
  rng = np.random.default_rng(1)
  b, t, h, dk, dv = 1, 150, 2, 16, 8
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  q, k, v = f(b, t, h, dk), f(b, t, h // group, dk), f(b, t, h // group, dv)
  g = -strength * jnp.abs(f(b, t, h, dk if decay == "key" else 1))
  h0 = f(b, h, dk, dv)
  seg = jnp.asarray(np.sort(rng.integers(0, 3, (b, t)), axis=1)) if segments else None
  resets = la._resets(seg, b, t)
  cfg = gpu.Config(grads_kernel=False, pieces=pieces)
  run = lambda fn: jax.vjp(lambda *a: fn(*a, resets, 0.3), q, k, v, g, h0)
  (o1, s1), vjp1 = run(lambda *a: gpu.linear_attention_pallas(*a, config=cfg))
  (o2, s2), vjp2 = run(la.linear_attention_reference)
  np.testing.assert_allclose(o1, o2, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(s1, s2, rtol=1e-4, atol=1e-4)
  cts = (f(*o1.shape), f(*s1.shape))
  for name, x, y in zip(["dq", "dk", "dv", "dg", "dh0"], vjp1(cts), vjp2(cts)):
    np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-4, err_msg=name)


@pytest.mark.parametrize("decay,segments,group,pieces", [
    ("token", True, 1, 1), ("token", False, 2, 2), ("head", True, 1, 2), (None, False, 1, 1)])
def test_split_backward_with_emulated_kernels(monkeypatch, decay, segments, group, pieces):
  """LASP-2's split (`split_forward`, `split_grad_in`, `split_grads`): phase 1's initial-state
  gradient is the one through the outputs alone, and phase 2 with a final-state cotangent
  gives the reference's gradients; 4 chunks, so the late cotangent's decay Gamma_c differs by
  chunk. The two state passes emulated, the chunk-parallel part on its XLA path, float32."""
  monkeypatch.setattr(gpu, "_forward", _emulate_forward)
  monkeypatch.setattr(gpu, "_reverse_states", _emulate_reverse)
  monkeypatch.setattr(gpu, "TUNED", gpu.Config(grads_kernel=False, pieces=pieces))
  rng = np.random.default_rng(2)
  b, t, h, dk, dv = 1, 230, 2, 16, 8
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  q, k, v = f(b, t, h, dk), f(b, t, h // group, dk), f(b, t, h // group, dv)
  g = None if decay is None else -0.05 * jnp.abs(f(b, t, h, 1) if decay == "token"
                                                 else jnp.broadcast_to(f(1, 1, h, 1), (b, t, h, 1)))
  h0 = f(b, h, dk, dv)
  seg = jnp.asarray(np.sort(rng.integers(0, 3, (b, t)), axis=1)) if segments else None
  resets, scale = la._resets(seg, b, t), 0.3
  do, dfin = f(b, t, h, dv), f(b, h, dk, dv)
  ref = lambda q, k, v, g, h0: la.linear_attention_reference(q, k, v, g, h0, resets, scale)
  _, vjp = jax.vjp(ref, q, k, v, g, h0)
  o, final, res = gpu.split_forward(q, k, v, g, h0, resets, scale)
  want_o, want_final = ref(q, k, v, g, h0)
  np.testing.assert_allclose(o, want_o, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(final, want_final, rtol=1e-4, atol=1e-4)
  d_in, d0 = gpu.split_grad_in(res, do, scale)
  np.testing.assert_allclose(d_in, vjp((do, jnp.zeros_like(dfin)))[4], rtol=2e-4, atol=2e-4)
  got = gpu.split_grads(res, d0, do, dfin, scale)
  for name, x, y in zip(["dq", "dk", "dv", "dg"], got, vjp((do, dfin))):
    if y is not None:
      np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-4, err_msg=name)
