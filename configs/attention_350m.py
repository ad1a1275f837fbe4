"""The pure-attention baseline at hybrid_350m's size (~361M parameters, 32 softmax layers,
16 heads / 4 KV heads), same data, batch and optimiser: for training-throughput comparisons.

python -m longax.benchmarks.train --config configs/attention_350m.py --steps 200
"""

import dataclasses

from longax.configs.hybrid_350m import get_config as hybrid


def get_config():
  cfg = hybrid()
  model = dataclasses.replace(cfg.model, mixer="softmax", layer_pattern=None, n_layers=32)
  return dataclasses.replace(cfg, name="attention_350m", model=model)
