"""python -m longax.infer.evaluate --workdir RUN [--tasks ppl_by_position,passkey,mqar] [--lengths 1024,2048,4096] [--out DIR]

Long-context evaluation of a training run's newest readable checkpoint, at context lengths
up to several times the training length. Every task scores teacher-forced through
`infer.generate.score` (the chunked prefill over the decode caches: memory is bounded by
--prefill-chunk and the cache, at any length); a task that does not fit the run is skipped
with a note.

  ppl_by_position  text_bytes / tokens runs: perplexity by position bucket ([0, 16), [16, 32),
                   [32, 64), ...) on --samples windows of the held-out (val) split, one curve
                   per length (the extrapolation curve), every length's windows starting at
                   the same places; targets that start a new document do not count, as in
                   training
  passkey          accuracy over length x depth (a heatmap): a passkey run uses its own
                   synthetic task; a text_bytes / tokens run hides a 5-digit key in held-out
                   text (--needle text|code) and asks for it; a sample counts when every
                   answer token is the argmax (so greedy decoding would print the key)
  mqar             mqar runs: answer accuracy against the number of key-value pairs

Writes DIR/results.json (every number) and a PNG per task (default DIR: RUN/eval/).
Bad input exits 2 with one line on stderr before the model loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import numpy as np

from longax.infer.__main__ import UsageError, checkpoint_steps, read_config

TASKS = ("ppl_by_position", "passkey", "mqar")
# (needle, question, answer): the key is hidden at `depth` of the filler, the question ends it.
NEEDLES = {"text": (" The pass key is {key}. Remember it. {key} is the pass key. ",
                    " What is the pass key? The pass key is", " {key}"),
           "code": ("\npass_key = {key}\n", "\nassert pass_key == ", "{key}")}


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m longax.infer.evaluate",
                              description=__doc__.splitlines()[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--workdir", required=True, help="a training run folder")
  p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated, of " + ", ".join(TASKS))
  p.add_argument("--lengths", default=None,
                 help="comma-separated context lengths (default: 1, 2 and 4 x data.seq_len)")
  p.add_argument("--out", default=None, help="output folder (default RUN/eval)")
  p.add_argument("--samples", type=int, default=16, help="sequences per length (and depth / pairs)")
  p.add_argument("--batch-size", type=int, default=8, help="sequences scored together")
  p.add_argument("--first-bucket", type=int, default=16,
                 help="ppl_by_position: positions [0, N) form the first bucket, then [N, 2N), "
                      "[2N, 4N), ... (the same buckets at every length)")
  p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="passkey: depths in [0, 1]")
  p.add_argument("--needle", default="text", choices=tuple(NEEDLES),
                 help="passkey on text: an English sentence or a Python assignment")
  p.add_argument("--pairs", default=None,
                 help="mqar: comma-separated pair counts (default: 1/2, 1, 2, 4 x the trained)")
  p.add_argument("--prefill-chunk", type=int, default=256, help="tokens per prefill step")
  p.add_argument("--mesh", default=None, metavar="AXIS=SIZE,...",
                 help="a device mesh as the trainer's (data, fsdp, tensor), e.g. data=2; "
                      "parameters shard as in training, sequences over data")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def _numbers(flag: str, raw: str, kind, lo, hi=None) -> list:
  try:
    values = [kind(x) for x in raw.split(",") if x.strip()]
  except ValueError:
    raise UsageError(f"{flag} {raw}: must be comma-separated {kind.__name__}s") from None
  bad = [v for v in values if v < lo or (hi is not None and v > hi)]
  if not values or bad:
    raise UsageError(f"{flag} {raw}: each must be >= {lo}" + (f" and <= {hi}" if hi is not None else ""))
  return values


def _mesh(raw: str | None):
  if raw is None:
    return None
  from longax.train.config import ConfigError, MeshConfig
  from longax.train.trainer import make_mesh
  try:
    sizes = {k.strip(): int(v) for k, v in (item.split("=") for item in raw.split(","))}
    mcfg = MeshConfig(**{"data": 1, **sizes})
  except (ValueError, TypeError):
    raise UsageError(f"--mesh {raw}: expects AXIS=SIZE,... of data, fsdp, tensor") from None
  try:
    return make_mesh(mcfg)
  except ConfigError as e:
    raise UsageError(f"--mesh {raw}: {e}") from None


class Scorer:
  """Scores [N, L] sequences in batches of --batch-size (the last padded), with a bar."""

  def __init__(self, model, args, mesh):
    self.model, self.args, self.mesh = model, args, mesh

  def __call__(self, tokens, targets, desc: str):
    from tqdm import tqdm
    from longax.infer.generate import score
    n, b = len(tokens), self.args.batch_size
    nll, hit = [], []
    for s in tqdm(range(0, n, b), desc=desc, leave=False, dynamic_ncols=True):
      x, y = tokens[s:s + b], targets[s:s + b]
      pad = ((0, b - len(x)), (0, 0))
      out = score(self.model, np.pad(x, pad), np.pad(y, pad),
                  prefill_chunk=self.args.prefill_chunk, mesh=self.mesh)
      nll.append(out[0][:len(x)])
      hit.append(out[1][:len(x)])
    return np.concatenate(nll), np.concatenate(hit)


# ---------------------------------------------------------------------------------- tasks


def bucket_edges(length: int, first: int) -> list[int]:
  """[0, first, 2 first, 4 first, ..., length]: doubling buckets, shared by every length."""
  edges = [0]
  while edges[-1] < length:
    edges.append(min(length, max(first, 2 * edges[-1])))
  return edges


def ppl_by_position(score, corpus, lengths, args) -> dict:
  """nll / perplexity per position bucket of `samples` val windows at each length."""
  data, starts = corpus
  fit = [n for n in lengths if n + 1 <= len(data)]
  # every length reads the same windows from the same starts: a causal model's curves
  # overlap where they share positions, and the longer ones go on past them
  offsets = np.linspace(0, len(data) - max(fit, default=0) - 1, args.samples).astype(np.int64)
  out = {}
  for length in lengths:
    if length not in fit:
      out[str(length)] = dict(skipped=f"the val split holds {len(data)} tokens, fewer than {length + 1}")
      continue
    idx = offsets[:, None] + np.arange(length + 1)
    seqs = np.asarray(data[idx], np.int64)
    docs = np.searchsorted(starts, idx, side="right") - 1
    mask = docs[:, 1:] == docs[:, :-1]
    nll, _ = score(seqs[:, :-1], seqs[:, 1:], f"ppl L={length}")
    edges = bucket_edges(length, args.first_bucket)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
      m = mask[:, lo:hi]
      mean = float((nll[:, lo:hi] * m).sum() / max(m.sum(), 1))
      rows.append(dict(start=int(lo), end=int(hi), nll=mean, ppl=float(np.exp(mean)),
                       targets=int(m.sum())))
    mean = float((nll * mask).sum() / max(mask.sum(), 1))
    out[str(length)] = dict(nll=mean, ppl=float(np.exp(mean)), targets=int(mask.sum()),
                            buckets=rows)
  return out


def passkey_synthetic(score, data_cfg, lengths, depths, args) -> dict:
  """The run's own passkey task at each (length, depth)."""
  from longax.train.data import passkey
  grid = {}
  for length in lengths:
    for depth in depths:
      cfg = dataclasses.replace(data_cfg, seq_len=length, depth=depth, batch_size=args.samples)
      bt = passkey(cfg, np.random.default_rng([args.seed, length, int(depth * 1000)]))
      _, hit = score(bt["tokens"], bt["targets"], f"passkey L={length} d={depth}")
      answer = bt["mask"] > 0
      grid[f"{length},{depth}"] = float(np.mean(np.all(hit | ~answer, axis=1)))
  return grid


