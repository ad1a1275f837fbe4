"""State-space mixers: Mamba-1 (selective scan) and Mamba-2 (SSD) blocks.

Initialisation follows the papers: A_log = log(1..N) per channel (Mamba-1) or log U[1, 16]
per head (Mamba-2); dt bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max]; D = 1.
Decode cache: the short conv's last K-1 inputs and the SSM state.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from longax import kernels
from longax.layers import sequence
from longax.layers.common import RMSNorm, ShortConv, dense


def _dt_bias(key, n: int, dt_min: float, dt_max: float, floor: float = 1e-4):
  """softplus^-1 of dt ~ log-uniform[dt_min, dt_max] (Mamba's dt initialisation)."""
  u = jax.random.uniform(key, (n,))
  dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)), floor)
  return dt + jnp.log(-jnp.expm1(-dt))


class Mamba(nnx.Module):
  """Mamba-1 block: in-proj to (x, z), causal depthwise conv + silu on x, selective scan with
  data-dependent dt, B, C, gated by silu(z), out-proj."""

  def __init__(self, d_model: int, *, d_state: int = 16, d_conv: int = 4, expand: int = 2,
               dt_rank: int | None = None, dt_min: float = 1e-3, dt_max: float = 0.1,
               chunk_size: int = 64, impl: str = "auto", rngs: nnx.Rngs, dtype, param_dtype):
    d_inner = expand * d_model
    self.d_inner, self.n = d_inner, d_state
    self.dt_rank = dt_rank or math.ceil(d_model / 16)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.in_proj = dense(d_model, 2 * d_inner, **kw)
    self.conv = ShortConv(d_inner, d_conv, rngs=rngs, param_dtype=param_dtype)
    self.x_proj = dense(d_inner, self.dt_rank + 2 * d_state, **kw)
    self.dt_proj = dense(self.dt_rank, d_inner, std=self.dt_rank**-0.5, **kw)
    self.dt_bias = nnx.Param(_dt_bias(rngs.params(), d_inner, dt_min, dt_max).astype(param_dtype))
    a = jnp.broadcast_to(jnp.arange(1, d_state + 1, dtype=jnp.float32), (d_inner, d_state))
    self.A_log = nnx.Param(jnp.log(a).astype(param_dtype))
    self.D = nnx.Param(jnp.ones((d_inner,), param_dtype))
    self.out_proj = dense(d_inner, d_model, **kw)
    self.chunk_size, self.impl, self.dtype = chunk_size, impl, dtype

  def init_cache(self, batch: int, max_len: int) -> dict:
    del max_len  # constant-size state
    return dict(conv=self.conv.init_state(batch, self.dtype),
                ssm=jnp.zeros((batch, self.d_inner, self.n), jnp.float32))

  def __call__(self, x, cache=None, pos=0, segment_ids=None):
    del pos
    xi, z = jnp.split(self.in_proj(x), 2, axis=-1)
    xi, conv_state = self.conv(xi, None if cache is None else cache["conv"], segment_ids)
    xi = jax.nn.silu(xi)
    dt, b, c = jnp.split(self.x_proj(xi), [self.dt_rank, self.dt_rank + self.n], axis=-1)
    dt = self.dt_proj(dt)
    a = -jnp.exp(self.A_log[...].astype(jnp.float32))
    kw = dict(D=self.D[...], delta_bias=self.dt_bias[...], delta_softplus=True)
    if cache is not None and x.shape[1] == 1:
      y, h = kernels.selective_scan_step(xi[:, 0], dt[:, 0], a, b[:, 0], c[:, 0], cache["ssm"],
                                         z_t=z[:, 0], **kw)
      y = y[:, None]
    elif sequence.active() is not None:  # with a cache: a prefill from a fresh state
      y, h = sequence.active().selective_scan(xi, dt, a, b, c, z, kw["D"], kw["delta_bias"],
                                              segment_ids, delta_softplus=True,
                                              chunk_size=self.chunk_size, impl=self.impl)
    else:
      y, h = kernels.selective_scan(xi, dt, a, b, c, z=z, return_final_state=True,
                                    segment_ids=segment_ids,
                                    initial_state=None if cache is None else cache["ssm"],
                                    chunk_size=self.chunk_size, impl=self.impl, **kw)
    new_cache = None if cache is None else dict(conv=conv_state, ssm=h)
    return self.out_proj(y), new_cache


