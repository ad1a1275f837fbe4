"""The language model: embeddings, pre-norm blocks (mixer + SwiGLU), final norm, LM head.

    model = LM(cfg, rngs=nnx.Rngs(0))
    logits = model(tokens)                          # [B, T] -> [B, T, V] float32
    cache = model.init_cache(batch, max_len)
    logits, cache = model.decode(tokens, cache)     # t > 1: chunked prefill, t == 1: steps

The model never branches on the mixer kind: every mixer has `init_cache` and
`mixer(x, cache, pos) -> (y, cache)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from longax.layers import NSA, Attention, LinearAttention, Mamba, Mamba2, RMSNorm, SwiGLU
from longax.models.config import LMConfig


def build_mixer(name: str, cfg: LMConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
  """One mixer of `cfg` by name (see `config.MIXERS`)."""
  kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, impl=cfg.impl)
  if name in ("softmax", "sigmoid"):
    a = cfg.attention
    return Attention(cfg.d_model, cfg.n_heads, cfg.kv_heads, head_dim=a.head_dim, kind=name,
                     window=a.window, sinks=a.sinks, qk_norm=a.qk_norm,
                     rope_theta=a.rope_theta, softcap=a.softcap, sigmoid_bias=a.sigmoid_bias,
                     short_conv=cfg.short_conv, max_len=cfg.max_len, **kw)
  if name in ("linear", "based", "gla", "retnet", "lightning"):
    lc = cfg.linear
    return LinearAttention(cfg.d_model, cfg.n_heads, variant=name, head_dim=lc.head_dim,
                           feature_dim=lc.feature_dim, based_window=lc.based_window,
                           gate_rank=lc.gate_rank, gate_norm=lc.gate_norm,
                           chunk_size=lc.chunk_size, short_conv=cfg.short_conv, max_len=cfg.max_len,
                           **kw)
  if name == "mamba":
    m = cfg.mamba
    return Mamba(cfg.d_model, d_state=m.d_state, d_conv=m.d_conv, expand=m.expand,
                 dt_rank=m.dt_rank, dt_min=m.dt_min, dt_max=m.dt_max,
                 chunk_size=m.chunk_size, **kw)
  if name == "mamba2":
    m = cfg.mamba2
    return Mamba2(cfg.d_model, d_state=m.d_state, d_conv=m.d_conv, expand=m.expand,
                  head_dim=m.head_dim, n_groups=m.n_groups, dt_min=m.dt_min,
                  dt_max=m.dt_max, chunk_size=m.chunk_size, **kw)
  if name == "nsa":
    n = cfg.nsa
    return NSA(cfg.d_model, cfg.n_heads, cfg.kv_heads, head_dim=n.head_dim,
               block_size=n.block_size, stride=n.stride, select_block=n.select_block,
               n_selected=n.n_selected, window=n.window, rope_theta=n.rope_theta, **kw)
  raise ValueError(f"unknown mixer {name!r}")  # LMConfig validated the names already


class Block(nnx.Module):
  """x + mixer(norm(x)), then x + mlp(norm(x)) when d_ff > 0."""

  def __init__(self, name: str, cfg: LMConfig, *, rngs, dtype, param_dtype):
    self.norm1 = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype)
    self.mixer = build_mixer(name, cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    has_mlp = cfg.ff_dim > 0
    self.norm2 = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype) if has_mlp else None
    self.mlp = (SwiGLU(cfg.d_model, cfg.ff_dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                if has_mlp else None)

  def __call__(self, x, cache=None, pos=0, segment_ids=None):
    y, cache = self.mixer(self.norm1(x), cache, pos, segment_ids=segment_ids)
    x = x + y
    if self.mlp is not None:
      x = x + self.mlp(self.norm2(x))
    return x, cache


ONE_HOT_VOCAB = 4096  # embeddings of vocabularies up to this size: a one-hot matmul


class LM(nnx.Module):
  def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=param_dtype,
                           embedding_init=nnx.initializers.normal(stddev=1.0), rngs=rngs)
    self.blocks = nnx.List([Block(name, cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                            for name in cfg.layer_mixers])
    self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype)
    self.head = None if cfg.tie_embeddings else nnx.Linear(
        cfg.d_model, cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nnx.initializers.normal(stddev=cfg.d_model**-0.5), rngs=rngs)

  def _embed(self, tokens):
    """tokens [B, T] -> [B, T, D]. A small vocabulary is looked up as a one-hot matmul: the
    gather's gradient is a scatter-add whose rows collide (a byte vocabulary: ~128 tokens per
    row at 32k tokens), measured at 16% of a hybrid_350m step on an H100 (NOTES.md)."""
    if self.cfg.vocab_size > ONE_HOT_VOCAB:
      return self.embed(tokens)
    table = self.embed.embedding.get_value()
    dtype = self.embed.dtype or table.dtype
    table = table.astype(dtype)
    one_hot = jax.nn.one_hot(tokens, self.cfg.vocab_size, dtype=dtype)
    return jnp.dot(one_hot, table, preferred_element_type=jnp.float32).astype(dtype)

  def _logits(self, x):
    x = self.norm(x)
    logits = self.embed.attend(x) if self.head is None else self.head(x)
    return logits.astype(jnp.float32)

  def __call__(self, tokens, segment_ids=None, remat: bool = False):
    """tokens [B, T] int -> logits [B, T, V] float32. segment_ids [B, T]: packed documents
    that never see each other (each row computes what its documents would one by one).
    remat: recompute each block's activations in the backward pass."""
    run = lambda block, x, seg: block(x, segment_ids=seg)[0]
    if remat:
      run = nnx.remat(run)
    x = self._embed(tokens)
    for block in self.blocks:
      x = run(block, x, segment_ids)
    return self._logits(x)

  def init_cache(self, batch: int, max_len: int | None = None) -> dict:
    """The decode state for `batch` rows of up to `max_len` tokens (default cfg.max_len).

    max_len is the positions a full attention KV cache holds; a windowed one holds
    min(max_len, sinks + window) slots and linear / SSM states ignore it. Decoding past a
    full cache's max_len is not checked here (inside jit): its ring would wrap and forget
    the oldest tokens. `infer.generate` checks lengths before it starts."""
    max_len = max_len or self.cfg.max_len
    return dict(pos=jnp.zeros((batch,), jnp.int32),
                layers=[block.mixer.init_cache(batch, max_len) for block in self.blocks])

  def decode(self, tokens, cache: dict, *, logits_at: int | None = None):
    """Feeds tokens [B, t] that follow the cache (each row at its own position,
    cache["pos"] [B]); returns (logits [B, t, V], new cache). `logits_at`: only token
    logits_at's logits, [B, 1, V] (a long prefill needs no [B, t, V])."""
    pos = cache["pos"]
    x = self._embed(tokens)
    layers = []
    for block, layer_cache in zip(self.blocks, cache["layers"]):
      x, layer_cache = block(x, layer_cache, pos)
      layers.append(layer_cache)
    if logits_at is not None:
      x = jax.lax.slice_in_dim(x, logits_at, logits_at + 1, axis=1)
    return self._logits(x), dict(pos=pos + tokens.shape[1], layers=layers)


