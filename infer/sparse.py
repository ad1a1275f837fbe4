"""MInference's offline search: per attention head, the sparse option closest to dense.

    plan = search(model, calibration_tokens, kind="vertical_slash", budget=1024)
    new = generate(model, prompts, max_new_tokens=..., sparse_prefill=plan)

One dense forward over the calibration prompt records every full softmax layer's q, k, v
(`layers.sparse_prefill.capture`); for each layer and each option of `choices(kind, ...)`
(every option keeps `budget` keys per query), the sparse output of the calibration prompt
is compared with the dense one at every query, and each head takes the option whose worst
query has the smallest error (`errors`; the mean over calibration prompts, given several).
The plan is data (a frozen dataclass, hashable: `generate` compiles one prefill per plan).
"""

from __future__ import annotations

import sys

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from longax import kernels
from longax.layers import sparse_prefill as sp
from longax.layers.sparse_prefill import KINDS, LAST_Q, SparsePrefill
from longax.models.config import FieldError, at_least


def check(cfg, kind: str, budget: int, block: int) -> None:
  """The sparse-prefill settings for `cfg`'s model, before any work: FieldError (naming
  sparse_prefill / sparse_budget / sparse_block) or ValueError, one line."""
  if kind not in KINDS:
    raise FieldError("sparse_prefill", kind, f"must be one of {', '.join(KINDS)}", owner="generate: ")
  for key, value in (("sparse_budget", budget), ("sparse_block", block)):
    problem = at_least(1)(value)
    if problem:
      raise FieldError(key, value, problem, owner="generate: ")
  a = cfg.attention
  if "softmax" not in cfg.layer_mixers or a.window is not None or a.softcap is not None:
    raise FieldError("sparse_prefill", kind, "this model has no full softmax attention layer "
                     "(softmax without attention.window or softcap) to make sparse",
                     owner="generate: ")


def search(model, tokens, *, kind: str, budget: int, block: int = 64, last_q: int = LAST_Q,
           summary: bool = False, progress: bool = True) -> SparsePrefill:
  """The per-head plan for `model` from a calibration prompt (a list of token ids) or several
  (a list of such lists: each head takes the option with the least mean error over them).
  summary: block_topk with its summary branch (`kernels.block_mean_attention`), searched
  as it will run."""
  check(model.cfg, kind, budget, block)
  prompts = [list(tokens)] if tokens and np.ndim(tokens[0]) == 0 else [list(t) for t in tokens]
  options = sp.choices(kind, budget, block)
  errs = 0.0  # per layer: [options, H], summed over prompts
  for n, prompt in enumerate(prompts):
    with sp.capture() as records:
      model(jnp.asarray([prompt], jnp.int32))
    desc = "sparse-prefill search" + (f" (prompt {n + 1}/{len(prompts)})" if len(prompts) > 1 else "")
    errs = errs + np.stack([errors(q, k, v, kind, options, budget, block, last_q, summary)
                            for q, k, v in
                            tqdm(records, desc=desc, file=sys.stderr, disable=not progress)])
  best = np.argmin(errs, axis=1)  # [layers, H]
  heads = tuple(tuple(int(options[i]) for i in layer) for layer in best)
  return SparsePrefill(kind, budget, block, heads, last_q, summary)


def errors(q, k, v, kind, options, budget, block, last_q=LAST_Q, summary=False):
  """[options, H]: each option's worst error over every query (and the batch):
  max_t |o_t - dense_t|^2 / mean_t |dense_t|^2. The worst, not the mean: a prompt's answer
  hangs on a few queries (a question that must reach a far key), which a mean over the
  others (served best by local keys) outvotes. Every query, not only the last ones (where
  vertical-slash estimates its pattern, `last_q`): a layer's outputs at every position feed
  the next layer's cached keys and values, which decoding reads (a needle mid-prompt)."""
  dense = kernels.attention(q, k, v)
  norm = jnp.maximum(jnp.mean(jnp.sum(jnp.square(dense), -1), axis=(0, 1)), 1e-30)  # [H]
  errs = []
  for opt in options:
    o = sp.attend(q, k, v, kind, (opt,) * q.shape[2], budget, block, last_q, summary=summary)
    errs.append(np.asarray(jnp.max(jnp.sum(jnp.square(o - dense), -1), axis=(0, 1)) / norm))
  return np.stack(errs)