def passkey_text(score, corpus, tokenizer, lengths, depths, args) -> dict:
  """A 5-digit key in a sentence at `depth` of held-out text, then the question."""
  data = np.asarray(corpus[0], np.int64)
  needle, question, answer = NEEDLES[args.needle]
  grid = {}
  for length in lengths:
    for depth in depths:
      rng = np.random.default_rng([args.seed, length, int(depth * 1000)])
      seqs, masks, skipped = [], [], None
      for _ in range(args.samples):
        key = str(rng.integers(10000, 100000))
        n_ids = tokenizer.encode(needle.format(key=key))
        q_ids, a_ids = tokenizer.encode(question), tokenizer.encode(answer.format(key=key))
        n_fill = length + 1 - len(n_ids) - len(q_ids) - len(a_ids)
        if n_fill < 0:
          skipped = f"needle + question take {length + 1 - n_fill} tokens, more than {length + 1}"
          break
        fill = np.take(data, rng.integers(0, len(data)) + np.arange(n_fill), mode="wrap")
        at = int(round(depth * n_fill))
        seq = np.concatenate([fill[:at], n_ids, fill[at:], q_ids, a_ids]).astype(np.int64)
        seqs.append(seq)
        masks.append(np.arange(length) >= length - len(a_ids))
      if skipped:
        grid[f"{length},{depth}"] = None
        continue
      seqs, answer_at = np.stack(seqs), np.stack(masks)
      _, hit = score(seqs[:, :-1], seqs[:, 1:], f"passkey L={length} d={depth}")
      grid[f"{length},{depth}"] = float(np.mean(np.all(hit | ~answer_at, axis=1)))
  return grid


