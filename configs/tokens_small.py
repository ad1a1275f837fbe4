"""A small GLA + softmax hybrid on a prepared token corpus (BPE), CPU-sized (minutes).

python -m longax.train.prepare --input ... --tokenizer bpe:1024 --out runs/corpus
python -m longax.train --config configs/tokens_small.py [--set data.path=runs/corpus]
python -m longax.infer.evaluate --workdir RUN --lengths 128,256,512

model.vocab_size must be at least the corpus's vocabulary (meta.json's vocab_size); the
attention layer is full (RoPE, no window), so evaluating past data.seq_len shows how it
extrapolates.
"""

from longax.models import LinearConfig, LMConfig
from longax.train.config import DataConfig, ExperimentConfig, OptimConfig, TrainConfig


def get_config() -> ExperimentConfig:
  data = DataConfig(task="tokens", path="runs/corpus", seq_len=128, batch_size=16)
  model = LMConfig(vocab_size=1024, d_model=96, n_layers=2, n_heads=2, mixer="softmax",
                   layer_pattern=("gla", "softmax"), d_ff=256, max_len=128,
                   linear=LinearConfig(chunk_size=32))
  return ExperimentConfig(
      name="tokens_small", model=model, data=data,
      optim=OptimConfig(lr=3e-3, warmup_steps=50),
      train=TrainConfig(steps=500, log_every=20, eval_every=100, eval_batches=4,
                        checkpoint_every=250))
