"""Passkey retrieval at 1k tokens on one GPU: the needle check of MInference's sparse prefill.

python -m longax.train --config configs/passkey_1k.py --workdir runs/passkey_1k     # H100: ~1 min
python -m longax.benchmarks.sparse_prefill --workdir runs/passkey_1k \\
    --budgets 64,256 --block 64 --depths 0.1,0.5,0.9 --n 32

A 4-digit key (tokens 3-12) after a marker (2) at half the context, 1k tokens of random
filler (13-63), the question (1) at the end: the loss counts the key's digits. Two full
softmax layers (two heads of 128, the Hopper kernels' head size), so every layer is one the
sparse prefill makes sparse. `max_len` leaves room for the answer after the prompt.
On an H100 (2026-11-26) eval accuracy was 0.95 at step 250 and 1.0 from step 750. The same
model at 8k tokens (batch 16, lr 1e-3, 600 steps) stayed at chance (loss 2.2, ln 10 = 2.3);
to reach 8k, go on from this run (`--set train.init_from=runs/passkey_1k --set
data.seq_len=8192 --set model.max_len=8256`; not yet measured).
"""

from longax.models import LMConfig
from longax.train.config import DataConfig, ExperimentConfig, OptimConfig, TrainConfig


def get_config() -> ExperimentConfig:
  data = DataConfig(task="passkey", seq_len=1024, batch_size=32, vocab_size=64, depth=0.5)
  model = LMConfig(vocab_size=64, d_model=256, n_layers=2, n_heads=2, mixer="softmax", d_ff=512,
                   max_len=1024 + 64)
  return ExperimentConfig(
      name="passkey_1k", model=model, data=data,
      optim=OptimConfig(lr=3e-3, warmup_steps=50, weight_decay=0.0),
      train=TrainConfig(steps=1500, log_every=50, eval_every=250, checkpoint_every=250))
