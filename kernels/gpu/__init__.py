"""Mosaic GPU (Hopper) kernels: one file per op family, registered as impl="pallas"."""

import jax


def not_on_hopper(call: dict) -> str | None:
  """The reason a call cannot take a Mosaic GPU kernel because of where it runs (not a GPU
  backend, or not a Hopper GPU), else None: the first check of every kernel's `unsupported`."""
  backend = call.get("backend", jax.default_backend())
  if backend != "gpu":
    return f"the Mosaic GPU kernel needs a GPU backend, not {backend!r}"
  try:
    cc = getattr(jax.devices()[0], "compute_capability", "")
  except RuntimeError:
    cc = ""
  if not str(cc).startswith("9"):
    return f"the Mosaic GPU kernel needs a Hopper GPU (compute capability 9.x), got {cc!r}"
  return None


def kernel(body, **kwargs):
  """`plgpu.kernel` whose outputs vary over the mesh axes its inputs vary over: inside
  `jax.shard_map` (check_vma) a Mosaic GPU kernel's outputs come back device-invariant, which
  a custom_vjp rejects for gradients and a later collective would misread (psum of an
  invariant value multiplies it by P)."""
  from jax.experimental.pallas import mosaic_gpu as plgpu

  from longax.kernels._vma import vary_like
  call = plgpu.kernel(body, **kwargs)
  return lambda *args: vary_like(call(*args), *args)
