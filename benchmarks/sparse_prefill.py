"""Recall with a sparse prefill (MInference) against the dense prefill, on a trained run.

    python -m longax.benchmarks.sparse_prefill --workdir runs/mqar-... [--n 64]
        [--kinds vertical_slash,block_topk] [--budgets 8,16,32] [--block 8]
    python -m longax.benchmarks.sparse_prefill --workdir runs/passkey-... --budgets 256,1024
        [--lengths 8192] [--depths 0.1,0.5,0.9] [--out rows.json]

MQAR runs: each of `--n` validation sequences of the run's task is cut after its last query
key; the model answers with one token. Passkey runs (`data.task=passkey`): `--n` fresh
sequences of the run's task at each length x depth, cut after the question token; the model
answers with the key's digits, a hit when every digit is right (greedy). Either way the
answers come from `longax.infer.generate`, prefilled densely and with each (kind, budget).
The per-head plan comes from `infer.sparse.search` on the first prompt (`--calibrate first`)
or on the first prompt of each length x depth (`--calibrate groups`: each head the option
with the least mean error), then serves every prompt, each estimating its own pattern; the
plans are printed. One row per setting (and length / depth): accuracy, agreement with the
dense answers, and the fraction of causal (query, key) pairs the budget keeps; rows print as
they land, and `--out` is rewritten after each (a run cut short keeps what it finished).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np
from tqdm import tqdm


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m longax.benchmarks.sparse_prefill",
                              description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="an MQAR or passkey training run folder")
  p.add_argument("--n", type=int, default=64, help="validation sequences")
  p.add_argument("--kinds", default="vertical_slash,block_topk",
                 help="comma-separated: vertical_slash, block_topk, block_topk+summary (block "
                      "top-k with its skipped blocks as one mean key each)")
  p.add_argument("--budgets", default="8,16,32", help="keys per query")
  p.add_argument("--block", type=int, default=8, help="block_topk's block")
  p.add_argument("--lengths", default=None, help="passkey: prompt lengths (default the run's seq_len)")
  p.add_argument("--depths", default="0.5", help="passkey: key depths in [0, 1]")
  p.add_argument("--calibrate", default="first",
                 help="the plan's calibration prompts: first (the first prompt) | groups (each group's first)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="also write the rows as JSON here")
  a = p.parse_args(argv)
  try:  # every flag checked before the model loads
    budgets = [int(x) for x in _floats(a.budgets, "--budgets", 1)]
    depths = _floats(a.depths, "--depths", 0, 1)
    lengths = [int(x) for x in _floats(a.lengths, "--lengths", 16)] if a.lengths else None
    if a.calibrate not in ("first", "groups"):
      raise ValueError(f"--calibrate {a.calibrate}: must be first or groups")
    kinds = a.kinds.split(",")
    for kind in kinds:
      if kind not in ("vertical_slash", "block_topk", "block_topk+summary"):
        raise ValueError(f"--kinds {kind}: must be vertical_slash, block_topk or block_topk+summary")
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  from longax.infer.__main__ import UsageError, load_model
  from longax.infer import generate
  from longax.infer.sparse import search
  from longax.train.config import from_dict
  try:
    model, run = load_model(pathlib.Path(a.workdir))
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  data = from_dict(run).data
  if data.task not in ("mqar", "passkey"):
    print(f"error: --workdir {a.workdir}: task {data.task!r}, not mqar or passkey", file=sys.stderr)
    return 2
  if data.task == "passkey" and max(lengths or [data.seq_len]) + 1 > model.cfg.max_len:
    print(f"error: --lengths: a passkey sequence of {max(lengths or [data.seq_len])} tokens + its answer "
          f"exceeds the model's max_len {model.cfg.max_len}", file=sys.stderr)
    return 2
  groups = (_mqar_prompts(data, a.n) if data.task == "mqar" else
            _passkey_prompts(data, a.n, lengths or [data.seq_len], depths, a.seed))
  calib = [g[1][0] for g in groups] if a.calibrate == "groups" else groups[0][1][0]
  plans = [(None, None)] + [(k, b) for k in kinds for b in budgets]
  where = "the first prompt of each group" if a.calibrate == "groups" else "the first prompt"
  say = lambda line: print(line, flush=True)  # each row as it lands (a cut run keeps them)
  say(f"# {a.workdir}: {data.task}, {len(groups[0][1])} prompts per group, calibration on {where}")
  say(f"{'prefill':16} {'budget':>6} {'prompts':>16} {'tokens':>7} {'accuracy':>9} {'= dense':>8} {'pairs kept':>10}")
  rows, dense, chosen = [], {}, []
  for kind, budget in tqdm(plans, desc="settings", file=sys.stderr):
    plan = None if kind is None else search(model, calib, kind=kind.split("+")[0], budget=budget,
                                            block=a.block, summary=kind.endswith("+summary"),
                                            progress=False)
    if plan is not None:  # per layer, per head: vertical columns (vertical_slash) or local blocks
      chosen.append(dict(prefill=kind, budget=budget, heads=plan.heads))
      say(f"# plan {kind} {budget}: {plan.heads}")
    for name, prompts, answers in groups:
      got = np.array(generate(model, prompts, max_new_tokens=answers.shape[1], sparse_prefill=plan))
      dense.setdefault(name, got)
      t = len(prompts[0])
      kept = 1.0 if budget is None else sum(min(i + 1, budget) for i in range(t)) / (t * (t + 1) / 2)
      r = dict(prefill=kind or "dense", budget=budget or t, prompts=name, tokens=t,
               accuracy=float(np.mean((got == answers).all(1))),
               agrees=float(np.mean((got == dense[name]).all(1))), pairs_kept=kept)
      rows.append(r)
      say(f"{r['prefill']:16} {r['budget']:>6} {r['prompts']:>16} {r['tokens']:>7} {r['accuracy']:>9.3f} "
          f"{r['agrees']:>8.3f} {r['pairs_kept']:>10.2f}")
      if a.out:  # rewritten after every row, so a cut run leaves what it finished
        pathlib.Path(a.out).write_text(json.dumps(dict(
            workdir=str(a.workdir), task=data.task, calibrate=a.calibrate, plans=chosen,
            rows=rows), indent=1))
  return 0


def _mqar_prompts(data, n: int) -> list:
  """[(name, prompts, answers [n, 1])]: validation sequences cut after their last query key."""
  from longax.train.data import Dataset
  ds = Dataset(data)
  seqs = np.concatenate([ds.batch("val", i)["tokens"] for i in range(-(-n // data.batch_size))])[:n]
  last = 2 * data.num_kv_pairs + 2 * ((data.seq_len + 1 - 2 * data.num_kv_pairs) // 2 - 1)
  return [("val", [s[:last + 1].tolist() for s in seqs], seqs[:, last + 1:last + 2])]


def _floats(text: str, flag: str, lo: float, hi: float | None = None) -> list:
  try:
    vals = [float(x) for x in text.split(",")]
  except ValueError:
    raise ValueError(f"{flag} {text}: comma-separated numbers") from None
  bad = [x for x in vals if x < lo or (hi is not None and x > hi)]
  if bad:
    raise ValueError(f"{flag} {text}: each must be in [{lo:g}, {hi if hi is not None else 'inf'}]")
  return vals


def _passkey_prompts(data, n: int, lengths, depths, seed: int) -> list:
  """[(name, prompts, answers [n, digits])] per (length, depth): the run's passkey task, each
  sequence cut after its question token."""
  import dataclasses
  from longax.train.data import passkey
  out = []
  for t in lengths:
    for depth in depths:
      cfg = dataclasses.replace(data, seq_len=t, depth=depth, batch_size=n)
      bt = passkey(cfg, np.random.default_rng([seed, t, int(depth * 1000)]))
      seqs = np.concatenate([bt["tokens"], bt["targets"][:, -1:]], 1)
      digits = int(bt["mask"][0].sum())
      out.append((f"L={t},depth={depth:g}", [s[:-digits].tolist() for s in seqs], seqs[:, -digits:]))
  return out


if __name__ == "__main__":
  sys.exit(main())
