"""Training throughput: runs a config for a few hundred steps, reports tokens/s and MFU.

    python -m longax.benchmarks.train --config configs/hybrid_350m.py --steps 200 [--set k=v]
    python -m longax.benchmarks.train --config configs/hybrid_350m.py --peer jla

The first logged interval (compilation) is dropped; the rest give median tokens/s and MFU
(MFU where the device's peak is known: `longax.train.trainer.PEAK_FLOPS`). `--peer jla`
trains the same model shape (width, depth, heads, layer pattern, SSM state, SwiGLU width,
vocabulary, batch, sequence, bf16 compute / f32 params, full remat per block) with
jax-linear-attention's own trainer on its synthetic data, so tokens/s compare like for
like; both MFUs use longax's FLOP count (`longax.models.flops_per_token`). `--profile DIR`
traces the run with `jax.profiler` and prints where the device time went
(`benchmarks/profile.py`: by kernel and by compiled program, ms per step).
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import sys
import tempfile

import jax

from longax.models import LMConfig, count_params, flops_per_token
from longax.train.config import ConfigError, ExperimentConfig, load, override
from longax.train.trainer import Trainer, peak_flops


def run_longax(cfg: ExperimentConfig, workdir: pathlib.Path) -> list[float]:
  """tokens/s of each logged interval after the first."""
  Trainer(cfg, workdir).run()
  rows = [json.loads(l) for l in open(workdir / "metrics.jsonl") if '"tokens_per_s"' in l]
  return [r["tokens_per_s"] for r in rows[1:]]


def jla_mapping(cfg: ExperimentConfig, outdir: pathlib.Path) -> dict:
  """jax-linear-attention's experiment mapping for the model shape of `cfg.model`."""
  m: LMConfig = cfg.model
  kinds = {"softmax": "attention", "mamba2": "mamba2"}
  if set(m.layer_mixers) - set(kinds):
    raise SystemExit(f"--peer jla: mixers {sorted(set(m.layer_mixers) - set(kinds))} have no "
                     f"jla counterpart mapped here (only {sorted(kinds)})")
  hd = m.attention.head_dim or m.d_model // m.n_heads
  s = m.mamba2
  return dict(
      name="longax-shape",
      model=dict(vocab_size=m.vocab_size, d_model=m.d_model, n_layers=m.n_layers, d_ff=m.d_ff,
                 tie_embeddings=m.tie_embeddings, param_dtype=m.param_dtype,
                 compute_dtype=m.dtype, remat="full" if cfg.train.remat == "block" else "none",
                 layer_types=[kinds[k] for k in m.layer_mixers],
                 attention=dict(num_heads=m.n_heads, num_kv_heads=m.n_kv_heads or m.n_heads,
                                head_dim=hd, qk_norm=m.attention.qk_norm),
                 ssm=dict(d_state=s.d_state, expand=s.expand, head_dim=s.head_dim,
                          n_groups=s.n_groups, conv_size=s.d_conv)),
      train=dict(max_steps=cfg.train.steps, seq_len=cfg.data.seq_len,
                 micro_batch_per_replica=cfg.data.batch_size // jax.device_count(),
                 log_every=cfg.train.log_every, eval_every=0, final_eval=False,
                 save_every=0, save_final=False, output_dir=str(outdir)),
      optim=dict(lr=cfg.optim.lr, warmup_steps=min(cfg.optim.warmup_steps, cfg.train.steps)),
      data=dict(source="synthetic"))


def run_jla(cfg: ExperimentConfig, workdir: pathlib.Path) -> list[float]:
  try:
    from jla.config import config_from_mapping
    from jla.training.trainer import Trainer as JlaTrainer
  except ImportError as e:
    raise SystemExit(f"--peer jla: jax-linear-attention is not installed ({e})")
  mapping = jla_mapping(cfg, workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "jla_config.json").write_text(json.dumps(mapping, indent=1))
  history = JlaTrainer(config_from_mapping(mapping)).run().history
  check_param_count(cfg, workdir / "run.json")
  return [r["tokens_per_sec"] for r in history[1:]]


def check_param_count(cfg: ExperimentConfig, run_json: pathlib.Path) -> None:
  """Warns when the peer's model (its run.json) is not the size of longax's."""
  theirs = json.loads(run_json.read_text()).get("parameters")
  if theirs != count_params(cfg.model):
    print(f"warning: jla's model has {theirs} parameters, longax's {count_params(cfg.model)}",
          file=sys.stderr)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True)
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--set", dest="overrides", action="append", default=[])
  p.add_argument("--peer", choices=["jla"], default=None,
                 help="train the same model shape with a peer's trainer instead")
  p.add_argument("--workdir", default=None, help="keep the run here (default: a temp dir)")
  p.add_argument("--json", default=None)
  p.add_argument("--profile", default=None, metavar="DIR",
                 help="trace the run here and print device time by kernel and by compiled program")
  a = p.parse_args(argv)
  try:
    cfg = override(load(a.config), [f"train.steps={a.steps}", "train.log_every=10",
                                    f"train.eval_every={a.steps}", "train.eval_batches=1",
                                    f"train.checkpoint_every={a.steps}", *a.overrides])
  except ConfigError as e:
    raise SystemExit(f"error: {e}")
  with tempfile.TemporaryDirectory() as tmp:
    workdir = pathlib.Path(a.workdir or f"{tmp}/run")
    run = run_jla if a.peer == "jla" else run_longax
    if a.profile:
      from longax.benchmarks.profile import options
      with jax.profiler.trace(a.profile, profiler_options=options()):
        tps = run(cfg, workdir)
    else:
      tps = run(cfg, workdir)
  fpt = flops_per_token(cfg.model, cfg.data.seq_len)
  peak = peak_flops(jax.devices()[0])
  med = statistics.median(tps) if tps else None
  if not tps:  # e.g. stopped by a signal (the trainer stops cleanly on SIGTERM) or too few steps
    print(f"warning: no timed interval: the first logged interval (compilation) is dropped and "
          f"none followed (--steps {a.steps}, one interval per 10 steps; was the run stopped "
          f"early?)", file=sys.stderr)
  out = dict(date=datetime.date.today().isoformat(), device=jax.devices()[0].device_kind,
             n_devices=jax.device_count(), trainer=a.peer or "longax", config=a.config,
             overrides=a.overrides, steps=a.steps, params=count_params(cfg.model),
             seq_len=cfg.data.seq_len, batch=cfg.data.batch_size, flops_per_token=fpt,
             tokens_per_s=med,
             mfu=med * fpt / (peak * jax.device_count()) if med and peak else None)
  print(json.dumps(out, indent=1))
  if a.profile:
    from longax.benchmarks.profile import report, summarize
    summary = summarize(a.profile, steps=a.steps)
    print(report(summary))
    out["profile"] = summary
  if a.json:
    with open(a.json, "w") as f:
      json.dump(out, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
