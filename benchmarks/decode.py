"""Decoding cost against context length, one line per mixer, at equal parameter count.

    python -m longax.benchmarks.decode [--contexts 1024,2048,...,32768] [--png decode.png]

For each mixer the SwiGLU width is chosen so every model has about the same number of
parameters (`--params`). The cache is filled as if `L` tokens had been read (random
states, every KV slot up to L occupied; decode cost does not depend on the values), then
`--steps` single-token decode steps run in one jitted loop (as `longax.infer` decodes),
five times from the same cache; the median run's mean per step is reported. Reported: ms
per step for the batch, tokens/s, the cache's bytes (exact) and the device memory the
compiled loop needs (weights + cache + scratch, from XLA's memory analysis; the process's
running peak would mix configurations).
A KV cache grows with L; a linear / SSM state does not: the plot shows both.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from longax.models import MIXERS, LM, LMConfig, count_params


def matched_config(mixer: str, target: int, base: LMConfig) -> LMConfig:
  """`base` with `mixer` and the d_ff (0: no MLP, else a multiple of 64) that brings it
  nearest `target`. Parameters grow linearly in d_ff, so two counts place the answer."""
  with_ff = lambda d_ff: dataclasses.replace(base, mixer=mixer, d_ff=d_ff)
  n64, n128 = count_params(with_ff(64)), count_params(with_ff(128))
  guess = 64 * max(1, round(1 + (target - n64) / (n128 - n64)))
  candidates = {0, max(64, guess - 64), guess, guess + 64}
  return min((with_ff(d) for d in sorted(candidates)), key=lambda c: abs(count_params(c) - target))


def filled_cache(model: LM, batch: int, context: int, room: int):
  """A cache that looks like `context` tokens were read, with `room` free slots."""
  cache = model.init_cache(batch, context + room)
  key = iter(jax.random.split(jax.random.key(0), 4096))

  def fill(x):
    if jnp.issubdtype(x.dtype, jnp.floating):
      return (0.1 * jax.random.normal(next(key), x.shape)).astype(x.dtype)
    slots = jnp.arange(x.shape[-1], dtype=jnp.int32)  # KV slot positions
    return jnp.broadcast_to(jnp.where(slots < context, slots, -1), x.shape)

  layers = jax.tree.map(fill, cache["layers"])
  return dict(pos=jnp.full((batch,), context, jnp.int32), layers=layers)


REPEATS = 5  # timed runs of `--steps` steps each; the median run's mean is reported


@functools.partial(jax.jit, static_argnums=(0, 4), donate_argnums=3)
def _decode(graphdef, state, tokens, cache, steps: int):
  """`steps` greedy decode steps in one on-device loop, as `longax.infer` decodes (so the
  time is the device's, not Python's dispatch of each step)."""
  model = nnx.merge(graphdef, state)

  def step(_, carry):
    logits, cache = model.decode(*carry)
    return jnp.argmax(logits[:, -1], -1)[:, None].astype(jnp.int32), cache

  return jax.lax.fori_loop(0, steps, step, (tokens, cache))


def step_bytes(compiled) -> int | None:
  """Device memory the compiled decode loop needs: its inputs (weights, cache), outputs
  and scratch, less what the donated cache lets it reuse."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def measure(cfg: LMConfig, contexts, batch: int, steps: int) -> list[dict]:
  graphdef, state = nnx.split(LM(cfg, rngs=nnx.Rngs(0)))
  model = nnx.merge(graphdef, state)
  rows = []
  for context in contexts:
    cache = filled_cache(model, batch, context, steps + 3)
    tok = jnp.ones((batch, 1), jnp.int32)
    cache_bytes = int(sum(x.nbytes for x in jax.tree.leaves(cache["layers"])))
    decode = _decode.lower(graphdef, state, tok, cache, steps).compile()  # compiled once
    need = step_bytes(decode)
    start, times = (tok, cache), []
    for _ in range(REPEATS + 1):  # the first run warms up
      tok, cache = jax.tree.map(jnp.copy, start)
      jax.block_until_ready(cache)
      t0 = time.perf_counter()
      jax.block_until_ready(decode(state, tok, cache))
      times.append((time.perf_counter() - t0) / steps)
    times = times[1:]
    ms = 1e3 * statistics.median(times)
    rows.append(dict(mixer=cfg.mixer, params=count_params(cfg), context=context, batch=batch,
                     ms_per_step=ms, tokens_per_s=batch / ms * 1e3, cache_bytes=cache_bytes,
                     step_bytes=need))
    del cache
  return rows


