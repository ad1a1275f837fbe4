"""Generation: chunked prefill, then one jitted decode loop over the cache.

    new_tokens = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=32, temperature=0.0)

- Prefill (SARATHI-style): each prompt runs through `model.decode` in fixed chunks of
  `prefill_chunk` tokens (the chunked kernels; prefill memory stays bounded), the tail token
  by token (the step kernels), so two compiled shapes serve every prompt length.
- The rows' caches are stacked (each row keeps its own position) and a `lax.while_loop`
  samples until every row has `max_new_tokens` tokens or has emitted a stop token (which is
  kept as its last token). Cache length is bucketed to a multiple of 64: the loop compiles
  once per (batch, bucket, sampling settings), not per call.
- `mesh`: parameters lie by `models.sharding` (fsdp / tensor), the batch over `data`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from longax.models.sharding import shardings

BUCKET = 64


def sample(logits, key, temperature: float, top_k: int | None, top_p: float | None):
  """logits [B, V] float32 -> tokens [B]. temperature 0: greedy."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    outside = jnp.cumsum(probs, axis=-1) - probs > top_p  # keeps at least the top token
    sorted_logits = jnp.where(outside, -jnp.inf, sorted_logits)
    logits = jnp.full_like(logits, -jnp.inf).at[
        jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@nnx.jit
def _feed(model, tokens, cache):
  logits, cache = model.decode(tokens, cache)
  return logits[:, -1], cache


def _prefill(model, prompt: list[int], cache_len: int, chunk: int):
  cache = model.init_cache(1, cache_len)
  tokens = jnp.asarray(prompt, jnp.int32)[None]
  n_full = (len(prompt) - 1) // chunk * chunk  # the last token always goes through a step
  for s in range(0, n_full, chunk):
    _, cache = _feed(model, tokens[:, s:s + chunk], cache)
  for s in range(n_full, len(prompt)):
    logits, cache = _feed(model, tokens[:, s:s + 1], cache)
  return logits, cache


@functools.partial(nnx.jit, static_argnames=("max_new", "temperature", "top_k", "top_p"))
def _decode_loop(model, cache, logits, key, stop, *, max_new, temperature, top_k, top_p):
  b = logits.shape[0]
  out = jnp.zeros((b, max_new), jnp.int32)
  done = jnp.zeros((b,), bool)
  lengths = jnp.zeros((b,), jnp.int32)

  def cond(carry):
    i, _, _, _, done, _, _ = carry
    return (i < max_new) & ~jnp.all(done)

  def body(carry):
    i, cache, logits, out, done, lengths, key = carry
    key, sub = jax.random.split(key)
    tok = sample(logits, sub, temperature, top_k, top_p)
    out = out.at[:, i].set(jnp.where(done, 0, tok))
    lengths = lengths + ~done
    done = done | jnp.any(tok[:, None] == stop[None, :], axis=-1)
    logits, cache = model.decode(tok[:, None], cache)
    return i + 1, cache, logits[:, -1], out, done, lengths, key

  carry = (jnp.int32(0), cache, logits, out, done, lengths, key)
  _, _, _, out, _, lengths, _ = jax.lax.while_loop(cond, body, carry)
  return out, lengths


def generate(model, prompts, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             stop_tokens=(), prefill_chunk: int = 64, mesh: Mesh | None = None) -> list[list[int]]:
  """Continues each prompt (a list of token ids); returns the new tokens per prompt."""
  vocab = model.cfg.vocab_size
  prompts = [list(map(int, p)) for p in prompts]
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("generate: every prompt needs at least one token")
  bad = [t for p in prompts for t in p if not 0 <= t < vocab]
  if bad:
    raise ValueError(f"generate: token {bad[0]} is outside the vocabulary [0, {vocab})")
  if max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
  if top_k is not None and not 0 < top_k <= vocab:
    raise ValueError(f"generate: top_k must be in [1, {vocab}], got {top_k}")
  if top_p is not None and not 0 < top_p <= 1:
    raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
  if mesh is not None:  # a sharded copy; the caller's model stays where it is
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, jax.device_put(state, shardings(state, mesh)))
  cache_len = -(-(max(map(len, prompts)) + max_new_tokens) // BUCKET) * BUCKET
  rows = [_prefill(model, p, cache_len, prefill_chunk) for p in prompts]
  logits = jnp.concatenate([r[0] for r in rows])
  cache = jax.tree.map(lambda *xs: jnp.concatenate(xs), *[r[1] for r in rows])
  if mesh is not None and len(prompts) % mesh.shape.get("data", 1) == 0:
    batch = NamedSharding(mesh, P("data"))
    cache, logits = jax.device_put((cache, logits), batch)
  stop = jnp.asarray(list(stop_tokens) or [-1], jnp.int32)
  out, lengths = _decode_loop(model, cache, logits, jax.random.key(seed), stop,
                              max_new=max_new_tokens, temperature=float(temperature),
                              top_k=top_k, top_p=top_p)
  out, lengths = np.asarray(out), np.asarray(lengths)
  return [out[i, :lengths[i]].tolist() for i in range(len(prompts))]
