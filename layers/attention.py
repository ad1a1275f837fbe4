"""Softmax / sigmoid attention mixer: GQA, RoPE, optional QK-norm, sliding window + sinks,
optional short causal conv on q, k, v."""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from longax import kernels
from longax.layers.cache import attend_cached, init_kv_cache, kv_slots, positions_of, write_kv
from longax.layers import sequence, sparse_prefill
from longax.layers.common import RMSNorm, ShortConv, conv_each, gqa_projections, rope

KINDS = ("softmax", "sigmoid")


class Attention(nnx.Module):
  """x [B, T, d_model] -> [B, T, d_model]. `kind` picks softmax or sigmoid (FlashSigmoid)
  attention; a sigmoid mixer's bias is fixed at -log(max_len) unless given, so the full
  forward and decoding use the same one. short_conv > 0: a causal depthwise conv of that
  kernel on q, k and v after their projections (Zoology); its last inputs join the cache."""

  def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, *,
               head_dim: int | None = None, kind: str = "softmax", window: int | None = None,
               sinks: int = 0, qk_norm: bool = False, rope_theta: float = 10000.0,
               softcap: float | None = None, sigmoid_bias: float | None = None,
               short_conv: int = 0, max_len: int = 2048, impl: str = "auto", rngs: nnx.Rngs, dtype, param_dtype):
    if kind not in KINDS:
      raise ValueError(f"Attention: unknown kind {kind!r}; valid: {KINDS}")
    if kind == "sigmoid" and (sinks or softcap):
      raise ValueError("Attention: sigmoid attention takes no `sinks` or `softcap`")
    gqa_projections(self, "Attention", d_model, n_heads, n_kv_heads, head_dim, rngs=rngs,
                    dtype=dtype, param_dtype=param_dtype)
    self.conv = (ShortConv((self.h + 2 * self.hkv) * self.hd, short_conv, rngs=rngs,
                           param_dtype=param_dtype) if short_conv else None)
    self.q_norm = RMSNorm(self.hd, param_dtype=param_dtype) if qk_norm else None
    self.k_norm = RMSNorm(self.hd, param_dtype=param_dtype) if qk_norm else None
    self.kind, self.window, self.sinks, self.max_len = kind, window, sinks, max_len
    self.rope_theta, self.impl, self.dtype = rope_theta, impl, dtype
    self.softcap, self.bias = softcap, None
    if kind == "sigmoid":
      bias = self.bias = -math.log(max_len) if sigmoid_bias is None else sigmoid_bias
      self._attend = functools.partial(kernels.sigmoid_attention, bias=bias, window=window,
                                       impl=impl)
    else:
      self._attend = functools.partial(kernels.attention, window=window, sinks=sinks,
                                       softcap=softcap, impl=impl)

  @property
  def sparse_prefill_ok(self) -> bool:
    """Full softmax attention: what `layers.sparse_prefill` may make sparse."""
    return self.kind == "softmax" and self.window is None and self.softcap is None

  def init_cache(self, batch: int, max_len: int) -> dict:
    slots = kv_slots(max_len, self.window, self.sinks)
    cache = init_kv_cache(batch, slots, self.hkv, self.hd, self.dtype)
    if self.conv is not None:
      cache["conv"] = self.conv.init_state(batch, self.dtype)
    return cache

  def __call__(self, x, cache=None, pos=0, segment_ids=None):
    """x: [B, T, d_model]; with a cache, x holds the tokens at positions pos..pos+T-1;
    segment_ids [B, T] (no cache) keep packed documents apart. Returns (y, new cache).
    Inside a sequence-parallel context a cache is taken as fresh: a prefill from 0."""
    t = x.shape[1]
    conv_state = None if cache is None or self.conv is None else cache["conv"]
    qkv, conv_state = conv_each(self.conv, (self.q(x), self.k(x), self.v(x)), conv_state,
                                segment_ids)
    q, k, v = (rearrange(y, "b t (h d) -> b t h d", d=self.hd) for y in qkv)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    sp = sequence.active()
    positions = positions_of(pos, t) if sp is None else sp.positions(t)
    q, k = rope(q, positions, self.rope_theta), rope(k, positions, self.rope_theta)
    if sp is not None:
      o = self._attend_sp(sp, q, k, v, segment_ids)
      if cache is not None:  # the zigzag order needs no undoing: slots follow positions
        cache = write_kv(cache, k, v, positions, self.sinks)
    elif cache is None:
      if self.sparse_prefill_ok:
        sparse_prefill.record(q, k, v)
      o = self._attend(q, k, v, segment_ids=segment_ids)
    elif t > 1 and self.sparse_prefill_ok and (plan := sparse_prefill.take()) is not None:
      # A sparse prefill of a whole prompt into a fresh cache: the same K/V are written.
      plan, heads = plan
      o = sparse_prefill.attend(q, k, v, plan.kind, heads, plan.budget, plan.block,
                                plan.last_q, impl=self.impl, summary=plan.summary)
      cache = write_kv(cache, k, v, positions, self.sinks)
    else:
      o, cache = attend_cached(self._attend, q, k, v, cache, positions, self.sinks)
    if cache is not None and self.conv is not None:
      cache = dict(cache, conv=conv_state)
    return self.o(rearrange(o, "b t h d -> b t (h d)")), cache

  def _attend_sp(self, sp, q, k, v, segment_ids):
    if self.sinks or self.softcap is not None:
      raise ValueError("Attention: sequence parallelism takes no sinks or softcap")
    return sp.attend(q, k, v, segment_ids, kind=self.kind, window=self.window,
                        bias=self.bias, impl=self.impl)
