"""A ~350M-parameter Mamba-2 / attention hybrid (2:1) for one GPU, byte-level text.

python -m longax.train --config configs/hybrid_350m.py --set data.path=/my/corpus
"""

from longax.models import LMConfig, Mamba2Config
from longax.train.config import DataConfig, ExperimentConfig, OptimConfig, TrainConfig


def get_config() -> ExperimentConfig:
  data = DataConfig(task="text_bytes", seq_len=2048, batch_size=16)
  model = LMConfig(vocab_size=256, d_model=1024, n_layers=26, n_heads=16, n_kv_heads=4,
                   mixer="mamba2", layer_pattern=("mamba2", "mamba2", "softmax"), d_ff=2816,
                   max_len=2048, dtype="bfloat16", param_dtype="float32",
                   mamba2=Mamba2Config(d_state=128, head_dim=64, chunk_size=128))
  return ExperimentConfig(
      name="hybrid_350m", model=model, data=data,
      optim=OptimConfig(lr=1e-3, warmup_steps=500, weight_decay=0.1),
      train=TrainConfig(steps=20000, log_every=10, eval_every=1000, checkpoint_every=1000,
                        remat="block"))
