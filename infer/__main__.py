"""python -m longax.infer --workdir DIR (--prompt TEXT | --prompt-tokens 1,2,3) --max-new-tokens N

Loads DIR/config.json and the latest checkpoint in DIR/checkpoints and prints the
continuation: text for byte-level models (data.task=text_bytes), token ids otherwise.
Bad input (no workdir, no checkpoint, a prompt the tokenizer can't encode) exits 2 with
one line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pathlib
import sys


class UsageError(Exception):
  pass


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m longax.infer", description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="a training run folder")
  g = p.add_mutually_exclusive_group(required=True)
  g.add_argument("--prompt", help="text (byte-level models)")
  g.add_argument("--prompt-tokens", help="comma-separated token ids")
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  p.add_argument("--top-k", type=int, default=None)
  p.add_argument("--top-p", type=float, default=None)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--stop-tokens", default="", help="comma-separated token ids")
  p.add_argument("--streaming", default=None, metavar="SINKS,WINDOW",
                 help="decode softmax layers with a StreamingLLM rolling cache of SINKS + WINDOW "
                      "slots (constant memory; tokens outside the window are forgotten)")
  return p.parse_args(argv)


def load_model(workdir: pathlib.Path, streaming: str | None = None):
  """(model, run config dict) from a run folder's config.json and latest checkpoint;
  `streaming="S,W"` gives attention layers S sinks and a window of W (same parameters)."""
  if not workdir.is_dir():
    raise UsageError(f"workdir {workdir} does not exist")
  cfg_path = workdir / "config.json"
  if not cfg_path.is_file():
    raise UsageError(f"{cfg_path} not found: is {workdir} a training run folder?")
  run = json.loads(cfg_path.read_text())
  ckpt = workdir / "checkpoints"
  steps = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []
  if not steps:
    raise UsageError(f"no checkpoint in {ckpt}")
  import orbax.checkpoint as ocp
  from flax import nnx
  from longax.models import LM, LMConfig
  from longax.models.config import from_dict
  cfg = from_dict(LMConfig, run["model"])
  if streaming:
    try:
      sinks, window = (int(x) for x in streaming.split(","))
    except ValueError:
      raise UsageError(f"--streaming expects SINKS,WINDOW, got {streaming!r}") from None
    cfg = dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, sinks=sinks,
                                                                  window=window))
  model = LM(cfg, rngs=nnx.Rngs(0))
  logging.getLogger("absl").setLevel(logging.ERROR)
  mngr = ocp.CheckpointManager(ckpt.absolute(), options=ocp.CheckpointManagerOptions(read_only=True))
  restored = mngr.restore(steps[-1], args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  params = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(params, restored["state"]["params"])
  nnx.update(model, params)
  return model, run


def encode(args, run, vocab: int) -> list[int]:
  byte_level = run.get("data", {}).get("task") == "text_bytes"
  if args.prompt is not None:
    if not byte_level:
      raise UsageError(f"--prompt needs a byte-level model (data.task=text_bytes); this run's "
                       f"task is {run.get('data', {}).get('task')!r}: use --prompt-tokens")
    tokens = list(args.prompt.encode("utf-8"))
  else:
    try:
      tokens = [int(t) for t in args.prompt_tokens.split(",") if t.strip()]
    except ValueError:
      raise UsageError(f"--prompt-tokens must be comma-separated integers, got {args.prompt_tokens!r}") from None
  bad = [t for t in tokens if not 0 <= t < vocab]
  if not tokens or bad:
    raise UsageError(f"the prompt cannot be encoded for this model: "
                     f"{'empty' if not tokens else f'token {bad[0]} is outside [0, {vocab})'}")
  return tokens


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    model, run = load_model(pathlib.Path(args.workdir), args.streaming)
    tokens = encode(args, run, model.cfg.vocab_size)
    from longax.infer.generate import generate
    stop = [int(t) for t in args.stop_tokens.split(",") if t.strip()]
    out = generate(model, [tokens], max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   seed=args.seed, stop_tokens=stop)[0]
  except (UsageError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.prompt is not None:
    print(bytes(out).decode("utf-8", errors="replace"))
  else:
    print(",".join(map(str, out)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
