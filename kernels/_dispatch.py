"""`impl=` dispatch: every op registers its implementations here, in one place.

    @register("attention", "xla")
    def _attention_xla(...): ...

    fn = resolve("attention", impl, call)   # call: what `auto` may inspect

A kernel registers with `unsupported(call) -> str | None`: None where its tests cover
the call (backend, shapes, dtypes, options), else the reason. `auto` takes the kernel
only where that is None and otherwise falls back to the XLA path, slower but never
wrong; an explicit `impl="pallas"` on an uncovered call raises the reason in one line.

One impl may have an entry per backend: `register(op, "pallas", backend="tpu")` is taken
where `jax.default_backend()` is "tpu"; elsewhere the entry registered without a backend
(the Mosaic GPU kernels) answers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

IMPLS = ("auto", "reference", "xla", "pallas", "pallas_interpret")


@dataclasses.dataclass
class _Entry:
  fn: Callable[..., Any]
  unsupported: Callable[[dict], str | None] | None = None


_REGISTRY: dict[str, dict[str, dict[str | None, _Entry]]] = {}  # op -> impl -> backend -> entry


def register(op: str, impl: str, *, unsupported: Callable[[dict], str | None] | None = None,
             backend: str | None = None):
  """Registers `fn` as implementation `impl` of `op` (on `backend` only, if given)."""
  if impl not in IMPLS or impl == "auto":
    raise ValueError(f"cannot register impl={impl!r}; valid: {IMPLS[1:]}")

  def deco(fn):
    _REGISTRY.setdefault(op, {}).setdefault(impl, {})[backend] = _Entry(fn, unsupported)
    return fn

  return deco


def register_kernels(op: str, *, gpu=None, tpu=None, interpret=None) -> None:
  """`op`'s Pallas kernels, each a (fn, unsupported) pair or None: `gpu` the Mosaic GPU kernel
  (impl="pallas" off TPU), `tpu` the Pallas TPU kernel (impl="pallas" on TPU), `interpret`
  the TPU kernel in interpret mode (impl="pallas_interpret", any backend)."""
  for impl, backend, pair in (("pallas", None, gpu), ("pallas", "tpu", tpu),
                              ("pallas_interpret", None, interpret)):
    if pair is not None:
      register(op, impl, unsupported=pair[1], backend=backend)(pair[0])


def available(op: str) -> tuple[str, ...]:
  """The implementations registered for `op` (besides `auto`)."""
  return tuple(_REGISTRY.get(op, {}))


def resolve(op: str, impl: str, call: dict | None = None, *, name: str | None = None
            ) -> Callable[..., Any]:
  """Returns the function that computes `op` with implementation `impl`. `name`: the op the
  user called, for messages, when it is computed by `op` (ssd by linear_attention)."""
  name = name or op
  if impl not in IMPLS:
    raise ValueError(f"{name}: unknown impl={impl!r}; valid: {', '.join(IMPLS)}")
  backend = jax.default_backend()
  table = {i: by.get(backend, by.get(None)) for i, by in _REGISTRY.get(op, {}).items()}
  table = {i: e for i, e in table.items() if e is not None}
  call = dict(call or {}, backend=backend)
  if impl == "auto":
    kernel = table.get("pallas")
    if kernel is not None and kernel.unsupported is not None and kernel.unsupported(call) is None:
      return kernel.fn
    impl = "xla"
  entry = table.get(impl)
  if entry is not None and entry.unsupported is not None:
    why = entry.unsupported(call)
    if why is not None:
      raise ValueError(f"longax.kernels.{name}: impl={impl!r} does not support this call: {why}")
  if impl not in table:
    have = ", ".join(sorted(table)) or "none"
    raise NotImplementedError(
        f"longax.kernels.{name}: impl={impl!r} is not implemented yet "
        f"(available: {have}, or 'auto')")
  return table[impl].fn
