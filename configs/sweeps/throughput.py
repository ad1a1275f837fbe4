"""Training tokens/s and peak memory against sequence length, every mixer at (about) equal
parameter count: each mixer's MLP width (d_ff) is chosen so its model has the parameters of
the softmax model. Tokens per batch stay fixed (batch_size = TOKENS // seq_len).

    python -m longax.train.sweep configs/sweeps/throughput.py --workdir runs/throughput
    THROUGHPUT_SWEEP=gpu python -m longax.train.sweep configs/sweeps/throughput.py --workdir runs/tp-gpu

results.csv's `device` column names where the numbers come from (cpu, or the GPU's kind);
`peak_memory_bytes` is filled only where the device reports it (GPUs). The first logged
interval (compilation) is left out of tokens_per_s.

Sizes (THROUGHPUT_SWEEP=...): "cpu" (default): d_model 64, 2 layers, sequence 128-512, 4096
tokens per step, 20 steps (27 points; ~35 min on 2 shared CPU cores, 2026-11-26, mostly
compilation: its numbers are CPU ones, see the README); "gpu": d_model 512, 4 layers,
bfloat16, sequence 1024-16384, 65536 tokens per step, 50 steps (not run yet).
"""

import os

from longax.models import MIXERS, LinearConfig, LMConfig, count_params
from longax.train.config import DataConfig, ExperimentConfig, TrainConfig
from longax.train.sweep import Plot, Sweep

SIZES = {  # d_model, n_layers, dtype, seq_lens, tokens per step, steps
    "cpu": (64, 2, "float32", (128, 256, 512), 4096, 20),
    "gpu": (512, 4, "bfloat16", (1024, 2048, 4096, 8192, 16384), 65536, 50),
}


def base(d: int, layers: int, dtype: str, max_len: int, steps: int) -> ExperimentConfig:
  model = LMConfig(vocab_size=64, d_model=d, n_layers=layers, n_heads=max(d // 64, 2),
                   mixer="softmax", max_len=max_len, dtype=dtype,
                   linear=LinearConfig(chunk_size=64))
  return ExperimentConfig(
      name="throughput", model=model, data=DataConfig(task="mqar", vocab_size=64, num_kv_pairs=4),
      train=TrainConfig(steps=steps, log_every=5, eval_every=steps, eval_batches=1,
                        checkpoint_every=steps, keep_checkpoints=1))


def matched_d_ff(model: LMConfig, mixer: str, target: int) -> int:
  """The SwiGLU width (a multiple of 8) that brings `mixer`'s model nearest `target` params;
  the MLP adds 3 * d_model * d_ff per layer."""
  probe = model.__class__(**{**model.__dict__, "mixer": mixer, "d_ff": 64})
  slope = 3 * model.d_model * model.n_layers
  return max(8, round((64 + (target - count_params(probe)) / slope) / 8) * 8)


def get_sweep() -> Sweep:
  size = os.environ.get("THROUGHPUT_SWEEP", "cpu")
  if size not in SIZES:
    raise ValueError(f"THROUGHPUT_SWEEP={size!r}: must be one of {', '.join(SIZES)}")
  d, layers, dtype, seq_lens, tokens, steps = SIZES[size]
  cfg = base(d, layers, dtype, max(seq_lens), steps)
  target = count_params(cfg.model)
  # nsa's compression maps (2 x block_size x head_dim^2 per layer) alone outweigh the cpu
  # size's MLP, so no d_ff matches it there: it is compared in configs/mqar_nsa.py instead.
  mixers = [{"model.mixer": m, "model.d_ff": matched_d_ff(cfg.model, m, target)}
            for m in MIXERS if m != "nsa"]
  lengths = [{"data.seq_len": n, "data.batch_size": max(1, tokens // n)} for n in seq_lens]
  plots = [Plot(x="data.seq_len", y=y, hue="model.mixer", logx=True, logy=True,
                title=f"{size} sweep, ~{target / 1e6:.2f}M params, {tokens} tokens/step")
           for y in ("tokens_per_s", "peak_memory_bytes")]
  return Sweep(base=cfg, points=[m | n for m in mixers for n in lengths], plots=plots)
