"""Device variance for scan carries inside `jax.shard_map(..., check_vma=True)`.

A carry that starts as constants (zeros) does not vary across devices, while the carry a
scan step returns does as soon as it mixes in a sharded input; the scan then refuses the
mismatch. `vary_like` casts the initial carry to vary over the mesh axes its inputs vary
over. Outside shard_map every array varies over nothing and it returns x unchanged.
"""

from __future__ import annotations

import jax


def _vma(x) -> frozenset:
  """The mesh axes x varies over (JAX 0.11: `manual_axis_type.varying`; older: `vma`)."""
  aval = jax.typeof(x)
  mat = getattr(aval, "manual_axis_type", None)
  return mat.varying if mat is not None else getattr(aval, "vma", frozenset())


def vary_like(x, *refs):
  """x (a pytree) made device-varying over every axis any array in `refs` varies over."""
  want = frozenset().union(*(_vma(r) for r in jax.tree.leaves(refs)))

  def cast(leaf):
    missing = tuple(sorted(want - _vma(leaf)))
    return jax.lax.pcast(leaf, missing, to="varying") if missing else leaf

  return jax.tree.map(cast, x)


def same_vma(*xs):
  """xs cast to vary over every mesh axis any of them varies over: at the entry of a kernel's
  custom_vjp each cotangent then has its primal's type, and an invariant input (a replicated
  parameter, a constant initial state) gets its gradient summed over the axis by the cast's
  own transpose."""
  return vary_like(xs, *xs)
