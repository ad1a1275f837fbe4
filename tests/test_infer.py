"""Generation: greedy equals the full forward, stop tokens, sampling, sharding, the CLI."""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax.numpy as jnp
import pytest
from flax import nnx

from longax.infer import generate
from longax.models import LM, AttentionConfig, LinearConfig, LMConfig, Mamba2Config

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [9, 8, 7], list(range(10, 30))]


def tiny(**kw):
  base = dict(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mixer="softmax",
              max_len=64, d_ff=64, mamba2=Mamba2Config(d_state=8, head_dim=16, chunk_size=8))
  return LMConfig(**(base | kw))


CONFIGS = {
    "softmax": tiny(),
    "window-sinks": tiny(attention=AttentionConfig(window=6, sinks=2)),
    "hybrid": tiny(n_layers=3, mixer="mamba2", layer_pattern=("mamba2", "gla", "sigmoid")),
}


def greedy_by_forward(model, prompts, outs):
  """Per row, the arg-max of the full forward after the prompt and each prefix of its tokens:
  the tokens themselves exactly when they are the greedy continuation. One forward over each
  prompt + tokens[:-1] gives them all, its logits at a position seeing only the tokens up to
  it (the forward is causal: tests/test_models.py decodes it step by step); so the rows go in
  one batch, right-padded to the longest (the padding comes after every logit read), one
  compile a config rather than one a length. The forward is jitted: run eagerly, every op
  compiles again for each new length (~20 s a config)."""
  seqs = [list(p) + list(o[:-1]) for p, o in zip(prompts, outs)]
  n = max(map(len, seqs))
  logits = nnx.jit(lambda m, x: m(x))(model, jnp.asarray([s + [0] * (n - len(s)) for s in seqs]))
  return [[int(t) for t in jnp.argmax(logits[i, len(p) - 1:len(s)], -1)]
          for i, (p, s) in enumerate(zip(prompts, seqs))]


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_equals_the_full_forward(name):
  model = LM(CONFIGS[name], rngs=nnx.Rngs(0))
  out = generate(model, PROMPTS, max_new_tokens=5, prefill_chunk=4)
  assert [len(o) for o in out] == [5] * len(PROMPTS)
  assert out == greedy_by_forward(model, PROMPTS, out)


def test_stop_tokens_and_sampling():
  model = LM(CONFIGS["hybrid"], rngs=nnx.Rngs(0))
  greedy = generate(model, PROMPTS, max_new_tokens=6)
  stop = greedy[0][2]
  stopped = generate(model, PROMPTS, max_new_tokens=6, stop_tokens=[stop])
  for g, s in zip(greedy, stopped):
    cut = g.index(stop) + 1 if stop in g else len(g)
    assert s == g[:cut]
  a = generate(model, PROMPTS, max_new_tokens=6, temperature=1.0, seed=3)
  assert a == generate(model, PROMPTS, max_new_tokens=6, temperature=1.0, seed=3)
  assert a != generate(model, PROMPTS, max_new_tokens=6, temperature=1.0, seed=4)
  assert generate(model, PROMPTS, max_new_tokens=6, temperature=0.7, top_k=1) == greedy
  assert generate(model, PROMPTS, max_new_tokens=6, temperature=0.7, top_p=1e-6) == greedy


@pytest.mark.parametrize("kw,msg", [
    (dict(prompts=[[]]), "at least one token"),
    (dict(prompts=[[1, 99]]), "token 99 is outside the vocabulary"),
    (dict(top_k=0), "top_k"), (dict(top_p=1.5), "top_p"), (dict(max_new_tokens=0), "max_new_tokens"),
])
def test_bad_input(kw, msg):
  model = LM(CONFIGS["softmax"], rngs=nnx.Rngs(0))
  args = dict(prompts=[[1, 2]], max_new_tokens=3) | kw
  with pytest.raises(ValueError, match=msg):
    generate(model, args.pop("prompts"), **args)


