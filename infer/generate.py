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
- Sequence-parallel prefill (long prompts): a mesh with a `sequence` axis of size P > 1
  runs each prompt's first floor(T / P) * P tokens (zigzag: 2P) in one pass through the SP
  ops (`layers.sequence`: ring or Ulysses attention, LASP-2, convs with left context),
  which fill the same caches a single-device prefill would; the < P (2P) tokens left go
  through single-token steps, so any length works, unpadded. One compile per prefix
  length. A prompt too short for every chunk to hold a short conv's reach (kernel - 1
  tokens) prefills as without the axis. The batch is replicated over data / fsdp during
  the SP pass (each prompt prefills alone), then decoding runs as without the axis.
- `score(model, tokens, targets)`: teacher-forced nll and argmax hits of every position
  through the same chunked prefill (`longax.infer.evaluate` uses it at any length).
- Length: a model with a full-attention layer (softmax / sigmoid without `attention.window`)
  takes at most `cfg.max_len` tokens, prompt + new: its KV cache holds max_len positions
  (beyond them it would wrap and silently forget) and sigmoid attention's bias is
  -log(max_len). Windowed attention (a ring of sinks + window slots), linear and SSM layers
  have a constant-size state, so their models take any length. `check_request` raises
  before any work.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from longax.kernels.sequence_parallel import to_zigzag
from longax.layers import sparse_prefill as sparse
from longax.layers.sequence import ATTENTION, SequenceParallel, sequence_parallel
from longax.models.config import FieldError, at_least, number
from longax.models.sharding import shardings

BUCKET = 64
LAYOUTS = ("contiguous", "zigzag")
_RULES = dict(max_new_tokens=at_least(1), temperature=number(0), top_k=at_least(1, none=True),
              top_p=number(0, 1, lo_open=True, none=True), prefill_chunk=at_least(1),
              seed=lambda v: None if isinstance(v, int) and not isinstance(v, bool) else "must be an int")


def full_cache_mixers(cfg) -> set[str]:
  """The mixers of `cfg` whose decode cache holds every position (max_len of them):
  softmax / sigmoid without a window, and nsa (its selection may pick any past block)."""
  mixers = set(cfg.layer_mixers)
  full = mixers & {"softmax", "sigmoid"} if cfg.attention.window is None else set()
  return full | (mixers & {"nsa"})


def length_limit(cfg) -> int | None:
  """The most tokens (prompt + new) `cfg`'s model takes: max_len if a layer keeps a full
  KV cache (softmax / sigmoid without a window, nsa), else None (unbounded)."""
  return cfg.max_len if full_cache_mixers(cfg) else None


def check_request(cfg, prompts, *, max_new_tokens: int, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                  stop_tokens=(), prefill_chunk: int = 64) -> None:
  """`generate`'s arguments, checked before any work: raises ValueError (FieldError for a
  parameter out of range, naming it)."""
  args = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
              prefill_chunk=prefill_chunk, seed=seed)
  for key, value in args.items():
    problem = _RULES[key](value)
    if problem:
      raise FieldError(key, value, problem, owner="generate: ")
  vocab = cfg.vocab_size
  if top_k is not None and top_k > vocab:
    raise FieldError("top_k", top_k, f"must be in [1, {vocab}] (the vocabulary) or none",
                     owner="generate: ")
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("generate: every prompt needs at least one token")
  bad = [t for p in prompts for t in p if not 0 <= t < vocab]
  if bad:
    raise ValueError(f"generate: token {bad[0]} is outside the vocabulary [0, {vocab})")
  bad = [t for t in stop_tokens if not 0 <= t < vocab]
  if bad:
    raise FieldError("stop_tokens", list(stop_tokens), f"token {bad[0]} is outside the "
                     f"vocabulary [0, {vocab})", owner="generate: ")
  limit, longest = length_limit(cfg), max(map(len, prompts))
  if limit is not None and longest + max_new_tokens > limit:
    kinds = "/".join(sorted(full_cache_mixers(cfg)))
    raise FieldError("max_new_tokens", max_new_tokens, f"the prompt ({longest} tokens) + "
                     f"{max_new_tokens} new = {longest + max_new_tokens} exceeds model.max_len="
                     f"{limit}, the positions the {kinds} layers' full KV cache holds: shorten "
                     "them" + ("" if "nsa" in kinds else ", or decode with a sliding window (CLI: "
                               "--streaming SINKS,WINDOW)"),
                     owner="generate: ")


