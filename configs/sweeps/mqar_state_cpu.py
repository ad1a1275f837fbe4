"""MQAR accuracy against state size at a CPU size: attention vs fixed-state mixers.

    python -m longax.train.sweep configs/sweeps/mqar_state_cpu.py --workdir runs/mqar_state_cpu --jobs 2

Zoology (Arora et al. 2023): attention solves MQAR at every width; a fixed-state mixer needs
state that grows with the number of key-value pairs. Softmax attention, plain linear
attention and Mamba-2 (the cheapest fixed-state mixers on CPU), each for both layers with its
short causal conv on (kernel 4: `model.short_conv`, Mamba-2's own `d_conv`), at widths 32 /
64 / 128 and 4 / 16 pairs, sequence 128, 400 steps. The base is `configs/mqar.py` (batch 64,
vocabulary 64, SwiGLU 128, lr 3e-3 after 100 warmup steps). Its equivalent on the command line:

    python -m longax.train.sweep --config configs/mqar.py --grid model.mixer=softmax,linear,mamba2 \\
        --grid model.d_model=32,64,128 --grid data.num_kv_pairs=4,16 --set model.layer_pattern=none \\
        --set model.short_conv=4 --set data.seq_len=128 --set model.max_len=128 \\
        --set train.steps=400 --set train.eval_every=100 --set train.log_every=100 \\
        --set train.checkpoint_every=400 --workdir runs/mqar_state_cpu --jobs 2

About 30 minutes on 2 CPU cores with `--jobs 2` (2026-11-26). `mqar_state.py` is the
six-mixer version with the conv on and off (its CPU size, batch 32 over a 128-token
vocabulary, left every fixed-state mixer on the chance plateau in 250 steps).
"""

import pathlib

from longax.train.config import load, override
from longax.train.sweep import Plot, Sweep

BASE = ["model.layer_pattern=none", "model.short_conv=4", "data.seq_len=128",
        "model.max_len=128", "train.steps=400", "train.eval_every=100", "train.log_every=100",
        "train.checkpoint_every=400"]
PAIRS = (4, 16)


def get_sweep() -> Sweep:
  base = override(load(str(pathlib.Path(__file__).parents[1] / "mqar.py")), BASE)
  plots = tuple(Plot(x="state_size", y="best_eval_accuracy", hue="model.mixer", logx=True,
                     where={"data.num_kv_pairs": n}, file=f"accuracy_vs_state_{n}pairs.png",
                     title=f"MQAR, {n} key-value pairs, seq 128, 400 steps (CPU)")
                for n in PAIRS)
  return Sweep(base=base, grid={"model.mixer": ("softmax", "linear", "mamba2"),
                                "model.d_model": (32, 64, 128), "data.num_kv_pairs": PAIRS},
               plots=plots)
