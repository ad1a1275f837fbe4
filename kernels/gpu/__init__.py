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