def sequence_axis(mesh: Mesh | None) -> int:
  """The size of `mesh`'s `sequence` axis (1 without one)."""
  return 1 if mesh is None else dict(zip(mesh.axis_names, mesh.devices.shape)).get("sequence", 1)


def check_sequence_parallel(cfg, p: int, attention: str = "ring",
                            layout: str = "contiguous") -> None:
  """A sequence-parallel prefill over p devices of `cfg`'s model, checked before any work:
  ValueError (FieldError naming sp_attention / sp_layout) for what it cannot run."""
  if attention not in ATTENTION:
    raise FieldError("sp_attention", attention, f"must be one of {', '.join(ATTENTION)}",
                     owner="generate: ")
  if layout not in LAYOUTS:
    raise FieldError("sp_layout", layout, f"must be one of {', '.join(LAYOUTS)}", owner="generate: ")
  if p <= 1:
    return
  if problem := cfg.sequence_parallel_problem(p, attention):
    setting, why = problem
    if setting == "sequence" and cfg.attention.sinks:
      why += " (--streaming adds sinks)"
    key, value = ("sequence_parallel", p) if setting == "sequence" else ("sp_attention", attention)
    raise FieldError(key, value, why, owner="generate: ")


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


@functools.partial(nnx.jit, static_argnames=("sp", "last"))
def _feed_sp(model, tokens, cache, *, sp, last):
  with sequence_parallel(sp):
    logits, cache = model.decode(tokens, cache, logits_at=last)
  return logits[:, -1], cache


def _prefill_sp(model, prompt: list[int], cache_len: int, chunk: int, sp: SequenceParallel):
  """The first floor(T / parts) * parts tokens in one sequence-parallel pass, the rest in
  single-token steps; as `_prefill` where the prompt is too short."""
  parts = sp.size * (2 if sp.layout == "zigzag" else 1)
  n = len(prompt) // parts * parts
  if n == 0 or n // parts < max(model.cfg.conv_reach, 1):
    return _prefill(model, prompt, cache_len, chunk)
  tokens = jnp.asarray(prompt, jnp.int32)[None]
  head = to_zigzag(tokens[:, :n], sp.size) if sp.layout == "zigzag" else tokens[:, :n]
  head = jax.device_put(head, NamedSharding(sp.mesh, P(None, sp.axis)))
  last = int(np.argmax(np.asarray(sp.positions(n)) == n - 1))  # token n-1 in the layout
  logits, cache = _feed_sp(model, head, model.init_cache(1, cache_len), sp=sp, last=last)
  for s in range(n, len(prompt)):
    logits, cache = _feed(model, tokens[:, s:s + 1], cache)
  return logits, cache


@functools.partial(nnx.jit, static_argnames=("plan",))
def _feed_sparse(model, tokens, cache, *, plan):
  with sparse.prefill(plan):
    logits, cache = model.decode(tokens, cache, logits_at=tokens.shape[1] - 1)
  return logits[:, -1], cache


def _prefill_sparse(model, prompt: list[int], cache_len: int, chunk: int, plan):
  """The whole prompt in one sparse pass (as MInference: the full softmax layers attend
  sparsely, the first new token comes from it; the layers write the K/V a dense prefill
  computes from the same inputs); as `_prefill` for a one-token prompt."""
  if len(prompt) < 2:
    return _prefill(model, prompt, cache_len, chunk)
  tokens = jnp.asarray(prompt, jnp.int32)[None]
  return _feed_sparse(model, tokens, model.init_cache(1, cache_len), plan=plan)


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


def on_mesh(model, mesh: Mesh | None):
  """A copy of `model` with parameters laid out by `models.sharding` on `mesh` (None: model)."""
  if mesh is None:
    return model
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, jax.device_put(state, shardings(state, mesh)))


@nnx.jit
def _score_chunk(model, tokens, targets, cache):
  logits, cache = model.decode(tokens, cache)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return nll, jnp.argmax(logits, axis=-1) == targets, cache