def plot(rows: list[dict], path: str, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
  for mixer in dict.fromkeys(r["mixer"] for r in rows):
    rs = [r for r in rows if r["mixer"] == mixer]
    x = [r["context"] for r in rs]
    a.plot(x, [r["ms_per_step"] for r in rs], marker="o", label=mixer)
    b.plot(x, [(r.get("step_bytes") or r["cache_bytes"]) / 2**20 for r in rs], marker="o",
           label=mixer)
  memory = "device memory per step (MiB)" if rows[0].get("step_bytes") else "decode state (MiB)"
  for ax, label in ((a, "ms per decode step (batch)"), (b, memory)):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  b.set_yscale("log")
  a.legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--mixers", default=",".join(MIXERS))
  p.add_argument("--contexts", default="1024,2048,4096,8192,16384,32768")
  p.add_argument("--d-model", type=int, default=512)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--params", type=float, default=None,
                 help="target parameter count (default: the softmax model's)")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
  p.add_argument("--json", default=None)
  p.add_argument("--png", default="decode.png")
  p.add_argument("--merge", action="append", default=[], metavar="JSON",
                 help="add the rows of an earlier --json run (same setup) to the table and plot")
  a = p.parse_args(argv)
  mixers = [m for m in a.mixers.split(",") if m]
  unknown = set(mixers) - set(MIXERS)
  if unknown:
    p.error(f"unknown mixers {sorted(unknown)}; valid: {', '.join(MIXERS)}")
  contexts = [int(c) for c in a.contexts.split(",")]
  dtype = a.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32")
  base = LMConfig(vocab_size=256, d_model=a.d_model, n_layers=a.layers, n_heads=a.heads,
                  mixer="softmax", max_len=max(contexts) + 64, dtype=dtype)
  target = int(a.params or count_params(base))
  device = jax.devices()[0].device_kind
  title = (f"{device}, {dtype}, batch {a.batch}, ~{target / 1e6:.2f}M params, "
           f"{datetime.date.today().isoformat()}")
  rows = []
  for path in a.merge:  # earlier runs of the same setup, e.g. other mixers
    try:
      rows += json.loads(pathlib.Path(path).read_text())["rows"]
    except (OSError, ValueError, KeyError) as e:
      p.error(f"--merge {path}: not a decode benchmark JSON ({e})")
  from tqdm import tqdm
  for mixer in tqdm(mixers, desc="mixers", file=sys.stderr):
    rows += measure(matched_config(mixer, target, base), contexts, a.batch, a.steps)
    if a.json:  # after every mixer, so a run cut short keeps what it measured
      pathlib.Path(a.json).write_text(json.dumps(dict(title=title, rows=rows), indent=1))
  print(f"# {title}")
  print(f"{'mixer':10} {'params':>10} {'context':>8} {'ms/step':>9} {'tok/s':>9} {'cache MiB':>10} {'step MiB':>9}")
  for r in rows:
    peak = "" if r.get("step_bytes") is None else f"{r['step_bytes'] / 2**20:.0f}"
    print(f"{r['mixer']:10} {r['params']:>10} {r['context']:>8} {r['ms_per_step']:>9.2f} "
          f"{r['tokens_per_s']:>9.0f} {r['cache_bytes'] / 2**20:>10.2f} {peak:>9}")
  if a.png and rows:
    plot(rows, a.png, title)
  return 0

if __name__ == "__main__":
  sys.exit(main())
