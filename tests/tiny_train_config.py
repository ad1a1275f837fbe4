"""A tiny MQAR experiment for the training tests."""

from longax.models import LinearConfig, LMConfig
from longax.train.config import DataConfig, ExperimentConfig, OptimConfig, TrainConfig


def get_config() -> ExperimentConfig:
  return ExperimentConfig(
      name="tiny",
      model=LMConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=2, mixer="softmax",
                     layer_pattern=("gla", "softmax"), d_ff=64, max_len=32,
                     linear=LinearConfig(chunk_size=16)),
      data=DataConfig(task="mqar", seq_len=32, batch_size=8, vocab_size=32, num_kv_pairs=4),
      optim=OptimConfig(lr=3e-3, warmup_steps=2),
      train=TrainConfig(steps=8, log_every=1, eval_every=4, eval_batches=1,
                        checkpoint_every=4))
