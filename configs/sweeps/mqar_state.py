"""Zoology / Based: MQAR accuracy against recurrent state size, per mixer.

    python -m longax.train.sweep configs/sweeps/mqar_state.py --workdir runs/mqar_state --jobs 2
    MQAR_SWEEP=full python -m longax.train.sweep configs/sweeps/mqar_state.py --workdir runs/mqar_state_full

Attention, Based, Mamba, Mamba-2, GLA and plain linear attention, each as a 2-layer model, at
several widths (model.d_model) and key-value counts (data.num_kv_pairs), each with its short
causal conv (kernel 4) and without: model.short_conv=4 / 0 for attention and the linear
mixers (on q, k, v), model.mamba.d_conv / model.mamba2.d_conv=4 / 1 for the Mamba mixers
(1: a per-channel scale, no mixing over time). The paper's claim (Arora et al. 2023,
Zoology): attention solves MQAR at every width; a fixed-state mixer needs state that grows
with the number of pairs; a short conv helps every mixer. The x axis is
`longax.models.state_size` (decode-state bytes after seq_len tokens: attention's KV cache
grows with the sequence, the others' do not).

Sizes (MQAR_SWEEP=...): "small" (default, for CPU): width 64, 4 and 8 pairs, sequence 64,
250 steps, 24 points; "smoke": width 32, 4 pairs, 50 steps, sequence 32, 12 points (checks
the pipeline, not the claim); "full": widths 32-256, 4-16 pairs, 2000 steps, sequence 128,
144 points (a GPU's). More steps: --set train.steps=N; a mixer's options: --set
model.linear.feature_dim=... (not swept keys). On the CPU sizes the Mamba-1 points run with
model.impl=reference: its sequential scan is ~4x faster on CPU than the chunked XLA one
(0.54 s vs 2.2 s per forward+backward at [32, 64, 128] x 16 states, 2026-11-26).

Cost of "small" on 2 CPU cores shared with other jobs (load ~16, 2026-11-26, --jobs 2-3):
linear ~150-200 s a point, softmax ~300 s, GLA, Mamba-2 and Mamba-1 (reference scan) ~450 s,
Based 450-700 s; the whole sweep took about an hour. Results and plots:
benchmarks/results/sweeps/mqar_state/ and the README (Sweeps: Results). Width 32 is left
out of "small": at 300 steps even attention with the conv stayed at 0.55 (4 pairs) and 0.10
(8 pairs) accuracy there (it needs more steps, not more state).
"""

import os

from longax.models import LinearConfig, LMConfig
from longax.train.config import DataConfig, ExperimentConfig, OptimConfig, TrainConfig
from longax.train.sweep import Plot, Sweep

MIXERS = ("softmax", "gla", "linear", "mamba2", "based", "mamba")  # cheapest on CPU first
SSM = ("mamba", "mamba2")  # their conv is model.<mixer>.d_conv; the others' model.short_conv
SIZES = {  # widths, pairs, steps, seq_len
    "smoke": ((32,), (4,), 50, 32),
    "small": ((64,), (4, 8), 250, 64),
    "full": ((32, 64, 128, 256), (4, 8, 16), 2000, 128),
}
CONV = 4  # the short conv's kernel when on; off: none (attention, linear) or 1 (Mamba)


def conv(mixer: str, on: bool) -> dict:
  """The override that turns `mixer`'s short causal conv on or off."""
  if mixer in SSM:
    return {f"model.{mixer}.d_conv": CONV if on else 1}
  return {"model.short_conv": CONV if on else 0}


def base(steps: int, seq_len: int) -> ExperimentConfig:
  model = LMConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=2,
                   mixer="softmax", max_len=seq_len,
                   linear=LinearConfig(chunk_size=32, based_window=16))
  return ExperimentConfig(
      name="mqar_state", model=model,
      data=DataConfig(task="mqar", seq_len=seq_len, batch_size=32, vocab_size=128),
      optim=OptimConfig(lr=3e-3, warmup_steps=min(100, steps // 10), weight_decay=0.0),
      train=TrainConfig(steps=steps, log_every=max(steps // 10, 1), eval_every=max(steps // 4, 1),
                        checkpoint_every=steps, keep_checkpoints=1))


def get_sweep() -> Sweep:
  size = os.environ.get("MQAR_SWEEP", "small")
  if size not in SIZES:
    raise ValueError(f"MQAR_SWEEP={size!r}: must be one of {', '.join(SIZES)}")
  widths, pairs, steps, seq_len = SIZES[size]
  points = [{"model.mixer": m} | conv(m, on) for m in MIXERS for on in (True, False)]
  if size != "full":  # CPU sizes: Mamba-1's sequential scan, 4x faster there than the chunked one
    points = [p | {"model.impl": "reference"} if p["model.mixer"] == "mamba" else p for p in points]
  hue = ("model.mixer", "model.short_conv", "model.mamba.d_conv", "model.mamba2.d_conv")
  plots = [Plot(x="state_size", y="best_eval_accuracy", hue=hue, logx=True,
                where={"data.num_kv_pairs": n}, file=f"accuracy_vs_state_{n}pairs.png",
                title=f"MQAR, {n} key-value pairs, seq {seq_len} "
                      f"(short_conv=0 / d_conv=1: no short conv)")
           for n in pairs]
  return Sweep(base=base(steps, seq_len), points=points,
               grid={"data.num_kv_pairs": pairs, "model.d_model": widths}, plots=plots)
