"""The nsa mixer (Native Sparse Attention) against a dense masked reference of the same math,
written here from the paper's definitions (loops over blocks, dense [T, S] masks, a stable
argsort for the selection), sharing nothing with the layer but its parameters; gradients
against the reference's; decoding against the full forward; config rules.
(Decode == forward for nsa and nsa hybrids also runs in tests/test_models.py.)"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from einops import rearrange
from flax import nnx

from conftest import assert_close, compare
from longax import kernels
from longax.layers import NSA
from longax.layers.nsa import block_ends, compressed_attention, n_compressed, overlap, spread
from longax.layers.common import rope
from longax.models import LM, LMConfig, NSAConfig, count_params
from longax.train import config as C

KW = dict(block_size=4, stride=2, select_block=4, n_selected=2, window=3)


def _layer(h=4, hkv=2, d_model=32, seed=0, **kw):
  layer = NSA(d_model, h, hkv, **(KW | kw), rngs=nnx.Rngs(seed), dtype=jnp.float32,
              param_dtype=jnp.float32)
  # Random compression maps, position embeddings and gate biases (init is pooling / zero).
  keys = iter(jax.random.split(jax.random.key(seed + 1), 4))
  for p in (layer.cmp_k, layer.cmp_v, layer.cmp_k_pos, layer.cmp_v_pos):
    p[...] = p[...] + 0.3 * jax.random.normal(next(keys), p.shape)
  return layer


def _softmax_masked(q, k, v, mask):
  """q [B, T, H, D], k/v [B, S, H, D], mask [B|1, H|1, T, S] -> [B, T, H, D]; rows that see
  nothing give 0."""
  s = jnp.where(mask, jnp.einsum("bthd,bshd->bhts", q, k) * q.shape[-1]**-0.5, -1e30)
  p = jnp.where(mask, jnp.exp(s - jnp.max(s, axis=-1, keepdims=True)), 0.0)
  p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
  return jnp.einsum("bhts,bshd->bthd", p, v)


def _parts(layer: NSA, x):
  """q, k, v (rotated), compressed k / v [B, nc, H, D] (each head's group's) and the
  [T, nc] visibility of the compressed blocks, from the definitions."""
  t, h, hkv, hd = x.shape[1], layer.h, layer.hkv, layer.hd
  l, d = layer.block_size, layer.stride
  split = lambda y: rearrange(y, "b t (h d) -> b t h d", d=hd)
  pos = jnp.arange(t)
  q, k, v = split(layer.q(x)), split(layer.k(x)), split(layer.v(x))
  q, k = rope(q, pos, layer.rope_theta), rope(k, pos, layer.rope_theta)
  k, v = (jnp.repeat(y, h // hkv, axis=2) for y in (k, v))
  nc = max(0, (t - l) // d + 1)
  tok = np.arange(nc)[:, None] * d + np.arange(l)  # [nc, l]: the tokens of block i
  comp = lambda y, w, p: jnp.einsum("bnlhd,lde->bnhe", y[:, tok] + p[...][:, None], w[...])
  kc, vc = comp(k, layer.cmp_k, layer.cmp_k_pos), comp(v, layer.cmp_v, layer.cmp_v_pos)
  seen = (np.arange(nc) * d + l - 1)[None, :] <= np.arange(t)[:, None]  # whole block past
  return q, k, v, kc, vc, seen, tok


@nnx.jit
def _compressed_probs(layer: NSA, x):
  """[B, H, T, nc]: the compressed branch's attention probabilities."""
  q, _, _, kc, _, seen, _ = _parts(layer, x)
  s = jnp.where(seen, jnp.einsum("bthd,bnhd->bhtn", q, kc) * layer.hd**-0.5, -jnp.inf)
  return jnp.where(seen, jax.nn.softmax(s, axis=-1), 0.0)


