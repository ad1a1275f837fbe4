"""How parameters lie on a mesh: one rule for training and inference."""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def param_spec(shape, mesh: Mesh) -> P:
  """`fsdp` on the first axis and `tensor` on the last, where the mesh has them and they
  divide; everything else (and every vector) replicated."""
  spec = [None] * len(shape)
  axes = dict(zip(mesh.axis_names, mesh.devices.shape))
  if len(shape) >= 2:
    if axes.get("tensor", 1) > 1 and shape[-1] % axes["tensor"] == 0:
      spec[-1] = "tensor"
    if axes.get("fsdp", 1) > 1 and shape[0] % axes["fsdp"] == 0:
      spec[0] = "fsdp"
  return P(*spec)


def shardings(tree, mesh: Mesh):
  """NamedShardings for a pytree of arrays by `param_spec`."""
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(x.shape, mesh)), tree)
