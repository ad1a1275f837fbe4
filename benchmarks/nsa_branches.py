"""NSA's attention core piece by piece on a Hopper GPU (B1 H16 Hkv1 D128 bf16, the paper's
selection: l=32, d=16, l'=64, n=16, w=512), device time per call from a profiler trace.

    python -m longax.benchmarks.nsa_branches [--length 65536] [--sections parts,splits,variants,groups,xla]
        [--groups 1,4,16] [--forms tiles,gathered,lists]

- `parts`: each forward piece alone (compression, compressed branch, selection, selected
  blocks, window), the whole `NSA.attend` forward and fwd+bwd, and dense causal attention.
- `splits`: fwd+bwd of the compressed branch and of the selected blocks per dk/dv split
  (`Blocks.bwd_splits` 1, 4, 8, 16 and 0, the rule), with the compressed dk's largest change
  against one CTA per key tile.
- `variants`: the selected-block forward's union of neighbouring tokens' blocks (blocks per
  4-token tile) and the kernel on the layer's selection vs a coherent one (every 4 tokens
  sharing their first token's blocks), shared 4-token tiles vs one token per tile.
- `groups`: the selected blocks at GQA groups G (`--groups`, of 1, 2, 4, 8, 16: H16 with
  Hkv = 16 / G), forward
  and fwd+bwd, on the token tiles (`selected_pallas`) and key-centric (`_selected_keyed`,
  Flash Sparse Attention's loading; its chunks on gathered key blocks, and on the block-sparse
  kernels' lists), each on its layer's selection; `--forms` picks which of the three.
- `xla` (any backend; not in the default): the selected blocks on the XLA path per group G,
  the per-token scan against key-centric loading (`_selected_keyed` on `attention`'s XLA
  path), forward and fwd+bwd: what `SELECTED_KEYED_XLA_MAX_GROUP` rests on.
The inputs are random normal, so the selection is the one random scores give.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

SECTIONS = ("parts", "splits", "variants", "groups", "xla")
DEFAULT = "parts,splits,variants,groups"
# the `groups` section's forms: name, `_selected_gpu(key_centric=...)`
FORMS = {"tiles": ("token tiles", False), "gathered": ("key-centric", True),
         "lists": ("key-centric, lists", "lists")}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m longax.benchmarks.nsa_branches",
                              description=__doc__.splitlines()[0])
  p.add_argument("--length", type=int, default=65536, help="sequence length T (a multiple of 64)")
  p.add_argument("--sections", default=DEFAULT)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--groups", default="1,4,16", help="GQA groups of the `groups` section")
  p.add_argument("--forms", default=",".join(FORMS),
                 help="the `groups` section's loading forms: tiles, gathered, lists")
  a = p.parse_args(argv)
  forms = a.forms.split(",")
  if not forms or any(f not in FORMS for f in forms):
    print(f"error: --forms {a.forms}: a comma list of {', '.join(FORMS)}", file=sys.stderr)
    return 2
  groups = a.groups.split(",")
  if not groups or any(gs not in ("1", "2", "4", "8", "16") for gs in groups):
    print(f"error: --groups {a.groups}: a comma list of 1, 2, 4, 8, 16", file=sys.stderr)
    return 2
  sections = a.sections.split(",")
  bad = [s for s in sections if s not in SECTIONS]
  if bad:
    print(f"error: --sections {a.sections}: {bad[0]!r} is not one of {', '.join(SECTIONS)}", file=sys.stderr)
    return 2
  if a.length < 1024 or a.length % 64:
    print(f"error: --length {a.length}: a multiple of 64, >= 1024", file=sys.stderr)
    return 2
  import jax
  if jax.default_backend() != "gpu" and set(sections) - {"parts", "xla"}:
    print("error: --sections splits / variants / groups need a Hopper GPU (the Mosaic GPU kernels)",
          file=sys.stderr)
    return 2
  bench = _Bench(a.length, a.reps, tuple(int(gs) for gs in groups), tuple(forms))
  for s in sections:
    getattr(bench, s)()
  return 0


class _Bench:
  def __init__(self, t: int, reps: int, groups=(1, 4, 16), forms=tuple(FORMS)):
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from longax.layers import NSA
    b, h, hkv, d = 1, 16, 1, 128
    ks = jax.random.split(jax.random.key(0), 4)
    self.q = jax.random.normal(ks[0], (b, t, h, d), jnp.bfloat16)
    self.k = jax.random.normal(ks[1], (b, t, hkv, d), jnp.bfloat16)
    self.v = jax.random.normal(ks[2], (b, t, hkv, d), jnp.bfloat16)
    self.g = jax.random.normal(ks[3], (b, t, h, 3), jnp.bfloat16)
    self.layer = NSA(h * d, h, hkv, head_dim=d, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                     param_dtype=jnp.float32)
    self.k_cmp, self.v_cmp, _ = jax.jit(self.layer._compressed)(self.k, self.v)
    self.idx = jax.jit(lambda q, k, v: self.layer.select(q, k, v))(self.q, self.k, self.v)
    self.t, self.d, self.group, self.reps, self.gqa = t, d, h // hkv, reps, groups
    self.forms = forms
    print(f"# T={t}, B1 H16 Hkv1 D128 bf16 (the groups section: Hkv = 16 / G), "
          f"{jax.devices()[0].device_kind}; device ms per call (top kernels)", flush=True)

  def _show(self, name, f, *args, top=3):
    from longax.benchmarks.profile import device_time
    try:
      s = device_time(lambda: f(*args), self.reps)
    except Exception as e:  # e.g. out of memory: the row says so, the run goes on
      print(f"  {name:44s} failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
      return None
    kernels = ", ".join(f"{ms:.2f} {n[:28]}" for n, ms, *_ in s["by_kernel"][:top])
    print(f"  {name:44s} {s['total_ms_per_step']:8.3f}   {kernels}", flush=True)
    return s["total_ms_per_step"]

  def _grad(self, f):
    import jax
    import jax.numpy as jnp
    return jax.jit(jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2)))

  def parts(self):
    import jax
    import jax.numpy as jnp
    from longax import kernels
    from longax.layers.nsa import compressed_attention
    L, l, s = self.layer, self.layer.block_size, self.layer.stride
    comp = lambda q, kc, vc: compressed_attention(q, kc, vc, l, s, "auto", return_lse=True)
    _, lse = jax.jit(comp)(self.q, self.k_cmp, self.v_cmp)
    pos = jnp.broadcast_to(jnp.arange(self.t), (1, self.t))
    print("parts (forward unless named):", flush=True)
    self._show("compression", jax.jit(L._compressed), self.k, self.v)
    self._show("compressed branch", jax.jit(comp), self.q, self.k_cmp, self.v_cmp)
    self._show("selection (importance, spread, top-n)",
               jax.jit(lambda q, kc, lse: L._selection(q, kc, lse, pos, False, self.t)), self.q, self.k_cmp, lse)
    self._show("selected blocks", jax.jit(lambda q, k, v, i: kernels.selected_block_attention(
        q, k, v, i, block_size=L.select_block)), self.q, self.k, self.v, self.idx)
    self._show("window", jax.jit(lambda q, k, v: kernels.attention(q, k, v, window=L.window)),
               self.q, self.k, self.v)
    self._show("NSA attend", jax.jit(L.attend), self.q, self.k, self.v, self.g, top=5)
    self._show("NSA attend fwd+bwd", self._grad(lambda q, k, v: L.attend(q, k, v, self.g)),
               self.q, self.k, self.v, top=5)
    self._show("dense causal", jax.jit(lambda q, k, v: kernels.attention(q, k, v)), self.q, self.k, self.v)
    self._show("dense causal fwd+bwd", self._grad(lambda q, k, v: kernels.attention(q, k, v)),
               self.q, self.k, self.v)

  def splits(self):
    import jax.numpy as jnp
    from longax.kernels.attention import AttnSpec
    from longax.kernels.gpu import attention as G
    from longax.layers.nsa import compressed_attention
    L, l, s, d = self.layer, self.layer.block_size, self.layer.stride, self.d
    print(f"splits (fwd+bwd; {self.k_cmp.shape[1]} compressed keys):", flush=True)
    tuned, dk = G.TUNED[d], {}
    for sp in (1, 4, 8, 16, 0):
      G.TUNED[d] = dataclasses.replace(tuned, bwd_splits=sp)  # read when the call is traced
      try:
        f = self._grad(lambda q, kc, vc: compressed_attention(q, kc, vc, l, s, "auto"))
        if self._show(f"compressed branch, bwd_splits={sp}", f, self.q, self.k_cmp, self.v_cmp) is not None:
          dk[sp] = f(self.q, self.k_cmp, self.v_cmp)[1].astype(jnp.float32)
      finally:
        G.TUNED[d] = tuned
    if 1 in dk:
      print("  compressed dk against bwd_splits=1: " + ", ".join(
          f"{sp}: {float(jnp.max(jnp.abs(x - dk[1]))):.3g}" for sp, x in dk.items() if sp != 1)
          + f" (max |dk| {float(jnp.max(jnp.abs(dk[1]))):.3g})", flush=True)
    spec = AttnSpec("softmax", True, d ** -0.5, None, 0, None, 0.0)
    base = G.sparse_blocks(d, G.selected_rows(self.group), L.select_block)
    for sp in (1, 4, 16, 0):
      blk = dataclasses.replace(base, bwd_splits=sp)
      self._show(f"selected blocks, bwd_splits={sp}", self._grad(
          lambda q, k, v, blk=blk: G.selected_pallas(q, k, v, self.idx, spec, block_size=L.select_block,
                                                     blocks=blk)), self.q, self.k, self.v)

  def variants(self):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from longax.kernels.attention import AttnSpec
    from longax.kernels.gpu import attention as G
    bs, t = self.layer.select_block, self.t
    ii = np.asarray(self.idx)[0, :, 0]  # [T, n]
    sets = [set(r[r >= 0]) for r in ii]
    union = lambda m: np.mean([len(set().union(*sets[i:i + m])) for i in range(0, t, m)])
    print(f"variants (selected-block forward): blocks per token {np.mean((ii >= 0).sum(-1)):.2f}, "
          f"union per 4 tokens {union(4):.1f}, per 8 {union(8):.1f}", flush=True)
    coherent = jnp.asarray(np.repeat(ii[::4], 4, 0)[None, :t, None])  # causal: the group's first token's
    spec = AttnSpec("softmax", True, self.d ** -0.5, None, 0, None, 0.0)
    for name, sel, kw in [("layer's selection, 4-token tiles", self.idx, {}),
                          ("layer's selection, one token per tile", self.idx, dict(shared=False)),
                          ("coherent selection, 4-token tiles", coherent, {})]:
      self._show(name, jax.jit(lambda q, k, v, i, kw=kw: G.selected_pallas(q, k, v, i, spec, block_size=bs, **kw)),
                 self.q, self.k, self.v, sel)

  def groups(self):
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from longax.kernels import sparse_attention as SA
    from longax.kernels.attention import AttnSpec
    from longax.layers import NSA
    h, d, t = 16, self.d, self.t
    spec = AttnSpec("softmax", True, d ** -0.5, None, 0, None, 0.0)
    print("groups (selected blocks; token tiles vs key-centric; H16, Hkv = 16 / G):", flush=True)
    for hkv in (16 // gs for gs in self.gqa):
      ks = jax.random.split(jax.random.key(1), 3)
      k = jax.random.normal(ks[0], (1, t, hkv, d), jnp.bfloat16)
      v = jax.random.normal(ks[1], (1, t, hkv, d), jnp.bfloat16)
      layer = NSA(h * d, h, hkv, head_dim=d, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                  param_dtype=jnp.float32)
      idx = jax.jit(lambda q, k, v: layer.select(q, k, v))(self.q, k, v)
      bs = layer.select_block
      for name, keyed in (FORMS[f] for f in self.forms):
        f = lambda q, k, v, keyed=keyed: SA._selected_gpu(q, k, v, idx, spec, block_size=bs,
                                                         key_centric=keyed)
        self._show(f"G={h // hkv} {name}", jax.jit(f), self.q, k, v)
        self._show(f"G={h // hkv} {name} fwd+bwd", self._grad(f), self.q, k, v)

  def xla(self):
    import jax
    from flax import nnx
    from longax.kernels import sparse_attention as SA
    from longax.kernels.attention import AttnSpec
    from longax.layers import NSA
    h, d, t = 16, self.d, self.t
    spec = AttnSpec("softmax", True, d ** -0.5, None, 0, None, 0.0)
    attend = SA._xla_attend(spec.scale)
    print("xla (selected blocks on the XLA path; the scan vs key-centric):", flush=True)
    for hkv in (16 // gs for gs in self.gqa):
      ks = jax.random.split(jax.random.key(1), 3)
      k = jax.random.normal(ks[0], (1, t, hkv, d), self.q.dtype)
      v = jax.random.normal(ks[1], (1, t, hkv, d), self.q.dtype)
      layer = NSA(h * d, h, hkv, head_dim=d, rngs=nnx.Rngs(0), dtype=self.q.dtype,
                  param_dtype=jax.numpy.float32)
      idx = jax.jit(lambda q, k, v: layer.select(q, k, v))(self.q, k, v)
      bs = layer.select_block
      forms = (("scan", lambda q, k, v: SA._selected_scan(q, k, v, idx, spec, block_size=bs)),
               ("key-centric", lambda q, k, v: SA._selected_keyed(
                   q, k, v, idx, spec, block_size=bs, attend=attend,
                   chunks=SA._chunks_gathered(attend), rows=128)))
      for name, f in forms:
        self._show(f"G={h // hkv} {name}", jax.jit(f), self.q, k, v)
        self._show(f"G={h // hkv} {name} fwd+bwd", self._grad(f), self.q, k, v)


if __name__ == "__main__":
  sys.exit(main())
