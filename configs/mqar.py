"""Zoology's multi-query associative recall on a small attention + GLA hybrid (CPU-sized).

python -m longax.train --config configs/mqar.py [--set data.num_kv_pairs=16 ...]
"""

from longax.models import LinearConfig, LMConfig
from longax.train.config import DataConfig, ExperimentConfig, OptimConfig, TrainConfig


def get_config() -> ExperimentConfig:
  data = DataConfig(task="mqar", seq_len=64, batch_size=64, vocab_size=64, num_kv_pairs=8)
  model = LMConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=2, mixer="softmax",
                   layer_pattern=("gla", "softmax"), d_ff=128, max_len=64,
                   linear=LinearConfig(chunk_size=32))
  return ExperimentConfig(
      name="mqar", model=model, data=data,
      optim=OptimConfig(lr=3e-3, warmup_steps=100, weight_decay=0.0),
      train=TrainConfig(steps=1000, log_every=25, eval_every=250, checkpoint_every=500))
