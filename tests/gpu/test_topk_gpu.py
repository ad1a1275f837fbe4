"""`kernels.top_k`'s Mosaic GPU kernel against lax.top_k on a Hopper GPU: values and indices
exactly, ties to the lower index, -inf rows, batch dims, NSA's and block top-k's row widths.

    python -m pytest -q tests/gpu/test_topk_gpu.py      # on the device
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import needs_hopper
from longax.kernels import topk
from longax.kernels.gpu import topk as gpu_topk
from test_topk import _rows, _same_as_lax

pytestmark = needs_hopper()


@pytest.mark.parametrize("r,n,k,few", [(70, 300, 16, True), (4096, 1024, 16, False),
                                       (1000, 2000, 16, True), (333, 513, 7, False),
                                       (64, 128, 16, False)])
def test_kernel_is_lax_top_k(r, n, k, few):
  x = _rows(np.random.default_rng(r + n), r, n, few)
  _same_as_lax(jax.jit(lambda x: gpu_topk.top_k_pallas(x, k))(jnp.asarray(x)), x, k)


def test_top_k_takes_the_kernel_with_batch_dims():
  x = _rows(np.random.default_rng(0), 2 * 300, 1024, False).reshape(2, 300, 1, 1024)
  assert gpu_topk.top_k_unsupported(jnp.asarray(x), 16) is None
  _same_as_lax(jax.jit(lambda x: topk.top_k(x, 16))(jnp.asarray(x)), x, 16)
