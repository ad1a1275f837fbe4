"""Shared test helpers: seeded inputs, per-dtype tolerances, gradient probes."""

import atexit
import os
import shutil
import tempfile

# Caches (the byte corpus) go to a temporary folder, never ~/.cache; subprocesses inherit it.
os.environ["LONGAX_CACHE_DIR"] = tempfile.mkdtemp(prefix="longax-test-cache-")
atexit.register(shutil.rmtree, os.environ["LONGAX_CACHE_DIR"], ignore_errors=True)

# Small shapes: XLA's compile time dominates, and its optimisations don't pay for themselves.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# float32 matmuls at full precision everywhere: on a GPU XLA's default is TF32 (~1e-3), which
# fails the float32 tolerances and flips near-tied picks (NSA's top-k) between a test's
# reference and the code under test (tests/test_nsa.py on an H100, 2026-11-26). The Pallas
# kernels' own bf16/f16 math is unaffected.
jax.config.update("jax_default_matmul_precision", "highest")

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def pytest_collection_modifyitems(config, items):
  """Tests marked `long` (10 s or more: subprocesses, simulated meshes) run first. xdist's
  load scheduler hands tests out in collection order, so one of them collected last (the
  sequence-parallel training test was) keeps one worker busy while the other idles; run
  first, the short tests after them even the two workers out. (A stable sort: the rest
  keep their order.)"""
  items.sort(key=lambda item: item.get_closest_marker("long") is None)


def needs_hopper(devices: int = 1):
  """The skip marker of the GPU kernel tests (tests/gpu): `devices` Hopper GPUs, asked of the
  kernels' own check (`longax.kernels.gpu.not_on_hopper`)."""
  from longax.kernels.gpu import not_on_hopper
  why = not_on_hopper({})
  if why is None and jax.device_count() < devices:
    why = f"needs {devices} GPUs, there are {jax.device_count()}"
  return pytest.mark.skipif(why is not None, reason=why or "")


def block_indices_of(mask, n: int, seed: int):
  """A block mask's on blocks as int32 indices [.., n] (numpy): shuffled, -1 padded, the
  first listed twice where a slot is free (repeats count once)."""
  rng = np.random.default_rng(seed)
  idx = np.full(mask.shape[:-1] + (n,), -1, np.int32)
  for at in np.ndindex(*mask.shape[:-1]):
    on = rng.permutation(np.flatnonzero(mask[at]))[:n]
    idx[at][:len(on)] = on
    if 0 < len(on) < n:
      idx[at][len(on)] = on[0]
  return idx


def rel_err(a, b) -> float:
  """||a - b|| / ||b|| in float64, with ||b|| floored at an RMS of 0.1 (inputs are O(1),
  so a reference that is nearly zero is compared in absolute terms)."""
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 0.1 * np.sqrt(b.size), 1e-30))


def assert_close(got, want, dtype=jnp.float32, what=""):
  tol = TOL[jnp.dtype(dtype).type] if not isinstance(dtype, float) else dtype
  err = rel_err(got, want)
  assert np.all(np.isfinite(np.asarray(got, np.float32))), f"{what}: non-finite values"
  assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.1g}"


class Rand:
  """Deterministic random arrays: Rand(seed).normal(shape, dtype)."""

  def __init__(self, seed: int):
    self.key = jax.random.key(seed)

  def _next(self):
    self.key, k = jax.random.split(self.key)
    return k

  def normal(self, shape, dtype=jnp.float32, scale=1.0):
    return (scale * jax.random.normal(self._next(), shape, jnp.float32)).astype(dtype)

  def uniform(self, shape, lo, hi, dtype=jnp.float32):
    return jax.random.uniform(self._next(), shape, jnp.float32, lo, hi).astype(dtype)

  def segments(self, b, t, n_docs):
    """[B, T] int32 ids of `n_docs` contiguous documents per row, random boundaries."""
    cuts = jnp.sort(jax.random.randint(self._next(), (b, n_docs - 1), 1, t), axis=1)
    return jnp.sum(jnp.arange(t)[None, :, None] >= cuts[:, None, :], axis=-1).astype(jnp.int32)


def _probe_loss(fn, seed):
  """<fn(*args), R> for a fixed random projection R of each output leaf."""

  def loss(*a):
    out = fn(*a)
    leaves = jax.tree.leaves(out)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return sum(jnp.vdot(jax.random.normal(k, x.shape), x.astype(jnp.float32))
               for k, x in zip(keys, leaves))

  return loss


def probe_grads(fn, args, argnums, seed=123):
  """Gradients of <fn(*args), R> for a fixed random projection R of each output leaf."""
  return jax.jit(jax.grad(_probe_loss(fn, seed), argnums=argnums))(*args)


def forward_and_probe_grads(fn, args, argnums, seed=123):
  """(fn(*args), probe_grads(fn, args, argnums)) from one jitted program: the plain forward
  (not the forward of the differentiated function, which a custom_vjp computes with its fwd
  rule) beside the gradients. One compile instead of two (XLA's compile time dominates)."""
  grad = jax.grad(_probe_loss(fn, seed), argnums=argnums)
  return jax.jit(lambda *a: (fn(*a), grad(*a)))(*args)


def compare(fn_test, fn_ref, args, argnums, dtype, what=""):
  """Forward and gradients of fn_test against fn_ref on the same inputs."""
  got, g_test = forward_and_probe_grads(fn_test, args, argnums)
  want, g_ref = forward_and_probe_grads(fn_ref, args, argnums)
  for i, (g, w) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want))):
    assert_close(g, w, dtype, f"{what} forward[{i}]")
  for i, (g, w) in zip(argnums, zip(g_test, g_ref)):
    assert_close(g, w, dtype, f"{what} d/darg{i}")


@pytest.fixture
def rand(request):
  """A Rand seeded from the test's name, so every parametrisation gets fresh inputs."""
  import zlib
  return Rand(zlib.crc32(request.node.name.encode()))
