"""FlashSigmoid (Ramapuram et al. 2024): sigmoid attention with the bias -log n matches softmax;
without the bias it trails. A byte-level LM (configs/text_bytes.py, Python's stdlib as text)
with softmax, sigmoid with bias -log(max_len) (longax's default) and sigmoid with bias 0.

    python -m longax.train.sweep configs/sweeps/sigmoid_bias.py --workdir runs/sigmoid_bias
    python -m longax.train.sweep configs/sweeps/sigmoid_bias.py --workdir runs/sigmoid_bias_big \\
        --set train.steps=5000 --set model.d_model=256 --set model.n_layers=6

Default size: 2 layers, d_model 64, sequence 128, 300 steps, 2 seeds (6 points): 2 min 20 s
on 2 shared CPU cores (2026-11-26, --jobs 1, ~20 s a point). Out: best eval bits per byte
per variant (`best_eval_bits_per_byte_vs_model.mixer.png`).
"""

import pathlib

from longax.train.config import load, override
from longax.train.sweep import Plot, Sweep

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "text_bytes.py"
SMALL = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.mixer=softmax",
         "model.layer_pattern=none", "model.attention.window=none", "data.seq_len=128",
         "model.max_len=128", "data.batch_size=16", "train.steps=300", "train.eval_every=100",
         "train.checkpoint_every=300", "optim.warmup_steps=30"]


def get_sweep() -> Sweep:
  points = [{"model.mixer": "softmax"},
            {"model.mixer": "sigmoid", "model.attention.sigmoid_bias": None},  # -log(max_len)
            {"model.mixer": "sigmoid", "model.attention.sigmoid_bias": 0.0}]
  return Sweep(base=override(load(CONFIG), SMALL), points=points, seeds=(0, 1),
               plots=[Plot(x="model.mixer", y="best_eval_bits_per_byte",
                           hue=("model.mixer", "model.attention.sigmoid_bias"),
                           title="byte LM: softmax vs sigmoid (bias none = -log n)")])
