"""python -m longax.infer --workdir DIR (--prompt TEXT | --prompt-tokens 1,2,3) --max-new-tokens N

Loads DIR/config.json and the newest readable checkpoint in DIR/checkpoints and prints the
continuation: text for `--prompt` (byte-level runs, data.task=text_bytes, and token runs
whose prepared data has a tokenizer), token ids for `--prompt-tokens`.
Bad input (a flag out of range, no workdir, no checkpoint, a prompt the tokenizer can't
encode or longer than the model takes) exits 2 with one line on stderr, before the model
is loaded.

`--sequence-parallel P` prefills the prompt sequence-parallel over P devices (a mesh
data = devices / P, sequence = P; `--sp-attention`, `--sp-layout`), then decodes as usual.
`--sparse-prefill vertical_slash|block_topk` prefills the full softmax layers sparsely
(MInference: a per-head search on `--calibration-tokens`, default the prompt), then decodes
densely.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys


class UsageError(Exception):
  pass


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m longax.infer", description=__doc__.splitlines()[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--workdir", required=True, help="a training run folder")
  g = p.add_mutually_exclusive_group(required=True)
  g.add_argument("--prompt", help="text (runs with a tokenizer: text_bytes, tokens)")
  g.add_argument("--prompt-tokens", help="comma-separated token ids")
  p.add_argument("--max-new-tokens", type=int, default=64,
                 help="tokens to generate (>= 1); with a full-attention layer, prompt + new "
                      "tokens must fit model.max_len")
  p.add_argument("--temperature", type=float, default=0.0, help=">= 0; 0: greedy")
  p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest (>= 1)")
  p.add_argument("--top-p", type=float, default=None, help="nucleus sampling, in (0, 1]")
  p.add_argument("--seed", type=int, default=0, help="sampling seed")
  p.add_argument("--stop-tokens", default="", help="comma-separated token ids")
  p.add_argument("--prefill-chunk", type=int, default=64,
                 help="prompt tokens per prefill step (>= 1)")
  p.add_argument("--streaming", default=None, metavar="SINKS,WINDOW",
                 help="decode softmax layers with a StreamingLLM rolling cache of SINKS + WINDOW "
                      "slots (constant memory, any length; tokens outside the window are "
                      "forgotten)")
  p.add_argument("--sequence-parallel", type=int, default=1, metavar="P",
                 help="prefill the prompt with its sequence split over P devices (ring / "
                      "Ulysses attention, LASP-2); P must divide the device count; the first "
                      "floor(T/P)*P tokens (zigzag: 2P) go in one pass, the rest by steps")
  p.add_argument("--sp-attention", default="ring", choices=("ring", "ulysses"),
                 help="attention scheme of the sequence-parallel prefill")
  p.add_argument("--sp-layout", default="contiguous", choices=("contiguous", "zigzag"),
                 help="how the prompt splits over the devices (zigzag balances causal work)")
  p.add_argument("--sparse-prefill", default=None, metavar="KIND",
                 help="prefill the full softmax layers sparsely (MInference), KIND "
                      "vertical_slash or block_topk, with a per-head pattern search on the "
                      "calibration prompt; decoding stays dense")
  p.add_argument("--sparse-budget", type=int, default=1024,
                 help="sparse prefill: keys per query (vertical + slash, or blocks x block)")
  p.add_argument("--sparse-block", type=int, default=64,
                 help="sparse prefill (block_topk): tokens per block")
  p.add_argument("--sparse-summary", action="store_true",
                 help="sparse prefill (block_topk): each skipped key block still seen as one "
                      "key (its mean key and value, weighing as its tokens)")
  p.add_argument("--calibration-tokens", action="append", default=None,
                 help="sparse prefill: comma-separated token ids of a prompt the per-head "
                      "search runs on (repeatable: each head's error averaged over them; "
                      "default: the prompt)")
  return p.parse_args(argv)


def _ints(flag: str, raw: str) -> list[int]:
  try:
    return [int(t) for t in raw.split(",") if t.strip()]
  except ValueError:
    raise UsageError(f"{flag} must be comma-separated integers, got {raw!r}") from None


def parse_streaming(raw: str | None) -> tuple[int, int] | None:
  """`SINKS,WINDOW` -> (sinks >= 0, window >= 1)."""
  if raw is None:
    return None
  parts = raw.split(",")
  if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
    raise UsageError(f"--streaming expects SINKS,WINDOW (two integers), got {raw!r}")
  sinks, window = (int(p) for p in parts)
  if sinks < 0 or window < 1:
    raise UsageError(f"--streaming {raw}: SINKS must be >= 0 and WINDOW >= 1")
  return sinks, window


def read_config(workdir: pathlib.Path, streaming: tuple[int, int] | None = None):
  """(LMConfig, run config dict) from DIR/config.json; `streaming` = (sinks, window) gives
  the attention layers a rolling cache (the same parameters)."""
  if not workdir.is_dir():
    raise UsageError(f"workdir {workdir} does not exist")
  cfg_path = workdir / "config.json"
  if not cfg_path.is_file():
    raise UsageError(f"{cfg_path} not found: is {workdir} a training run folder?")
  from longax.models import LMConfig
  from longax.models.config import ConfigError, from_dict
  try:
    run = json.loads(cfg_path.read_text())
    cfg = from_dict(LMConfig, run["model"])
    if streaming:
      sinks, window = streaming
      cfg = dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, sinks=sinks,
                                                                    window=window))
  except ConfigError as e:
    raise UsageError(f"{'--streaming: ' if streaming else f'{cfg_path}: '}{e}") from None
  except (ValueError, KeyError, TypeError) as e:
    raise UsageError(f"{cfg_path}: not a longax run config ({type(e).__name__}: {e})") from None
  return cfg, run


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
  ckpt = workdir / "checkpoints"
  steps = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []
  if not steps:
    raise UsageError(f"no checkpoint in {ckpt}")
  return steps


def load_model(workdir: pathlib.Path, streaming: str | tuple[int, int] | None = None):
  """(model, run config dict) from a run folder's config.json and newest readable
  checkpoint (unreadable ones are skipped with a warning)."""
  streaming = parse_streaming(streaming) if isinstance(streaming, str) else streaming
  cfg, run = read_config(workdir, streaming)
  ckpt = workdir / "checkpoints"
  checkpoint_steps(workdir)  # none: one line
  from flax import nnx
  from longax.models import LM
  from longax.train.workdir import read_params
  model = LM(cfg, rngs=nnx.Rngs(0))
  restored, _, tried = read_params(workdir)
  if restored is None:
    raise UsageError(f"no checkpoint in {ckpt} restores (tried steps {', '.join(map(str, tried))})")
  params = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(params, restored)
  nnx.update(model, params)
  return model, run


def tokenizer_of(run):
  """The run's tokenizer (bytes for text_bytes, the prepared folder's for tokens), else None."""
  from longax.models.config import ConfigError
  from longax.train.tokens import run_tokenizer
  try:
    return run_tokenizer(run)
  except ConfigError as e:
    raise UsageError(f"the run's tokenizer: {e}") from None


def encode(args, run, vocab: int, tokenizer=None) -> list[int]:
  if args.prompt is not None:
    if tokenizer is None:
      raise UsageError(f"--prompt needs a run with a tokenizer (data.task=text_bytes, or tokens "
                       f"prepared with one); this run's task is "
                       f"{run.get('data', {}).get('task')!r}: use --prompt-tokens")
    tokens = tokenizer.encode(args.prompt)
  else:
    tokens = _ints("--prompt-tokens", args.prompt_tokens)
  bad = [t for t in tokens if not 0 <= t < vocab]
  if not tokens or bad:
    raise UsageError(f"the prompt cannot be encoded for this model: "
                     f"{'empty' if not tokens else f'token {bad[0]} is outside [0, {vocab})'}")
  return tokens


def warn_streaming(cfg_trained, streaming, total: int) -> None:
  """One line where --streaming changes what the model computes (or changes nothing)."""
  if streaming is None:
    return
  sinks, window = streaming
  if not {"softmax", "sigmoid"} & set(cfg_trained.layer_mixers):
    print("warning: --streaming has no effect: this model has no softmax / sigmoid layers",
          file=sys.stderr)
  elif cfg_trained.attention.window is None and total > sinks + window:
    print(f"warning: --streaming {sinks},{window}: the model was trained with full attention; "
          f"past {sinks + window} of these {total} tokens its attention layers see only the "
          f"first {sinks} and the last {window}", file=sys.stderr)


def check_sparse(args, cfg, tokens: list[int]) -> list[list[int]] | None:
  """The --sparse-* flags against the model; returns the calibration prompts (None when
  there is no sparse prefill). Every failure is one line."""
  if args.sparse_prefill is None:
    for flag, on in (("--calibration-tokens", args.calibration_tokens is not None),
                     ("--sparse-summary", args.sparse_summary)):
      if on:
        raise UsageError(f"{flag} needs --sparse-prefill")
    return None
  from longax.infer.sparse import check
  check(cfg, args.sparse_prefill, args.sparse_budget, args.sparse_block)
  if args.sparse_summary and args.sparse_prefill != "block_topk":
    raise UsageError(f"--sparse-summary is for --sparse-prefill block_topk, not {args.sparse_prefill}")
  if args.sequence_parallel > 1:
    raise UsageError("--sparse-prefill does not run with --sequence-parallel: drop one of them")
  if args.calibration_tokens is None:
    return [tokens]
  prompts = []
  for text in args.calibration_tokens:
    calibration = _ints("--calibration-tokens", text)
    bad = [t for t in calibration if not 0 <= t < cfg.vocab_size]
    if not calibration or bad:
      raise UsageError(f"--calibration-tokens: {'empty' if not calibration else f'token {bad[0]} is outside [0, {cfg.vocab_size})'}")
    if len(calibration) > cfg.max_len:
      raise UsageError(f"--calibration-tokens: {len(calibration)} tokens exceed the model's "
                       f"max_len {cfg.max_len}")
    prompts.append(calibration)
  return prompts


def sequence_mesh(p: int):
  """The mesh (data = devices / p, sequence = p) of --sequence-parallel p; None for p = 1."""
  if p < 1:
    raise UsageError(f"--sequence-parallel={p}: must be >= 1")
  if p == 1:
    return None
  import jax
  import numpy as np
  from jax.sharding import Mesh
  devices = jax.devices()
  if len(devices) % p:
    raise UsageError(f"--sequence-parallel={p}: must divide the device count "
                     f"({len(devices)} {devices[0].platform} devices)")
  return Mesh(np.asarray(devices).reshape(len(devices) // p, p), ("data", "sequence"))


def _flag_error(e) -> str:
  """generate's FieldError, in the CLI's flag names (top_k -> --top-k)."""
  from longax.models.config import show
  return f"--{e.key.replace('_', '-')}={show(e.value)}: {e.allowed}"


def main(argv=None) -> int:
  args = parse_args(argv)
  from longax.models.config import FieldError
  try:
    streaming = parse_streaming(args.streaming)
    stop = _ints("--stop-tokens", args.stop_tokens)
    workdir = pathlib.Path(args.workdir)
    cfg, run = read_config(workdir, streaming)
    checkpoint_steps(workdir)
    tokenizer = tokenizer_of(run) if args.prompt is not None else None
    tokens = encode(args, run, cfg.vocab_size, tokenizer)
    from longax.infer.generate import check_request, check_sequence_parallel, generate
    request = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_tokens=stop,
                   prefill_chunk=args.prefill_chunk)
    check_request(cfg, [tokens], **request)
    check_sequence_parallel(cfg, args.sequence_parallel, args.sp_attention, args.sp_layout)
    calibration = check_sparse(args, cfg, tokens)
    mesh = sequence_mesh(args.sequence_parallel)
    warn_streaming(read_config(workdir)[0], streaming, len(tokens) + args.max_new_tokens)
    model, _ = load_model(workdir, streaming)
    plan = None
    if args.sparse_prefill is not None:
      from longax.infer.sparse import search
      plan = search(model, calibration, kind=args.sparse_prefill, budget=args.sparse_budget,
                    block=args.sparse_block, summary=args.sparse_summary)
    out = generate(model, [tokens], **request, mesh=mesh, sp_attention=args.sp_attention,
                   sp_layout=args.sp_layout, sparse_prefill=plan)[0]
  except FieldError as e:
    print(f"error: {_flag_error(e)}", file=sys.stderr)
    return 2
  except (UsageError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.prompt is not None:
    print(tokenizer.decode(out))
  else:
    print(",".join(map(str, out)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
