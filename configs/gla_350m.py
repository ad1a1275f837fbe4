"""The pure-GLA model at hybrid_350m's size (~363M parameters, 26 gated linear attention
layers, per-key decay, 16 heads of 64), same data, batch and optimiser.

python -m longax.benchmarks.train --config configs/gla_350m.py --steps 200
"""

import dataclasses

from longax.configs.hybrid_350m import get_config as hybrid
from longax.models import LinearConfig


def get_config():
  cfg = hybrid()
  model = dataclasses.replace(cfg.model, mixer="gla", layer_pattern=None,
                              linear=LinearConfig(head_dim=64))
  return dataclasses.replace(cfg, name="gla_350m", model=model)