def score(model, tokens, targets, *, prefill_chunk: int = 256, mesh: Mesh | None = None):
  """Teacher-forced scoring through the decode caches: tokens, targets [B, T] ints ->
  (nll [B, T] float32, hit [B, T] bool: the argmax is the target), numpy. The rows prefill
  together in chunks of `prefill_chunk` tokens (the last padded), so memory stays bounded
  by the chunk and the cache, not T x vocab; any T a cache holds (full attention: the cache
  holds T positions, whatever max_len was; its parameters are unchanged). `mesh`: parameters
  as `generate`, rows over `data` where they divide."""
  tokens, targets = np.asarray(tokens, np.int32), np.asarray(targets, np.int32)
  b, t = tokens.shape
  if prefill_chunk < 1:
    raise FieldError("prefill_chunk", prefill_chunk, "must be an int >= 1", owner="score: ")
  model = on_mesh(model, mesh)
  chunk = min(prefill_chunk, t)
  padded = -(-t // chunk) * chunk
  pad = lambda x: np.pad(x, ((0, 0), (0, padded - t)))
  tokens, targets = pad(tokens), pad(targets)
  cache = model.init_cache(b, -(-padded // BUCKET) * BUCKET)
  rows = None
  if mesh is not None and b % mesh.shape.get("data", 1) == 0:
    rows = NamedSharding(mesh, P("data"))
    cache = jax.device_put(cache, rows)
  nll, hit = [], []
  for s in range(0, padded, chunk):
    x, y = tokens[:, s:s + chunk], targets[:, s:s + chunk]
    if rows is not None:
      x, y = jax.device_put((x, y), rows)
    n, h, cache = _score_chunk(model, x, y, cache)
    nll.append(np.asarray(n))
    hit.append(np.asarray(h))
  return np.concatenate(nll, 1)[:, :t], np.concatenate(hit, 1)[:, :t]


def generate(model, prompts, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             stop_tokens=(), prefill_chunk: int = 64, mesh: Mesh | None = None,
             sp_attention: str = "ring", sp_layout: str = "contiguous",
             sparse_prefill: sparse.SparsePrefill | None = None) -> list[list[int]]:
  """Continues each prompt (a list of token ids); returns the new tokens per prompt.
  Prompt + max_new_tokens may not exceed `model.cfg.max_len` when a layer keeps a full KV
  cache (see the module docstring); a bad argument raises ValueError before any work.
  A `mesh` with a `sequence` axis > 1 prefills sequence-parallel, with `sp_attention`
  (ring | ulysses) and `sp_layout` (contiguous | zigzag), as `train.sp_*`.
  `sparse_prefill` (a plan from `infer.sparse.search`): each prompt is prefilled in one
  pass with the full softmax layers attending sparsely (MInference); the
  caches hold the K/V a dense prefill computes from the same layer inputs; decoding is dense."""
  prompts = [list(map(int, p)) for p in prompts]
  stop_tokens = [int(t) for t in stop_tokens]
  check_request(model.cfg, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                top_k=top_k, top_p=top_p, seed=seed, stop_tokens=stop_tokens,
                prefill_chunk=prefill_chunk)
  p = sequence_axis(mesh)
  check_sequence_parallel(model.cfg, p, sp_attention, sp_layout)
  if sparse_prefill is not None and p > 1:
    raise ValueError("generate: a sparse prefill does not run sequence-parallel: drop one of them")
  model = on_mesh(model, mesh)
  cache_len = -(-(max(map(len, prompts)) + max_new_tokens) // BUCKET) * BUCKET
  if p > 1:  # each prompt prefills alone: its batch of 1 is replicated over data / fsdp
    sp = SequenceParallel(mesh, sp_attention, sp_layout, batch_axes=())
    rows = [_prefill_sp(model, x, cache_len, prefill_chunk, sp) for x in prompts]
  elif sparse_prefill is not None:
    rows = [_prefill_sparse(model, x, cache_len, prefill_chunk, sparse_prefill) for x in prompts]
  else:
    rows = [_prefill(model, x, cache_len, prefill_chunk) for x in prompts]
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
