"""MQAR where Native Sparse Attention must select: `nsa` against full softmax attention.

python -m longax.train --config configs/mqar_nsa.py                                # nsa
python -m longax.train --config configs/mqar_nsa.py --set model.mixer=softmax \\
    --set model.d_ff=224                                                          # baseline

32 key-value pairs fill tokens 0-63, the 32 queries tokens 64-127. An nsa layer sees, per
query, the compressed blocks (8 tokens every 4), 3 selected blocks of 16 tokens (its own
among them) and a window of 16: the window never reaches the pairs from most queries, and
the 2 free selected blocks cover half of the 4 blocks holding pairs, so recall needs the
selection to pick the right block. The softmax baseline sees every token; its MLP is
widened (SOFTMAX_D_FF) so both models have about the same parameters (nsa's compression
maps and gates; `tests/test_nsa.py` checks the match).
"""

from longax.models import LMConfig, NSAConfig
from longax.train.config import DataConfig, ExperimentConfig, OptimConfig, TrainConfig

SOFTMAX_D_FF = 224  # the softmax baseline's MLP width at nsa's parameter count


def get_config() -> ExperimentConfig:
  data = DataConfig(task="mqar", seq_len=128, batch_size=32, vocab_size=128, num_kv_pairs=32)
  model = LMConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=2, mixer="nsa", d_ff=128,
                   max_len=128, nsa=NSAConfig(block_size=8, stride=4, select_block=16,
                                              n_selected=3, window=16))
  return ExperimentConfig(
      name="mqar_nsa", model=model, data=data,
      optim=OptimConfig(lr=3e-3, warmup_steps=100, weight_decay=0.0),
      train=TrainConfig(steps=1000, log_every=25, eval_every=250, checkpoint_every=500))
