"""A small GLA + softmax hybrid on a prepared token corpus (BPE), CPU-sized (minutes).

python -m longax.train.prepare --input ... --tokenizer bpe:2048 --out runs/corpus
python -m longax.train --config configs/tokens_small.py [--set data.path=runs/corpus]
python -m longax.infer.evaluate --workdir RUN --lengths 256,512,1024

model.vocab_size must be at least the corpus's vocabulary (meta.json's vocab_size); the
attention layer is full (RoPE, no window), so evaluating past data.seq_len shows how it
extrapolates.
"""

from longax.models import LinearConfig, LMConfig
from longax.train.config import DataConfig, ExperimentConfig, OptimConfig, TrainConfig


def get_config() -> ExperimentConfig:
  data = DataConfig(task="tokens", path="runs/corpus", seq_len=256, batch_size=16)
  model = LMConfig(vocab_size=2048, d_model=128, n_layers=4, n_heads=4, mixer="softmax",
                   layer_pattern=("gla", "softmax"), d_ff=384, max_len=256,
                   linear=LinearConfig(chunk_size=64))
  return ExperimentConfig(
      name="tokens_small", model=model, data=data,
      optim=OptimConfig(lr=3e-3, warmup_steps=50),
      train=TrainConfig(steps=600, log_every=20, eval_every=100, eval_batches=4,
                        checkpoint_every=300))
