"""MQAR recall with a sparse prefill (MInference) against the dense prefill, on a trained run.

    python -m longax.benchmarks.sparse_prefill --workdir runs/mqar-... [--n 64]
        [--kinds vertical_slash,block_topk] [--budgets 8,16,32] [--block 8]

Each of `--n` validation sequences of the run's MQAR task is cut after its last query key;
the model answers with one token (`longax.infer.generate`, greedy), prefilled densely and
with each (kind, budget). The per-head plan comes from `infer.sparse.search` on the first
sequence's prompt (the calibration prompt), then serves every prompt, each estimating its
own pattern. Prints one row per setting: accuracy, agreement with the dense answers, and
the fraction of causal (query, key) pairs the budget keeps.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np
from tqdm import tqdm


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m longax.benchmarks.sparse_prefill",
                              description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="an MQAR training run folder")
  p.add_argument("--n", type=int, default=64, help="validation sequences")
  p.add_argument("--kinds", default="vertical_slash,block_topk")
  p.add_argument("--budgets", default="8,16,32", help="keys per query")
  p.add_argument("--block", type=int, default=8, help="block_topk's block")
  a = p.parse_args(argv)
  from longax.infer.__main__ import UsageError, load_model
  from longax.infer import generate
  from longax.infer.sparse import search
  from longax.train.config import from_dict
  from longax.train.data import Dataset
  try:
    model, run = load_model(pathlib.Path(a.workdir))
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  data = from_dict(run).data
  if data.task != "mqar":
    print(f"error: --workdir {a.workdir}: task {data.task!r}, not mqar", file=sys.stderr)
    return 2
  ds = Dataset(data)
  seqs = np.concatenate([ds.batch("val", i)["tokens"] for i in range(-(-a.n // data.batch_size))])[:a.n]
  last = 2 * data.num_kv_pairs + 2 * ((data.seq_len + 1 - 2 * data.num_kv_pairs) // 2 - 1)
  prompts, answers = [s[:last + 1].tolist() for s in seqs], seqs[:, last + 1]
  t = len(prompts[0])
  settings = [(None, None)] + [(k, int(b)) for k in a.kinds.split(",") for b in a.budgets.split(",")]
  rows, dense = [], None
  for kind, budget in tqdm(settings, desc="settings", file=sys.stderr):
    plan = None if kind is None else search(model, prompts[0], kind=kind, budget=budget,
                                            block=a.block, progress=False)
    got = np.array([x[0] for x in generate(model, prompts, max_new_tokens=1, sparse_prefill=plan)])
    dense = got if dense is None else dense
    kept = 1.0 if budget is None else sum(min(i + 1, budget) for i in range(t)) / (t * (t + 1) / 2)
    rows.append((kind or "dense", budget or t, np.mean(got == answers), np.mean(got == dense), kept))
  print(f"# {a.workdir}: {a.n} prompts of {t} tokens, calibration on the first")
  print(f"{'prefill':16} {'budget':>6} {'accuracy':>9} {'= dense':>8} {'pairs kept':>10}")
  for kind, budget, acc, agree, kept in rows:
    print(f"{kind:16} {budget:>6} {acc:>9.3f} {agree:>8.3f} {kept:>10.2f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