def selection(layer: NSA, x):
  """[B, H, T, S] bool: the keys of each query's selected blocks, from the compressed
  probabilities (numpy: a loop over queries, a stable argsort)."""
  b, t, h = x.shape[0], x.shape[1], layer.h
  l, d, g, ls = layer.block_size, layer.stride, h // layer.hkv, layer.select_block
  nc = max(0, (t - l) // d + 1)
  tok = np.arange(nc)[:, None] * d + np.arange(l)
  p = np.asarray(_compressed_probs(layer, x)) if nc else np.zeros((b, h, t, 0))
  p = p.reshape(b, h // g, g, t, -1).sum(2)  # summed over each KV group
  ns = -(-t // ls)
  imp = np.zeros((b, h // g, t, ns))
  for i, toks in enumerate(tok):  # each token of block i carries 1/l of its probability
    for j in toks:
      imp[..., j // ls] += p[..., i] / len(toks)
  chosen = np.zeros((b, h // g, t, t), bool)
  for bi, kv, ti in np.ndindex(b, h // g, t):
    score = imp[bi, kv, ti].copy()
    score[ti // ls] = np.inf
    score[np.arange(ns) * ls > ti] = -np.inf
    order = np.argsort(-score, kind="stable")[:layer.n_selected]
    for j in order[score[order] > -np.inf]:
      chosen[bi, kv, ti, j * ls:(j + 1) * ls] = True
  causal = np.tril(np.ones((t, t), bool))
  return np.repeat(chosen, g, axis=1) & causal


def reference(layer: NSA, x, chosen):
  """NSA's forward from the definitions with the selection `chosen` [B, H, T, S] given."""
  q, k, v, kc, vc, seen, _ = _parts(layer, x)
  b, t, h = q.shape[:3]
  tt, ss = np.arange(t)[:, None], np.arange(t)[None, :]
  o_c = _softmax_masked(q, kc, vc, seen[None, None]) if kc.shape[1] else jnp.zeros_like(q)
  o_s = _softmax_masked(q, k, v, chosen)
  o_w = _softmax_masked(q, k, v, ((ss <= tt) & (tt - ss < layer.window))[None, None])
  gt = jax.nn.sigmoid(layer.gate(x).reshape(b, t, h, 3))[..., None]
  o = gt[..., 0, :] * o_c + gt[..., 1, :] * o_s + gt[..., 2, :] * o_w
  return layer.o(rearrange(o, "b t h d -> b t (h d)"))


CASES = {"gqa-ragged": dict(t=19),
         "mha-bigger-blocks": dict(t=23, hkv=4, block_size=6, stride=3, select_block=5,
                                   n_selected=3, window=5),
         "shorter-than-a-block": dict(t=3)}


@pytest.mark.parametrize("name", CASES)
def test_forward_matches_dense_reference(name):
  kw = dict(CASES[name])
  t, hkv = kw.pop("t"), kw.pop("hkv", 2)
  layer = _layer(hkv=hkv, **kw)
  x = jax.random.normal(jax.random.key(3), (2, t, 32))
  got, cache = nnx.jit(lambda m, x: m(x))(layer, x)
  assert cache is None and got.shape == x.shape
  want = nnx.jit(reference)(layer, x, jnp.asarray(selection(layer, x)))
  assert_close(got, want, what=name)


def test_gradients_match_reference_and_are_finite():
  layer = _layer()
  x = jax.random.normal(jax.random.key(4), (2, 13, 32))
  r = jax.random.normal(jax.random.key(5), x.shape)
  graphdef, params = nnx.split(layer, nnx.Param)

  def loss(params, x, fn):
    return jnp.vdot(fn(nnx.merge(graphdef, params), x), r)

  chosen = selection(layer, x)
  grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
  got = grad(params, x, lambda m, x: m(x)[0])
  want = grad(params, x, lambda m, x: reference(m, x, chosen))
  flat_got = dict(jax.tree.leaves_with_path(got))
  for path, g_want in jax.tree.leaves_with_path(want):
    g = flat_got[path]
    name = jax.tree_util.keystr(path)
    assert np.all(np.isfinite(np.asarray(g))), name
    assert np.any(np.asarray(g)), f"zero gradient at {name}"
    assert_close(g, g_want, 1e-4, what=name)


# (T, block_size, stride, H, Hkv): ragged T (not a multiple of the stride), GQA / MHA / MQA,
# block_size - 1 a multiple of the stride or not, T < block_size (no query sees a block)
FOLD = [(37, 8, 4, 4, 2), (23, 5, 3, 6, 2), (50, 32, 16, 4, 1), (5, 8, 4, 2, 2), (9, 1, 1, 2, 1)]


@pytest.mark.parametrize("case", FOLD, ids=str)
def test_compressed_fold_matches_explicit_positions(case):
  """The compressed branch folded into bottom-right causal attention (what the kernels take)
  against the explicit-position path (query t sees key j iff end_j <= t), forward and grads."""
  t, l, d, h, hkv = case
  n = n_compressed(t, l, d)
  keys = iter(jax.random.split(jax.random.key(sum(case)), 3))
  q = jax.random.normal(next(keys), (2, t, h, 16))
  kc, vc = (jax.random.normal(next(keys), (2, n, hkv, 16)) for _ in range(2))
  want = lambda q, k, v: kernels.attention(q, k, v, q_positions=jnp.arange(t),
                                           kv_positions=block_ends(n, l, d), impl="xla")
  got = lambda q, k, v: compressed_attention(q, k, v, l, d, impl="xla")
  compare(got, want, (q, kc, vc), (0, 1, 2), 1e-5, str(case))
  if t < l:  # nothing visible: 0
    assert not np.any(np.asarray(got(q, kc, vc)))


@pytest.mark.parametrize("l,d,sel,n_keys", [(32, 16, 64, 1000), (16, 8, 32, 257), (4, 2, 4, 9),
                                            (30, 16, 64, 700), (8, 8, 64, 130), (32, 12, 64, 500)])
def test_spread_equals_the_overlap_matmul(l, d, sel, n_keys):
  """The strided-slice spread of compressed-block scores over selection blocks equals the
  [N, n_sel] overlap matmul (and is that matmul where sel % d != 0)."""
  n, n_sel = n_compressed(n_keys, l, d), -(-n_keys // sel)
  p = jax.random.uniform(jax.random.key(n_keys), (2, 5, 3, n), jnp.float32)
  want = jnp.einsum("...n,nj->...j", p, overlap(n, n_sel, l, d, sel),
                    precision=jax.lax.Precision.HIGHEST)
  assert_close(spread(p, n_sel, l, d, sel), want, 1e-6, f"l={l} d={d} sel={sel}")


def test_compressed_fold_needs_every_block():
  q, kc = jnp.zeros((1, 40, 2, 8)), jnp.zeros((1, 3, 1, 8))
  with pytest.raises(ValueError, match="fewer than T=40"):
    compressed_attention(q, kc, kc, 8, 4)


@pytest.mark.parametrize("pieces", [[6, 1, 1, 7, 1, 1]], ids=str)
def test_decode_equals_forward(pieces):
  """A prefill, steps, a chunk over a filled cache, steps."""
  layer = _layer()
  x = jax.random.normal(jax.random.key(6), (2, sum(pieces), 32))
  full, _ = nnx.jit(lambda m, x: m(x))(layer, x)
  cache = layer.init_cache(2, 24)
  step = nnx.jit(lambda m, x, c, p: m(x, c, p))
  outs, start = [], 0
  for n in pieces:
    y, cache = step(layer, x[:, start:start + n], cache, jnp.full((2,), start, jnp.int32))
    outs.append(y)
    start += n
  assert_close(jnp.concatenate(outs, axis=1), full, what=str(pieces))
  # The caches hold every key, and every finished block compressed as the definition says.
  t = sum(pieces)
  assert np.all(np.asarray(cache["pos"]) == np.where(np.arange(24) < t, np.arange(24), -1))
  _, _, _, kc, vc, _, _ = nnx.jit(_parts)(layer, x)
  nc, g = kc.shape[1], layer.h // layer.hkv
  assert_close(cache["cmp_k"][:, :nc], kc[:, :, ::g], what="compressed keys")
  assert_close(cache["cmp_v"][:, :nc], vc[:, :, ::g], what="compressed values")
  assert not np.any(np.asarray(cache["cmp_k"][:, nc:])), "unfinished blocks stay empty"


@pytest.mark.slow
def test_rows_at_different_positions_decode_as_alone():
  """generate stacks rows whose caches sit at different positions: each row's step is its own."""
  layer = _layer()
  x = jax.random.normal(jax.random.key(7), (2, 12, 32))
  full, _ = nnx.jit(lambda m, x: m(x))(layer, x)
  step = nnx.jit(lambda m, x, c, p: m(x, c, p))
  cache = layer.init_cache(2, 16)
  _, c0 = step(layer, x[:1, :9], jax.tree.map(lambda a: a[:1], cache), jnp.zeros((1,), jnp.int32))
  _, c1 = step(layer, x[1:, :5], jax.tree.map(lambda a: a[1:], cache), jnp.zeros((1,), jnp.int32))
  both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), c0, c1)
  xs = jnp.stack([x[0, 9], x[1, 5]])[:, None]
  y, _ = step(layer, xs, both, jnp.array([9, 5], jnp.int32))
  assert_close(y[:, 0], jnp.stack([full[0, 9], full[1, 5]]))


def _cfg(**kw):
  base = dict(vocab_size=16, d_model=32, n_layers=2, n_heads=4, mixer="nsa", max_len=32,
              nsa=NSAConfig(**KW))
  return LMConfig(**(base | kw))


@pytest.mark.parametrize("kw,msg", [
    (dict(nsa=NSAConfig(block_size=4, stride=5)), "nsa.stride=5: must be <= nsa.block_size=4"),
    (dict(nsa=NSAConfig(window=0)), "nsa.window=0: must be an int >= 1"),
    (dict(nsa=NSAConfig(n_selected=0)), "nsa.n_selected=0: must be an int >= 1"),
    (dict(nsa=NSAConfig(head_dim=7)), "nsa.head_dim=7: the head dim 7 must be even"),
    (dict(n_heads=3), "n_heads=3: must divide d_model=32"),
])
def test_config_errors(kw, msg):
  with pytest.raises(ValueError, match=msg):
    _cfg(**kw)


def test_validate_rules_and_the_shipped_config():
  import pathlib
  root = pathlib.Path(__file__).resolve().parents[1]
  exp = C.load(root / "configs" / "mqar_nsa.py")
  C.validate(exp)
  with pytest.raises(C.ConfigError, match="data.task='text_bytes': packs documents"):
    C.validate(dataclasses.replace(exp, data=C.DataConfig(task="text_bytes", seq_len=64),
                                   model=dataclasses.replace(exp.model, vocab_size=256)))
  with pytest.raises(C.ConfigError, match="model.short_conv=4: must be 0 with an nsa layer"):
    C.validate(dataclasses.replace(exp, model=dataclasses.replace(exp.model, short_conv=4)))
  with pytest.raises(C.ConfigError, match="mesh.sequence=2: an nsa layer has no sequence-parallel form"):
    C.validate(dataclasses.replace(exp, mesh=C.MeshConfig(sequence=2)), 2)
  assert C.override(exp, ["model.nsa.n_selected=5"]).model.nsa.n_selected == 5
  with pytest.raises(C.ConfigError, match="model.nsa.stride=9: must be <= nsa.block_size=8"):
    C.override(exp, ["model.nsa.stride=9"])
  # The softmax baseline of the README comparison has about nsa's parameters.
  soft = dataclasses.replace(exp.model, mixer="softmax", d_ff=224)
  assert abs(count_params(soft) / count_params(exp.model) - 1) < 0.03


def test_layer_pattern_hybrid_builds_and_limits_length():
  from longax.infer.generate import length_limit
  cfg = _cfg(mixer="gla", layer_pattern=("gla", "nsa"), n_layers=4)
  model = LM(cfg, rngs=nnx.Rngs(0))
  assert [type(b.mixer).__name__ for b in model.blocks] == ["LinearAttention", "NSA"] * 2
  assert length_limit(cfg) == 32 and length_limit(_cfg(mixer="gla", layer_pattern=None)) is None
