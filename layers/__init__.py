"""longax.layers: Flax NNX modules over `longax.kernels`.

Every token mixer has the same decode interface: `init_cache(batch, max_len)` and
`mixer(x, cache=None, pos=0) -> (y, new_cache)`.
"""

from longax.layers.attention import Attention
from longax.layers.common import RMSNorm, ShortConv, SwiGLU, rope
from longax.layers.linear import LinearAttention, taylor_features
from longax.layers.nsa import NSA
from longax.layers.ssm import Mamba, Mamba2

__all__ = ["Attention", "LinearAttention", "Mamba", "Mamba2", "NSA", "RMSNorm", "ShortConv", "SwiGLU",
           "rope", "taylor_features"]