class Mamba2(nnx.Module):
  """Mamba-2 block: in-proj to (z, x, B, C, dt), causal conv + silu on (x, B, C), SSD with a
  scalar decay per head, gated RMSNorm(y * silu(z)), out-proj."""

  def __init__(self, d_model: int, *, d_state: int = 64, d_conv: int = 4, expand: int = 2,
               head_dim: int = 64, n_groups: int = 1, dt_min: float = 1e-3,
               dt_max: float = 0.1, chunk_size: int = 64, impl: str = "auto",
               rngs: nnx.Rngs, dtype, param_dtype):
    d_inner = expand * d_model
    if d_inner % head_dim:
      raise ValueError(f"Mamba2: expand*d_model={d_inner} is not a multiple of head_dim={head_dim}")
    self.h, self.p, self.g, self.n = d_inner // head_dim, head_dim, n_groups, d_state
    if self.h % n_groups:
      raise ValueError(f"Mamba2: heads={self.h} is not a multiple of n_groups={n_groups}")
    self.d_inner = d_inner
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    conv_dim = d_inner + 2 * n_groups * d_state
    self.in_proj = dense(d_model, d_inner + conv_dim + self.h, **kw)
    self.conv = ShortConv(conv_dim, d_conv, rngs=rngs, param_dtype=param_dtype)
    self.dt_bias = nnx.Param(_dt_bias(rngs.params(), self.h, dt_min, dt_max).astype(param_dtype))
    a = jax.random.uniform(rngs.params(), (self.h,), jnp.float32, 1.0, 16.0)
    self.A_log = nnx.Param(jnp.log(a).astype(param_dtype))
    self.D = nnx.Param(jnp.ones((self.h,), param_dtype))
    self.norm = RMSNorm(d_inner, param_dtype=param_dtype)
    self.out_proj = dense(d_inner, d_model, **kw)
    self.chunk_size, self.impl, self.dtype = chunk_size, impl, dtype

  def init_cache(self, batch: int, max_len: int) -> dict:
    del max_len
    return dict(conv=self.conv.init_state(batch, self.dtype),
                ssm=jnp.zeros((batch, self.h, self.p, self.n), jnp.float32))

  def __call__(self, x, cache=None, pos=0, segment_ids=None):
    del pos
    gn = self.g * self.n
    z, xbc, dt = jnp.split(self.in_proj(x), [self.d_inner, 2 * self.d_inner + 2 * gn], axis=-1)
    xbc, conv_state = self.conv(xbc, None if cache is None else cache["conv"], segment_ids)
    xs, b, c = jnp.split(jax.nn.silu(xbc), [self.d_inner, self.d_inner + gn], axis=-1)
    xs = rearrange(xs, "b t (h p) -> b t h p", p=self.p)
    b = rearrange(b, "b t (g n) -> b t g n", n=self.n)
    c = rearrange(c, "b t (g n) -> b t g n", n=self.n)
    dt = jax.nn.softplus(dt.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))
    a = -jnp.exp(self.A_log[...].astype(jnp.float32))
    if cache is not None and x.shape[1] == 1:
      y, h = kernels.ssd_step(xs[:, 0], dt[:, 0], a, b[:, 0], c[:, 0], cache["ssm"],
                              D=self.D[...])
      y = y[:, None]
    elif sequence.active() is not None:  # with a cache: a prefill from a fresh state
      y, h = sequence.active().ssd(xs, dt, a, b, c, self.D[...], segment_ids,
                                   chunk_size=self.chunk_size, impl=self.impl)
    else:
      y, h = kernels.ssd(xs, dt, a, b, c, D=self.D[...], return_final_state=True,
                         segment_ids=segment_ids,
                         initial_state=None if cache is None else cache["ssm"],
                         chunk_size=self.chunk_size, impl=self.impl)
    y = rearrange(y, "b t h p -> b t (h p)")
    y = self.norm(y * jax.nn.silu(z))
    new_cache = None if cache is None else dict(conv=conv_state, ssm=h)
    return self.out_proj(y), new_cache
