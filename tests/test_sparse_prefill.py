"""Sparse prefill (MInference) for softmax layers: the per-head search, the caches against the
dense prefill, outputs against dense, the CLI flags."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import assert_close
from longax import kernels
from longax.infer import generate
from longax.infer.generate import _prefill, _prefill_sparse
from longax.infer.sparse import search
from longax.kernels import topk
from longax.kernels.visibility import index_mask
from longax.layers import sparse_prefill as sp
from longax.models import LM, LMConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROMPT = [int(t) for t in np.random.default_rng(0).integers(0, 40, 41)]


@pytest.fixture(scope="module")
def model():
  cfg = LMConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mixer="softmax",
                 layer_pattern=("softmax", "gla"), max_len=128, d_ff=64)
  return LM(cfg, rngs=nnx.Rngs(0))


@pytest.mark.long
@pytest.mark.parametrize("kind", sp.KINDS)
def test_search_picks_each_heads_closest_option(model, kind):
  """Each head's choice has the smallest mean over the calibration prompts of its error (its
  worst query over the prompt, relative to dense's mean). Two prompts: a search on the first
  alone picks other options, for both kinds (a single prompt's search: the other tests here).
  The second prompt has the first's length: the search runs eagerly, and a new length
  compiles its every op again (~10 s a kind)."""
  other = [int(t) for t in np.random.default_rng(1).integers(0, 40, len(PROMPT))]
  prompts = [PROMPT, other]
  plan = search(model, prompts, kind=kind, budget=12, block=4, last_q=8, progress=False)
  assert len(plan.heads) == 1 and len(plan.heads[0]) == 4

  recorded = []
  for prompt in prompts:
    with sp.capture() as records:
      model(jnp.asarray([prompt]))
    recorded.append(records[0])

  # [candidates, H]: each head's relative error under the plan's choice, then every option.
  # One jitted program (both prompts have one shape): eagerly, op by op, ~10 s more a kind.
  options = sp.choices(kind, 12, 4)
  candidates = [plan.heads[0]] + [(opt,) * 4 for opt in options]

  @jax.jit
  def errs(q, k, v):
    dense = kernels.attention(q, k, v)
    norm = jnp.square(dense).sum(-1).mean(axis=(0, 1))
    worst = [jnp.square(sp.attend(q, k, v, kind, heads, 12, 4, 8) - dense).sum(-1).max(axis=(0, 1))
             for heads in candidates]  # each [H]
    return jnp.stack(worst) / norm

  mean = sum(np.asarray(errs(q, k, v)) for q, k, v in recorded) / len(prompts)
  chosen = mean[0]  # the mean over the prompts of each head's relative error
  for opt, err in zip(options, mean[1:]):
    assert np.all(chosen <= err + 1e-6), (opt, plan.heads)


@pytest.mark.long
@pytest.mark.parametrize("kind", sp.KINDS)
def test_prefill_cache_equals_dense_and_output_is_close(model, kind):
  dense_logits, dense = _prefill(model, PROMPT, 64, 64)
  # A budget below the prompt: the first attention layer writes exactly the dense K/V (its
  # inputs are the dense ones), every position is where the dense prefill puts it, the
  # recurrent layer's state follows its (approximate) input; the last token's logits (from
  # the sparse pass) stay near dense (loosely: a random model's attention is diffuse).
  plan = search(model, PROMPT, kind=kind, budget=24, block=4, last_q=8, progress=False)
  logits, cache = _prefill_sparse(model, PROMPT, 64, 64, plan)
  a, b = cache["layers"][0], dense["layers"][0]
  assert np.array_equal(np.asarray(a["pos"]), np.asarray(b["pos"]))
  assert_close(a["k"], b["k"], what="K")
  assert_close(a["v"], b["v"], what="V")
  assert np.array_equal(np.asarray(cache["pos"]), np.asarray(dense["pos"]))
  assert_close(logits, dense_logits, 0.35, what=f"{kind} logits")
  # A budget covering every key: the whole cache and the logits equal the dense prefill's.
  full = search(model, PROMPT, kind=kind, budget=64, block=4, last_q=8, progress=False)
  logits, cache = _prefill_sparse(model, PROMPT, 64, 64, full)
  for got, want in zip(cache["layers"], dense["layers"]):
    for key in want:
      assert_close(got[key], want[key], what=f"{kind} full budget {key}")
  assert_close(logits, dense_logits, what=f"{kind} full budget logits")
  if kind == "block_topk":  # (one kind is enough for generate's plumbing)
    assert generate(model, [PROMPT], max_new_tokens=3, sparse_prefill=full) == \
        generate(model, [PROMPT], max_new_tokens=3)


def test_search_error_is_the_worst_query():
  """A head whose last query (a question) needs a far key while the others lean on the
  previous block: keeping both local blocks serves the others (the least mean error) and
  loses the question; `errors` ranks the option that keeps the question's block first."""
  from longax.infer.sparse import errors
  t, d, blk, budget = 64, 16, 8, 16
  e = np.eye(d)
  k = np.stack([e[(j // blk) % 8] for j in range(t)])  # key block i points along e_i
  k[10] = e[12]  # the needle, in block 1
  q = np.stack([16 * e[(i // blk) % 8] + 14 * e[(i // blk - 1) % 8] for i in range(t)])
  q[-1] = 40 * e[12]  # the question
  v = np.random.default_rng(0).normal(size=(t, d))
  q, k, v = (jnp.asarray(x, jnp.float32)[None, :, None] for x in (q, k, v))
  opts = sp.choices("block_topk", budget, blk)
  assert opts == (1, 2)  # one local block and the best other, or the two local ones
  dense = kernels.attention(q, k, v)[:, -8:]
  sq = [jnp.sum(jnp.square(sp.attend(q, k, v, "block_topk", (o,), budget, blk)[:, -8:] - dense), -1)
        for o in opts]
  assert float(sq[1].mean()) < float(sq[0].mean())  # the mean would take the local pair
  assert float(sq[1][0, -1, 0]) > 10 * float(sq[0][0, -1, 0])  # which loses the question
  err = errors(q, k, v, "block_topk", opts, budget, blk, last_q=8)
  assert err.shape == (2, 1) and err[0, 0] < err[1, 0]


def test_search_error_counts_every_query():
  """A question mid-prompt (a needle's block is far) and queries that need only their own
  block elsewhere: the last queries are exact under both options, the mid-prompt one only
  where its block's best other block is kept; `errors` sees it (a layer's outputs at every
  position feed the next layer's cached keys and values)."""
  from longax.infer.sparse import errors
  t, d, blk, budget = 64, 16, 8, 16
  e = np.eye(d)
  k = np.stack([e[(j // blk) % 8] for j in range(t)])  # key block i points along e_i
  k[10] = e[12]  # the needle, in block 1
  q = np.stack([64 * e[(i // blk) % 8] for i in range(t)])  # own block only (scale 1/4)
  q[47] = 64 * e[12]  # the question, the last query of block 5 (a probe of its block)
  v = np.random.default_rng(0).normal(size=(t, d))
  q, k, v = (jnp.asarray(x, jnp.float32)[None, :, None] for x in (q, k, v))
  opts = sp.choices("block_topk", budget, blk)
  assert opts == (1, 2)  # one local block and the best other, or the two local ones
  err = errors(q, k, v, "block_topk", opts, budget, blk, last_q=8)
  assert err[1, 0] > 100 * err[0, 0]


def _summary_dense(q, k, v, keep, block):
  """Block top-k with the summary branch as one dense masked softmax (written apart from
  `_summary`): kept blocks' keys exactly, each skipped block wholly before the query's block
  as one key (mean key, mean value) with log(block) added to its score."""
  b, t, h, d = q.shape
  n = -(-t // block)
  kr, vr = (np.repeat(np.asarray(x, np.float64), h // k.shape[2], axis=2) for x in (k, v))
  qf = np.asarray(q, np.float64)
  blk = np.arange(t) // block
  s = np.einsum("bqhd,bkhd->bhqk", qf, kr) / np.sqrt(d)
  tok = keep[:, :, blk][:, :, :, blk] & (np.arange(t)[:, None] >= np.arange(t)[None, :])
  s = np.where(tok, s, -np.inf)
  pad = lambda x: np.pad(x, ((0, 0), (0, n * block - t), (0, 0), (0, 0)))
  kbar, vbar = (pad(x).reshape(b, n, block, h, d).mean(2) for x in (kr, vr))
  ss = np.einsum("bqhd,bjhd->bhqj", qf, kbar) / np.sqrt(d) + np.log(block)
  i, j = np.arange(n)[:, None], np.arange(n)[None, :]
  ss = np.where(((j < i) & ~keep)[:, :, blk], ss, -np.inf)
  z = np.concatenate([s, ss], -1)
  p = np.exp(z - z.max(-1, keepdims=True))
  p = p / p.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", p[..., :t], vr) + np.einsum("bhqj,bjhd->bqhd", p[..., t:], vbar)


@pytest.mark.parametrize("budget,heads", [(32, (1, 2, 1, 2)), (8, (1, 1, 1, 1)), (400, (1, 3, 5, 25))])
def test_block_topk_summary_is_one_softmax_over_kept_keys_and_block_means(budget, heads,
                                                                          monkeypatch):
  """`attend(..., summary=True)`: the kernel's kept blocks and the skipped blocks' mean keys
  in one softmax (merged by log-sum-exp), against the dense masked form (ragged T, GQA);
  with a budget over the prompt nothing is skipped and it is dense attention."""
  rng = np.random.default_rng(budget)
  t, block = 300, 16
  q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32)
             for s in ((2, t, 4, 8), (2, t, 2, 8), (2, t, 2, 8)))
  seen = {}
  orig = kernels.block_sparse_attention
  def spy(q, k, v, block_indices, **kw):  # the blocks the plan keeps (the first call's), as a mask
    seen.setdefault("keep", np.asarray(index_mask(block_indices, -(-k.shape[1] // block))))
    return orig(q, k, v, block_indices=block_indices, **kw)
  monkeypatch.setattr(kernels, "block_sparse_attention", spy)
  got = sp.attend(q, k, v, "block_topk", heads, budget, block, summary=True)
  want = _summary_dense(q, k, v, seen["keep"], block)
  assert_close(got, want, 1e-5, what="summary branch")
  plain = sp.attend(q, k, v, "block_topk", heads, budget, block)
  if budget >= t:
    assert_close(got, kernels.attention(q, k, v), 1e-5, what="nothing skipped")
  else:  # the skipped blocks do count
    assert float(jnp.max(jnp.abs(got - plain))) > 1e-3


@pytest.mark.slow
def test_cli_runs_a_sparse_prefill(tmp_path, capsys):
  from longax.infer.__main__ import main
  from longax.train import Trainer
  from longax.train import config as C
  cfg = C.override(C.load(str(ROOT / "tests" / "tiny_train_config.py")),
                   ["train.steps=1", "train.eval_every=100"])
  Trainer(cfg, tmp_path / "run").run()
  capsys.readouterr()
  assert main(["--workdir", str(tmp_path / "run"), "--prompt-tokens", "1,17,2,18,3,19,1",
               "--max-new-tokens", "2", "--sparse-prefill", "vertical_slash", "--sparse-budget",
               "4", "--calibration-tokens", "1,17,2,18,3,19,4,20,2",
               "--calibration-tokens", "5,21,6,22,1"]) == 0  # two calibration prompts
  assert len(capsys.readouterr().out.strip().split(",")) == 2


def test_cli_flag_errors(tmp_path, capsys):
  """Each is one line, before the model loads (so a run folder with no real checkpoint)."""
  import json
  from longax.infer.__main__ import main
  from longax.train import config as C
  run = tmp_path / "run"
  (run / "checkpoints" / "1").mkdir(parents=True)
  (run / "config.json").write_text(json.dumps(C.to_dict(C.load(str(ROOT / "tests" / "tiny_train_config.py")))))
  base = ["--workdir", str(run), "--prompt-tokens", "1,17,2,18,3,19,1", "--max-new-tokens", "2"]
  for args, msg in [
      (["--sparse-prefill", "diagonal"], "--sparse-prefill='diagonal': must be one of vertical_slash, block_topk"),
      (["--sparse-prefill", "block_topk", "--sparse-budget", "0"], "--sparse-budget=0: must be an int >= 1"),
      (["--sparse-prefill", "block_topk", "--sparse-block", "0"], "--sparse-block=0: must be an int >= 1"),
      (["--calibration-tokens", "1,2"], "--calibration-tokens needs --sparse-prefill"),
      (["--sparse-summary"], "--sparse-summary needs --sparse-prefill"),
      (["--sparse-prefill", "vertical_slash", "--sparse-summary"], "--sparse-summary is for --sparse-prefill block_topk"),
      (["--sparse-prefill", "block_topk", "--calibration-tokens", "1,99"], "--calibration-tokens: token 99 is outside [0, 32)"),
      (["--sparse-prefill", "block_topk", "--calibration-tokens", "1,2", "--calibration-tokens",
        ",".join(["1"] * 200)], "--calibration-tokens: 200 tokens exceed the model's max_len"),
      (["--sparse-prefill", "block_topk", "--streaming", "1,4"], "this model has no full softmax attention layer"),
      (["--sparse-prefill", "block_topk", "--sequence-parallel", "2"], "does not run with --sequence-parallel")]:
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err


@pytest.mark.slow
def test_benchmark_on_a_passkey_run(tmp_path, capsys):
  """The benchmark's passkey branch end to end: with a budget covering every key the sparse
  prefill's answers equal the dense ones on every prompt (the rows say so)."""
  import json
  from longax.benchmarks.sparse_prefill import main
  from longax.train import Trainer
  from longax.train import config as C
  cfg = C.override(C.load(str(ROOT / "tests" / "tiny_train_config.py")),
                   ["data.task=passkey", "data.vocab_size=32", "model.max_len=64", "train.steps=1",
                    "train.eval_every=100"])
  Trainer(cfg, tmp_path / "run").run()
  out = tmp_path / "rows.json"
  assert main(["--workdir", str(tmp_path / "run"), "--kinds", "vertical_slash,block_topk+summary",
               "--budgets", "64", "--block", "8", "--n", "3", "--depths", "0.25,0.75",
               "--calibrate", "groups", "--out", str(out)]) == 0
  got = json.loads(out.read_text())
  rows = got["rows"]
  assert got["calibrate"] == "groups"
  assert [p["prefill"] for p in got["plans"]] == ["vertical_slash", "block_topk+summary"]
  assert "calibration on the first prompt of each group" in capsys.readouterr().out
  assert [(r["prefill"], r["prompts"]) for r in rows] == [
      ("dense", "L=32,depth=0.25"), ("dense", "L=32,depth=0.75"),
      ("vertical_slash", "L=32,depth=0.25"), ("vertical_slash", "L=32,depth=0.75"),
      ("block_topk+summary", "L=32,depth=0.25"), ("block_topk+summary", "L=32,depth=0.75")]
  assert all(r["agrees"] == 1.0 and r["tokens"] == 29 for r in rows), rows


def test_benchmark_flag_errors(tmp_path, capsys):
  """One line each, before any model loads (the run folder does not exist)."""
  from longax.benchmarks.sparse_prefill import main
  for args, msg in [(["--depths", "2"], "--depths 2: each must be in [0, 1]"),
                    (["--lengths", "8,x"], "--lengths 8,x: comma-separated numbers"),
                    (["--budgets", "0"], "--budgets 0: each must be in [1, inf]"),
                    (["--calibrate", "all"], "--calibrate all: must be first or groups"),
                    (["--kinds", "block_topk+sum"], "--kinds block_topk+sum: must be")]:
    assert main(["--workdir", str(tmp_path / "none")] + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err


@pytest.mark.parametrize("shape", [(1, 40, 4, 2, 8, 8), (2, 37, 2, 2, 4, 16)], ids=str)
def test_block_scores_are_the_mean_query_against_the_best_key(shape, monkeypatch):
  """`_block_scores` from its definition (loops): the best of block i's probes (its mean query,
  its last PROBES - 1 queries) against block j's keys, -inf for j > i; the estimate's rows in
  steps of a few and in one."""
  from longax.kernels import sparse_attention
  b, t, h, hkv, d, blk = shape
  rng = np.random.default_rng(t)
  q, k = rng.normal(size=(b, t, h, d)), rng.normal(size=(b, t, hkv, d))
  n, p = -(-t // blk), sp.PROBES
  want = np.full((b, h, n, n), -np.inf)
  for bi, hi, i, j in np.ndindex(b, h, n, n):
    rows = q[bi, i * blk:(i + 1) * blk, hi]
    probes = [rows.sum(0) / blk] + [rows[max(len(rows) - 1 - r, 0)] for r in range(p - 1)]
    if j <= i:
      want[bi, hi, i, j] = max(pr @ k[bi, s, hi // (h // hkv)] for pr in probes
                               for s in range(j * blk, min(t, (j + 1) * blk)))
  for elements in (sparse_attention.BLOCK_MAX_ELEMENTS, b * hkv * n * blk * 8):  # 8 rows a step
    monkeypatch.setattr(sparse_attention, "BLOCK_MAX_ELEMENTS", elements)
    got = sp._block_scores(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), blk)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    assert_close(jnp.where(jnp.isinf(got), 0.0, got), np.where(np.isinf(want), 0.0, want),
                 what=str(elements))


def test_block_topk_finds_a_needle_in_a_block():
  """One key that matches the last query block, hidden in a block whose other keys point
  away: its block is chosen (a mean over the block's keys would rank it last) and the
  output equals attention over the local and needle blocks. And a question at a block's
  end: a block of queries pointing elsewhere but for its last, which matches the needle."""
  t, d, blk = 64, 8, 8
  rng = np.random.default_rng(0)
  u = np.zeros(d); u[0] = 1.0
  q = np.tile(u, (t, 1)) + 0.01 * rng.normal(size=(t, d))
  k = 0.01 * rng.normal(size=(t, d))  # unrelated keys
  k[16:24] = -2 * u  # block 2 points away (its mean: -1.25 u) ...
  k[20] = 4 * u  # ... but for the needle
  k[12] = w = np.eye(d)[1]  # a key for queries that point elsewhere, in block 1
  q, k = (jnp.asarray(x[None, :, None], jnp.float32) for x in (q, k))
  v = jnp.asarray(rng.normal(size=(1, t, 1, d)), jnp.float32)
  score = np.asarray(sp._block_scores(q, k, blk))[0, 0, -1]  # the last query block's row
  assert np.argmax(score[:6]) == 2
  got = sp.attend(q, k, v, "block_topk", (1,), 2 * blk, blk, impl="xla")  # local + one more
  mask = np.zeros((1, 1, 8, 8), bool)
  mask[0, 0, -1, [2, 7]] = True
  want = kernels.block_sparse_attention(q, k, v, jnp.asarray(mask), block_q=blk, block_k=blk,
                                        impl="reference")
  assert_close(got[:, -blk:], want[:, -blk:], what="the last query block")
  q2 = np.array(q[0, :, 0])
  q2[-blk:-1] = w  # the last block's queries but its last match block 1's key (the mean too) ...
  score = np.asarray(sp._block_scores(jnp.asarray(q2[None, :, None]), k, blk))[0, 0, -1]
  assert np.argmax(score[:6]) == 2  # ... and its last still finds the needle's block


@pytest.mark.parametrize("budget,heads,block", [(64, (1, 2, 4), 16), (40, (1, 1, 3), 8),
                                                (1000, (2, 1, 1), 16)])
@pytest.mark.parametrize("chunk", [128, 4])
def test_keep_is_local_blocks_and_the_best_others(budget, heads, block, chunk, monkeypatch):
  """`_keep`'s indices against its definition, row by row (numpy): each block once, heads[h]
  nearest blocks, then the best K - heads[h] earlier blocks by score, ties to the lower index
  (scores drawn from few values, so ties occur); one top-k per row and in two stages
  (`kernels.top_k`, chunks of 4, staged on this platform too)."""
  monkeypatch.setattr(topk, "TOPK_CHUNK", chunk)
  monkeypatch.setattr(topk, "STAGED_PLATFORMS", ("cuda", "cpu"))
  rng = np.random.default_rng(budget)
  b, n = 2, 9
  score = rng.integers(0, 4, (b, len(heads), n, n)).astype(np.float32)
  idx = np.asarray(sp._keep(jnp.asarray(score), heads, budget, block))  # [b, H, n, K']
  kb = -(-budget // block)
  got = np.zeros((b, len(heads), n, n), bool)
  for at in np.ndindex(*idx.shape[:3]):
    listed = idx[at][idx[at] >= 0]
    assert len(set(listed)) == len(listed), f"a block listed twice at {at}: {idx[at]}"
    got[at + (listed,)] = True
  want = np.zeros_like(got)
  for bi, h, i in np.ndindex(b, len(heads), n):
    near = [j for j in range(i, -1, -1)][:heads[h]]
    others = sorted((j for j in range(i + 1) if j not in near), key=lambda j: (-score[bi, h, i, j], j))
    want[bi, h, i, near + others[:max(kb - heads[h], 0)]] = True
  np.testing.assert_array_equal(got, want)
