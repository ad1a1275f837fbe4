"""Every kernel runs inside `jax.shard_map` with its default `check_vma=True` (scan carries
that start as constants are cast to vary like the inputs) and gives what it gives outside.

The mesh is the devices of this process (one in the suite; the batch splits over them);
tests/test_sequence_parallel.py calls the ops the same way on 8 simulated devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from conftest import compare
from longax import kernels as K


def _in_shard_map(fn, n_args):
  mesh = Mesh(np.asarray(jax.devices()), ("s",))
  return jax.shard_map(fn, mesh=mesh, in_specs=(P("s"),) * n_args, out_specs=P("s"))


def _cases(r):
  b, t, h, hkv, d = 2 * len(jax.devices()), 24, 4, 2, 8
  q, k, v = r.normal((b, t, h, d)), r.normal((b, t, hkv, d)), r.normal((b, t, hkv, d))
  seg = r.segments(b, t, 3)
  g_tok = -r.uniform((b, t, h), 0.0, 1.0)
  g_key = -r.uniform((b, t, h, d), 0.0, 1.0)
  h0 = r.normal((b, h, d, d))
  x, dt = r.normal((b, t, h, d)), r.uniform((b, t, h), 0.1, 1.0)
  bm, cm = r.normal((b, t, 1, 4)), r.normal((b, t, 1, 4))
  u, z, bs, cs = r.normal((b, t, d)), r.normal((b, t, d)), r.normal((b, t, 4)), r.normal((b, t, 4))
  a_h, a_dn = -jnp.arange(1.0, h + 1), -jnp.broadcast_to(jnp.arange(1.0, 5.0), (d, 4))
  sel = jnp.asarray(np.random.default_rng(0).integers(-1, 3, (b, t, hkv, 2)), jnp.int32)
  mask = jnp.asarray(np.random.default_rng(1).random((b, 1, 3, 3)) < 0.6)
  vert = jnp.asarray(np.random.default_rng(2).integers(-1, t, (b, h, 3)), jnp.int32)
  slash = jnp.asarray(np.random.default_rng(3).integers(-1, t, (b, h, 2)), jnp.int32)
  return {
      "block_sparse_attention": (lambda q, k, v, m: K.block_sparse_attention(
          q, k, v, m, block_q=8, block_k=8, impl=IMPL), (q, k, v, mask)),
      "selected_block_attention": (lambda q, k, v, i: K.selected_block_attention(
          q, k, v, i, block_size=8, impl=IMPL), (q, k, v, sel)),
      "vertical_slash_attention": (lambda q, k, v, vi, si: K.vertical_slash_attention(
          q, k, v, vi, si, impl=IMPL), (q, k, v, vert, slash)),
      "attention": (lambda q, k, v, s: K.attention(q, k, v, window=9, segment_ids=s, impl=IMPL),
                    (q, k, v, seg)),
      "sigmoid_attention": (lambda q, k, v, s: K.sigmoid_attention(q, k, v, segment_ids=s, impl=IMPL),
                            (q, k, v, seg)),
      "linear_attention": (lambda q, k, v, s, h0: K.linear_attention(
          q, k, v, segment_ids=s, initial_state=h0, return_final_state=True, impl=IMPL),
                           (q, k, v, seg, h0)),
      "linear_attention_token_decay": (lambda q, k, v, g: K.linear_attention(
          q, k, v, log_decay=g, impl=IMPL), (q, k, v, g_tok)),
      "linear_attention_key_decay": (lambda q, k, v, g: K.linear_attention(
          q, k, v, log_decay=g, impl=IMPL), (q, k, v, g_key)),
      "linear_attention_head_decay": (lambda q, k, v: K.linear_attention(
          q, k, v, log_decay=a_h / 8, impl=IMPL), (q, k, v)),
      "ssd": (lambda x, dt, bm, cm, s: K.ssd(x, dt, a_h, bm, cm, segment_ids=s,
                                             return_final_state=True, impl=IMPL),
              (x, dt, bm, cm, seg)),
      "selective_scan": (lambda u, z, bs, cs, s: K.selective_scan(
          u, u, a_dn, bs, cs, z=z, delta_softplus=True, segment_ids=s, return_final_state=True,
          impl=IMPL), (u, z, bs, cs, seg)),
  }


IMPL = "xla"
OPS = ("attention", "sigmoid_attention", "linear_attention", "linear_attention_token_decay",
       "linear_attention_key_decay", "linear_attention_head_decay", "ssd", "selective_scan",
       "block_sparse_attention", "selected_block_attention", "vertical_slash_attention")


@pytest.mark.parametrize("impl", ["xla", "reference"])
@pytest.mark.parametrize("op", OPS)
def test_op_inside_shard_map(op, impl, rand, monkeypatch):
  monkeypatch.setitem(globals(), "IMPL", impl)
  fn, args = _cases(rand)[op]
  floats = tuple(i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating))
  compare(_in_shard_map(fn, len(args)), fn, args, floats, jnp.float32, f"{op}[{impl}]")
