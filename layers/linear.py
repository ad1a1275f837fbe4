"""The linear-attention mixer family: one class, the variant is a parameter.

| variant     | feature map        | decay (log, <= 0)                         | extras                     |
|-------------|--------------------|-------------------------------------------|----------------------------|
| `linear`    | identity           | none                                      | output norm                |
| `lightning` | silu               | per head, ALiBi-like slopes -2^(-8(h+1)/H) | output norm, gate          |
| `retnet`    | identity + RoPE    | per head, log(1 - 2^(-5-h)) (multi-scale) | output norm, swish gate    |
| `gla`       | identity           | per key, logsigmoid(low-rank(x)) / 16     | output norm, swish gate    |
| `based`     | 2nd-order Taylor   | none, normalised                          | + sliding-window softmax   |

All call `kernels.linear_attention` (chunked, prefill) or `kernels.linear_attention_step`
(one token); the decode cache is the state [B, H, Dk, Dv] (plus the window cache for based).
short_conv > 0: a causal depthwise conv of that kernel on q, k, v after their projections,
before any feature map (Zoology / Based); its last inputs join the cache.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from longax import kernels
from longax.layers import sequence
from longax.layers.attention import Attention
from longax.layers.cache import positions_of
from longax.layers.common import RMSNorm, ShortConv, conv_each, dense, rope

VARIANTS = ("linear", "lightning", "retnet", "gla", "based")


def taylor_features(x):
  """phi(x) = [1, x, vec(x x^T)/sqrt(2)] of x / d^(1/4): phi(q).phi(k) = 1 + s + s^2/2 with
  s = q.k / sqrt(d), the second-order Taylor expansion of exp(s). x: [..., d] -> [..., 1+d+d^2]."""
  d = x.shape[-1]
  x = x.astype(jnp.float32) * d**-0.25
  outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], d * d) / math.sqrt(2)
  return jnp.concatenate([jnp.ones_like(x[..., :1]), x, outer], axis=-1)


class LinearAttention(nnx.Module):
  """x [B, T, d_model] -> [B, T, d_model]; see the module docstring for the variants."""

  def __init__(self, d_model: int, n_heads: int, *, variant: str = "linear",
               head_dim: int | None = None, feature_dim: int = 16, based_window: int = 64,
               gate_rank: int = 16, gate_norm: float = 16.0, chunk_size: int = 64,
               short_conv: int = 0, max_len: int = 2048, impl: str = "auto", rngs: nnx.Rngs, dtype, param_dtype):
    if variant not in VARIANTS:
      raise ValueError(f"LinearAttention: unknown variant {variant!r}; valid: {VARIANTS}")
    self.variant, self.h = variant, n_heads
    self.hd = head_dim or d_model // n_heads
    self.dk = feature_dim if variant == "based" else self.hd
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.q = dense(d_model, self.h * self.dk, **kw)
    self.k = dense(d_model, self.h * self.dk, **kw)
    self.v = dense(d_model, self.h * self.hd, **kw)
    self.o = dense(self.h * self.hd, d_model, **kw)
    self.conv = (ShortConv(self.h * (2 * self.dk + self.hd), short_conv, rngs=rngs,
                           param_dtype=param_dtype) if short_conv else None)
    self.gate = dense(d_model, self.h * self.hd, **kw) if variant in ("lightning", "retnet", "gla") else None
    self.norm = RMSNorm(self.hd, param_dtype=param_dtype) if variant != "based" else None
    if variant == "gla":
      self.g_down = dense(d_model, gate_rank, **kw)
      self.g_up = dense(gate_rank, self.h * self.dk, bias=True, **kw)
    self.swa = (Attention(d_model, n_heads, window=based_window, max_len=max_len, impl=impl,
                          **kw) if variant == "based" else None)
    self.gate_norm, self.chunk_size, self.impl, self.dtype = gate_norm, chunk_size, impl, dtype

  def _fixed_log_decay(self):
    h = jnp.arange(self.h, dtype=jnp.float32)
    if self.variant == "lightning":
      return -(2.0 ** (-8.0 * (h + 1) / self.h))
    if self.variant == "retnet":
      return jnp.log1p(-(2.0 ** (-5.0 - h)))
    return None

  def init_cache(self, batch: int, max_len: int) -> dict:
    dv = self.hd + (self.variant == "based")
    dk = 1 + self.dk + self.dk**2 if self.variant == "based" else self.dk
    cache = dict(state=jnp.zeros((batch, self.h, dk, dv), jnp.float32))
    if self.swa is not None:
      cache["swa"] = self.swa.init_cache(batch, max_len)
    if self.conv is not None:
      cache["conv"] = self.conv.init_state(batch, self.dtype)
    return cache

  def __call__(self, x, cache=None, pos=0, segment_ids=None):
    """x: [B, T, d_model] at positions pos..pos+T-1; segment_ids [B, T] (no cache) keep
    packed documents apart. Returns (y, new cache or None)."""
    t = x.shape[1]
    split = lambda y, d: rearrange(y, "b t (h d) -> b t h d", d=d)
    conv_state = None if cache is None or self.conv is None else cache["conv"]
    (q, k, v), conv_state = conv_each(self.conv, (self.q(x), self.k(x), self.v(x)), conv_state,
                                      segment_ids)
    q, k, v = split(q, self.dk), split(k, self.dk), split(v, self.hd)
    log_decay, scale = self._fixed_log_decay(), None
    if self.variant == "lightning":
      q, k = jax.nn.silu(q), jax.nn.silu(k)
    elif self.variant == "retnet":
      sp = sequence.active()
      positions = positions_of(pos, t) if sp is None else sp.positions(t)
      q, k = rope(q, positions), rope(k, positions)
    elif self.variant == "gla":
      g = self.g_up(self.g_down(x)).astype(jnp.float32)
      log_decay = split(jax.nn.log_sigmoid(g) / self.gate_norm, self.dk)
    elif self.variant == "based":
      q, k = taylor_features(q).astype(x.dtype), taylor_features(k).astype(x.dtype)
      v = jnp.concatenate([v, jnp.ones_like(v[..., :1])], axis=-1)  # last column: normaliser
      scale = 1.0
    o, state = self._mix(q, k, v, log_decay, scale, cache, segment_ids)
    if self.variant == "based":
      o = (o[..., :-1].astype(jnp.float32) / o[..., -1:].astype(jnp.float32)).astype(x.dtype)
    else:
      o = self.norm(o)
    if self.gate is not None:
      o = o * jax.nn.silu(split(self.gate(x), self.hd))
    y = self.o(rearrange(o, "b t h d -> b t (h d)"))
    new_cache = None if cache is None else dict(cache, state=state)
    if cache is not None and self.conv is not None:
      new_cache["conv"] = conv_state
    if self.swa is not None:
      y_swa, swa_cache = self.swa(x, None if cache is None else cache["swa"], pos, segment_ids)
      y = y + y_swa
      if cache is not None:
        new_cache["swa"] = swa_cache
    return y, new_cache

  def _mix(self, q, k, v, log_decay, scale, cache, segment_ids):
    if cache is not None and q.shape[1] == 1:
      g = log_decay if log_decay is None or log_decay.ndim == 1 else log_decay[:, 0]
      o, state = kernels.linear_attention_step(q[:, 0], k[:, 0], v[:, 0], cache["state"], g,
                                               scale=scale)
      return o[:, None], state
    sp = sequence.active()
    if sp is not None:  # with a cache: a prefill from a fresh state (layers/sequence.py)
      return sp.linear_attention(q, k, v, log_decay, segment_ids, scale=scale,
                                 chunk_size=self.chunk_size, impl=self.impl)
    return kernels.linear_attention(
        q, k, v, log_decay=log_decay, initial_state=None if cache is None else cache["state"],
        segment_ids=segment_ids, scale=scale, chunk_size=self.chunk_size, return_final_state=True, impl=self.impl)
