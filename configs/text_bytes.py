"""Byte-level language model on a directory of text (default: Python's standard library).

python -m longax.train --config configs/text_bytes.py [--set data.path=/my/corpus]
"""

from longax.models import AttentionConfig, LMConfig
from longax.train.config import DataConfig, ExperimentConfig, OptimConfig, TrainConfig


def get_config() -> ExperimentConfig:
  data = DataConfig(task="text_bytes", seq_len=256, batch_size=16, path=None)
  model = LMConfig(vocab_size=256, d_model=128, n_layers=4, n_heads=4, mixer="mamba2",
                   layer_pattern=("mamba2", "softmax"), max_len=256,
                   attention=AttentionConfig(window=128))
  return ExperimentConfig(
      name="text_bytes", model=model, data=data,
      optim=OptimConfig(lr=2e-3, warmup_steps=200),
      train=TrainConfig(steps=2000, log_every=20, eval_every=200, checkpoint_every=500))
