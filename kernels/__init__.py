"""longax.kernels: pure functions on arrays, layout [batch, time, heads, head_dim].

Every op takes `impl="auto" | "reference" | "xla" | "pallas" | "pallas_interpret"`.
"""

from longax.kernels._dispatch import IMPLS, available
from longax.kernels.attention import attention, sigmoid_attention
from longax.kernels.linear_attention import linear_attention, linear_attention_step
from longax.kernels.selective_scan import selective_scan, selective_scan_step
from longax.kernels.sparse_attention import (block_max_scores, block_mean_attention,
                                             block_sparse_attention,
                                             compressed_importance,
                                             selected_block_attention,
                                             vertical_slash_attention, vertical_slash_pattern)
from longax.kernels.ssd import ssd, ssd_step
from longax.kernels.topk import top_k
from longax.kernels.visibility import query_positions, visible

__all__ = [
    "IMPLS", "available", "attention", "sigmoid_attention", "linear_attention",
    "linear_attention_step", "selective_scan", "selective_scan_step", "ssd", "ssd_step",
    "query_positions", "visible", "block_sparse_attention", "selected_block_attention",
    "vertical_slash_attention", "vertical_slash_pattern", "compressed_importance",
    "block_max_scores",
    "block_mean_attention", "top_k",
]
