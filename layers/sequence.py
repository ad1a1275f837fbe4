"""Sequence parallelism for the layers: which op a mixer calls when the mesh splits the
sequence, and the `shard_map` around it. Models never see it.

    with sequence_parallel(SequenceParallel(mesh, attention="ring", layout="zigzag")):
      logits = model(tokens)      # traced inside: mixers take the SP versions of their ops

`active()` is None unless such a context is open and the mesh's `sequence` axis is > 1.
Activations keep the global view `[B, T, ...]` (T in the layout's order, sharded over the
`sequence` axis, the batch over `data x fsdp`); `call` runs a kernel of
`kernels.sequence_parallel` on each device's part.

A mixer called with a decode cache inside the context runs a sequence-parallel *prefill*:
it takes the cache as fresh (position 0), runs the SP ops over the whole sequence and
returns the cache a single-device prefill would (KV slots, final linear / SSM states, conv
tails). `infer.generate` does this for long prompts.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from longax.kernels import sequence_parallel as sp_kernels

ATTENTION = ("ring", "ulysses")
BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class SequenceParallel:
  mesh: Mesh
  attention: str = "ring"  # ring | ulysses
  layout: str = "contiguous"  # contiguous | zigzag
  axis: str = "sequence"
  batch_axes: tuple = BATCH_AXES  # the batch splits over those of these the mesh has; () replicates it

  @property
  def size(self) -> int:
    return dict(zip(self.mesh.axis_names, self.mesh.devices.shape)).get(self.axis, 1)

  def _specs(self):
    """(spec of [B, T, ...] arrays, spec of [B, ...] arrays replicated over the sequence)."""
    batch = tuple(a for a in self.batch_axes if a in self.mesh.axis_names) or None
    return P(batch, self.axis), P(batch)

  def call(self, fn, tokens: tuple, params: tuple = (), out_tokens=True):
    """fn(*tokens, *params) on each device: `tokens` are [B, T, ...] arrays (or None), split
    over batch and sequence; `params` are replicated. `out_tokens`: True for one [B, T, ...]
    output, or a tuple of flags for a tuple of outputs, False for [B, ...] ones (states)."""
    token, row = self._specs()
    in_specs = tuple(P() if x is None else token for x in tokens) + (P(),) * len(params)
    out_specs = jax.tree.map(lambda flag: token if flag else row, out_tokens)
    return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs)(*tokens, *params)

  def positions(self, t: int):
    """Global positions of the [T] tokens of the global view (zigzag: permuted)."""
    pos = jnp.arange(t, dtype=jnp.int32)
    return sp_kernels.to_zigzag(pos, self.size, axis=0) if self.layout == "zigzag" else pos

  def last_tokens(self, x, n: int):
    """The last n tokens (in sequence order) of global-view x [B, T, ...]; n at most a
    local chunk (T/P, zigzag T/2P): the tail a short conv's decode state keeps."""
    if self.layout != "zigzag":
      return x[:, x.shape[1] - n:]
    c = x.shape[1] // (2 * self.size)  # the last chunk is the second on device 0
    return x[:, 2 * c - n:2 * c]

  def kw(self) -> dict:
    return dict(axis_name=self.axis, layout=self.layout)

  def attend(self, q, k, v, segment_ids, **kw):
    """Ring or Ulysses attention of global-view q [B, T, H, D], k, v [B, T, Hkv, D]."""
    fn = sp_kernels.ring_attention if self.attention == "ring" else sp_kernels.ulysses_attention
    return self.call(lambda q, k, v, s: fn(q, k, v, segment_ids=s, **kw, **self.kw()),
                     (q, k, v, segment_ids))

  def linear_attention(self, q, k, v, log_decay, segment_ids, **kw):
    """LASP-2 of global-view q, k, v; log_decay [H] (replicated) or per token."""
    per_token = log_decay is not None and jnp.ndim(log_decay) > 1
    tokens = (q, k, v, segment_ids) + ((log_decay,) if per_token else ())
    params = (log_decay,) if log_decay is not None and not per_token else ()

    def fn(q, k, v, s, g=None):
      return sp_kernels.lasp2_linear_attention(q, k, v, log_decay=g, segment_ids=s,
                                               return_final_state=True, **kw, **self.kw())

    return self.call(fn, tokens, params, out_tokens=(True, False))

  def ssd(self, x, dt, A, B, C, D, segment_ids, **kw):
    fn = lambda x, dt, B, C, s, A, D: sp_kernels.lasp2_ssd(
        x, dt, A, B, C, D=D, segment_ids=s, return_final_state=True, **kw, **self.kw())
    return self.call(fn, (x, dt, B, C, segment_ids), (A, D), out_tokens=(True, False))

  def selective_scan(self, u, delta, A, B, C, z, D, delta_bias, segment_ids, **kw):
    fn = lambda u, dl, B, C, z, s, A, D, db: sp_kernels.lasp2_selective_scan(
        u, dl, A, B, C, D=D, z=z, delta_bias=db, segment_ids=s, return_final_state=True,
        **kw, **self.kw())
    return self.call(fn, (u, delta, B, C, z, segment_ids), (A, D, delta_bias),
                     out_tokens=(True, False))

  def conv(self, conv_fn, x, segment_ids, width: int, params: tuple):
    """A causal conv of reach `width` over global-view x [B, T, C]: each local chunk gets
    the `width` tokens before it from `left_context`. conv_fn(x, state, seg, state_seg,
    *params) -> y."""

    def local(x, s, *params):
      n = 2 if self.layout == "zigzag" else 1
      ctx, ctx_seg = sp_kernels.left_context(x, width, segment_ids=s, **self.kw())
      segs = [None] * n if s is None else jnp.split(s, n, axis=1)
      ys = [conv_fn(xc, ctx[j], segs[j], None if s is None else ctx_seg[j], *params)
            for j, xc in enumerate(jnp.split(x, n, axis=1))]
      return jnp.concatenate(ys, axis=1)

    return self.call(local, (x, segment_ids), params)


_ACTIVE: contextvars.ContextVar[SequenceParallel | None] = contextvars.ContextVar(
    "longax_sequence_parallel", default=None)


@contextlib.contextmanager
def sequence_parallel(sp: SequenceParallel | None):
  """Layers traced inside take the sequence-parallel ops (when sp.size > 1)."""
  token = _ACTIVE.set(sp if sp is not None and sp.size > 1 else None)
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def active() -> SequenceParallel | None:
  return _ACTIVE.get()
