"""Pallas TPU (Mosaic TPU) kernels: one file per op family, registered as impl="pallas" for the
TPU backend and as impl="pallas_interpret" (the same kernels under `pltpu.InterpretParams()`,
which runs them on CPU: how the CPU test suite checks them).

Block sizes are explicit parameters; the defaults sit in one table per kernel (`DEFAULTS`),
sized for the scoped VMEM of TPU v5e / v6e (16 / 32 MiB), with `vmem_bytes` giving the bytes
of VMEM one grid step holds (the README's table is printed by it).
"""

import jax
from jax.experimental.pallas import tpu as pltpu

VMEM_LIMIT = 16 * 2**20  # v5e's scoped VMEM default; v6e's is 32 MiB


def not_on_tpu(call: dict) -> str | None:
  """The reason a call cannot take a TPU kernel where it runs (not a TPU backend), else None:
  the first check of every TPU kernel's `unsupported` under impl="pallas"."""
  backend = call.get("backend", jax.default_backend())
  if backend != "tpu":
    return f"the Pallas TPU kernel needs a TPU backend, not {backend!r} (impl='pallas_interpret' runs it on CPU)"
  return None


def interpret_params(interpret: bool):
  """`pallas_call(interpret=...)`: TPU interpret mode (CPU) or compiled (False)."""
  return pltpu.InterpretParams() if interpret else False


def scan_params(interpret: bool) -> dict:
  """`pallas_call` keywords of a state-carrying kernel: grid (parallel, parallel, arbitrary:
  the state stays in VMEM scratch across the last axis), the VMEM limit, interpret mode."""
  return dict(interpret=interpret_params(interpret),
              compiler_params=pltpu.CompilerParams(
                  dimension_semantics=("parallel", "parallel", "arbitrary"),
                  vmem_limit_bytes=VMEM_LIMIT))


def round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def fit(block: int, n: int, multiple: int = 8) -> int:
  """A block size for a length-n axis: `block`, or the whole (padded) axis when shorter."""
  return min(block, round_up(n, multiple))


def pallas_call(kernel, *, out_shape, **kwargs):
  """`pl.pallas_call` whose inputs are cast to one device variance and whose outputs carry it:
  inside `jax.shard_map(check_vma=True)` (ring / Ulysses / LASP-2) an output's variance must be
  given, and a custom_vjp wants each cotangent typed like its primal."""
  from jax.experimental import pallas as pl

  from longax.kernels._vma import vary_like

  def run(*args):
    args = vary_like(args, *args)
    mat = next((jax.typeof(a).manual_axis_type for a in jax.tree.leaves(args)), None)
    shapes = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, manual_axis_type=mat), out_shape)
    return pl.pallas_call(kernel, out_shape=shapes, **kwargs)(*args)

  return run
