"""longax.models: LMConfig and the LM built from it."""

from longax.models.config import (MIXERS, AttentionConfig, LinearConfig, LMConfig, Mamba2Config,
                                  MambaConfig, NSAConfig)
from longax.models.lm import LM, Block, build_mixer, count_params, flops_per_token, state_size

__all__ = ["MIXERS", "AttentionConfig", "LinearConfig", "LMConfig", "Mamba2Config", "MambaConfig", "NSAConfig",
           "LM", "Block", "build_mixer", "count_params", "flops_per_token", "state_size"]
