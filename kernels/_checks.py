"""Input validation shared by the ops: every message names the op, argument and shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def concrete(x):
  """x as a numpy array, or None where it is traced (inside jit: checks that need values are
  skipped, tables built from it stay jnp)."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def shape_of(x) -> tuple[int, ...]:
  return tuple(jnp.shape(x))


def rank(op: str, name: str, x, r: int, layout: str) -> None:
  if jnp.ndim(x) != r:
    raise ValueError(f"{op}: `{name}` must have rank {r} {layout}, got shape {shape_of(x)}")


def same_dtype(op: str, **arrays) -> None:
  dtypes = {n: jnp.asarray(a).dtype for n, a in arrays.items() if a is not None}
  if len(set(dtypes.values())) > 1:
    got = ", ".join(f"{n}={d}" for n, d in dtypes.items())
    raise ValueError(f"{op}: inputs must share one dtype, got {got}")


def floating(op: str, name: str, x) -> None:
  if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
    raise ValueError(f"{op}: `{name}` must be floating point, got dtype {jnp.asarray(x).dtype}")


def shape_is(op: str, name: str, x, want: tuple[int, ...], layout: str) -> None:
  if shape_of(x) != tuple(want):
    raise ValueError(f"{op}: `{name}` must have shape {tuple(want)} {layout}, got {shape_of(x)}")


def divides(op: str, what: str, small: int, big: int) -> None:
  if small < 1 or big % small:
    raise ValueError(f"{op}: {what}: {big} is not a multiple of {small}")


def positive_int(op: str, name: str, value, *, minimum: int = 1) -> None:
  if value is None:
    return
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"{op}: `{name}` must be an int >= {minimum}, got {value!r}")

