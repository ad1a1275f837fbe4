"""LM: exact decoding for every mixer, hybrids, dtypes, gradients, fitting a batch."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import assert_close
from longax.models import (MIXERS, LM, AttentionConfig, LinearConfig, LMConfig, Mamba2Config,
                           MambaConfig, NSAConfig, count_params, flops_per_token, state_size)

T, V = 20, 40


def tiny(mixer, **kw):
  base = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mixer=mixer,
              max_len=32, d_ff=64, linear=LinearConfig(feature_dim=4, based_window=5, chunk_size=8),
              mamba=MambaConfig(d_state=4, chunk_size=8),
              mamba2=Mamba2Config(d_state=8, head_dim=16, chunk_size=8),
              nsa=NSAConfig(block_size=4, stride=2, select_block=4, n_selected=2, window=4))
  base.update(kw)
  return LMConfig(**base)


CONFIGS = {m: tiny(m) for m in MIXERS}
CONFIGS["softmax-window-sinks"] = tiny("softmax", attention=AttentionConfig(window=4, sinks=2))
CONFIGS["sigmoid-window-qknorm"] = tiny("sigmoid", attention=AttentionConfig(window=5, qk_norm=True))
CONFIGS["hybrid"] = tiny("mamba2", n_layers=3, layer_pattern=("mamba2", "gla", "softmax"))
CONFIGS["hybrid-all"] = tiny("softmax", n_layers=len(MIXERS), layer_pattern=MIXERS)
CONFIGS["conv"] = tiny("softmax", n_layers=3, layer_pattern=("softmax", "based", "gla"),
                       short_conv=3, attention=AttentionConfig(window=5))  # q, k, v short conv


def _tokens(seed=1, b=2, t=T):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, V)


# One jitted decode for every call: it compiles once per model structure and piece length.
_decode = nnx.jit(lambda m, x, c: m.decode(x, c))
# The full forward, jitted: run eagerly, each of its ops compiles on its own (NSA's many small
# ops: ~10 s a model).
_forward = nnx.jit(lambda m, x: m(x))


def _decode_pieces(model, tokens, pieces):
  cache = model.init_cache(tokens.shape[0], 32)
  outs, start = [], 0
  for n in pieces:
    logits, cache = _decode(model, tokens[:, start:start + n], cache)
    outs.append(logits)
    start += n
  return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("name", CONFIGS)
def test_prefill_then_steps_equals_forward(name):
  model = LM(CONFIGS[name], rngs=nnx.Rngs(0))
  tokens = _tokens()
  full = _forward(model, tokens)
  assert full.shape == (2, T, V) and full.dtype == jnp.float32
  # A prefill of 9 (past a chunk of 8), then single steps past every window.
  got, cache = _decode_pieces(model, tokens, [9] + [1] * (T - 9))
  assert_close(got, full, what=name)
  assert np.all(np.asarray(cache["pos"]) == T)
  # Chunked prefill in two pieces (the second longer than any window) equals one piece.
  # (The first piece is the step run's prefill: one compile fewer.)
  two, _ = _decode_pieces(model, tokens, [9, T - 9])
  one, _ = _decode_pieces(model, tokens, [T])
  assert_close(two, one, what=f"{name} two pieces")
  assert_close(one, full, what=f"{name} one piece")


@pytest.mark.parametrize("name", ["softmax", "gla", "mamba", "mamba2", "based", "hybrid"])
def test_bf16_compute_f32_params_and_grads(name):
  cfg = dataclasses.replace(CONFIGS[name], dtype="bfloat16")
  model = LM(cfg, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  tokens = _tokens()
  logits = _forward(model, tokens)
  assert logits.shape == (2, T, V) and logits.dtype == jnp.float32
  f32 = LM(dataclasses.replace(cfg, dtype="float32"), rngs=nnx.Rngs(0))
  assert_close(logits, _forward(f32, tokens), 0.05, what="bf16 vs f32 compute")
  dec, _ = _decode_pieces(model, tokens, [7] + [1] * (T - 7))
  assert_close(dec, logits, 0.05, what="bf16 decode")

  def loss(m):
    lg = m(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(lg, tokens[:, 1:]).mean()

  grads = nnx.jit(nnx.grad(loss))(model)  # (eagerly: ~3-8 s of op-by-op compiles)
  leaves = jax.tree.leaves_with_path(nnx.state(grads, nnx.Param))
  for path, g in leaves:
    g = np.asarray(g, np.float32)
    assert np.all(np.isfinite(g)), f"non-finite gradient at {jax.tree_util.keystr(path)}"
  dead = [jax.tree_util.keystr(p) for p, g in leaves if not np.any(np.asarray(g))]
  assert not dead, f"parameters with zero gradient: {dead}"


@pytest.mark.parametrize("name", list(MIXERS) + ["hybrid"])
def test_tiny_model_fits_a_fixed_batch(name):
  model = LM(CONFIGS[name], rngs=nnx.Rngs(0))
  tokens = _tokens(seed=3, b=4, t=16)
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    def loss(m):
      lg = m(tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(lg, tokens[:, 1:]).mean()
    value, grads = nnx.value_and_grad(loss)(model)
    opt.update(model, grads)
    return value

  losses = [float(step(model, opt)) for _ in range(80)]
  assert losses[-1] < 0.3 * losses[0], f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_config_errors():
  with pytest.raises(ValueError, match="unknown mixer 'mamba3'; valid: softmax, sigmoid"):
    tiny("mamba3")
  with pytest.raises(ValueError, match="unknown mixer 'rwkv'"):
    tiny("softmax", layer_pattern=("softmax", "rwkv"))
  with pytest.raises(ValueError, match="LMConfig: n_kv_heads=3: must divide n_heads=4"):
    tiny("softmax", n_kv_heads=3)
  with pytest.raises(ValueError, match="LMConfig: vocab_size=0: must be an int >= 1$"):
    tiny("softmax", vocab_size=0)
  with pytest.raises(ValueError, match=r"attention.window=0: must be an int >= 1 or none"):
    tiny("softmax", attention=AttentionConfig(window=0))
  with pytest.raises(ValueError, match=r"mixer='gla': is not in layer_pattern=\('softmax',\)"):
    tiny("gla", layer_pattern=("softmax",))
  with pytest.raises(ValueError, match="LMConfig: short_conv=-1: must be an int >= 0$"):
    tiny("softmax", short_conv=-1)


def test_conv_reach():
  """The reach sequence-parallel chunks must hold: the widest short conv the layers use."""
  assert tiny("softmax").conv_reach == 0 and tiny("softmax", short_conv=3).conv_reach == 2
  assert tiny("mamba", short_conv=6).conv_reach == 3  # mamba.d_conv=4; short_conv unused
  assert tiny("mamba", n_layers=2, layer_pattern=("mamba", "gla"), short_conv=6).conv_reach == 5


def test_layer_pattern_repeats():
  cfg = tiny("softmax", n_layers=5, layer_pattern=("mamba2", "softmax"))
  assert cfg.layer_mixers == ("mamba2", "softmax", "mamba2", "softmax", "mamba2")
  model = LM(cfg, rngs=nnx.Rngs(0))
  assert [type(b.mixer).__name__ for b in model.blocks] == ["Mamba2", "Attention"] * 2 + ["Mamba2"]


def test_counts():
  for name in ("softmax", "mamba", "hybrid"):
    cfg = CONFIGS[name]
    model = LM(cfg, rngs=nnx.Rngs(0))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert count_params(cfg) == n
  # KV caches grow with context; recurrent states don't; a window bounds the cache.
  sm, lin = CONFIGS["softmax"], CONFIGS["gla"]
  assert state_size(sm, 32) == 2 * state_size(sm, 16) == 2 * 2 * 2 * 8 * 16 * 4 * 2
  assert state_size(lin, 32) == state_size(lin, 16) == 2 * 4 * 8 * 8 * 4
  win = CONFIGS["softmax-window-sinks"]
  assert state_size(win, 32) == state_size(win, 8) < state_size(sm, 32)
  assert flops_per_token(sm, 32) > flops_per_token(sm, 16) > 6 * count_params(sm, embeddings=False)
  assert flops_per_token(lin, 32) == flops_per_token(lin, 16)


def test_layer_errors():
  from longax.layers import Attention, LinearAttention, Mamba2
  kw = dict(rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
  with pytest.raises(ValueError, match="unknown kind 'cosine'"):
    Attention(32, 4, kind="cosine", **kw)
  with pytest.raises(ValueError, match="sigmoid attention takes no `sinks`"):
    Attention(32, 4, kind="sigmoid", window=4, sinks=2, **kw)
  with pytest.raises(ValueError, match="n_heads=4 is not a multiple of n_kv_heads=3"):
    Attention(32, 4, 3, **kw)
  with pytest.raises(ValueError, match="unknown variant 'rwkv'; valid"):
    LinearAttention(32, 4, variant="rwkv", **kw)
  with pytest.raises(ValueError, match="not a multiple of head_dim=24"):
    Mamba2(32, head_dim=24, **kw)


@pytest.mark.parametrize("name", ["softmax-window", "sigmoid", "based", "gla", "retnet",
                                  "mamba", "mamba2", "hybrid", "conv"])
def test_packed_row_equals_documents(name):
  """(Sinks are absolute positions, so a packed row with sinks is not document-exact.)"""
  cfg = tiny("softmax", attention=AttentionConfig(window=4)) if name == "softmax-window" else CONFIGS[name]
  model = LM(cfg, rngs=nnx.Rngs(0))
  tokens = _tokens(seed=5, b=1)
  seg = jnp.array([[0] * 6 + [1] * 9 + [2] * 5])
  forward = nnx.jit(lambda m, x, s: m(x, segment_ids=s))  # (eagerly: every op compiles per length)
  packed = forward(model, tokens, seg)
  for lo, hi in ((0, 6), (6, 15), (15, 20)):
    assert_close(packed[:, lo:hi], forward(model, tokens[:, lo:hi], None),
                 what=f"{name} doc {lo}:{hi}")
