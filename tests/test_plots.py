"""Smoke tests for the README figures' script (fake results in tmp_path) and the kernels
benchmark's plumbing at tiny shapes."""

import json

import numpy as np
import pytest

from longax.benchmarks import plots


def _png(path):
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_mqar_curve(tmp_path):
  run = tmp_path / "mqar-run"
  run.mkdir()
  lines = [dict(step=s, loss=4.0 / s, accuracy=min(1.0, s / 100), lr=1e-3) for s in (25, 50, 75, 100)]
  lines[1].update(eval_loss=0.1, eval_accuracy=0.5)
  lines[3].update(eval_loss=0.01, eval_accuracy=0.99)
  (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
  out = tmp_path / "mqar.png"
  assert plots.main(["mqar", str(run), "--out", str(out)]) == 0
  _png(out)


def test_mqar_missing_metrics_is_one_line(tmp_path, capsys):
  assert plots.main(["mqar", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: cannot read") and err.count("\n") == 1


def test_kernels_json_and_printed_table(tmp_path):
  from longax.benchmarks.kernels import table
  shape = dict(B=2, T=64, H=2, D=16)
  rows = [dict(op="attention", shape=shape, impl="longax.xla", fwd_ms=5.0, fwd_bwd_ms=20.0),
          dict(op="attention", shape=shape, impl="cudnn", fwd_ms=0.6, fwd_bwd_ms=1.6)]
  js = tmp_path / "k.json"
  js.write_text(json.dumps(dict(meta={}, results=rows)))
  txt = tmp_path / "k.txt"  # what the benchmark prints; fla's row has no backward time
  txt.write_text("# date=...\n" + table(
      [dict(op="linear_attention[none]", shape=shape, impl="longax.xla", fwd_ms=2.0, fwd_bwd_ms=3.0),
       dict(op="linear_attention[none]", shape=shape, impl="fla.chunk", fwd_ms=0.4,
            fwd_vs_xla=5.0)]))
  got = plots.read_results([js, txt])
  fla = [r for r in got if r["impl"] == "fla.chunk"][0]
  assert fla["fwd_ms"] == pytest.approx(0.4) and "fwd_bwd_ms" not in fla
  assert fla["shape"] == shape
  out = tmp_path / "kernels.png"
  assert plots.main(["kernels", str(js), str(txt), "--out", str(out)]) == 0
  _png(out)


def test_kernels_benchmark_rows_and_no_check(tmp_path):
  """--rows keeps the named rows only; --no-check leaves out the reference's err."""
  from longax.benchmarks import kernels
  out = tmp_path / "k.json"
  assert kernels.main(["--quick", "--ops", "ssd", "--rows", "longax.xla", "--no-check",
                       "--reps", "1", "--json", str(out)]) == 0
  rows = json.loads(out.read_text())["results"]
  assert [r["impl"] for r in rows] == ["longax.xla"] and "err" not in rows[0]


def test_kernels_benchmark_block_sparse_beside_dense(tmp_path):
  """Block-sparse rows are checked against their reference; the dense baseline is not."""
  from longax.benchmarks import kernels
  out = tmp_path / "k.json"
  assert kernels.main(["--quick", "--ops", "block_sparse_attention", "--reps", "1",
                       "--rows", "longax.xla,dense", "--json", str(out)]) == 0
  rows = json.loads(out.read_text())["results"]
  assert {r["op"] for r in rows} == {"block_sparse[10%]", "block_sparse[25%]", "block_sparse[50%]"}
  assert all(r["err"] < 1e-5 for r in rows if r["impl"] == "longax.xla")
  assert all("err" not in r for r in rows if r["impl"].startswith("dense."))


def test_kernels_benchmark_profile_and_lengths(tmp_path, capsys):
  """--profile adds each row's kernel time from a trace (here the host's XLA ops), printed in
  the table and read back by `plots`; --lengths keeps the grid's shapes of those T, and
  lengths no shape has are one error line naming the grid's lengths."""
  from longax.benchmarks import kernels
  from longax.benchmarks.plots import _text_rows
  out = tmp_path / "k.json"
  assert kernels.main(["--quick", "--ops", "block_sparse_attention", "--reps", "1", "--rows",
                       "longax.xla", "--no-check", "--profile", "--lengths", "256", "--json",
                       str(out)]) == 0
  rows = json.loads(out.read_text())["results"]
  assert len(rows) == 3 and all(r["fwd_dev_ms"] > 0 and r["fwd_bwd_dev_ms"] > 0 for r in rows)
  back = _text_rows(capsys.readouterr().out)
  assert [r["fwd_dev_ms"] for r in back] == [float(f"{r['fwd_dev_ms']:.3g}") for r in rows]
  with pytest.raises(SystemExit) as e:
    kernels.main(["--quick", "--ops", "block_sparse_attention", "--lengths", "99"])
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert e.value.code == 2 and err.endswith(
      "--lengths 99: no shape of the 'quick' grid for --ops block_sparse_attention has that T; "
      "its lengths: 256")


def test_kernels_benchmark_nsa_and_vertical_slash(tmp_path):
  """The issue-#15 cases at the quick grid through main: NSA's core fwd and fwd+bwd and the
  vertical-slash forward, checked against their references, beside dense attention."""
  from longax.benchmarks import kernels
  out = tmp_path / "k.json"
  assert kernels.main(["--quick", "--ops", "nsa,vertical_slash", "--reps", "1",
                       "--rows", "longax.xla,dense", "--json", str(out)]) == 0
  rows = json.loads(out.read_text())["results"]
  assert [(r["op"], r["impl"]) for r in rows] == [
      ("nsa", "longax.xla"), ("nsa", "dense.longax.auto"),
      ("vertical_slash", "longax.xla"), ("vertical_slash", "dense.longax.auto"),
      ("vertical_slash[band]", "longax.xla"), ("vertical_slash[band]", "dense.longax.auto")]
  assert all(r["err"] < 1e-5 for r in rows if r["impl"] == "longax.xla")
  assert all("fwd_bwd_ms" in r for r in rows if r["op"] == "nsa")
  assert all("fwd_bwd_ms" not in r and "fwd_ms" in r for r in rows
             if r["op"].startswith("vertical_slash"))


def test_kernels_benchmark_sparse_prefill(tmp_path):
  """The sparse prefill's attention at the quick grid: block top-k with and without the
  summary branch and vertical-slash, each checked against its reference, forward only, the
  dense baselines once per shape."""
  from longax.benchmarks import kernels
  out = tmp_path / "k.json"
  assert kernels.main(["--quick", "--ops", "sparse_prefill", "--reps", "1",
                       "--rows", "longax.xla,dense", "--json", str(out)]) == 0
  rows = json.loads(out.read_text())["results"]
  assert [(r["op"], r["impl"]) for r in rows] == [
      ("prefill.topk", "longax.xla"), ("prefill.topk", "dense.longax.auto"),
      ("prefill.topk+summary", "longax.xla"), ("prefill.vertical_slash", "longax.xla")]
  assert all(r["err"] < 1e-5 for r in rows if r["impl"] == "longax.xla")
  assert all("fwd_bwd_ms" not in r and "fwd_ms" in r for r in rows)


def test_kernels_benchmark_block_max(tmp_path):
  """Block top-k's estimate alone, checked against its reference (-inf read as 0)."""
  from longax.benchmarks import kernels
  out = tmp_path / "k.json"
  assert kernels.main(["--quick", "--ops", "block_max", "--reps", "1", "--json", str(out)]) == 0
  rows = json.loads(out.read_text())["results"]
  assert [r["impl"] for r in rows] == ["longax.reference", "longax.xla"]
  assert all(r["err"] < 1e-5 for r in rows)


@pytest.mark.parametrize("t,cfg", [(40, dict(block_size=4, stride=2, select_block=4, n_selected=3,
                                             window=5)),
                                   (64, dict(block_size=8, stride=8, select_block=16, n_selected=2,
                                             window=20))])
def test_nsa_pairs_count_each_branch(t, cfg):
  """nsa_pairs against the branches' definitions, query by query."""
  from longax.benchmarks.kernels import nsa_pairs
  l, d, ls, n, w = (cfg[k] for k in ("block_size", "stride", "select_block", "n_selected", "window"))
  want = 0
  for p in range(t):
    want += sum(i * d + l - 1 <= p for i in range(t))  # compressed blocks wholly past
    blocks = [j for j in range(-(-t // ls)) if j * ls <= p][-n:]  # own block + n-1 others
    want += sum(min(p, j * ls + ls - 1) - j * ls + 1 for j in blocks)
    want += min(p + 1, w)
  assert nsa_pairs(t, **cfg) == want


@pytest.mark.parametrize("seed", [0, 1])
def test_vs_pairs_match_the_dense_mask(seed):
  """vs_pairs against a dense causal mask of the pattern (repeats, -1, overlaps)."""
  from longax.benchmarks.kernels import vs_budget, vs_pairs
  rng = np.random.default_rng(seed)
  t = 50
  vert = rng.integers(-1, t, (2, 3, 7))
  slash = rng.integers(-1, t, (2, 3, 5))
  want = 0
  for vb, sb in zip(vert.reshape(-1, 7), slash.reshape(-1, 5)):
    i, j = np.arange(t)[:, None], np.arange(t)
    on = np.isin(j, vb[vb >= 0]) | np.isin(i - j, sb[sb >= 0])
    want += int((on & (j <= i)).sum())
  assert vs_pairs(vert, slash, t) == want
  assert vs_budget(131072) == (1000, 6096) and vs_budget(32768) == (250, 1524)


def test_oom_row_keeps_the_forward_and_prints_oom(capsys):
  """A row whose backward runs out of memory keeps its forward time and prints `oom`; a
  reference that fails leaves the case unchecked; the next row still runs."""
  import jax.numpy as jnp
  from longax.benchmarks import kernels

  def oom():
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 68.7GiB.")

  def broken_reference():
    raise RuntimeError("RESOURCE_EXHAUSTED: reference")

  x = jnp.ones(3)
  case = kernels.Case("nsa", dict(B=1, T=8), 1.0, broken_reference,
                      [kernels.Row("longax.xla", lambda: x, oom),
                       kernels.Row("dense.cudnn", oom, None, same_op=False),
                       kernels.Row("longax.auto", lambda: x, lambda: x)])
  rows = kernels.time_cases([case], reps=1, bwd=True)
  assert rows[0]["oom"] == "fwd_bwd_ms" and "fwd_ms" in rows[0] and "err" not in rows[0]
  assert rows[1]["oom"] == "fwd_ms" and "fwd_ms" not in rows[1]
  assert "oom" not in rows[2] and "fwd_bwd_ms" in rows[2]
  assert "reference failed, no err" in capsys.readouterr().err
  lines = kernels.table(rows, header=False).splitlines()
  assert lines[0].split()[4] == "oom" and lines[1].split()[3] == "oom"
  # --stream: each row on its own line as it lands, no progress bar on stderr to share it
  import io
  out = io.StringIO()
  kernels.time_cases([case], reps=1, bwd=True, stream=out)
  assert [line.split()[2] for line in out.getvalue().splitlines()] == [
      "longax.xla", "dense.cudnn", "longax.auto"]
  assert "benchmark" not in capsys.readouterr().err


def _sparse_rows(t, nsa=(10.0, 30.0), dense=(20.0, 60.0), cudnn=(15.0, 40.0), vs=None, oom=False):
  shape = dict(B=1, T=t, H=16, Hkv=1, D=128)
  rows = [dict(op="nsa", shape=shape, impl="longax.auto", fwd_ms=nsa[0], fwd_bwd_ms=nsa[1]),
          dict(op="nsa", shape=shape, impl="dense.longax.auto", fwd_ms=dense[0],
               fwd_bwd_ms=dense[1]),
          dict(op="nsa", shape=shape, impl="dense.cudnn", fwd_ms=cudnn[0], fwd_bwd_ms=cudnn[1])]
  if vs is not None:
    vshape = dict(B=1, T=t, H=32, Hkv=8, D=128, nv=t // 128, ns=t // 20)
    rows += [dict(op="vertical_slash", shape=vshape, impl="longax.xla", fwd_ms=vs),
             dict(op="vertical_slash", shape=vshape, impl="dense.cudnn", fwd_ms=2 * vs)]
  if oom:
    rows[0] = dict(rows[0], oom="fwd_bwd_ms")
    del rows[0]["fwd_bwd_ms"]
  return rows


def test_sparse_figure_speedups(tmp_path):
  """Speedup = the fastest dense row's time over longax.auto's (else xla's); a case whose
  sparse row ran out of memory is no point of that line; --dense picks the baseline."""
  rows = _sparse_rows(8192, vs=3.0) + _sparse_rows(16384, nsa=(10.0, 0), oom=True)
  got = plots.sparse_speedups(rows)
  assert got["NSA forward"] == [(8192, 1.5, "longax.auto", "dense.cudnn"),
                                (16384, 1.5, "longax.auto", "dense.cudnn")]
  assert got["NSA forward+backward"] == [(8192, 40 / 30, "longax.auto", "dense.cudnn")]
  assert got["vertical-slash forward"] == [(8192, 2.0, "longax.xla", "dense.cudnn")]
  assert plots.sparse_speedups(rows, dense="dense.longax.auto")["NSA forward"][0][1] == 2.0
  js = tmp_path / "sparse.json"
  js.write_text(json.dumps(dict(meta=dict(device="H100", dtype="bfloat16"), results=rows)))
  out = tmp_path / "sparse.png"
  assert plots.main(["sparse", str(js), "--out", str(out)]) == 0
  _png(out)


def test_sparse_figure_without_pairs_is_one_line(tmp_path, capsys):
  js = tmp_path / "k.json"
  js.write_text(json.dumps(dict(meta={}, results=[dict(op="attention", shape=dict(T=8),
                                                        impl="cudnn", fwd_ms=1.0)])))
  assert plots.main(["sparse", str(js), "--out", str(tmp_path / "x.png")]) == 2
  err = capsys.readouterr().err
  assert "no nsa / vertical_slash / prefill case has both" in err and err.count("\n") == 1


def _sp_row(op, scaling, p, t, ms, **kw):
  return dict(op=op, layout="zigzag", scaling=scaling, P=p, T=t, impl="longax", ms_fwd=ms / 4,
              ms_fwd_bwd=ms, tokens_per_s_per_device=t / p / ms * 1e3, device="cpu", **kw)


def test_sp_figure(tmp_path):
  rows = [_sp_row("ring", "strong", 1, 4096, 8.0), _sp_row("ring", "strong", 2, 4096, 5.0,
                                                          efficiency_fwd_bwd=0.8),
          _sp_row("lasp2", "weak", 1, 1024, 1.0), _sp_row("lasp2", "weak", 2, 2048, 1.2,
                                                         efficiency_fwd_bwd=0.83),
          dict(op="ulysses", P=2, error="ValueError: ...")]  # a failed row is left out
  js = tmp_path / "sp.json"
  js.write_text(json.dumps(rows))
  out = tmp_path / "sp.png"
  assert plots.main(["sp", str(js), "--out", str(out)]) == 0
  _png(out)


@pytest.mark.parametrize("content,msg", [
    (None, "error: cannot read"),
    ("{not json", "not a `sequence_parallel --out` file (not JSON)"),
    ('{"results": []}', "no list of rows"),
    ('[{"op": "ring", "error": "x"}]', "no row has a time (ms_fwd_bwd)"),
])
def test_sp_bad_input_is_one_line(tmp_path, capsys, content, msg):
  js = tmp_path / "sp.json"
  if content is not None:
    js.write_text(content)
  assert plots.main(["sp", str(js), "--out", str(tmp_path / "x.png")]) == 2
  err = capsys.readouterr().err
  assert msg in err and err.count("\n") == 1


def test_prefill_plot_and_its_errors(tmp_path, capsys):
  rows = [dict(prefill=k, budget=b, prompts=g, tokens=100, accuracy=a, agrees=a, pairs_kept=f)
          for g in ("L=100,depth=0.5", "L=100,depth=0.9")
          for k, b, a, f in [("dense", 100, 1.0, 1.0), ("vertical_slash", 8, 0.5, 0.2),
                             ("vertical_slash", 32, 1.0, 0.6)]]
  res = tmp_path / "rows.json"
  res.write_text(json.dumps(dict(task="passkey", rows=rows)))
  out = tmp_path / "prefill.png"
  assert plots.main(["prefill", str(res), "--prompts", "L=100,depth=0.9", "--out", str(out)]) == 0
  _png(out)
  capsys.readouterr()
  for args, msg in [(["--prompts", "nope"], "--prompts nope: not in"),
                    (["--prompts", "x"], "--prompts x: not in")]:
    assert plots.main(["prefill", str(res), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {msg}") and err.count("\n") == 1
  bad = tmp_path / "bad.json"
  bad.write_text("[1, 2]")
  assert plots.main(["prefill", str(bad), "--out", str(out)]) == 2
  assert "not a `benchmarks.sparse_prefill --out` file" in capsys.readouterr().err


def test_sparse_figure_prefill_takes_dense_from_the_topk_case(tmp_path):
  """`kernels --ops sparse_prefill --profile` rows: device times; the summary and
  vertical-slash cases have no dense rows of their own and take `prefill.topk`'s (same
  shape); a T whose topk case has no dense row is no point."""
  rows = []
  for t, dense in ((8192, 0.5), (65536, 28.0)):
    shape = dict(B=1, T=t, H=16, Hkv=4, D=128, budget=1024)
    rows += [dict(op="prefill.topk", shape=shape, impl="longax.auto", fwd_ms=9.0, fwd_dev_ms=dense / 4),
             dict(op="prefill.topk", shape=shape, impl="longax.xla", fwd_ms=9.0, fwd_dev_ms=dense * 9),
             dict(op="prefill.topk+summary", shape=shape, impl="longax.auto", fwd_dev_ms=dense / 2),
             dict(op="prefill.vertical_slash", shape=shape, impl="longax.auto", fwd_dev_ms=dense * 2)]
    if t == 8192:
      rows += [dict(op="prefill.topk", shape=shape, impl="dense.cudnn", fwd_dev_ms=dense)]
  got = plots.sparse_speedups(rows)
  assert got["prefill: block top-k"] == [(8192, 4.0, "longax.auto", "dense.cudnn")]
  assert got["prefill: block top-k + summary"] == [(8192, 2.0, "longax.auto", "dense.cudnn")]
  assert got["prefill: vertical-slash"] == [(8192, 0.5, "longax.auto", "dense.cudnn")]
  js = tmp_path / "prefill.json"
  js.write_text(json.dumps(dict(meta=dict(device="H100"), results=rows)))
  out = tmp_path / "prefill.png"
  assert plots.main(["sparse", str(js), "--out", str(out)]) == 0
  _png(out)
