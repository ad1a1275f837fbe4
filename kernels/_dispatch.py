"""`impl=` dispatch: every op registers its implementations here, in one place.

    @register("attention", "xla")
    def _attention_xla(...): ...

    fn = resolve("attention", impl, call)   # call: what `auto` may inspect

`auto` takes a kernel only where its `covers(call)` predicate says the kernel's
tests cover that call (backend, shapes, dtypes, options); otherwise it falls back to
the XLA path, which is slower but never wrong.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

IMPLS = ("auto", "reference", "xla", "pallas", "pallas_interpret")


@dataclasses.dataclass
class _Entry:
  fn: Callable[..., Any]
  covers: Callable[[dict], bool] | None = None  # only read by `auto`


_REGISTRY: dict[str, dict[str, _Entry]] = {}


def register(op: str, impl: str, *, covers: Callable[[dict], bool] | None = None):
  """Registers `fn` as implementation `impl` of `op`."""
  if impl not in IMPLS or impl == "auto":
    raise ValueError(f"cannot register impl={impl!r}; valid: {IMPLS[1:]}")

  def deco(fn):
    _REGISTRY.setdefault(op, {})[impl] = _Entry(fn, covers)
    return fn

  return deco


def available(op: str) -> tuple[str, ...]:
  """The implementations registered for `op` (besides `auto`)."""
  return tuple(_REGISTRY.get(op, {}))


def resolve(op: str, impl: str, call: dict | None = None) -> Callable[..., Any]:
  """Returns the function that computes `op` with implementation `impl`."""
  if impl not in IMPLS:
    raise ValueError(f"{op}: unknown impl={impl!r}; valid: {', '.join(IMPLS)}")
  table = _REGISTRY.get(op, {})
  if impl == "auto":
    kernel = table.get("pallas")
    call = dict(call or {}, backend=jax.default_backend())
    if kernel is not None and kernel.covers is not None and kernel.covers(call):
      return kernel.fn
    impl = "xla"
  if impl not in table:
    have = ", ".join(sorted(table)) or "none"
    raise NotImplementedError(
        f"longax.kernels.{op}: impl={impl!r} is not implemented yet "
        f"(available: {have}, or 'auto')")
  return table[impl].fn