SHARDED = """
import sys, json, jax
from flax import nnx
from jax.sharding import Mesh
import numpy as np
sys.path.insert(0, {tests!r})
from test_infer import CONFIGS, PROMPTS
from longax.models import LM
from longax.infer import generate
model = LM(CONFIGS["hybrid"], rngs=nnx.Rngs(0))
prompts = PROMPTS + [[5, 6]]
outs = []
for n, shape in ((1, (1, 1, 1)), (4, (2, 1, 2))):  # one device, then (data, tensor) = (2, 2)
  mesh = Mesh(np.asarray(jax.devices()[:n]).reshape(shape), ("data", "fsdp", "tensor"))
  outs.append(generate(model, prompts, max_new_tokens=5, mesh=mesh))
  # the caller's model is not moved onto the mesh
  assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(nnx.state(model)))
print(json.dumps(outs))
"""


@pytest.mark.long
def test_sharded_generation_equals_one_device():
  """On 4 simulated devices, a (data, tensor) = (2, 2) mesh generates what a one-device mesh
  does (one process for both: a process costs a JAX start and the model's eager init)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  r = subprocess.run([sys.executable, "-c", SHARDED.format(tests=str(ROOT / "tests"))],
                     env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  one, sharded = json.loads(r.stdout.strip().splitlines()[-1])
  assert len(one) == len(PROMPTS) + 1 and one == sharded


SEQUENCE_PARALLEL = """
import importlib, sys, json, jax, numpy as np
from flax import nnx
from jax.sharding import Mesh
sys.path.insert(0, {tests!r})
from conftest import rel_err
from test_infer import SP_CONFIG, SP_PROMPTS
from longax.models import LM
from longax.models.sharding import shardings
G = importlib.import_module("longax.infer.generate")
model = LM(SP_CONFIG, rngs=nnx.Rngs(0))
out = dict(one=G.generate(model, SP_PROMPTS, max_new_tokens=4, prefill_chunk=8))
refs = [G._prefill(model, x, 64, 8) for x in SP_PROMPTS]
for p, attention, layout in [(8, "ring", "contiguous"), (4, "ulysses", "zigzag")]:
  mesh = Mesh(np.asarray(jax.devices()).reshape(8 // p, p), ("data", "sequence"))
  graphdef, state = nnx.split(model)  # on the mesh as generate puts it (one compile)
  sharded = nnx.merge(graphdef, jax.device_put(state, shardings(state, mesh)))
  sp = G.SequenceParallel(mesh, attention, layout, batch_axes=())
  errs, exact = [], True
  for x, ref in zip(SP_PROMPTS, refs):
    got = G._prefill_sp(sharded, x, 64, 8, sp)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
      if np.issubdtype(np.asarray(b).dtype, np.integer):
        exact &= bool(np.array_equal(a, b))
      else:
        errs.append(rel_err(a, b))
  tokens = G.generate(model, SP_PROMPTS, max_new_tokens=4, prefill_chunk=8, mesh=mesh,
                      sp_attention=attention, sp_layout=layout)
  out[f"{{attention}}-{{layout}}"] = dict(tokens=tokens, err=max(errs), positions_equal=exact,
                                         leaves=len(errs))
print(json.dumps(out))
"""
# Every mixer family with a decode cache: SSD (conv + state), GLA (per-key decay), sigmoid
# (full KV cache, GQA), Mamba-1 (conv + state), Based (state + a windowed KV ring of 8 slots,
# fewer than the prompt); GLA, sigmoid and Based with a short q, k, v conv (its tail in the
# cache). Prompts of 32 tokens (all in the SP pass) and 37 (32 + 5 steps).
SP_CONFIG = tiny(n_layers=5, mixer="mamba2", layer_pattern=("mamba2", "gla", "sigmoid", "mamba", "based"),
                 linear=LinearConfig(chunk_size=8, feature_dim=4, based_window=8), short_conv=3)
SP_PROMPTS = [[(7 * i + 3) % 40 for i in range(32)], [(5 * i + 1) % 40 for i in range(37)]]


@pytest.mark.long
def test_sequence_parallel_prefill_equals_one_device():
  """8 simulated devices: sequence 8 (ring, contiguous) and data 2 x sequence 4 (Ulysses,
  zigzag): the caches and logits of the SP prefill and the generated tokens equal one
  device's."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  r = subprocess.run([sys.executable, "-c", SEQUENCE_PARALLEL.format(tests=str(ROOT / "tests"))],
                     env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  for name in ("ring-contiguous", "ulysses-zigzag"):
    got = out[name]
    assert got["tokens"] == out["one"], name
    assert got["positions_equal"] and got["leaves"] > 10, name
    assert got["err"] <= 1e-5, f"{name}: caches / logits differ by {got['err']:.2g}"


@pytest.mark.parametrize("kw,p,msg", [
    (dict(attention=AttentionConfig(window=6, sinks=2)), 2,
     "generate: sequence_parallel=2: the softmax layers have attention sinks or a softcap"),
    (dict(attention=AttentionConfig(softcap=30.0), layer_pattern=("mamba2", "softmax")), 2,
     "(sinks=0, softcap=30.0)"),
    (dict(n_heads=4, n_kv_heads=2), 8, "sp_attention='ulysses': splits the heads: needs model.n_heads=4 divisible by the sequence axis 8"),
    (dict(n_heads=6, n_kv_heads=3, attention=AttentionConfig(head_dim=8)), 2,
     "needs model.n_kv_heads=3 to divide or be divisible by the sequence axis 2"),
])
def test_sequence_parallel_errors(kw, p, msg):
  from longax.infer.generate import check_sequence_parallel
  with pytest.raises(ValueError, match=re.escape(msg)):
    check_sequence_parallel(tiny(**kw), p, "ulysses" if "heads" in msg else "ring")
  check_sequence_parallel(tiny(**kw), 1, "ring")  # no sequence axis: nothing to check
  with pytest.raises(ValueError, match="sp_layout='zig': must be one of contiguous, zigzag"):
    check_sequence_parallel(tiny(), 2, "ring", "zig")


@pytest.mark.long
def test_cli(tmp_path, capsys):
  from longax.train import Trainer
  from longax.train import config as C
  cfg = C.override(C.load(str(ROOT / "tests" / "tiny_train_config.py")),
                   ["train.steps=2", "train.eval_every=100"])
  Trainer(cfg, tmp_path / "run").run()
  run = lambda *a, **env: subprocess.run([sys.executable, "-m", "longax.infer", *a],
                                         capture_output=True, text=True, timeout=300,
                                         env=dict(os.environ, JAX_PLATFORMS="cpu", **env))
  r = run("--workdir", str(tmp_path / "run"), "--prompt-tokens", "1,17,2,18,1",
          "--max-new-tokens", "4")
  assert r.returncode == 0, r.stderr
  assert len(r.stdout.strip().split(",")) == 4
  # the prompt's first 4 tokens prefill over 2 devices (zigzag: 4 chunks of 1), the 5th by a step
  sp = run("--workdir", str(tmp_path / "run"), "--prompt-tokens", "1,17,2,18,1",
           "--max-new-tokens", "4", "--sequence-parallel", "2", "--sp-layout", "zigzag",
           XLA_FLAGS="--xla_force_host_platform_device_count=2")
  assert sp.returncode == 0 and sp.stdout == r.stdout, sp.stderr
  r2 = run("--workdir", str(tmp_path / "run"), "--prompt-tokens", "1,17,2,18,1",
           "--max-new-tokens", "4", "--streaming", "1,2")
  assert r2.returncode == 0, r2.stderr
  (tmp_path / "bare").mkdir()
  (tmp_path / "bare" / "config.json").write_text((tmp_path / "run" / "config.json").read_text())
  # Bad input: exit 2, one line on stderr. Two in a subprocess (the first before the run
  # folder is read, the second after JAX counted the devices), the rest through main in
  # this process (each subprocess costs a Python + JAX start, ~2-3 s).
  from longax.infer.__main__ import main
  for i, (args, msg) in enumerate([
      (("--workdir", str(tmp_path / "nope"), "--prompt-tokens", "1"), "does not exist"),
      (("--workdir", str(tmp_path / "run"), "--prompt-tokens", "1", "--max-new-tokens", "4",
        "--sequence-parallel", "2"),
       "--sequence-parallel=2: must divide the device count (1 cpu devices)"),
      (("--workdir", str(tmp_path), "--prompt-tokens", "1"), "config.json not found"),
      (("--workdir", str(tmp_path / "bare"), "--prompt-tokens", "1"), "no checkpoint in"),
      (("--workdir", str(tmp_path / "run"), "--prompt-tokens", "1,x"), "comma-separated integers"),
      (("--workdir", str(tmp_path / "run"), "--prompt-tokens", "1", "--streaming", "4"),
       "--streaming expects SINKS,WINDOW"),
      (("--workdir", str(tmp_path / "run"), "--prompt", "hi"), "needs a run with a tokenizer"),
      (("--workdir", str(tmp_path / "run"), "--prompt-tokens", "1,500"), "outside [0, 32)"),
      (("--workdir", str(tmp_path / "run"), "--prompt-tokens", "1", "--max-new-tokens", "4",
        "--sequence-parallel", "2", "--streaming", "1,4"),
       "--sequence-parallel=2: the softmax layers have attention sinks")]):
    if i < 2:
      r = run(*args)
      code, err = r.returncode, r.stderr
    else:
      capsys.readouterr()
      code, err = main(list(args)), capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and msg in err, err


@pytest.mark.long
def test_decode_benchmark_smoke(tmp_path):
  import json
  from longax.benchmarks import decode
  out = tmp_path / "d.json"
  decode.main(["--mixers", "softmax,mamba2", "--contexts", "16,64", "--d-model", "64",
               "--layers", "1", "--heads", "2", "--batch", "1", "--steps", "2",
               "--png", str(tmp_path / "d.png"), "--json", str(out)])
  rows = json.loads(out.read_text())["rows"]
  size = {(r["mixer"], r["context"]): r["cache_bytes"] for r in rows}
  assert size["softmax", 64] > size["softmax", 16] and size["mamba2", 64] == size["mamba2", 16]
  need = {(r["mixer"], r["context"]): r["step_bytes"] for r in rows}
  assert need["softmax", 64] > need["softmax", 16] and need["mamba2", 64] == need["mamba2", 16]
  assert all(need[k] >= size[k] for k in need)
  params = [r["params"] for r in rows]
  assert max(params) / min(params) < 1.1, "models at (about) equal parameter count"
  assert (tmp_path / "d.png").stat().st_size > 10_000


def test_compiled_once_per_bucket():
  gen = sys.modules["longax.infer.generate"]
  sizes = lambda: (gen._decode_loop.jitted_fn._cache_size(), gen._feed.jitted_fn._cache_size())
  model = LM(tiny(mixer="mamba2", n_layers=1, vocab_size=37), rngs=nnx.Rngs(0))
  before = sizes()
  for prompts in ([[1, 2, 3], [4, 5]], [[1] * 7, [2] * 5], [[3] * 40, [4] * 30]):
    generate(model, prompts, max_new_tokens=4, prefill_chunk=16)
  # one decode loop for the bucket; two prefill shapes (a chunk of 16, a single token)
  assert (sizes()[0] - before[0], sizes()[1] - before[1]) == (1, 2)


def test_benchmark_argument_errors(capsys):
  from longax.benchmarks import decode, kernels
  with pytest.raises(SystemExit):
    kernels.main(["--ops", "attention,fft"])
  assert "unknown --ops ['fft']" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    decode.main(["--mixers", "softmax,rwkv"])
  assert "unknown mixers ['rwkv']; valid: softmax" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    decode.main(["--mixers", "", "--merge", "/nonexistent/d.json"])
  assert "--merge /nonexistent/d.json: not a decode benchmark JSON" in capsys.readouterr().err