def mqar_by_pairs(score, data_cfg, lengths, pairs, args) -> dict:
  """MQAR answer accuracy per (length, pairs); None where the pairs don't fit."""
  from longax.train.data import mqar
  out = {}
  for length in lengths:
    for n in pairs:
      if 2 * n + 1 > length or 2 * n + 2 > data_cfg.vocab_size:
        out[f"{length},{n}"] = None
        continue
      cfg = dataclasses.replace(data_cfg, seq_len=length, num_kv_pairs=n, batch_size=args.samples)
      bt = mqar(cfg, np.random.default_rng([args.seed, length, n]))
      _, hit = score(bt["tokens"], bt["targets"], f"mqar L={length} pairs={n}")
      out[f"{length},{n}"] = float((hit * bt["mask"]).sum() / bt["mask"].sum())
  return out


# ---------------------------------------------------------------------------------- plots


def plot(results: dict, out: pathlib.Path) -> list[str]:
  """A PNG per task that ran; [] (and one warning line) without matplotlib."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
  except ImportError:
    print("warning: matplotlib is not installed: no plots (results.json has every number)",
          file=sys.stderr)
    return []
  written, tasks, train_len = [], results["tasks"], results["train_seq_len"]
  title = f"{results['name']}, {results['data_task']} (trained at {train_len} tokens)"
  if "ppl_by_position" in tasks:
    fig, ax = plt.subplots(figsize=(6.4, 4))
    curves = [(int(n), r) for n, r in tasks["ppl_by_position"].items() if "buckets" in r]
    for i, (length, r) in enumerate(sorted(curves, reverse=True)):  # shorter ones on top
      b = r["buckets"]
      ax.plot([(x["start"] + x["end"]) / 2 for x in b], [x["ppl"] for x in b], "o-",
              ms=3 + 1.5 * (len(curves) - 1 - i), lw=1 + 1.2 * (len(curves) - 1 - i),
              label=f"L={length} (ppl {r['ppl']:.2f})", zorder=2 + i)
    ax.axvline(train_len, color="gray", ls="--", lw=1, label="training length")
    ax.set(xlabel="position in the context (bucket midpoints)", ylabel="perplexity (val)",
           xscale="log", yscale="log", title=title)
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.legend(fontsize=8)
    written.append(_save(fig, out / "ppl_by_position.png"))
  if "passkey" in tasks:
    grid, lengths, depths = tasks["passkey"]["accuracy"], *(
        sorted({float(k.split(",")[i]) for k in tasks["passkey"]["accuracy"]}) for i in (0, 1))
    acc = np.array([[np.nan if grid[f"{int(l)},{d}"] is None else grid[f"{int(l)},{d}"]
                     for l in lengths] for d in depths])
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2.5, 0.5 * len(depths) + 2))
    im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for (i, j), v in np.ndenumerate(acc):
      ax.text(j, i, "-" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [str(int(l)) for l in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set(xlabel="context length", ylabel="key depth", title=f"passkey accuracy: {title}")
    ax.title.set_fontsize(9)
    fig.colorbar(im, ax=ax)
    written.append(_save(fig, out / "passkey.png"))
  if "mqar" in tasks:
    fig, ax = plt.subplots(figsize=(6.4, 4))
    by_len = {}
    for k, v in tasks["mqar"]["accuracy"].items():
      length, n = map(int, k.split(","))
      if v is not None:
        by_len.setdefault(length, []).append((n, v))
    for length, pts in sorted(by_len.items()):
      ax.plot(*zip(*sorted(pts)), "o-", label=f"L={length}")
    ax.axvline(tasks["mqar"]["trained_pairs"], color="gray", ls="--", lw=1, label="trained pairs")
    ax.set(xlabel="key-value pairs", ylabel="answer accuracy", ylim=(0, 1.02), xscale="log",
           title=title)
    shown = sorted({n for pts in by_len.values() for n, _ in pts})
    ax.set_xticks(shown, [str(n) for n in shown])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.legend(fontsize=8)
    written.append(_save(fig, out / "mqar.png"))
  return written


def _save(fig, path: pathlib.Path) -> str:
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  import matplotlib.pyplot as plt
  plt.close(fig)
  return str(path)


# ----------------------------------------------------------------------------------- main


def check(args, run: dict) -> dict:
  """Every flag against the run, before the model loads: the tasks to run, their settings,
  and a note for each task that does not fit the run."""
  tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
  bad = [t for t in tasks if t not in TASKS]
  if not tasks or bad:
    raise UsageError(f"--tasks {args.tasks}: unknown task {bad[0] if bad else '(none)'!r}; "
                     f"valid: {', '.join(TASKS)}")
  for flag, v in (("--samples", args.samples), ("--batch-size", args.batch_size),
                  ("--first-bucket", args.first_bucket), ("--prefill-chunk", args.prefill_chunk)):
    if v < 1:
      raise UsageError(f"{flag}={v}: must be an int >= 1")
  data = run["data"]
  lengths = (_numbers("--lengths", args.lengths, int, 1) if args.lengths
             else [data["seq_len"] * k for k in (1, 2, 4)])
  plan = dict(lengths=lengths, depths=_numbers("--depths", args.depths, float, 0, 1), notes={})
  task = data["task"]
  corpus = task in ("text_bytes", "tokens")
  fits = {"ppl_by_position": corpus or f"needs a text_bytes or tokens run (this one is {task!r})",
          "passkey": corpus or task == "passkey" or
                     f"needs a passkey, text_bytes or tokens run (this one is {task!r})",
          "mqar": task == "mqar" or f"needs an mqar run (this one is {task!r})"}
  if task == "passkey" and min(lengths) < 9:
    fits["passkey"] = f"the passkey task needs lengths >= 9 (--lengths {args.lengths})"
  plan["tasks"] = [t for t in tasks if fits[t] is True]
  plan["notes"] = {t: fits[t] for t in tasks if fits[t] is not True}
  n = data["num_kv_pairs"]
  plan["pairs"] = (_numbers("--pairs", args.pairs, int, 1) if args.pairs else
                   sorted({max(1, n // 2), n, 2 * n, 4 * n}))
  return plan


def evaluate(args) -> dict:
  workdir = pathlib.Path(args.workdir)
  _, run = read_config(workdir)
  checkpoint_steps(workdir)
  plan = check(args, run)
  out = pathlib.Path(args.out) if args.out else workdir / "eval"
  if out.exists() and not out.is_dir():
    raise UsageError(f"--out {out}: is a file, not a folder")
  mesh = _mesh(args.mesh)
  from longax.train.config import from_dict
  exp = from_dict(run)
  corpus = tokenizer = None
  if exp.data.task in ("text_bytes", "tokens"):
    from longax.train.data import Dataset
    from longax.train.tokens import run_tokenizer
    from longax.models.config import ConfigError
    try:
      corpus = Dataset(exp.data).text.corpus("val")
      tokenizer = run_tokenizer(run)
    except ConfigError as e:
      raise UsageError(f"{workdir}/config.json: {e}") from None
    if tokenizer is None and "passkey" in plan["tasks"]:
      plan["tasks"].remove("passkey")
      plan["notes"]["passkey"] = "the run's token data has no tokenizer to write the needle with"
  for t, why in plan["notes"].items():
    print(f"note: {t} skipped: {why}", file=sys.stderr)
  from longax.infer.__main__ import load_model
  model, _ = load_model(workdir)
  score = Scorer(model, args, mesh)
  lengths, results = plan["lengths"], {}
  if "ppl_by_position" in plan["tasks"]:
    results["ppl_by_position"] = ppl_by_position(score, corpus, lengths, args)
  if "passkey" in plan["tasks"]:
    grid = (passkey_synthetic(score, exp.data, lengths, plan["depths"], args)
            if exp.data.task == "passkey" else
            passkey_text(score, corpus, tokenizer, lengths, plan["depths"], args))
    results["passkey"] = dict(accuracy=grid, needle=None if exp.data.task == "passkey" else
                              NEEDLES[args.needle])
  if "mqar" in plan["tasks"]:
    results["mqar"] = dict(accuracy=mqar_by_pairs(score, exp.data, lengths, plan["pairs"], args),
                           trained_pairs=exp.data.num_kv_pairs)
  report = dict(workdir=str(workdir), name=exp.name, data_task=exp.data.task,
                train_seq_len=exp.data.seq_len, checkpoint_step=max(checkpoint_steps(workdir)),
                lengths=lengths, samples=args.samples, tasks=results, skipped=plan["notes"])
  out.mkdir(parents=True, exist_ok=True)
  report["plots"] = plot(report, out)
  tmp = out / ".results.json.tmp"
  tmp.write_text(json.dumps(report, indent=1))
  tmp.replace(out / "results.json")
  return report


def summary(report: dict) -> str:
  lines = []
  for length, r in report["tasks"].get("ppl_by_position", {}).items():
    lines.append(f"ppl_by_position L={length}: " + (f"ppl {r['ppl']:.3f}" if "ppl" in r else r["skipped"]))
  for name in ("passkey", "mqar"):
    if name in report["tasks"]:
      acc = report["tasks"][name]["accuracy"]
      lines.append(f"{name}: " + ", ".join(f"{k}={'-' if v is None else f'{v:.2f}'}"
                                          for k, v in acc.items()))
  return "\n".join(lines)


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    report = evaluate(args)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(summary(report))
  out = pathlib.Path(args.out) if args.out else pathlib.Path(args.workdir) / "eval"
  print(f"wrote {out / 'results.json'}" + "".join(f", {p}" for p in report["plots"]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