def _abstract(cfg: LMConfig) -> LM:
  return nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0)))


def count_params(cfg: LMConfig, *, embeddings: bool = True) -> int:
  """Number of parameters (without building them)."""
  model = _abstract(cfg)
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  if not embeddings:
    n -= cfg.vocab_size * cfg.d_model
  return int(n)


def state_size(cfg: LMConfig, seq_len: int | None = None) -> int:
  """Bytes of decode state for one sequence after `seq_len` tokens (default cfg.max_len):
  the KV cache of attention layers (all positions, or sinks + window) plus the fixed
  recurrent states of linear / SSM layers. Zoology plots recall against this."""
  seq_len = seq_len or cfg.max_len
  model = _abstract(cfg)
  cache = jax.eval_shape(lambda: model.init_cache(1, seq_len))
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache["layers"])
                 if jnp.issubdtype(x.dtype, jnp.floating)))


def flops_per_token(cfg: LMConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward = 3x forward), for MFU.

  6 * (parameters outside the embedding lookup) for the matmuls, plus each mixer's
  sequence term: causal attention 6 * 2 * H * Dh * ctx (ctx = seq_len or the window; the
  FlashAttention count 4*T*S*D, halved for causality), chunked linear attention
  6 * 2 * H * (C * (Dk + Dv) / 2 + 2 * Dk * Dv) with chunk C, and the SSM scans
  6 * 3 * (state elements per token).
  """
  total = 6.0 * count_params(cfg, embeddings=cfg.tie_embeddings)
  hd = cfg.attention.head_dim or cfg.d_model // cfg.n_heads
  for name in cfg.layer_mixers:
    if name in ("softmax", "sigmoid") or name == "based":
      window = cfg.linear.based_window if name == "based" else cfg.attention.window
      ctx = min(seq_len, window or seq_len)
      total += 6 * 2 * cfg.n_heads * hd * ctx
    if name in ("linear", "based", "gla", "retnet", "lightning"):
      lhd = cfg.linear.head_dim or cfg.d_model // cfg.n_heads
      dk = 1 + cfg.linear.feature_dim + cfg.linear.feature_dim**2 if name == "based" else lhd
      c = cfg.linear.chunk_size
      total += 6 * 2 * cfg.n_heads * (c * (dk + lhd) / 2 + 2 * dk * lhd)
    if name == "nsa":  # compressed keys, selected blocks and the window, each causal-capped
      n, nhd = cfg.nsa, cfg.nsa.head_dim or cfg.d_model // cfg.n_heads
      ctx = (max(0, seq_len - n.block_size) // n.stride + 1 + min(seq_len, n.n_selected * n.select_block)
             + min(seq_len, n.window))
      total += 6 * 2 * cfg.n_heads * nhd * ctx
    if name == "mamba":
      total += 6 * 3 * cfg.mamba.expand * cfg.d_model * cfg.mamba.d_state
    if name == "mamba2":
      m = cfg.mamba2
      total += 6 * 3 * m.expand * cfg.d_model * m.d_state
  return total
