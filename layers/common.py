"""Shared parts: RMSNorm, SwiGLU MLP, rotary embeddings, short causal depthwise conv."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def dense(d_in: int, d_out: int, *, rngs: nnx.Rngs, dtype, param_dtype, bias: bool = False,
          std: float | None = None) -> nnx.Linear:
  """A linear layer; `std` overrides the default fan-in init with a normal of that std."""
  init = (nnx.initializers.lecun_normal() if std is None
          else nnx.initializers.normal(stddev=std))
  return nnx.Linear(d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=init, rngs=rngs)


def gqa_projections(m: nnx.Module, name: str, d_model: int, n_heads: int,
                    n_kv_heads: int | None, head_dim: int | None, **kw) -> None:
  """Sets m.h, m.hkv, m.hd and grouped-query attention's q, k, v, o projections (H query
  heads sharing Hkv key/value heads); a bad head split is one ValueError naming `name`."""
  n_kv_heads = n_kv_heads or n_heads
  if n_heads % n_kv_heads:
    raise ValueError(f"{name}: n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
  m.h, m.hkv = n_heads, n_kv_heads
  m.hd = head_dim or d_model // n_heads
  m.q = dense(d_model, m.h * m.hd, **kw)
  m.k = dense(d_model, m.hkv * m.hd, **kw)
  m.v = dense(d_model, m.hkv * m.hd, **kw)
  m.o = dense(m.h * m.hd, d_model, **kw)


class RMSNorm(nnx.Module):
  """x / rms(x) * scale over the last axis (statistics in float32)."""

  def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class SwiGLU(nnx.Module):
  """down(silu(gate(x)) * up(x))."""

  def __init__(self, d_model: int, d_ff: int, *, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.gate = dense(d_model, d_ff, **kw)
    self.up = dense(d_model, d_ff, **kw)
    self.down = dense(d_ff, d_model, **kw)

  def __call__(self, x):
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


def rope(x, positions, theta: float = 10000.0):
  """Rotary embedding (half-split convention). x: [B, T, H, D]; positions: [T] or [B, T]."""
  d = x.shape[-1]
  freqs = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2 / d)  # [D/2]
  angles = positions.astype(jnp.float32)[..., None] * freqs  # [(B,) T, D/2]
  cos, sin = jnp.cos(angles)[..., None, :], jnp.sin(angles)[..., None, :]  # [(B,) T, 1, D/2]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class ShortConv(nnx.Module):
  """Causal depthwise conv over time with kernel K. Decode state: the last K-1 inputs."""

  def __init__(self, channels: int, kernel: int, *, rngs, param_dtype, bias: bool = True):
    bound = kernel**-0.5
    self.weight = nnx.Param(jax.random.uniform(rngs.params(), (kernel, channels), param_dtype,
                                               -bound, bound))
    self.bias = nnx.Param(jnp.zeros((channels,), param_dtype)) if bias else None
    self.kernel = kernel

  def init_state(self, batch: int, dtype):
    return jnp.zeros((batch, self.kernel - 1, self.weight.shape[1]), dtype)

  def __call__(self, x, state=None, segment_ids=None):
    """x: [B, T, C]; state: [B, K-1, C] or None (zeros); segment_ids [B, T]: taps never
    reach into another document. Returns (y, new state). Under sequence parallelism each
    device's left context comes from the previous shard; a state is taken as fresh (zeros:
    a prefill) and the new one is the last K-1 inputs, None without a state."""
    from longax.layers import sequence
    b, t, c = x.shape
    k = self.kernel
    w = self.weight[...]
    bias = () if self.bias is None else (self.bias[...],)
    sp = sequence.active() if k > 1 else None
    if sp is not None:
      y = sp.conv(causal_conv, x, segment_ids, k - 1, (w, *bias))
      if state is None:
        return y, None
      tail = sp.last_tokens(x, min(k - 1, t))
      return y, jnp.concatenate([jnp.zeros_like(state, x.dtype), tail], axis=1)[:, -(k - 1):]
    if state is None:
      state = jnp.zeros((b, k - 1, c), x.dtype)
    state_seg = None if segment_ids is None else jnp.full((b, k - 1), -1, segment_ids.dtype)
    y = causal_conv(x, state, segment_ids, state_seg, w, *bias)
    return y, jnp.concatenate([state.astype(x.dtype), x], axis=1)[:, t:]


def conv_each(conv: ShortConv | None, xs: tuple, state=None, segment_ids=None):
  """xs (q, k, v: [B, T, C_i]) through one ShortConv over their channels side by side;
  returns (the convolved xs, its new state). conv None: (xs, state) unchanged."""
  if conv is None:
    return xs, state
  y, state = conv(jnp.concatenate(xs, axis=-1), state, segment_ids)
  sizes = [x.shape[-1] for x in xs]
  splits = [sum(sizes[:i + 1]) for i in range(len(xs) - 1)]
  return tuple(jnp.split(y, splits, axis=-1)), state


def causal_conv(x, state, segment_ids, state_segment_ids, w, bias=None):
  """Depthwise causal conv: x [B, T, C] after state [B, K-1, C] (the inputs before it), w
  [K, C], bias [C]; with segment_ids [B, T] and state_segment_ids [B, K-1], a tap only reads
  an input of its own document. Returns y [B, T, C] in x's dtype (float32 math)."""
  t, k = x.shape[1], w.shape[0]
  xp = jnp.concatenate([state.astype(x.dtype), x], axis=1)  # [B, K-1+T, C]
  w = w.astype(jnp.float32)
  taps = [xp[:, i:i + t].astype(jnp.float32) for i in range(k)]
  if segment_ids is not None:
    sp = jnp.concatenate([state_segment_ids, segment_ids], axis=1)
    taps = [x_i * (sp[:, i:i + t] == segment_ids)[..., None] for i, x_i in enumerate(taps)]
  y = sum(x_i * w[i] for i, x_i in enumerate(taps))
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(x.dtype)
