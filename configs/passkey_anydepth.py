"""Passkey retrieval with the key anywhere: a length curriculum for the needle check.

The first stage (this config): 128 tokens, the key at a uniform place per sequence
(`data.depth=None`), so the model learns to find the marker and copy the key after it, not
the key's place (what `configs/passkey_1k.py`, key at depth 0.5, learns). Each later stage
starts from the previous one's parameters (`train.init_from`) at 4x the length:

python -m longax.train --config configs/passkey_anydepth.py --workdir runs/pk-128
python -m longax.train --config configs/passkey_anydepth.py --workdir runs/pk-512 \\
    --set data.seq_len=512 --set data.batch_size=16 --set optim.lr=1e-3 --set train.steps=300 \\
    --set train.init_from=runs/pk-128
python -m longax.train --config configs/passkey_anydepth.py --workdir runs/pk-2k \\
    --set data.seq_len=2048 --set data.batch_size=16 --set optim.lr=1e-3 --set train.steps=300 \\
    --set train.init_from=runs/pk-512
(... 8192 from runs/pk-2k), then the needle check at every depth:
python -m longax.benchmarks.sparse_prefill --workdir runs/pk-8k --budgets 256,1024 --block 64 \\
    --depths 0.1,0.5,0.9 --n 32

Measured on the 2-core CPU (2026-11-27): 128 tokens, eval accuracy 1.0 at every depth after
1500 steps (7 min); 512 from it, 1.0 at step 100; 1024 from that, 0.99 at step 75, and the
needle check on it (`sparse_prefill`, depths 0.1 / 0.5 / 0.9) gave dense 1.0 at each. A model holds for distances up to about its
training length (the 128 model: 1.0 at 128 and 0.3-1.0 at 512, by depth). From scratch at 1k
tokens (H100, d_model 256) the same task stayed at chance for 1500 steps: start short. On the H100 (2026-11-27) every
stage up to 8192 reached 0.99-1.0 within 100 of its 300 steps (25-59 s per stage), and the
needle check at 8k gave dense 1.0 / 0.97 / 1.0 at depths 0.1 / 0.5 / 0.9 (README).
Two softmax layers of two 64-wide heads (a head size the Hopper kernels take); `max_len`
leaves room for 8k prompts.
"""

from longax.models import LMConfig
from longax.train.config import DataConfig, ExperimentConfig, OptimConfig, TrainConfig


def get_config() -> ExperimentConfig:
  data = DataConfig(task="passkey", seq_len=128, batch_size=32, vocab_size=64, depth=None)
  model = LMConfig(vocab_size=64, d_model=128, n_layers=2, n_heads=2, mixer="softmax", d_ff=256,
                   max_len=8192 + 64)
  return ExperimentConfig(
      name="passkey_anydepth", model=model, data=data,
      optim=OptimConfig(lr=3e-3, warmup_steps=50, weight_decay=0.0),
      train=TrainConfig(steps=1500, log_every=50, eval_every=250, checkpoint_every=250))
